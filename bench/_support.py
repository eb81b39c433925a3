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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

PG_ADMIN_URL = os.environ.get(
    "MULTIMAIL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

__all__ = [
    "PG_ADMIN_URL",
    "Databases",
    "databases",
    "finish",
    "output_arguments",
    "percentile",
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
