"""The benches say how fast this machine is against issue #3's, and the report shows it.

Issue #3's absolute targets (deliveries/s) were set on a machine that signs RSA-2048 about
4,700/s; ``bench/_support.machine_speed`` measures this one the same way, the send and
delivery benches print it, and ``bench/report.py`` puts it under their sections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BACKEND
from tests.integration.bench_support import run_bench

# Neither uses the test database: one leg is enough.
pytestmark = pytest.mark.skipif(BACKEND != "sqlite", reason="no database involved")

# As bench_send saves them (MachineSpeed.figures) for a machine at half the issue's speed.
HALF_SPEED = {
    "rsa2048_per_s": 2350.0,
    "ed25519_per_s": 18500.0,
    "speed": 0.5,
    "issue_rsa2048_per_s": 4700.0,
    "issue_ed25519_per_s": 37000.0,
    "issue_deliveries_per_s_here": 500.0,
}
HALF_SPEED_LINE = (
    "machine: RSA-2048 2,350/s, Ed25519 18,500/s (the issue's machine: 4,700/s, 37,000/s)"
    " → 0.50 of its speed; 1,000 deliveries/s there ≈ 500/s here"
)
NOTE = "RSA-2048 2,350/s, Ed25519 18,500/s (the issue's machine: 4,700/s, 37,000/s)"


def _python(code: str) -> str:
    return run_bench("-c", code)


def _saved(name: str, stdout: str, figures: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": name,
        "args": [],
        "returncode": 0,
        "seconds": 1.0,
        "stdout": stdout,
        "stderr": "",
        "figures": figures,
        "profile": "quick",
        "started": "2025-01-01 00:00 UTC",
        "load_before": "0.00 0.00 0.00",
        "load_after": "0.00 0.00 0.00",
        "commit": "abc1234",
    }


def _render(tmp_path: Path, *results: dict[str, Any]) -> str:
    directory = tmp_path / "results"
    directory.mkdir()
    for result in results:
        (directory / f"{result['name']}.json").write_text(json.dumps(result))
    output = tmp_path / "performance.md"
    run_bench("report.py", "--render-only", "--results", str(directory), "--output", str(output))
    return output.read_text()


def _section(report: str, title: str) -> str:
    return report.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


SEND = "Sending through the API"
DELIVERY = "Outbound delivery"
DELIVERY_OUTPUT = """\
messages: 10, database: sqlite, baseline concurrency: 8, batch: 64 x 2 pipelines, poll 0.2 s, \
compose processes: 1, sink (own process) accepted: 30, load average: 0.10
{machine}raw aiosmtplib sends (same signed bytes, a connection per message):   1000.0 msg/s   \
0.500 CPU ms/msg
MultiMail signed deliveries (full path):                                 600.0 msg/s   \
1.200 CPU ms/msg
"""


def test_machine_speed_measures_both_signatures_against_the_issues_machine() -> None:
    """Both rates are measured, the speed is RSA's against the issue's 4,700/s, and the
    printed line carries the figures and the issue's target scaled to this machine."""
    out = _python(
        "import json\n"
        "from _support import machine_speed\n"
        "m = machine_speed(seconds=0.1, rounds=2)\n"
        "print(json.dumps({'figures': m.figures(), 'line': m.line()}))\n"
    )
    found = json.loads(out)
    figures, line = found["figures"], found["line"]
    assert figures["rsa2048_per_s"] > 0
    assert figures["ed25519_per_s"] > 0
    assert figures["speed"] == pytest.approx(figures["rsa2048_per_s"] / 4700)
    assert figures["issue_deliveries_per_s_here"] == pytest.approx(1000 * figures["speed"])
    assert line.startswith(f"machine: RSA-2048 {figures['rsa2048_per_s']:,.0f}/s, Ed25519 ")
    assert "(the issue's machine: 4,700/s, 37,000/s)" in line
    assert line.endswith(f"≈ {figures['issue_deliveries_per_s_here']:,.0f}/s here")


def test_machine_line_reads_back_from_saved_figures() -> None:
    """A saved bench's ``machine`` figures render as the line the bench printed."""
    out = _python(f"from _support import machine_line\nprint(machine_line({HALF_SPEED!r}))\n")
    assert out.strip() == HALF_SPEED_LINE


def test_report_shows_the_machine_under_the_send_and_delivery_sections(tmp_path: Path) -> None:
    """bench_send's ``machine`` figures and bench_delivery's printed line each appear under
    their own section, and the delivery figures beside it are still read."""
    send = _saved(
        "send",
        HALF_SPEED_LINE + "\n",
        {"machine": HALF_SPEED, "clients": 8, "baseline_per_s": 100.0, "sends": {"x": 60.0}},
    )
    delivery = _saved("delivery", DELIVERY_OUTPUT.format(machine=HALF_SPEED_LINE + "\n"), None)
    report = _render(tmp_path, send, delivery)
    assert "could not read" not in report
    for title in (SEND, DELIVERY):
        assert NOTE in _section(report, title)
        assert "1,000 deliveries/s there ≈ 500/s here" in _section(report, title)
    assert "| 600 /s | 1,000 /s | 0.60x |" in _section(report, DELIVERY)


def test_report_renders_results_saved_before_benches_measured_the_machine(
    tmp_path: Path,
) -> None:
    """Older saved results (no machine line or figures) render as before, without a note."""
    send = _saved("send", "", {"clients": 8, "baseline_per_s": 100.0, "sends": {"x": 60.0}})
    delivery = _saved("delivery", DELIVERY_OUTPUT.format(machine=""), None)
    report = _render(tmp_path, send, delivery)
    assert "could not read" not in report
    for title in (SEND, DELIVERY):
        assert "the issue's machine" not in _section(report, title)
    assert "| 600 /s | 1,000 /s | 0.60x |" in _section(report, DELIVERY)


def test_report_shows_deliveries_against_the_machines_ceiling(tmp_path: Path) -> None:
    """The delivery bench's ceiling line becomes a row beside the deliveries/s; output saved
    before the bench printed it renders without that row (the test above)."""
    ceiling = (
        "ceiling here: 2 CPUs / (RSA-2048 signature 0.500 + raw reused send 0.300"
        " + sink 0.200 CPU ms) = 2,000 deliveries/s with nothing stored\n"
    )
    delivery = _saved("delivery", DELIVERY_OUTPUT.format(machine="") + ceiling, None)
    section = _section(_render(tmp_path, delivery), DELIVERY)
    assert "vs this machine's ceiling" in section
    assert "| 600 /s | 2,000 /s | 0.30x |" in section
