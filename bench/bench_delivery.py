"""Signed deliveries per second through the real worker, beside raw aiosmtplib sends.

    .venv/bin/python bench/bench_delivery.py [--messages 300] [--latency 50] [--concurrency 8]
        [--batch 32] [--pipelines 2]

Both sides hand messages to the same local aiosmtpd sink on loopback. The baseline sends
the very bytes our worker produced (already signed) with bare aiosmtplib, one connection per
message, ``--concurrency`` at a time; ours runs the whole path per message (claim the job,
gate and suppression checks, compose, DKIM-sign, store the bytes, SMTP, record the attempt,
audit, events, complete the job) on an embedded SQLite database, ``--batch`` messages per
group commit (claim + start in one commit, every outcome in one more) and ``--pipelines``
batches in flight. Then ``deliver_now`` latency
(what an approval waits for) per message, p50/p99. Bounded: a few thousand messages at most.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session
from pydantic import SecretStr
from sqlalchemy import func, insert, select

from multimail.config import Settings
from multimail.ids import new_id, utcnow
from multimail.runtime import build_services
from multimail.services import accounts, mailboxes
from multimail.services.context import Actor, Services
from multimail.store.tables import messages
from multimail.workers import delivery, runner


class _Sink:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.count += 1
        return "250 OK"


def _setup(data_dir: Path, port: int) -> tuple[Services, str, str]:
    settings = Settings(
        data_dir=data_dir,
        domain="bench.test",
        smtp_url=SecretStr(f"smtp://127.0.0.1:{port}"),
    )
    services = build_services(settings)
    boot = accounts.bootstrap(services.db, account_name="Bench", operator_email="o@bench.test")
    actor = Actor(type="system", id=None, name="bench", account_id=boot.account["id"])
    with services.db.write() as conn:
        box = mailboxes.create_mailbox(
            conn,
            actor=actor,
            settings=settings,
            address="agent@bench.test",
            oversight_mode="autonomous",
        )
    return services, boot.account["id"], box["id"]


def _queue(services: Services, account_id: str, mailbox_id: str, n: int) -> list[str]:
    ids = [new_id("msg") for _ in range(n)]
    now = utcnow()
    paragraph = "The quick brown fox jumps over the lazy dog, again and again. " * 8
    with services.db.write() as conn:
        conn.execute(
            insert(messages),
            [
                {
                    "id": i,
                    "account_id": account_id,
                    "mailbox_id": mailbox_id,
                    "direction": "outbound",
                    "status": "queued",
                    "message_id_header": f"<{i}@bench.test>",
                    "from_address": "agent@bench.test",
                    "to": ["someone@example.org"],
                    "subject": "Benchmark message",
                    "markdown": "\n\n".join([paragraph] * 4),
                    "oversight_mode": "autonomous",
                    "created_at": now,
                    "updated_at": now,
                }
                for i in ids
            ],
        )
        for i in ids:
            delivery.enqueue_delivery(conn, i)
    return ids


def _delivered(services: Services) -> int:
    with services.db.read() as conn:
        return int(
            conn.execute(select(func.count()).where(messages.c.status == "delivered")).scalar_one()
        )


def _wait_delivered(services: Services, total: int, deadline: float) -> None:
    while _delivered(services) < total and time.perf_counter() < deadline:
        time.sleep(0.02)


async def _ours(services: Services, total: int, batch: int, pipelines: int) -> float:
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(
        runner.run_workers(
            services, stop, poll_interval=0.01, batch_size=batch, pipelines=pipelines
        )
    )
    await asyncio.to_thread(_wait_delivered, services, total, started + 300)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    return elapsed


async def _baseline(raw: bytes, port: int, n: int, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await aiosmtplib.send(
                raw,
                sender="agent@bench.test",
                recipients=["someone@example.org"],
                hostname="127.0.0.1",
                port=port,
            )

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--latency", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8, help="baseline connections")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pipelines", type=int, default=2)
    args = parser.parse_args()
    n = max(1, min(args.messages, 5000))
    sink = _Sink()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    with tempfile.TemporaryDirectory(prefix="mm-bench-") as tmp:
        services, account_id, mailbox_id = _setup(Path(tmp), port)
        try:
            _queue(services, account_id, mailbox_id, n)
            ours = asyncio.run(_ours(services, n, args.batch, args.pipelines))
            with services.db.read() as conn:
                raw = conn.execute(select(messages.c.raw).limit(1)).scalar_one()
            base = asyncio.run(_baseline(raw, port, n, args.concurrency))
            latencies = []
            for message_id in _queue(services, account_id, mailbox_id, args.latency):
                started = time.perf_counter()
                status = delivery.deliver_now(services, message_id, timeout=5)
                latencies.append((time.perf_counter() - started) * 1000)
                assert status == "delivered", status
        finally:
            services.db.dispose()
            controller.stop()
    ours_rate, base_rate = n / ours, n / base
    print(
        f"messages: {n}, baseline concurrency: {args.concurrency}, batch: {args.batch} x "
        f"{args.pipelines} pipelines, sink accepted: {sink.count}"
    )
    print(f"raw aiosmtplib sends (same signed bytes): {base_rate:8.1f} msg/s")
    print(f"MultiMail signed deliveries (full path):  {ours_rate:8.1f} msg/s")
    print(f"ratio ours / raw:                         {ours_rate / base_rate:8.2f}")
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"deliver_now latency over {len(latencies)}: p50 {statistics.median(latencies):.1f} ms,"
        f" p99 {p99:.1f} ms"
    )


if __name__ == "__main__":
    main()
