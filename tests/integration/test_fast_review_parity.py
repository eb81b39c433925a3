"""Review of store.fast: what it was checked to do exactly as conn.execute does.

The product's own compiled statements (the message, thread and job inserts) against
SQLAlchemy on every column type the send path writes, compared as the database stores them
(JSON ``null`` against SQL NULL, timestamps with and without a zone, bytes, floats,
booleans); driver errors (a unique violation inside a savepoint, a locked SQLite database, a
PostgreSQL connection killed under a transaction); threads using a statement for the first
time together.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import LargeBinary, Text, bindparam, cast, create_engine, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, PendingRollbackError

from multimail.ids import new_id
from multimail.services import sending, threads
from multimail.store import jobs as job_store
from multimail.store.db import Database
from multimail.store.fast import Compiled
from multimail.store.tables import accounts, events, jobs, mailboxes, messages
from multimail.store.tables import threads as threads_table
from tests.conftest import BACKEND, PG_ADMIN_URL

NOW = datetime(2026, 11, 21, 13, 5, 7, 123456, tzinfo=UTC)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    with database.write() as conn:
        conn.execute(
            accounts.insert(), {"id": "acct_p", "name": "p", "created_at": NOW, "updated_at": NOW}
        )
        conn.execute(
            mailboxes.insert(),
            {
                "id": "mbx_p",
                "account_id": "acct_p",
                "address": "p@example.com",
                "created_at": NOW,
                "updated_at": NOW,
            },
        )
    yield database
    database.dispose()


def _stored(db: Database, table: Any, row_id: str) -> dict[str, Any]:
    """The row as the database holds it: every column read back as text, so JSON ``null``
    and SQL NULL (both None once decoded) stay apart; bytes as bytes."""
    columns = [
        c if isinstance(c.type, LargeBinary) else cast(c, Text).label(c.name)
        for c in table.c
        if c.name != "id"
    ]
    with db.read() as conn:
        row = conn.execute(select(*columns).where(table.c.id == row_id)).mappings().one()
    return dict(row)


def _message(**values: Any) -> dict[str, Any]:
    return {
        "id": new_id("msg"),
        "account_id": "acct_p",
        "mailbox_id": "mbx_p",
        "thread_id": None,
        "direction": "outbound",
        "status": "queued",
        "test": False,
        "references": [],
        "to": [{"email": "a@example.com", "name": None}],
        "cc": [],
        "subject": "Hi",
        "markdown": "",
        "metadata": None,
        "scan_findings": None,
        "spam_score": None,
        "raw": None,
        "send_at": None,
        "created_at": NOW,
        "updated_at": NOW,
    } | values


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"metadata": {}, "scan_findings": [], "references": ["<a@b>"], "test": True},
        {"metadata": {"k": None, "n": [1, 2.5, "x"]}, "scan_findings": [{"rule": "r"}]},
        {"raw": b"\x00\xffMIME", "spam_score": 2.5, "headers": None, "auth_results": {}},
        {"send_at": NOW + timedelta(hours=1)},
        {"send_at": datetime(2026, 11, 21, 15, 0, tzinfo=timezone(timedelta(hours=2)))},
        {"send_at": datetime(2026, 11, 21, 15, 0)},
    ],
)
def test_the_message_insert_stores_what_sqlalchemy_stores(
    db: Database, values: dict[str, Any]
) -> None:
    fast, slow = _message(**values), _message(**values)
    with db.write() as conn:
        assert sending._INSERT_MESSAGE.execute(conn, fast) == 1
        conn.execute(messages.insert(), slow)
    assert _stored(db, messages, fast["id"]) == _stored(db, messages, slow["id"])


def test_the_thread_and_job_inserts_store_what_sqlalchemy_stores(db: Database) -> None:
    thread = {
        "account_id": "acct_p",
        "mailbox_id": "mbx_p",
        "external_id": None,
        "subject": "Hi",
        "normalized_subject": "hi",
        "message_count": 0,
        "created_at": NOW,
        "last_activity_at": NOW,
    }
    job = {
        "kind": "deliver",
        "payload": {"message_id": "msg_1", "none": None},
        "status": "pending",
        "run_at": NOW,
        "attempts": 0,
        "max_attempts": 50,
        "dedupe_key": None,
        "created_at": NOW,
        "updated_at": NOW,
    }
    with db.write() as conn:
        threads._INSERT.execute(conn, thread | {"id": "thr_fast"})
        conn.execute(threads_table.insert(), thread | {"id": "thr_slow"})
        job_store._INSERT.executemany(conn, [job | {"id": "job_fast"}])
        conn.execute(jobs.insert(), job | {"id": "job_slow"})
    assert _stored(db, threads_table, "thr_fast") == _stored(db, threads_table, "thr_slow")
    assert _stored(db, jobs, "job_fast") == _stored(db, jobs, "job_slow")


INSERT_EVENT = Compiled(events.insert())


def _event(event_id: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "account_id": "acct_p",
        "mailbox_id": None,
        "message_id": None,
        "type": "message.sent",
        "payload": {},
        "created_at": NOW,
    }


def _event_ids(db: Database) -> list[str]:
    with db.read() as conn:
        return list(conn.execute(select(events.c.id).order_by(events.c.id)).scalars())


def test_a_unique_violation_in_a_savepoint_leaves_the_transaction_usable(db: Database) -> None:
    with db.write() as conn:
        INSERT_EVENT.execute(conn, _event("evt_1"))
        with pytest.raises(IntegrityError), conn.begin_nested():
            INSERT_EVENT.execute(conn, _event("evt_2"))
            INSERT_EVENT.execute(conn, _event("evt_1"))
        INSERT_EVENT.execute(conn, _event("evt_3"))
    assert _event_ids(db) == ["evt_1", "evt_3"]


@pytest.mark.skipif(BACKEND != "sqlite", reason="driver savepoints are the SQLite batch's")
def test_a_unique_violation_in_a_shared_commit_savepoint_rolls_back_that_send_only(
    db: Database,
) -> None:
    with db.write() as conn:
        with sending._savepoint(conn):
            INSERT_EVENT.execute(conn, _event("evt_1"))
        with pytest.raises(IntegrityError), sending._savepoint(conn):
            INSERT_EVENT.execute(conn, _event("evt_2"))
            INSERT_EVENT.execute(conn, _event("evt_1"))
        with sending._savepoint(conn):
            INSERT_EVENT.execute(conn, _event("evt_3"))
    assert _event_ids(db) == ["evt_1", "evt_3"]


@pytest.mark.skipif(BACKEND != "sqlite", reason="SQLite's write lock")
def test_a_locked_sqlite_database_raises_sqlalchemys_operational_error(
    db: Database, db_url: str
) -> None:
    holder = sqlite3.connect(db_url.split("sqlite:///", 1)[1], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with db.engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute("PRAGMA busy_timeout=0")
            with pytest.raises(OperationalError, match="locked"), conn.begin():
                conn.exec_driver_sql("SELECT 1")  # a deferred BEGIN: the write below locks
                INSERT_EVENT.execute(conn, _event("evt_locked"))
            assert not conn.invalidated
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with db.write() as conn:
        INSERT_EVENT.execute(conn, _event("evt_after"))
    assert _event_ids(db) == ["evt_after"]


@pytest.mark.skipif(BACKEND != "postgres", reason="a PostgreSQL backend to terminate")
def test_a_killed_postgres_connection_is_invalidated_as_conn_execute_does(db: Database) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    by_id = Compiled(select(events.c.id).where(events.c.id == bindparam("id")))
    try:
        with db.engine.connect() as conn, conn.begin():
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with admin.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(OperationalError) as raised:
                by_id.first(conn, {"id": "evt_x"})
            assert raised.value.connection_invalidated
            assert conn.invalidated
            # As with conn.execute: nothing more runs until the dead transaction is ended.
            with pytest.raises(PendingRollbackError):
                by_id.first(conn, {"id": "evt_x"})
            conn.rollback()
    finally:
        admin.dispose()
    with db.write() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
        INSERT_EVENT.execute(conn, _event("evt_after"))
    assert _event_ids(db) == ["evt_after"]


def test_threads_using_a_statement_for_the_first_time_together_agree(db: Database) -> None:
    with db.write() as conn:
        INSERT_EVENT.executemany(conn, [_event(f"evt_{i}") for i in range(8)])
    fresh = Compiled(
        select(events.c.id, events.c.payload, events.c.created_at).where(
            events.c.id == bindparam("id")
        )
    )
    start = threading.Barrier(8)
    found: dict[int, Any] = {}

    def read(i: int) -> None:
        start.wait()
        with db.read() as conn:
            found[i] = fresh.first(conn, {"id": f"evt_{i}"})

    workers = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert found == {
        i: {"id": f"evt_{i}", "payload": {}, "created_at": found[i]["created_at"]} for i in range(8)
    }
    assert all(row["created_at"].replace(tzinfo=UTC) == NOW for row in found.values())
