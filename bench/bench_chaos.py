"""LOAD-1: sustained inbound and outbound load while a worker process is killed every minute.

    .venv/bin/python bench/bench_chaos.py [--minutes 3] [--kill-every 60] [--inbound-rate 20]
        [--send-rate 20] [--no-postgres] [--json FILE]
    .venv/bin/python bench/bench_chaos.py --minutes 10          # the full LOAD-1 run

Long-lived ``multimail serve --role api`` and ``--role smtp`` processes and ``--workers``
``--role worker`` processes share one fresh database (PostgreSQL when reachable). For
``--minutes`` an asyncio generator offers a steady load: inbound mail through aiosmtplib to
the SMTP port at ``--inbound-rate``/s, and API sends from an autonomous mailbox to a local
CapturingSMTPServer relay at ``--send-rate``/s. In the first phase one worker process is
SIGKILLed every ``--kill-every`` seconds (in turn) and restarted; the second phase is the same
workload with no kills, the baseline measured in the same run.

Printed per phase: offered, acknowledged (inbound 250s, API 202s), completed inside the
window (stored as messages / received by the relay) as throughput; then after a bounded
drain: nothing lost (inbound stored == acknowledged, outbound received == accepted),
duplicates outside DUR-3's window (0: every extra copy has its ``delivery.recovered``),
delivery and inbound queues empty, RSS growth of the API and SMTP processes from after the
warm-up to the end (< 10%), and throughput with kills / without (≥ 80%).

A killed worker's claimed jobs return when their lease (two minutes under ``serve``) runs
out, so short phases make the with-kills throughput look worse than a 10-minute run does.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
from _stack import (
    Desk,
    ServeProcess,
    audit_seqs,
    make_desk,
    make_services,
    message_headers,
    relay_copies,
    serve,
)
from _support import finish, output_arguments, wait_for, workspace
from sqlalchemy import func, select

from multimail.services.context import Services
from multimail.store.tables import jobs, messages
from multimail.testing.smtp import CapturingSMTPServer

QUEUES = ("deliver", "process_inbound")


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    offered_in: int = 0
    offered_out: int = 0
    acked_in: set[str] = field(default_factory=set)  # inbound Message-IDs that got a 250
    accepted_out: set[str] = field(default_factory=set)  # message ids the API accepted
    failures: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    done_in_window: int = 0
    result: dict[str, Any] = field(default_factory=dict)


def inbound_message(phase: str, n: int, to: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"customer{n % 50}@sender.example"
    message["To"] = to
    message["Subject"] = f"Question {phase} {n}"
    message["Message-ID"] = f"<in-{phase}-{n}@sender.example>"
    message.set_content(f"Hello, this is message {n} of the {phase} phase.\n" * 20)
    return message


async def generate(
    phase: Phase,
    seconds: float,
    smtp_port: int,
    api_url: str,
    desk: Desk,
    inbound_rate: float,
    send_rate: float,
) -> None:
    """Offer inbound mail and API sends at steady rates for ``seconds``."""
    inbox = str(desk.boxes["autonomous"]["address"])
    sender = str(desk.boxes["autonomous"]["id"])
    agent = {"Authorization": f"Bearer {desk.boot.agent_key}"}
    slots = asyncio.Semaphore(128)  # a stalled server must not pile up unbounded tasks
    pending: set[asyncio.Task[None]] = set()

    async def inbound(n: int) -> None:
        async with slots:
            message = inbound_message(phase.name, n, inbox)
            try:
                await aiosmtplib.send(message, hostname="127.0.0.1", port=smtp_port, timeout=30)
            except (aiosmtplib.SMTPException, OSError) as exc:
                phase.failures[f"smtp {exc.__class__.__name__}"] += 1
                return
            phase.acked_in.add(str(message["Message-ID"]))

    async def send(client: httpx.AsyncClient, n: int) -> None:
        async with slots:
            body = {
                "to": [f"r{n % 100}@example.test"],
                "subject": f"Update {phase.name} {n}",
                "markdown": f"Your order {n} has shipped.",
            }
            try:
                response = await client.post(f"/v1/mailboxes/{sender}/send", json=body)
            except httpx.TransportError as exc:
                phase.failures[f"api {exc.__class__.__name__}"] += 1
                return
            if response.status_code in (200, 202):
                phase.accepted_out.add(str(response.json()["id"]))
            else:
                phase.failures[f"api {response.status_code}"] += 1

    async with httpx.AsyncClient(base_url=api_url, headers=agent, timeout=60) as client:
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < seconds:
            due_in = int(elapsed * inbound_rate)
            due_out = int(elapsed * send_rate)
            while phase.offered_in < due_in:
                pending.add(asyncio.create_task(inbound(phase.offered_in)))
                phase.offered_in += 1
            while phase.offered_out < due_out:
                pending.add(asyncio.create_task(send(client, phase.offered_out)))
                phase.offered_out += 1
            pending = {t for t in pending if not t.done()}
            await asyncio.sleep(0.01)
        if pending:
            await asyncio.wait(pending, timeout=60)


def stored_inbound(services: Services, headers: set[str]) -> Counter[str]:
    """Inbound messages stored per Message-ID (only those of ``headers``)."""
    with services.db.read() as conn:
        rows = conn.execute(
            select(messages.c.message_id_header).where(messages.c.direction == "inbound")
        )
        return Counter(r[0] for r in rows if r[0] in headers)


def open_queue_jobs(services: Services) -> int:
    with services.db.read() as conn:
        query = select(func.count()).where(
            jobs.c.kind.in_(QUEUES), jobs.c.status.in_(["pending", "running"])
        )
        return int(conn.execute(query).scalar_one())


class Cluster:
    """The long-lived API and SMTP processes and the worker processes that get killed."""

    def __init__(self, services: Services, tmp: Path, workers: int) -> None:
        self.services, self.tmp = services, tmp
        self.api = serve(services, "api", tmp / "api.log")
        self.smtp = serve(services, "smtp", tmp / "smtp.log")
        self.started = 0
        self.workers = [self._worker() for _ in range(workers)]

    @property
    def api_url(self) -> str:
        return self.api.base_url

    @property
    def smtp_port(self) -> int:
        assert self.smtp.smtp_port is not None
        return self.smtp.smtp_port

    def _worker(self) -> ServeProcess:
        self.started += 1
        return serve(self.services, "worker", self.tmp / f"worker-{self.started}.log")

    def kill_one(self, index: int) -> None:
        victim = index % len(self.workers)
        self.workers[victim].kill()
        self.workers[victim] = self._worker()

    def ready(self) -> bool:
        return self.api.ready() and self.smtp.ready()

    def rss_kib(self) -> dict[str, int]:
        return {"api": self.api.rss_kib(), "smtp": self.smtp.rss_kib()}

    def stop(self) -> None:
        for proc in [*self.workers, self.api, self.smtp]:
            proc.stop()


def run_phase(
    phase: Phase,
    args: argparse.Namespace,
    cluster: Cluster,
    relay: CapturingSMTPServer,
    desk: Desk,
    kills: bool,
) -> None:
    seconds = args.minutes * 60
    rng = random.Random(len(phase.name))
    stop_killing = asyncio.Event()

    async def killer() -> None:
        while not stop_killing.is_set():
            try:
                await asyncio.wait_for(stop_killing.wait(), args.kill_every)
            except TimeoutError:
                cluster.kill_one(rng.randrange(len(cluster.workers)))
                phase.kills += 1

    async def both() -> None:
        task = asyncio.create_task(killer()) if kills else None
        await generate(
            phase,
            seconds,
            cluster.smtp_port,
            cluster.api_url,
            desk,
            args.inbound_rate,
            args.send_rate,
        )
        stop_killing.set()
        if task is not None:
            await task

    began = time.monotonic()
    asyncio.run(both())
    phase.seconds = time.monotonic() - began
    services = cluster.services
    headers = message_headers(services)
    copies, _ = relay_copies(relay, headers)
    stored = stored_inbound(services, phase.acked_in)
    phase.done_in_window = sum(1 for i in phase.accepted_out if copies[i]) + len(stored)


def check_phase(phase: Phase, services: Services, relay: CapturingSMTPServer) -> None:
    copies, _ = relay_copies(relay, message_headers(services))
    stored = stored_inbound(services, phase.acked_in)
    seqs = audit_seqs(services)
    unexplained = 0
    for message_id in phase.accepted_out:
        recovered = len(seqs.get(message_id, {}).get("delivery.recovered", []))
        unexplained += max(0, copies[message_id] - 1 - recovered)
    phase.result = {
        "seconds": phase.seconds,
        "kills": phase.kills,
        "offered_inbound": phase.offered_in,
        "acknowledged_inbound": len(phase.acked_in),
        "stored_inbound": len(stored),
        "inbound_lost": len(phase.acked_in - set(stored)),
        "inbound_duplicates": sum(n - 1 for n in stored.values()),
        "offered_outbound": phase.offered_out,
        "accepted_outbound": len(phase.accepted_out),
        "received_outbound": sum(1 for i in phase.accepted_out if copies[i]),
        "outbound_lost": sum(1 for i in phase.accepted_out if not copies[i]),
        "outbound_duplicates": sum(max(0, copies[i] - 1) for i in phase.accepted_out),
        "duplicates_outside_dur3": unexplained,
        "failures": dict(phase.failures),
        "throughput_per_s": phase.done_in_window / phase.seconds,
    }


def chaos_run(args: argparse.Namespace, tmp: Path, backend: str, url: str | None) -> dict[str, Any]:
    with CapturingSMTPServer() as relay:
        services = make_services(tmp / "data", url, relay.port)
        desk = make_desk(services, ("autonomous",))
        cluster = Cluster(services, tmp, args.workers)
        phases = [Phase("chaos"), Phase("baseline")]
        rss: dict[str, dict[str, int]] = {}
        try:
            if not wait_for(cluster.ready, 60, 0.1):
                raise SystemExit("the API or SMTP process did not start in 60 s")
            # Warm-up: imports, pools and caches settle before the memory baseline is read.
            warm = Phase("warmup")
            warm_args = argparse.Namespace(**{**vars(args), "minutes": args.warmup / 60})
            run_phase(warm, warm_args, cluster, relay, desk, kills=False)
            wait_for(lambda: open_queue_jobs(services) == 0, args.drain_seconds)
            rss["start"] = cluster.rss_kib()
            for phase in phases:
                run_phase(phase, args, cluster, relay, desk, kills=phase.name == "chaos")
                drain_began = time.monotonic()
                drained = wait_for(_phase_done_check(phase, services, relay), args.drain_seconds)
                time.sleep(0.5)  # anything in flight arrives now
                check_phase(phase, services, relay)
                phase.result["drained"] = drained
                phase.result["drain_s"] = time.monotonic() - drain_began
                phase.result["open_queue_jobs"] = open_queue_jobs(services)
                print(_phase_line(phase, backend), flush=True)
            rss["end"] = cluster.rss_kib()
        finally:
            cluster.stop()
            services.db.dispose()
    growth = {
        name: (rss["end"][name] - rss["start"][name]) / rss["start"][name]
        for name in rss["start"]
        if rss["start"][name]
    }
    chaos, baseline = phases[0].result, phases[1].result
    ratio = chaos["throughput_per_s"] / baseline["throughput_per_s"]
    return {
        "backend": backend,
        "minutes_per_phase": args.minutes,
        "kill_every_s": args.kill_every,
        "workers": args.workers,
        "inbound_rate": args.inbound_rate,
        "send_rate": args.send_rate,
        "chaos": chaos,
        "baseline": baseline,
        "rss_kib": rss,
        "rss_growth": growth,
        "throughput_ratio": ratio,
    }


def _phase_done_check(
    phase: Phase, services: Services, relay: CapturingSMTPServer
) -> Callable[[], bool]:
    def done() -> bool:
        copies, _ = relay_copies(relay, message_headers(services))
        if any(not copies[i] for i in phase.accepted_out):
            return False
        return len(stored_inbound(services, phase.acked_in)) == len(phase.acked_in)

    return done


def _phase_line(phase: Phase, backend: str) -> str:
    r = phase.result
    return (
        f"{backend} {phase.name:8} {r['seconds']:5.0f} s, kills {r['kills']}:"
        f" inbound offered {r['offered_inbound']:,} acknowledged {r['acknowledged_inbound']:,}"
        f" stored {r['stored_inbound']:,} (lost {r['inbound_lost']},"
        f" duplicates {r['inbound_duplicates']});"
        f" outbound offered {r['offered_outbound']:,} accepted {r['accepted_outbound']:,}"
        f" received {r['received_outbound']:,} (lost {r['outbound_lost']},"
        f" duplicates {r['outbound_duplicates']}, outside DUR-3 {r['duplicates_outside_dur3']});"
        f" throughput {r['throughput_per_s']:.1f}/s; drained {r['drained']}"
        f" in {r['drain_s']:.0f} s, open queue jobs {r['open_queue_jobs']};"
        f" failures {r['failures'] or 0}"
    )


def verdicts(f: dict[str, Any]) -> dict[str, bool]:
    phases = (f["chaos"], f["baseline"])
    return {
        "nothing lost": all(p["inbound_lost"] == 0 and p["outbound_lost"] == 0 for p in phases),
        "no duplicate outside DUR-3's window": all(
            p["duplicates_outside_dur3"] == 0 and p["inbound_duplicates"] == 0 for p in phases
        ),
        "queues drained": all(p["drained"] and p["open_queue_jobs"] == 0 for p in phases),
        "RSS growth < 10%": all(g < 0.10 for g in f["rss_growth"].values()),
        "throughput with kills ≥ 80% of without": f["throughput_ratio"] >= 0.8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3, help="length of each phase")
    parser.add_argument("--kill-every", type=float, default=60, help="seconds between kills")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--inbound-rate", type=float, default=20, help="inbound messages/s")
    parser.add_argument("--send-rate", type=float, default=20, help="API sends/s")
    parser.add_argument("--warmup", type=float, default=15, help="seconds before RSS is read")
    parser.add_argument(
        "--drain-seconds", type=float, default=180, help="bound on each phase's drain"
    )
    output_arguments(parser)
    args = parser.parse_args()
    with workspace("chaos", args.no_postgres) as (tmp, backend, url):
        f = chaos_run(args, tmp, backend, url)
    growth = ", ".join(
        f"{name} {f['rss_kib']['start'][name] / 1024:.0f} → {f['rss_kib']['end'][name] / 1024:.0f}"
        f" MiB ({100 * g:+.1f}%)"
        for name, g in f["rss_growth"].items()
    )
    print(f"RSS of the long-lived processes: {growth}")
    print(
        f"throughput with kills {f['chaos']['throughput_per_s']:.1f}/s"
        f" vs without {f['baseline']['throughput_per_s']:.1f}/s:"
        f" {100 * f['throughput_ratio']:.0f}%"
    )
    checks = verdicts(f)
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    finish(args.json, {**f, "checks": checks}, all(checks.values()))


if __name__ == "__main__":
    main()
