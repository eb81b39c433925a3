"""Review of store.fast: a value a caller gives must reach the statement as with conn.execute.

``conn.execute(update(t).where(...).values(...), params)`` compiles with the parameters'
keys, so a key naming a column of ``t`` that ``.values()`` does not mention is added to the
SET clause. A :class:`Compiled` UPDATE is compiled without the caller's keys: the same
dictionary runs, reports its row, and the value is silently not written. Nobody passes such
a key today (keys.py's ``_TOUCH`` uses ``key_id``/``used_at``), but the next UPDATE moved to
store.fast in that idiom (``{"message_id": ..., "status": "sent"}``) would lose its status
change without an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, select, update

from multimail.store.db import Database
from multimail.store.fast import Compiled
from multimail.store.tables import jobs

NOW = datetime(2026, 11, 21, 13, 5, 7, tzinfo=UTC)

RETRY = update(jobs).where(jobs.c.id == bindparam("job_id")).values(attempts=jobs.c.attempts + 1)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    with database.write() as conn:
        conn.execute(
            jobs.insert(),
            [
                {
                    "id": job_id,
                    "kind": "deliver",
                    "payload": {},
                    "run_at": NOW,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for job_id in ("job_fast", "job_slow")
            ],
        )
    yield database
    database.dispose()


def _stored(db: Database, job_id: str) -> tuple[int, str | None]:
    with db.read() as conn:
        row = conn.execute(
            select(jobs.c.attempts, jobs.c.last_error).where(jobs.c.id == job_id)
        ).one()
    return row.attempts, row.last_error


def test_an_update_writes_a_column_the_caller_names_as_conn_execute_does(db: Database) -> None:
    params = {"last_error": "421 try later"}
    with db.write() as conn:
        conn.execute(RETRY, {"job_id": "job_slow", **params})
        assert Compiled(RETRY).execute(conn, {"job_id": "job_fast", **params}) == 1
    assert _stored(db, "job_slow") == (1, "421 try later")
    assert _stored(db, "job_fast") == _stored(db, "job_slow")
