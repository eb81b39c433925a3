"""Worker heartbeats and the readiness verdict built on them.

Each long-running loop (the job runner, the inbound worker, the webhook dispatcher, the SMTP
server) keeps a row ``heartbeat:<role>:<worker id>`` in ``server_settings`` whose value is the
time of its last beat. Any process can then judge readiness from the database alone, which
is what an API node behind a load balancer needs: it does not run the workers itself.

A role counts as *expected* once any of its loops has beaten within :data:`FORGET_AFTER`; an
expected role is healthy while at least one of its loops beat within :data:`STALE_AFTER`.
A loop that stops cleanly deletes its row, so scaling a role down to zero on purpose does not
leave the deployment unready, while a killed one leaves a stale row that reports the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from multimail.ids import isoformat, parse_datetime, utcnow
from multimail.store.db import Database
from multimail.store.tables import server_settings

__all__ = [
    "BEAT_EVERY",
    "FORGET_AFTER",
    "STALE_AFTER",
    "Heartbeat",
    "Readiness",
    "beat",
    "beat_until",
    "clear",
    "heartbeats",
    "readiness",
]

log = logging.getLogger(__name__)

PREFIX = "heartbeat:"
BEAT_EVERY = timedelta(seconds=5)
# Six missed beats: long enough for a busy loop or a slow commit, short enough to page someone.
STALE_AFTER = timedelta(seconds=30)
FORGET_AFTER = timedelta(days=1)


def _key(role: str, worker_id: str) -> str:
    return f"{PREFIX}{role}:{worker_id}"[:100]  # the key column is 100 characters


def beat(conn: Connection, role: str, worker_id: str, *, now: datetime | None = None) -> None:
    """Record that ``worker_id`` of ``role`` is alive at ``now``, in the caller's transaction."""
    row = {"key": _key(role, worker_id), "value": isoformat(now or utcnow())}
    dialect = conn.dialect.name
    if dialect == "postgresql":
        pg = postgresql.insert(server_settings).values(row)
        conn.execute(pg.on_conflict_do_update(index_elements=["key"], set_={"value": row["value"]}))
    elif dialect == "sqlite":
        lite = sqlite.insert(server_settings).values(row)
        conn.execute(
            lite.on_conflict_do_update(index_elements=["key"], set_={"value": row["value"]})
        )
    else:
        changed = conn.execute(
            update(server_settings)
            .where(server_settings.c.key == row["key"])
            .values(value=row["value"])
        )
        if not changed.rowcount:
            conn.execute(server_settings.insert().values(row))


def clear(conn: Connection, role: str, worker_id: str) -> None:
    """Forget a loop that stopped on purpose."""
    conn.execute(delete(server_settings).where(server_settings.c.key == _key(role, worker_id)))


def heartbeats(conn: Connection) -> dict[str, dict[str, datetime]]:
    """``{role: {worker id: last beat}}`` for every heartbeat row."""
    rows = conn.execute(
        select(server_settings.c.key, server_settings.c.value).where(
            server_settings.c.key.like(f"{PREFIX}%")
        )
    )
    found: dict[str, dict[str, datetime]] = {}
    for key, value in rows:
        role, _, worker_id = key[len(PREFIX) :].partition(":")
        try:
            found.setdefault(role, {})[worker_id] = parse_datetime(value)
        except ValueError:
            continue  # a mangled row says nothing about liveness
    return found


def _forget_old(conn: Connection, now: datetime) -> None:
    cutoff = now - FORGET_AFTER
    old = [
        _key(role, worker_id)
        for role, workers in heartbeats(conn).items()
        for worker_id, seen in workers.items()
        if seen < cutoff
    ]
    if old:
        conn.execute(delete(server_settings).where(server_settings.c.key.in_(old)))


@dataclass
class Readiness:
    """The verdict ``/readyz`` serves: ``checks`` maps a component to ``"ok"`` or a reason."""

    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(
            value == "ok" if isinstance(value, str) else all(v == "ok" for v in value.values())
            for value in self.checks.values()
        )


def readiness(
    db: Database, *, now: datetime | None = None, stale_after: timedelta = STALE_AFTER
) -> Readiness:
    """Is the database reachable, and has every expected worker role beaten recently?"""
    result = Readiness()
    try:
        with db.read() as conn:
            conn.execute(text("SELECT 1"))
            beats = heartbeats(conn)
    except Exception as exc:  # readiness reports any failure instead of raising
        result.checks["database"] = f"unavailable: {exc.__class__.__name__}"
        return result
    result.checks["database"] = "ok"
    moment = now or utcnow()
    workers: dict[str, str] = {}
    for role, seen in sorted(beats.items()):
        latest = max(seen.values())
        if moment - latest > FORGET_AFTER:
            continue
        age = (moment - latest).total_seconds()
        workers[role] = "ok" if age <= stale_after.total_seconds() else f"stale: {age:.0f} s"
    result.checks["workers"] = workers
    return result


class Heartbeat:
    """A loop's heartbeat: :meth:`tick` once per loop turn; it writes at most every ``every``.

    Writes run on a private thread and never block or fail the loop: while the database is
    away a beat is simply skipped, and readiness notices the gap.
    """

    def __init__(
        self,
        db: Database,
        role: str,
        worker_id: str,
        *,
        every: timedelta = BEAT_EVERY,
    ) -> None:
        self.db = db
        self.role = role
        self.worker_id = worker_id
        self.every = every
        self._last: datetime | None = None
        self._pending: Future[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"heartbeat-{role}")
        self._first = True

    def tick(self) -> None:
        """Beat if one is due and the previous write has finished."""
        now = utcnow()
        if self._pending is not None and not self._pending.done():
            return
        if self._last is not None and now - self._last < self.every:
            return
        self._last = now
        self._pending = self._pool.submit(self._write, now)

    def _write(self, now: datetime) -> None:
        try:
            with self.db.write() as conn:
                if self._first:
                    _forget_old(conn, now)
                beat(conn, self.role, self.worker_id, now=now)
            self._first = False
        except Exception as exc:
            log.warning("heartbeat of %s %s failed: %s", self.role, self.worker_id, exc)

    async def stop(self) -> None:
        """Delete this loop's row (a clean stop is not an outage) and release the thread."""
        pending = self._pending
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(pending)

        def forget() -> None:
            with self.db.write() as conn:
                clear(conn, self.role, self.worker_id)

        try:
            await asyncio.to_thread(forget)
        except Exception as exc:
            log.warning("could not clear the heartbeat of %s: %s", self.worker_id, exc)
        finally:
            self._pool.shutdown(wait=False)


async def beat_until(db: Database, role: str, worker_id: str, stop: asyncio.Event) -> None:
    """For loops that only wait (the SMTP server): beat every ``BEAT_EVERY`` until ``stop``."""
    pulse = Heartbeat(db, role, worker_id)
    try:
        while not stop.is_set():
            pulse.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), BEAT_EVERY.total_seconds())
    finally:
        await pulse.stop()
