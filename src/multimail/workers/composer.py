"""Composing and DKIM-signing outbound messages in child processes.

The delivery worker composes every message before it claims it (``delivery._prebuild_in``).
That work is pure CPU (MIME, DKIM, the identity token) and holds the interpreter lock for
about half of each message's cost, so one worker process cannot use a second core for it.
With ``compose_processes`` > 0 the worker hands each batch's message ids to a pool of child
processes that read the rows and build the signed bytes themselves, while the worker's
event loop goes on talking SMTP and recording the batch before.

Nothing depends on the children for correctness: what a child returns is the same
"prebuilt" map the worker builds itself, and a message missing from it (a child that died,
timed out or refused) is composed again by the worker when it starts the message, as
before. A pool that broke is replaced on the next batch. Where no pool can be made at all
(no working ``sem_open``: no or a read-only ``/dev/shm`` in some containers) the worker
composes in-process from then on.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from multimail.config import Settings
from multimail.services.context import Services

__all__ = ["ComposePool", "close_compose_pool", "compose_pool"]

_log = logging.getLogger(__name__)

# A batch's composing takes tens of milliseconds; a child that needs longer is stuck.
_BATCH_TIMEOUT_S = 60.0

# The child's own services: built once per child from the worker's settings.
_CHILD: dict[str, Any] = {}


def _exit_with_parent() -> None:
    """End this child when the worker that started it ends, however it ends.

    A pool's children wait for work on a queue whose pipe they hold both ends of, so a
    worker killed outright (SIGKILL, the OOM killer) left them waiting for ever, one idle
    process per compose child and restart. The parent's sentinel is a pipe the parent
    holds open until it exits.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="compose-parent-watch", daemon=True).start()


def _start_child(settings: Settings) -> None:
    from multimail.wiring import build_services

    _exit_with_parent()
    # The worker process has migrated the database and created the keys already.
    _CHILD["services"] = build_services(settings, run_migrations=False)


def _build(message_ids: list[str]) -> dict[str, bytes]:
    from multimail.workers import delivery

    services: Services = _CHILD["services"]
    with services.db.read() as conn:
        return delivery._prebuild_in(conn, services, message_ids)


class ComposePool:
    """``processes`` children composing for one worker process."""

    def __init__(self, settings: Settings, processes: int) -> None:
        self._settings = settings
        self._processes = processes
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        # Set for good: a host that cannot make a pool once will not later, and trying
        # again costs every batch a failed start and a log line.
        self._unavailable = False
        # A batch abandoned at a worker's stop may still get here after close(); children
        # started then would outlive the stop hook that was to end them.
        self._closed = False

    @property
    def usable(self) -> bool:
        """False once closed or once no pool could be made: compose in-process then."""
        return not (self._closed or self._unavailable)

    def _executor(self) -> ProcessPoolExecutor | None:
        with self._lock:
            if self._pool is None and self.usable:
                try:
                    # spawn, not fork: the worker runs threads (the event loop's executor,
                    # the SMTP sessions' loop), and a forked child would inherit their locks.
                    self._pool = ProcessPoolExecutor(
                        self._processes,
                        mp_context=multiprocessing.get_context("spawn"),
                        initializer=_start_child,
                        initargs=(self._settings,),
                    )
                except (OSError, NotImplementedError, ImportError):
                    self._unavailable = True
                    _log.warning(
                        "compose child processes cannot be started here; composing in-process",
                        exc_info=True,
                    )
            return self._pool

    def build(self, message_ids: Sequence[str]) -> dict[str, bytes] | None:
        """The prebuilt messages, or None when the children could not build them (the
        caller composes in-process then)."""
        pool = self._executor()
        if pool is None:
            return None
        try:
            return pool.submit(_build, list(message_ids)).result(timeout=_BATCH_TIMEOUT_S)
        except Exception:
            _log.warning("composing in a child process failed; composing here", exc_info=True)
            self._discard(pool)
            return None

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def warm(self) -> None:
        """Start the children now (each imports the package and opens the database once),
        so that the first batch does not wait for them."""
        pool = self._executor()
        if pool is None:
            return
        for future in [pool.submit(_build, []) for _ in range(self._processes)]:
            future.result(timeout=_BATCH_TIMEOUT_S)

    def pids(self) -> list[int]:
        """The running children's process ids (for CPU accounting)."""
        with self._lock:
            pool = self._pool
        processes = getattr(pool, "_processes", None) or {}
        return [int(pid) for pid in processes]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_POOLS_LOCK = threading.Lock()


def compose_pool(services: Services) -> ComposePool | None:
    """This process's pool for ``services``, or None when the setting asks for none."""
    processes = services.settings.compose_processes
    if processes <= 0:
        return None
    with _POOLS_LOCK:
        found = services.extras.get("compose_pool")
        # A pool belongs to the process that started it (a forked worker starts its own).
        if isinstance(found, tuple) and found[0] == os.getpid():
            pool: ComposePool = found[1]
            return pool
        pool = ComposePool(services.settings, processes)
        services.extras["compose_pool"] = (os.getpid(), pool)
        return pool


async def close_compose_pool(services: Services) -> None:
    """Stop this process's compose children (a runner's stop hook)."""
    with _POOLS_LOCK:
        found = services.extras.pop("compose_pool", None)
    if isinstance(found, tuple) and found[0] == os.getpid():
        pool: ComposePool = found[1]
        await asyncio.to_thread(pool.close)
