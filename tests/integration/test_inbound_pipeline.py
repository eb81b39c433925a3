"""Mail sent over SMTP to the running server ends up parsed, authenticated and threaded.

Each test runs the real app, the inbound SMTP server and the processing worker in one
LiveServer, with a LocalDNSServer publishing SPF, DKIM and DMARC for ``sender.test``.
"""

from __future__ import annotations

import base64
import json
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import dkim
import pytest
from sqlalchemy import select

from multimail.config import Settings
from multimail.mail.dkim import dns_txt_value, generate_rsa_keypair
from multimail.services import accounts
from multimail.store.tables import audit_entries, events, messages, suppressions
from multimail.testing.dns import LocalDNSServer
from multimail.workers.inbound import run_inbound_worker, run_smtp
from tests.integration.inbound_support import InboundStack, dsn, outbound_message, running
from tests.integration.oversight_support import subscribe_everything

KEY = generate_rsa_keypair(2048)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


@dataclass
class Stack(InboundStack):
    mailbox: dict[str, Any]  # bot@mm.test, gated_send


@pytest.fixture
def stack(settings: Settings, boot: accounts.Bootstrap) -> Iterator[Stack]:
    with LocalDNSServer() as dns_server:
        dns_server.add_record("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        dns_server.add_record("other.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        dns_server.add_record("sel._domainkey.sender.test", "TXT", dns_txt_value(KEY))
        dns_server.add_record("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject")
        dns_server.add_record("forged.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
        dns_server.add_record("_dmarc.forged.test", "TXT", "v=DMARC1; p=reject")
        components = [run_smtp, run_inbound_worker]
        with running(settings, components, dns_resolver=dns_server.address) as (svc, live, port):
            base = InboundStack(svc, live, port, boot)
            yield Stack(svc, live, port, boot, mailbox=base.make_mailbox("bot@mm.test"))


def signed(msg: EmailMessage) -> bytes:
    raw = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    signature: bytes = dkim.sign(
        raw, b"sel", b"sender.test", KEY.private_pem, include_headers=[b"from", b"subject", b"to"]
    )
    return signature + raw


def simple(
    subject: str, body: str, sender: str = "alice@sender.test", **headers: str
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = "bot@mm.test"
    msg["Subject"] = subject
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg


def test_smtplib_message_becomes_markdown_with_attachments_and_inline_images(stack: Stack) -> None:
    """HTML-only mail is stored as clean markdown; attachments and inline images keep types."""
    msg = EmailMessage()
    msg["From"] = "Alice <alice@sender.test>"
    msg["To"] = "bot@mm.test"
    msg["Subject"] = "Report"
    msg["Message-ID"] = "<report-1@sender.test>"
    msg.set_content(
        "<p>Hello <b>team</b></p><script>alert(1)</script><img src='cid:logo1'>", subtype="html"
    )
    msg.add_related(PNG, maintype="image", subtype="png", cid="<logo1>")
    msg.add_attachment(
        b"%PDF-1.4 fake", maintype="application", subtype="pdf", filename="report.pdf"
    )
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        refused = client.send_message(msg)
    assert refused == {}
    (row,) = stack.inbound()
    assert row["status"] == "unread"
    assert "**team**" in row["markdown"] and "alert" not in row["markdown"]
    assert row["html"] is not None and "<script" not in row["html"]
    assert row["message_id_header"] == "<report-1@sender.test>"
    agent = stack.client(stack.boot.agent_key)
    listed = agent.get(f"/v1/mailboxes/{stack.mailbox['id']}/emails").json()
    (item,) = listed["emails"]
    kinds = {a["filename"]: (a["content_type"], a["inline"]) for a in item["attachments"]}
    assert kinds["report.pdf"] == ("application/pdf", False)
    assert ("image/png", True) in kinds.values()
    download = agent.get(f"/v1/mailboxes/bot@mm.test/emails/{item['id']}/attachments/report.pdf")
    assert download.content == b"%PDF-1.4 fake"
    assert download.headers["content-type"] == "application/pdf"
    assert download.headers["content-disposition"].startswith("attachment;")
    assert download.headers["x-content-type-options"] == "nosniff"


async def test_aiosmtplib_signed_message_passes_and_outside_results_are_stripped(
    stack: Stack,
) -> None:
    """SPF, DKIM and DMARC pass for a signed message; a forged Authentication-Results is gone."""
    msg = simple("Signed", "Genuine message.")
    msg["Authentication-Results"] = "mm.test; spf=pass; dkim=pass; dmarc=pass"
    raw = signed(msg)
    await aiosmtplib.send(
        raw,
        sender="bounce@sender.test",
        recipients=["bot@mm.test"],
        hostname="127.0.0.1",
        port=stack.smtp_port,
    )
    (row,) = stack.inbound()
    results = row["auth_results"]
    assert [results[k]["result"] for k in ("spf", "dkim", "dmarc")] == ["pass", "pass", "pass"]
    stored = bytes(row["raw"])
    assert stored.count(b"Authentication-Results:") == 1
    assert stored.startswith(b"Authentication-Results: mm.test; spf=pass")
    assert row["spam_score"] < 5
    reader = stack.client(stack.boot.agent_key)
    body = reader.get("/read_email", params={"message_id": row["id"]}).json()
    assert body["auth_results"]["dkim"]["result"] == "pass"
    assert body["dkim_verified"] is True
    assert body["body"]["untrusted"] is True


async def test_tampered_and_double_from_messages_do_not_pass(stack: Stack) -> None:
    """A body changed after signing fails DKIM; two From headers never get dmarc=pass."""
    raw = signed(simple("Tampered", "Original text.")).replace(b"Original", b"Changed!")
    two_from = signed(simple("Two", "Hi.")).replace(
        b"To: bot@mm.test", b"From: ceo@victim.test\r\nTo: bot@mm.test"
    )
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=stack.smtp_port) as client:
        await client.sendmail("a@sender.test", ["bot@mm.test"], raw)
        await client.sendmail("a@sender.test", ["bot@mm.test"], two_from)
    first, second = stack.inbound(2)
    assert first["auth_results"]["dkim"]["result"] == "fail"
    assert second["auth_results"]["dmarc"]["result"] != "pass"
    assert any(r["code"] == "multiple_from" for r in second["spam_reasons"])


def test_reply_to_an_outbound_message_joins_its_thread(stack: Stack) -> None:
    """In-Reply-To naming our Message-ID puts the reply in that thread; it is unanswered."""
    sent_id = outbound_message(
        stack.services, stack.mailbox, "<offer-1@mm.test>", "alice@sender.test"
    )
    reply = simple(
        "Re: Offer",
        "Sounds good.\n\n> Our offer.",
        In_Reply_To="<offer-1@mm.test>",
        References="<offer-1@mm.test>",
    )
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        client.send_message(reply)
    (row,) = stack.inbound()
    assert row["reply_to_email_id"] == sent_id
    with stack.services.db.read() as conn:
        sent_thread = conn.execute(select(messages.c.thread_id).where(messages.c.id == sent_id))
        assert row["thread_id"] == sent_thread.scalar_one()
    agent = stack.client(stack.boot.agent_key)
    thread = agent.get(f"/v1/mailboxes/bot@mm.test/threads/{row['thread_id']}").json()
    assert [m["direction"] for m in thread["messages"]] == ["outbound", "inbound"]
    assert thread["message_count"] == 2 and thread["unanswered"] is True
    assert set(thread["participants"]) == {"bot@mm.test", "alice@sender.test"}
    assert row["quoted_text"] and "Our offer." in row["quoted_text"]


def test_gated_all_mailbox_holds_mail_out_of_the_agents_sight(stack: Stack) -> None:
    """Held mail is invisible to the agent (list and read) and visible to the reviewer."""
    subscribe_everything(stack.services, stack.boot.account["id"])
    held_box = stack.make_mailbox("held@mm.test", "gated_all")
    msg = simple("Secret", "Only after review.")
    del msg["To"]
    msg["To"] = "held@mm.test"
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        client.send_message(msg)
    (row,) = stack.inbound()
    assert row["status"] == "pending_inbound_approval"
    agent = stack.client(stack.boot.agent_key)
    assert agent.get(f"/v1/mailboxes/{held_box['id']}/emails").json()["emails"] == []
    assert agent.get(f"/v1/mailboxes/{held_box['id']}/emails/{row['id']}").status_code == 404
    assert agent.get("/read_email", params={"message_id": row["id"]}).status_code == 404
    reviewer = stack.client(stack.boot.reviewer_key)
    seen = reviewer.get(f"/v1/mailboxes/{held_box['id']}/emails").json()["emails"]
    assert [e["id"] for e in seen] == [row["id"]]
    with stack.services.db.read() as conn:
        types = [r.type for r in conn.execute(select(events.c.type))]
    assert "message.received" not in types
    assert "oversight.pending" in types  # a subscriber exists: the absence above means something


def test_dsn_marks_the_original_bounced_and_suppresses_the_address(stack: Stack) -> None:
    """A hard bounce marks our message bounced, suppresses the address, fires the event."""
    subscribe_everything(stack.services, stack.boot.account["id"])
    sent_id = outbound_message(stack.services, stack.mailbox, "<offer-2@mm.test>", "gone@far.test")
    stack.smtp_in("", "bot@mm.test", dsn("<offer-2@mm.test>", "gone@far.test", to="bot@mm.test"))
    (report,) = stack.inbound()
    assert report["status"] == "archived"
    with stack.services.db.read() as conn:
        original = conn.execute(select(messages).where(messages.c.id == sent_id)).mappings().one()
        suppressed = conn.execute(select(suppressions)).mappings().all()
        kinds = [r.type for r in conn.execute(select(events.c.type))]
    assert (original["status"], original["bounce_type"]) == ("bounced", "hard")
    assert [(s["address"], s["reason"]) for s in suppressed] == [("gone@far.test", "hard_bounce")]
    assert kinds == ["message.bounced"]


def test_complaint_and_unsubscribe_reply_suppress_the_sender(stack: Stack) -> None:
    """An ARF report and an "unsubscribe" reply each suppress and fire message.complained."""
    subscribe_everything(stack.services, stack.boot.account["id"])
    outbound_message(stack.services, stack.mailbox, "<news-1@mm.test>", "carol@isp.test")
    arf = _feedback_report("carol@isp.test", "<news-1@mm.test>")
    unsubscribe = simple("Re: news", "Please unsubscribe me.", sender="dave@sender.test")
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        client.sendmail("abuse@isp.test", ["bot@mm.test"], arf)
        client.send_message(unsubscribe)
    stack.inbound(2)
    with stack.services.db.read() as conn:
        suppressed = {(r.address, r.reason) for r in conn.execute(select(suppressions))}
        complained = conn.execute(
            select(events.c.id).where(events.c.type == "message.complained")
        ).all()
    assert suppressed == {("carol@isp.test", "complaint"), ("dave@sender.test", "unsubscribe")}
    assert len(complained) == 2


def _kept_for_operator(stack: Stack, rows: list[dict[str, Any]], action: str) -> list[str]:
    """Checks that nobody was suppressed and no complaint fired, and that each of ``rows``
    has one ``action`` audit entry; returns their details (JSON text)."""
    with stack.services.db.read() as conn:
        suppressed = conn.execute(select(suppressions)).all()
        complained = conn.execute(
            select(events.c.id).where(events.c.type == "message.complained")
        ).all()
        kept = conn.execute(
            select(audit_entries.c.subject_id, audit_entries.c.details).where(
                audit_entries.c.action == action
            )
        ).all()
    assert suppressed == [] and complained == []
    assert sorted(r.subject_id for r in kept) == sorted(r["id"] for r in rows)
    return [r.details for r in kept]


def test_an_unsubscribe_request_in_a_forged_name_suppresses_nobody(stack: Stack) -> None:
    """Anyone can write any From: "unsubscribe" in the name of it@forged.test, from an address
    its SPF does not allow (DMARC fails), would have stopped the account's mail to it. It is
    kept for the operator instead (the message, and an audit entry saying why). Found by
    review: the reply was acted on with no check at all."""
    forged = simple("unsubscribe", "Please unsubscribe me.", sender="it@forged.test")
    unverified = simple("unsubscribe", "Stop.", sender="eve@nowhere.test")  # no SPF, no DMARC
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        client.send_message(forged, from_addr="it@forged.test")
        client.send_message(unverified, from_addr="eve@nowhere.test")
    rows = stack.inbound(2)
    kept = _kept_for_operator(stack, rows, "message.unsubscribe_unverified")
    assert {json.loads(r)["address"] for r in kept} == {
        "it@forged.test",
        "eve@nowhere.test",
    }


def _feedback_report(complainant: str, message_id: str) -> bytes:
    return (
        b"From: abuse@isp.test\r\nTo: bot@mm.test\r\nSubject: complaint\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="F"\r\n\r\n'
        b"--F\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
        b"--F\r\nContent-Type: message/feedback-report\r\n\r\n"
        b"Feedback-Type: abuse\r\nUser-Agent: isp/1.0\r\nVersion: 1\r\n"
        + f"Original-Rcpt-To: {complainant}\r\n".encode()
        + b"--F\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        + f"From: bot@mm.test\r\nTo: {complainant}\r\nMessage-ID: {message_id}\r\n".encode()
        + b"--F--\r\n"
    )


def test_a_feedback_report_not_matching_our_mail_suppresses_nobody(stack: Stack) -> None:
    """Anyone can mail a feedback report naming any address. One naming a Message-ID this
    account never sent, or a complainant who was not a recipient of the message it names,
    is kept for the operator (audited with the reason) and suppresses nobody. Found by
    review: reports were acted on with no check, so one forged mail stopped the account's
    mail to a customer."""
    outbound_message(stack.services, stack.mailbox, "<news-2@mm.test>", "carol@isp.test")
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        client.sendmail(
            "abuse@isp.test", ["bot@mm.test"], _feedback_report("ceo@client.test", "<x@nowhere>")
        )
        client.sendmail(
            "abuse@isp.test",
            ["bot@mm.test"],
            _feedback_report("ceo@client.test", "<news-2@mm.test>"),
        )
    rows = stack.inbound(2)
    kept = _kept_for_operator(stack, rows, "message.complaint_unmatched")
    reasons = sorted(json.loads(r)["why"] for r in kept)
    assert reasons == [
        "the complainant was not a recipient of the message the report names",
        "the report names no message this account sent",
    ]


def test_forged_phishing_mail_lands_in_spam_and_can_be_released(stack: Stack) -> None:
    """DMARC failure plus a phishing phrase scores as spam; not-spam moves it to unread."""
    forged = simple(
        "Verify your account",
        "Your account is suspended. Verify your password now.",
        sender="it@forged.test",
    )
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        client.send_message(forged, from_addr="it@forged.test")
    (row,) = stack.inbound()
    assert row["status"] == "spam" and row["spam_score"] >= 5
    assert any(r["code"] == "dmarc_fail" for r in row["spam_reasons"])
    agent = stack.client(stack.boot.agent_key)
    spam = agent.get("/v1/emails", params={"status": "spam"}).json()["emails"]
    assert [e["id"] for e in spam] == [row["id"]]
    released = agent.post(f"/v1/emails/{row['id']}/not-spam")
    assert released.json()["status"] == "unread"
    assert agent.post("/report_spam", json={"message_id": row["id"]}).json()["status"] == "spam"


def test_relaying_and_unknown_mailboxes_are_refused_at_rcpt(stack: Stack) -> None:
    """Never an open relay: 551 for foreign domains, 550 for unknown local addresses."""
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        client.ehlo()
        client.mail("a@sender.test")
        assert client.rcpt("victim@elsewhere.example")[0] == 551
        assert client.rcpt("nobody@mm.test")[0] == 550
        assert client.rcpt("BOT@mm.test")[0] == 250


def test_post_inbound_accepts_raw_and_json_and_processes_inline(stack: Stack) -> None:
    """The MTA hand-over answers with the created message ids, whichever body form is used."""
    admin = stack.client(stack.boot.admin_key)
    raw = simple("Piped", "From the MTA.").as_bytes()
    response = admin.post("/v1/inbound", content=raw, headers={"content-type": "message/rfc822"})
    assert response.status_code == 201, response.text
    (created,) = response.json()["message_ids"]
    response = admin.post(
        "/v1/inbound",
        json={"raw_base64": base64.b64encode(raw).decode(), "rcpt_to": "bot@mm.test"},
    )
    assert response.status_code == 201
    assert response.json()["emails"][0]["subject"] == "Piped"
    nobody = admin.post(
        "/v1/inbound", json={"raw_base64": base64.b64encode(raw).decode(), "rcpt_to": ["x@y.test"]}
    )
    assert nobody.status_code == 404
    agent = stack.client(stack.boot.agent_key)
    assert agent.post("/v1/inbound", content=raw).status_code == 403
    assert created.startswith("msg_")
