"""Scale-out at size: two API and two worker processes on PostgreSQL, each message once.

    .venv/bin/python bench/bench_scaleout.py [--messages 5000] [--apis 2] [--workers 2]
        [--clients 32] [--drain-seconds 300] [--json FILE]

The issue's run: ``--apis`` ``multimail serve --role api`` and ``--workers`` ``--role worker``
processes share one fresh PostgreSQL database and one local CapturingSMTPServer relay.
``--clients`` threads send ``--messages`` messages through the API processes in turn (odd
numbers from an autonomous mailbox, even numbers from a gated one), then approve every gated
one, again through either API. The same flow as ``tests/integration/test_scale_out.py``
(500 messages in the suite), at the size RELIABILITY asks for.

Printed: accepted sends/s and approvals/s over HTTP, delivered/s from the first send to the
last hand-over, then the checks: every message received by the relay exactly once (lost 0,
duplicates 0; a duplicate inside SPEC §2's window would carry a ``delivery.recovered`` audit
entry and is counted apart), none left undelivered, and the audit chain the four processes
wrote together contiguous (no gap, no fork) and verified intact by ``/v1/audit-log/verify``.
PostgreSQL is required: several processes on one SQLite file is not a supported layout.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from _stack import (
    ServeProcess,
    make_desk,
    make_services,
    message_headers,
    relay_copies,
    serve,
    statuses,
)
from _support import databases, finish, output_arguments
from sqlalchemy import func, select

from multimail.services.context import Services
from multimail.store.tables import audit_entries
from multimail.testing.smtp import CapturingSMTPServer


def _audit_facts(services: Services) -> dict[str, Any]:
    with services.db.read() as conn:
        seqs = [int(r[0]) for r in conn.execute(select(audit_entries.c.seq).order_by("seq"))]
        recovered = conn.execute(
            select(func.count()).where(audit_entries.c.action == "delivery.recovered")
        ).scalar_one()
    contiguous = bool(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    return {"entries": len(seqs), "contiguous": contiguous, "recovered": int(recovered)}


def run(count: int, apis: int, workers: int, clients: int, drain_s: float) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="mm-bench-scaleout-") as tmp_dir,
        databases() as dbs,
        CapturingSMTPServer() as relay,
    ):
        if not dbs.postgres_reachable():
            raise SystemExit("PostgreSQL is not reachable; this bench is PostgreSQL only")
        tmp = Path(tmp_dir)
        services = make_services(tmp / "data", dbs.url("postgresql", "scaleout"), relay.port)
        desk = make_desk(services, ("autonomous", "gated_send"))
        procs: list[ServeProcess] = []
        try:
            for n in range(apis):
                procs.append(serve(services, "api", tmp / f"api{n}.log"))
            bases = [proc.base_url for proc in procs]
            for n in range(workers):
                procs.append(serve(services, "worker", tmp / f"worker{n}.log"))
            for proc in procs:
                proc.wait_ready()
            time.sleep(3.0)  # the workers' imports and first poll, outside the clock

            def client(base: str, key: str) -> httpx.Client:
                headers = {"Authorization": f"Bearer {key}"}
                limits = httpx.Limits(max_connections=clients)
                return httpx.Client(base_url=base, headers=headers, timeout=60, limits=limits)

            agents = [client(b, desk.boot.agent_key) for b in bases]
            reviewers = [client(b, desk.boot.reviewer_key) for b in bases]
            boxes = {mode: box["id"] for mode, box in desk.boxes.items()}
            errors: Counter[int] = Counter()

            def send(n: int) -> str | None:
                box = boxes["autonomous" if n % 2 else "gated_send"]
                body = {"to": [f"r{n}@example.org"], "subject": f"No. {n}", "markdown": f"T {n}."}
                answer = agents[n % apis].post(f"/v1/mailboxes/{box}/send", json=body)
                if answer.status_code not in (200, 202):
                    errors[answer.status_code] += 1
                    return None
                return str(answer.json()["id"])

            def approve(pair: tuple[int, str]) -> None:
                n, message_id = pair
                answer = reviewers[n % apis].post(
                    "/v1/oversight/decide", json={"email_id": message_id, "action": "approve"}
                )
                if answer.status_code != 200:
                    errors[answer.status_code] += 1

            began = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                ids = list(pool.map(send, range(count)))
                sent_s = time.perf_counter() - began
                gated = [(n, i) for n, i in enumerate(ids) if i is not None and n % 2 == 0]
                approving = time.perf_counter()
                list(pool.map(approve, gated))
                approve_s = time.perf_counter() - approving
            accepted = [i for i in ids if i is not None]
            deadline = time.monotonic() + drain_s
            while (done := statuses(services)["delivered"]) < len(accepted):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            delivered_s = time.perf_counter() - began
            time.sleep(1.0)  # a straggling duplicate would arrive now
            verify = agents[0].get(
                "/v1/audit-log/verify",
                headers={"Authorization": f"Bearer {desk.boot.admin_key}"},
                timeout=300,
            )
            for c in agents + reviewers:
                c.close()
        finally:
            for proc in procs:
                proc.stop()
        copies, strangers = relay_copies(relay, message_headers(services))
        audit = _audit_facts(services)
        final = statuses(services)
        services.db.dispose()
    lost = sum(1 for i in accepted if copies[i] == 0)
    duplicates = sum(copies[i] - 1 for i in accepted if copies[i] > 1)
    intact = verify.status_code == 200 and verify.json().get("intact") is True
    return {
        "backend": "postgresql",
        "messages": count,
        "apis": apis,
        "workers": workers,
        "clients": clients,
        "accepted": len(accepted),
        "http_errors": dict(errors),
        "sends_per_s": len(accepted) / sent_s,
        "approvals_per_s": len(gated) / approve_s if gated else 0.0,
        "delivered": done,
        "delivered_per_s": done / delivered_s,
        "wall_s": delivered_s,
        "lost": lost,
        "duplicates": duplicates,
        "duplicates_recovered": audit["recovered"],
        "strangers": strangers,
        "statuses": dict(final),
        "audit_entries": audit["entries"],
        "audit_contiguous": audit["contiguous"],
        "audit_verified": intact,
        "ok": not errors
        and lost == 0
        and duplicates <= audit["recovered"]
        and done == len(accepted) == count
        and audit["contiguous"]
        and intact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--apis", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--drain-seconds", type=float, default=300)
    output_arguments(parser, postgres_optional=False)
    args = parser.parse_args()
    f = run(args.messages, args.apis, args.workers, args.clients, args.drain_seconds)
    print(
        f"postgresql: {f['messages']:,} messages through {f['apis']} API + {f['workers']}"
        f" worker processes, {f['clients']} clients"
    )
    print(f"  accepted sends/s      {f['sends_per_s']:8.1f}   ({f['accepted']:,} accepted)")
    print(f"  approvals/s           {f['approvals_per_s']:8.1f}")
    print(f"  delivered/s           {f['delivered_per_s']:8.1f}   (wall {f['wall_s']:.1f} s)")
    print(f"  HTTP errors           {f['http_errors'] or 0}")
    print(f"  lost                  {f['lost']}")
    print(
        f"  duplicates            {f['duplicates']}"
        f" (delivery.recovered entries {f['duplicates_recovered']})"
    )
    print(
        f"  audit chain           {f['audit_entries']:,} entries, contiguous"
        f" {f['audit_contiguous']}, verified {f['audit_verified']}"
    )
    print(f"  statuses              {f['statuses']}")
    print("  OK" if f["ok"] else "  FAILED")
    finish(args.json, f, f["ok"])


if __name__ == "__main__":
    main()
