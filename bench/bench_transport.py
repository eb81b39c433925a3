"""CPU per message of our SMTP hand-over (``RelayTransport.deliver``) against bare aiosmtplib.

    .venv/bin/python bench/bench_transport.py [--messages 2000] [--concurrency 8] [--rounds 3]

Both sides send the same DKIM-signed ~5 KB message to the same aiosmtpd sink, which runs in
a process of its own (sharing our interpreter it would eat the CPU and the lock we are
measuring), over connections opened beforehand and reused: ``--concurrency`` senders, each
on one connection for bare ``SMTP.sendmail``, and ``--concurrency`` concurrent ``deliver``
calls sharing the transport's session pool for ours. Nothing but the SMTP hand-over runs
(no database, no worker), so the difference is the transport's own bookkeeping. The two
sides alternate for ``--rounds`` rounds; the figures are each side's median CPU ms per
message (this process's CPU time, load-independent, unlike the rates, which are shown too).
Bounded: at most 20,000 messages per side and round; the sink stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosmtplib
from _drafts import bench_draft
from bench_delivery import _SinkProcess

from multimail.mail.compose import build_message
from multimail.mail.dkim import generate_rsa_keypair, sign_message
from multimail.smtp.outbound import RelayConfig, RelayTransport

DOMAIN = "bench.test"
SENDER = f"agent@{DOMAIN}"
RECIPIENTS = ["someone@example.org"]


def _message() -> bytes:
    """The message bench_delivery's worker sends: four paragraphs as text and HTML, signed."""
    draft = bench_draft(DOMAIN, to=RECIPIENTS[0])
    keypair = generate_rsa_keypair(2048)
    return sign_message(
        build_message(draft), domain=DOMAIN, selector="bench", private_pem=keypair.private_pem
    )


@dataclass
class _Run:
    seconds: float
    cpu_s: float


async def _timed(n: int, concurrency: int, send: Callable[[int], Awaitable[None]]) -> _Run:
    share = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(send(count) for count in share if count))
    return _Run(time.perf_counter() - started, time.process_time() - cpu)


async def _bench(
    port: int, raw: bytes, n: int, concurrency: int, rounds: int
) -> dict[str, list[_Run]]:
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port) for _ in range(concurrency)]
    for client in clients:
        await client.connect()
    free = list(clients)

    async def bare(count: int) -> None:
        client = free.pop()
        try:
            for _ in range(count):
                await client.sendmail(SENDER, RECIPIENTS, raw)
        finally:
            free.append(client)

    transport = RelayTransport(RelayConfig(host="127.0.0.1", port=port))

    async def ours(count: int) -> None:
        for _ in range(count):
            await transport.deliver(SENDER, RECIPIENTS, raw)

    # Warm both: open the pool's sessions, fill caches.
    await _timed(concurrency * 4, concurrency, bare)
    await _timed(concurrency * 4, concurrency, ours)
    runs: dict[str, list[_Run]] = {"bare": [], "ours": []}
    for _ in range(rounds):
        runs["bare"].append(await _timed(n, concurrency, bare))
        runs["ours"].append(await _timed(n, concurrency, ours))
    await transport.close()
    for client in clients:
        await client.quit()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per side and round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = max(1, min(args.messages, 20_000))
    concurrency = max(1, min(args.concurrency, 64))
    rounds = max(1, min(args.rounds, 10))
    raw = _message()
    with _SinkProcess() as sink:
        runs = asyncio.run(_bench(sink.port, raw, n, concurrency, rounds))
        accepted = sink.count
    expected = 2 * (n * rounds + concurrency * 4)
    print(
        f"messages: {n} per side x {rounds} rounds, {len(raw)} bytes each, concurrency "
        f"{concurrency}, sink accepted {accepted}/{expected}, "
        f"load average: {os.getloadavg()[0]:.2f}"
    )
    cpu = {}
    for side, label in (
        ("bare", "bare aiosmtplib sendmail, reused"),
        ("ours", "RelayTransport.deliver, pooled"),
    ):
        ms = [r.cpu_s * 1000 / n for r in runs[side]]
        rates = [n / r.seconds for r in runs[side]]
        cpu[side] = statistics.median(ms)
        print(
            f"{label:34s} {statistics.median(rates):8.1f} msg/s  {cpu[side]:6.3f} CPU ms/msg "
            f"(rounds: {', '.join(f'{m:.3f}' for m in ms)})"
        )
    print(f"ratio ours / bare CPU per message: {cpu['ours'] / cpu['bare']:.2f}")
    if accepted != expected:
        raise SystemExit("the sink did not get every message")


if __name__ == "__main__":
    main()
