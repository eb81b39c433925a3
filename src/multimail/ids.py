"""Prefixed, sortable identifiers (ULIDs) and timestamps.

A ULID is 48 bits of milliseconds then 80 random bits, in Crockford base32: lexical order is
creation order, which keeps cursors and "newest first" lists index-friendly.
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import UTC, datetime

from multimail.errors import InvalidInput

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
PREFIXES = frozenset(
    {
        "acct",
        "mbx",
        "msg",
        "thr",
        "key",
        "whk",
        "evt",
        "dom",
        "con",
        "usr",
        "job",
        "sup",
        "att",
        "dlv",
        "apc",
        "ckp",
        "inb",
        "alw",
    }
)

_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def ulid() -> str:
    """A monotonic ULID: within one millisecond the random part counts up, so order holds."""
    global _last_ms, _last_rand
    with _lock:
        ms = int(time.time() * 1000)
        if ms <= _last_ms:
            ms = _last_ms
            _last_rand += 1
        else:
            _last_rand = int.from_bytes(os.urandom(10), "big") >> 1  # room to count up
        _last_ms = ms
        return _encode(ms, 10) + _encode(_last_rand & ((1 << 80) - 1), 16)


def new_id(prefix: str) -> str:
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    return f"{prefix}_{ulid().lower()}"


# The 26 characters after ``prefix_``, as ``new_id`` writes them: lower-case Crockford base32,
# the first at most 7 (a ULID is 128 bits, 130 bits of base32).
_ULID_TEXT = re.compile(r"[0-7][0-9a-hjkmnp-tv-z]{25}")
_SEQ_TEXT = re.compile(r"[0-9]{1,19}")
_SEQ_MAX = 2**63 - 1  # a BIGINT


def is_id(value: object, prefix: str) -> bool:
    """Whether ``value`` has the shape of an id ``new_id(prefix)`` makes (not that it exists)."""
    if not isinstance(value, str):
        return False
    head, sep, body = value.partition("_")
    return head == prefix and sep == "_" and _ULID_TEXT.fullmatch(body) is not None


def invalid_cursor() -> InvalidInput:
    return InvalidInput("cursor must be the next_cursor of a previous page", code="invalid_cursor")


def id_cursor(cursor: str | None, prefix: str) -> str | None:
    """A keyset cursor over ids (the last ``prefix_`` id of the previous page), or ``None``
    when none was given. Anything a list never issued is refused (422 ``invalid_cursor``)
    rather than compared as text, which would restart or end the list at a made-up point."""
    if not cursor:
        return None
    if not is_id(cursor, prefix):
        raise invalid_cursor()
    return cursor


def seq_cursor(cursor: str | None) -> int | None:
    """A keyset cursor over a BIGINT sequence (the last ``seq`` of the previous page)."""
    if not cursor:
        return None
    if _SEQ_TEXT.fullmatch(cursor) is None or int(cursor) > _SEQ_MAX:
        raise invalid_cursor()
    return int(cursor)


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(value: datetime | None) -> str | None:
    """UTC, ISO 8601 with ``Z`` and millisecond precision, as every API response uses."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse_datetime(value: str) -> datetime:
    """Parse ISO 8601; a value without a zone is taken as UTC. Raises ValueError."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError as exc:
        # 9999-12-31T23:59-05:00 is a valid ISO 8601 time past datetime's last day in UTC;
        # callers turn ValueError into their 422, an OverflowError would be a 500.
        raise ValueError(f"{value!r} is outside the years 1 to 9999 in UTC") from exc


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
