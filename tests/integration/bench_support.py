"""Running a benchmark script the way a developer does, for the tests that check it works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def run_bench(*args: str) -> str:
    """``python ARGS…`` in ``bench/`` (benches import their helpers from there); its stdout,
    after checking it exited 0 (else the end of its stderr is the failure)."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=BENCH_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
