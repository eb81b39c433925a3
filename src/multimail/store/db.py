"""Engine setup and transactions.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` — an acknowledged
write must survive power loss, which NORMAL does not promise — and foreign keys on. Writers
take the lock up front (``BEGIN IMMEDIATE``) so two writers never deadlock upgrading a read
lock. PostgreSQL keeps ``synchronous_commit`` on; writers that must be serialised (the audit
chain) take an advisory lock inside their transaction.

Case-insensitive search folds both sides with :class:`folded`: SQLite's ``lower()`` folds
ASCII only, so SQLite connections get ``mm_fold`` (Python's ``str.casefold``); PostgreSQL's
``lower()`` follows the database's LC_CTYPE, which is ASCII-only under the C locale, so it is
given the ICU root collation where the server has ICU.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Text, create_engine, event, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

__all__ = ["Database", "contains_folded", "folded"]

SQLITE_BUSY_TIMEOUT_S = 30
_ICU_COLLATION = "und-x-icu"  # PostgreSQL's ICU root locale, present when built with ICU


class folded(FunctionElement[str]):
    """Its one text argument folded for a case-insensitive comparison, in whatever way the
    database can fold all of Unicode; put it on both sides of the comparison."""

    type = Text()
    name = "folded"
    inherit_cache = True


@compiles(folded)
def _folded_lower(element: folded, compiler: SQLCompiler, **kw: Any) -> str:
    return f"lower({compiler.process(element.clauses, **kw)})"


@compiles(folded, "sqlite")
def _folded_sqlite(element: folded, compiler: SQLCompiler, **kw: Any) -> str:
    return f"mm_fold({compiler.process(element.clauses, **kw)})"


@compiles(folded, "postgresql")
def _folded_postgresql(element: folded, compiler: SQLCompiler, **kw: Any) -> str:
    argument = compiler.process(element.clauses, **kw)
    if getattr(compiler.dialect, "multimail_icu", False):
        return f'lower(({argument}) COLLATE "{_ICU_COLLATION}")'
    return f"lower({argument})"


def contains_folded(column: ColumnElement[Any], needle: str) -> ColumnElement[bool]:
    """``column`` holds ``needle`` as a literal substring (``%`` and ``_`` are not wildcards),
    ignoring case."""
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return folded(column).like(folded(literal(f"%{escaped}%")), escape="\\")


def _casefold(value: object) -> object:
    return value.casefold() if isinstance(value, str) else value


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
        dbapi_conn.create_function("mm_fold", 1, _casefold, deterministic=True)

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

    @event.listens_for(engine, "first_connect")
    def _on_first_connect(dbapi_conn: Any, _record: Any) -> None:
        # Runs before any statement is compiled for this engine, so :class:`folded` is
        # compiled one way for the engine's life. Tried rather than looked up: a server
        # built with ICU still refuses its collations in some encodings (SQL_ASCII).
        icu = True
        try:
            with dbapi_conn.cursor() as cursor:
                cursor.execute(f"SELECT lower('A' COLLATE \"{_ICU_COLLATION}\")")
        except Exception:
            icu = False
        dbapi_conn.rollback()
        engine.dialect.multimail_icu = icu  # type: ignore[attr-defined]

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
