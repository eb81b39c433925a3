"""RELIABILITY.md cases the other modules left out, each run end to end on the real stack:
the API, the inbound SMTP server, the inbound and delivery workers, a LocalDNSServer and a
CapturingSMTPServer relay, all in one LiveServer.

- APP-2, "the same content by reply / forward": rejected content sent again as a reply (both
  reply routes, to an inbound message and to the rejected draft itself) or as an attachment is
  held for a reviewer like any send, and none of it reaches SMTP.
- SMTP-4, "an inbound subject reused in a reply": CR/LF smuggled into an inbound Subject,
  From name and Reply-To (raw and RFC 2047-encoded) adds no header and no recipient to the
  reply the agent sends with the defaults taken from that message.
- SMTP-5, "`From` must be the mailbox": a send naming another `from` is refused, and what the
  relay receives says the mailbox in the header From and the envelope.
- DUR-5, "exactly one bounce notice, from <>, never a bounce of a bounce": a message bounced
  by the relay's 5xx, then reported again by DSNs arriving later, gives one
  ``message.bounced`` event, audit entry and suppression; nothing is sent back to a DSN.
- DUR-1 on PostgreSQL: the SQLite-only kill -9 test, run against the PostgreSQL leg.
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from multimail.config import Settings
from multimail.services import accounts, mailboxes
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries, events, messages, suppressions
from multimail.testing.dns import LocalDNSServer
from multimail.testing.smtp import CapturedMessage, CapturingSMTPServer
from multimail.workers.inbound import run_inbound_worker, run_smtp
from multimail.workers.runner import run_workers
from tests.conftest import BACKEND
from tests.integration import test_inbound_crash
from tests.integration.inbound_support import InboundStack, dsn, running
from tests.integration.oversight_support import subscribe_everything

SECRET = "Please wire $1M to account 7."


@dataclass
class Stack(InboundStack):
    relay: CapturingSMTPServer

    def status(self, message_id: str) -> str:
        with self.services.db.read() as conn:
            query = select(messages.c.status).where(messages.c.id == message_id)
            return str(conn.execute(query).scalar_one())

    def wait_status(self, message_id: str, wanted: set[str], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while (status := self.status(message_id)) not in wanted:
            assert time.monotonic() < deadline, f"{message_id} stayed {status}"
            time.sleep(0.05)
        return status

    def from_mailbox(self, address: str) -> list[CapturedMessage]:
        return [m for m in self.relay.messages if m.mail_from == address]


@pytest.fixture
def stack(settings: Settings, boot: accounts.Bootstrap) -> Iterator[Stack]:
    with LocalDNSServer() as dns, CapturingSMTPServer() as relay:
        # Outside senders whose SPF passes from loopback, so inbound mail is ordinary mail.
        for domain in ("sender.test", "relay.example"):
            dns.add_record(domain, "TXT", "v=spf1 ip4:127.0.0.1 -all")
        with running(
            settings,
            [run_workers, run_smtp, run_inbound_worker],
            dns_resolver=dns.address,
            smtp_url=SecretStr(f"smtp://127.0.0.1:{relay.port}"),
        ) as (svc, live, port):
            yield Stack(svc, live, port, boot, relay=relay)


def _mail(subject: str, body: str, **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = headers.pop("From", "Customer <customer@sender.test>")
    msg["To"] = headers.pop("To", "agent@mm.test")
    msg["Subject"] = subject
    msg["Message-ID"] = headers.pop("Message_ID", email.utils.make_msgid(domain="sender.test"))
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


# --------------------------------------------------------------------------- APP-2


def test_rejected_content_sent_again_by_reply_or_attachment_is_held(stack: Stack) -> None:
    """APP-2: after a reviewer rejects a draft, the agent sends the same text as a reply to
    the customer's mail (mailbox and account reply routes, the tool form), as a reply to the
    rejected draft itself, as a new send asking for ``autonomous``, and inside an attachment:
    each is either refused or held for a reviewer, never queued; the relay gets none of it."""
    box = stack.make_mailbox("agent@mm.test", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    reviewer = stack.client(stack.boot.reviewer_key)
    stack.smtp_in("customer@sender.test", "agent@mm.test", _mail("Invoice", "Pay us?"))
    (inbound,) = stack.inbound(1)

    draft = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": ["customer@sender.test"], "subject": "Invoice", "markdown": SECRET},
    ).json()
    assert draft["status"] == "pending_send_approval"
    rejected = reviewer.post(
        "/v1/oversight/decide",
        json={"email_id": draft["id"], "action": "reject", "reason": "no wires"},
    )
    assert rejected.json()["status"] == "rejected"

    attachment = {
        "filename": "note.txt",
        "content_type": "text/plain",
        "content": base64.b64encode(SECRET.encode()).decode(),
    }
    attempts: list[tuple[str, dict[str, Any]]] = [
        (f"/v1/mailboxes/{box['id']}/reply/{inbound['id']}", {"markdown": SECRET}),
        (
            f"/v1/emails/{inbound['id']}/reply",
            {"markdown": SECRET, "idempotency_key": "again-1", "oversight_mode": "autonomous"},
        ),
        (
            "/reply_email",
            {"message_id": inbound["id"], "body": SECRET, "idempotency_key": "again-2"},
        ),
        (f"/v1/mailboxes/{box['id']}/reply/{draft['id']}", {"markdown": SECRET}),
        (
            f"/v1/mailboxes/{box['id']}/send",
            {
                "to": ["customer@sender.test"],
                "subject": "Invoice",
                "markdown": SECRET,
                "oversight_mode": "autonomous",
            },
        ),
        (
            f"/v1/mailboxes/{box['id']}/send",
            {
                "to": ["customer@sender.test"],
                "subject": "Attached",
                "markdown": "See the note.",
                "attachments": [attachment],
            },
        ),
    ]
    held: list[str] = []
    for path, body in attempts:
        answer = agent.post(path, json=body)
        if answer.status_code in (200, 202):
            assert answer.json()["status"] == "pending_send_approval", (path, answer.text)
            held.append(answer.json()["id"])
        else:
            assert 400 <= answer.status_code < 500, (path, answer.text)
    assert len(held) >= 4, "replies and sends with the rejected text should be held, not lost"

    # Nothing of the agent's reached the relay, now or after the workers had time to act.
    time.sleep(1.5)
    assert stack.from_mailbox("agent@mm.test") == []
    assert {stack.status(m) for m in held} == {"pending_send_approval"}
    with stack.services.db.read() as conn:
        holds = conn.execute(
            select(audit_entries.c.subject_id).where(audit_entries.c.subject_id.in_(held))
        ).all()
    assert {r.subject_id for r in holds} == set(held), "every held message is audited"
    for client in (agent, reviewer):
        client.close()


# --------------------------------------------------------------------------- SMTP-4


INJECTED_SUBJECTS = [
    "=?utf-8?q?Order_42=0D=0ABcc:_thief@evil.example?=",
    "=?utf-8?b?" + base64.b64encode(b"Order 42\r\nX-Injected: yes").decode() + "?=",
    "Order 42 =?utf-8?q?=0ATo:_thief@evil.example?=",
]


@pytest.mark.parametrize("subject", INJECTED_SUBJECTS)
def test_inbound_subject_reused_in_a_reply_adds_no_header_or_recipient(
    stack: Stack, subject: str
) -> None:
    """SMTP-4: a reply with the defaults (To from the inbound Reply-To/From, ``Re:`` + the
    inbound Subject) to mail whose Subject, From name and Reply-To carry encoded CR/LF goes to
    exactly the one sender, with no Bcc, no injected field and a one-line Subject."""
    box = stack.make_mailbox("agent@mm.test", "autonomous")
    raw = (
        "From: =?utf-8?q?Eve=0D=0ABcc:_thief@evil.example?= <customer@sender.test>\r\n"
        "Reply-To: =?utf-8?q?Eve=0ACc:_thief@evil.example?= <customer@sender.test>\r\n"
        "To: agent@mm.test\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {email.utils.make_msgid(domain='sender.test')}\r\n"
        "\r\nWhere is my order?\r\n"
    ).encode()
    stack.smtp_in("customer@sender.test", "agent@mm.test", raw)
    (inbound,) = stack.inbound(1)
    agent = stack.client(stack.boot.agent_key)
    reply = agent.post(
        f"/v1/mailboxes/{box['id']}/reply/{inbound['id']}", json={"markdown": "On its way."}
    )
    agent.close()
    assert reply.status_code == 202, reply.text
    assert stack.wait_status(reply.json()["id"], {"delivered"}) == "delivered"
    (sent,) = stack.from_mailbox("agent@mm.test")
    assert sent.rcpt_tos == ["customer@sender.test"]
    parsed = email.message_from_bytes(sent.data)
    names = {name.lower() for name in parsed}
    assert not names & {"bcc", "cc", "x-injected"}, names
    assert [a for _, a in email.utils.getaddresses(parsed.get_all("To", []))] == [
        "customer@sender.test"
    ]
    assert len(parsed.get_all("Subject", [])) == 1
    header_block = sent.data.split(b"\r\n\r\n", 1)[0]
    for line in header_block.split(b"\r\n"):
        # Every header line is a field we write or a folded continuation of one.
        assert line[:1] in (b" ", b"\t") or not line.lower().startswith(
            (b"bcc:", b"cc:", b"x-injected:", b"to: thief")
        ), line
    subject_value = str(parsed["Subject"])
    assert "\r" not in subject_value and "\n" not in subject_value


# --------------------------------------------------------------------------- SMTP-5


def test_from_must_be_the_mailbox(stack: Stack) -> None:
    """SMTP-5: a send naming a ``from`` that is not the caller's mailbox (an outside address,
    another account's mailbox, or a ``from`` field beside the REST mailbox) is refused and
    sends nothing; what is sent carries the mailbox in the header From and the envelope."""
    box = stack.make_mailbox("agent@mm.test", "autonomous")
    other = accounts.bootstrap(stack.services.db, account_name="Other", operator_email="o@o.test")
    with stack.services.db.write() as conn:
        mailboxes.create_mailbox(
            conn,
            actor=Actor(type="system", id=None, name="t", account_id=other.account["id"]),
            settings=stack.services.settings,
            address="other@mm.test",
            oversight_mode="autonomous",
        )
    agent = stack.client(stack.boot.agent_key)
    body = {"to": "customer@sender.test", "subject": "Hi", "body": "Hello."}
    for sender in ("ceo@bank.example", "other@mm.test", "AGENT@mm.test.evil.example"):
        refused = agent.post("/send_email", json=body | {"from": sender})
        assert 400 <= refused.status_code < 500, (sender, refused.text)
    extra = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": ["customer@sender.test"], "subject": "Hi", "markdown": "Hello.", "from": "x@y"},
    )
    assert 400 <= extra.status_code < 500, extra.text

    sent = agent.post("/send_email", json=body | {"from": "agent@mm.test"})
    agent.close()
    assert sent.status_code == 202, sent.text
    assert stack.wait_status(sent.json()["id"], {"delivered"}) == "delivered"
    time.sleep(0.5)
    outgoing = [m for m in stack.relay.messages if m.mail_from != ""]  # "" = operator notices
    assert len(outgoing) == 1
    (only,) = outgoing
    parsed = only.as_email()
    assert [a.addr_spec for a in parsed["From"].addresses] == ["agent@mm.test"]
    assert only.mail_from == "agent@mm.test"


# --------------------------------------------------------------------------- DUR-5


def _bounce_trail(stack: Stack, message_id: str) -> tuple[int, int, int]:
    with stack.services.db.read() as conn:
        audits = conn.execute(
            select(audit_entries.c.seq).where(
                audit_entries.c.subject_id == message_id,
                audit_entries.c.action == "message.bounced",
            )
        ).all()
        fired = conn.execute(select(events.c.id).where(events.c.type == "message.bounced")).all()
        suppressed = conn.execute(
            select(suppressions.c.address).where(suppressions.c.address == "gone@far.test")
        ).all()
    return len(audits), len(fired), len(suppressed)


def _bounced_by_the_relay(stack: Stack, agent: httpx.Client, box: dict[str, Any]) -> str:
    stack.relay.fail_with(550, "5.1.1 no such user", stage="rcpt", only_for=["gone@far.test"])
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": ["gone@far.test"], "subject": "Offer", "markdown": "Our offer."},
    ).json()
    assert stack.wait_status(sent["id"], {"bounced"}) == "bounced"
    return str(sent["id"])


def _dsns_arrive(stack: Stack, message_id: str, count: int) -> None:
    """``count`` DSNs for the message (two relay hops each reporting it), from <>."""
    with stack.services.db.read() as conn:
        header = conn.execute(
            select(messages.c.message_id_header).where(messages.c.id == message_id)
        ).scalar_one()
    for number in range(1, count + 1):
        stack.smtp_in(
            "",
            "agent@mm.test",
            dsn(header, "gone@far.test", to="agent@mm.test", number=number, auto_submitted=True),
        )
    stack.inbound(count)
    time.sleep(1.5)  # the workers' turn to (wrongly) answer or re-notify


def test_a_hard_bounce_suppresses_once_and_a_bounce_is_never_answered(stack: Stack) -> None:
    """DUR-5: the relay refuses a recipient with 550 → the message is ``bounced`` with one
    event, one audit entry and one suppression; the remote side's DSNs then arrive from <>
    and nothing is sent in answer (no bounce of a bounce, no auto-reply) and the address is
    suppressed once; a later send to it never reaches the relay."""
    subscribe_everything(stack.services, stack.boot.account["id"])
    box = stack.make_mailbox("agent@mm.test", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    message_id = _bounced_by_the_relay(stack, agent, box)
    assert _bounce_trail(stack, message_id) == (1, 1, 1)
    before = len(stack.relay.messages)
    _dsns_arrive(stack, message_id, 2)
    answered = stack.relay.messages[before:]
    assert answered == [], [(m.mail_from, m.rcpt_tos) for m in answered]
    assert _bounce_trail(stack, message_id)[2] == 1, "one suppression"

    again = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": ["gone@far.test"], "subject": "Offer", "markdown": "Once more."},
    )
    agent.close()
    if again.status_code == 202:
        assert stack.wait_status(again.json()["id"], {"failed", "send_failed", "bounced"})
    else:
        assert 400 <= again.status_code < 500, again.text
    assert [m for m in stack.relay.messages if "gone@far.test" in m.rcpt_tos] == []


def test_dsns_for_an_already_bounced_message_are_not_a_second_notice(stack: Stack) -> None:
    """DUR-5 "exactly one bounce notice": a message the relay already refused with 550 is
    reported again by two DSNs; the agent still gets one ``message.bounced`` (event and
    audit entry), not three."""
    subscribe_everything(stack.services, stack.boot.account["id"])
    box = stack.make_mailbox("agent@mm.test", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    message_id = _bounced_by_the_relay(stack, agent, box)
    agent.close()
    _dsns_arrive(stack, message_id, 2)
    assert _bounce_trail(stack, message_id) == (1, 1, 1)


# --------------------------------------------------------------------------- DUR-1 on PostgreSQL


@pytest.mark.skipif(BACKEND != "postgres", reason="the SQLite leg runs the original test")
def test_dur1_kill_9_after_250_on_postgresql(
    settings: Settings, services: Services, boot: accounts.Bootstrap, tmp_path: Path
) -> None:
    """DUR-1 on the other leg: the same random SIGKILLs of a ``run_smtp`` process while two
    clients send, against PostgreSQL (where a killed client's open transaction is rolled back
    by the server): every 250'd message is stored whole, each with its processing job.
    ``MULTIMAIL_DUR1_ROUNDS`` sets the rounds here too."""
    test_inbound_crash.test_kill_9_after_250_loses_no_acknowledged_message(
        settings, services, boot, tmp_path
    )


# --------------------------------------------------------------------------- SMTP-6 MIME depth


def test_mime_nesting_beyond_the_cap_is_stored_flagged_and_blocks_no_one(stack: Stack) -> None:
    """SMTP-6, MIME depth, end to end: 1,000 nested multiparts over SMTP get a 250 (the bytes
    are kept whole), are processed in bounded time with a ``mime_depth_exceeded`` finding, and
    an ordinary message sent right after is processed too."""
    stack.make_mailbox("agent@mm.test", "autonomous")
    depth = 1000
    parts = [
        f'Content-Type: multipart/mixed; boundary="b{n}"\r\n\r\n--b{n}\r\n' for n in range(depth)
    ]
    closing = "".join(f"\r\n--b{n}--" for n in reversed(range(depth)))
    raw = (
        "From: customer@sender.test\r\nTo: agent@mm.test\r\nSubject: well\r\n"
        "MIME-Version: 1.0\r\n" + "".join(parts) + "Content-Type: text/plain\r\n\r\n"
        "bottom of the well" + closing + "\r\n"
    ).encode()
    stack.smtp_in("customer@sender.test", "agent@mm.test", raw)
    stack.smtp_in("customer@sender.test", "agent@mm.test", _mail("Normal", "Hello."))
    deep, normal = stack.inbound(2)
    assert deep["subject"] == "well" and normal["subject"] == "Normal"
    findings = [f["detail"] for f in deep["scan_findings"] or [] if f["code"] == "mime_defect"]
    assert "mime_depth_exceeded" in findings, deep["scan_findings"]
    assert normal["status"] == "unread"


def test_a_later_dsn_naming_another_recipient_is_news(stack: Stack) -> None:
    """The one-notice rule does not swallow new facts: the relay refused one recipient at
    RCPT, and later a DSN says a second one (accepted by the relay) failed too: that second
    address is suppressed and reported, once."""
    box = stack.make_mailbox("agent@mm.test", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    stack.relay.fail_with(550, "5.1.1 no such user", stage="rcpt", only_for=["gone@far.test"])
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": ["gone@far.test", "later@far.test"], "subject": "Offer", "markdown": "Hi."},
    ).json()
    agent.close()
    assert stack.wait_status(sent["id"], {"bounced", "delivered"}) in {"bounced", "delivered"}
    with stack.services.db.read() as conn:
        header = conn.execute(
            select(messages.c.message_id_header).where(messages.c.id == sent["id"])
        ).scalar_one()
    stack.smtp_in(
        "",
        "agent@mm.test",
        dsn(header, "later@far.test", to="agent@mm.test", number=7, auto_submitted=True),
    )
    stack.smtp_in(
        "",
        "agent@mm.test",
        dsn(header, "later@far.test", to="agent@mm.test", number=8, auto_submitted=True),
    )
    stack.inbound(2)
    time.sleep(1.5)
    with stack.services.db.read() as conn:
        suppressed = {
            r.address
            for r in conn.execute(
                select(suppressions.c.address).where(suppressions.c.address.like("%@far.test"))
            )
        }
        later_notices = [
            r
            for r in conn.execute(
                select(audit_entries.c.details).where(
                    audit_entries.c.subject_id == sent["id"],
                    audit_entries.c.action == "message.bounced",
                )
            )
            if "later@far.test" in str(r.details)
        ]
    assert suppressed == {"gone@far.test", "later@far.test"}
    assert len(later_notices) == 1
