"""The job runner: claims due jobs, runs each kind's handler, and records the outcome as data.

Modules add kinds without touching this file::

    @register("deliver")
    async def handle(services: Services, job: Job, worker_id: str) -> datetime | None: ...

A kind whose work gains from group commit registers a batch runner instead
(:func:`register_batch`): it claims up to ``limit`` of its jobs itself, inside the transaction
that starts their work, and records every outcome in one more commit. The runner keeps
``pipelines`` of them going, so one batch talks to the network while another commits.

A handler returns None when the job is done, or a time to run it again. It raises
``TemporaryDeliveryError`` (or any unexpected error) to be retried with backoff, and any
other ``MultimailError`` to fail the job for good. Synchronous handlers run in a thread.

While a handler runs, the runner renews the job's lease, so only a dead worker's jobs are
taken over. :func:`wake` lets code that just committed a job cut the poll short, from any
thread. Recurring kinds (:func:`every`) are enqueued once per time slot across all workers,
the slot number being the dedupe key.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, delete, select

from multimail.errors import MultimailError, TemporaryDeliveryError
from multimail.ids import utcnow
from multimail.services import health
from multimail.services.context import Services
from multimail.store import jobs
from multimail.store.jobs import DEFAULT_LEASE, Job
from multimail.store.tables import jobs as jobs_table

__all__ = [
    "BATCHES",
    "DRAINS",
    "HANDLERS",
    "RECURRING",
    "STOPPERS",
    "BatchDrain",
    "BatchRunner",
    "Handler",
    "JobResult",
    "every",
    "execute",
    "job_backoff",
    "on_stop",
    "record_failure",
    "register",
    "register_batch",
    "run_workers",
    "wake",
]

JobResult = datetime | None
Handler = Callable[[Services, Job, str], Awaitable[JobResult] | JobResult]

HANDLERS: dict[str, Handler] = {}
#: ``(services, worker_id, limit, lease) -> jobs claimed``; see :func:`register_batch`.
BatchRunner = Callable[[Services, str, int, timedelta], Awaitable[int]]
BATCHES: dict[str, BatchRunner] = {}
#: ``(services, worker_id, at_once) -> None``; see :func:`register_batch`.
BatchDrain = Callable[[Services, str, bool], Awaitable[None]]
DRAINS: dict[str, BatchDrain] = {}
RECURRING: dict[str, float] = {}
#: Called once when :func:`run_workers` stops, on its loop (e.g. to close kept sessions).
STOPPERS: list[Callable[[Services], Awaitable[None]]] = []

_log = logging.getLogger(__name__)

# Recurring jobs leave one row per slot; done ones older than this are pruned.
_RECURRING_KEEP = timedelta(days=1)
_PRUNE_EVERY_S = 3600.0
_SCHEDULER_TICK_S = 1.0
# Backoff for jobs that fail unexpectedly: 5 s doubling, at most an hour.
_BACKOFF_BASE_S = 5.0
_BACKOFF_CAP_S = 3600.0

_wakers_lock = threading.Lock()
_wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []


def register(kind: str) -> Callable[[Handler], Handler]:
    """Decorator: run ``handler`` for jobs of ``kind``."""

    def decorate(handler: Handler) -> Handler:
        existing = HANDLERS.get(kind)
        if existing is not None and existing is not handler:
            raise ValueError(f"a handler for job kind {kind!r} is already registered")
        HANDLERS[kind] = handler
        return handler

    return decorate


def register_batch(
    kind: str, *, drain: BatchDrain | None = None
) -> Callable[[BatchRunner], BatchRunner]:
    """Decorator: ``run_workers`` claims ``kind`` only through this batch runner.

    The batch runner claims (``jobs.claim_in``), works and settles its jobs itself and
    returns how many it claimed; a plain handler for the same kind may still exist for
    callers that run one job on their own (:func:`execute`).

    A batch runner that leaves work going after it returns gives a ``drain``, awaited as each
    pipeline of ``kind`` ends: with ``at_once`` False after a stop, when that work gets the
    stop's grace (the drain is cancelled when the grace is over), True when the pipeline was
    cancelled itself (the grace is over already).
    """

    def decorate(batch: BatchRunner) -> BatchRunner:
        existing = BATCHES.get(kind)
        if existing is not None and existing is not batch:
            raise ValueError(f"a batch runner for job kind {kind!r} is already registered")
        BATCHES[kind] = batch
        if drain is not None:
            DRAINS[kind] = drain
        return batch

    return decorate


def on_stop(stopper: Callable[[Services], Awaitable[None]]) -> None:
    """Run ``stopper`` when a runner stops, after its jobs finished or were handed back."""
    if stopper not in STOPPERS:
        STOPPERS.append(stopper)


def every(kind: str, seconds: float) -> None:
    """Enqueue a ``kind`` job once every ``seconds`` (needs a registered handler to run)."""
    if seconds < 1:
        raise ValueError("a recurring job runs at most once a second")
    RECURRING[kind] = float(seconds)


def wake() -> None:
    """Tell every runner in this process to look for work now. Safe from any thread."""
    with _wakers_lock:
        targets = list(_wakers)
    for loop, event in targets:
        with contextlib.suppress(RuntimeError):  # that loop has just closed
            loop.call_soon_threadsafe(event.set)


def job_backoff(attempts: int) -> timedelta:
    """Delay before retry number ``attempts``, doubling, capped, with ±20 % jitter."""
    delay = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** max(0, attempts - 1))
    return timedelta(seconds=delay * random.uniform(0.8, 1.2))


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _load_builtin_handlers(services: Services) -> None:
    # Imported for their registrations; kept here so any runner handles every kind.
    from multimail.workers import kinds

    kinds.install(services)


def _settle(services: Services, job: Job, worker_id: str, result: JobResult) -> None:
    with services.db.write() as conn:
        if result is None:
            jobs.complete(conn, job.id, worker_id)
        else:
            jobs.retry(conn, job.id, worker_id, run_at=result, error="rescheduled")


def record_failure(conn: Connection, job: Job, worker_id: str, exc: BaseException) -> None:
    """In the caller's transaction: retry ``job`` with backoff, or fail it for good when the
    error is permanent (a ``MultimailError`` other than a temporary delivery error) or its
    attempts are spent."""
    error = f"{type(exc).__name__}: {exc}"
    permanent = isinstance(exc, MultimailError) and not isinstance(exc, TemporaryDeliveryError)
    if permanent or job.attempts >= job.max_attempts:
        jobs.fail(conn, job.id, worker_id, error=error)
    else:
        run_at = utcnow() + job_backoff(job.attempts)
        jobs.retry(conn, job.id, worker_id, run_at=run_at, error=error)


def _retry_or_fail(services: Services, job: Job, worker_id: str, exc: BaseException) -> None:
    with services.db.write() as conn:
        record_failure(conn, job, worker_id, exc)


async def _keep_lease(services: Services, job: Job, worker_id: str, lease: timedelta) -> None:
    interval = max(0.05, lease.total_seconds() / 3)
    while True:
        await asyncio.sleep(interval)
        try:
            held = await asyncio.to_thread(jobs.extend_lease, services.db, job.id, worker_id, lease)
        except Exception:  # a database hiccup: try again next round
            _log.warning("could not renew the lease of job %s", job.id, exc_info=True)
            continue
        if not held:
            _log.warning("job %s was taken over by another worker", job.id)
            return


async def execute(
    services: Services, job: Job, worker_id: str, *, lease: timedelta = DEFAULT_LEASE
) -> None:
    """Run one claimed job to its recorded outcome (done, retry at a time, or failed)."""
    handler = HANDLERS.get(job.kind)
    if handler is None:
        await asyncio.to_thread(
            _retry_or_fail, services, job, worker_id, MultimailError(f"no handler for {job.kind}")
        )
        return
    keeper = asyncio.create_task(_keep_lease(services, job, worker_id, lease))
    try:
        if inspect.iscoroutinefunction(handler):
            result = await handler(services, job, worker_id)
        else:
            result = await asyncio.to_thread(handler, services, job, worker_id)
            if inspect.isawaitable(result):
                result = await result
    except asyncio.CancelledError:
        # Stopping: hand the job back now rather than make the next worker wait out a lease.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(_settle, services, job, worker_id, utcnow())
        raise
    except Exception as exc:
        if not isinstance(exc, MultimailError):
            _log.exception("job %s (%s) failed unexpectedly", job.id, job.kind)
        else:
            _log.info("job %s (%s): %s", job.id, job.kind, exc)
        await asyncio.to_thread(_retry_or_fail, services, job, worker_id, exc)
    else:
        await asyncio.to_thread(_settle, services, job, worker_id, result)
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


def _enqueue_recurring(services: Services, due: dict[str, int]) -> None:
    with services.db.write() as conn:
        for kind, slot in due.items():
            jobs.enqueue(conn, kind, {"slot": slot}, dedupe_key=f"every:{kind}:{slot}")


def _prune_recurring(services: Services) -> None:
    cutoff = utcnow() - _RECURRING_KEEP
    with services.db.write() as conn:
        conn.execute(
            delete(jobs_table).where(
                jobs_table.c.dedupe_key.like("every:%"),
                jobs_table.c.status == "done",
                jobs_table.c.updated_at < cutoff,
            )
        )


async def _schedule(services: Services, stop: asyncio.Event, wake_event: asyncio.Event) -> None:
    last_slot: dict[str, int] = {}
    last_prune = 0.0
    while not stop.is_set():
        now = time.time()
        due = {
            kind: int(now // seconds)
            for kind, seconds in RECURRING.items()
            if kind in HANDLERS and last_slot.get(kind) != int(now // seconds)
        }
        try:
            if due:
                await asyncio.to_thread(_enqueue_recurring, services, due)
                last_slot.update(due)
                wake_event.set()
            if RECURRING and now - last_prune > _PRUNE_EVERY_S:
                await asyncio.to_thread(_prune_recurring, services)
                last_prune = now
        except Exception:
            _log.warning("the recurring-job scheduler failed; retrying", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _SCHEDULER_TICK_S)


async def _wait_for_work(
    stop: asyncio.Event,
    wake_event: asyncio.Event,
    inflight: set[asyncio.Task[None]],
    poll: float,
) -> None:
    waiters = {asyncio.create_task(stop.wait()), asyncio.create_task(wake_event.wait())}
    try:
        await asyncio.wait(waiters | inflight, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    wake_event.clear()


async def _run_batches(
    services: Services,
    stop: asyncio.Event,
    kind: str,
    worker: str,
    *,
    limit: int,
    lease: timedelta,
    poll: float,
) -> None:
    """One pipeline of ``kind``: claim a batch, work it, repeat; sleep when nothing is due."""
    loop = asyncio.get_running_loop()
    wake_event = asyncio.Event()
    drain = DRAINS.get(kind)
    with _wakers_lock:
        _wakers.append((loop, wake_event))
    try:
        while not stop.is_set():
            claimed = 0
            try:
                claimed = await BATCHES[kind](services, worker, limit, lease)
            except Exception:
                _log.warning(
                    "a %s batch failed; its jobs return after their lease", kind, exc_info=True
                )
            if claimed < limit:
                await _wait_for_work(stop, wake_event, set(), poll)
    except asyncio.CancelledError:
        if drain is not None:
            await drain(services, worker, True)
        raise
    finally:
        with _wakers_lock:
            _wakers.remove((loop, wake_event))
    if drain is not None:
        await drain(services, worker, False)


# Whether any job of these kinds is due: the condition jobs.claim takes them by.
_ANY_DUE = (
    select(jobs_table.c.id)
    .where(
        jobs_table.c.kind.in_(bindparam("kinds", expanding=True)),
        jobs.is_due(bindparam("now")),
    )
    .limit(1)
)


def _claim_single(
    services: Services, worker: str, kinds: list[str], limit: int, lease: timedelta
) -> list[Job]:
    """Claim due jobs of ``kinds``, looking first in a read transaction: most polls find
    nothing, and a read neither takes the write lock from the delivery batches (SQLite)
    nor costs a write transaction."""
    if not kinds:
        return []
    with services.db.read() as conn:
        if conn.execute(_ANY_DUE, {"kinds": kinds, "now": utcnow()}).first() is None:
            return []
    return jobs.claim(services.db, worker, kinds=kinds, limit=limit, lease=lease)


async def run_workers(
    services: Services,
    stop: asyncio.Event,
    *,
    worker_id: str | None = None,
    concurrency: int = 4,
    poll_interval: float = 0.2,
    lease: timedelta = DEFAULT_LEASE,
    grace: float = 30.0,
    batch_size: int | None = None,
    pipelines: int = 2,
) -> None:
    """Claim and run jobs until ``stop`` is set; then let in-flight jobs finish for ``grace``
    seconds and hand back whatever is still running.

    Kinds with a batch runner get ``pipelines`` loops of up to ``batch_size`` jobs each
    (unset: the ``delivery_batch_size`` setting); the others share ``concurrency`` slots,
    one job per slot.
    """
    _load_builtin_handlers(services)
    limit = batch_size or services.settings.delivery_batch_size
    worker = worker_id or _default_worker_id()
    loop = asyncio.get_running_loop()
    wake_event = asyncio.Event()
    with _wakers_lock:
        _wakers.append((loop, wake_event))
    scheduler = asyncio.create_task(_schedule(services, stop, wake_event))
    pulse = health.Heartbeat(services.db, "jobs", worker)
    inflight: set[asyncio.Task[None]] = {
        asyncio.create_task(
            _run_batches(services, stop, kind, worker, limit=limit, lease=lease, poll=poll_interval)
        )
        for kind in sorted(BATCHES)
        for _ in range(max(1, pipelines))
    }
    batch_loops = len(inflight)
    single_kinds = sorted(set(HANDLERS) - set(BATCHES))
    try:
        while not stop.is_set():
            pulse.tick()
            free = concurrency + batch_loops - len(inflight)
            claimed: list[Job] = []
            if free > 0:
                try:
                    claimed = await asyncio.to_thread(
                        _claim_single, services, worker, single_kinds, free, lease
                    )
                except Exception:
                    _log.warning("claiming jobs failed; retrying", exc_info=True)
            for job in claimed:
                task = asyncio.create_task(execute(services, job, worker, lease=lease))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                # A job that ends while this loop is claiming (its reschedule committed after
                # the claim looked) has left ``inflight`` before the wait below could see it:
                # without the wake, a job rescheduled for now waited out the whole poll.
                task.add_done_callback(lambda _task: wake_event.set())
            if claimed and len(inflight) < concurrency + batch_loops:
                continue  # a full batch may mean more work is due right now
            await _wait_for_work(stop, wake_event, inflight, poll_interval)
    finally:
        with _wakers_lock:
            _wakers.remove((loop, wake_event))
        if inflight:
            _done, pending = await asyncio.wait(set(inflight), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        scheduler.cancel()
        await asyncio.gather(scheduler, return_exceptions=True)
        for stopper in STOPPERS:
            try:
                await stopper(services)
            except Exception:
                _log.warning("a stop hook failed", exc_info=True)
        await pulse.stop()
