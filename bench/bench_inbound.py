"""Inbound messages/s accepted and durably stored, beside a bare aiosmtpd that discards.

    .venv/bin/python bench/bench_inbound.py [--messages 4000] [--sessions 20]

Both servers run in this process's loop and are driven by the same aiosmtplib generator
(20 concurrent sessions, 5 KB messages). Ours stores each message in SQLite
(WAL, synchronous=FULL) with its processing job before answering 250.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.controller import Controller

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts, mailboxes
from multimail.services.context import Actor
from multimail.workers.inbound import run_smtp

BODY = ("x" * 76 + "\r\n") * 64  # ≈ 5 KB


def message(n: int) -> bytes:
    return (
        f"From: load@sender.test\r\nTo: bot@mm.test\r\nSubject: load {n}\r\n"
        f"Message-ID: <load-{n}@sender.test>\r\n\r\n{BODY}"
    ).encode()


async def drive(port: int, total: int, sessions: int) -> float:
    async def session(first: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
            for n in range(first, total, sessions):
                await client.sendmail("load@sender.test", ["bot@mm.test"], message(n))

    started = time.perf_counter()
    await asyncio.gather(*(session(i) for i in range(sessions)))
    return total / (time.perf_counter() - started)


class Discard:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


async def bare_rate(total: int, sessions: int) -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Discard(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        # Controller runs its own loop in a thread, like a separate server process would.
        return await drive(port, total, sessions)
    finally:
        controller.stop()


def wait_for_port(extras: dict[str, object]) -> None:
    deadline = time.monotonic() + 10
    while "smtp_port" not in extras and time.monotonic() < deadline:
        time.sleep(0.01)


async def multimail_rate(total: int, sessions: int, data_dir: Path) -> tuple[float, int]:
    settings = Settings(data_dir=data_dir, domain="mm.test", smtp_port=0)
    services = build_services(settings)
    boot = accounts.bootstrap(services.db, account_name="Bench", operator_email="b@mm.test")
    actor = Actor(type="system", id=None, name="bench", account_id=boot.account["id"])
    with services.db.write() as conn:
        mailboxes.create_mailbox(conn, actor=actor, settings=settings, address="bot@mm.test")
    # Like the bare Controller, the server gets its own loop in a thread.
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(run_smtp(services, stop))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    await asyncio.to_thread(wait_for_port, services.extras)
    try:
        port = int(services.extras["smtp_port"])  # type: ignore[call-overload]
        rate = await drive(port, total, sessions)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
    with services.db.read() as conn:
        stored = conn.exec_driver_sql("SELECT count(*) FROM inbound_raw").scalar_one()
    services.db.dispose()
    return rate, int(stored)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write figures here")
    args = parser.parse_args()
    bare = await bare_rate(args.messages, args.sessions)
    with tempfile.TemporaryDirectory() as tmp:
        ours, stored = await multimail_rate(args.messages, args.sessions, Path(tmp))
    print(f"messages: {args.messages} x 5 KB, {args.sessions} concurrent sessions")
    print(f"bare aiosmtpd (discard):            {bare:8.0f} msg/s")
    print(f"multimail (SQLite FULL, stored):    {ours:8.0f} msg/s  ({stored} stored)")
    print(f"ratio: {ours / bare:.0%} of the bare server (target >= 50%, >= 1000 msg/s)")
    if args.json:
        figures = {
            "messages": args.messages,
            "sessions": args.sessions,
            "bare_per_s": bare,
            "ours_per_s": ours,
            "stored": stored,
        }
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
