"""Run every benchmark with bounded settings and write one Markdown report (``bench/run``).

    bench/run            # the default profile, ~25 minutes on 2 cores (the reliability
                         # benches, load/crash/chaos, wait out worker leases)
    bench/run --quick    # smaller runs, ~10 minutes
    bench/run --full     # the issues' sizes: 1,000,000 stored messages and audit entries
    bench/run --full --only crash,scaleout    # stage a long run, a few benches at a time
    bench/run --render-only                   # rebuild the report from saved results

Each bench is its own process (so one crash or leak cannot skew the next) and prints its
figures beside a baseline measured in that same process. Figures come from the ``--json``
file a bench writes when it has that flag, otherwise from its printed text, read tolerantly.
Each bench's result (figures, printed text, arguments, profile, start time, load average
before and after, git commit) is saved as ``bench/results/<name>.json``, replacing that
bench's previous result; the report is rendered from the latest result of every bench, so a
partial run (``--only``) updates its own sections and keeps the others, each section saying
when, with which arguments and at what load it was measured. The report goes to stdout and
to ``docs/performance.md`` (``--output``), with the machine. The send and delivery sections
also say how fast the machine was against issue #3's, whose absolute targets (deliveries/s)
were set on another machine (each of those benches measures it before its run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _support import machine_line

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get(
    "MULTIMAIL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

# Arguments per bench: (quick, default, full) profile. The order is the report's.
ARGUMENTS: dict[str, tuple[str, str, str]] = {
    "dkim": ("--seconds 1", "--seconds 2", "--seconds 3"),
    "send": (
        "--seconds 2 --approvals 30",
        "--seconds 5 --approvals 100",
        "--seconds 10 --approvals 200",
    ),
    "inbound": ("--messages 1500", "--messages 4000", "--messages 10000"),
    "delivery": (
        "--messages 200 --latency 30",
        "--messages 1000 --latency 100 --batch 64 --compose-processes 1",
        "--messages 4000 --latency 200 --batch 64 --compose-processes 1",
    ),
    "webhooks": (
        "--events 100 --burst 500",
        "--events 300 --burst 1000",
        "--events 500 --burst 3000",
    ),
    "audit": (
        "--appends 100 --verify-entries 30000 --export-entries 50000",
        "--appends 400 --verify-entries 100000 --export-entries 200000",
        "--appends 400 --verify-entries 100000 --export-entries 1000000",
    ),
    "scale": (
        "--sizes 10000 --samples 50 --worker-messages 300",
        "--sizes 10000 --samples 200 --worker-messages 1000",
        "--sizes 10000,1000000 --samples 200 --worker-messages 2000",
    ),
    "load": ("--seconds 15 --clients 50", "--seconds 60 --clients 50", "--seconds 60 --clients 50"),
    "crash": (
        "--messages 200 --kill-seconds 15",
        "--messages 1000 --kill-seconds 30",
        "--messages 1000 --kill-seconds 60",
    ),
    "chaos": (
        "--minutes 0.5 --kill-every 10 --warmup 5",
        "--minutes 1 --kill-every 20",
        "--minutes 10 --kill-every 60",
    ),
    "scaleout": ("--messages 300", "--messages 2000", "--messages 5000"),
}
PROFILES: dict[str, dict[str, list[str]]] = {
    profile: {name: sizes[i].split() for name, sizes in ARGUMENTS.items()}
    for i, profile in enumerate(("quick", "default", "full"))
}
JSON_BENCHES = {"dkim", "send", "inbound", "audit", "scale", "load", "crash", "chaos", "scaleout"}
RESULTS = ROOT / "bench" / "results"
TIMEOUT_S = {"quick": 300, "default": 900, "full": 3600}


@dataclass
class Row:
    benchmark: str
    figure: str
    baseline: str = "—"
    ratio: str = "—"
    target: str = "—"
    met: str = "—"


@dataclass
class Area:
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:
    name: str
    args: list[str]
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    figures: dict[str, Any] | None
    profile: str = "default"
    started: str = ""
    load_before: str = ""
    load_after: str = ""
    commit: str = ""

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        record = dict(self.__dict__, stderr=self.stderr[-5000:])
        (directory / f"{self.name}.json").write_text(json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Run:
        return cls(**json.loads(path.read_text()))

    def measured(self) -> str:
        """When, how and at what load: the line under each of this bench's sections."""
        command = f"bench_{self.name}.py {' '.join(self.args)}".strip()
        return (
            f"Measured {self.started} (profile `{self.profile}`, `{command}`, commit"
            f" {self.commit or 'unknown'}, {self.seconds:.0f} s), load average"
            f" {self.load_before} before, {self.load_after} after."
        )


# --------------------------------------------------------------------------- running


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_bench(name: str, args: list[str], timeout: float, profile: str) -> Run:
    script = ROOT / "bench" / f"bench_{name}.py"
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="mm-report-") as tmp:
        out = Path(tmp) / "figures.json"
        command = [sys.executable, str(script), *args]
        if name in JSON_BENCHES:
            command += ["--json", str(out)]
        print(f"[bench/run] {name}: {' '.join(args)}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
            )
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as exc:
            code = -1
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            stderr = f"timed out after {timeout:.0f} s"
        seconds = time.perf_counter() - began
        figures = json.loads(out.read_text()) if out.exists() else None
    print(stdout, file=sys.stderr, flush=True)
    if code != 0:
        print(stderr[-3000:], file=sys.stderr, flush=True)
    return Run(
        name,
        args,
        code,
        seconds,
        stdout,
        stderr,
        figures,
        profile=profile,
        started=started,
        load_before=load_before,
        load_after=_load(),
        commit=_git("rev-parse", "--short", "HEAD"),
    )


# --------------------------------------------------------------------------- formatting


def num(value: float, unit: str = "") -> str:
    text = f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    return f"{text} {unit}".strip()


def ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}x" if base else "—"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def versus(
    benchmark: str, ours: float, base: float, unit: str, target: str = "—", met: str = "—"
) -> Row:
    """A figure beside its same-run baseline, both in ``unit``, and their ratio."""
    return Row(benchmark, num(ours, unit), num(base, unit), ratio(ours, base), target, met)


def zero(benchmark: str, found: int, ok: bool) -> Row:
    """A count that must be 0 (``ok`` says whether it, and what goes with it, is)."""
    return Row(benchmark, str(found), target="0", met=verdict(ok))


def line_numbers(text: str, keyword: str) -> list[float]:
    """The numbers after ``keyword`` on the first line that contains it ([] if none)."""
    for line in text.splitlines():
        if keyword in line:
            tail = line.split(keyword, 1)[1]
            return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\.?\d*", tail)]
    return []


def after(text: str, pattern: str) -> float | None:
    """The number following ``pattern`` (a regex) anywhere in ``text``."""
    found = re.search(pattern + r"\s*:?\s*([\d,]+\.?\d*)", text)
    return float(found.group(1).replace(",", "")) if found else None


# --------------------------------------------------------------------------- areas


def machine_notes(run: Run) -> list[str]:
    """The bench's line on this machine's speed against issue #3's, from its ``--json``
    figures, else its printed text ([] for results saved before benches measured it)."""
    measured = (run.figures or {}).get("machine")
    printed = (line for line in run.stdout.splitlines() if line.startswith("machine: "))
    line = machine_line(measured) if measured else next(printed, None)
    if line is None:
        return []
    return [
        "This machine, measured by the bench before its run (the absolute rates are this"
        " machine's; the ratios to same-run baselines travel between machines): "
        + line.removeprefix("machine: ")
        + "."
    ]


def dkim_area(run: Run) -> Area:
    area = Area("DKIM signing (RSA-2048, relaxed/relaxed, ~5 KB message)")
    f = run.figures or {}
    ours, plain = f["ours_per_s"], f["plain_per_s"]
    area.rows.append(
        versus(
            "signatures/s, OpenSSL-backed signer vs plain dkimpy `dkim.sign`",
            ours,
            plain,
            "/s",
            "≥ 1,000/s (so signing does not cap 1,000 deliveries/s)",
            verdict(ours >= 1000),
        )
    )
    return area


def send_area(run: Run) -> Area:
    area = Area("Sending through the API (SQLite, WAL, synchronous=FULL)")
    area.notes += machine_notes(run)
    f = run.figures or {}
    base = f["baseline_per_s"]
    for mode, rate in f.get("sends", {}).items():
        area.rows.append(
            versus(
                f"accepted sends/s, `POST /send` ({mode}), {f['clients']} clients"
                " vs bare FastAPI+SQLite insert",
                rate,
                base,
                "/s",
                "≥ 50% of the bare endpoint",
                verdict(rate >= 0.5 * base),
            )
        )
    approve = f.get("approve")
    if approve:
        ours, bare = approve["ours"], approve["bare_smtp"]
        for q in ("p50", "p99"):
            target = "< 50 ms" if q == "p50" else "—"
            met = verdict(ours["p50_ms"] < 50) if q == "p50" else "—"
            area.rows.append(
                versus(
                    f"approve → received by SMTP {q} ({approve['count']} approvals)"
                    " vs bare aiosmtplib send",
                    ours[f"{q}_ms"],
                    bare[f"{q}_ms"],
                    "ms",
                    target,
                    met,
                )
            )
    return area


def delivery_area(run: Run) -> Area:
    area = Area("Outbound delivery (worker → local SMTP sink, SQLite)")
    area.notes += machine_notes(run)
    raw = after(run.stdout, r"raw aiosmtplib sends[^:]*")
    ours = after(run.stdout, r"MultiMail signed deliveries[^:]*")
    if raw is None or ours is None:
        raise ValueError("no deliveries/s figures in the output")
    config = re.search(r"batch: (\d+) x (\d+) pipelines.*?compose processes: (\d+)", run.stdout)
    setup = (
        f", batch {config[1]} x {config[2]} pipelines, {config[3]} compose processes"
        if config
        else ""
    )
    area.rows.append(
        versus(
            f"DKIM-signed deliveries/s (full worker path{setup}) vs raw aiosmtplib, same bytes",
            ours,
            raw,
            "/s",
            "≥ 1,000/s",
            verdict(ours >= 1000),
        )
    )
    ceiling = re.search(r"ceiling here: .*? = ([\d,]+) deliveries/s", run.stdout)
    if ceiling:
        area.rows.append(
            versus(
                "the same vs this machine's ceiling (its CPUs over the CPU of one RSA-2048"
                " signature + one raw reused-connection send + the sink's receipt)",
                ours,
                float(ceiling[1].replace(",", "")),
                "/s",
            )
        )
    p50, p99 = after(run.stdout, r"p50"), after(run.stdout, r"p99")
    if p50 is not None and p99 is not None:
        area.rows.append(
            Row("`deliver_now` latency (what an approval waits for) p50", num(p50, "ms"))
        )
        area.rows.append(Row("`deliver_now` latency p99", num(p99, "ms")))
    return area


def inbound_area(run: Run) -> Area:
    area = Area("Inbound SMTP (5 KB messages, stored durably before 250)")
    f = run.figures or {}
    ours, bare = f["ours_per_s"], f["bare_per_s"]
    area.rows.append(
        versus(
            f"SQLite: accepted msgs/s, {f['sessions']} sessions, {f['messages']:,} messages"
            " vs bare aiosmtpd (discards)",
            ours,
            bare,
            "/s",
            "≥ 50% of bare and ≥ 1,000/s",
            verdict(ours >= 0.5 * bare and ours >= 1000),
        )
    )
    if "ours_cpu_us" in f and "bare_cpu_us" in f:
        area.rows.append(
            versus(
                "SQLite: server CPU µs per message vs bare aiosmtpd (load-independent)",
                f["ours_cpu_us"],
                f["bare_cpu_us"],
                "µs",
            )
        )
    if "pg1_per_s" in f and "pg2_per_s" in f:
        one, two = f["pg1_per_s"], f["pg2_per_s"]
        sessions = f.get("pg_sessions", f["sessions"])
        for count, rate in ((1, one), (2, two)):
            cpu = f.get(f"pg{count}_cpu_us")
            area.rows.append(
                versus(
                    f"PostgreSQL: accepted msgs/s, {count}x `serve --role smtp`, {sessions}"
                    " sessions, vs bare aiosmtpd (discards)"
                    + (f" (server CPU {num(cpu, 'µs')}/msg)" if cpu is not None else ""),
                    rate,
                    bare,
                    "/s",
                )
            )
        area.rows.append(
            versus(
                "PostgreSQL: accepted msgs/s, 2 smtp processes vs 1",
                two,
                one,
                "/s",
                "> 1x",
                verdict(two > one),
            )
        )
        if "pg_stored" in f:
            expected = 2 * f["messages"]
            area.rows.append(
                Row(
                    f"PostgreSQL: stored after both runs, of {expected:,} acknowledged",
                    f"{f['pg_stored']:,}",
                    target=f"{expected:,}",
                    met=verdict(f["pg_stored"] == expected),
                )
            )
    return area


def webhooks_area(run: Run) -> Area:
    store = "PostgreSQL" if "PostgreSQL" in run.stdout.split("\n", 1)[0] else "SQLite"
    area = Area(f"Webhooks (dispatcher → loopback receiver, {store})")
    ours = line_numbers(run.stdout, "dispatcher")[-3:]
    base = line_numbers(run.stdout, "raw httpx")[-3:]
    if len(ours) < 3 or len(base) < 3:
        raise ValueError("no dispatcher/baseline figures in the output")
    labels = ("event commit → POST received p50", "event commit → POST received p99")
    for i, label in enumerate(labels):
        area.rows.append(
            versus(
                f"{label} vs raw httpx POST",
                ours[i],
                base[i],
                "ms",
                "< 50 ms" if i == 0 else "—",
                verdict(ours[0] < 50) if i == 0 else "—",
            )
        )
    area.rows.append(
        versus(
            "events/s (burst) vs raw httpx POSTs",
            ours[2],
            base[2],
            "/s",
        )
    )
    return area


def audit_area(run: Run) -> Area:
    f = run.figures or {}
    area = Area("Audit log")
    n_export = f["export_entries"]
    for backend, b in f["backends"].items():
        one, four = b["append_1_per_s"], b["append_4_per_s"]
        area.rows.append(
            versus(
                f"{backend}: appends/s, 4 writer processes vs 1 writer",
                four,
                one,
                "/s",
            )
        )
        verify, raw = b["verify_per_s"], b["raw_hashlib_per_s"]
        area.rows.append(
            versus(
                f"{backend}: verification entries/s ({f['verify_entries']:,}) vs raw hashlib"
                " SHA-256 of the same bytes",
                verify,
                raw,
                "/s",
                "≥ 100,000/s",
                verdict(verify >= 100_000),
            )
        )
        for fmt, e in b["export"].items():
            full = n_export >= 1_000_000
            area.rows.append(
                versus(
                    f"{backend}: export {n_export:,} entries as {fmt}, peak RSS"
                    " vs the process before exporting",
                    e["peak_mb"],
                    e["before_mb"],
                    "MB",
                    "< 200 MB at 1,000,000 entries",
                    verdict(e["peak_mb"] < 200)
                    if full
                    else f"({'under' if e['peak_mb'] < 200 else 'over'} at {n_export:,})",
                )
            )
            area.rows.append(Row(f"{backend}: export {fmt} rate", num(e["per_s"], "entries/s")))
    return area


def scale_areas(run: Run) -> list[Area]:
    f = run.figures or {}
    base_size = str(f["baseline_size"])
    indexes = Area("How cost grows with stored mail (real HTTP routes, one request at a time)")
    indexes.notes.append(
        f"Baseline: the same route on the same database while it held {int(base_size):,}"
        " messages. The issues set no figure here; our own target is a p99 within 2x of the"
        " baseline's, which an index-backed query keeps."
    )
    for scale in f["scale"]:
        base = scale["sizes"][base_size]["routes"]
        for size, data in scale["sizes"].items():
            if size == base_size:
                continue
            for route, figures in data["routes"].items():
                p99, base_p99 = figures["p99_ms"], base[route]["p99_ms"]
                indexes.rows.append(
                    versus(
                        f"{scale['backend']}: `{route}` p99 with {int(size):,} messages"
                        f" (p50 {num(figures['p50_ms'], 'ms')})",
                        p99,
                        base_p99,
                        "ms",
                        "≤ 2x baseline",
                        verdict(p99 <= 2 * base_p99),
                    )
                )
    workers = Area("Scale-out: deliveries with 1 vs 2 worker processes (`serve --role worker`)")
    for backend, rates in f.get("workers", {}).items():
        one, two = rates["1"], rates["2"]
        workers.rows.append(
            versus(
                f"{backend}: delivered/s with 2 worker processes vs 1",
                two,
                one,
                "/s",
                "> 1x on PostgreSQL" if backend == "postgresql" else "—",
                verdict(two > one) if backend == "postgresql" else "—",
            )
        )
    return [indexes, workers] if workers.rows else [indexes]


def load_area(run: Run) -> Area:
    f = run.figures or {}
    area = Area(
        f"Load: {f['clients']} concurrent clients for {f['seconds']:.0f} s against"
        f" `multimail serve` ({f['backend']})"
    )
    area.notes.append(
        "Baseline: `GET /health` (no database work) timed the same way on the same server."
    )
    health = f["health"]
    for call, c in f["calls"].items():
        for q in ("p50", "p99"):
            area.rows.append(
                versus(
                    f"`{call}` {q} ({c['count']:,} calls, 5xx {c['server_errors']})",
                    c[f"{q}_ms"],
                    health[f"{q}_ms"],
                    "ms",
                )
            )
    area.rows.append(zero("5xx answers", f["server_errors"], not f["server_errors"]))
    area.rows.append(
        Row(
            f"autonomous/approved messages lost of {f['expected_deliveries']:,}"
            f" (duplicates {f['duplicates']})",
            str(f["lost"]),
            target="0, none twice",
            met=verdict(f["lost"] == 0 and f["duplicates"] == 0 and f["drained"]),
        )
    )
    return area


def crash_area(run: Run) -> Area:
    f = run.figures or {}
    area = Area(
        f"DUR-3 at scale: {f['messages']:,} gated messages approved while"
        f" {f['workers']} worker processes are SIGKILLed ({f['backend']})"
    )
    area.rows += [
        Row("worker kills (SIGKILL, restarted)", str(f["kills"])),
        zero("messages lost", f["lost"], f["lost"] == 0 and f["drained"]),
        zero(
            f"duplicates ({f['duplicates']}) not explained by a `delivery.recovered` entry,"
            f" or resent with other bytes ({f['changed_bytes']})",
            f["duplicates_unexplained"],
            f["duplicates_unexplained"] == 0 and f["changed_bytes"] == 0,
        ),
        zero(
            "gated messages received without an earlier approval",
            f["gated_without_approval"],
            f["gated_without_approval"] == 0,
        ),
        Row("wall time (the drain includes the 2-minute lease)", num(f["wall_s"], "s")),
    ]
    return area


def chaos_area(run: Run) -> Area:
    f = run.figures or {}
    checks: dict[str, bool] = f["checks"]
    area = Area(
        f"LOAD-1: {f['minutes_per_phase']:g} min of inbound + API sends with a worker"
        f" SIGKILLed every {f['kill_every_s']:g} s, then without kills ({f['backend']})"
    )
    chaos, base = f["chaos"], f["baseline"]
    area.rows.append(
        versus(
            "completed/s in the window (stored inbound + relayed outbound), kills vs none",
            chaos["throughput_per_s"],
            base["throughput_per_s"],
            "/s",
            "≥ 0.8x",
            verdict(checks["throughput with kills ≥ 80% of without"]),
        )
    )
    for name, growth in f["rss_growth"].items():
        area.rows.append(
            Row(
                f"RSS of the `{name}` process, end vs after warm-up",
                num(f["rss_kib"]["end"][name] / 1024, "MiB"),
                num(f["rss_kib"]["start"][name] / 1024, "MiB"),
                f"{1 + growth:.2f}x",
                "< 1.10x",
                verdict(growth < 0.10),
            )
        )
    phases = (chaos, base)
    counts = {
        "nothing lost": sum(p["inbound_lost"] + p["outbound_lost"] for p in phases),
        "no duplicate outside DUR-3's window": sum(
            p["duplicates_outside_dur3"] + p["inbound_duplicates"] for p in phases
        ),
        "queues drained": sum(p["open_queue_jobs"] for p in phases),
    }
    for name, count in counts.items():
        area.rows.append(zero(f"{name} (count)", count, checks[name]))
    return area


def scaleout_area(run: Run) -> Area:
    f = run.figures or {}
    area = Area(
        f"Scale-out: {f['messages']:,} messages through {f['apis']} API and {f['workers']}"
        f" worker processes ({f['backend']}, {f['clients']} clients)"
    )
    area.notes.append(
        "Half from an autonomous mailbox, half gated and approved, each through either API"
        " process. The figure that matters is the count: each message exactly once."
    )
    area.rows += [
        Row("accepted sends/s over HTTP (both API processes)", num(f["sends_per_s"], "/s")),
        Row("approvals/s over HTTP", num(f["approvals_per_s"], "/s")),
        Row(
            "delivered/s, first send to last hand-over",
            num(f["delivered_per_s"], "/s"),
            target=f"{f['messages']:,} delivered",
            met=verdict(f["delivered"] == f["messages"]),
        ),
        Row(
            f"lost / duplicates (recovered-window entries {f['duplicates_recovered']})",
            f"{f['lost']} / {f['duplicates']}",
            target="0 / 0",
            met=verdict(f["lost"] == 0 and f["duplicates"] <= f["duplicates_recovered"]),
        ),
        zero("HTTP errors", sum(f["http_errors"].values()), not f["http_errors"]),
        Row(
            f"audit chain of {f['audit_entries']:,} entries: contiguous, verified",
            f"{f['audit_contiguous']}, {f['audit_verified']}",
            target="True, True",
            met=verdict(f["audit_contiguous"] and f["audit_verified"]),
        ),
        Row("wall time", num(f["wall_s"], "s")),
    ]
    return area


AREAS: dict[str, Callable[[Run], list[Area]]] = {
    "dkim": lambda r: [dkim_area(r)],
    "send": lambda r: [send_area(r)],
    "delivery": lambda r: [delivery_area(r)],
    "inbound": lambda r: [inbound_area(r)],
    "webhooks": lambda r: [webhooks_area(r)],
    "audit": lambda r: [audit_area(r)],
    "scale": scale_areas,
    "load": lambda r: [load_area(r)],
    "crash": lambda r: [crash_area(r)],
    "chaos": lambda r: [chaos_area(r)],
    "scaleout": lambda r: [scaleout_area(r)],
}


# --------------------------------------------------------------------------- machine


def _first(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _postgres_version() -> str:
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(PG_URL)
        with engine.connect() as conn:
            version = str(conn.execute(text("SHOW server_version")).scalar_one())
        engine.dispose()
        return version
    except Exception as exc:  # an absent server is a fact for the report, not an error
        return f"not reachable ({exc.__class__.__name__})"


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def machine() -> list[tuple[str, str]]:
    kib = _first("/proc/meminfo", "MemTotal").split()[0]
    memory = f"{int(kib) / 1024 / 1024:.1f} GiB" if kib.isdigit() else "unknown"
    return [
        ("CPU", _first("/proc/cpuinfo", "model name")),
        ("CPUs (nproc)", str(os.cpu_count())),
        ("memory", memory),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
        ("SQLite", sqlite3.sqlite_version),
        ("PostgreSQL", _postgres_version()),
        ("report rendered", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("git commit at rendering", _git("rev-parse", "--short", "HEAD") or "unknown"),
    ]


# --------------------------------------------------------------------------- report


def latest_results(directory: Path) -> list[Run]:
    """The saved result of each bench, in the report's order (unknown names last)."""
    order = list(PROFILES["default"])
    found = [Run.load(path) for path in sorted(directory.glob("*.json"))]
    return sorted(found, key=lambda r: order.index(r.name) if r.name in order else len(order))


def render(info: list[tuple[str, str]], runs: list[Run], fresh: set[str]) -> str:
    kept = [r.name for r in runs if r.name not in fresh]
    out = [
        "# Performance",
        "",
        "Assembled by `bench/run` (`bench/report.py`) from the latest saved result of each"
        " bench (`bench/results/`)"
        + (
            f"; this invocation ran {', '.join(sorted(fresh))}"
            + (f" and kept {', '.join(kept)} from earlier runs" if kept else "")
            if fresh
            else " without running any"
        )
        + ". Each section says when, with which arguments and profile and at what load"
        " average it was measured. Every figure is beside a baseline measured in the same"
        " bench process, on the same machine. Loopback only; the machine may have been"
        " shared with other work (see the load averages).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info],
        "",
    ]
    problems: list[str] = []
    for run in runs:
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-8:]
            problems.append(
                f"- `bench_{run.name}.py` ({run.started}, profile `{run.profile}`) exited with"
                f" {run.returncode}: " + " / ".join(tail)
            )
            continue
        try:
            areas = AREAS[run.name](run)
        except (KeyError, ValueError, TypeError) as exc:
            problems.append(f"- `bench_{run.name}.py`: could not read its figures ({exc!r})")
            continue
        for area in areas:
            out += [f"## {area.title}", "", f"_{run.measured()}_", ""]
            if area.notes:
                out += [*area.notes, ""]
            out += [
                "| benchmark | figure | baseline (same run) | ratio | target | met? |",
                "|---|---:|---:|---:|---|---|",
            ]
            out += [
                f"| {r.benchmark} | {r.figure} | {r.baseline} | {r.ratio} | {r.target} | {r.met} |"
                for r in area.rows
            ]
            out.append("")
    if problems:
        out += ["## Benchmarks that did not produce figures", "", *problems, ""]
    out += [
        "## Runs",
        "",
        "| bench | profile | arguments | started | load average before → after | seconds |",
        "|---|---|---|---|---|---:|",
    ]
    out += [
        f"| `bench_{r.name}.py` | {r.profile} | `{' '.join(r.args)}` | {r.started}"
        f" | {r.load_before} → {r.load_after} | {r.seconds:.0f} |"
        for r in runs
    ]
    out += ["", "<details><summary>What each bench printed</summary>", ""]
    for run in runs:
        out += [f"### bench_{run.name}.py", "", "```", run.stdout.strip(), "```", ""]
    out += ["</details>", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller runs, ~10 minutes")
    size.add_argument("--full", action="store_true", help="the issues' sizes, ~1.5 hours")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="saved results directory")
    parser.add_argument("--only", default="", help="comma-separated bench names to run")
    parser.add_argument(
        "--render-only", action="store_true", help="run nothing; render the saved results"
    )
    args = parser.parse_args()
    profile = "quick" if args.quick else "full" if args.full else "default"
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(PROFILES[profile]))
    if unknown:
        parser.error(
            f"unknown bench name(s) {', '.join(unknown)}; known: {', '.join(PROFILES[profile])}"
        )
    wanted = [] if args.render_only else [n for n in PROFILES[profile] if not only or n in only]

    fresh: list[Run] = []
    for name in wanted:
        run = run_bench(name, PROFILES[profile][name], TIMEOUT_S[profile], profile)
        run.save(args.results)  # at once, so an interrupted staged run keeps what it measured
        fresh.append(run)
    report = render(machine(), latest_results(args.results), {r.name for r in fresh})
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    if any(r.returncode != 0 for r in fresh):
        sys.exit(1)


if __name__ == "__main__":
    main()
