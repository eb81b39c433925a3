"""Small helpers shared by the services: row conversion and lookups scoped to an account."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from multimail.ids import isoformat


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
