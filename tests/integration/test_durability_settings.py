"""DUR-2: an acknowledged write is on disk — the database settings that promise it."""

from __future__ import annotations

from sqlalchemy import text

from multimail.services.context import Services


def test_database_runs_with_durable_commit_settings(services: Services) -> None:
    """SQLite: WAL + synchronous=FULL + foreign keys; PostgreSQL: synchronous_commit on."""
    with services.db.read() as conn:
        if services.db.dialect == "sqlite":
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        else:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
            assert conn.execute(text("SHOW fsync")).scalar() == "on"
