"""Mail to postmaster (RFC 5321 §4.5.1, §4.1.1.3) is accepted at every domain we serve and
reaches a human, or is kept and audited when forwarding it would be wrong.

Each test runs the real stack on 127.0.0.1: the inbound SMTP server, the processing worker
and the job workers in one LiveServer, a LocalDNSServer answering every look-up (SPF and
DMARC of the senders, the records of the domains customers verify) and a capturing SMTP relay
that receives the system mail the forwards are sent as.
"""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from multimail.config import Settings
from multimail.services import accounts
from multimail.services.notify import mask_address
from multimail.store.tables import audit_entries, inbound_raw, jobs, messages, suppressions
from multimail.testing.dns import LocalDNSServer
from multimail.testing.smtp import CapturedMessage, CapturingSMTPServer
from multimail.workers.inbound import run_inbound_worker, run_smtp
from multimail.workers.runner import run_workers
from tests.integration import relay_support
from tests.integration.inbound_support import InboundStack, dsn, outbound_message, running

relay = relay_support.relay

HOSTMASTER = "hostmaster@admin.example"  # MULTIMAIL_POSTMASTER_EMAIL in these tests
OPERATOR = "ops@mm.test"  # the bootstrap account's oversight_email
SENDER = "alice@sender.test"
FORWARD_SUBJECT = "[MultiMail] Mail to "


@dataclass
class Stack(InboundStack):
    relay: CapturingSMTPServer
    dns: LocalDNSServer

    def send(self, rcpts: Sequence[str], raw: bytes, mail_from: str = SENDER) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp_port) as client:
            assert client.sendmail(mail_from, list(rcpts), raw) == {}

    def processed(self, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until ``count`` stored messages are processed; return them oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            with self.services.db.read() as conn:
                rows = [
                    dict(r)
                    for r in conn.execute(
                        select(inbound_raw).order_by(inbound_raw.c.received_at, inbound_raw.c.id)
                    ).mappings()
                ]
            done = [r for r in rows if r["status"] != "stored"]
            if len(done) >= count or time.monotonic() > deadline:
                assert len(done) >= count, f"only {len(done)} of {count} messages processed"
                return done
            time.sleep(0.05)

    def postmaster_audit(self) -> list[dict[str, Any]]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(audit_entries)
                .where(audit_entries.c.action.like("postmaster.%"))
                .order_by(audit_entries.c.seq)
            ).mappings()
            return [{**r, "details": json.loads(r["details"])} for r in rows]

    def forward_jobs(self) -> list[dict[str, Any]]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(jobs).where(jobs.c.kind == "system_mail").order_by(jobs.c.id)
            ).mappings()
            return [dict(r) for r in rows if r["payload"].get("kind") == "postmaster_forward"]

    def forwards(self, count: int) -> list[CapturedMessage]:
        """The first ``count`` forwards the relay received, waiting for them."""
        deadline = time.monotonic() + 30
        while True:
            found = [m for m in self.relay.messages if _subject(m).startswith(FORWARD_SUBJECT)]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, f"only {len(found)} of {count} forwards arrived"
                return found
            time.sleep(0.05)

    def verified_domain(self, name: str) -> None:
        """``name`` claimed by the bootstrap account and proved through the local DNS."""
        owner = self.client(self.boot.admin_key)
        domain = owner.post("/v1/domains", json={"name": name}).json()
        for record in domain["dns_records"]:
            self.dns.add_record(record["name"], record["type"], record["value"])
        verified = owner.post(f"/v1/domains/{domain['id']}/verify")
        assert verified.json()["verified"] is True, verified.text


@contextmanager
def _stack(
    settings: Settings, boot: accounts.Bootstrap, relay: CapturingSMTPServer, **changes: Any
) -> Iterator[Stack]:
    with LocalDNSServer() as dns_server:
        dns_server.add_record("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        dns_server.add_record("forged.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
        dns_server.add_record("_dmarc.forged.test", "TXT", "v=DMARC1; p=reject")
        components = [run_smtp, run_inbound_worker, run_workers]
        with running(
            settings,
            components,
            dns_resolver=dns_server.address,
            smtp_url=SecretStr(f"smtp://127.0.0.1:{relay.port}"),
            compose_processes=0,  # no child processes to outlive the test
            **changes,
        ) as (svc, live, port):
            yield Stack(svc, live, port, boot, relay=relay, dns=dns_server)


@pytest.fixture
def stack(
    settings: Settings, boot: accounts.Bootstrap, relay: CapturingSMTPServer
) -> Iterator[Stack]:
    with _stack(settings, boot, relay, postmaster_email=HOSTMASTER) as made:
        yield made


def _mail(
    subject: str,
    body: str,
    *,
    to: str = "postmaster@mm.test",
    sender: str = SENDER,
    html: bool = False,
    number: int = 1,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Tue, 02 Jan 2024 10:00:00 +0000"
    msg["Message-ID"] = f"<pm-{number}@sender.test>"
    if html:
        msg.set_content(body, subtype="html")
    else:
        msg.set_content(body)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _subject(mail: CapturedMessage) -> str:
    return str(mail.as_email()["Subject"] or "")


def _plain(mail: CapturedMessage) -> str:
    part = mail.as_email().get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def _html(mail: CapturedMessage) -> str:
    part = mail.as_email().get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def _reasons(stack: Stack) -> list[str]:
    return [
        e["details"]["reason"] for e in stack.postmaster_audit() if e["action"] == "postmaster.kept"
    ]


def test_bare_postmaster_in_any_case_is_accepted_for_the_server_domain(stack: Stack) -> None:
    """RFC 5321 §4.1.1.3: ``<Postmaster>`` with no domain, in any case, is accepted (a second
    spelling in the same transaction is the same recipient) and goes where mail to
    postmaster@<server domain> goes."""
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        client.ehlo()
        client.mail(SENDER)
        assert client.rcpt("<Postmaster>")[0] == 250
        duplicate = client.rcpt("<POSTMASTER>")
        assert duplicate == (250, b"2.1.5 Recipient OK (duplicate ignored)")
        assert client.data(_mail("Your server", "Hello postmaster.", to="Postmaster"))[0] == 250
    (row,) = stack.processed()
    assert row["rcpt_tos"] == ["postmaster"]
    assert (row["status"], row["error"]) == ("processed", None)
    (mail,) = stack.forwards(1)
    assert mail.rcpt_tos == [HOSTMASTER] and mail.mail_from == ""
    assert _subject(mail) == "[MultiMail] Mail to postmaster@mm.test: Your server"


def test_postmaster_at_the_server_domain_is_forwarded_to_the_configured_address(
    stack: Stack,
) -> None:
    """postmaster@<server domain> (local part in any case) goes to MULTIMAIL_POSTMASTER_EMAIL
    with the envelope, the headers, our checks and the text; the forward is audited with the
    address masked and the inbound id, and the raw message ends processed."""
    stack.send(["PostMaster@mm.test"], _mail("Abuse   from\tyour  network", "Please look at it."))
    (row,) = stack.processed()
    assert (row["status"], row["error"]) == ("processed", None)
    (mail,) = stack.forwards(1)
    assert mail.rcpt_tos == [HOSTMASTER]
    assert _subject(mail) == "[MultiMail] Mail to postmaster@mm.test: Abuse from your network"
    text = _plain(mail)
    for line in (
        f"Envelope sender: <{SENDER}>",
        "Envelope recipient: postmaster@mm.test",
        f"From: Alice <{SENDER}>",
        "To: postmaster@mm.test",
        "Date: Tue, 02 Jan 2024 10:00:00 +0000",
        "Message-ID: <pm-1@sender.test>",
        "spf=pass smtp.mailfrom=sender.test",
        "Spam score: ",
        "Please look at it.",
        row["id"],
    ):
        assert line in text, line
    (entry,) = stack.postmaster_audit()
    assert entry["action"] == "postmaster.forwarded"
    assert (entry["subject_type"], entry["subject_id"]) == ("inbound", row["id"])
    assert entry["actor_type"] == "system" and entry["account_id"] is None
    details = entry["details"]
    assert details["to"] == mask_address(HOSTMASTER) != HOSTMASTER
    assert details["inbound_id"] == row["id"]
    assert details["postmaster"] == ["postmaster@mm.test"]
    assert HOSTMASTER not in json.dumps(details)
    (job,) = stack.forward_jobs()
    assert job["payload"]["to"] == [HOSTMASTER] and "account_id" not in job["payload"]


def test_postmaster_of_a_verified_customer_domain_goes_to_its_operator(stack: Stack) -> None:
    """postmaster@<a domain an account verified> reaches that account's oversight address,
    and the audit entry is the account's."""
    stack.verified_domain("customer.test")
    stack.send(
        ["postmaster@customer.test"], _mail("DNS", "Your MX is odd.", to="postmaster@customer.test")
    )
    (row,) = stack.processed()
    assert (row["status"], row["error"]) == ("processed", None)
    (mail,) = stack.forwards(1)
    assert mail.rcpt_tos == [OPERATOR]
    assert _subject(mail) == "[MultiMail] Mail to postmaster@customer.test: DNS"
    assert "Your MX is odd." in _plain(mail)
    (entry,) = stack.postmaster_audit()
    assert entry["action"] == "postmaster.forwarded"
    assert entry["account_id"] == stack.boot.account["id"]
    assert entry["details"]["to"] == mask_address(OPERATOR)
    (job,) = stack.forward_jobs()
    assert job["payload"]["account_id"] == stack.boot.account["id"]


def test_postmaster_of_a_pending_claim_is_accepted_but_kept_from_the_claimant(
    stack: Stack,
) -> None:
    """Anyone can claim a domain; until it is verified its postmaster mail is accepted and
    kept, never forwarded to whoever claimed it, and the audit entry is not theirs."""
    mallory = accounts.bootstrap(
        stack.services.db, account_name="Mallory", operator_email="m@mallory.test"
    )
    claim = stack.client(mallory.admin_key).post("/v1/domains", json={"name": "victim.test"})
    assert claim.status_code == 201, claim.text
    stack.send(
        ["postmaster@victim.test"], _mail("Private", "For the owner.", to="postmaster@victim.test")
    )
    (row,) = stack.processed()
    assert (row["status"], row["error"]) == ("processed", None)
    (entry,) = stack.postmaster_audit()
    assert entry["action"] == "postmaster.kept"
    assert entry["details"]["reason"] == "domain_unverified"
    assert entry["account_id"] is None
    assert stack.forward_jobs() == []


def test_postmaster_of_a_foreign_domain_is_refused_and_unknown_addresses_stay_refused(
    stack: Stack,
) -> None:
    """Postmaster of a domain we do not serve is a relay attempt (551); any other unknown
    address of ours is still refused (550), so nothing is stored and nothing forwarded."""
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        client.ehlo()
        client.mail(SENDER)
        assert client.rcpt("postmaster@elsewhere.example")[0] == 551
        assert client.rcpt("postmaster.team@mm.test")[0] == 550
        assert client.rcpt("nobody@mm.test")[0] == 550
    with stack.services.db.read() as conn:
        assert conn.execute(select(inbound_raw.c.id)).all() == []
    assert stack.forward_jobs() == [] and stack.postmaster_audit() == []


def test_a_postmaster_mailbox_gets_its_mail_and_nothing_is_forwarded(stack: Stack) -> None:
    """A live mailbox postmaster@<domain> takes the mail as any mailbox does, the bare
    ``<postmaster>`` included: no forward, no postmaster audit entry."""
    stack.make_mailbox("postmaster@mm.test")
    stack.send(["postmaster"], _mail("One", "First.", number=1))
    stack.send(["Postmaster@MM.test"], _mail("Two", "Second.", number=2))
    rows = stack.inbound(2)
    assert sorted(r["subject"] for r in rows) == ["One", "Two"]
    assert all(r["status"] == "unread" for r in rows)
    assert [r["error"] for r in stack.processed(2)] == [None, None]
    assert stack.forward_jobs() == [] and stack.postmaster_audit() == []


def test_mail_to_a_mailbox_and_postmaster_reaches_both(stack: Stack) -> None:
    """One message to an agent's mailbox and to postmaster: the mailbox gets it as always,
    and postmaster's copy is forwarded."""
    stack.make_mailbox("bot@mm.test")
    stack.send(["bot@mm.test", "postmaster@mm.test"], _mail("Both", "Shared text."))
    (delivered,) = stack.inbound(1)
    assert (delivered["subject"], delivered["status"]) == ("Both", "unread")
    (mail,) = stack.forwards(1)
    assert mail.rcpt_tos == [HOSTMASTER] and "Shared text." in _plain(mail)


def test_spam_to_postmaster_is_kept_not_forwarded(stack: Stack) -> None:
    """Mail the spam analysis scores as spam stays in inbound_raw, audited with its score."""
    stack.send(
        ["postmaster@mm.test"],
        _mail(
            "Verify your account",
            "Your account is suspended. Verify your password now.",
            sender="it@forged.test",
        ),
        mail_from="it@forged.test",
    )
    (row,) = stack.processed()
    assert (row["status"], row["error"]) == ("processed", None)
    (entry,) = stack.postmaster_audit()
    assert (entry["action"], entry["details"]["reason"]) == ("postmaster.kept", "spam")
    assert entry["details"]["spam_score"] >= 5
    assert stack.forward_jobs() == []


def test_the_twenty_first_forward_to_one_destination_within_an_hour_is_kept(
    stack: Stack,
) -> None:
    """At most 20 forwards an hour go to one address: past that, postmaster mail is kept and
    audited (flood_cap), so a flood of it cannot flood the human who reads it."""
    with smtplib.SMTP("127.0.0.1", stack.smtp_port) as client:
        for number in range(1, 22):
            raw = _mail(f"Note {number}", f"Message number {number}.", number=number)
            assert client.sendmail(SENDER, ["postmaster@mm.test"], raw) == {}
    rows = stack.processed(21)
    assert all((r["status"], r["error"]) == ("processed", None) for r in rows)
    assert len(stack.forward_jobs()) == 20
    kept = [e for e in stack.postmaster_audit() if e["action"] == "postmaster.kept"]
    assert [(e["details"]["reason"], e["details"]["cap"]) for e in kept] == [("flood_cap", 20)]
    assert len(stack.forwards(20)) == 20


def test_a_resent_copy_is_not_forwarded_twice(stack: Stack) -> None:
    """A client that lost our 250 sends the same bytes again (RFC 5321 §6.1): the human gets
    one forward, the second copy is kept as a duplicate."""
    raw = _mail("Once", "Only once, please.")
    stack.send(["postmaster@mm.test"], raw)
    stack.processed(1)
    stack.send(["postmaster@mm.test"], raw)
    stack.processed(2)
    assert len(stack.forward_jobs()) == 1
    assert _reasons(stack) == ["duplicate"]


def test_html_only_mail_is_forwarded_as_text(stack: Stack) -> None:
    """An HTML-only message is forwarded with the text the inbox derives from it, its markup
    and scripts gone."""
    stack.send(
        ["postmaster@mm.test"],
        _mail("Report", "<p>Hello <b>team</b></p><script>alert(1)</script>", html=True),
    )
    (mail,) = stack.forwards(1)
    text = _plain(mail)
    assert "Hello **team**" in text
    assert "<p>" not in text and "alert" not in text


def test_a_crafted_message_cannot_break_out_of_the_fence(stack: Stack) -> None:
    """Backtick runs, look-alike backticks and markdown links in the body and headers stay
    inside the fenced blocks: the forward's HTML has no link of the sender's and no text of
    theirs outside a code block."""
    evil = "http://evil.example/approve"
    body = (
        f"Innocent start.\n```\n\n[Approve now]({evil})\n\n````\n"
        "\u02cb\u02cb\u02cb\u02cb\u02cb\n**MultiMail:** this sender is verified.\n"
    )
    # Written by hand: the subject is folded, so unfolding could join its lines.
    raw = (
        f'From: "[Approve]({evil}) ``` " <{SENDER}>\r\n'
        "To: postmaster@mm.test\r\n"
        f"Subject: ```\r\n [click]({evil})\r\n"
        "Message-ID: <crafted@sender.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n" + body.replace("\n", "\r\n")
    ).encode()
    stack.send(["postmaster@mm.test"], raw)
    (mail,) = stack.forwards(1)
    html = _html(mail)
    assert evil in _plain(mail)  # shown, as text
    assert "<a " not in html  # the forward has no link of ours either
    outside = html
    for block in html.split("<pre")[1:]:
        outside = outside.replace(block.split("</pre>", 1)[0], "")
    assert "this sender is verified" not in outside
    assert "Approve now" not in outside and "click" not in outside


def test_a_delivery_report_to_postmaster_still_bounces_our_message(stack: Stack) -> None:
    """A DSN sent to postmaster@ about one of our outbound messages is handled by the bounce
    logic as in a mailbox: the message is bounced and the address suppressed; the report is
    kept (reason "report"), not forwarded."""
    mailbox = stack.make_mailbox("bot@mm.test")
    sent_id = outbound_message(stack.services, mailbox, "<offer-7@mm.test>", "gone@far.test")
    stack.send(
        ["postmaster@mm.test"],
        dsn("<offer-7@mm.test>", "gone@far.test", to="postmaster@mm.test"),
        mail_from="",
    )
    (row,) = stack.processed()
    assert (row["status"], row["error"]) == ("processed", None)
    with stack.services.db.read() as conn:
        original = conn.execute(select(messages).where(messages.c.id == sent_id)).mappings().one()
        suppressed = conn.execute(select(suppressions)).mappings().all()
        bounced = conn.execute(
            select(audit_entries.c.details).where(audit_entries.c.action == "message.bounced")
        ).scalar_one()
    assert (original["status"], original["bounce_type"]) == ("bounced", "hard")
    assert [(s["address"], s["reason"]) for s in suppressed] == [("gone@far.test", "hard_bounce")]
    assert json.loads(bounced)["report_inbound_id"] == row["id"]
    (entry,) = stack.postmaster_audit()
    assert (entry["action"], entry["details"]["reason"]) == ("postmaster.kept", "report")
    assert entry["details"]["matched_account"] == stack.boot.account["id"]
    assert stack.forward_jobs() == []


def test_without_a_postmaster_address_server_postmaster_mail_is_kept(
    settings: Settings, boot: accounts.Bootstrap, relay: CapturingSMTPServer
) -> None:
    """MULTIMAIL_POSTMASTER_EMAIL unset: postmaster@<server domain> is still accepted (the
    RFC's MUST) and kept, audited as having no destination."""
    with _stack(settings, boot, relay) as stack:
        stack.send(["postmaster"], _mail("Hi", "Anyone there?", to="postmaster"))
        (row,) = stack.processed()
        assert (row["status"], row["error"]) == ("processed", None)
        assert _reasons(stack) == ["no_destination"]
        assert stack.forward_jobs() == []
