"""The delivery batch runner's pipelines: how one worker's batches look at, compose and
claim due jobs without getting in each other's way.

A pipeline looks at due deliver jobs, composes their messages outside any transaction, then
claims them. Only the look is taken in turns: the jobs looked at stay reserved from the
worker's other pipelines until they are claimed, so two pipelines compose at the same time,
never the same message, and each claims what it composed.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import select, update

from multimail.store import jobs
from multimail.store.tables import jobs as jobs_table
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import delivery, runner
from tests.integration import test_delivery
from tests.integration.test_delivery import World

relay = test_delivery.relay
svc = test_delivery.svc
world = test_delivery.world

_LEASE = timedelta(minutes=2)


def test_pipelines_look_past_the_jobs_another_is_composing(world: World) -> None:
    ids = [world.message(to=[f"p{i}@example.test"]) for i in range(5)]
    looks = delivery._Looks()
    with world.services.db.read() as conn:
        first = delivery._look(conn, looks, 3)
        second = delivery._look(conn, looks, 3)
        third = delivery._look(conn, looks, 3)
    assert len(first) == 3 and len(second) == 2 and third == []
    seen = [payload["message_id"] for _job, payload in first + second]
    assert sorted(seen) == sorted(ids)
    assert looks.reserved == {job_id for job_id, _payload in first + second}


async def test_concurrent_batches_of_one_worker_claim_what_each_composed(
    world: World, relay: CapturingSMTPServer
) -> None:
    """Two batches of one worker at once: each claims its own messages, all go once."""
    ids = [world.message(to=[f"p{i}@example.test"]) for i in range(8)]
    batch = runner.BATCHES[delivery.DELIVER]
    claimed = await asyncio.gather(
        batch(world.services, "w", 4, _LEASE), batch(world.services, "w", 4, _LEASE)
    )
    assert claimed == [4, 4]
    assert len(relay.wait_for(8)) == 8
    for message_id in ids:
        assert world.row(message_id)["status"] == "delivered"
    message_ids = [m.as_email()["Message-ID"] for m in relay.messages]
    assert len(message_ids) == len(set(message_ids)) == 8
    # Nothing stays reserved once the batches claimed their jobs.
    assert all(
        not looks.reserved for per_loop in delivery._LOOKS.values() for looks in per_loop.values()
    )


async def test_a_corrupt_deliver_job_is_quarantined_even_when_alone(
    world: World, relay: CapturingSMTPServer
) -> None:
    """The look skipped jobs whose payload is not an object; when such a job was the only
    one due, nothing claimed it and it stayed pending and due for ever."""
    with world.services.db.write() as conn:
        corrupt = jobs.enqueue(conn, delivery.DELIVER, {}, max_attempts=5)
        # enqueue takes objects only: the list is written over the payload it stored.
        conn.execute(
            update(jobs_table)
            .where(jobs_table.c.id == corrupt)
            .values(payload=["not", "an", "object"])
        )
    batch = runner.BATCHES[delivery.DELIVER]
    assert await batch(world.services, "w", 50, _LEASE) == 0
    with world.services.db.read() as conn:
        status = conn.execute(
            select(jobs_table.c.status).where(jobs_table.c.id == corrupt)
        ).scalar_one()
    assert status == "quarantined"
    good = world.message(to=["a@example.test"])
    assert await batch(world.services, "w", 50, _LEASE) == 1
    assert world.row(good)["status"] == "delivered"
