"""Review of store.fast: statement listeners and SQL logging as conn.execute gives them.

store.fast promises the ``before_cursor_execute``/``after_cursor_execute`` listeners of
conn.execute. Three differences remain:

- a listener's exception is raised outside the ``try`` that hands driver errors to
  ``Connection._handle_dbapi_exception``: a driver error raised there (fault injection,
  a proxy or tracing hook) reaches callers as ``sqlite3``/``psycopg``'s own class, not
  ``sqlalchemy.exc.OperationalError`` (what services/inbound.py catches), and the cursor
  is left open;
- a listener registered with ``retval=True`` (SQLAlchemy's documented way to rewrite a
  statement or its parameters: SQL comments for tracing, parameter redaction) has its
  return value ignored;
- ``echo``/``sqlalchemy.engine`` INFO logging does not show the statements, so an operator
  tracing SQL does not see the message, audit, event and job inserts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import bindparam, event, select
from sqlalchemy.exc import OperationalError

from multimail.store.db import Database
from multimail.store.fast import Compiled
from multimail.store.tables import jobs

NOW = datetime(2026, 11, 21, 13, 5, 7, tzinfo=UTC)

JOB_BY_ID = select(jobs.c.id, jobs.c.kind).where(jobs.c.id == bindparam("job_id"))
FAST_JOB_BY_ID = Compiled(JOB_BY_ID)
INSERT_JOB = Compiled(jobs.insert())


def _job(job_id: str, kind: str = "deliver") -> dict[str, Any]:
    return {
        "id": job_id,
        "kind": kind,
        "payload": {},
        "run_at": NOW,
        "created_at": NOW,
        "updated_at": NOW,
    }


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    with database.write() as conn:
        conn.execute(jobs.insert(), [_job("job_a", "a"), _job("job_b", "b")])
    yield database
    database.dispose()


def test_a_driver_error_raised_by_a_statement_listener_is_sqlalchemys(db: Database) -> None:
    driver_error = db.engine.dialect.loaded_dbapi.OperationalError

    def refuse(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM jobs" in statement:
            raise driver_error("injected: the disk went away")

    event.listen(db.engine, "before_cursor_execute", refuse)
    try:
        with db.read() as conn, pytest.raises(OperationalError):
            conn.execute(JOB_BY_ID, {"job_id": "job_a"})
        with db.read() as conn, pytest.raises(OperationalError):
            FAST_JOB_BY_ID.first(conn, {"job_id": "job_a"})
    finally:
        event.remove(db.engine, "before_cursor_execute", refuse)


def test_a_retval_listener_rewrites_fast_statements_too(db: Database) -> None:
    def redirect(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any
    ) -> tuple[str, Any]:
        # Rewrites the parameters the driver gets: SQLite's are a tuple, psycopg's a dict.
        if isinstance(parameters, dict):
            parameters = {k: "job_b" if v == "job_a" else v for k, v in parameters.items()}
        elif isinstance(parameters, tuple):
            parameters = tuple("job_b" if v == "job_a" else v for v in parameters)
        return statement, parameters

    event.listen(db.engine, "before_cursor_execute", redirect, retval=True)
    try:
        with db.read() as conn:
            slow = conn.execute(JOB_BY_ID, {"job_id": "job_a"}).mappings().one()
            fast = FAST_JOB_BY_ID.first(conn, {"job_id": "job_a"})
    finally:
        event.remove(db.engine, "before_cursor_execute", redirect)
    assert slow["kind"] == "b"
    assert fast == dict(slow)


def test_sql_logging_shows_fast_statements(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
        with db.write() as conn:
            conn.execute(jobs.insert(), _job("job_slow"))
        slow = [r.getMessage() for r in caplog.records if "INSERT INTO jobs" in r.getMessage()]
        caplog.clear()
        with db.write() as conn:
            INSERT_JOB.execute(conn, _job("job_fast"))
        fast = [r.getMessage() for r in caplog.records if "INSERT INTO jobs" in r.getMessage()]
    assert len(slow) == 1
    assert fast == slow
