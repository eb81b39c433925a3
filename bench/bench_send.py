"""Accepted sends per second through the real API, beside a bare FastAPI insert endpoint.

    .venv/bin/python bench/bench_send.py [--seconds 5] [--clients 8] [--approvals 100]
        [--clients-process] [--json FILE]

Three runs in one process, each for ``--seconds`` with ``--clients`` concurrent httpx clients:
the baseline (a FastAPI route that inserts one row into SQLite, WAL, synchronous=FULL, under
uvicorn), then ``POST /v1/mailboxes/{id}/send`` on a gated_send mailbox and on an autonomous
one (a full send: scan, thread, message, audit entries, event or delivery job, one commit).
The issue's target: sends at ≥ 50% of the baseline's rate. Beside each rate: the SQL
statements one send runs (authentication and rate limit included), counted on the engine,
and the CPU milliseconds this process spent per request — figures that, unlike the rates,
hardly move with the machine's load (the ratio of CPU per request is what the ratio of
rates tends to on an idle machine, where the interpreter lock is the bottleneck).

Then approve → received: ``--approvals`` gated sends, each approved with
``POST /v1/oversight/decide`` by the reviewer key, timed from the decide request until the
local SMTP sink has the message (p50/p99), beside bare aiosmtplib sends of the same signed
bytes to the same sink. Target: p50 under 50 ms on loopback.

First of all, one line on this machine's speed against the issue's (``_support.machine_speed``):
the ratios above are measured within the run, the absolute rates are this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import uvicorn
from _stack import make_desk, make_services
from _support import machine_speed
from aiosmtpd.controller import Controller
from fastapi import FastAPI
from send_setup import send_body
from sqlalchemy import Engine, event, select

from multimail.store.tables import messages
from multimail.testing.server import LiveServer


def _baseline_app(path: Path) -> FastAPI:
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    setup.close()
    local = threading.local()

    def conn() -> sqlite3.Connection:
        if not hasattr(local, "conn"):
            local.conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            local.conn.execute("PRAGMA synchronous=FULL")
        connection: sqlite3.Connection = local.conn
        return connection

    app = FastAPI()

    @app.post("/items", status_code=202)
    def create(item: dict[str, Any]) -> dict[str, Any]:
        c = conn()
        c.execute("BEGIN IMMEDIATE")
        cursor = c.execute("INSERT INTO items (body) VALUES (?)", (str(item),))
        c.execute("COMMIT")
        return {"id": cursor.lastrowid}

    return app


@contextmanager
def _serve_bare(app: FastAPI) -> Iterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _load(
    base_url: str,
    path: str,
    body: Callable[[int], dict[str, Any]],
    headers: dict[str, str],
    clients: int,
    seconds: float,
) -> tuple[int, float]:
    """Requests accepted over ``seconds`` with ``clients`` threads, and the seconds taken."""
    counts = [0] * clients
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def run(index: int) -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
            start.wait()
            deadline = time.perf_counter() + seconds
            n = 0
            while time.perf_counter() < deadline:
                response = client.post(path, json=body(index * 1_000_000 + n))
                n += 1
                if response.status_code in (200, 202):
                    counts[index] += 1
                elif len(errors) < 3:
                    errors.append(f"{response.status_code} {response.text[:200]}")

    workers = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    if errors:
        print("  errors:", *errors, sep="\n    ")
    return sum(counts), elapsed


# The body of the ``n``-th request (the baseline stores it, the API sends it).
message = send_body


def _load_elsewhere(
    own_process: bool,
    base_url: str,
    path: str,
    headers: dict[str, str],
    clients: int,
    seconds: float,
) -> tuple[float, float]:
    """``_load``, with the clients in a process of their own when ``own_process``: the rate
    and the CPU milliseconds this process spent per accepted request.

    In the server's process (the default, as the issue's figures were taken) the clients'
    threads compete with the server for one interpreter lock; in their own process they do
    not, as real agents would not, and both rates rise (the baseline's much more). The CPU
    per request (``time.process_time``: clients included in the default placement, the
    server's alone with ``--clients-process``) moves far less with the machine's load than
    the rates do: compare versions by it on a busy machine.
    """
    if not own_process:
        cpu = time.process_time()
        accepted, elapsed = _load(base_url, path, message, headers, clients, seconds)
        return accepted / elapsed, (time.process_time() - cpu) * 1000 / max(accepted, 1)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(time.sleep, 0).result()  # the client process is up before measuring
        cpu = time.process_time()
        job = pool.submit(_load, base_url, path, message, headers, clients, seconds)
        accepted, elapsed = job.result()
        return accepted / elapsed, (time.process_time() - cpu) * 1000 / max(accepted, 1)


class _StatementCounter:
    """Counts the statements the engine sends to the database (BEGIN and COMMIT excluded)."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        statement = str(args[2]).lstrip().upper()
        if not statement.startswith(("BEGIN", "COMMIT", "PRAGMA")):
            self.count += 1


def _statements_per_send(
    base_url: str, path: str, body: dict[str, Any], headers: dict[str, str], counter: Any
) -> int:
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        client.post(path, json=body).raise_for_status()  # warm: first-use lookups
        before = counter.count
        client.post(path, json=body).raise_for_status()
        return int(counter.count - before)


class _Sink:
    """Accepts and discards, noting when each message arrived (same clock as the client)."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.arrived = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.arrived:
            self.arrivals.append(time.perf_counter())
            self.arrived.notify_all()
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 30) -> float:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.arrivals) >= count, timeout):
                raise SystemExit(f"only {len(self.arrivals)} of {count} messages arrived")
            return self.arrivals[count - 1]


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50_ms": statistics.median(ordered), "p99_ms": p99}


def _approve_latencies(
    client: httpx.Client, box: str, agent: str, reviewer: str, sink: _Sink, count: int
) -> list[float]:
    """Milliseconds from the decide request to the sink's 250, one message at a time."""
    latencies = []
    for n in range(count):
        sent = client.post(
            f"/v1/mailboxes/{box}/send",
            json={"to": "customer@example.com", "subject": f"Refund {n}", "markdown": "Done."},
            headers={"Authorization": f"Bearer {agent}"},
        )
        sent.raise_for_status()
        expected = len(sink.arrivals) + 1
        began = time.perf_counter()
        decided = client.post(
            "/v1/oversight/decide",
            json={"email_id": sent.json()["id"], "action": "approve"},
            headers={"Authorization": f"Bearer {reviewer}"},
        )
        decided.raise_for_status()
        latencies.append((sink.wait_for(expected) - began) * 1000)
    return latencies


async def _bare_smtp_latencies(raw: bytes, port: int, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        began = time.perf_counter()
        await aiosmtplib.send(
            raw,
            sender="gated-send@bench.test",
            recipients=["customer@example.com"],
            hostname="127.0.0.1",
            port=port,
        )
        latencies.append((time.perf_counter() - began) * 1000)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--approvals", type=int, default=100, help="0 skips approve → received")
    parser.add_argument("--json", type=Path, default=None, help="also write figures here")
    parser.add_argument(
        "--clients-process",
        action="store_true",
        help="run the load clients in a process of their own instead of the server's",
    )
    args = parser.parse_args()
    # First, with nothing else of the bench running: the rates below are this machine's, and
    # this line says how it compares with the one the figures came from.
    machine = machine_speed()
    print(machine.line())
    figures: dict[str, Any] = {
        "machine": machine.figures(),
        "clients": args.clients,
        "seconds": args.seconds,
        "clients_in": "their own process" if args.clients_process else "the server's process",
        "sends": {},
    }
    sink = _Sink()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        sink_port = int(probe.getsockname()[1])
    controller = Controller(sink, hostname="127.0.0.1", port=sink_port)
    controller.start()

    with tempfile.TemporaryDirectory() as tmp:
        with _serve_bare(_baseline_app(Path(tmp) / "bare.db")) as url:
            baseline, baseline_cpu = _load_elsewhere(
                args.clients_process, url, "/items", {}, args.clients, args.seconds
            )
        print(
            f"bare FastAPI insert (SQLite WAL, FULL):  {baseline:8.1f} req/s  "
            f"   {baseline_cpu:5.2f} CPU ms/request"
        )
        figures["baseline_per_s"] = baseline
        figures["baseline_cpu_ms"] = baseline_cpu
        figures["cpu_ms_per_send"] = {}

        services = make_services(Path(tmp) / "mm", None, relay_port=sink_port)
        desk = make_desk(services, ("gated_send", "autonomous"))
        boot = desk.boot
        boxes = {mode: box["id"] for mode, box in desk.boxes.items()}
        headers = {"Authorization": f"Bearer {boot.agent_key}"}
        counter = _StatementCounter(services.db.engine)
        figures["statements_per_send"] = {}
        with LiveServer(services) as live:
            for mode, box in boxes.items():
                path = f"/v1/mailboxes/{box}/send"
                statements = _statements_per_send(live.base_url, path, message(0), headers, counter)
                figures["statements_per_send"][mode] = statements
                rate, cpu_ms = _load_elsewhere(
                    args.clients_process, live.base_url, path, headers, args.clients, args.seconds
                )
                print(
                    f"POST /send ({mode:<10}):               {rate:8.1f} sends/s"
                    f"   = {rate / baseline:5.1%} of the bare endpoint (target >= 50%),"
                    f" {statements} SQL statements per send, {cpu_ms:5.2f} CPU ms/send"
                    f" (bare/send CPU: {baseline_cpu / cpu_ms:5.1%})"
                )
                figures["sends"][mode] = rate
                figures["cpu_ms_per_send"][mode] = cpu_ms
            if args.approvals > 0:
                with httpx.Client(base_url=live.base_url, timeout=60) as client:
                    ours = _approve_latencies(
                        client,
                        boxes["gated_send"],
                        boot.agent_key,
                        boot.reviewer_key,
                        sink,
                        args.approvals,
                    )
                with services.db.read() as conn:
                    query = select(messages.c.raw).where(messages.c.raw.is_not(None)).limit(1)
                    raw = conn.execute(query).scalar_one()
                bare = asyncio.run(_bare_smtp_latencies(raw, sink_port, args.approvals))
                figures["approve"] = {
                    "count": args.approvals,
                    "ours": _percentiles(ours),
                    "bare_smtp": _percentiles(bare),
                }
                for label, values in (("approve → received", ours), ("bare aiosmtplib", bare)):
                    p = _percentiles(values)
                    print(
                        f"{label:<19} ({args.approvals}): p50 {p['p50_ms']:6.1f} ms,"
                        f" p99 {p['p99_ms']:6.1f} ms"
                    )
        services.db.dispose()
    controller.stop()
    if args.json:
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
