"""Key material every node of one deployment must share, kept in the database.

The approval-link secret, the default domain's DKIM key and the identity signing keys used
to live in each node's data directory, so a second API or worker node generated keys of its
own: links minted by a worker failed on an API node, and mail signed by one worker did not
verify against the keys another node published. Every node already shares the database, so
the first node to need a key creates it there and every other node reads the same one.

Rows live in ``server_settings`` under names starting ``key:``; values are text (hex, PEM,
JSON). The data directory's old files, when present, are imported on first use, so an
existing single-node install keeps the keys it has already published.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from multimail.store.db import Database
from multimail.store.tables import server_settings

PREFIX = "key:"


def _name(name: str) -> str:
    return f"{PREFIX}{name}"


def get(conn: Connection, name: str) -> str | None:
    found = conn.execute(
        select(server_settings.c.value).where(server_settings.c.key == _name(name))
    ).scalar_one_or_none()
    return None if found is None else str(found)


def get_for_update(conn: Connection, name: str) -> str | None:
    """Read ``name`` and hold it until the transaction ends (PostgreSQL row lock; SQLite
    writers already hold the database lock)."""
    query = select(server_settings.c.value).where(server_settings.c.key == _name(name))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    found = conn.execute(query).scalar_one_or_none()
    return None if found is None else str(found)


def items(conn: Connection, prefix: str) -> dict[str, str]:
    """Every key whose name starts with ``prefix``, by name (without the store's prefix)."""
    rows = conn.execute(
        select(server_settings.c.key, server_settings.c.value).where(
            server_settings.c.key.like(f"{_name(prefix)}%")
        )
    )
    return {str(r.key)[len(PREFIX) :]: str(r.value) for r in rows}


def add(conn: Connection, name: str, value: str) -> None:
    """Insert ``name``; an existing one is an IntegrityError (keys are never overwritten by
    accident — :func:`replace` says it on purpose)."""
    conn.execute(insert(server_settings).values(key=_name(name), value=value))


def replace(conn: Connection, name: str, value: str) -> None:
    conn.execute(
        update(server_settings).where(server_settings.c.key == _name(name)).values(value=value)
    )


def create_once(db: Database, name: str, make: Callable[[], str]) -> str:
    """The value stored under ``name``; the first caller anywhere stores ``make()``.

    Two nodes starting together may both call ``make()``; one insert wins and both return
    the winner's value.
    """
    with db.read() as conn:
        found = get(conn, name)
    if found is not None:
        return found
    value = make()
    try:
        with db.write() as conn:
            found = get(conn, name)
            if found is not None:
                return found
            add(conn, name, value)
    except IntegrityError:
        with db.read() as conn:
            found = get(conn, name)
        if found is None:
            raise
        return found
    return value
