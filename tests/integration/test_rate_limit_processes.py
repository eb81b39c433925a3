"""API-3: the per-key request rate limit holds across API processes and across restarts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from multimail.api.ratelimit import DatabaseBuckets, MemoryBuckets, make_limiter
from multimail.config import Settings
from multimail.services import accounts
from multimail.services.context import Services
from multimail.testing.processes import ServeProcess


@contextmanager
def api_process(settings: Settings, *, burst: int) -> Iterator[str]:
    """``multimail serve --role api`` on a free port; its base URL; SIGTERM at the end."""
    # No refill during the test: every token spent stays spent.
    with ServeProcess(
        settings,
        "api",
        settings.data_dir.parent,
        rate_limit_per_minute=1,
        rate_limit_burst=burst,
    ) as proc:
        proc.wait_ready(30)
        yield proc.base_url


def test_two_api_processes_share_one_bucket_and_a_restart_keeps_it(
    settings: Settings, boot: accounts.Bootstrap
) -> None:
    """Two `serve --role api` processes on one database allow the burst once between them,
    not once each; a process started afterwards still refuses with 429 and Retry-After."""
    burst = 6
    headers = {"Authorization": f"Bearer {boot.agent_key}"}
    with (
        api_process(settings, burst=burst) as first,
        api_process(settings, burst=burst) as second,
    ):
        codes = []
        for i in range(2 * burst):
            base = first if i % 2 == 0 else second
            codes.append(httpx.get(f"{base}/v1/mailboxes", headers=headers).status_code)
        assert codes.count(200) == burst, codes
        assert codes[burst:] == [429] * burst, codes
        # Another key has its own bucket.
        other = {"Authorization": f"Bearer {boot.admin_key}"}
        assert httpx.get(f"{second}/v1/mailboxes", headers=other).status_code == 200
    with api_process(settings, burst=burst) as restarted:
        refused = httpx.get(f"{restarted}/v1/mailboxes", headers=headers)
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Remaining"] == "0"


def test_concurrent_takes_from_two_limiters_never_overspend(services: Services) -> None:
    """Two limiters on one database (as two processes would hold), 8 threads each hammering
    one key: exactly `burst` requests are granted, no more, whatever the interleaving."""
    burst = 25
    limiters = [DatabaseBuckets(services.db, per_minute=1, burst=burst) for _ in range(2)]
    granted: list[bool] = []
    lock = threading.Lock()

    def hammer(limiter: DatabaseBuckets) -> None:
        for _ in range(10):
            allowed = limiter.take("key_shared").allowed
            with lock:
                granted.append(allowed)

    threads = [threading.Thread(target=hammer, args=(limiters[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 80
    assert granted.count(True) == burst


def test_refill_follows_the_rate_and_caps_at_the_burst(services: Services) -> None:
    """A drained bucket refills at per_minute/60 tokens a second, never beyond the burst,
    and a refusal says how long to wait."""
    limiter = DatabaseBuckets(services.db, per_minute=60, burst=3)
    start = 1_000_000.0
    assert [limiter.take("k", now=start + i * 1e-3).allowed for i in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    refused = limiter.take("k", now=start + 0.01)
    assert not refused.allowed and refused.retry_after == 1
    assert refused.headers()["RateLimit-Remaining"] == "0"
    assert limiter.take("k", now=start + 1.5).allowed
    # Ten minutes idle: the bucket holds the burst, not 600 tokens.
    later = [limiter.take("k", now=start + 600 + i * 1e-3).allowed for i in range(4)]
    assert later == [True, True, True, False]


@hypothesis_settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=40),
    per_minute=st.integers(min_value=1, max_value=600),
    burst=st.integers(min_value=1, max_value=10),
)
def test_database_and_memory_buckets_agree(
    services: Services, gaps: list[float], per_minute: int, burst: int
) -> None:
    """For any request timing, the shared bucket grants exactly what the in-process one
    grants: moving the bucket into the database changes where it lives, not the rule."""
    key = f"agree-{time.monotonic_ns()}"
    memory = MemoryBuckets(per_minute, burst)
    shared = DatabaseBuckets(services.db, per_minute, burst)
    now = 2_000_000.0
    for gap in gaps:
        now += gap + 1e-3
        expected = memory.take(key, now=now)
        got = shared.take(key, now=now)
        assert (got.allowed, got.remaining) == (expected.allowed, expected.remaining)
        assert got.retry_after == expected.retry_after


def test_auto_backend_is_the_database(services: Services) -> None:
    """`auto` keeps buckets in the database on SQLite and PostgreSQL alike (so they survive
    restarts); `memory` is an explicit choice."""
    assert isinstance(
        make_limiter(services.db, backend="auto", per_minute=1, burst=1), DatabaseBuckets
    )
    memory = make_limiter(services.db, backend="memory", per_minute=1, burst=1)
    assert isinstance(memory, MemoryBuckets)
