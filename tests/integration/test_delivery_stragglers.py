"""Stragglers: a runner's batch does not wait for its slowest SMTP conversation.

A receiver may take minutes to answer the final dot (a tarpit, a server that scans before
its 250: RFC 5321 §4.5.3.2 allows 10 minutes). A batch waits for its conversations until
``delivery._STRAGGLER_DEADLINE``, records those that ended, and lets the others go on in the
background, each recorded when it ends, their jobs' leases kept. Real runner, real
database, a real SMTP receiver on loopback that answers the final dot of one recipient's
message only when the test lets it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope, Session
from pydantic import SecretStr
from sqlalchemy import select

from multimail.config import Settings
from multimail.ids import aware
from multimail.runtime import build_services
from multimail.services.context import Services
from multimail.store.tables import jobs as jobs_table
from multimail.workers import delivery, runner
from tests.integration.relay_support import serving
from tests.integration.test_delivery import World, until

_LEASE = timedelta(seconds=1)
_WORKER = "worker-stragglers"


class SlowToAnswer:
    """Accepts mail at once, except that the final dot of a message for ``slow…@`` is
    answered only after :meth:`release`: with 250 (stored), or when ``refuse_held`` with 451
    (not stored: a receiver that had not committed the message when its client went away).
    """

    def __init__(self) -> None:
        self.port = 0
        self.refuse_held = False
        self.held = 0
        self.stored: list[tuple[list[str], bytes]] = []
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def copies(self, address: str) -> int:
        return sum(1 for rcpts, _raw in self.stored if address in rcpts)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        slow = any(r.startswith("slow") for r in envelope.rcpt_tos)
        if slow and not self._released.is_set():
            self.held += 1
            await asyncio.to_thread(self._released.wait, 30)
            if self.refuse_held:
                return "451 4.3.0 not stored"
        self.stored.append((list(envelope.rcpt_tos), bytes(envelope.original_content or b"")))
        return "250 2.0.0 OK: queued"


@pytest.fixture
def receiver() -> Iterator[SlowToAnswer]:
    with serving(SlowToAnswer()) as handler:
        yield handler


@pytest.fixture
def slow_world(settings: Settings, receiver: SlowToAnswer) -> Iterator[World]:
    services = build_services(
        settings.model_copy(
            update={
                "smtp_url": SecretStr(f"smtp://127.0.0.1:{receiver.port}"),
                "compose_processes": 0,
            }
        )
    )
    yield World(services)
    services.db.dispose()


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "_STRAGGLER_DEADLINE", 0.2)


def _workers(services: Services, stop: asyncio.Event, *, grace: float) -> asyncio.Task[None]:
    return asyncio.create_task(
        runner.run_workers(
            services,
            stop,
            worker_id=_WORKER,
            poll_interval=0.05,
            grace=grace,
            lease=_LEASE,
            pipelines=1,
        )
    )


def _job(services: Services, message_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        found = conn.execute(
            select(jobs_table).where(jobs_table.c.dedupe_key == delivery.job_key(message_id))
        )
        return dict(found.mappings().one())


async def test_a_slow_receiver_holds_back_neither_its_batch_nor_the_next_one(
    slow_world: World, receiver: SlowToAnswer, short_deadline: None
) -> None:
    """The messages of a batch whose conversations ended are recorded ``delivered`` while
    one receiver still sits on its final dot; the pipeline takes its next batch meanwhile;
    the slow one's job stays leased (nobody else takes it) and it is recorded ``delivered``
    once, when its receiver answers."""
    world = slow_world
    fast = [world.message(to=[f"fast{i}@example.test"]) for i in range(2)]
    slow = world.message(to=["slow@example.test"])
    stop = asyncio.Event()
    task = _workers(world.services, stop, grace=5)
    try:
        await until(lambda: all(world.row(m)["status"] == "delivered" for m in fast))
        assert receiver.held == 1 and world.row(slow)["status"] == "sending"

        later = world.message(to=["later@example.test"])
        await until(lambda: world.row(later)["status"] == "delivered")
        assert world.row(slow)["status"] == "sending"

        leased = _job(world.services, slow)
        assert (leased["status"], leased["locked_by"]) == ("running", _WORKER)
        # Renewed while the conversation goes on, so no other worker takes the job over.
        first_until = aware(leased["locked_until"])
        await until(lambda: aware(_job(world.services, slow)["locked_until"]) > first_until)
        other = runner.BATCHES[delivery.DELIVER]
        assert await other(world.services, "another-worker", 10, _LEASE) == 0

        receiver.release()
        await until(lambda: world.row(slow)["status"] == "delivered")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert receiver.copies("slow@example.test") == 1
    assert [a["outcome"] for a in world.attempts(slow)] == ["delivered"]
    assert world.audit_actions(slow).count("message.delivered") == 1
    assert _job(world.services, slow)["status"] == "done"
    for message_id in [*fast, later]:
        assert world.attempts(message_id)[0]["outcome"] == "delivered"
    assert receiver.copies("fast0@example.test") == receiver.copies("fast1@example.test") == 1


async def test_a_straggler_gets_the_stop_grace_and_is_recorded_when_it_ends(
    slow_world: World, receiver: SlowToAnswer, short_deadline: None
) -> None:
    """A stop waits for the stragglers as for the rest of the work, within its grace."""
    world = slow_world
    fast = world.message(to=["fast@example.test"])
    slow = world.message(to=["slow@example.test"])
    stop = asyncio.Event()
    task = _workers(world.services, stop, grace=10)
    await until(lambda: world.row(fast)["status"] == "delivered" and receiver.held == 1)
    stop.set()
    await asyncio.sleep(0.3)
    assert not task.done(), "the stop did not wait for the conversation under way"
    receiver.release()
    await asyncio.wait_for(task, 10)
    assert world.row(slow)["status"] == "delivered"
    assert _job(world.services, slow)["status"] == "done"
    assert receiver.copies("slow@example.test") == 1


async def test_a_stop_past_its_grace_hands_a_straggler_back_and_sends_nothing_twice(
    slow_world: World, receiver: SlowToAnswer, short_deadline: None
) -> None:
    """When the grace runs out the straggler's conversation is cut short: its job goes back
    to the queue, due at once; what the relay accepted stays recorded and is not sent again;
    the next worker delivers the straggler, once."""
    world = slow_world
    receiver.refuse_held = True
    fast = world.message(to=["fast@example.test"])
    slow = world.message(to=["slow@example.test"])
    stop = asyncio.Event()
    task = _workers(world.services, stop, grace=0.3)
    await until(lambda: world.row(fast)["status"] == "delivered" and receiver.held == 1)
    stop.set()
    await asyncio.wait_for(task, 10)
    handed_back = _job(world.services, slow)
    assert (handed_back["status"], handed_back["locked_by"]) == ("pending", None)
    assert handed_back["last_error"] == "worker stopping"
    assert world.row(slow)["status"] == "sending"
    assert receiver.copies("slow@example.test") == 0

    receiver.release()
    again = asyncio.Event()
    second = _workers(world.services, again, grace=5)
    try:
        await until(lambda: world.row(slow)["status"] == "delivered")
    finally:
        again.set()
        await asyncio.wait_for(second, 10)
    assert receiver.copies("slow@example.test") == 1
    assert receiver.copies("fast@example.test") == 1
    assert world.row(fast)["status"] == "delivered"


async def test_past_the_bound_on_stragglers_a_batch_waits_for_its_conversations(
    slow_world: World,
    receiver: SlowToAnswer,
    short_deadline: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With more conversations under way than a worker may keep in the background, the
    batch waits for them all before it records anything, as without stragglers."""
    monkeypatch.setattr(delivery, "_MAX_STRAGGLERS", 1)
    world = slow_world
    fast = world.message(to=["fast@example.test"])
    slow = [world.message(to=[f"slow{i}@example.test"]) for i in range(2)]
    stop = asyncio.Event()
    task = _workers(world.services, stop, grace=5)
    try:
        await until(lambda: receiver.held == 2 and receiver.copies("fast@example.test") == 1)
        await asyncio.sleep(0.5)  # well past the deadline
        assert world.row(fast)["status"] == "sending", "recorded before its batch ended"
        receiver.release()
        await until(lambda: all(world.row(m)["status"] == "delivered" for m in [fast, *slow]))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert [receiver.copies(f"slow{i}@example.test") for i in range(2)] == [1, 1]
