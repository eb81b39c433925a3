"""bench/bench_delivery.py runs end to end on a handful of messages (the issue's yardstick)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BACKEND

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_delivery.py"

# The bench always runs on its own embedded SQLite database: one leg is enough.
pytestmark = pytest.mark.skipif(BACKEND != "sqlite", reason="the bench does not use the test DB")


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--messages", "4", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_latency_zero_skips_the_latency_phase() -> None:
    # Used to crash: the latency phase queued an empty list, an INSERT ... DEFAULT VALUES.
    out = _run("--latency", "0")
    assert "MultiMail signed deliveries (full path)" in out
    assert "deliver_now latency" not in out


def test_latency_phase_reports_percentiles() -> None:
    out = _run("--latency", "2", "--batch", "2", "--pipelines", "1")
    assert "deliver_now latency over 2:" in out
