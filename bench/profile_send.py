"""CPU per accepted send in the server, measured apart from the clients and the machine's load.

    .venv/bin/python bench/profile_send.py [--sends 400] [--clients 4] [--mode autonomous]
        [--yappi FILE] [--show]

The server (the real app under uvicorn, SQLite) runs in this process; the clients run in a
process of their own, so the CPU time this process spends (``time.process_time``: every
thread, the event loop and the threadpool where sync routes run) is the server's alone.
Printed: CPU ms per send, SQL statements per send, commits per send, and the CPU of the busiest
threads (the server's event loop is ``multimail-live``), each per send, from the same run.
With ``--yappi`` the run is profiled (cpu clock, all threads) and the top functions by total
time are printed and the stats saved in pstat format for later reading.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from send_setup import send_body, send_world
from sqlalchemy import event

from multimail.testing.server import LiveServer


def _clients(base_url: str, path: str, key: str, clients: int, sends: int) -> int:
    """Sends ``sends`` requests from ``clients`` threads; the number accepted."""
    per_client = sends // clients
    accepted = [0] * clients

    def run(index: int) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
            for n in range(per_client):
                response = client.post(path, json=send_body(index * 1_000_000 + n))
                if response.status_code in (200, 202):
                    accepted[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(accepted)


def _thread_cpu() -> dict[str, float]:
    """CPU seconds each live thread of this process has used, by thread name."""
    used: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            used[thread.name] = used.get(thread.name, 0.0) + time.clock_gettime(clock)
        except (OSError, ProcessLookupError):
            continue  # the thread ended between enumerate() and the clock read
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sends", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--mode", default="autonomous")
    parser.add_argument("--yappi", type=Path, default=None, help="profile; save pstats here")
    parser.add_argument("--repeat", type=int, default=3, help="report the least CPU of these")
    parser.add_argument("--show", action="store_true", help="print the statements of one send")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(1, mp_context=context) as pool:
        pool.submit(time.sleep, 0).result()  # start the client process before measuring
        services, boot, box = send_world(Path(tmp) / "mm", args.mode)
        counts = {"statements": 0, "commits": 0}
        showing = False

        def seen(*a: Any) -> None:
            statement = str(a[2]).lstrip().upper()
            if not statement.startswith(("BEGIN", "COMMIT", "PRAGMA")):
                counts["statements"] += 1
            if showing:
                print("   ", " ".join(statement.split())[:150])

        def committed(*_: Any) -> None:
            counts["commits"] += 1
            if showing:
                print("    COMMIT")

        event.listen(services.db.engine, "before_cursor_execute", seen)
        event.listen(services.db.engine, "commit", committed)
        path = f"/v1/mailboxes/{box}/send"
        with LiveServer(services) as live:
            pool.submit(_clients, live.base_url, path, boot.agent_key, 2, 40).result()  # warm
            if args.show:
                showing = True
                pool.submit(_clients, live.base_url, path, boot.agent_key, 1, 1).result()
                showing = False
            if args.yappi:
                import yappi

                yappi.set_clock_type("cpu")
                yappi.start(builtins=True, profile_threads=True)
            before = dict(counts)
            cpus: list[float] = []
            threads: list[dict[str, float]] = []
            wall0 = time.perf_counter()
            accepted = 0
            for _ in range(args.repeat):
                cpu0, threads0 = time.process_time(), _thread_cpu()
                done = pool.submit(
                    _clients, live.base_url, path, boot.agent_key, args.clients, args.sends
                ).result()
                cpus.append((time.process_time() - cpu0) / done)
                threads1 = _thread_cpu()
                threads.append(
                    {name: (threads1[name] - threads0.get(name, 0.0)) / done for name in threads1}
                )
                accepted += done
            wall = time.perf_counter() - wall0
            if args.yappi:
                yappi.stop()
        services.db.dispose()
    statements = (counts["statements"] - before["statements"]) / accepted
    commits = (counts["commits"] - before["commits"]) / accepted
    print(
        f"{accepted} sends ({args.mode}, {args.clients} clients): "
        f"{min(cpus) * 1000:.2f} CPU ms per send in the server (least of {args.repeat}; "
        f"all: {', '.join(f'{c * 1000:.2f}' for c in cpus)}), "
        f"{accepted / wall:.0f} sends/s wall, {statements:.1f} statements and "
        f"{commits:.2f} commits per send"
    )
    # Per thread, the run with the least CPU overall (the figure printed above).
    least = threads[cpus.index(min(cpus))]
    busiest = sorted(least.items(), key=lambda item: -item[1])[:4]
    print("    by thread: " + ", ".join(f"{name} {cpu * 1000:.2f} ms" for name, cpu in busiest))
    if args.yappi:
        stats = yappi.get_func_stats()
        stats.save(str(args.yappi), type="pstat")
        stats.sort("tsub")
        stats.print_all(
            columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8)},
        )


if __name__ == "__main__":
    main()
