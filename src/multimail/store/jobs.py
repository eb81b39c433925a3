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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    String,
    Text,
    and_,
    bindparam,
    cast,
    or_,
    select,
    type_coerce,
    update,
)
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
# created_at as the driver hands it over (a datetime from PostgreSQL, the stored text from
# SQLite, which keeps any text in any column), decoded per row by :func:`read`: decoded by
# SQLAlchemy, one damaged row made every claim raise.
CREATED_AT_RAW = type_coerce(jobs.c.created_at, String).label("created_at")
#: What a claim or a peek reads of a job: what :func:`read` and the lost-worker rule need.
CLAIM_COLUMNS = (
    jobs.c.id,
    jobs.c.kind,
    jobs.c.status,
    PAYLOAD_TEXT,
    jobs.c.attempts,
    jobs.c.max_attempts,
    CREATED_AT_RAW,
)

#: Per kind, called in the claim's transaction with that kind's jobs :func:`give_up` failed,
#: for the state their work left half-done (see :func:`on_lost`).
LostHandler = Callable[[Connection, str, Sequence[Job]], None]
LOST_HANDLERS: dict[str, LostHandler] = {}


def on_lost(kind: str) -> Callable[[LostHandler], LostHandler]:
    """Decorator: ``handler(conn, worker, jobs)`` settles what jobs of ``kind`` whose workers
    were lost on their last attempt leave behind (e.g. a message left ``sending``)."""

    def decorate(handler: LostHandler) -> LostHandler:
        LOST_HANDLERS[kind] = handler
        return handler

    return decorate


def payload_of(raw: str | None) -> dict[str, Any] | None:
    """A stored payload (:data:`PAYLOAD_TEXT`) as the object it must be; None when corrupt."""
    if raw is None:
        return None
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def read(
    row: Mapping[Any, Any], *, claimed: bool = False, payload: dict[str, Any] | None = None
) -> Job | str:
    """The job a row read with :data:`CLAIM_COLUMNS` holds, or which of its columns is
    corrupt. ``claimed``: its attempts count the claim taking it now. ``payload``: the one
    the caller writes over the stored one (not read then)."""
    if payload is None:
        payload = payload_of(row["payload"])
        if payload is None:
            return "payload is not an object"
    attempts, max_attempts = row["attempts"], row["max_attempts"]
    if type(attempts) is not int:
        return "attempts is not a number"
    if type(max_attempts) is not int:
        return "max_attempts is not a number"
    created_at = row["created_at"]
    if not isinstance(created_at, datetime):
        try:
            # What SQLAlchemy's SQLite DateTime does with the text it stored.
            created_at = datetime.fromisoformat(created_at)
        except (TypeError, ValueError):
            return "created_at is not a time"
    return Job(
        id=row["id"],
        kind=row["kind"],
        payload=payload,
        attempts=attempts + 1 if claimed else attempts,
        max_attempts=max_attempts,
        created_at=aware(created_at),
    )


def is_lost(row: Mapping[Any, Any]) -> bool:
    """A due row (:func:`is_due`) that :func:`read` decoded whose worker was lost (running,
    its lease ran out) on its last attempt: a job that kills its worker (OOM, a crash in a C
    extension) would otherwise be taken, and kill the next one, for ever."""
    return bool(row["status"] == "running" and row["attempts"] >= row["max_attempts"])


def is_due(now: Any) -> ColumnElement[bool]:
    """A job a worker may take at ``now`` (a time or a bind parameter): its time has come, and
    it is pending or its worker's lease has run out. The one definition every look and claim
    (here, the delivery worker's, the runner's) uses; a claim fails rather than takes a job
    whose lost worker had its last attempt (:func:`is_lost`, :func:`take`)."""
    return and_(
        jobs.c.run_at <= now,
        or_(
            jobs.c.status == "pending",
            and_(jobs.c.status == "running", jobs.c.locked_until < now),
        ),
    )


def _due(kinds: list[str] | None, limit: int, now: datetime) -> Select[Any]:
    query = select(*CLAIM_COLUMNS).where(is_due(now)).order_by(jobs.c.run_at).limit(limit)
    if kinds:
        query = query.where(jobs.c.kind.in_(kinds))
    return query


def peek(conn: Connection, *, kinds: list[str] | None = None, limit: int = 10) -> list[Job]:
    """The jobs :func:`claim` would take now, without taking them (to prepare work early)."""
    rows = conn.execute(_due(kinds, limit, utcnow())).mappings().all()
    found: list[Job] = []
    for row in rows:
        job = read(row)
        if not isinstance(job, str) and not is_lost(row):
            found.append(job)
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
    return take(conn, worker, rows, now=now, lease=lease)


_TAKE = (
    update(jobs)
    .where(jobs.c.id.in_(bindparam("ids", expanding=True)))
    .values(
        status="running",
        locked_by=bindparam("worker"),
        locked_until=bindparam("until"),
        attempts=jobs.c.attempts + 1,
        updated_at=bindparam("now"),
    )
)


def take(
    conn: Connection,
    worker: str,
    rows: Sequence[Mapping[Any, Any]],
    *,
    now: datetime,
    lease: timedelta,
) -> list[Job]:
    """Claim for ``worker`` the due rows (read with :data:`CLAIM_COLUMNS`, locked by the
    caller's transaction) that may run; the jobs taken, their attempts counting this claim.

    The others are settled in the same transaction, so none can stop the queue: a row that
    cannot be decoded is quarantined, naming the column; a job whose worker was lost on its
    last attempt is failed (:func:`give_up`).
    """
    taken: list[Job] = []
    corrupt: dict[str, list[str]] = {}
    lost: list[Job] = []
    for row in rows:
        job = read(row, claimed=True)
        if isinstance(job, str):
            corrupt.setdefault(job, []).append(row["id"])
        elif is_lost(row):
            lost.append(replace(job, attempts=row["attempts"]))
        else:
            taken.append(job)
    if taken:
        ids = [job.id for job in taken]
        conn.execute(_TAKE, {"ids": ids, "worker": worker, "until": now + lease, "now": now})
    if corrupt:
        quarantine(conn, corrupt)
    if lost:
        give_up(conn, worker, lost)
    return taken


def quarantine(conn: Connection, corrupt: Mapping[str, Sequence[str]]) -> None:
    """Set aside the jobs of ``{why: [job ids]}``: a corrupt row must not stop the queue."""
    for error, ids in corrupt.items():
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(list(ids)))
            .values(status="quarantined", last_error=error, updated_at=utcnow())
        )


def give_up(conn: Connection, worker: str, lost: Sequence[Job]) -> None:
    """Fail, in the caller's (claiming) transaction, jobs whose worker was lost on their last
    attempt (``attempts`` as stored), and let each kind's :func:`on_lost` handler settle what
    they left half-done."""
    now = utcnow()
    for job in lost:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job.id)
            .values(
                status="failed",
                locked_by=None,
                locked_until=None,
                last_error=lost_error(job),
                updated_at=now,
            )
        )
    for kind in sorted({job.kind for job in lost}):
        handler = LOST_HANDLERS.get(kind)
        if handler is not None:
            handler(conn, worker, [job for job in lost if job.kind == kind])


def lost_error(job: Job) -> str:
    """Why :func:`give_up` failed ``job``."""
    return (
        f"its worker was lost (lease expired) on attempt {job.attempts} of "
        f"{job.max_attempts}; not run again"
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
