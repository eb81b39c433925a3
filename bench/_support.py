"""What every bench shares, defined once, and light to import (a bench's child processes
import it again, and what they import counts in their CPU and memory figures): the databases
a bench runs on, the common part of its command line, waiting, percentiles. What needs the
application (services, ``serve`` processes, SMTP sinks) is in ``_stack``.

Benches run as scripts (``bench/`` is their ``sys.path[0]``), so they import this as
``from _support import ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

PG_ADMIN_URL = os.environ.get(
    "MULTIMAIL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

__all__ = [
    "ISSUE_DELIVERIES_PER_S",
    "ISSUE_ED25519_PER_S",
    "ISSUE_RSA_PER_S",
    "PG_ADMIN_URL",
    "Databases",
    "MachineSpeed",
    "databases",
    "finish",
    "machine_line",
    "machine_speed",
    "output_arguments",
    "percentile",
    "rate",
    "wait_for",
    "workspace",
]


# --------------------------------------------------------------------------- databases


class Databases:
    """Fresh databases per run: a data dir's own SQLite file, or a throw-away PostgreSQL one
    (dropped by :meth:`close`)."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def postgres_reachable(self) -> bool:
        try:
            self.url("postgresql", "probe")
        except Exception as exc:  # PostgreSQL is optional; say why it is absent
            print(f"(PostgreSQL skipped: {exc.__class__.__name__})")
            return False
        return True

    def url(self, backend: str, label: str) -> str | None:
        """A new empty database's URL; None for SQLite (the data dir's own file)."""
        if backend == "sqlite":
            return None
        name = f"mm_bench_{label}_{uuid.uuid4().hex[:8]}".replace("-", "_")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    def close(self) -> None:
        for name in self.created:
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@contextmanager
def databases() -> Iterator[Databases]:
    found = Databases()
    try:
        yield found
    finally:
        found.close()


@contextmanager
def workspace(label: str, no_postgres: bool) -> Iterator[tuple[Path, str, str | None]]:
    """``(tmp, backend, url)``: a temporary directory, and a fresh PostgreSQL database when
    reachable (dropped after), else SQLite (``url`` None: the data dir's own file)."""
    with tempfile.TemporaryDirectory(prefix=f"mm-bench-{label}-") as tmp, databases() as dbs:
        if not no_postgres and dbs.postgres_reachable():
            yield Path(tmp), "postgresql", dbs.url("postgresql", label)
        else:
            yield Path(tmp), "sqlite", None


# --------------------------------------------------------------------------- command line


def output_arguments(parser: argparse.ArgumentParser, *, postgres_optional: bool = True) -> None:
    """``--json FILE`` (where ``bench/run`` reads the figures) and ``--no-postgres``."""
    if postgres_optional:
        parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write figures here")


def finish(json_path: Path | None, figures: dict[str, Any], ok: bool = True) -> None:
    """Write the figures where ``--json`` asked; exit 1 when a check failed."""
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2))
    if not ok:
        sys.exit(1)


# --------------------------------------------------------------------------- waiting, figures


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def rate(
    call: Callable[[], object], seconds: float, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Calls of ``call`` per second of ``clock`` over a loop of about ``seconds`` (one call
    first, untimed, to warm caches)."""
    call()
    count = 0
    start = clock()
    while (elapsed := clock() - start) < seconds:
        call()
        count += 1
    return count / elapsed


# --------------------------------------------------------------------------- this machine

# Issue #3's reference machine, where its absolute targets were set (">= 1,000 DKIM-signed
# deliveries/s on this 2-core machine"): "RSA through `cryptography` (OpenSSL) does about
# 4,700/s and Ed25519 about 37,000/s" (RSA-2048 PKCS1v15/SHA-256 signatures, one core).
# Machines differ from session to session, so an absolute rate means little without the
# machine's speed beside it; the ratio targets are measured within one run and need none.
ISSUE_RSA_PER_S = 4700.0
ISSUE_ED25519_PER_S = 37000.0
ISSUE_DELIVERIES_PER_S = 1000.0


@dataclass(frozen=True)
class MachineSpeed:
    """One core's signatures per CPU second, and how that compares with issue #3's machine."""

    rsa_per_s: float
    ed25519_per_s: float

    @property
    def speed(self) -> float:
        """This machine's speed as a fraction of the issue's, by RSA-2048 signatures (what
        DKIM signing, the heaviest step of a delivery, spends its time on)."""
        return self.rsa_per_s / ISSUE_RSA_PER_S

    def figures(self) -> dict[str, float]:
        """For a bench's ``--json`` figures (``machine_line`` reads them back)."""
        return {
            "rsa2048_per_s": self.rsa_per_s,
            "ed25519_per_s": self.ed25519_per_s,
            "speed": self.speed,
            "issue_rsa2048_per_s": ISSUE_RSA_PER_S,
            "issue_ed25519_per_s": ISSUE_ED25519_PER_S,
            "issue_deliveries_per_s_here": ISSUE_DELIVERIES_PER_S * self.speed,
        }

    def line(self) -> str:
        return machine_line(self.figures())


def machine_line(figures: Mapping[str, float]) -> str:
    """The one line a bench prints (and the report shows) about this machine's speed, from
    :meth:`MachineSpeed.figures`."""
    return (
        f"machine: RSA-2048 {figures['rsa2048_per_s']:,.0f}/s,"
        f" Ed25519 {figures['ed25519_per_s']:,.0f}/s"
        f" (the issue's machine: {figures['issue_rsa2048_per_s']:,.0f}/s,"
        f" {figures['issue_ed25519_per_s']:,.0f}/s) → {figures['speed']:.2f} of its speed;"
        f" {ISSUE_DELIVERIES_PER_S:,.0f} deliveries/s there ≈"
        f" {figures['issue_deliveries_per_s_here']:,.0f}/s here"
    )


def machine_speed(seconds: float = 0.5, rounds: int = 3) -> MachineSpeed:
    """Measure one core as issue #3 did: ``cryptography`` RSA-2048 PKCS1v15/SHA-256 and
    Ed25519 signatures per second, about ``seconds`` each, the best of ``rounds`` rounds.

    Counted per CPU second of this thread, not per wall second: on a shared machine the
    scheduler's pauses would otherwise read as a slower CPU. The best round is the one least
    disturbed by neighbours (caches, frequency). Run it before a bench's measured phase, not
    during it.
    """
    # Imported here: this module is imported by benches' child processes, which never
    # measure the machine and whose import cost counts in their figures.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    data = b"issue #3 measured signatures per second; the data's size hardly matters"
    pkcs1v15, sha256 = padding.PKCS1v15(), hashes.SHA256()

    def sign_rsa() -> bytes:
        return rsa_key.sign(data, pkcs1v15, sha256)

    def sign_ed25519() -> bytes:
        return ed_key.sign(data)

    each = seconds / rounds
    return MachineSpeed(
        rsa_per_s=max(rate(sign_rsa, each, time.thread_time) for _ in range(rounds)),
        ed25519_per_s=max(rate(sign_ed25519, each, time.thread_time) for _ in range(rounds)),
    )
