"""Review of durability and the job machinery (session 10): the queue, the runner, stops.

Each test shows one defect and is a strict xfail until it is fixed. Real database, real
runner, real SMTP receivers on loopback; nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope, Session
from pydantic import SecretStr
from sqlalchemy import select, text, update

from multimail.config import Settings
from multimail.ids import isoformat, utcnow
from multimail.runtime import build_services
from multimail.services import accounts, oversight
from multimail.services.context import Services
from multimail.store import jobs
from multimail.store.tables import jobs as jobs_table
from multimail.store.tables import messages
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import delivery, runner
from tests.conftest import Api
from tests.integration import test_delivery
from tests.integration.oversight_support import make_mailbox, message_row
from tests.integration.relay_support import serving
from tests.integration.test_delivery import World, until
from tests.integration.test_delivery_crash import HoldingHandler

relay = test_delivery.relay
svc = test_delivery.svc
world = test_delivery.world


def _job(services: Services, job_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        found = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id))
        return dict(found.mappings().one())


# --- a poison job: its worker dies on every attempt -------------------------------------------


async def test_a_job_whose_workers_died_on_every_attempt_is_failed_not_run_again(
    services: Services,
) -> None:
    """A job that crashes the process running it (OOM, a segfault in a C extension) must
    not come back for ever, nor stay first in the queue for every worker that starts."""
    runs: list[int] = []

    @runner.register("review_poison")
    def poison(services: Services, job: jobs.Job, worker_id: str) -> None:
        runs.append(job.attempts)

    with services.db.write() as conn:
        job_id = jobs.enqueue(conn, "review_poison", {"n": 1}, max_attempts=2)
    assert job_id is not None
    # Two workers in turn take the job and die before recording anything (kill -9, OOM):
    # what they leave is a claimed row whose lease runs out.
    for n in range(2):
        (taken,) = jobs.claim(
            services.db, f"doomed-{n}", kinds=["review_poison"], lease=timedelta(milliseconds=1)
        )
        assert taken.attempts == n + 1
        await asyncio.sleep(0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run_workers(services, stop, poll_interval=0.05, grace=5))
    try:
        await until(lambda: _job(services, job_id)["status"] not in ("pending", "running"))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        runner.HANDLERS.pop("review_poison", None)
    assert runs == [], "a job whose attempts were spent ran once more"
    assert _job(services, job_id)["status"] == "failed"


def _deliver_job(services: Services, message_id: str) -> dict[str, Any]:
    """What the tests check of a message's deliver job (not its timestamps, which may be
    the damage a test made)."""
    columns = (jobs_table.c.status, jobs_table.c.locked_by, jobs_table.c.last_error)
    with services.db.read() as conn:
        found = conn.execute(
            select(*columns).where(jobs_table.c.dedupe_key == delivery.job_key(message_id))
        )
        return dict(found.mappings().one())


def _sweep_after_a_while(services: Services, message_id: str) -> None:
    """The delivery sweep as it runs once the message has waited three minutes."""
    with services.db.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == message_id)
            .values(updated_at=utcnow() - timedelta(minutes=3))
        )
    sweep = runner.HANDLERS[delivery.SWEEP]
    sweep(services, jobs.Job("job_sweep", delivery.SWEEP, {}, 1, 1, utcnow()), "worker-1")


@pytest.mark.parametrize("claimed_by", ["batch", "deliver_now", "jobs.claim"])
async def test_a_message_whose_delivery_workers_all_died_is_send_failed_not_sent_again(
    world: World, relay: CapturingSMTPServer, claimed_by: str
) -> None:
    """Whichever claim meets the deliver job next, it fails the job and settles its message
    as ``send_failed`` (reason, audit entry) in the same commit: left ``sending``, the sweep
    would give it a job again and every new worker would send it once more."""
    services = world.services
    message_id = world.message()
    with services.db.write() as conn:
        conn.execute(
            update(jobs_table)
            .where(jobs_table.c.dedupe_key == delivery.job_key(message_id))
            .values(max_attempts=1)
        )
    # A worker claims and starts the delivery (the message is now 'sending'), then dies.
    doomed = delivery._prepare_due(
        services, "doomed", 10, timedelta(milliseconds=1), delivery._Looks()
    )
    assert doomed and world.row(message_id)["status"] == "sending"
    await asyncio.sleep(0.01)
    if claimed_by == "batch":
        batch = runner.BATCHES[delivery.DELIVER]
        assert await batch(services, "worker-2", 10, timedelta(minutes=2)) == 0
    elif claimed_by == "deliver_now":
        status = await asyncio.to_thread(delivery.deliver_now, services, message_id)
        assert status == "send_failed"
    else:
        assert jobs.claim(services.db, "worker-2", kinds=[delivery.DELIVER]) == []
    job = _deliver_job(services, message_id)
    assert job["status"] == "failed" and job["locked_by"] is None
    assert "worker was lost" in job["last_error"]
    row = world.row(message_id)
    assert row["status"] == "send_failed" and "worker delivering it was lost" in row["last_error"]
    assert world.audit_actions(message_id)[-1] == "message.send_failed"
    _sweep_after_a_while(services, message_id)
    assert _deliver_job(services, message_id)["status"] == "failed"
    assert relay.messages == []


async def test_a_deliver_job_past_its_attempts_that_went_back_to_the_queue_still_runs(
    world: World, relay: CapturingSMTPServer
) -> None:
    """The lost-worker rule is for jobs taken over from a dead worker only: a deliver job
    that went back to the queue each time (three days of 4xx, stops) is not cut short."""
    services = world.services
    message_id = world.message()
    with services.db.write() as conn:
        conn.execute(
            update(jobs_table)
            .where(jobs_table.c.dedupe_key == delivery.job_key(message_id))
            .values(attempts=jobs.DEFAULT_MAX_ATTEMPTS)
        )
    batch = runner.BATCHES[delivery.DELIVER]
    assert await batch(services, "worker-1", 10, timedelta(minutes=2)) == 1
    assert world.row(message_id)["status"] == "delivered"
    assert len(relay.messages) == 1


# --- a graceful stop in the middle of a batch --------------------------------------------------


class HoldsOneRecipient(HoldingHandler):
    """Accepts at once, except a message for ``slow@…``: its DATA is held (then 451) until
    :meth:`release`, and accepted after it."""

    port = 0

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        held = not self._released.is_set()
        if held and any(r.startswith("slow@") for r in envelope.rcpt_tos):
            await self._hold()
            return "451 not stored"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def holding_relay() -> Iterator[HoldsOneRecipient]:
    with serving(HoldsOneRecipient()) as handler:
        yield handler


@pytest.fixture
def held_world(settings: Settings, holding_relay: HoldsOneRecipient) -> Iterator[World]:
    port = holding_relay.port
    services = build_services(
        settings.model_copy(
            update={"smtp_url": SecretStr(f"smtp://127.0.0.1:{port}"), "compose_processes": 0}
        )
    )
    yield World(services)
    services.db.dispose()


async def test_a_stop_during_a_batch_does_not_send_again_what_the_relay_accepted(
    held_world: World, holding_relay: HoldsOneRecipient
) -> None:
    """SPEC §2 allows a second copy only when a process dies between the relay's 250 and our
    commit; a graceful stop knows which messages were accepted and must not resend them."""
    world = held_world
    fast = world.message(to=["fast@example.test"])
    slow = world.message(to=["slow@example.test"])
    stop = asyncio.Event()
    first = asyncio.create_task(
        runner.run_workers(world.services, stop, poll_interval=0.05, grace=0.5, pipelines=1)
    )
    await until(lambda: len(holding_relay.received) == 1 and holding_relay.holding.is_set())
    stop.set()  # a deploy's SIGTERM while one conversation of the batch is still under way
    await asyncio.wait_for(first, 10)
    holding_relay.release()  # the held conversation is gone; the relay accepts again

    again = asyncio.Event()
    second = asyncio.create_task(
        runner.run_workers(world.services, again, poll_interval=0.05, grace=5)
    )
    try:
        await until(lambda: world.row(slow)["status"] == "delivered", within=20)
        await until(lambda: world.row(fast)["status"] == "delivered")
    finally:
        again.set()
        await asyncio.wait_for(second, 15)
    copies = [m for m in holding_relay.received if b"fast@example.test" in m]
    assert len(copies) == 1, "the relay had accepted it before the stop"


# --- send_at at the edges of the calendar ------------------------------------------------------


@pytest.mark.parametrize("send_at", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+01:00"])
def test_a_send_at_beyond_the_calendar_in_utc_is_a_422_not_a_500(
    api: Api, services: Services, boot: accounts.Bootstrap, send_at: str
) -> None:
    box = make_mailbox(services, boot.account["id"], "edge@mm.test")
    answer = api.client(boot.agent_key).post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": "bob@example.org", "subject": "Later", "markdown": "Hi.", "send_at": send_at},
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] in ("send_at_too_far", "send_at_in_past", "invalid_send_at")


# --- approval expiry of a draft sent back to the reviewer --------------------------------------


def _backdate(services: Services, message_id: str, by: timedelta) -> None:
    """The message as it stands ``by`` after it was written: created that long ago."""
    with services.db.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == message_id)
            .values(created_at=utcnow() - by, updated_at=utcnow() - by)
        )


def test_a_draft_sent_back_to_the_reviewer_by_an_edit_gets_its_full_approval_window(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    box = make_mailbox(services, boot.account["id"], "later@mm.test")
    agent, reviewer = api.client(boot.agent_key), api.client(boot.reviewer_key)
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={
            "to": "bob@example.org",
            "subject": "Renewal",
            "markdown": "Your renewal offer.",
            "send_at": isoformat(utcnow() + timedelta(days=2)),
        },
    )
    assert sent.status_code == 202 and sent.json()["status"] == "pending_send_approval"
    message_id = sent.json()["id"]
    decide = {"email_id": message_id, "action": "approve", "reviewer": "rita"}
    approved = reviewer.post("/v1/oversight/decide", json=decide)
    assert approved.status_code == 200 and approved.json()["status"] == "scheduled"
    # Four days later (the send was planned six days ahead) the agent revises the offer.
    _backdate(services, message_id, timedelta(days=4))
    edited = agent.patch(
        f"/v1/mailboxes/{box['id']}/emails/{message_id}/schedule",
        json={"markdown": "Your renewal offer, now 10% off."},
    )
    assert edited.status_code == 200 and edited.json()["status"] == "pending_send_approval"

    oversight.sweep_pending(services)  # what the sweep_pending job runs, every minute
    assert message_row(services, message_id)["status"] == "pending_send_approval"
    again = reviewer.post("/v1/oversight/decide", json=decide)
    assert again.status_code == 200, again.text


# --- a corrupt job row other than its payload --------------------------------------------------


async def test_a_job_row_with_a_corrupt_created_at_is_quarantined_and_the_others_run(
    services: Services,
) -> None:
    """DUR-4: SQLite keeps whatever text a damaged row holds in a DATETIME column."""
    if not services.db.is_sqlite:
        pytest.skip("PostgreSQL refuses to store a timestamp that is not one")
    runs: list[int] = []

    @runner.register("review_corrupt")
    def work(services: Services, job: jobs.Job, worker_id: str) -> None:
        runs.append(int(job.payload["n"]))

    with services.db.write() as conn:
        broken = jobs.enqueue(conn, "review_corrupt", {"n": 1})
        good = jobs.enqueue(conn, "review_corrupt", {"n": 2})
        conn.execute(
            text("UPDATE jobs SET created_at = 'torn page' WHERE id = :id"), {"id": broken}
        )
    assert broken is not None and good is not None
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run_workers(services, stop, poll_interval=0.05, grace=5))
    try:
        with contextlib.suppress(AssertionError):
            await until(lambda: _job(services, good)["status"] == "done", within=5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        runner.HANDLERS.pop("review_corrupt", None)
    with services.db.read() as conn:
        found = conn.execute(
            select(jobs_table.c.id, jobs_table.c.status).where(jobs_table.c.id.in_([broken, good]))
        )
        statuses = {row.id: row.status for row in found}
    assert statuses == {broken: "quarantined", good: "done"}
    assert runs == [2]


async def test_a_deliver_job_with_a_corrupt_created_at_is_quarantined_and_then_delivered(
    world: World, relay: CapturingSMTPServer
) -> None:
    """The delivery worker's own claim quarantines the row, naming the column, and delivers
    the message beside it; the sweep then gives the message a sound job again."""
    services = world.services
    if not services.db.is_sqlite:
        pytest.skip("PostgreSQL refuses to store a timestamp that is not one")
    broken = world.message(to=["broken@example.test"])
    good = world.message(to=["good@example.test"])
    with services.db.write() as conn:
        conn.execute(
            text("UPDATE jobs SET created_at = 'torn page' WHERE dedupe_key = :key"),
            {"key": delivery.job_key(broken)},
        )
    batch = runner.BATCHES[delivery.DELIVER]
    assert await batch(services, "worker-1", 50, timedelta(minutes=2)) == 1
    assert world.row(good)["status"] == "delivered"
    job = _deliver_job(services, broken)
    assert (job["status"], job["last_error"]) == ("quarantined", "created_at is not a time")
    assert world.row(broken)["status"] == "queued"
    _sweep_after_a_while(services, broken)
    assert await batch(services, "worker-1", 50, timedelta(minutes=2)) == 1
    assert world.row(broken)["status"] == "delivered"
    assert sorted(r for m in relay.messages for r in m.rcpt_tos) == [
        "broken@example.test",
        "good@example.test",
    ]


# --- a queued message whose deliver job was quarantined ----------------------------------------


async def test_a_queued_message_whose_deliver_job_was_quarantined_is_still_delivered(
    world: World, relay: CapturingSMTPServer
) -> None:
    services = world.services
    message_id = world.message()
    with services.db.write() as conn:
        # A damaged row: its payload is JSON but not an object (both databases store that).
        conn.execute(
            update(jobs_table)
            .where(jobs_table.c.dedupe_key == delivery.job_key(message_id))
            .values(payload=["damaged"])
        )
    batch = runner.BATCHES[delivery.DELIVER]
    assert await batch(services, "worker-1", 50, timedelta(minutes=2)) == 0
    assert _deliver_job_status(services, message_id) == "quarantined"
    # The delivery sweep (every minute) looks for queued messages left without a live job
    # for two minutes: this one, as it stands three minutes later.
    _sweep_after_a_while(services, message_id)
    await batch(services, "worker-1", 50, timedelta(minutes=2))
    assert world.row(message_id)["status"] == "delivered"
    assert len(relay.messages) == 1


def _deliver_job_status(services: Services, message_id: str) -> str:
    with services.db.read() as conn:
        return str(
            conn.execute(
                select(jobs_table.c.status).where(
                    jobs_table.c.dedupe_key == delivery.job_key(message_id)
                )
            ).scalar_one()
        )
