"""Review of the look-then-claim delivery pipelines (8e2446b) and the compose-child default
(e658bab): tests for the defects found (strict xfail until fixed in session 4).

Each test drives the real batch runner against the real database and a capturing relay.
The interleavings are forced with a SQLAlchemy ``before_cursor_execute`` listener that fires
at a pipeline's first statement after its look at the due jobs (``delivery._PEEK_DUE``):
between the look and the claim, where another process or a stop may come in.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import multiprocessing.synchronize
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text

from multimail.config import Settings
from multimail.services.context import Services
from multimail.store.tables import jobs as jobs_table
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import delivery, runner
from tests.integration import test_delivery
from tests.integration.relay_support import relayed_services
from tests.integration.test_delivery import World

relay = test_delivery.relay
svc = test_delivery.svc
world = test_delivery.world

_LEASE = timedelta(minutes=2)


@contextlib.contextmanager
def _after_look(services: Services, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` once, in the looking thread, at the statement after its look at the
    due jobs: the jobs looked at are reserved by then and not yet claimed."""
    fired = threading.Event()
    looked_in: list[int] = []

    def before(
        _conn: Any, _cursor: Any, _sql: str, _params: Any, context: Any, _many: bool
    ) -> None:
        if fired.is_set():
            return
        compiled = getattr(context, "compiled", None)
        if compiled is not None and compiled.statement is delivery._PEEK_DUE:
            looked_in.append(threading.get_ident())
        elif threading.get_ident() in looked_in:
            fired.set()
            action()

    event.listen(services.db.engine, "before_cursor_execute", before)
    try:
        yield
    finally:
        event.remove(services.db.engine, "before_cursor_execute", before)
    assert fired.is_set(), "nothing ran after the look"


def _job_rows(services: Services, message_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    keys = {delivery.job_key(m): m for m in message_ids}
    with services.db.read() as conn:
        rows = conn.execute(
            select(jobs_table.c.dedupe_key, jobs_table.c.status, jobs_table.c.locked_by).where(
                jobs_table.c.dedupe_key.in_(list(keys))
            )
        ).all()
    return {keys[r.dedupe_key]: (r.status, r.locked_by) for r in rows}


async def test_a_worker_that_lost_its_look_to_another_process_takes_the_other_due_jobs(
    world: World, relay: CapturingSMTPServer
) -> None:
    """Two worker processes share the database (SPEC §3): their looks do not see each
    other's reservations, so both compose the first due jobs and one claims them. The
    other must still work on what is due, as ``jobs.claim_in`` (SKIP LOCKED) did."""
    services = world.services
    limit = 4
    ids = [world.message(to=[f"r{i}@example.test"]) for i in range(2 * limit)]
    taken: list[delivery._Item] = []

    def other_worker_batch() -> None:
        # Another worker process (its own id, its own reservations) prepares a batch now.
        found = delivery._prepare_due(services, "worker-1", limit, _LEASE, delivery._Looks())
        taken.extend(found or [])

    batch = runner.BATCHES[delivery.DELIVER]
    with _after_look(services, other_worker_batch):
        claimed = await batch(services, "worker-2", limit, _LEASE)
    assert len(taken) == limit
    await delivery._complete(services, "worker-1", taken, _LEASE)
    # 8 due, 4 taken by worker-1: worker-2 finds the other 4 due jobs.
    assert claimed == limit
    assert len(relay.wait_for(2 * limit)) == 2 * limit
    assert {world.row(m)["status"] for m in ids} == {"delivered"}


async def test_a_batch_cancelled_before_its_claim_leaves_no_job_claimed(
    world: World, relay: CapturingSMTPServer
) -> None:
    services = world.services
    ids = [world.message(to=[f"c{i}@example.test"]) for i in range(3)]
    looked = threading.Event()
    go_on = threading.Event()

    def stall() -> None:
        looked.set()
        go_on.wait(10)

    async def pipeline() -> int:
        return await runner.BATCHES[delivery.DELIVER](services, "worker-stopping", 50, _LEASE)

    with _after_look(services, stall):
        task = asyncio.create_task(pipeline())
        assert await asyncio.to_thread(looked.wait, 10)
        task.cancel()  # run_workers cancels what is still running after its grace
        with pytest.raises(asyncio.CancelledError):
            await task
        go_on.set()
        looks = delivery._LOOKS[asyncio.get_running_loop()]["worker-stopping"]
        for _ in range(500):  # the abandoned thread lets its reservations go when it ends
            if not looks.reserved:
                break
            await asyncio.sleep(0.02)
        assert not looks.reserved  # no reservation leaks (this part holds)
    # The worker stopped: no job of these messages may be left claimed by it.
    jobs_now = _job_rows(services, ids)
    assert jobs_now == dict.fromkeys(ids, ("pending", None))
    assert {world.row(m)["status"] for m in ids} == {"queued"}
    assert relay.messages == []


@pytest.fixture
def child_svc(settings: Settings, relay: CapturingSMTPServer) -> Iterator[Services]:
    # compose_processes=1 is the default wherever the process may use two or more CPUs.
    with relayed_services(settings, relay, compose_processes=1) as services:
        yield services


async def test_delivery_goes_on_where_compose_children_cannot_be_made(
    child_svc: Services, relay: CapturingSMTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The module promises "nothing depends on the children for correctness"; a host
    without POSIX named semaphores (some containers and sandboxes) must compose in-process."""
    world = World(child_svc)
    message_id = world.message(to=["shm@example.test"])

    def no_sem_open(self: Any, *args: Any, **kwargs: Any) -> None:
        # What _multiprocessing.SemLock raises there.
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(multiprocessing.synchronize.SemLock, "__init__", no_sem_open)
    batch = runner.BATCHES[delivery.DELIVER]
    assert await batch(child_svc, "worker-noshm", 8, _LEASE) == 1
    assert world.row(message_id)["status"] == "delivered"
    assert len(relay.wait_for(1)) == 1


async def test_a_deliver_job_whose_payload_is_not_json_stops_nothing_else(
    world: World, relay: CapturingSMTPServer
) -> None:
    services = world.services
    if not services.db.is_sqlite:
        pytest.skip("PostgreSQL refuses to store a payload that is not JSON")
    broken = world.message(to=["broken@example.test"])
    with services.db.write() as conn:
        conn.execute(
            text("UPDATE jobs SET payload = :raw WHERE dedupe_key = :key"),
            {"raw": '{"message_id": "trunc', "key": delivery.job_key(broken)},
        )
    good = world.message(to=["good@example.test"])
    batch = runner.BATCHES[delivery.DELIVER]
    assert await batch(services, "worker-json", 50, _LEASE) == 1
    assert world.row(good)["status"] == "delivered"
    assert _job_rows(services, [broken])[broken][0] == "quarantined"


async def test_a_batch_cancelled_during_its_claim_hands_its_jobs_back(
    world: World, relay: CapturingSMTPServer
) -> None:
    """The stop comes after the claim's check but before its commit: the thread finds the
    batch no longer wanted and hands the jobs back itself, so the next worker takes them at
    once instead of after the lease."""
    services = world.services
    ids = [world.message(to=[f"h{i}@example.test"]) for i in range(3)]
    claiming = threading.Event()
    go_on = threading.Event()

    def stall(_conn: Any, _cursor: Any, _sql: str, _params: Any, context: Any, _many: bool) -> None:
        compiled = getattr(context, "compiled", None)
        if compiled is not None and compiled.statement is delivery._MARK_SENDING:
            claiming.set()
            go_on.wait(10)

    event.listen(services.db.engine, "before_cursor_execute", stall)
    try:
        task = asyncio.create_task(
            runner.BATCHES[delivery.DELIVER](services, "worker-stopping", 50, _LEASE)
        )
        assert await asyncio.to_thread(claiming.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        go_on.set()
        looks = delivery._LOOKS[asyncio.get_running_loop()]["worker-stopping"]
        for _ in range(500):  # the thread ends after its hand-back
            if not looks.reserved:
                break
            await asyncio.sleep(0.02)
    finally:
        event.remove(services.db.engine, "before_cursor_execute", stall)
    assert _job_rows(services, ids) == dict.fromkeys(ids, ("pending", None))
    assert relay.messages == []
    # Handed back due now: another worker delivers them without waiting out a lease.
    assert await runner.BATCHES[delivery.DELIVER](services, "worker-next", 50, _LEASE) == 3
    assert len(relay.wait_for(3)) == 3
    assert {world.row(m)["status"] for m in ids} == {"delivered"}


async def test_a_worker_that_lost_part_of_its_look_skips_what_its_other_pipelines_hold(
    world: World, relay: CapturingSMTPServer
) -> None:
    """The jobs taken to make up for those lost are due ones that none of this worker's
    other pipelines is composing."""
    services = world.services
    ids = [world.message(to=[f"p{i}@example.test"]) for i in range(7)]
    with services.db.read() as conn:
        job_of = {
            r.dedupe_key: r.id
            for r in conn.execute(select(jobs_table.c.dedupe_key, jobs_table.c.id)).all()
        }
    # Another pipeline of worker-2 is composing the fifth message (due after the first four).
    held = job_of[delivery.job_key(ids[4])]
    loop = asyncio.get_running_loop()
    looks = delivery._LOOKS.setdefault(loop, {}).setdefault("worker-2", delivery._Looks())
    looks.reserved.add(held)
    taken: list[delivery._Item] = []

    def other_worker_batch() -> None:
        found = delivery._prepare_due(services, "worker-1", 2, _LEASE, delivery._Looks())
        taken.extend(found or [])

    try:
        with _after_look(services, other_worker_batch):
            claimed = await runner.BATCHES[delivery.DELIVER](services, "worker-2", 4, _LEASE)
    finally:
        looks.reserved.discard(held)
    await delivery._complete(services, "worker-1", taken, _LEASE)
    assert [i.message_id for i in taken] == ids[:2]
    # Two of its four still claimable, two more past the held one.
    assert claimed == 4
    rows = _job_rows(services, ids)
    assert rows[ids[4]] == ("pending", None)
    assert [m for m in ids if world.row(m)["status"] == "delivered"] == [
        ids[0],
        ids[1],
        ids[2],
        ids[3],
        ids[5],
        ids[6],
    ]
    assert len(relay.wait_for(6)) == 6
    assert delivery._LOOKS[loop]["worker-2"].reserved == set()
