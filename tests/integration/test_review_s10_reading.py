"""Reviewer's findings (session 10) on the reading side: the inbox list and its filters, message
and attachment views, threads, contacts, and the client and CLI over them (SPEC §5.1, §5.2,
§10). Each test pinned one defect as a strict xfail until the defect was fixed.

Inbound mail is handed in as the operator's MTA would (``inbound.accept_raw``); its SPF, DKIM
and DMARC lookups go to a local DNS server, so nothing leaves this machine.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from email.message import Message
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from multimail import MultimailClient, cli_agent
from multimail.config import Settings
from multimail.services import accounts, inbound, mailboxes
from multimail.services.context import Actor, Services
from multimail.testing.dns import LocalDNSServer
from tests.conftest import Api


@pytest.fixture(scope="module")
def dns_server() -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        # A domain that publishes a reject policy, so unsigned mail "from" it fails DMARC.
        server.add_record("_dmarc.forged.test", "TXT", "v=DMARC1; p=reject")
        yield server


@pytest.fixture
def settings(settings: Settings, dns_server: LocalDNSServer) -> Settings:
    return settings.model_copy(update={"dns_resolver": dns_server.address})


def _mailbox(
    services: Services,
    boot: accounts.Bootstrap,
    address: str = "bot@mm.test",
    mode: str = "gated_send",
) -> dict[str, Any]:
    operator = Actor(type="system", id=None, name="operator", account_id=boot.account["id"])
    with services.db.write() as conn:
        return mailboxes.create_mailbox(
            conn, actor=operator, settings=services.settings, address=address, oversight_mode=mode
        )


def _deliver(services: Services, boot: accounts.Bootstrap, raw: bytes) -> str:
    """Hand ``raw`` in for the hosted mailbox it is addressed to; its message id."""
    mta = Actor(type="system", id=None, name="mta", account_id=boot.account["id"])
    (message_id,) = inbound.accept_raw(services, mta, raw)["message_ids"]
    return str(message_id)


def _with_attachment(part_headers: str, payload: bytes) -> bytes:
    return (
        "From: Alex <alex@customer.test>\r\nTo: bot@mm.test\r\nSubject: Files\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="X"\r\n\r\n'
        "--X\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        f"--X\r\n{part_headers}Content-Transfer-Encoding: base64\r\n\r\n"
        f"{base64.b64encode(payload).decode()}\r\n--X--\r\n"
    ).encode()


def _content_type_charset(value: str) -> str | None:
    header = Message()
    header["Content-Type"] = value
    charset = header.get_content_charset()
    return charset.lower() if charset else None


# --- attachments -----------------------------------------------------------------------------


def test_attachment_with_a_chinese_filename_downloads(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """RFC 6266/5987: an attachment named outside Latin-1 (报告.pdf, sent with RFC 2231)
    downloads; its real name travels in filename*, the plain filename is an ASCII fallback."""
    box = _mailbox(services, boot)
    pdf = b"%PDF-1.4 quarterly report"
    message_id = _deliver(
        services,
        boot,
        _with_attachment(
            "Content-Type: application/pdf\r\n"
            "Content-Disposition: attachment; filename*=utf-8''%E6%8A%A5%E5%91%8A.pdf\r\n",
            pdf,
        ),
    )
    agent = api.client(boot.agent_key)
    listed = agent.get(f"/v1/mailboxes/{box['id']}/emails/{message_id}").json()
    assert [a["filename"] for a in listed["attachments"]] == ["报告.pdf"]

    got = agent.get(f"/v1/mailboxes/{box['id']}/emails/{message_id}/attachments/报告.pdf")
    assert got.status_code == 200, got.text
    assert got.content == pdf
    disposition = got.headers["content-disposition"]
    assert disposition.isascii(), disposition
    assert "filename*=UTF-8''%E6%8A%A5%E5%91%8A.pdf" in disposition


def test_latin1_text_attachment_is_not_declared_utf8(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """A text attachment's bytes are served as they came, so its download declares the
    charset the sender gave (ISO-8859-15), never utf-8 it is not."""
    box = _mailbox(services, boot)
    data = "Café crème, 12 €\r\n".encode("iso-8859-15")
    message_id = _deliver(
        services,
        boot,
        _with_attachment(
            "Content-Type: text/plain; charset=iso-8859-15\r\n"
            'Content-Disposition: attachment; filename="menu.txt"\r\n',
            data,
        ),
    )
    agent = api.client(boot.agent_key)
    got = agent.get(f"/v1/mailboxes/{box['id']}/emails/{message_id}/attachments/menu.txt")
    assert got.status_code == 200, got.text
    assert got.content == data
    declared = _content_type_charset(got.headers["content-type"])
    assert declared in (None, "iso-8859-15"), (
        f"the attachment's bytes are ISO-8859-15, the download declares charset={declared}"
    )


def test_text_attachment_without_a_charset_is_served_without_one(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """A text attachment whose sender named no charset is served with none: the server does
    not know its bytes are UTF-8, so it must not say so."""
    box = _mailbox(services, boot)
    message_id = _deliver(
        services,
        boot,
        _with_attachment(
            'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="a.txt"\r\n',
            b"plain words\r\n",
        ),
    )
    agent = api.client(boot.agent_key)
    got = agent.get(f"/v1/mailboxes/{box['id']}/emails/{message_id}/attachments/a.txt")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "text/plain"


# --- message views ---------------------------------------------------------------------------


def test_blank_plain_alternative_falls_back_to_the_html_text(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """A blank text/plain alternative beside the HTML that holds the message counts as
    missing: the agent reads the HTML's text, as for HTML-only mail."""
    box = _mailbox(services, boot)
    raw = (
        b"From: Alex <alex@customer.test>\r\nTo: bot@mm.test\r\nSubject: Order\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\r\n"
        b"--B\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b"<html><body><p>Please cancel order 42.</p></body></html>\r\n--B--\r\n"
    )
    message_id = _deliver(services, boot, raw)
    read = api.client(boot.agent_key).get(f"/v1/mailboxes/{box['id']}/emails/{message_id}")
    assert read.status_code == 200, read.text
    body = read.json()
    assert "Please cancel order 42." in body["body_text"]
    assert "Please cancel order 42." in body["markdown"]


# --- threads ---------------------------------------------------------------------------------


def test_thread_whose_reply_was_cancelled_is_still_unanswered(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """SPEC §5.1 unanswered flag: a reply that was cancelled (never sent) answered nothing,
    so the thread is still unanswered."""
    box = _mailbox(services, boot)
    question = _deliver(
        services,
        boot,
        b"From: Alex <alex@customer.test>\r\nTo: bot@mm.test\r\nSubject: Refund?\r\n"
        b"Message-ID: <refund-1@customer.test>\r\n\r\nCan I get a refund?\r\n",
    )
    agent = api.client(boot.agent_key)
    reply = agent.post(f"/v1/mailboxes/{box['id']}/reply/{question}", json={"markdown": "Yes."})
    assert reply.status_code == 202, reply.text
    cancelled = agent.post(f"/v1/mailboxes/{box['id']}/emails/{reply.json()['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"

    thread = agent.get(f"/v1/mailboxes/{box['id']}/threads/{reply.json()['thread_id']}").json()
    assert [(m["direction"], m["status"]) for m in thread["messages"]] == [
        ("inbound", "unread"),
        ("outbound", "cancelled"),
    ]
    assert thread["unanswered"] is True, "the customer's question never got an answer"


def test_thread_with_a_reply_awaiting_approval_is_not_unanswered(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """A reply waiting for a reviewer is on its way: the thread is not unanswered, so the agent
    does not draft a second answer."""
    box = _mailbox(services, boot)
    question = _deliver(
        services,
        boot,
        b"From: Alex <alex@customer.test>\r\nTo: bot@mm.test\r\nSubject: Invoice?\r\n\r\n"
        b"Where is my invoice?\r\n",
    )
    agent = api.client(boot.agent_key)
    reply = agent.post(f"/v1/mailboxes/{box['id']}/reply/{question}", json={"markdown": "Soon."})
    assert reply.status_code == 202, reply.text
    assert reply.json()["status"] == "pending_send_approval"
    thread = agent.get(f"/v1/mailboxes/{box['id']}/threads/{reply.json()['thread_id']}").json()
    assert thread["unanswered"] is False


def test_thread_id_with_a_slash_is_readable_or_refused(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """A caller's thread_id holding '/' (crm/case/42) that send accepts can be read back
    with get_thread (or is refused at send)."""
    box = _mailbox(services, boot)
    agent = api.client(boot.agent_key)
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={
            "to": "customer@example.com",
            "subject": "Your case",
            "markdown": "We are on it.",
            "thread_id": "crm/case/42",
        },
    )
    if sent.status_code == 422:
        assert sent.json()["code"] == "invalid_thread_id"
        return
    assert sent.status_code == 202, sent.text
    assert sent.json()["thread_id"] == "crm/case/42"
    client = MultimailClient(api_key=boot.agent_key, base_url=api.base_url, max_retries=0)
    try:
        thread = client.get_thread(thread_id="crm/case/42")
    finally:
        client.close()
    assert thread["message_count"] == 1
    assert thread["messages"][0]["id"] == sent.json()["id"]


# --- the list and its filters ----------------------------------------------------------------


def test_mail_released_out_of_order_reaches_since_id_pollers(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """Held mail a reviewer releases is new to an agent polling with since_id
    (check_inbox and wait_for_email) even when an older message is released after a newer one."""
    box = _mailbox(services, boot, "held@mm.test", "gated_all")
    first = _deliver(
        services,
        boot,
        b"From: alex@customer.test\r\nTo: held@mm.test\r\nSubject: First\r\n\r\nOne.\r\n",
    )
    second = _deliver(
        services,
        boot,
        b"From: sam@customer.test\r\nTo: held@mm.test\r\nSubject: Second\r\n\r\nTwo.\r\n",
    )
    reviewer = api.client(boot.reviewer_key)
    agent = api.client(boot.agent_key)

    def release(message_id: str) -> None:
        decided = reviewer.post(
            "/v1/oversight/decide",
            json={"email_id": message_id, "decision": "approve", "reviewer": "rev"},
        )
        assert decided.json()["status"] == "unread", decided.text

    release(second)
    seen = agent.get("/check_inbox", params={"mailbox_id": box["id"]}).json()["emails"]
    assert [e["id"] for e in seen] == [second]
    release(first)  # the reviewer got to the older one later

    newer = agent.get("/check_inbox", params={"mailbox_id": box["id"], "since_id": second})
    waited = agent.get(
        "/wait_for_email", params={"mailbox_id": box["id"], "since_id": second, "timeout": 0}
    )
    assert [e["id"] for e in newer.json()["emails"]] == [first]
    assert [e["id"] for e in waited.json()["emails"]] == [first]


def test_spam_stays_out_of_the_default_inbox_listing(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """SPEC §5.1 spam quarantine: mail scored as spam is listed under status=spam only,
    not in the default inbox listing."""
    box = _mailbox(services, boot)
    ham = _deliver(
        services,
        boot,
        b"From: alex@customer.test\r\nTo: bot@mm.test\r\nSubject: Lunch\r\n\r\nLunch at 1?\r\n",
    )
    phish = _deliver(
        services,
        boot,
        b"From: IT <it@forged.test>\r\nTo: bot@mm.test\r\nSubject: Verify your account\r\n\r\n"
        b"Your account is suspended. Verify your password now.\r\n",
    )
    agent = api.client(boot.agent_key)
    quarantined = agent.get("/v1/emails", params={"status": "spam"}).json()["emails"]
    assert [e["id"] for e in quarantined] == [phish]
    inbox = agent.get(f"/v1/mailboxes/{box['id']}/emails").json()["emails"]
    assert [e["id"] for e in inbox] == [ham]


def test_mail_marked_not_spam_reaches_since_id_pollers(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """Mail taken out of quarantine (not-spam) is new to an agent polling with since_id, even
    though it arrived before the mail the agent saw last."""
    box = _mailbox(services, boot)
    phish = _deliver(
        services,
        boot,
        b"From: IT <it@forged.test>\r\nTo: bot@mm.test\r\nSubject: Verify your account\r\n\r\n"
        b"Your account is suspended. Verify your password now.\r\n",
    )
    ham = _deliver(
        services,
        boot,
        b"From: alex@customer.test\r\nTo: bot@mm.test\r\nSubject: Lunch\r\n\r\nLunch at 1?\r\n",
    )
    agent = api.client(boot.agent_key)
    seen = agent.get("/check_inbox", params={"mailbox_id": box["id"]}).json()["emails"]
    assert [e["id"] for e in seen] == [ham]
    released = agent.post(f"/v1/emails/{phish}/not-spam")
    assert released.json()["status"] == "unread", released.text

    newer = agent.get("/check_inbox", params={"mailbox_id": box["id"], "since_id": ham})
    waited = agent.get(
        "/wait_for_email", params={"mailbox_id": box["id"], "since_id": ham, "timeout": 0}
    )
    assert [e["id"] for e in newer.json()["emails"]] == [phish]
    assert [e["id"] for e in waited.json()["emails"]] == [phish]


def test_since_id_that_is_no_message_id_is_refused(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """since_id is checked like cursor is: an RFC Message-ID names its message (or is a
    422), never compared as text so that the whole mailbox comes back as new."""
    box = _mailbox(services, boot)
    first = _deliver(
        services,
        boot,
        b"From: alex@customer.test\r\nTo: bot@mm.test\r\nSubject: One\r\n"
        b"Message-ID: <one@customer.test>\r\n\r\nOne.\r\n",
    )
    second = _deliver(
        services,
        boot,
        b"From: alex@customer.test\r\nTo: bot@mm.test\r\nSubject: Two\r\n"
        b"Message-ID: <two@customer.test>\r\n\r\nTwo.\r\n",
    )
    agent = api.client(boot.agent_key)
    assert agent.get(f"/v1/emails/{first}").json()["message_id_header"] == "<one@customer.test>"
    answer = agent.get(
        f"/v1/mailboxes/{box['id']}/emails", params={"since_id": "<one@customer.test>"}
    )
    if answer.status_code == 422:
        assert answer.json()["code"] in ("invalid_since_id", "validation_error")
        return
    assert answer.status_code == 200, answer.text
    assert [e["id"] for e in answer.json()["emails"]] == [second]


def test_since_id_naming_no_message_is_a_422_that_says_what_to_pass(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """A since_id that is neither a message id nor a Message-ID is refused with
    invalid_since_id, by the listing and by wait_for_email alike."""
    box = _mailbox(services, boot)
    agent = api.client(boot.agent_key)
    listed = agent.get(f"/v1/mailboxes/{box['id']}/emails", params={"since_id": "yesterday"})
    waited = agent.get(
        "/wait_for_email", params={"mailbox_id": box["id"], "since_id": "yesterday", "timeout": 0}
    )
    for answer in (listed, waited):
        assert answer.status_code == 422, answer.text
        assert answer.json()["code"] == "invalid_since_id"
        assert "msg_" in answer.json()["error"]


def test_wait_for_email_takes_a_long_message_id_as_since_id(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """since_id may be a Message-ID (the REST listing takes one); the tool's input limit of
    40 characters refused any real one with validation_error."""
    box = _mailbox(services, boot)
    header = "<" + "a" * 60 + "@customer.test>"
    first = _deliver(
        services,
        boot,
        f"From: alex@customer.test\r\nTo: bot@mm.test\r\nSubject: One\r\n"
        f"Message-ID: {header}\r\n\r\nFirst.\r\n".encode(),
    )
    second = _deliver(
        services,
        boot,
        b"From: alex@customer.test\r\nTo: bot@mm.test\r\nSubject: Two\r\n\r\nSecond.\r\n",
    )
    agent = api.client(boot.agent_key)
    answer = agent.post(
        "/wait_for_email", json={"mailbox_id": box["id"], "since_id": header, "timeout": 0}
    )
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["email"]["id"] == second != first, found


def test_subject_search_ignores_case_beyond_ascii(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """subject_contains ignores case beyond ASCII on both databases: 'über' finds 'ÜBER'
    (SQLite's lower() folds ASCII only)."""
    box = _mailbox(services, boot)
    invoice = _deliver(
        services,
        boot,
        b"From: billing@vendor.test\r\nTo: bot@mm.test\r\n"
        b"Subject: =?utf-8?q?=C3=9CBER_Ihre_Rechnung?=\r\n\r\nAnbei.\r\n",
    )
    agent = api.client(boot.agent_key)
    assert agent.get(f"/v1/emails/{invoice}").json()["subject"] == "ÜBER Ihre Rechnung"
    found = agent.get(f"/v1/mailboxes/{box['id']}/emails", params={"subject_contains": "über"})
    assert [e["id"] for e in found.json()["emails"]] == [invoice]


# --- contacts --------------------------------------------------------------------------------


def test_contact_search_treats_wildcards_literally(api: Api, boot: accounts.Bootstrap) -> None:
    """SPEC §5.1 contacts q: a literal substring match, '_' and '%' are not LIKE
    wildcards (as the inbox's subject_contains)."""
    admin = api.client(boot.admin_key)
    made = {}
    for address in ("john_smith@example.com", "johnasmith@example.com"):
        created = admin.post("/v1/contacts", json={"email": address})
        assert created.status_code == 201, created.text
        made[address] = created.json()["id"]
    found = admin.get("/v1/contacts", params={"q": "john_smith"}).json()["contacts"]
    assert [c["id"] for c in found] == [made["john_smith@example.com"]]
    everything = admin.get("/v1/contacts", params={"q": "%"}).json()["contacts"]
    assert everything == []


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_inbox_shows_a_subject_with_brackets_literally(
    api: Api, services: Services, boot: accounts.Bootstrap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`multimail inbox` shows a sender's subject literally: '[/]' is text, not Rich
    markup that crashes the command."""
    _mailbox(services, boot)
    _deliver(
        services,
        boot,
        b"From: alex@customer.test\r\nTo: bot@mm.test\r\nSubject: [/] Refund\r\n\r\nHi.\r\n",
    )
    monkeypatch.setenv("MULTIMAIL_API_URL", api.base_url)
    monkeypatch.setenv("MULTIMAIL_API_KEY", boot.agent_key)
    monkeypatch.delenv("MULTIMAIL_MAILBOX_ID", raising=False)
    app = typer.Typer()
    cli_agent.register(app)
    result = CliRunner().invoke(app, ["inbox", "--mailbox", "bot@mm.test"])
    assert result.exception is None, repr(result.exception)
    assert result.exit_code == 0
    assert "[/]" in result.output and "Refund" in result.output
