"""The delivery worker composing in child processes (``compose_processes``).

The children are real spawned processes reading the same database; the relay is a real
local SMTP server. What reaches the relay must be what the worker stored, signed as when
the worker composes itself, and a child that dies must cost nothing but its speed.
"""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from multimail.config import Settings
from multimail.services.context import Services
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import composer, delivery, runner
from tests.integration import relay_support, test_delivery
from tests.integration.relay_support import relayed_services
from tests.integration.test_delivery import World, status_is, until

# The delivery tests' fixtures, resolved against this module's ``svc`` (with a compose child).
world = test_delivery.world
workers = test_delivery.workers
relay = relay_support.relay


@pytest.fixture
def svc(settings: Settings, relay: CapturingSMTPServer) -> Iterator[Services]:
    with relayed_services(settings, relay, compose_processes=1) as services:
        yield services


async def test_children_compose_what_the_relay_receives_once_each(
    world: World, relay: CapturingSMTPServer, svc: Services
) -> None:
    pool = composer.compose_pool(svc)
    assert pool is not None
    await asyncio.to_thread(pool.warm)
    [child] = pool.pids()
    assert child != os.getpid()
    ids = [world.message(to=[f"p{i}@example.test"], rendered=i % 2 == 0) for i in range(12)]
    stop = asyncio.Event()
    task = asyncio.create_task(
        runner.run_workers(svc, stop, worker_id="test-worker", poll_interval=0.05, grace=5)
    )
    try:
        for message_id in ids:
            await until(status_is(world, message_id, "delivered"), within=30)
        assert pool.pids() == [child]  # the batch went to the child, which is still alive
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert composer.compose_pool(svc) is not pool  # the runner's stop closed it
    received = {m.as_email()["Message-ID"]: m for m in relay.messages}
    assert len(received) == len(relay.messages) == len(ids)
    for message_id in ids:
        row = world.row(message_id)
        got = received[row["message_id_header"]]
        assert got.data.rstrip(b"\r\n") == row["raw"].rstrip(b"\r\n")
        assert b"DKIM-Signature:" in row["raw"]
        assert b"\r\nX-MultiMail-Identity: " in row["raw"]


async def test_a_child_killed_under_the_worker_costs_no_message(
    world: World, relay: CapturingSMTPServer, svc: Services, workers: None
) -> None:
    pool = composer.compose_pool(svc)
    assert pool is not None
    await asyncio.to_thread(pool.warm)
    [child] = pool.pids()
    os.kill(child, signal.SIGKILL)
    ids = [world.message(to=[f"k{i}@example.test"]) for i in range(6)]
    runner.wake()
    for message_id in ids:
        await until(status_is(world, message_id, "delivered"), within=30)
    tos = sorted(r for m in relay.messages for r in m.rcpt_tos)
    assert tos == sorted(f"k{i}@example.test" for i in range(6))
    # The broken pool was dropped; the next batch starts a new child.
    later = [world.message(to=[f"n{i}@example.test"]) for i in range(3)]
    runner.wake()
    for message_id in later:
        await until(status_is(world, message_id, "delivered"), within=30)
    assert child not in pool.pids()
    assert len(relay.messages) == 9


# A worker process that starts its compose child and reports the child's pid.
_WORKER = """
import sys, time
from multimail.config import load_settings
from multimail.runtime import build_services
from multimail.workers import composer
services = build_services(load_settings(), run_migrations=False)
pool = composer.compose_pool(services)
pool.warm()
print(pool.pids()[0], flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def test_a_worker_killed_outright_takes_its_compose_child_with_it(svc: Services) -> None:
    """SIGKILL of a worker left its compose child waiting for work for ever (its parent
    became init): an idle process per killed worker, piling up across restarts."""
    settings = svc.settings
    env = {
        **os.environ,
        "MULTIMAIL_DATABASE_URL": settings.effective_database_url,
        "MULTIMAIL_DATA_DIR": str(settings.data_dir),
        "MULTIMAIL_DOMAIN": settings.domain,
        "MULTIMAIL_SECRET_KEY": svc.extras["secret_key"].decode(),  # type: ignore[attr-defined]
        "MULTIMAIL_COMPOSE_PROCESSES": "1",
    }
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        assert _running(child)
    finally:
        worker.kill()
        worker.wait(10)
    deadline = time.monotonic() + 20
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)


async def test_a_pool_that_cannot_be_made_is_tried_once_and_delivery_goes_on(
    world: World,
    relay: CapturingSMTPServer,
    svc: Services,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a working sem_open every batch failed to create the pool and delivered
    nothing; now the first failure is logged once and the worker composes in-process."""
    tries: list[int] = []

    def no_sem_open(self: Any, *args: Any, **kwargs: Any) -> None:
        tries.append(1)
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(multiprocessing.synchronize.SemLock, "__init__", no_sem_open)
    batch = runner.BATCHES[delivery.DELIVER]
    lease = timedelta(minutes=2)
    for round_ in range(3):
        ids = [world.message(to=[f"s{round_}-{i}@example.test"]) for i in range(2)]
        assert await batch(svc, "worker-noshm", 8, lease) == 2
        assert {world.row(m)["status"] for m in ids} == {"delivered"}
    assert len(tries) == 1
    warnings = [r for r in caplog.records if "cannot be started" in r.getMessage()]
    assert len(warnings) == 1
    pool = composer.compose_pool(svc)
    assert pool is not None and not pool.usable and pool.pids() == []
    assert len(relay.wait_for(6)) == 6


def test_a_closed_pool_starts_no_children(svc: Services) -> None:
    """A batch abandoned at a worker's stop may reach the pool after the stop hook closed
    it; children started then would never be ended."""
    pool = composer.compose_pool(svc)
    assert pool is not None
    pool.close()
    assert pool.build(["msg_after_stop"]) is None
    pool.warm()
    assert pool.pids() == []
    assert multiprocessing.active_children() == []
