"""Accepted sends per second through the real API, beside a bare FastAPI insert endpoint.

    .venv/bin/python bench/bench_send.py [--seconds 5] [--clients 8]

Three runs in one process, each for ``--seconds`` with ``--clients`` concurrent httpx clients:
the baseline (a FastAPI route that inserts one row into SQLite, WAL, synchronous=FULL, under
uvicorn), then ``POST /v1/mailboxes/{id}/send`` on a gated_send mailbox and on an autonomous
one (a full send: scan, thread, message, audit entries, event or delivery job, one commit).
The issue's target: sends at ≥ 50% of the baseline's rate.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts, mailboxes
from multimail.services.context import Actor
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
) -> float:
    """Accepted requests per second over ``seconds`` with ``clients`` threads."""
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
    return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    def message(n: int) -> dict[str, Any]:
        return {
            "to": f"customer{n % 50}@example.com",
            "subject": f"Order update {n}",
            "markdown": "Hello,\n\nyour order **has shipped**. Thanks for waiting.\n\n- Acme",
            "metadata": {"n": n},
        }

    with tempfile.TemporaryDirectory() as tmp:
        with _serve_bare(_baseline_app(Path(tmp) / "bare.db")) as url:
            baseline = _load(url, "/items", message, {}, args.clients, args.seconds)
        print(f"bare FastAPI insert (SQLite WAL, FULL):  {baseline:8.1f} req/s")

        settings = Settings(
            data_dir=Path(tmp) / "mm",
            domain="bench.test",
            rate_limit_per_minute=10_000_000,
            rate_limit_burst=10_000_000,
        )
        services = build_services(settings)
        boot = accounts.bootstrap(services.db, account_name="Bench", operator_email="o@bench.test")
        operator = Actor(type="system", id=None, name="bench", account_id=boot.account["id"])
        boxes = {}
        with services.db.write() as conn:
            for mode in ("gated_send", "autonomous"):
                boxes[mode] = mailboxes.create_mailbox(
                    conn,
                    actor=operator,
                    settings=settings,
                    address=f"{mode.replace('_', '-')}@bench.test",
                    oversight_mode=mode,
                )["id"]
        headers = {"Authorization": f"Bearer {boot.agent_key}"}
        with LiveServer(services) as live:
            for mode, box in boxes.items():
                rate = _load(
                    live.base_url,
                    f"/v1/mailboxes/{box}/send",
                    message,
                    headers,
                    args.clients,
                    args.seconds,
                )
                print(
                    f"POST /send ({mode:<10}):               {rate:8.1f} sends/s"
                    f"   = {rate / baseline:5.1%} of the bare endpoint (target >= 50%)"
                )
        services.db.dispose()


if __name__ == "__main__":
    main()
