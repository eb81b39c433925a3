"""WH-2 (retry schedule with jitter, same webhook-id across retries, 410 disables, killed
dispatcher loses nothing, private targets refused at connect time) and the rest of the
dispatcher against a real loopback receiver: signatures, order, redirects, group commit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import event as sa_event
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as StandardVerificationError

from multimail.config import Settings
from multimail.ids import aware, utcnow
from multimail.runtime import build_services
from multimail.services import accounts, events, webhooks
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries, jobs, webhook_attempts, webhook_deliveries
from multimail.store.tables import webhooks as webhooks_table
from multimail.webhook_signature import WebhookVerificationError, verify_webhook
from multimail.workers.webhooks import SCHEDULE, retry_delay, wake
from tests.integration.webhook_helpers import (
    Reply,
    deliveries,
    dispatching,
    emit,
    make_mailbox,
    make_message,
    operator,
    receiving,
    wait_until,
)


@pytest.fixture
def wsvc(settings: Settings) -> Iterator[Services]:
    """Services that may post to loopback over http, as local development allows."""
    svc = build_services(
        settings.model_copy(update={"allow_private_webhooks": True, "allow_http_webhooks": True})
    )
    yield svc
    svc.db.dispose()


@pytest.fixture
def acct(wsvc: Services) -> Actor:
    boot = accounts.bootstrap(wsvc.db, account_name="Acme", operator_email="ops@mm.test")
    return operator(boot.account["id"])


def subscribe(
    svc: Services,
    actor: Actor,
    url: str,
    names: list[str] | None = None,
    mailbox: str | None = None,
) -> dict[str, Any]:
    with svc.db.write() as conn:
        return webhooks.create_webhook(conn, svc, actor, url, names, mailbox, None)


def move_due(svc: Services) -> None:
    """Make every pending retry due now instead of sleeping through the backoff."""
    with svc.db.write() as conn:
        conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.status == "pending")
            .values(next_attempt_at=utcnow())
        )
    wake()


def attempts_of(svc: Services, delivery_id: str) -> list[dict[str, Any]]:
    with svc.db.read() as conn:
        rows = conn.execute(
            select(webhook_attempts)
            .where(webhook_attempts.c.delivery_id == delivery_id)
            .order_by(webhook_attempts.c.id)
        )
        return [dict(r) for r in rows.mappings()]


def audit_actions(svc: Services) -> list[str]:
    with svc.db.read() as conn:
        return [r.action for r in conn.execute(select(audit_entries.c.action))]


async def test_emitted_event_arrives_signed_for_both_verifiers(wsvc: Services, acct: Actor) -> None:
    """emit() inside a write transaction → the dispatcher posts it, and the request passes our
    verifier, the standardwebhooks package and the seed-style hex HMAC with the secret's bytes."""
    box = make_mailbox(wsvc, acct, "agent@mm.test")
    msg = make_message(wsvc, acct.account_id or "", box, metadata={"crm": "42"})
    with receiving() as rx:
        sub = subscribe(wsvc, acct, rx.url, ["*"])
        rx.secrets = [sub["secret"]]
        async with dispatching(wsvc):
            event_id = emit(wsvc, acct.account_id or "", "oversight.pending", msg)
            await wait_until(lambda: rx.received)
            await wait_until(lambda: deliveries(wsvc)[0]["status"] == "delivered")
    got = rx.received[0]
    assert got.ours_ok and got.standard_ok and got.hmac_ok
    assert got.headers["webhook-id"] == event_id
    body = json.loads(got.body)
    assert body["id"] == event_id and body["type"] == body["event"] == "oversight.pending"
    assert body["message_id"] == body["email_id"] == msg["id"]
    assert body["message"]["metadata"] == {"crm": "42"} and body["metadata"] == {"crm": "42"}
    assert body["from"]["address"] == "agent@mm.test" and body["sender"] == "agent@mm.test"
    assert body["mailbox_id"] == box["id"]
    log = attempts_of(wsvc, deliveries(wsvc)[0]["id"])
    assert len(log) == 1 and log[0]["status_code"] == 200 and log[0]["latency_ms"] is not None
    assert log[0]["response_excerpt"] == '{"ok":true}'


async def test_rolled_back_transaction_queues_and_delivers_nothing(
    wsvc: Services, acct: Actor
) -> None:
    """An event emitted in a transaction that rolls back leaves no event and no delivery."""
    with receiving() as rx:
        subscribe(wsvc, acct, rx.url)
        async with dispatching(wsvc):
            with pytest.raises(RuntimeError), wsvc.db.write() as conn:
                events.emit(conn, account_id=acct.account_id or "", event_type="message.received")
                raise RuntimeError("the change failed")
            await asyncio.sleep(0.3)
    assert deliveries(wsvc) == [] and rx.received == []


def test_unknown_event_type_fails_the_callers_transaction(wsvc: Services, acct: Actor) -> None:
    """A misspelt event name raises instead of silently announcing nothing."""
    with pytest.raises(ValueError, match="unknown event type"), wsvc.db.write() as conn:
        events.emit(conn, account_id=acct.account_id or "", event_type="message.recieved")


async def test_failing_endpoint_is_retried_until_it_answers_then_delivered_once(
    wsvc: Services, acct: Actor
) -> None:
    """500, 500, then 200: three attempts logged, one delivery, the same webhook-id each time,
    a fresh timestamp and signature per attempt, and a backoff from the documented schedule."""
    answers = [500, 503, 200]
    with receiving(lambda n, _r: Reply(status=answers[min(n, 2)])) as rx:
        sub = subscribe(wsvc, acct, rx.url)
        rx.secrets = [sub["secret"]]
        async with dispatching(wsvc):
            emit(wsvc, acct.account_id or "", "message.received")
            await wait_until(lambda: len(rx.received) == 1)
            first = await wait_until(lambda: attempts_of(wsvc, deliveries(wsvc)[0]["id"]))
            row = deliveries(wsvc)[0]
            delay = (aware(row["next_attempt_at"]) - aware(first[0]["at"])).total_seconds()
            assert SCHEDULE[0] * 0.8 - 0.01 <= delay <= SCHEDULE[0] * 1.2 + 0.01
            await asyncio.sleep(1.05)  # so the second attempt's timestamp is a new second
            move_due(wsvc)
            await wait_until(lambda: len(rx.received) == 2)
            # The 503 must be recorded (with its retry time) before the retry is made due:
            # next_attempt_at alone already differs from ``row`` by move_due's own write.
            await wait_until(lambda: len(attempts_of(wsvc, row["id"])) == 2)
            move_due(wsvc)
            await wait_until(lambda: deliveries(wsvc)[0]["status"] == "delivered")
            await asyncio.sleep(0.2)
    assert len(rx.received) == 3
    ids = {r.headers["webhook-id"] for r in rx.received}
    assert len(ids) == 1
    assert (
        rx.received[0].headers["webhook-timestamp"] != rx.received[1].headers["webhook-timestamp"]
    )
    assert (
        rx.received[0].headers["webhook-signature"] != rx.received[1].headers["webhook-signature"]
    )
    assert all(r.ours_ok and r.standard_ok for r in rx.received)
    log = attempts_of(wsvc, deliveries(wsvc)[0]["id"])
    assert [a["status_code"] for a in log] == [500, 503, 200]
    assert deliveries(wsvc)[0]["attempts"] == 3


def test_retry_schedule_grows_with_jitter_and_repeats_its_last_step() -> None:
    """retry_delay follows SCHEDULE within ±20 % and stays at the last step afterwards."""
    import random

    rng = random.Random(7)
    for attempt, base in enumerate(SCHEDULE, start=1):
        for _ in range(50):
            assert base * 0.8 <= retry_delay(attempt, rng) <= base * 1.2
    assert SCHEDULE[-1] * 0.8 <= retry_delay(40, rng) <= SCHEDULE[-1] * 1.2
    samples = {round(retry_delay(3, rng), 3) for _ in range(20)}
    assert len(samples) > 1  # jitter spreads receivers' retries


async def test_410_disables_the_subscription_audits_and_mails_the_operator(
    wsvc: Services, acct: Actor
) -> None:
    """A 410 Gone ends the delivery and disables the webhook; later events are not queued."""
    with receiving(lambda _n, _r: Reply(status=410)) as rx:
        sub = subscribe(wsvc, acct, rx.url)
        async with dispatching(wsvc):
            emit(wsvc, acct.account_id or "", "message.received")
            await wait_until(lambda: deliveries(wsvc)[0]["status"] == "failed")
        emit(wsvc, acct.account_id or "", "message.received")
    with wsvc.db.read() as conn:
        hook = (
            conn.execute(select(webhooks_table).where(webhooks_table.c.id == sub["id"]))
            .mappings()
            .one()
        )
        mail = conn.execute(select(jobs).where(jobs.c.kind == "system_mail")).mappings().all()
    assert hook["enabled"] is False and "410" in hook["disabled_reason"]
    assert len(deliveries(wsvc)) == 1 and len(rx.received) == 1
    assert "webhook.disabled" in audit_actions(wsvc)
    assert mail and mail[0]["payload"]["to"] == ["ops@mm.test"]


async def test_delivery_fails_after_three_days_of_retries(wsvc: Services, acct: Actor) -> None:
    """A delivery whose next retry would fall past three days since it was queued is failed."""
    with receiving(lambda _n, _r: Reply(status=500)) as rx:
        subscribe(wsvc, acct, rx.url)
        emit(wsvc, acct.account_id or "", "message.received")
        with wsvc.db.write() as conn:
            conn.execute(update(webhook_deliveries).values(created_at=utcnow() - timedelta(days=3)))
        async with dispatching(wsvc):
            await wait_until(lambda: deliveries(wsvc)[0]["status"] == "failed")
    assert "webhook.delivery_failed" in audit_actions(wsvc)


async def test_endpoint_failing_for_days_is_disabled_and_the_operator_mailed(
    wsvc: Services, acct: Actor
) -> None:
    """An endpoint failing continuously for more than 5 days is disabled; the operator gets a
    system_mail naming it; a success before then clears the failing streak."""
    with receiving(lambda _n, _r: Reply(status=502)) as rx:
        sub = subscribe(wsvc, acct, rx.url)
        with wsvc.db.write() as conn:
            conn.execute(
                update(webhooks_table).values(failing_since=utcnow() - timedelta(days=5, hours=1))
            )
        async with dispatching(wsvc):
            emit(wsvc, acct.account_id or "", "message.received")
            await wait_until(lambda: attempts_of(wsvc, deliveries(wsvc)[0]["id"]))
            await asyncio.sleep(0.1)
    with wsvc.db.read() as conn:
        hook = (
            conn.execute(select(webhooks_table).where(webhooks_table.c.id == sub["id"]))
            .mappings()
            .one()
        )
        mail = conn.execute(select(jobs.c.payload).where(jobs.c.kind == "system_mail")).all()
    assert hook["enabled"] is False and "days" in hook["disabled_reason"]
    assert len(mail) == 1 and rx.url in mail[0].payload["subject"]
    assert sub["id"] in mail[0].payload["markdown"]


async def test_events_of_one_message_arrive_in_order_even_when_the_first_is_retried(
    wsvc: Services, acct: Actor
) -> None:
    """oversight.pending → oversight.approved → message.delivered reach the receiver in that
    order: later events wait while an earlier one of the same message is being retried."""
    box = make_mailbox(wsvc, acct, "agent@mm.test")
    msg = make_message(wsvc, acct.account_id or "", box)
    other = make_message(wsvc, acct.account_id or "", box)
    failed_once: list[bool] = []

    def responder(_n: int, got: Any) -> Reply:
        body = json.loads(got.body)
        if body["message_id"] == msg["id"] and not failed_once:
            failed_once.append(True)
            return Reply(status=500)
        return Reply()

    with receiving(responder) as rx:
        subscribe(wsvc, acct, rx.url)
        async with dispatching(wsvc, concurrency=8):
            for name in ("oversight.pending", "oversight.approved", "message.delivered"):
                emit(wsvc, acct.account_id or "", name, msg)
            emit(wsvc, acct.account_id or "", "oversight.pending", other)
            await wait_until(lambda: len(rx.received) >= 2)
            await asyncio.sleep(0.3)
            # Only the first attempt and the other message's event got through.
            seen = [
                (json.loads(r.body)["message_id"], json.loads(r.body)["type"]) for r in rx.received
            ]
            assert sorted(seen) == sorted(
                [(msg["id"], "oversight.pending"), (other["id"], "oversight.pending")]
            )
            move_due(wsvc)
            await wait_until(lambda: len(rx.received) == 5)
    mine = [
        json.loads(r.body)["type"]
        for r in rx.received
        if json.loads(r.body)["message_id"] == msg["id"]
    ]
    assert mine == [
        "oversight.pending",
        "oversight.pending",
        "oversight.approved",
        "message.delivered",
    ]


async def test_alias_wildcard_and_mailbox_filters(wsvc: Services, acct: Actor) -> None:
    """An alias subscription receives the event under the alias; "*" under the canonical name;
    a mailbox-scoped subscription ignores other mailboxes; unsubscribed events are skipped."""
    box = make_mailbox(wsvc, acct, "a@mm.test")
    other_box = make_mailbox(wsvc, acct, "b@mm.test")
    msg = make_message(wsvc, acct.account_id or "", box)
    with receiving() as rx:
        subscribe(wsvc, acct, rx.url + "?s=alias", ["message.approved"])
        subscribe(wsvc, acct, rx.url + "?s=star", ["*"])
        subscribe(wsvc, acct, rx.url + "?s=other", None, other_box["id"])
        subscribe(wsvc, acct, rx.url + "?s=received", ["email.received"])
        async with dispatching(wsvc):
            emit(wsvc, acct.account_id or "", "oversight.approved", msg)
            await wait_until(lambda: len(rx.received) == 2)
            await asyncio.sleep(0.2)
    by_path = {r.path: json.loads(r.body) for r in rx.received}
    assert by_path["/hook?s=alias"]["type"] == "message.approved"
    assert by_path["/hook?s=alias"]["event"] == "message.approved"
    assert by_path["/hook?s=star"]["type"] == "oversight.approved"
    assert by_path["/hook?s=alias"]["id"] == by_path["/hook?s=star"]["id"]


async def test_mailbox_webhook_url_receives_its_mailboxs_events(
    wsvc: Services, acct: Actor
) -> None:
    """A mailbox's webhook_url is an implicit subscription to all its events; clearing the URL
    stops deliveries."""
    with receiving() as rx:
        box = make_mailbox(wsvc, acct, "in@mm.test", webhook_url=rx.url)
        msg = make_message(wsvc, acct.account_id or "", box, direction="inbound", status="unread")
        async with dispatching(wsvc):
            emit(wsvc, acct.account_id or "", "message.received", msg)
            await wait_until(lambda: len(rx.received) == 1)
        with wsvc.db.write() as conn:
            hooks = webhooks.list_webhooks(conn, acct)
            from multimail.services import mailboxes

            mailboxes.update_mailbox(conn, actor=acct, ref=box["id"], changes={"webhook_url": None})
        emit(wsvc, acct.account_id or "", "message.received", msg)
    assert [h["source"] for h in hooks] == ["mailbox"] and hooks[0]["mailbox_id"] == box["id"]
    assert json.loads(rx.received[0].body)["type"] == "message.received"
    assert len(deliveries(wsvc)) == 1


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    wsvc: Services, acct: Actor
) -> None:
    """After a rotation a receiver holding either secret verifies (both libraries); the hex
    X-MultiMail-Signature uses the new secret."""
    with receiving() as rx:
        sub = subscribe(wsvc, acct, rx.url)
        with wsvc.db.write() as conn:
            rotated = webhooks.rotate_secret(conn, acct, sub["id"])
        async with dispatching(wsvc):
            emit(wsvc, acct.account_id or "", "message.received")
            await wait_until(lambda: rx.received)
    got = rx.received[0]
    for secret in (sub["secret"], rotated["secret"]):
        verify_webhook(got.body, got.headers, secret)
        Webhook(secret).verify(got.body, got.headers)
    rx.secrets = [rotated["secret"]]
    rx._verify(got)
    assert got.hmac_ok
    assert len(got.headers["webhook-signature"].split()) == 2


async def test_replays_and_mutations_are_rejected(wsvc: Services, acct: Actor) -> None:
    """A captured request replayed after the 5-minute window is refused; any change to the body
    or the id fails both our verifier and the standardwebhooks package."""
    with receiving() as rx:
        sub = subscribe(wsvc, acct, rx.url)
        async with dispatching(wsvc):
            emit(wsvc, acct.account_id or "", "message.received")
            await wait_until(lambda: rx.received)
    got, secret = rx.received[0], sub["secret"]
    stamp = int(got.headers["webhook-timestamp"])
    verify_webhook(got.body, got.headers, secret, now=stamp + 299)
    with pytest.raises(WebhookVerificationError) as caught:
        verify_webhook(got.body, got.headers, secret, now=stamp + 301)
    assert caught.value.reason == "timestamp_too_old"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(got.body, got.headers, secret, now=stamp - 301)

    @hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(got.body) - 1), st.integers(1, 255))
    def mutated_body_fails(position: int, flip: int) -> None:
        body = bytearray(got.body)
        body[position] ^= flip
        with pytest.raises(WebhookVerificationError):
            verify_webhook(bytes(body), got.headers, secret)
        with pytest.raises((StandardVerificationError, UnicodeDecodeError)):
            Webhook(secret).verify(bytes(body), got.headers)

    mutated_body_fails()
    forged = dict(got.headers, **{"webhook-id": "evt_other"})
    with pytest.raises(WebhookVerificationError):
        verify_webhook(got.body, forged, secret)


async def test_redirects_are_not_followed(wsvc: Services, acct: Actor) -> None:
    """A 3xx answer is logged as a failure to retry; the redirect target is never contacted."""
    with (
        receiving() as target,
        receiving(lambda _n, _r: Reply(status=302, headers={"Location": target.url})) as rx,
    ):
        subscribe(wsvc, acct, rx.url)
        async with dispatching(wsvc):
            emit(wsvc, acct.account_id or "", "message.received")
            log = await wait_until(lambda: attempts_of(wsvc, deliveries(wsvc)[0]["id"]))
    assert log[0]["status_code"] == 302 and "not followed" in log[0]["error"]
    assert target.received == [] and deliveries(wsvc)[0]["status"] == "pending"


async def test_response_body_is_read_with_a_cap_and_stored_as_an_excerpt(
    wsvc: Services, acct: Actor
) -> None:
    """A 5 MB answer does not stall the dispatcher; only a 1 KB excerpt is stored."""
    big = b"x" * (5 * 1024 * 1024)
    with receiving(lambda _n, _r: Reply(status=200, body=big)) as rx:
        subscribe(wsvc, acct, rx.url)
        async with dispatching(wsvc):
            emit(wsvc, acct.account_id or "", "message.received")
            await wait_until(lambda: deliveries(wsvc)[0]["status"] == "delivered")
    log = attempts_of(wsvc, deliveries(wsvc)[0]["id"])
    assert len(log[0]["response_excerpt"]) == 1024


async def test_private_targets_are_refused_at_send_time(wsvc: Services, acct: Actor) -> None:
    """A webhook saved while private targets were allowed is refused once they are not, and a
    public-looking name that resolves to loopback (DNS rebinding) is refused at connect time."""
    with receiving() as rx:
        subscribe(wsvc, acct, rx.url)
        subscribe(wsvc, acct, f"http://hooks.example.com:{rx.port}/hook")
        wsvc.settings = wsvc.settings.model_copy(update={"allow_private_webhooks": False})

        async def rebinding(host: str, port: int) -> list[str]:
            return ["127.0.0.1"] if host == "hooks.example.com" else ["203.0.113.9"]

        async with dispatching(wsvc, resolver=rebinding):
            emit(wsvc, acct.account_id or "", "message.received")
            await wait_until(lambda: all(attempts_of(wsvc, d["id"]) for d in deliveries(wsvc)))
    errors = sorted(attempts_of(wsvc, d["id"])[0]["error"] for d in deliveries(wsvc))
    assert all("webhook_target_forbidden" in e for e in errors), errors
    assert any("loopback" in e for e in errors)
    assert rx.received == []


def _dispatcher_script(settings: Settings) -> str:
    return textwrap.dedent(
        f"""
        import asyncio
        from datetime import timedelta
        from multimail.config import Settings
        from multimail.runtime import build_services
        from multimail.workers.webhooks import run_dispatcher

        settings = Settings.model_validate_json({settings.model_dump_json()!r})
        services = build_services(settings, run_migrations=False)
        asyncio.run(run_dispatcher(services, asyncio.Event(), worker_id="victim",
                                   lease=timedelta(seconds=2), poll_interval=0.05))
        """
    )


async def test_killed_dispatcher_loses_nothing(wsvc: Services, acct: Actor) -> None:
    """SIGKILL the dispatcher while the receiver holds its request: after the lease runs out a
    new dispatcher delivers the event, with the same webhook-id."""
    release = threading.Event()

    def responder(n: int, _r: object) -> Reply:
        return Reply(hold=release) if n == 0 else Reply()

    with receiving(responder) as rx:
        subscribe(wsvc, acct, rx.url)
        emit(wsvc, acct.account_id or "", "message.received")
        settings = wsvc.settings.model_copy(update={"secret_key": None})
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-c", _dispatcher_script(settings)],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            assert await asyncio.to_thread(rx.holding.wait, 30)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            await asyncio.to_thread(proc.wait, 10)
        release.set()
        assert deliveries(wsvc)[0]["status"] == "pending"
        assert deliveries(wsvc)[0]["locked_by"] == "victim"
        started = time.monotonic()
        async with dispatching(wsvc):
            await wait_until(lambda: deliveries(wsvc)[0]["status"] == "delivered", within=15)
    assert time.monotonic() - started < 10
    assert len(rx.received) == 2
    assert rx.received[0].headers["webhook-id"] == rx.received[1].headers["webhook-id"]
    assert deliveries(wsvc)[0]["attempts"] == 2


async def test_a_burst_is_recorded_by_group_commit_each_event_once(
    wsvc: Services, acct: Actor
) -> None:
    """Outcomes that finish together are recorded together: eight events answered at the same
    moment are claimed and recorded in fewer commits than one per delivery (each an fsync), and
    each arrives once with its attempt logged."""
    gate = threading.Event()

    def responder(index: int, _got: Any) -> Reply:
        if index >= 7:  # the whole claimed batch is in flight: answer all at once
            gate.set()
        return Reply(hold=gate)

    with svc_events(wsvc) as (rx, commits):
        rx.responder = responder
        subscribe(wsvc, acct, rx.url, ["*"])
        async with dispatching(wsvc, concurrency=8):
            with wsvc.db.write() as conn:
                ids = [
                    events.emit(
                        conn, account_id=acct.account_id or "", event_type="message.received"
                    )
                    for _ in range(8)
                ]
            commits[0] = 0
            await wait_until(lambda: all(d["status"] == "delivered" for d in deliveries(wsvc)))
            writes = commits[0]
    assert sorted(r.headers["webhook-id"] for r in rx.received) == sorted(ids)
    assert all(len(attempts_of(wsvc, d["id"])) == 1 for d in deliveries(wsvc))
    assert writes < 8, writes  # one claim + one record per delivery would be 9


@contextlib.contextmanager
def svc_events(svc: Services) -> Iterator[tuple[Any, list[int]]]:
    """A receiver and a counter of write commits (each an fsync on SQLite)."""
    commits = [0]

    def on_statement(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # Worker heartbeats (services.health) commit on their own timer; they are not the
        # dispatcher's work and would make the count depend on how long the test ran.
        if "server_settings" in statement:
            conn.info["heartbeat"] = True

    def on_commit(conn: Any) -> None:
        if conn.info.pop("heartbeat", False):
            return
        if conn.get_execution_options().get("immediate", False):
            commits[0] += 1

    sa_event.listen(svc.db.engine, "before_cursor_execute", on_statement)
    sa_event.listen(svc.db.engine, "commit", on_commit)
    try:
        with receiving() as rx:
            yield rx, commits
    finally:
        sa_event.remove(svc.db.engine, "commit", on_commit)
        sa_event.remove(svc.db.engine, "before_cursor_execute", on_statement)
