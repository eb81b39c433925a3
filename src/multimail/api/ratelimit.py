"""Per-key request rate limit: a token bucket, answered with ``RateLimit-*`` headers.

Two stores, one arithmetic:

- ``MemoryBuckets`` keeps the buckets in this process. Several API processes each allow the
  configured rate, and a restart refills every bucket: fine for one process in development.
- ``DatabaseBuckets`` keeps them in ``rate_limit_buckets`` so every API process on the same
  database shares one bucket per key, and a restart changes nothing. Each request is one
  atomic ``INSERT … ON CONFLICT DO UPDATE … RETURNING`` (PostgreSQL row lock; SQLite inside
  ``BEGIN IMMEDIATE``), so two processes can never both spend the last token.

Refill is lazy: a bucket stores ``tokens`` at ``updated_at`` (epoch seconds, wall clock,
because monotonic clocks are not comparable across processes or machines) and the tokens at
any later moment follow from the rate. A refused request therefore leaves the row exactly as
it was, and a granted one writes ``updated_at = now``; reading ``updated_at == now`` back
tells the caller which branch ran without a second query. Each process hands out strictly
increasing ``now`` values, so only two processes hitting one bucket within the same
half-microsecond could misread a refusal as a grant (one extra request, never a lost one).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

from sqlalchemy import Connection, Float, text

from multimail.store import fast
from multimail.store.db import Database

Backend = Literal["auto", "memory", "database"]

# Sign-in throttling shares the table (``signin:`` buckets); API keys get their own prefix.
BUCKET_PREFIX = "api:"


@dataclass
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
            "RateLimit-Policy": f"{self.limit};w=60",
        }


class Limiter(Protocol):
    """What the request dependency needs: spend one token of ``key``'s bucket."""

    def take(self, key: str, now: float | None = None) -> Decision: ...


@dataclass(frozen=True)
class _Rate:
    per_minute: int
    burst: int

    @property
    def per_second(self) -> float:
        return self.per_minute / 60.0

    @property
    def capacity(self) -> float:
        return float(max(1, self.burst))

    def refill(self, tokens: float, since: float, now: float) -> float:
        # A clock that stepped backwards must not drain the bucket.
        return min(self.capacity, tokens + max(0.0, now - since) * self.per_second)

    def decision(self, allowed: bool, tokens_left: float) -> Decision:
        rate = self.per_second
        missing = self.capacity - tokens_left
        reset = math.ceil(missing / rate) if rate else 0
        if allowed:
            retry_after = 0
        elif rate:
            retry_after = max(1, math.ceil((1.0 - tokens_left) / rate))
        else:
            retry_after = 60
        return Decision(allowed, int(self.capacity), int(tokens_left), reset, retry_after)


class MemoryBuckets:
    """Buckets in this process only (see the module docstring for when that is enough)."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self._rate = _Rate(per_minute, burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (self._rate.capacity, now))
            tokens = self._rate.refill(tokens, last, now)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
        return self._rate.decision(allowed, tokens)


# The refilled amount is spelled out twice (PostgreSQL: LEAST/GREATEST, SQLite: min/max
# with several arguments) because the SET expressions all see the row as it was.
_UPSERT = """
INSERT INTO rate_limit_buckets (bucket, tokens, updated_at)
VALUES (:bucket, :capacity - 1, :now)
ON CONFLICT (bucket) DO UPDATE SET
  tokens = CASE WHEN {refilled} >= 1 THEN {refilled} - 1 ELSE rate_limit_buckets.tokens END,
  updated_at = CASE WHEN {refilled} >= 1 THEN :now ELSE rate_limit_buckets.updated_at END
RETURNING tokens, updated_at
"""
_REFILLED = {
    "postgresql": "LEAST(:capacity, rate_limit_buckets.tokens"
    " + GREATEST(0, :now - rate_limit_buckets.updated_at) * :rate)",
    "sqlite": "min(:capacity, rate_limit_buckets.tokens"
    " + max(0, :now - rate_limit_buckets.updated_at) * :rate)",
}


class DatabaseBuckets:
    """Buckets in ``rate_limit_buckets``, shared by every process on the database."""

    def __init__(self, db: Database, per_minute: int, burst: int) -> None:
        self._db = db
        self._rate = _Rate(per_minute, burst)
        refilled = _REFILLED["postgresql" if db.dialect == "postgresql" else "sqlite"]
        self._statement = fast.Compiled(
            text(_UPSERT.format(refilled=refilled)).columns(tokens=Float, updated_at=Float)
        )
        self._last_now = 0.0
        self._now_lock = threading.Lock()

    def _unique_now(self, now: float | None) -> float:
        with self._now_lock:
            candidate = time.time() if now is None else now
            if candidate <= self._last_now:
                candidate = math.nextafter(self._last_now, math.inf)
            self._last_now = candidate
            return candidate

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction that does not wait for the disk. A bucket lost to a power
        cut only refills early; waiting for fsync on every request would cost milliseconds
        (measured: SQLite 4 ms, PostgreSQL 0.9 ms per request; see docs/deploy.md)."""
        if self._db.dialect != "sqlite":
            with self._db.write() as conn:
                conn.execute(text("SET LOCAL synchronous_commit TO off"))
                yield conn
            return
        with self._db.writer_turn(), self._db.engine.connect() as conn:
            # Per connection and only outside a transaction (so on the driver connection,
            # which SQLAlchemy would otherwise wrap in BEGIN); restored before the pool
            # hands the connection to a writer that needs FULL.
            sqlite = conn.connection.driver_connection
            assert sqlite is not None
            sqlite.execute("PRAGMA synchronous=NORMAL")
            try:
                with conn.execution_options(immediate=True).begin():
                    yield conn
            finally:
                sqlite.execute("PRAGMA synchronous=FULL")

    def take(self, key: str, now: float | None = None) -> Decision:
        with self._transaction() as conn:
            return self.take_in(conn, key, now)

    def transaction(self) -> AbstractContextManager[Connection]:
        """The transaction :meth:`take` runs in, for a caller that reads in it first (the
        request's key lookup): one transaction per request instead of two."""
        return self._transaction()

    def take_in(self, conn: Connection, key: str, now: float | None = None) -> Decision:
        """:meth:`take` inside ``conn``'s transaction (one from :meth:`transaction`)."""
        now = self._unique_now(now)
        params = {
            "bucket": BUCKET_PREFIX + key,
            "capacity": self._rate.capacity,
            "now": now,
            "rate": self._rate.per_second,
        }
        row = self._statement.first(conn, params)
        assert row is not None  # an upsert with RETURNING always returns its row
        tokens, updated_at = float(row["tokens"]), float(row["updated_at"])
        if updated_at == now:
            return self._rate.decision(True, tokens)
        return self._rate.decision(False, self._rate.refill(tokens, updated_at, now))


def resolve_backend(backend: Backend) -> Literal["memory", "database"]:
    """``auto`` means the database: buckets must hold across processes and restarts on
    every installation, and the measured cost on SQLite is small (see docs/deploy.md)."""
    return "memory" if backend == "memory" else "database"


def make_limiter(db: Database, *, backend: Backend, per_minute: int, burst: int) -> Limiter:
    if resolve_backend(backend) == "memory":
        return MemoryBuckets(per_minute, burst)
    return DatabaseBuckets(db, per_minute, burst)


# The name other modules and tests have imported since the in-memory limiter was the only one.
TokenBucketLimiter = MemoryBuckets
