"""bench/bench_transport.py (our SMTP hand-over against bare aiosmtplib) runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BACKEND
from tests.integration.bench_support import run_bench

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_transport.py"

# The bench uses no database: one leg is enough.
pytestmark = pytest.mark.skipif(BACKEND != "sqlite", reason="the bench uses no database")


def test_transport_bench_reports_both_sides_and_their_ratio() -> None:
    """A few messages per side: every one reaches the sink and both figures are printed."""
    stdout = run_bench(str(BENCH), "--messages", "20", "--concurrency", "2", "--rounds", "1")
    assert "bare aiosmtplib sendmail, reused" in stdout
    assert "RelayTransport.deliver, pooled" in stdout
    assert "ratio ours / bare CPU per message:" in stdout
