"""Engine setup and transactions.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` — an acknowledged
write must survive power loss, which NORMAL does not promise — and foreign keys on. Writers
take the lock up front (``BEGIN IMMEDIATE``) so two writers never deadlock upgrading a read
lock. PostgreSQL keeps ``synchronous_commit`` on; writers that must be serialised (the audit
chain) take an advisory lock inside their transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.pool import NullPool

SQLITE_BUSY_TIMEOUT_S = 30


def _sqlite_engine(url: str) -> Engine:
    path = url.split("sqlite:///", 1)[1] if "sqlite:///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        poolclass=NullPool if path in ("", ":memory:") else None,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event below issue BEGIN itself (pysqlite's own is too late).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _postgres_engine(url: str) -> Engine:
    engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO on")
            cursor.execute("SET TIME ZONE 'UTC'")
        dbapi_conn.commit()

    return engine


class Database:
    """The one handle services use: ``with db.write() as conn`` is one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = _sqlite_engine(url) if self.is_sqlite else _postgres_engine(url)
        # Re-entrant: a writer that (wrongly) nests another write keeps the old behaviour
        # (SQLite's busy timeout), not a deadlock on this lock.
        self._writers = threading.RLock()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def writer_turn(self) -> Iterator[None]:
        """On SQLite, this process's writers take turns on a Python lock around their
        transaction (BEGIN IMMEDIATE to COMMIT).

        SQLite has one write lock per database; a writer that finds it taken sleeps in the
        busy handler (1, 2, 5, 10 … 100 ms steps) and may oversleep the holder by
        milliseconds. Waiting here instead wakes the next writer of this process the moment
        the last one commits; other processes still meet at SQLite's lock as before. The
        wait is bounded by the busy timeout, after which SQLite's own waiting takes over, so
        a writer stuck holding the lock cannot hang the others for longer than before.
        PostgreSQL: no turns (row locks serialise what must be serialised).
        """
        if not self.is_sqlite:
            yield
            return
        got = self._writers.acquire(timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            yield
        finally:
            if got:
                self._writers.release()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A read-write transaction; commits on success, rolls back on any exception."""
        with (
            self.writer_turn(),
            self.engine.connect().execution_options(immediate=True) as conn,
            conn.begin(),
        ):
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()
