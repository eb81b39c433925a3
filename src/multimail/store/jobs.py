"""The job queue: a table with lock columns, claimed with ``FOR UPDATE SKIP LOCKED`` + leases.

A job is enqueued in the same transaction as the state change that needs it, so it exists
exactly when the change does. A worker claims a due job by setting ``locked_by`` and a lease
(``locked_until``); a worker that dies leaves a lease that expires, and another worker picks
the job up. On SQLite (one writer at a time) the claim is one ``BEGIN IMMEDIATE`` transaction.

Each commit is an fsync (``synchronous=FULL``), so batches are claimed in one statement and
:func:`claim_in` lets a caller start the claimed work in that same commit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, Text, and_, cast, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from multimail.ids import aware, new_id, utcnow
from multimail.store import fast
from multimail.store.db import Database
from multimail.store.tables import jobs

# Workers renew a lease every third of it while they work, so a short lease only shortens
# how long a dead worker's jobs wait for another worker.
DEFAULT_LEASE = timedelta(seconds=30)
DEFAULT_MAX_ATTEMPTS = 50


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    created_at: datetime


# Built once per dialect: a deduplicated job is one INSERT … ON CONFLICT DO NOTHING (no
# look-up first, no savepoint), which both databases decide on the unique ``dedupe_key``;
# PostgreSQL waits for a concurrent insert of the same key and then adds nothing.
_INSERT = fast.Compiled(jobs.insert())
_INSERT_DEDUPED = {
    "sqlite": fast.Compiled(
        sqlite_insert(jobs)
        .on_conflict_do_nothing(index_elements=[jobs.c.dedupe_key])
        .returning(jobs.c.id)
    ),
    "postgresql": fast.Compiled(
        postgresql_insert(jobs)
        .on_conflict_do_nothing(index_elements=[jobs.c.dedupe_key])
        .returning(jobs.c.id)
    ),
}


def _plain_json(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload as it will read back (datetimes and the like as strings)."""
    if all(type(k) is str and type(v) in (str, int, bool) for k, v in payload.items()):
        return dict(payload)  # the usual ids and counters: already plain
    plain: dict[str, Any] = json.loads(json.dumps(payload, default=str))
    return plain


def _record(
    kind: str,
    payload: Mapping[str, Any],
    now: datetime,
    *,
    run_at: datetime | None,
    dedupe_key: str | None,
    max_attempts: int,
) -> dict[str, Any]:
    """A new job's row: the one layout :func:`enqueue` and :func:`enqueue_many` write."""
    return {
        "id": new_id("job"),
        "kind": kind,
        "payload": _plain_json(payload),
        "status": "pending",
        "run_at": run_at or now,
        "attempts": 0,
        "max_attempts": max_attempts,
        "dedupe_key": dedupe_key,
        "created_at": now,
        "updated_at": now,
    }


def enqueue(
    conn: Connection,
    kind: str,
    payload: Mapping[str, Any],
    *,
    run_at: datetime | None = None,
    dedupe_key: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> str | None:
    """Add a job inside the caller's transaction; a repeated ``dedupe_key`` adds nothing."""
    record = _record(
        kind, payload, utcnow(), run_at=run_at, dedupe_key=dedupe_key, max_attempts=max_attempts
    )
    if dedupe_key is not None:
        statement = _INSERT_DEDUPED[conn.dialect.name]
        inserted = statement.first(conn, record)
        return None if inserted is None else str(inserted["id"])
    _INSERT.execute(conn, record)
    return str(record["id"])


def enqueue_many(
    conn: Connection,
    new_jobs: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    run_at: datetime | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> list[str]:
    """:func:`enqueue` for several ``(kind, payload)`` jobs in one statement; their ids.

    The rows are :func:`enqueue`'s; the statement is executed once with all of them (one
    prepared statement stepped per row on SQLite, one pipelined batch on PostgreSQL), which
    costs a quarter of the CPU of one literal multi-row ``VALUES`` that SQLAlchemy would
    compile anew for every batch size. No ``dedupe_key``: one statement cannot skip some rows
    and say which, so deduplicated jobs go through :func:`enqueue`.
    """
    now = utcnow()
    records = [
        _record(kind, payload, now, run_at=run_at, dedupe_key=None, max_attempts=max_attempts)
        for kind, payload in new_jobs
    ]
    _INSERT.executemany(conn, records)
    return [str(record["id"]) for record in records]


def claim(
    db: Database,
    worker: str,
    *,
    kinds: list[str] | None = None,
    limit: int = 10,
    lease: timedelta = DEFAULT_LEASE,
) -> list[Job]:
    """Take up to ``limit`` due jobs (or jobs whose lease ran out) for this worker."""
    with db.write() as conn:
        return claim_in(conn, worker, kinds=kinds, limit=limit, lease=lease)


# The payload as the text stored: decoded per row by :func:`payload_of`, so one row that is
# not JSON at all (SQLite stores any text) is quarantined instead of failing every fetch.
PAYLOAD_TEXT = cast(jobs.c.payload, Text).label("payload")


def payload_of(raw: str | None) -> dict[str, Any] | None:
    """A stored payload (:data:`PAYLOAD_TEXT`) as the object it must be; None when corrupt."""
    if raw is None:
        return None
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def is_due(now: Any) -> ColumnElement[bool]:
    """A job a worker may take at ``now`` (a time or a bind parameter): its time has come, and
    it is pending or its worker's lease has run out. The one definition every look and claim
    (here, the delivery worker's, the runner's) uses."""
    return and_(
        jobs.c.run_at <= now,
        or_(
            jobs.c.status == "pending",
            and_(jobs.c.status == "running", jobs.c.locked_until < now),
        ),
    )


def _due(kinds: list[str] | None, limit: int, now: datetime) -> Select[Any]:
    query = (
        select(*(PAYLOAD_TEXT if c is jobs.c.payload else c for c in jobs.c))
        .where(is_due(now))
        .order_by(jobs.c.run_at)
        .limit(limit)
    )
    if kinds:
        query = query.where(jobs.c.kind.in_(kinds))
    return query


def peek(conn: Connection, *, kinds: list[str] | None = None, limit: int = 10) -> list[Job]:
    """The jobs :func:`claim` would take now, without taking them (to prepare work early)."""
    rows = conn.execute(_due(kinds, limit, utcnow())).mappings().all()
    found: list[Job] = []
    for row in rows:
        payload = payload_of(row["payload"])
        if payload is not None:
            found.append(_job(row, payload, attempts=row["attempts"]))
    return found


def claim_in(
    conn: Connection,
    worker: str,
    *,
    kinds: list[str] | None = None,
    limit: int = 10,
    lease: timedelta = DEFAULT_LEASE,
) -> list[Job]:
    """:func:`claim` inside the caller's write transaction, so the caller can start the
    claimed work in the same commit (group commit)."""
    now = utcnow()
    query = _due(kinds, limit, now)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = conn.execute(query).mappings().all()
    if not rows:
        return []
    conn.execute(
        update(jobs)
        .where(jobs.c.id.in_([row["id"] for row in rows]))
        .values(
            status="running",
            locked_by=worker,
            locked_until=now + lease,
            attempts=jobs.c.attempts + 1,
            updated_at=now,
        )
    )
    claimed: list[Job] = []
    corrupt: list[str] = []
    for row in rows:
        payload = payload_of(row["payload"])
        if payload is not None:
            claimed.append(_job(row, payload, attempts=row["attempts"] + 1))
        else:
            corrupt.append(row["id"])
    if corrupt:
        # A corrupt row must not stop the queue: quarantine it and move on.
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(corrupt))
            .values(status="quarantined", last_error="payload is not an object")
        )
    return claimed


def _job(row: Any, payload: dict[str, Any], *, attempts: int) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        payload=payload,
        attempts=attempts,
        max_attempts=row["max_attempts"],
        created_at=aware(row["created_at"]),
    )


def complete(conn: Connection, job_id: str, worker: str) -> bool:
    """Mark done; False when this worker no longer holds the job (its lease was taken over)."""
    result = conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.locked_by == worker)
        .values(status="done", locked_by=None, locked_until=None, updated_at=utcnow())
    )
    return bool(result.rowcount)


def retry(conn: Connection, job_id: str, worker: str, *, run_at: datetime, error: str) -> None:
    conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.locked_by == worker)
        .values(
            status="pending",
            run_at=run_at,
            locked_by=None,
            locked_until=None,
            last_error=error[:2000],
            updated_at=utcnow(),
        )
    )


def fail(conn: Connection, job_id: str, worker: str, *, error: str) -> None:
    conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.locked_by == worker)
        .values(
            status="failed",
            locked_by=None,
            locked_until=None,
            last_error=error[:2000],
            updated_at=utcnow(),
        )
    )


def extend_lease(db: Database, job_id: str, worker: str, lease: timedelta = DEFAULT_LEASE) -> bool:
    return bool(extend_leases(db, [job_id], worker, lease))


def extend_leases(
    db: Database, job_ids: list[str], worker: str, lease: timedelta = DEFAULT_LEASE
) -> int:
    """Renew this worker's leases on ``job_ids`` in one commit; how many it still holds."""
    if not job_ids:
        return 0
    with db.write() as conn:
        result = conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(job_ids), jobs.c.locked_by == worker, jobs.c.status == "running")
            .values(locked_until=utcnow() + lease)
        )
    return int(result.rowcount)
