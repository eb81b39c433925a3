"""How cost grows with data, and delivery with 1 vs 2 worker processes.

    .venv/bin/python bench/bench_scale.py [--sizes 10000] [--samples 200]
        [--worker-messages 1000] [--no-postgres] [--json FILE]
    .venv/bin/python bench/bench_scale.py --sizes 10000,1000000      # the full run

Part 1 (indexes): a database made with the real schema (``migrate.upgrade``) is seeded
directly with an account's mail (one mailbox, threads of five, mostly read/unread inbound and
delivered outbound, 1% waiting for approval and at least a page of them), then the real HTTP
routes are timed one request at a time through the real app under uvicorn: ``check_inbox``
(``GET /v1/mailboxes/{id}/emails``, newest 20; and with ``status=unread``) and
``list_pending`` (``GET /v1/oversight/pending``). The baseline is the same route on the same
database holding 100 messages, measured in the same run, so the ratio says how much the cost
grew with the data. The database grows in place from one size to the next. SQLite always;
PostgreSQL too when it is reachable.

Part 2 (scale-out): ``--worker-messages`` autonomous sends are queued for delivery (message
rows plus their jobs, one commit) while 1, then 2, ``multimail serve --role worker``
processes wait on the same database; the figure is delivered messages/s from that commit until
the last one is handed to a local SMTP sink (DKIM-signed, full worker path).
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from _stack import ServeProcess, counting_sink, make_desk, make_services, serve, statuses
from _support import Databases, databases, finish, output_arguments, percentile
from sqlalchemy import Connection, Table, insert, text

from multimail.ids import new_id, utcnow
from multimail.services.context import Services
from multimail.store.tables import messages, threads
from multimail.testing.server import LiveServer
from multimail.workers import delivery

BASELINE_SIZE = 100
THREAD_SIZE = 5
BODY = "Hello,\n\nthanks for your order. It **has shipped** and should arrive on Friday.\n\n- Acme"


# --------------------------------------------------------------------------- part 1: indexes


@dataclass
class Mailbox:
    services: Services
    account_id: str
    mailbox_id: str
    agent_key: str
    reviewer_key: str


def _setup_mailbox(services: Services, mode: str) -> Mailbox:
    desk = make_desk(services, (mode,), address="agent@{domain}")
    account_id, box_id = desk.boot.account["id"], desk.boxes[mode]["id"]
    return Mailbox(services, account_id, box_id, desk.boot.agent_key, desk.boot.reviewer_key)


_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "0123456789abcdefghjkmnpqrstvwxyz")


def _ids(prefix: str, created_ms: list[int]) -> list[str]:
    """Ids shaped like ``new_id``'s ULIDs (48-bit millisecond time, then 80 random bits, in
    Crockford base32), ordered by the back-dated creation time, made in bulk: calling
    ``new_id`` once a row was half of the seeding time at a million rows."""
    noise = base64.b32encode(os.urandom(10 * len(created_ms))).decode().translate(_CROCKFORD)
    out = []
    for n, ms in enumerate(created_ms):
        # 7 bytes hold the 48-bit time shifted left by 6: its first 10 base32 characters are
        # the 50-bit, zero-led time field of a ULID.
        head = base64.b32encode((ms << 6).to_bytes(7, "big")).decode()[:10].translate(_CROCKFORD)
        out.append(f"{prefix}_{head}{noise[16 * n : 16 * n + 16]}")
    return out


def _seed_rows(box: Mailbox, start: int, stop: int) -> Iterator[tuple[list[Any], list[Any]]]:
    """Batches of (threads, messages) rows for message numbers ``start`` .. ``stop - 1``."""
    now = utcnow()
    batch = 20_000
    for first in range(start, stop, batch):
        numbers = range(first, min(first + batch, stop))
        created = [now - timedelta(seconds=stop - n) for n in numbers]
        created_ms = [int(c.timestamp() * 1000) for c in created]
        message_ids = _ids("msg", created_ms)
        thread_ids = _ids("thr", created_ms)
        thread_rows: list[dict[str, Any]] = []
        message_rows: list[dict[str, Any]] = []
        thread_id = ""
        for i, n in enumerate(numbers):
            if n % THREAD_SIZE == 0 or not thread_id:
                thread_id = thread_ids[i]
                thread_rows.append(
                    {
                        "id": thread_id,
                        "account_id": box.account_id,
                        "mailbox_id": box.mailbox_id,
                        "subject": f"Order {n // THREAD_SIZE}",
                        "normalized_subject": f"order {n // THREAD_SIZE}",
                        "message_count": THREAD_SIZE,
                        "created_at": created[i],
                        "last_activity_at": created[i],
                    }
                )
            # A realistic mix: 1% waiting for a reviewer, the rest split between inbox and
            # sent; a quarter of the first hundred wait too, so list_pending fills its 20-item
            # page at every size and the baseline does the same work per request.
            if n % 100 == 7 or (n < BASELINE_SIZE and n % 4 == 3):
                direction, status = "outbound", "pending_send_approval"
            elif n % 2:
                direction, status = "inbound", "unread" if n % 3 == 0 else "read"
            else:
                direction, status = "outbound", "delivered"
            inbound = direction == "inbound"
            customer = f"customer{n % 500}@example.com"
            message_rows.append(
                {
                    "id": message_ids[i],
                    "account_id": box.account_id,
                    "mailbox_id": box.mailbox_id,
                    "thread_id": thread_id,
                    "direction": direction,
                    "status": status,
                    "message_id_header": f"<seed-{n}@bench.test>",
                    "from_address": customer if inbound else "agent@bench.test",
                    "to": ["agent@bench.test"] if inbound else [customer],
                    "subject": f"Re: Order {n // THREAD_SIZE}",
                    "markdown": BODY,
                    "text": BODY,
                    "oversight_mode": "gated_send",
                    "size_bytes": 2_000,
                    "created_at": created[i],
                    "updated_at": created[i],
                }
            )
        yield thread_rows, message_rows


def bulk_insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts with the same keys) the fastest way each database offers, with
    the values encoded exactly as SQLAlchemy would (each column type's own bind processor):
    one driver ``executemany`` on SQLite, ``COPY … FROM STDIN`` on PostgreSQL. Columns left
    out get their server defaults, as with an ORM insert."""
    if not rows:
        return
    dialect = conn.dialect
    names = list(rows[0])
    processors = [table.c[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names]
    values = [
        tuple(p(row[n]) if p else row[n] for n, p in zip(names, processors, strict=True))
        for row in rows
    ]
    columns = ", ".join(f'"{n}"' for n in names)
    if dialect.name == "postgresql":
        raw = conn.connection.driver_connection
        assert raw is not None
        copy_sql = f'COPY "{table.name}" ({columns}) FROM STDIN'
        with raw.cursor() as cursor, cursor.copy(copy_sql) as copy:
            for value in values:
                copy.write_row(value)
    else:
        marks = ", ".join("?" for _ in names)
        conn.exec_driver_sql(f'INSERT INTO "{table.name}" ({columns}) VALUES ({marks})', values)


def seed(box: Mailbox, start: int, stop: int) -> float:
    """Insert messages ``start`` .. ``stop - 1``; returns rows/s."""
    began = time.perf_counter()
    for thread_rows, message_rows in _seed_rows(box, start, stop):
        with box.services.db.write() as conn:
            bulk_insert(conn, threads, thread_rows)
            bulk_insert(conn, messages, message_rows)
    if box.services.db.dialect == "postgresql":
        # A table that has lived a while has been analysed and vacuumed; measure that state.
        with box.services.db.engine.connect().execution_options(
            isolation_level="AUTOCOMMIT"
        ) as conn:
            conn.execute(text("VACUUM ANALYZE messages"))
            conn.execute(text("VACUUM ANALYZE threads"))
    else:
        with box.services.db.write() as conn:
            conn.execute(text("ANALYZE"))
    return (stop - start) / (time.perf_counter() - began)


def time_route(client: httpx.Client, path: str, key: str, samples: int) -> dict[str, float]:
    """p50/p99 in ms of ``samples`` sequential GETs (after a few warm-up requests)."""
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(5):
        client.get(path, headers=headers).raise_for_status()
    timings = []
    for _ in range(samples):
        began = time.perf_counter()
        response = client.get(path, headers=headers)
        timings.append((time.perf_counter() - began) * 1000)
        response.raise_for_status()
    return {"p50_ms": statistics.median(timings), "p99_ms": percentile(timings, 0.99)}


def measure_routes(box: Mailbox, samples: int) -> dict[str, dict[str, float]]:
    routes = {
        "check_inbox": (f"/v1/mailboxes/{box.mailbox_id}/emails?limit=20", box.agent_key),
        "check_inbox_unread": (
            f"/v1/mailboxes/{box.mailbox_id}/emails?limit=20&status=unread",
            box.agent_key,
        ),
        "list_pending": ("/v1/oversight/pending?limit=20", box.reviewer_key),
    }
    with LiveServer(box.services) as live, httpx.Client(base_url=live.base_url) as client:
        return {
            name: time_route(client, path, key, samples) for name, (path, key) in routes.items()
        }


def scale_run(
    dbs: Databases, backend: str, sizes: list[int], samples: int, tmp: Path
) -> dict[str, Any]:
    services = make_services(tmp / f"scale-{backend}", dbs.url(backend, "scale"))
    box = _setup_mailbox(services, "gated_send")
    stored = 0
    results: dict[str, Any] = {"backend": backend, "sizes": {}}
    try:
        for size in [BASELINE_SIZE, *sizes]:
            rate = seed(box, stored, size)
            stored = size
            figures = measure_routes(box, samples)
            results["sizes"][str(size)] = {"seed_rows_per_s": rate, "routes": figures}
            line = "  ".join(
                f"{name} p50 {f['p50_ms']:6.1f} p99 {f['p99_ms']:6.1f} ms"
                for name, f in figures.items()
            )
            print(f"{backend:10} {size:>9,} messages: {line}", flush=True)
    finally:
        services.db.dispose()
    return results


# --------------------------------------------------------------------------- part 2: workers


def _queue_sends(box: Mailbox, count: int) -> None:
    now = utcnow()
    rows: list[dict[str, Any]] = [
        {
            "id": new_id("msg"),
            "account_id": box.account_id,
            "mailbox_id": box.mailbox_id,
            "direction": "outbound",
            "status": "queued",
            "message_id_header": f"<w-{uuid.uuid4().hex}@bench.test>",
            "from_address": "agent@bench.test",
            "to": [f"customer{n % 50}@example.org"],
            "subject": f"Order update {n}",
            "markdown": BODY,
            "oversight_mode": "autonomous",
            "created_at": now,
            "updated_at": now,
        }
        for n in range(count)
    ]
    with box.services.db.write() as conn:
        conn.execute(insert(messages), rows)
        for row in rows:
            delivery.enqueue_delivery(conn, row["id"])


def worker_rate(dbs: Databases, backend: str, processes: int, count: int, tmp: Path) -> float:
    label = f"workers{processes}"
    with counting_sink() as (port, _):
        services = make_services(tmp / f"{label}-{backend}", dbs.url(backend, label), port)
        box = _setup_mailbox(services, "autonomous")
        procs: list[ServeProcess] = []
        try:
            procs = [serve(services, "worker", tmp) for _ in range(processes)]
            time.sleep(4.0)  # imports, the migration check and the first poll, outside the clock
            for proc in procs:
                if not proc.alive():
                    raise SystemExit(f"worker exited early:\n{proc.output(2000)}")
            began = time.perf_counter()
            _queue_sends(box, count)
            deadline = began + 300
            while (done := statuses(services)["delivered"]) < count:
                if time.perf_counter() > deadline:
                    break
                time.sleep(0.02)
            elapsed = time.perf_counter() - began
            if done < count:
                raise SystemExit(f"only {done} of {count} delivered with {processes} worker(s)")
        finally:
            for proc in procs:
                proc.stop(20)
            services.db.dispose()
    return count / elapsed


def workers_run(dbs: Databases, backend: str, count: int, tmp: Path) -> dict[str, float]:
    rates: dict[str, float] = {}
    for processes in (1, 2):
        rates[str(processes)] = rate = worker_rate(dbs, backend, processes, count, tmp)
        print(
            f"{backend:10} {processes} worker process(es): {rate:8.1f} delivered/s"
            f" ({count} messages)",
            flush=True,
        )
    return rates


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000", help="comma-separated stored messages")
    parser.add_argument("--samples", type=int, default=200, help="requests per route and size")
    parser.add_argument("--worker-messages", type=int, default=1000, help="0 skips part 2")
    output_arguments(parser)
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()} - {BASELINE_SIZE})

    report: dict[str, Any] = {"baseline_size": BASELINE_SIZE, "scale": [], "workers": {}}
    with tempfile.TemporaryDirectory(prefix="mm-bench-scale-") as tmp_dir:
        tmp = Path(tmp_dir)
        with databases() as dbs:
            found = ["sqlite"]
            if not args.no_postgres and dbs.postgres_reachable():
                found.append("postgresql")
            for backend in found:
                report["scale"].append(scale_run(dbs, backend, sizes, args.samples, tmp))
            if args.worker_messages > 0:
                for backend in found:
                    report["workers"][backend] = workers_run(
                        dbs, backend, args.worker_messages, tmp
                    )
    finish(args.json, report)


if __name__ == "__main__":
    main()
