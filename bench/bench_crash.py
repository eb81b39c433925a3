"""DUR-3 at scale: gated messages approved while worker processes are SIGKILLed.

    .venv/bin/python bench/bench_crash.py [--messages 1000] [--workers 2]
        [--kill-seconds 60] [--no-postgres] [--json FILE]

N gated messages are sent, then approved (the first 40% while the mailbox is paused, so the
worker processes, not this process's immediate hand-over after an approval, deliver them;
the rest race both paths) while ``multimail serve --role worker`` processes are SIGKILLed
at random moments and restarted. A CapturingSMTPServer relay counts arrivals by Message-ID.

Printed: messages, kills, received, lost (must be 0), duplicates and how many of them the
audit log explains (a ``delivery.recovered`` entry per extra copy: the "relay said 250, we
had not committed" window, the one duplicate SPEC §2 allows, always with the same
Message-ID and bytes), gated messages delivered without an approval before the delivery
(must be 0), and the wall time. A killed worker's claimed jobs come back when their lease
(two minutes under ``serve``) runs out, so the drain after the last kill can take that long.

This module also holds the helpers ``bench_load`` and ``bench_chaos`` share: the serve
subprocesses, an account with its mailboxes, and the relay's per-message copy count.
"""

from __future__ import annotations

import argparse
import email
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_scale import databases
from pydantic import SecretStr
from sqlalchemy import func, select

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts, keys, mailboxes, oversight, sending
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries, jobs, messages
from multimail.testing.smtp import CapturingSMTPServer

DOMAIN = "bench.test"
SERVE = [str(Path(sys.executable).parent / "multimail"), "serve", "--role"]

# --------------------------------------------------------------------------- shared helpers


def make_services(data_dir: Path, database_url: str | None, relay_port: int) -> Services:
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        domain=DOMAIN,
        smtp_url=SecretStr(f"smtp://127.0.0.1:{relay_port}"),
        rate_limit_per_minute=100_000_000,
        rate_limit_burst=100_000_000,
    )
    return build_services(settings)


class Serve:
    """One ``multimail serve --role <role>`` process on the bench's database and relay."""

    def __init__(self, services: Services, role: str, log: Path, **extra: str | int | None) -> None:
        settings = services.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIMAIL_")}
        env.update(
            MULTIMAIL_DATA_DIR=str(settings.data_dir),
            MULTIMAIL_DATABASE_URL=settings.effective_database_url,
            MULTIMAIL_DOMAIN=settings.domain,
            MULTIMAIL_SMTP_URL=settings.smtp_url.get_secret_value() if settings.smtp_url else "",
            MULTIMAIL_SECRET_KEY=services.extras["secret_key"].decode(),  # type: ignore[attr-defined]
            MULTIMAIL_RATE_LIMIT_PER_MINUTE="100000000",
            MULTIMAIL_RATE_LIMIT_BURST="100000000",
            MULTIMAIL_LOG_LEVEL="warning",
        )
        env.update({f"MULTIMAIL_{k.upper()}": str(v) for k, v in extra.items() if v is not None})
        self.role = role
        self.log = log
        self._handle = log.open("ab")
        self.proc = subprocess.Popen(
            [*SERVE, role], env=env, stdout=self._handle, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as after a power cut or the OOM killer."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._handle.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._handle.close()

    def rss_kib(self) -> int:
        """Resident memory now (0 once the process is gone)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0


@dataclass
class Desk:
    """One account with one mailbox per oversight mode, and its agent's and reviewer's keys."""

    services: Services
    boot: accounts.Bootstrap
    agent: Actor
    reviewer: Actor
    boxes: dict[str, dict[str, Any]]


def make_desk(services: Services, modes: tuple[str, ...]) -> Desk:
    boot = accounts.bootstrap(services.db, account_name="Bench", operator_email="o@bench.test")
    agent = keys.authenticate(services.db, boot.agent_key)
    reviewer = keys.authenticate(services.db, boot.reviewer_key)
    operator = Actor(type="system", id=None, name="bench", account_id=boot.account["id"])
    boxes: dict[str, dict[str, Any]] = {}
    with services.db.write() as conn:
        for mode in modes:
            boxes[mode] = mailboxes.create_mailbox(
                conn,
                actor=operator,
                settings=services.settings,
                address=f"{mode.replace('_', '-')}@{DOMAIN}",
                display_name="Agent",
                oversight_mode=mode,
            )
    return Desk(services, boot, agent, reviewer, boxes)


def message_headers(services: Services) -> dict[str, str]:
    """``{RFC Message-ID: our message id}`` for every outbound message."""
    with services.db.read() as conn:
        rows = conn.execute(
            select(messages.c.id, messages.c.message_id_header).where(
                messages.c.direction == "outbound"
            )
        )
        return {r.message_id_header: r.id for r in rows}


def relay_copies(relay: CapturingSMTPServer, headers: dict[str, str]) -> tuple[Counter[str], int]:
    """Copies of each of our messages at the relay, and how many arrivals were not ours.

    The operator's approval requests go through the same relay; they are the system's mail
    (``...system@<domain>`` Message-IDs) and are not counted.
    """
    copies: Counter[str] = Counter()
    strangers = 0
    for captured in relay.messages:
        header = email.message_from_bytes(captured.data)["Message-ID"] or ""
        if header.endswith(f".system@{DOMAIN}>"):
            continue
        if header in headers:
            copies[headers[header]] += 1
        else:
            strangers += 1
    return copies, strangers


def changed_bytes(relay: CapturingSMTPServer) -> int:
    """Messages that arrived twice with different bytes (a resend must reuse stored bytes)."""
    versions: dict[str, set[bytes]] = {}
    for captured in relay.messages:
        header = email.message_from_bytes(captured.data)["Message-ID"] or ""
        if not header.endswith(f".system@{DOMAIN}>"):
            versions.setdefault(header, set()).add(captured.data)
    return sum(1 for v in versions.values() if len(v) > 1)


def statuses(services: Services) -> Counter[str]:
    with services.db.read() as conn:
        rows = conn.execute(
            select(messages.c.status, func.count())
            .where(messages.c.direction == "outbound")
            .group_by(messages.c.status)
        )
        return Counter({r[0]: int(r[1]) for r in rows})


def open_jobs(services: Services) -> Counter[str]:
    with services.db.read() as conn:
        rows = conn.execute(
            select(jobs.c.kind, jobs.c.status, func.count())
            .where(jobs.c.status.in_(["pending", "running"]))
            .group_by(jobs.c.kind, jobs.c.status)
        )
        return Counter({f"{r[0]}:{r[1]}": int(r[2]) for r in rows})


def audit_seqs(services: Services) -> dict[str, dict[str, list[int]]]:
    """``{message id: {action: [seq, ...]}}``."""
    found: dict[str, dict[str, list[int]]] = {}
    with services.db.read() as conn:
        rows = conn.execute(
            select(audit_entries.c.subject_id, audit_entries.c.action, audit_entries.c.seq)
        )
        for r in rows:
            found.setdefault(str(r.subject_id), {}).setdefault(r.action, []).append(r.seq)
    return found


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


@contextmanager
def bench_database(no_postgres: bool, label: str) -> Iterator[tuple[str, str | None]]:
    """``(backend, url)``: a fresh PostgreSQL database when reachable (dropped after), else
    SQLite in the data dir."""
    with databases() as dbs:
        if not no_postgres and dbs.postgres_reachable():
            yield "postgresql", dbs.url("postgresql", label)
        else:
            yield "sqlite", None


# --------------------------------------------------------------------------- the bench


def crash_run(args: argparse.Namespace, tmp: Path, backend: str, url: str | None) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with CapturingSMTPServer() as relay:
        services = make_services(tmp / "data", url, relay.port)
        desk = make_desk(services, ("gated_send",))
        box = desk.boxes["gated_send"]["id"]

        def send(n: int) -> str:
            request = sending.SendRequest(
                to=[f"r{n}@example.test"], subject=f"Crash {n}", markdown=f"Body number {n}."
            )
            result = sending.send(services, desk.agent, mailbox_ref=box, request=request)
            return str(result.response["id"])

        began = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(send, range(args.messages)))
        print(f"{backend}: {len(ids)} gated messages sent in {time.perf_counter() - began:.1f} s")

        order = ids[:]
        rng.shuffle(order)
        split = int(len(order) * 0.4)
        approved = threading.Event()

        def approve(message_id: str) -> None:
            oversight.decide(services, desk.reviewer, email_id=message_id, action="approve")

        def approve_all() -> None:
            oversight.pause(services, desk.reviewer, box)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(approve, order[:split]))
            oversight.resume(services, desk.reviewer, box)
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(approve, order[split:]))
            approved.set()

        workers = [Serve(services, "worker", tmp / f"worker-{i}.log") for i in range(args.workers)]
        started = len(workers)
        kills = 0
        approver = threading.Thread(target=approve_all, name="approver")
        began = time.perf_counter()
        approver.start()
        kill_until = time.monotonic() + args.kill_seconds
        try:
            # A worker needs about a second to start: some die while starting, most at work.
            while time.monotonic() < kill_until and not (
                approved.is_set() and statuses(services) == Counter(delivered=len(ids))
            ):
                time.sleep(rng.uniform(0.3, 2.0))
                victim = rng.randrange(len(workers))
                workers[victim].kill()
                kills += 1
                workers[victim] = Serve(services, "worker", tmp / f"worker-{started}.log")
                started += 1
            kill_phase = time.perf_counter() - began
            approver.join()
            # Jobs claimed by a killed worker return when their lease runs out.
            drained = wait_for(
                lambda: statuses(services) == Counter(delivered=len(ids)), args.drain_seconds
            )
            time.sleep(0.5)  # anything still in flight arrives now
            wall = time.perf_counter() - began
        finally:
            for worker in workers:
                worker.stop()
        final = statuses(services)
        copies, strangers = relay_copies(relay, message_headers(services))
        changed = changed_bytes(relay)
        seqs = audit_seqs(services)
        services.db.dispose()

    lost = [i for i in ids if copies[i] == 0]
    duplicates = sum(max(0, copies[i] - 1) for i in ids)
    unexplained = 0
    ungated = 0
    for message_id in ids:
        actions = seqs.get(message_id, {})
        recovered = len(actions.get("delivery.recovered", []))
        unexplained += max(0, copies[message_id] - 1 - recovered)
        approvals = actions.get("message.approved", [])
        deliveries = actions.get("message.delivered", [])
        if copies[message_id] and (
            not approvals or (deliveries and min(approvals) > min(deliveries))
        ):
            ungated += 1
    return {
        "backend": backend,
        "messages": len(ids),
        "workers": args.workers,
        "kills": kills,
        "received": sum(1 for i in ids if copies[i]),
        "lost": len(lost),
        "duplicates": duplicates,
        "duplicates_unexplained": unexplained,
        "changed_bytes": changed,
        "strangers": strangers,
        "gated_without_approval": ungated,
        "drained": drained,
        "final_statuses": dict(final),
        "kill_phase_s": kill_phase,
        "wall_s": wall,
        "ok": not lost and unexplained == 0 and ungated == 0 and changed == 0 and drained,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-seconds", type=float, default=60, help="longest kill phase")
    parser.add_argument(
        "--drain-seconds", type=float, default=180, help="bound on the wait after the last kill"
    )
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write figures here")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="mm-bench-crash-") as tmp_dir,
        bench_database(args.no_postgres, "crash") as (backend, url),
    ):
        figures = crash_run(args, Path(tmp_dir), backend, url)
    print(
        f"{figures['backend']}: messages {figures['messages']:,}, kills {figures['kills']},"
        f" received {figures['received']:,}, lost {figures['lost']},"
        f" duplicates {figures['duplicates']}"
        f" (unexplained by delivery.recovered: {figures['duplicates_unexplained']},"
        f" changed bytes: {figures['changed_bytes']}),"
        f" gated without approval {figures['gated_without_approval']},"
        f" wall {figures['wall_s']:.1f} s (kill phase {figures['kill_phase_s']:.1f} s)"
    )
    print(f"final statuses: {figures['final_statuses']}; drained: {figures['drained']}")
    print("DUR-3 at scale: " + ("PASS" if figures["ok"] else "FAIL"))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not figures["ok"]:
        sys.exit(1)


__all__ = ["Desk", "Serve", "bench_database", "make_desk", "make_services"]

if __name__ == "__main__":
    main()
