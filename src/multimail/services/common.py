"""Small helpers shared by the services: row conversion and lookups scoped to an account."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select
from sqlalchemy.sql.elements import ColumnElement

from multimail.ids import id_cursor, isoformat


def jsonable(row: Mapping[str, Any], *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A row as a JSON-ready dict: datetimes in ISO 8601 with ``Z``, secrets dropped."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in drop:
            continue
        out[key] = isoformat(value) if isinstance(value, datetime) else value
    return out


def clamp_limit(limit: int | None, *, default: int = 50, maximum: int = 200) -> int:
    if limit is None:
        return default
    return max(1, min(int(limit), maximum))


def oldest_first_page(
    conn: Connection,
    query: Select[Any],
    id_column: ColumnElement[str],
    *,
    prefix: str,
    cursor: str | None,
    limit: int | None,
    maximum: int,
    offset: int = 0,
) -> tuple[list[Mapping[str, Any]], str | None]:
    """One page of ``query`` in id order after ``cursor`` (the last ``prefix_`` id of the
    previous page; 422 for one never issued), ``offset`` rows skipped after it; the rows and
    the next page's cursor (None on the last page)."""
    size = clamp_limit(limit, maximum=maximum)
    after = id_cursor(cursor, prefix)
    if after:
        query = query.where(id_column > after)
    query = query.order_by(id_column).limit(size + 1).offset(offset)
    rows: list[Mapping[str, Any]] = [dict(r) for r in conn.execute(query).mappings()]
    page = rows[:size]
    return page, (str(page[-1]["id"]) if len(rows) > size else None)
