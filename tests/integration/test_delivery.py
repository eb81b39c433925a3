"""The delivery worker against real SMTP and DNS servers on loopback.

Messages are written the way the sending and oversight services leave them (a row in
``queued`` plus its deliver job); the real runner, transports, DKIM and database do the rest.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import dns.resolver
import pytest
from pydantic import SecretStr
from sqlalchemy import Text, cast, event, func, insert, select, update

from multimail.config import Settings
from multimail.ids import aware, new_id, utcnow
from multimail.mail.dkim import verify_message
from multimail.mail.markdown import render_markdown
from multimail.runtime import build_services
from multimail.services import accounts, directory, identity, mailboxes, oversight
from multimail.services import events as events_service
from multimail.services import messages as message_views
from multimail.services.context import Actor, Services
from multimail.store import jobs
from multimail.store.tables import (
    audit_entries,
    delivery_attempts,
    events,
    mailbox_allowlist,
    message_tags,
    messages,
    suppressions,
    webhook_deliveries,
    webhooks,
)
from multimail.store.tables import jobs as jobs_table
from multimail.store.tables import mailboxes as mailbox_table
from multimail.testing.dns import LocalDNSServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import delivery, runner, signing
from tests.integration.oversight_support import subscribe_everything

OPERATOR = Actor(type="system", id=None, name="test", account_id=None)


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def relay() -> Iterator[CapturingSMTPServer]:
    with CapturingSMTPServer() as server:
        yield server


def _services(settings: Settings, **changes: Any) -> Services:
    return build_services(settings.model_copy(update=changes))


@pytest.fixture
def svc(settings: Settings, relay: CapturingSMTPServer) -> Iterator[Services]:
    # Composing in the worker, whatever the machine's default: test_compose_children runs
    # these paths with a compose child.
    services = _services(
        settings, smtp_url=SecretStr(f"smtp://127.0.0.1:{relay.port}"), compose_processes=0
    )
    yield services
    services.db.dispose()


class World:
    """One account with one mailbox on the server's own domain."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.boot = accounts.bootstrap(services.db, account_name="Acme", operator_email="o@mm.test")
        self.account_id: str = self.boot.account["id"]
        self.actor = Actor(type="system", id=None, name="test", account_id=self.account_id)
        with services.db.write() as conn:
            self.mailbox = mailboxes.create_mailbox(
                conn,
                actor=self.actor,
                settings=services.settings,
                address="agent@mm.test",
                display_name="Agent",
                oversight_mode="autonomous",
            )

    def message(
        self,
        *,
        to: list[str] | None = None,
        cc: list[str] | None = None,
        bcc: list[str] | None = None,
        markdown: str = "Hello **there**.",
        mode: str = "autonomous",
        decision: str | None = None,
        test: bool = False,
        status: str = "queued",
        job: bool = True,
        rendered: bool = False,
    ) -> str:
        """A queued outbound message; ``rendered`` stores its body's HTML and text as the
        sending service does (else both are left empty, for the worker to render)."""
        now = utcnow()
        message_id = new_id("msg")
        with self.services.db.write() as conn:
            conn.execute(
                insert(messages).values(
                    id=message_id,
                    account_id=self.account_id,
                    mailbox_id=self.mailbox["id"],
                    direction="outbound",
                    status=status,
                    test=test,
                    message_id_header=f"<{message_id}@mm.test>",
                    from_address="agent@mm.test",
                    from_name="Agent",
                    to=to if to is not None else ["alice@example.test"],
                    cc=cc or [],
                    bcc=bcc or [],
                    subject="Quarterly numbers",
                    markdown=markdown,
                    html=render_markdown(markdown).html if rendered else None,
                    text=render_markdown(markdown).text if rendered else None,
                    oversight_mode=mode,
                    decision=decision,
                    reviewer="rev" if decision else None,
                    created_by_key_id="key_agent1",
                    created_by_key_name="support-bot",
                    created_at=now,
                    updated_at=now,
                )
            )
            if job:
                delivery.enqueue_delivery(conn, message_id)
        return message_id

    def row(self, message_id: str) -> dict[str, Any]:
        with self.services.db.read() as conn:
            found = conn.execute(select(messages).where(messages.c.id == message_id))
            return dict(found.mappings().one())

    def attempts(self, message_id: str) -> list[dict[str, Any]]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(delivery_attempts)
                .where(delivery_attempts.c.message_id == message_id)
                .order_by(delivery_attempts.c.id)
            )
            return [dict(r) for r in rows.mappings()]

    def audit_actions(self, subject_id: str) -> list[str]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(audit_entries.c.action)
                .where(audit_entries.c.subject_id == subject_id)
                .order_by(audit_entries.c.seq)
            )
            return [r.action for r in rows]

    def event_types(self, message_id: str) -> list[str]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(events.c.type)
                .where(events.c.message_id == message_id)
                .order_by(events.c.seq)
            )
            return [r.type for r in rows]

    def run_due_now(self, message_id: str) -> None:
        """Make the message's pending retry due now, instead of sleeping through the backoff."""
        with self.services.db.write() as conn:
            conn.execute(
                update(jobs_table)
                .where(jobs_table.c.dedupe_key == delivery.job_key(message_id))
                .values(run_at=utcnow() - timedelta(seconds=1))
            )
            conn.execute(
                update(messages)
                .where(messages.c.id == message_id)
                .values(next_attempt_at=utcnow() - timedelta(seconds=1))
            )


@pytest.fixture
def world(svc: Services) -> World:
    return World(svc)


@pytest.fixture
async def workers(svc: Services) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        runner.run_workers(svc, stop, worker_id="test-worker", poll_interval=0.05, grace=5)
    )
    yield
    stop.set()
    await asyncio.wait_for(task, 15)


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def status_is(world: World, message_id: str, *statuses: str) -> Callable[[], bool]:
    return lambda: world.row(message_id)["status"] in statuses


def free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the happy paths -------------------------------------------------------------------------


async def test_relay_delivery_carries_the_stored_bytes_and_every_header(
    world: World, relay: CapturingSMTPServer, workers: None
) -> None:
    """A queued message reaches the relay once, as the signed bytes stored before hand-over,
    with agent, AI and one-click unsubscribe headers; attempt, audit and events recorded."""
    subscribe_everything(world.services, world.account_id)
    message_id = world.message(cc=["bob@example.test"], bcc=["carol@example.test"])
    await until(status_is(world, message_id, "delivered"))
    [got] = relay.wait_for(1)
    row = world.row(message_id)
    assert got.rcpt_tos == ["alice@example.test", "bob@example.test", "carol@example.test"]
    assert got.mail_from == "agent@mm.test"
    assert got.data.rstrip(b"\r\n") == row["raw"].rstrip(b"\r\n")
    parsed = got.as_email()
    assert parsed["Message-ID"] == row["message_id_header"]
    assert "Bcc" not in parsed and "carol" not in got.data.decode()
    assert parsed["X-MultiMail-Agent"] == "support-bot (key_agent1)"
    assert parsed["X-AI-Generated"] == "true"
    # Three recipients, one set of bytes: no one-click URI could name the one who clicks
    # (test_delivery_rfc has the one-recipient case).
    assert parsed["List-Unsubscribe"] == "<mailto:agent@mm.test?subject=unsubscribe>"
    assert parsed["List-Unsubscribe-Post"] is None
    assert row["delivered_at"] is not None and row["attempts"] == 1
    [attempt] = world.attempts(message_id)
    assert (attempt["host"], attempt["port"]) == ("127.0.0.1", relay.port)
    assert attempt["smtp_code"] == 250 and attempt["outcome"] == "delivered"
    assert "message.delivered" in world.audit_actions(message_id)
    assert world.event_types(message_id) == ["message.sent", "message.delivered"]


async def test_mx_delivery_is_dkim_signed_and_verifies_against_published_dns(
    settings: Settings,
) -> None:
    """Without a relay, mail goes to the recipient domain's MX; its DKIM signature verifies
    with dkimpy against the key published in DNS, From is signed, and there is no l= tag."""
    with CapturingSMTPServer() as mx, LocalDNSServer() as dns_server:
        services = _services(settings, dns_resolver=dns_server.address, mx_port=mx.port)
        try:
            world = World(services)
            dns_server.add_record("example.test", "MX", "10 mx.example.test.")
            dns_server.add_record("mx.example.test", "A", "127.0.0.1")
            name, value = signing.default_dkim_record(services)
            dns_server.add_record(name, "TXT", value)
            message_id = world.message()
            assert await delivery.deliver(services, message_id, "w1") == "delivered"
            [got] = mx.wait_for(1)
        finally:
            services.db.dispose()
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = dns_server.port

        def lookup(qname: bytes) -> bytes | None:
            answer = resolver.resolve(qname.decode().rstrip("."), "TXT")
            return b"".join(b"".join(r.strings) for r in answer)

        assert verify_message(got.data, dnsfunc=lookup)
        signature = got.as_email()["DKIM-Signature"].replace("\r\n", "").replace(" ", "")
        tags = dict(t.split("=", 1) for t in signature.split(";") if "=" in t)
        assert "l" not in tags and tags["d"] == "mm.test" and tags["s"] == "mm1"
        assert "from" in tags["h"].split(":")


def test_default_dkim_key_is_created_once_and_private(svc: Services) -> None:
    """The server's own key is made once, kept in the database (so every worker signs with
    the published key), never written to the data dir, and never shown by a repr."""
    first = signing.default_key(svc)
    assert not (svc.settings.data_dir / "dkim").exists()
    other = build_services(
        svc.settings.model_copy(update={"data_dir": svc.settings.data_dir / "other-node"}),
        run_migrations=False,
    )
    try:
        assert signing.default_key(other).private_pem == first.private_pem
    finally:
        other.db.dispose()
    name, value = signing.default_dkim_record(svc)
    assert name == "mm1._domainkey.mm.test" and value.startswith("v=DKIM1; k=rsa; p=")
    assert "BEGIN" not in repr(first)


async def test_wire_has_no_bare_line_endings_and_dots_survive(
    world: World, relay: CapturingSMTPServer
) -> None:
    """SMTP-2: bare CR/LF in the body never reach the wire, leading dots are stuffed and
    unstuffed correctly, and the receiver gets exactly one message."""
    body = "line one\r.leading dot\n.\n..two dots\rend\n."
    message_id = world.message(markdown=body)
    assert await delivery.deliver(world.services, message_id, "w1") == "delivered"
    [got] = relay.wait_for(1)
    await asyncio.sleep(0.2)
    assert len(relay.messages) == 1
    data = got.data
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    text = got.as_email().get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert ".leading dot" in text and "..two dots" in text


# -- failures, retries, bounces -------------------------------------------------------------


async def test_relay_down_defers_then_delivers_when_it_returns(
    world: World, relay: CapturingSMTPServer, workers: None
) -> None:
    """A 451 defers with the documented first backoff (1 min ± jitter); once the relay is
    back, the retry delivers exactly one copy."""
    relay.fail_with(451, "try later", stage="rcpt")
    message_id = world.message()
    await until(status_is(world, message_id, "deferred"))
    row = world.row(message_id)
    wait = aware(row["next_attempt_at"]) - aware(row["updated_at"])
    assert timedelta(seconds=50) <= wait <= timedelta(seconds=70)
    assert row["attempts"] == 1 and world.attempts(message_id)[0]["smtp_code"] == 451
    assert world.attempts(message_id)[0]["outcome"] == "deferred"
    relay.reset_behaviour()
    world.run_due_now(message_id)
    runner.wake()
    await until(status_is(world, message_id, "delivered"))
    assert len(relay.messages) == 1
    assert [a["outcome"] for a in world.attempts(message_id)] == ["deferred", "delivered"]


async def test_connection_refused_is_a_temporary_failure(settings: Settings) -> None:
    """A relay that is not listening defers the message; nothing is lost."""
    services = _services(settings, smtp_url=SecretStr(f"smtp://127.0.0.1:{free_closed_port()}"))
    try:
        world = World(services)
        message_id = world.message()
        assert await delivery.deliver(services, message_id, "w1") == "deferred"
        assert world.row(message_id)["raw"] is not None
        assert world.attempts(message_id)[0]["outcome"] == "deferred"
    finally:
        services.db.dispose()


async def test_hard_bounce_suppresses_once_and_never_twice(
    world: World, relay: CapturingSMTPServer
) -> None:
    """DUR-5: a 5xx bounces the message and suppresses the recipient; running the job again
    changes nothing (one audit entry, one event, one suppression)."""
    subscribe_everything(world.services, world.account_id)
    relay.fail_with(550, "no such user", stage="rcpt")
    message_id = world.message()
    assert await delivery.deliver(world.services, message_id, "w1") == "bounced"
    assert await delivery.deliver(world.services, message_id, "w2") == "bounced"
    row = world.row(message_id)
    assert row["bounce_type"] == "hard" and relay.messages == []
    assert world.audit_actions(message_id).count("message.bounced") == 1
    assert world.event_types(message_id) == ["message.bounced"]
    with world.services.db.read() as conn:
        assert directory.suppressed_among(conn, world.account_id, ["alice@example.test"])
        count = conn.execute(select(func.count()).select_from(suppressions)).scalar_one()
    assert count == 1


async def test_mixed_outcome_retries_only_the_deferred_recipient(
    world: World, relay: CapturingSMTPServer
) -> None:
    """Accepted recipients are not sent again; the 4xx one is retried alone."""
    relay.fail_with(451, "greylisted", stage="rcpt", only_for=["carol@example.test"])
    message_id = world.message(to=["alice@example.test", "carol@example.test"])
    assert await delivery.deliver(world.services, message_id, "w1") == "deferred"
    assert relay.wait_for(1)[0].rcpt_tos == ["alice@example.test"]
    relay.reset_behaviour()
    assert await delivery.deliver(world.services, message_id, "w1") == "delivered"
    second = relay.wait_for(2)[1]
    assert second.rcpt_tos == ["carol@example.test"]
    assert second.data == relay.messages[0].data  # the same stored bytes, same Message-ID


async def test_partial_hard_bounce_delivers_to_the_rest(
    world: World, relay: CapturingSMTPServer
) -> None:
    """A 550 for one recipient suppresses it; the message counts as delivered to the others."""
    subscribe_everything(world.services, world.account_id)
    relay.fail_with(550, "unknown", stage="rcpt", only_for=["bob@example.test"])
    message_id = world.message(to=["alice@example.test", "bob@example.test"])
    assert await delivery.deliver(world.services, message_id, "w1") == "delivered"
    with world.services.db.read() as conn:
        suppressed = directory.suppressed_among(
            conn, world.account_id, ["alice@example.test", "bob@example.test"]
        )
    assert suppressed == {"bob@example.test"}
    assert "message.bounced" in world.event_types(message_id)


def test_retry_schedule_is_the_documented_one() -> None:
    """DUR-5: 1 min, 5 min, 15 min, 1 h, 2 h, 4 h, then every 8 h, ±10 %, for 3 days."""
    expected = [1, 5, 15, 60, 120, 240, 480, 480, 480]
    for failures, minutes in enumerate(expected, start=1):
        for _ in range(20):
            wait = delivery.retry_delay(failures).total_seconds() / 60
            assert minutes * 0.9 <= wait <= minutes * 1.1
    first = utcnow()
    now, failures, schedule = first, 0, []
    while (nxt := delivery.next_attempt_at(first, now, failures + 1)) is not None:
        schedule.append(nxt)
        now, failures = nxt, failures + 1
    assert schedule[-1] == first + timedelta(days=3)
    assert 12 <= len(schedule) <= 16


async def test_gives_up_after_three_days_of_temporary_failures(
    world: World, relay: CapturingSMTPServer
) -> None:
    """After the retry window the message is send_failed with the reason, never bounced."""
    relay.fail_with(451, "still down", stage="rcpt")
    message_id = world.message()
    assert await delivery.deliver(world.services, message_id, "w1") == "deferred"
    with world.services.db.write() as conn:
        conn.execute(
            update(delivery_attempts)
            .where(delivery_attempts.c.message_id == message_id)
            .values(started_at=utcnow() - timedelta(days=3, minutes=1))
        )
    assert await delivery.deliver(world.services, message_id, "w1") == "send_failed"
    row = world.row(message_id)
    assert "gave up after 3 days" in row["last_error"] and row["bounce_type"] is None
    assert "message.send_failed" in world.audit_actions(message_id)


# -- the gate, suppression at send time, the kill switch, the sandbox -------------------------


async def test_gated_message_without_approval_is_refused_at_the_last_step(
    world: World, relay: CapturingSMTPServer
) -> None:
    """The invariant, asserted once more at hand-over: a gated message with no approve
    decision is never handed to SMTP; it fails with an audit entry."""
    message_id = world.message(mode="gated_send")
    assert await delivery.deliver(world.services, message_id, "w1") == "send_failed"
    assert relay.messages == []
    assert "delivery.refused_ungated" in world.audit_actions(message_id)
    approved = world.message(mode="gated_all", decision="approve")
    assert await delivery.deliver(world.services, approved, "w1") == "delivered"


async def test_gated_message_to_allowlisted_recipients_may_go(
    world: World, relay: CapturingSMTPServer
) -> None:
    """The operator's allowlist is the one exemption: every recipient must match it."""
    with world.services.db.write() as conn:
        conn.execute(
            insert(mailbox_allowlist).values(
                id=new_id("alw"),
                mailbox_id=world.mailbox["id"],
                pattern="*@example.test",
                added_by="operator",
                created_at=utcnow(),
            )
        )
    allowed = world.message(mode="gated_send")
    mixed = world.message(mode="gated_send", to=["alice@example.test", "eve@other.test"])
    assert await delivery.deliver(world.services, allowed, "w1") == "delivered"
    assert await delivery.deliver(world.services, mixed, "w1") == "send_failed"
    assert len(relay.messages) == 1


async def test_suppressed_after_approval_is_never_delivered(
    world: World, relay: CapturingSMTPServer
) -> None:
    """API-5: suppression is checked right before the hand-over, after approval."""
    message_id = world.message(mode="gated_send", decision="approve", to=["a@example.test"])
    both = world.message(decision="approve", to=["a@example.test", "b@example.test"])
    with world.services.db.write() as conn:
        directory.suppress(
            conn, actor=world.actor, account_id=world.account_id,
            address="a@example.test", reason="unsubscribe",
        )  # fmt: skip
    assert await delivery.deliver(world.services, message_id, "w1") == "send_failed"
    assert "suppression" in world.row(message_id)["last_error"]
    # The message's own trail names who it skipped, whether or not anyone else got it.
    assert "message.recipients_suppressed" in world.audit_actions(message_id)
    assert await delivery.deliver(world.services, both, "w1") == "delivered"
    assert [m.rcpt_tos for m in relay.messages] == [["b@example.test"]]
    assert "message.recipients_suppressed" in world.audit_actions(both)


async def test_paused_mailbox_holds_mail_until_resumed(
    world: World, relay: CapturingSMTPServer, workers: None
) -> None:
    """Kill switch: nothing is handed to SMTP while paused; the message waits in queued and
    its job is spent; re-arming the job after resume delivers it."""
    with world.services.db.write() as conn:
        conn.execute(
            update(mailbox_table)
            .where(mailbox_table.c.id == world.mailbox["id"])
            .values(paused=True)
        )
    message_id = world.message()

    def job_done() -> bool:
        with world.services.db.read() as conn:
            found = conn.execute(
                select(jobs_table.c.status).where(
                    jobs_table.c.dedupe_key == delivery.job_key(message_id)
                )
            )
            return found.scalar() == "done"

    await until(job_done)
    assert world.row(message_id)["status"] == "queued" and relay.messages == []
    with world.services.db.write() as conn:
        conn.execute(
            update(mailbox_table)
            .where(mailbox_table.c.id == world.mailbox["id"])
            .values(paused=False)
        )
        delivery.enqueue_delivery(conn, message_id)
    runner.wake()
    await until(status_is(world, message_id, "delivered"))
    assert len(relay.messages) == 1


async def test_a_pause_after_the_start_still_stops_the_hand_over(
    world: World, relay: CapturingSMTPServer
) -> None:
    """Kill switch: a pause that lands after a batch started its messages (commit 1) but
    before they were handed over stops them too: nothing reaches SMTP, each goes back to
    queued with a ``delivery.held`` audit entry and its job spent; resuming delivers it."""
    lease = timedelta(minutes=2)
    sent = [world.message(to=[f"r{i}@example.test"]) for i in range(3)]
    items = delivery._prepare_due(world.services, "w1", 10, lease, delivery._Looks())
    assert items and {i.message_id for i in items} == set(sent)
    assert {world.row(m)["status"] for m in sent} == {"sending"}
    operator = Actor(type="user", id=None, name="ops", account_id=world.account_id)
    oversight.pause(world.services, operator, world.mailbox["id"])
    await delivery._complete(world.services, "w1", items, lease)
    assert relay.messages == []
    for message_id in sent:
        assert world.row(message_id)["status"] == "queued"
        assert world.audit_actions(message_id)[-1] == "delivery.held"
    with world.services.db.read() as conn:
        open_jobs = conn.execute(
            select(func.count())
            .select_from(jobs_table)
            .where(jobs_table.c.kind == delivery.DELIVER, jobs_table.c.status != "done")
        ).scalar_one()
    assert open_jobs == 0
    assert oversight.resume(world.services, operator, world.mailbox["id"])["released"] == 3
    claimed = await runner.BATCHES[delivery.DELIVER](world.services, "w2", 10, lease)
    assert claimed == 3
    assert {world.row(m)["status"] for m in sent} == {"delivered"}
    assert sorted(r for m in relay.messages for r in m.rcpt_tos) == [
        f"r{i}@example.test" for i in range(3)
    ]


async def test_test_mode_captures_instead_of_sending(
    world: World, relay: CapturingSMTPServer
) -> None:
    """mm_test_ messages run the pipeline but never touch SMTP; the sandbox lists them."""
    message_id = world.message(test=True)
    assert await delivery.deliver(world.services, message_id, "w1") == "delivered"
    [attempt] = world.attempts(message_id)
    assert (attempt["outcome"], attempt["host"]) == ("captured", "sandbox")
    await asyncio.sleep(0.1)
    assert relay.messages == []
    reader = Actor(type="user", id="u", name="op", account_id=world.account_id)
    [captured] = delivery.list_captured(world.services, reader)
    assert captured["id"] == message_id and captured["test"] is True
    assert "Quarterly numbers" in captured["raw"]
    stranger = Actor(type="user", id="u2", name="x", account_id="acct_other")
    assert delivery.list_captured(world.services, stranger) == []


# -- deliver_now and the runner --------------------------------------------------------------


def test_deliver_now_answers_delivered_within_the_wait(
    world: World, relay: CapturingSMTPServer
) -> None:
    """Approve → deliver at once: the relay's 250 within the wait answers 'delivered', and
    the deliver job is spent, so a background worker does not send it again."""
    message_id = world.message()
    assert delivery.deliver_now(world.services, message_id, timeout=5) == "delivered"
    assert len(relay.messages) == 1
    with world.services.db.read() as conn:
        status = conn.execute(
            select(jobs_table.c.status).where(
                jobs_table.c.dedupe_key == delivery.job_key(message_id)
            )
        ).scalar()
    assert status == "done"
    assert delivery.deliver_now(world.services, message_id, timeout=1) == "delivered"
    assert len(relay.messages) == 1


def test_deliver_now_returning_before_the_relay_answers_loses_nothing(
    world: World, relay: CapturingSMTPServer
) -> None:
    """A wait shorter than the relay's answer returns at once ('queued'/'sending'); the
    attempt goes on in the background and the message is delivered exactly once."""
    message_id = world.message()
    status = delivery.deliver_now(world.services, message_id, timeout=0.0)
    assert status in ("queued", "sending", "delivered")
    deadline = time.monotonic() + 10
    while world.row(message_id)["status"] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert world.row(message_id)["status"] == "delivered"
    assert len(relay.wait_for(1)) == 1


async def test_runner_dispatches_registered_kinds_and_retries_as_data(svc: Services) -> None:
    """A handler's return value reschedules the job; a temporary error retries with backoff;
    a permanent error fails it; wake() cuts the poll short."""
    from multimail.errors import InvalidInput, TemporaryDeliveryError

    seen: list[tuple[str, int]] = []

    @runner.register("test_echo")
    async def echo(services: Services, job: jobs.Job, worker_id: str) -> Any:
        seen.append((job.payload["mode"], job.attempts))
        if job.payload["mode"] == "again" and job.attempts == 1:
            return utcnow()
        if job.payload["mode"] == "temporary":
            raise TemporaryDeliveryError("later")
        if job.payload["mode"] == "permanent":
            raise InvalidInput("never")
        return None

    stop = asyncio.Event()
    task = asyncio.create_task(runner.run_workers(svc, stop, poll_interval=5))
    try:
        await asyncio.sleep(0.2)
        with svc.db.write() as conn:
            ids = {m: jobs.enqueue(conn, "test_echo", {"mode": m}) for m in
                   ("done", "again", "temporary", "permanent")}  # fmt: skip
        runner.wake()

        def statuses() -> dict[str, str]:
            with svc.db.read() as conn:
                rows = conn.execute(
                    select(jobs_table.c.id, jobs_table.c.status, jobs_table.c.run_at)
                )
                by_id = {r.id: r for r in rows}
            return {m: by_id[i].status for m, i in ids.items()}

        await until(lambda: statuses() == {
            "done": "done", "again": "done", "temporary": "pending", "permanent": "failed"
        }, within=4)  # fmt: skip
        assert ("again", 2) in seen
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        runner.HANDLERS.pop("test_echo", None)


async def test_recurring_kind_runs_once_per_slot_across_workers(svc: Services) -> None:
    """every(kind, s) enqueues one job per time slot even with two runners."""
    runs: list[int] = []

    @runner.register("test_tick")
    def tick(services: Services, job: jobs.Job, worker_id: str) -> None:
        runs.append(job.payload["slot"])

    runner.every("test_tick", 3600)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(runner.run_workers(svc, stop, worker_id=f"w{i}", poll_interval=0.05))
        for i in range(2)
    ]
    try:
        await until(lambda: len(runs) >= 1, within=5)
        await asyncio.sleep(0.5)
        assert len(runs) == 1
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        runner.RECURRING.pop("test_tick", None)
        runner.HANDLERS.pop("test_tick", None)


async def test_stopping_hands_back_a_job_still_running(svc: Services) -> None:
    """Graceful stop: a job that outlives the grace period is released, not left leased."""
    started = asyncio.Event()

    @runner.register("test_slow")
    async def slow(services: Services, job: jobs.Job, worker_id: str) -> None:
        started.set()
        await asyncio.sleep(30)

    with svc.db.write() as conn:
        job_id = jobs.enqueue(conn, "test_slow", {})
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run_workers(svc, stop, poll_interval=0.05, grace=0.2))
    try:
        await asyncio.wait_for(started.wait(), 5)
        stop.set()
        await asyncio.wait_for(task, 5)
        with svc.db.read() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).mappings().one()
        assert row["status"] == "pending" and row["locked_by"] is None
    finally:
        runner.HANDLERS.pop("test_slow", None)


async def test_sweep_rearms_a_queued_message_whose_job_is_spent(
    world: World, relay: CapturingSMTPServer
) -> None:
    """A queued message left without a live job (e.g. its job ran while paused) is given one."""
    message_id = world.message(job=False)
    with world.services.db.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == message_id)
            .values(updated_at=utcnow() - timedelta(minutes=5))
        )
    sweep = runner.HANDLERS[delivery.SWEEP]
    job = jobs.Job("job_x", delivery.SWEEP, {}, 1, 1, utcnow())
    sweep(world.services, job, "w1")
    with world.services.db.read() as conn:
        found = conn.execute(
            select(jobs_table.c.status).where(
                jobs_table.c.dedupe_key == delivery.job_key(message_id)
            )
        ).scalar()
    assert found == "pending"


# -- operator mail -------------------------------------------------------------------------------


async def test_system_mail_goes_from_the_null_sender_and_skips_suppressed(
    world: World, relay: CapturingSMTPServer
) -> None:
    """Operator notifications are DKIM-signed, from multimail@<domain> with MAIL FROM:<>, so a
    bounce of them never causes more mail; suppressed addresses never get them."""
    with world.services.db.write() as conn:
        directory.suppress(
            conn, actor=world.actor, account_id=world.account_id,
            address="gone@example.test", reason="manual",
        )  # fmt: skip
        job_id = jobs.enqueue(
            conn,
            delivery.SYSTEM_MAIL,
            {"to": ["ops@example.test", "gone@example.test"], "subject": "Approval needed",
             "markdown": "A message waits.", "account_id": world.account_id},
        )  # fmt: skip
    job = jobs.Job(str(job_id), delivery.SYSTEM_MAIL, {}, 1, 50, utcnow())
    with world.services.db.read() as conn:
        payload = conn.execute(select(jobs_table.c.payload).where(jobs_table.c.id == job_id))
        job = jobs.Job(str(job_id), delivery.SYSTEM_MAIL, payload.scalar_one(), 1, 50, utcnow())
    assert await runner.HANDLERS[delivery.SYSTEM_MAIL](world.services, job, "w1") is None  # type: ignore[misc]
    [got] = relay.wait_for(1)
    assert got.mail_from == "" and got.rcpt_tos == ["ops@example.test"]
    parsed = got.as_email()
    assert parsed["From"].addresses[0].addr_spec == "multimail@mm.test"
    assert parsed["Auto-Submitted"] == "auto-generated" and "DKIM-Signature" in parsed
    assert "system_mail.sent" in world.audit_actions(str(job_id))

    relay.fail_with(550, "no such user", stage="rcpt")
    assert await runner.HANDLERS[delivery.SYSTEM_MAIL](world.services, job, "w1") is None  # type: ignore[misc]
    await asyncio.sleep(0.2)
    assert len(relay.messages) == 1
    assert "system_mail.failed" in world.audit_actions(str(job_id))
    with world.services.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(jobs_table).where(
            jobs_table.c.kind == delivery.SYSTEM_MAIL)).scalar_one() == 1  # fmt: skip


# -- group commit ---------------------------------------------------------------------------------


def _count_write_commits(services: Services) -> list[int]:
    """A counter of committed write transactions (each one an fsync on SQLite)."""
    count = [0]

    def on_commit(conn: Any) -> None:
        if conn.get_execution_options().get("immediate", False):
            count[0] += 1

    event.listen(services.db.engine, "commit", on_commit)
    return count


async def test_a_batch_is_claimed_started_and_recorded_in_two_write_commits(
    world: World, relay: CapturingSMTPServer
) -> None:
    """Group commit: one batch of deliveries claims its jobs and starts its messages in one
    commit and records every outcome (attempts, statuses, audit, events, job completions) in
    one more; a message that cannot go is settled in the first commit and sinks nobody."""
    subscribe_everything(world.services, world.account_id)
    good = [world.message(to=[f"r{i}@example.test"]) for i in range(12)]
    nobody = world.message(to=[])
    # The identity keyring is stored on first use, in a commit of its own: not the batch's.
    identity.keyring(world.services)
    commits = _count_write_commits(world.services)
    batch = runner.BATCHES[delivery.DELIVER]
    claimed = await batch(world.services, "batch-worker", 50, timedelta(minutes=2))
    assert claimed == 13
    assert commits[0] == 2
    assert len(relay.wait_for(12)) == 12
    for message_id in good:
        assert world.row(message_id)["status"] == "delivered"
        assert [a["outcome"] for a in world.attempts(message_id)] == ["delivered"]
        assert "message.delivered" in world.audit_actions(message_id)
        assert world.event_types(message_id) == ["message.sent", "message.delivered"]
    assert world.row(nobody)["status"] == "send_failed"
    assert "message.send_failed" in world.audit_actions(nobody)
    with world.services.db.read() as conn:
        left = conn.execute(
            select(func.count()).where(jobs_table.c.kind == delivery.DELIVER,
                                       jobs_table.c.status != "done")
        ).scalar_one()  # fmt: skip
    assert left == 0
    await asyncio.sleep(0.2)
    assert len(relay.messages) == 12


async def test_batch_deliveries_each_go_once_and_keep_their_own_outcome(
    world: World, relay: CapturingSMTPServer, workers: None
) -> None:
    """Under the runner's pipelines, a burst of messages reaches the relay exactly once each;
    a recipient the relay refuses bounces only its own message, a suppressed one is dropped."""
    with world.services.db.write() as conn:
        directory.suppress(
            conn, actor=world.actor, account_id=world.account_id,
            address="gone@example.test", reason="manual",
        )  # fmt: skip
    relay.fail_with(550, "no such user", stage="rcpt", only_for=["nobody@example.test"])
    ids = [world.message(to=[f"p{i}@example.test"]) for i in range(40)]
    bounced = world.message(to=["nobody@example.test"])
    suppressed = world.message(to=["gone@example.test"])
    runner.wake()
    for message_id in ids:
        await until(status_is(world, message_id, "delivered"), within=20)
    await until(status_is(world, bounced, "bounced"))
    await until(status_is(world, suppressed, "send_failed"))
    await asyncio.sleep(0.2)
    tos = sorted(r for m in relay.messages for r in m.rcpt_tos)
    assert tos == sorted(f"p{i}@example.test" for i in range(40))
    ids_seen = [m.as_email()["Message-ID"] for m in relay.messages]
    assert len(ids_seen) == len(set(ids_seen)) == 40


async def test_runner_gives_batch_kinds_only_to_their_batch_runner(svc: Services) -> None:
    """A kind with a batch runner is claimed by that runner alone, in batches, and never by
    the one-job-per-slot loop, even when a plain handler exists for it too."""
    batches: list[int] = []

    @runner.register("test_batched")
    async def single(services: Services, job: jobs.Job, worker_id: str) -> None:
        raise AssertionError("the plain handler must not be used for a batch kind")

    @runner.register_batch("test_batched")
    async def batch(services: Services, worker_id: str, limit: int, lease: timedelta) -> int:
        with services.db.write() as conn:
            claimed = jobs.claim_in(conn, worker_id, kinds=["test_batched"], limit=limit)
            for job in claimed:
                jobs.complete(conn, job.id, worker_id)
        if claimed:
            batches.append(len(claimed))
        return len(claimed)

    with svc.db.write() as conn:
        for i in range(10):
            jobs.enqueue(conn, "test_batched", {"i": i})
    stop = asyncio.Event()
    task = asyncio.create_task(
        runner.run_workers(svc, stop, poll_interval=0.05, batch_size=4, pipelines=1)
    )
    try:
        await until(lambda: sum(batches) == 10, within=5)
        assert max(batches) <= 4 and len(batches) >= 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        runner.HANDLERS.pop("test_batched", None)
        runner.BATCHES.pop("test_batched", None)


async def test_a_batch_writes_the_events_and_webhook_deliveries_emit_would(
    world: World, relay: CapturingSMTPServer
) -> None:
    """Events of a batch are written together; each must still reach exactly the
    subscriptions that ``events.emit`` would queue it for, under the name subscribed: the
    mailbox's webhook_url (synced into a subscription by the first event), an account-wide
    alias subscription, and one that wants neither event."""
    now = utcnow()
    with world.services.db.write() as conn:
        conn.execute(
            update(mailbox_table)
            .where(mailbox_table.c.id == world.mailbox["id"])
            .values(webhook_url="https://hooks.example.test/box")
        )
        for events_, url in ((["email.delivered"], "alias"), (["message.bounced"], "bounced")):
            conn.execute(
                insert(webhooks).values(
                    id=new_id("whk"),
                    account_id=world.account_id,
                    url=f"https://hooks.example.test/{url}",
                    events=events_,
                    secret="whsec_test",
                    created_at=now,
                    updated_at=now,
                )
            )
    sent = [world.message(to=[f"r{i}@example.test"]) for i in range(5)]
    claimed = await runner.BATCHES[delivery.DELIVER](world.services, "w", 50, timedelta(minutes=2))
    assert claimed == 5
    with world.services.db.read() as conn:
        hooks = {r.id: r.url.rsplit("/", 1)[1] for r in conn.execute(select(webhooks))}
        rows = conn.execute(
            select(events.c.message_id, events.c.type, events.c.payload, webhook_deliveries)
            .join(webhook_deliveries, webhook_deliveries.c.event_id == events.c.id)
            .order_by(webhook_deliveries.c.id)
        ).mappings()
        got: dict[str, list[tuple[str, str]]] = {m: [] for m in sent}
        for row in rows:
            payload = events_service.expanded_payload(row["payload"])
            assert payload["message_id"] == row["message_id"]
            assert payload["type"] == row["type"]
            assert row["status"] == "pending"
            got[row["message_id"]].append((hooks[row["webhook_id"]], row["event_name"]))
    for message_id in sent:
        assert world.event_types(message_id) == ["message.sent", "message.delivered"]
        assert sorted(got[message_id]) == [
            ("alias", "email.delivered"),
            ("box", "message.delivered"),
            ("box", "message.sent"),
        ]


async def test_a_batch_stores_no_event_nobody_subscribes_to(
    world: World, relay: CapturingSMTPServer
) -> None:
    """Events are the webhooks' outbox: a batch delivered for an account whose only
    subscription wants neither ``message.sent`` nor ``message.delivered`` stores no event
    and queues no delivery, while the audit log still records every delivery. One message
    of another mailbox with a live ``webhook_url`` in the same batch still gets both."""
    now = utcnow()
    with world.services.db.write() as conn:
        conn.execute(
            insert(webhooks).values(
                id=new_id("whk"),
                account_id=world.account_id,
                url="https://hooks.example.test/received",
                events=["message.received"],
                secret="whsec_test",
                created_at=now,
                updated_at=now,
            )
        )
        listened = mailboxes.create_mailbox(
            conn,
            actor=Actor(type="system", id=None, name="test", account_id=world.account_id),
            settings=world.services.settings,
            address="listened@mm.test",
            oversight_mode="autonomous",
        )
        conn.execute(
            update(mailbox_table)
            .where(mailbox_table.c.id == listened["id"])
            .values(webhook_url="https://hooks.example.test/box")
        )
    quiet = [world.message(to=[f"r{i}@example.test"]) for i in range(4)]
    heard = world.message(to=["h@example.test"])
    with world.services.db.write() as conn:
        conn.execute(
            update(messages).where(messages.c.id == heard).values(mailbox_id=listened["id"])
        )
    claimed = await runner.BATCHES[delivery.DELIVER](world.services, "w", 50, timedelta(minutes=2))
    assert claimed == 5
    for message_id in quiet:
        assert world.row(message_id)["status"] == "delivered"
        assert world.event_types(message_id) == []
        assert world.audit_actions(message_id)[-1] == "message.delivered"
    assert world.event_types(heard) == ["message.sent", "message.delivered"]
    with world.services.db.read() as conn:
        queued = conn.execute(select(func.count()).select_from(webhook_deliveries)).scalar_one()
    assert queued == 2


async def test_a_batch_stores_each_event_payload_as_emit_would(
    world: World, relay: CapturingSMTPServer
) -> None:
    """A batch reads each message once and encodes its events' payloads itself (the body
    once, not once per copy): the stored JSON must still be ``json.dumps`` of what
    ``events.emit`` stores, and expand to the payload it builds from the message as it
    stands after the commit, to the byte."""
    subscribe_everything(world.services, world.account_id)
    body = 'Grüße — "quoted" \\ back\tslash, </script> and a long line. ' * 6
    sent = [world.message(to=[f"r{i}@example.test"], markdown=f"{body}\n\n{i}") for i in range(4)]
    with world.services.db.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == sent[1])
            .values(metadata={"ticket": "zd-4711", "score": 1.5, "nested": {"ok": True}})
        )
        conn.execute(insert(message_tags).values(message_id=sent[1], key="team", value="ops"))
    claimed = await runner.BATCHES[delivery.DELIVER](world.services, "w", 50, timedelta(minutes=2))
    assert claimed == 4
    with world.services.db.read() as conn:
        stored = conn.execute(
            select(
                events.c.id,
                events.c.type,
                events.c.mailbox_id,
                events.c.message_id,
                cast(events.c.payload, Text).label("text"),
            ).order_by(events.c.seq)
        ).all()
        assert len(stored) == 8
        for row in stored:
            payload = json.loads(row.text)
            assert row.text == json.dumps(payload)
            message = dict(
                conn.execute(select(messages).where(messages.c.id == row.message_id))
                .mappings()
                .one()
            )
            assert message["status"] == "delivered"
            built = events_service.payload_for(
                event_id=row.id,
                event_type=row.type,
                created_at=payload["created_at"],
                mailbox_id=row.mailbox_id,
                message=message_views.full_view(conn, message),
            )
            assert row.text == json.dumps(events_service.stored_payload(built))
            assert json.dumps(events_service.expanded_payload(payload)) == json.dumps(built)
            assert len(row.text) < len(json.dumps(built)) / 2  # the body once, not eight times
    assert [m.as_email()["Message-ID"] for m in relay.wait_for(4)]


async def test_the_body_html_stored_at_send_time_makes_the_same_message(
    world: World, relay: CapturingSMTPServer
) -> None:
    """The worker builds the HTML part from the rendering the sending service stored with the
    message instead of rendering the markdown again: the parts must be what rendering gives."""
    body = "# Numbers\n\n| q | n |\n|---|---|\n| 1 | *2* |\n\n<b>not html</b> & [a](https://x.test)"
    stored = world.message(to=["a@example.test"], markdown=body, rendered=True)
    fresh = world.message(to=["b@example.test"], markdown=body)
    claimed = await runner.BATCHES[delivery.DELIVER](world.services, "w", 50, timedelta(minutes=2))
    assert claimed == 2
    parts: dict[str, dict[str, str]] = {}
    for captured in relay.wait_for(2):
        mail = captured.as_email()
        parts[captured.rcpt_tos[0]] = {
            kind: part.get_content()
            for kind in ("html", "plain")
            if (part := mail.get_body(preferencelist=(kind,))) is not None
        }
    assert world.row(stored)["status"] == world.row(fresh)["status"] == "delivered"
    assert parts["a@example.test"] == parts["b@example.test"]
    assert render_markdown(body).html in parts["a@example.test"]["html"].replace("\r\n", "\n")


async def test_a_deliver_job_without_a_message_id_is_failed_not_left_pending(
    world: World, relay: CapturingSMTPServer
) -> None:
    """The batch runner looks at due jobs before claiming them; when the only due ones named
    no message, that look found nothing to do and they stayed pending (and due) for ever."""
    with world.services.db.write() as conn:
        broken = jobs.enqueue(conn, delivery.DELIVER, {"not": "a message"})
    batch = runner.BATCHES[delivery.DELIVER]
    assert await batch(world.services, "w", 50, timedelta(minutes=2)) == 0
    with world.services.db.read() as conn:
        row = conn.execute(select(jobs_table).where(jobs_table.c.id == broken)).mappings().one()
    assert row["status"] == "failed"
    assert "message_id" in (row["last_error"] or "")
    good = world.message(to=["a@example.test"])
    assert await batch(world.services, "w", 50, timedelta(minutes=2)) == 1
    assert world.row(good)["status"] == "delivered"
