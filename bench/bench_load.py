"""A bounded load run: sends, reads and decisions from concurrent clients against ``serve``.

    .venv/bin/python bench/bench_load.py [--seconds 60] [--clients 50] [--no-postgres]
        [--json FILE]

One ``multimail serve`` process (all roles) on a fresh database (PostgreSQL when reachable)
delivers to a local CapturingSMTPServer relay. ``--clients`` concurrent HTTP clients each
loop for ``--seconds``, picking a call at random: ``send`` (agent key, half to an autonomous
mailbox, half to a gated one), ``check_inbox`` (newest 20), ``read_email`` (one of the sent
messages) and ``decide`` (reviewer key, approve 9 in 10 gated messages, reject the rest).

Printed per call type: count, p50/p99 latency, 5xx (must be 0) and other unexpected answers;
then, once the queue has drained (bounded wait), that every autonomous and approved message
reached the relay (lost must be 0), none twice, and no rejected or undecided one left.
The baseline beside each latency is ``GET /health`` timed the same way in the same run, the
cost of an HTTP round trip to this server with no database work.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _stack import make_desk, make_services, message_headers, relay_copies, serve
from _support import finish, output_arguments, percentile, wait_for, workspace
from sqlalchemy import select

from multimail.services.context import Services
from multimail.store.tables import messages
from multimail.testing.smtp import CapturingSMTPServer

CALLS = {"send": 0.3, "check_inbox": 0.25, "read_email": 0.2, "decide": 0.25}


@dataclass
class Tally:
    """What the clients did, shared by the tasks of one event loop (no locks needed)."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    server_errors: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    sent: dict[str, str] = field(default_factory=dict)  # message id -> mode
    pending: list[str] = field(default_factory=list)
    decided: dict[str, str] = field(default_factory=dict)  # message id -> action
    samples: list[str] = field(default_factory=list)

    def record(self, call: str, began: float, response: httpx.Response, ok: set[int]) -> None:
        self.latencies.setdefault(call, []).append((time.perf_counter() - began) * 1000)
        if response.status_code >= 500:
            self.server_errors[call] += 1
        elif response.status_code not in ok:
            self.unexpected[f"{call} {response.status_code}"] += 1


async def one_call(
    client: httpx.AsyncClient,
    rng: random.Random,
    tally: Tally,
    boxes: dict[str, str],
    agent: dict[str, str],
    reviewer: dict[str, str],
) -> None:
    call = rng.choices(list(CALLS), weights=list(CALLS.values()))[0]
    if call == "decide" and not tally.pending:
        call = "send"
    if call == "read_email" and not tally.samples:
        call = "check_inbox"
    began = time.perf_counter()
    if call == "send":
        mode = rng.choice(["autonomous", "gated_send"])
        n = len(tally.latencies.get("send", []))
        body = {"to": [f"r{n}@example.test"], "subject": f"Load {n}", "markdown": f"Text {n}."}
        response = await client.post(f"/v1/mailboxes/{boxes[mode]}/send", json=body, headers=agent)
        tally.record(call, began, response, {200, 202})
        if response.status_code in (200, 202):
            message_id = str(response.json()["id"])
            tally.sent[message_id] = mode
            tally.samples.append(message_id)
            if mode == "gated_send":
                tally.pending.append(message_id)
    elif call == "check_inbox":
        box = boxes[rng.choice(list(boxes))]
        response = await client.get(f"/v1/mailboxes/{box}/emails?limit=20", headers=agent)
        tally.record(call, began, response, {200})
    elif call == "read_email":
        message_id = rng.choice(tally.samples)
        response = await client.get(f"/v1/emails/{message_id}", headers=agent)
        tally.record(call, began, response, {200})
    else:
        message_id = tally.pending.pop(rng.randrange(len(tally.pending)))
        action = "reject" if rng.random() < 0.1 else "approve"
        response = await client.post(
            "/v1/oversight/decide",
            json={"email_id": message_id, "action": action},
            headers=reviewer,
        )
        tally.record(call, began, response, {200})
        if response.status_code == 200:
            tally.decided[message_id] = action


async def drive(
    base_url: str,
    seconds: float,
    clients: int,
    boxes: dict[str, str],
    agent_key: str,
    reviewer_key: str,
) -> tuple[Tally, list[float]]:
    tally = Tally()
    agent = {"Authorization": f"Bearer {agent_key}"}
    reviewer = {"Authorization": f"Bearer {reviewer_key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        # The baseline: a route with no database work, same clients, same server.
        health: list[float] = []
        for _ in range(200):
            began = time.perf_counter()
            (await client.get("/health")).raise_for_status()
            health.append((time.perf_counter() - began) * 1000)
        deadline = time.monotonic() + seconds

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                try:
                    await one_call(client, rng, tally, boxes, agent, reviewer)
                except httpx.TransportError as exc:
                    tally.unexpected[f"transport {exc.__class__.__name__}"] += 1

        await asyncio.gather(*(worker(seed) for seed in range(clients)))
    return tally, health


def load_run(args: argparse.Namespace, tmp: Path, backend: str, url: str | None) -> dict[str, Any]:
    with CapturingSMTPServer() as relay:
        services = make_services(tmp / "data", url, relay.port)
        desk = make_desk(services, ("autonomous", "gated_send"))
        boxes = {mode: str(box["id"]) for mode, box in desk.boxes.items()}
        server = serve(services, "all", tmp / "serve.log")
        base_url = server.base_url
        try:
            server.wait_ready()
            began = time.perf_counter()
            tally, health = asyncio.run(
                drive(
                    base_url,
                    args.seconds,
                    args.clients,
                    boxes,
                    desk.boot.agent_key,
                    desk.boot.reviewer_key,
                )
            )
            load_s = time.perf_counter() - began
            expected = {
                i
                for i, mode in tally.sent.items()
                if mode == "autonomous" or tally.decided.get(i) == "approve"
            }
            drain_began = time.perf_counter()
            drained = wait_for(lambda: _delivered(services, expected), args.drain_seconds)
            drain_s = time.perf_counter() - drain_began
            time.sleep(0.5)  # anything still in flight arrives now
            copies, strangers = relay_copies(relay, message_headers(services))
        finally:
            server.stop()
            services.db.dispose()

    calls = {
        call: {
            "count": len(values),
            "p50_ms": statistics.median(values),
            "p99_ms": percentile(values, 0.99),
            "server_errors": tally.server_errors[call],
        }
        for call, values in sorted(tally.latencies.items())
    }
    rejected = {i for i, action in tally.decided.items() if action == "reject"}
    undecided = {i for i, mode in tally.sent.items() if mode == "gated_send"} - set(tally.decided)
    lost = [i for i in expected if copies[i] == 0]
    return {
        "backend": backend,
        "clients": args.clients,
        "seconds": load_s,
        "calls": calls,
        "requests_per_s": sum(c["count"] for c in calls.values()) / load_s,
        "health": {"p50_ms": statistics.median(health), "p99_ms": percentile(health, 0.99)},
        "server_errors": sum(tally.server_errors.values()),
        "unexpected": dict(tally.unexpected),
        "expected_deliveries": len(expected),
        "received": sum(1 for i in expected if copies[i]),
        "lost": len(lost),
        "duplicates": sum(max(0, n - 1) for n in copies.values()),
        "rejected_or_undecided_received": sum(1 for i in rejected | undecided if copies[i]),
        "strangers": strangers,
        "drained": drained,
        "drain_s": drain_s,
    }


def _delivered(services: Services, expected: set[str]) -> bool:
    with services.db.read() as conn:
        rows = conn.execute(
            select(messages.c.id).where(
                messages.c.direction == "outbound", messages.c.status == "delivered"
            )
        )
        return expected <= {r.id for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--drain-seconds", type=float, default=120, help="bound on the drain")
    output_arguments(parser)
    args = parser.parse_args()
    with workspace("load", args.no_postgres) as (tmp, backend, url):
        f = load_run(args, tmp, backend, url)
    print(
        f"{f['backend']}: {f['clients']} clients for {f['seconds']:.0f} s,"
        f" {f['requests_per_s']:.0f} requests/s;"
        f" GET /health baseline p50 {f['health']['p50_ms']:.1f} p99 {f['health']['p99_ms']:.1f} ms"
    )
    for call, c in f["calls"].items():
        print(
            f"  {call:12} {c['count']:7,} calls  p50 {c['p50_ms']:7.1f} ms"
            f"  p99 {c['p99_ms']:7.1f} ms  5xx {c['server_errors']}"
        )
    print(f"5xx total: {f['server_errors']}; other unexpected answers: {f['unexpected'] or 0}")
    print(
        f"deliveries: expected {f['expected_deliveries']:,}, received {f['received']:,},"
        f" lost {f['lost']}, duplicates {f['duplicates']},"
        f" rejected/undecided received {f['rejected_or_undecided_received']};"
        f" drained {f['drained']} in {f['drain_s']:.1f} s"
    )
    ok = (
        f["server_errors"] == 0
        and f["lost"] == 0
        and f["duplicates"] == 0
        and f["rejected_or_undecided_received"] == 0
        and f["drained"]
    )
    print("load: " + ("PASS" if ok else "FAIL"))
    finish(args.json, {**f, "ok": ok}, ok)


if __name__ == "__main__":
    main()
