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
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _stack import (
    audit_seqs,
    changed_bytes,
    make_desk,
    make_services,
    message_headers,
    relay_copies,
    serve,
    statuses,
)
from _support import finish, output_arguments, wait_for, workspace

from multimail.services import oversight, sending
from multimail.testing.smtp import CapturingSMTPServer

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

        workers = [serve(services, "worker", tmp / f"worker-{i}.log") for i in range(args.workers)]
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
                workers[victim] = serve(services, "worker", tmp / f"worker-{started}.log")
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
    output_arguments(parser)
    args = parser.parse_args()
    with workspace("crash", args.no_postgres) as (tmp, backend, url):
        figures = crash_run(args, tmp, backend, url)
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
    finish(args.json, figures, figures["ok"])


if __name__ == "__main__":
    main()
