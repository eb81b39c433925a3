"""Webhook delivery: event commit → POST received latency (p50/p99) and events/s.

Runs the real dispatcher against a fast loopback receiver, beside a baseline of raw httpx posts
of the same body to the same receiver in the same run. Target: p50 under 50 ms after the commit.

    .venv/bin/python bench/bench_webhooks.py [--events 300] [--burst 1000] [--chunk 50]
        [--database-url URL]

The burst is emitted ``--chunk`` events per transaction (``--chunk 1`` is one commit per
event, which measures the emitter's commit rate as much as the dispatcher).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from _stack import in_thread, make_desk, make_services
from _support import percentile
from sqlalchemy import select

from multimail.services import events, webhooks
from multimail.store.tables import webhook_attempts, webhook_deliveries
from multimail.workers.webhooks import run_dispatcher

arrivals: dict[str, float] = {}
arrived = threading.Condition()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint would

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        key = self.headers.get("webhook-id") or json.loads(body)["id"]
        with arrived:
            arrivals[key] = time.perf_counter()
            arrived.notify_all()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def wait_arrivals(count: int, timeout: float = 60) -> None:
    with arrived:
        if not arrived.wait_for(lambda: len(arrivals) >= count, timeout):
            raise SystemExit(f"only {len(arrivals)} of {count} arrived")


def pct(values: list[float], q: float) -> float:
    """The percentile of seconds, in milliseconds."""
    return percentile(values, q) * 1000


async def baseline(url: str, n_latency: int, n_burst: int) -> tuple[list[float], float]:
    body = json.dumps({"id": "evt_x", "type": "message.received", "pad": "x" * 1500}).encode()
    latencies = []
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        for i in range(n_latency):
            start = time.perf_counter()
            await client.post(url, content=body, headers={"webhook-id": f"b{i}"})
            latencies.append(time.perf_counter() - start)
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with sem:
                await client.post(url, content=body, headers={"webhook-id": f"c{i}"})

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n_burst)))
        rate = n_burst / (time.perf_counter() - start)
    return latencies, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=300, help="events for the latency run")
    parser.add_argument("--burst", type=int, default=1000, help="events for the throughput run")
    parser.add_argument("--chunk", type=int, default=50, help="burst events per transaction")
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    args = parser.parse_args()

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.daemon_threads = True
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"

    tmp = Path(tempfile.mkdtemp(prefix="mm-bench-webhooks-"))
    svc = make_services(
        tmp, args.database_url, allow_private_webhooks=True, allow_http_webhooks=True
    )
    desk = make_desk(svc, ())
    account_id = desk.boot.account["id"]
    with svc.db.write() as conn:
        webhooks.create_webhook(conn, svc, desk.operator, url, ["*"], None, None)
    with in_thread(svc, run_dispatcher):
        time.sleep(0.3)

        def emit_many(count: int) -> tuple[str, float]:
            with svc.db.write() as conn:
                for _ in range(count):
                    event_id = events.emit(
                        conn,
                        account_id=account_id,
                        event_type="message.received",
                        extra={"pad": "x" * 1500},
                    )
            return event_id, time.perf_counter()

        def emit_one() -> tuple[str, float]:
            return emit_many(1)

        latencies = []
        for _ in range(args.events):
            event_id, committed = emit_one()
            try:
                wait_arrivals(len(arrivals) + 1)
            except SystemExit:
                with svc.db.read() as conn:
                    for row in conn.execute(
                        select(webhook_deliveries, webhook_attempts.c.error)
                        .join(webhook_attempts, isouter=True)
                        .where(webhook_deliveries.c.status != "delivered")
                    ):
                        print("undelivered:", dict(row._mapping))
                raise
            latencies.append(arrivals[event_id] - committed)

        # Emitted by a few writers' worth of commits, so the figure is the dispatcher's rate,
        # not the emitter's (one fsync per event would cap it at the disk's commit rate).
        start = time.perf_counter()
        before = len(arrivals)
        for sent in range(0, args.burst, args.chunk):
            emit_many(min(args.chunk, args.burst - sent))
        emitted = time.perf_counter() - start
        wait_arrivals(before + args.burst)
        rate = args.burst / (time.perf_counter() - start)

    base_lat, base_rate = asyncio.run(baseline(url, args.events, args.burst))
    receiver.shutdown()

    db = "SQLite" if svc.db.is_sqlite else "PostgreSQL"
    print(f"webhook delivery on {db}, {args.events} latency events, {args.burst} burst events")
    print(f"{'':32}{'p50 ms':>10}{'p99 ms':>10}{'per s':>10}")
    print(
        f"{'dispatcher (commit → received)':32}{pct(latencies, 0.5):>10.1f}"
        f"{pct(latencies, 0.99):>10.1f}{rate:>10.0f}"
    )
    print(
        f"{'baseline raw httpx POST':32}{pct(base_lat, 0.5):>10.1f}"
        f"{pct(base_lat, 0.99):>10.1f}{base_rate:>10.0f}"
    )
    print(
        f"(burst emitted in {emitted:.2f} s; target p50 < 50 ms: "
        f"{'met' if pct(latencies, 0.5) < 50 else 'NOT met'}; mean "
        f"{statistics.mean(latencies) * 1000:.1f} ms)"
    )
    svc.db.dispose()


if __name__ == "__main__":
    main()
