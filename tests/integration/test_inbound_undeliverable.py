"""Mail we accepted for a mailbox that was deleted before the message was processed is not
dropped in silence (RFC 5321 §6.1): it is audited, and its sender gets an RFC 3464 report
when that cannot be backscatter.

Each test runs the real inbound SMTP server on 127.0.0.1 with a LocalDNSServer answering
the SPF and DKIM look-ups, sends over SMTP, deletes a mailbox after the 250, and then runs
the real processing (``process_inbound``, what the inbound worker calls): the stack has no
inbound worker, so the deletion always comes between acceptance and processing.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import dkim
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from multimail.config import Settings
from multimail.errors import InvalidInput
from multimail.mail.dkim import dns_txt_value, generate_rsa_keypair
from multimail.mail.reports import build_dsn, parse_dsn
from multimail.services import accounts, inbound, mailboxes, notify
from multimail.services.context import Actor
from multimail.store.tables import audit_entries, inbound_raw, jobs, messages
from multimail.testing.dns import LocalDNSServer
from multimail.testing.smtp import CapturedMessage, CapturingSMTPServer
from multimail.workers.inbound import run_smtp
from multimail.workers.runner import run_workers
from tests.integration import relay_support
from tests.integration.inbound_support import InboundStack, running

relay = relay_support.relay

SENDER = "alice@sender.test"  # SPF passes for 127.0.0.1
FORGED = "it@forged.test"  # SPF fails for 127.0.0.1
SIGNED = "bounces@mail.signed.test"  # no SPF pass; DKIM d=signed.test verifies
BOT = "bot@mm.test"
GONE = "gone@mm.test"
KEY = generate_rsa_keypair(2048)


@dataclass
class Stack(InboundStack):
    dns: LocalDNSServer

    def accept(self, rcpts: Sequence[str], raw: bytes, mail_from: str = SENDER) -> str:
        """Send one message over SMTP; return the id it was stored under once we said 250."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port) as client:
            assert client.sendmail(mail_from, list(rcpts), raw) == {}
        with self.services.db.read() as conn:
            newest = conn.execute(
                select(inbound_raw.c.id).order_by(inbound_raw.c.id.desc()).limit(1)
            ).scalar_one()
        return str(newest)

    def delete(self, mailbox: dict[str, Any]) -> None:
        actor = Actor(type="system", id=None, name="test", account_id=self.boot.account["id"])
        with self.services.db.write() as conn:
            mailboxes.delete_mailbox(conn, actor=actor, ref=mailbox["id"])

    def raw_row(self, inbound_id: str) -> dict[str, Any]:
        with self.services.db.read() as conn:
            found = conn.execute(select(inbound_raw).where(inbound_raw.c.id == inbound_id))
            return dict(found.mappings().one())

    def undeliverable(self) -> list[dict[str, Any]]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(audit_entries)
                .where(audit_entries.c.action == "message.undeliverable")
                .order_by(audit_entries.c.seq)
            ).mappings()
            return [{**r, "details": json.loads(r["details"])} for r in rows]

    def report_jobs(self) -> list[dict[str, Any]]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(jobs).where(jobs.c.kind == notify.SYSTEM_MAIL_JOB).order_by(jobs.c.id)
            ).mappings()
            return [dict(r) for r in rows if r["payload"].get("kind") == notify.NON_DELIVERY_KIND]

    def inbox(self, address: str) -> list[dict[str, Any]]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(messages).where(messages.c.direction == "inbound").order_by(messages.c.id)
            ).mappings()
            return [dict(r) for r in rows if r["to"] and address in r["to"]]


def _dns() -> LocalDNSServer:
    server = LocalDNSServer()
    server.add_record("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    server.add_record("other.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    server.add_record("forged.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    server.add_record("mail.signed.test", "TXT", "v=spf1 ip4:192.0.2.1 ~all")
    server.add_record("sel._domainkey.signed.test", "TXT", dns_txt_value(KEY))
    return server


@contextmanager
def _stack(settings: Settings, boot: accounts.Bootstrap, **changes: Any) -> Iterator[Stack]:
    with (
        _dns() as dns_server,
        running(settings, [run_smtp], dns_resolver=dns_server.address, **changes) as (
            svc,
            live,
            port,
        ),
    ):
        yield Stack(svc, live, port, boot, dns=dns_server)


@pytest.fixture
def stack(settings: Settings, boot: accounts.Bootstrap) -> Iterator[Stack]:
    with _stack(settings, boot) as made:
        yield made


def _mail(
    subject: str,
    body: str,
    *,
    sender: str = SENDER,
    to: Sequence[str] = (BOT, GONE),
    number: int = 1,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = "Tue, 02 Jan 2024 10:00:00 +0000"
    msg["Message-ID"] = f"<nd-{number}@{sender.rpartition('@')[2]}>"
    msg.set_content(body)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _only_entry(stack: Stack) -> dict[str, Any]:
    (entry,) = stack.undeliverable()
    return entry


def test_a_mailbox_deleted_after_acceptance_reports_to_the_sender_and_the_others_get_it(
    stack: Stack,
) -> None:
    """The message to bot@ and gone@ was accepted for both; gone@ was deleted before it was
    processed. bot@ gets it as always; gone@ is audited as undeliverable (the account's
    entry, as the mailbox was theirs) and a report to the SPF-authenticated sender is queued
    as system mail carrying the header section, never the body."""
    stack.make_mailbox(BOT)
    gone = stack.make_mailbox(GONE)
    inbound_id = stack.accept([BOT, GONE], _mail("Quarterly numbers", "The secret body text."))
    stack.delete(gone)

    created = inbound.process_inbound(stack.services, inbound_id)

    (delivered,) = stack.inbox(BOT)
    assert created == [delivered["id"]] and delivered["subject"] == "Quarterly numbers"
    assert stack.raw_row(inbound_id)["status"] == "processed"
    entry = _only_entry(stack)
    assert (entry["subject_type"], entry["subject_id"]) == ("inbound", inbound_id)
    assert entry["actor_type"] == "system" and entry["account_id"] == stack.boot.account["id"]
    details = entry["details"]
    assert details["recipients"] == [GONE]
    assert details["reason"] == "the mailbox was deleted after the message was accepted"
    assert details["mail_from"] == SENDER
    assert (details["dsn_queued"], details["dsn_skipped"], details["dsn_to"]) == (
        True,
        None,
        SENDER,
    )
    (job,) = stack.report_jobs()
    assert details["job_id"] == job["id"]
    payload = job["payload"]
    assert payload["to"] == [SENDER] and "account_id" not in payload
    assert payload["inbound_id"] == inbound_id and payload["recipients"] == [GONE]
    assert payload["subject"] == "Undelivered Mail Returned to Sender"
    headers = payload["original_headers"]
    assert "Subject: Quarterly numbers" in headers and "Message-ID: <nd-1@sender.test>" in headers
    assert "Return-Path: <alice@sender.test>" in headers  # the header as we stored it
    assert "secret body text" not in headers


def test_the_queued_report_is_a_dsn_our_parser_and_the_email_package_read(stack: Stack) -> None:
    """The bytes ``non_delivery_raw`` writes from the queued payload are an RFC 3464 report:
    our own ``parse_dsn`` reads the failed recipient, its 5.1.1 and the original's
    Message-ID; the email package sees multipart/report with its three parts, from
    MAILER-DAEMON, auto-replied, with a Message-ID made from the inbound id."""
    gone = stack.make_mailbox(GONE)
    inbound_id = stack.accept([GONE], _mail("Hello", "Body.", to=[GONE]))
    stack.delete(gone)
    assert inbound.process_inbound(stack.services, inbound_id) == []
    assert stack.raw_row(inbound_id)["error"] == "no live recipient mailbox"
    (job,) = stack.report_jobs()

    raw = notify.non_delivery_raw(stack.services, job["payload"])

    assert raw is not None
    assert raw == notify.non_delivery_raw(stack.services, job["payload"])  # a retry: same bytes
    report = parse_dsn(raw)
    assert report is not None and report.standard
    assert report.original_message_id == "<nd-1@sender.test>"
    assert report.reporting_mta == "mm.test"
    assert [(r.final_recipient, r.action, r.status) for r in report.recipients] == [
        (GONE, "failed", "5.1.1")
    ]
    assert report.bounce_type == "hard"
    parsed = BytesParser(policy=default_policy).parsebytes(raw)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["From"].addresses[0].addr_spec == "MAILER-DAEMON@mm.test"
    assert parsed["To"].addresses[0].addr_spec == SENDER
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["Message-ID"] == f"<{inbound_id}.dsn@mm.test>"
    received = stack.raw_row(inbound_id)["received_at"]
    assert parsed["Date"].datetime.tzinfo is not None
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert GONE in parts[0].get_content() and "no longer exists" in parts[0].get_content()
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list) and isinstance(blocks[0], Message)
    per_message = blocks[0]
    arrival = datetime.strptime(per_message["Arrival-Date"], "%a, %d %b %Y %H:%M:%S %z")
    stored = received if received.tzinfo else received.replace(tzinfo=UTC)
    assert abs((arrival - stored).total_seconds()) < 1
    assert "Body." not in parts[2].get_content()
    assert not any(part.defects for part in parsed.walk())
    assert notify.non_delivery_raw(stack.services, {**job["payload"], "kind": "reminder"}) is None
    with pytest.raises(InvalidInput) as malformed:
        notify.non_delivery_raw(stack.services, {**job["payload"], "to": [f"{SENDER}\r\nBcc: x"]})
    assert malformed.value.code == "invalid_job"


def test_an_unauthenticated_sender_gets_no_report(stack: Stack) -> None:
    """A MAIL FROM whose domain's SPF fails for the client (and no DKIM vouches for it) may be
    forged: a report would be backscatter to a stranger. Audited, nothing queued."""
    gone = stack.make_mailbox(GONE)
    inbound_id = stack.accept([GONE], _mail("Hi", "Text.", sender=FORGED, to=[GONE]), FORGED)
    stack.delete(gone)
    inbound.process_inbound(stack.services, inbound_id)
    details = _only_entry(stack)["details"]
    assert (details["dsn_queued"], details["dsn_skipped"]) == (False, "unauthenticated")
    assert details["recipients"] == [GONE] and details["mail_from"] == FORGED
    assert details["job_id"] is None and details["dsn_to"] is None
    assert stack.report_jobs() == []


def test_a_dkim_signature_aligned_with_the_envelope_sender_is_enough(stack: Stack) -> None:
    """No SPF pass for mail.signed.test, but a verified DKIM signature of signed.test (its
    organisational domain): the envelope sender is vouched for, the report is queued."""
    gone = stack.make_mailbox(GONE)
    plain = _mail("Signed", "Text.", sender="alice@signed.test", to=[GONE])
    signature: bytes = dkim.sign(
        plain, b"sel", b"signed.test", KEY.private_pem, include_headers=[b"from", b"subject"]
    )
    inbound_id = stack.accept([GONE], signature + plain, SIGNED)
    stack.delete(gone)
    inbound.process_inbound(stack.services, inbound_id)
    details = _only_entry(stack)["details"]
    assert (details["dsn_queued"], details["dsn_to"]) == (True, SIGNED)
    assert [job["payload"]["to"] for job in stack.report_jobs()] == [[SIGNED]]


def test_the_null_sender_gets_no_report(stack: Stack) -> None:
    """Mail from ``<>`` is a report itself (RFC 5321 §4.5.5): answered by nothing."""
    gone = stack.make_mailbox(GONE)
    inbound_id = stack.accept([GONE], _mail("Notice", "Text.", to=[GONE]), "")
    stack.delete(gone)
    inbound.process_inbound(stack.services, inbound_id)
    details = _only_entry(stack)["details"]
    assert (details["dsn_queued"], details["dsn_skipped"], details["mail_from"]) == (
        False,
        "null_sender",
        "",
    )
    assert stack.report_jobs() == []


def test_a_mail_system_sender_gets_no_report(stack: Stack) -> None:
    """MAILER-DAEMON@ and its kind answer reports with reports: none goes to them."""
    gone = stack.make_mailbox(GONE)
    daemon = "MAILER-DAEMON@sender.test"
    inbound_id = stack.accept([GONE], _mail("Notice", "Text.", to=[GONE]), daemon)
    stack.delete(gone)
    inbound.process_inbound(stack.services, inbound_id)
    assert _only_entry(stack)["details"]["dsn_skipped"] == "bounce_sender"
    assert stack.report_jobs() == []


def test_spam_gets_no_report(stack: Stack) -> None:
    """Spam from an SPF-authenticated sender still gets no report: a spam run to deleted
    mailboxes must not turn us into its amplifier."""
    gone = stack.make_mailbox(GONE)
    raw = _mail(
        "Verify your account",
        "Your account has been suspended. You have won the lottery: claim your prize.",
        to=[GONE],
    )
    inbound_id = stack.accept([GONE], raw)
    stack.delete(gone)
    inbound.process_inbound(stack.services, inbound_id)
    details = _only_entry(stack)["details"]
    assert (details["dsn_queued"], details["dsn_skipped"]) == (False, "spam")
    assert stack.report_jobs() == []


def test_the_eleventh_report_to_one_sender_within_an_hour_is_only_audited(stack: Stack) -> None:
    """At most ten reports an hour go to one envelope sender, counted from the audit log: the
    eleventh message is audited with the cap and no report; another sender is not held back
    by the first one's count."""
    gone = stack.make_mailbox(GONE)
    ids = [
        stack.accept([GONE], _mail(f"Note {n}", f"Number {n}.", to=[GONE], number=n))
        for n in range(1, 12)
    ]
    other = stack.accept(
        [GONE], _mail("Other", "Text.", sender="bob@other.test", to=[GONE]), "bob@other.test"
    )
    stack.delete(gone)
    for inbound_id in [*ids, other]:
        inbound.process_inbound(stack.services, inbound_id)
    entries = stack.undeliverable()
    assert [e["subject_id"] for e in entries] == [*ids, other]
    assert [e["details"]["dsn_queued"] for e in entries] == [True] * 10 + [False, True]
    capped = entries[10]["details"]
    assert (capped["dsn_skipped"], capped["cap"]) == ("hourly_cap", 10)
    assert [j["payload"]["to"] for j in stack.report_jobs()] == [[SENDER]] * 10 + [
        ["bob@other.test"]
    ]


def test_a_resent_copy_gets_one_report(stack: Stack) -> None:
    """A client that lost our 250 sends the same message again (RFC 5321 §6.1): both copies
    are audited, the sender gets one report."""
    gone = stack.make_mailbox(GONE)
    raw = _mail("Twice", "Same bytes.", to=[GONE])
    first = stack.accept([GONE], raw)
    second = stack.accept([GONE], raw)
    stack.delete(gone)
    inbound.process_inbound(stack.services, first)
    inbound.process_inbound(stack.services, second)
    entries = stack.undeliverable()
    assert [(e["details"]["dsn_queued"], e["details"]["dsn_skipped"]) for e in entries] == [
        (True, None),
        (False, "duplicate"),
    ]
    assert len(stack.report_jobs()) == 1


def test_a_report_to_a_deleted_mailbox_is_not_answered_with_a_report(stack: Stack) -> None:
    """Loop guard: a delivery report (even one as we write them, from an authenticated,
    non-null sender) reaching a deleted mailbox is audited and answered by nothing, so two
    servers can never bounce reports between them."""
    gone = stack.make_mailbox(GONE)
    report = build_dsn(
        reporting_domain="sender.test",
        to=GONE,
        recipients=["someone@sender.test"],
        arrival_date=datetime(2024, 1, 2, 10, tzinfo=UTC),
        original_headers="From: gone@mm.test\r\nMessage-ID: <ours-1@mm.test>\r\n",
        report_id="r1",
        date=datetime(2024, 1, 2, 10, 5, tzinfo=UTC),
    )
    inbound_id = stack.accept([GONE], report)
    stack.delete(gone)
    inbound.process_inbound(stack.services, inbound_id)
    details = _only_entry(stack)["details"]
    assert (details["dsn_queued"], details["dsn_skipped"]) == (False, "report")
    assert stack.report_jobs() == []


def test_postmaster_of_a_domain_no_longer_claimed_is_undeliverable(stack: Stack) -> None:
    """postmaster@ a domain whose claim was removed after RCPT is an address without a mailbox
    like any other: audited and reported. While claimed, the same mail is postmaster mail
    (kept, as the claim is unverified), never undeliverable."""
    admin = stack.client(stack.boot.admin_key)
    claim = admin.post("/v1/domains", json={"name": "customer.test"})
    assert claim.status_code == 201, claim.text
    kept = stack.accept(["postmaster@customer.test"], _mail("Kept", "A.", number=1))
    inbound.process_inbound(stack.services, kept)
    assert stack.undeliverable() == []
    lost = stack.accept(["postmaster@customer.test"], _mail("Lost", "B.", number=2))
    assert admin.delete(f"/v1/domains/{claim.json()['id']}").status_code in (200, 204)
    inbound.process_inbound(stack.services, lost)
    entry = _only_entry(stack)
    assert entry["subject_id"] == lost and entry["account_id"] is None
    assert entry["details"]["recipients"] == ["postmaster@customer.test"]
    assert entry["details"]["dsn_queued"] is True


def _reports_at(relay: CapturingSMTPServer, count: int) -> list[CapturedMessage]:
    return [m for m in relay.wait_for(count, timeout=30) if m.rcpt_tos == [SENDER]]


def test_the_worker_sends_the_report_from_the_null_sender(
    settings: Settings, boot: accounts.Bootstrap, relay: CapturingSMTPServer
) -> None:
    """The queued report goes out through the real job worker to the loopback relay: from
    ``<>``, DKIM-signed by the server, an RFC 3464 report our parser reads."""
    changes = {
        "smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}"),
        "compose_processes": 0,  # no child processes to outlive the test
    }
    with (
        _dns() as dns_server,
        running(settings, [run_smtp, run_workers], dns_resolver=dns_server.address, **changes) as (
            svc,
            live,
            port,
        ),
    ):
        stack = Stack(svc, live, port, boot, dns=dns_server)
        gone = stack.make_mailbox(GONE)
        inbound_id = stack.accept([GONE], _mail("Hello", "Body.", to=[GONE]))
        stack.delete(gone)
        inbound.process_inbound(stack.services, inbound_id)
        (mail,) = _reports_at(relay, 1)
    assert mail.mail_from == ""
    assert mail.data.startswith(b"DKIM-Signature:")
    report = parse_dsn(mail.data)
    assert report is not None and report.original_message_id == "<nd-1@sender.test>"
    assert mail.as_email()["Message-ID"] == f"<{inbound_id}.dsn@mm.test>"
