"""Audit log benchmark: append rate under concurrent writers, verification speed, export memory.

    .venv/bin/python bench/bench_audit.py                  # SQLite, and PostgreSQL if reachable
    .venv/bin/python bench/bench_audit.py --export-entries 1000000

Every figure is printed beside a baseline measured in the same run:
- appends/s with 1 and 4 writer processes (each append its own transaction);
- verification entries/s (``audit.verify``: read from the database, re-encode canonically,
  SHA-256, link check) beside plain ``hashlib.sha256`` over the same canonical bytes
  (target: >= 100,000 entries/s);
- export of N entries as JSONL and CSV in a process of its own: entries/s and its peak RSS
  beside its RSS before exporting (target: under 200 MB for 1,000,000 entries, i.e.
  memory does not grow with N).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _support import Databases, databases, finish, output_arguments
from sqlalchemy import insert, text

from multimail.domain.audit import GENESIS_HASH, canonical_bytes, entry_hash
from multimail.services import audit
from multimail.services.context import Actor
from multimail.store import migrate
from multimail.store.db import Database
from multimail.store.tables import audit_entries


def synthetic_chain(count: int) -> Iterator[dict[str, Any]]:
    """Realistic entries (a message's life: created, scanned, approved, delivered), chained."""
    actions = ("message.created", "message.scanned", "oversight.approved", "message.delivered")
    prev = GENESIS_HASH
    for seq in range(1, count + 1):
        entry: dict[str, Any] = {
            "seq": seq,
            "at": f"2026-01-{1 + seq // 2_000_000:02d}T{(seq // 3600) % 24:02d}:"
            f"{(seq // 60) % 60:02d}:{seq % 60:02d}.{seq % 1000:03d}Z",
            "account_id": "acct_01hzzzzzzzzzzzzzzzzzzzzzzz",
            "actor_type": "key",
            "actor_id": "key_01hzzzzzzzzzzzzzzzzzzzzzzz",
            "actor_name": "refund-bot",
            "action": actions[seq % 4],
            "subject_type": "message",
            "subject_id": f"msg_{seq // 4:026d}",
            "mailbox_id": "mbx_01hzzzzzzzzzzzzzzzzzzzzzzz",
            "oversight_mode": "gated_send",
            "details": {"to": ["bob@example.net"], "subject": "Your refund", "score": seq % 7},
            "prev_hash": prev,
        }
        entry["hash"] = prev = entry_hash(entry)
        yield entry


def load(db: Database, count: int) -> None:
    batch: list[dict[str, Any]] = []
    for entry in synthetic_chain(count):
        details = json.dumps(entry["details"], sort_keys=True, separators=(",", ":"))
        batch.append({**entry, "details": details})
        if len(batch) == 20_000:
            with db.write() as conn:
                conn.execute(insert(audit_entries), batch)
            batch = []
    if batch:
        with db.write() as conn:
            conn.execute(insert(audit_entries), batch)
    if db.dialect == "postgresql":
        # A freshly bulk-loaded table makes its first reader set hint bits on every row; a
        # log that has lived for a while has been vacuumed, so measure that state.
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE audit_entries"))


class Backend:
    def __init__(self, name: str, url: str) -> None:
        self.name, self.url = name, url

    def fresh(self) -> Database:
        """An empty, migrated database (dropping what a previous step left)."""
        db = Database(self.url)
        migrate.upgrade(db)
        with db.write() as conn:
            if db.dialect == "postgresql":
                conn.execute(text("ALTER TABLE audit_entries DISABLE TRIGGER USER"))
                conn.execute(text("TRUNCATE audit_entries, audit_checkpoints"))
                conn.execute(text("ALTER TABLE audit_entries ENABLE TRIGGER USER"))
            else:
                conn.execute(text("DROP TRIGGER IF EXISTS audit_entries_no_delete"))
                conn.execute(text("DELETE FROM audit_entries"))
                conn.execute(text("DELETE FROM audit_checkpoints"))
        return db


def backends(tmp: Path, dbs: Databases) -> list[Backend]:
    found = [Backend("sqlite", f"sqlite:///{tmp / 'bench.db'}")]
    if dbs.postgres_reachable():
        url = dbs.url("postgresql", "audit")
        assert url is not None
        found.append(Backend("postgresql", url))
    return found


def _writer(url: str, name: str, count: int, start: Any) -> None:
    db = Database(url)
    actor = Actor(type="key", id=f"key_{name}", name=name, account_id="acct_bench")
    start.wait()
    for i in range(count):
        with db.write() as conn:
            audit.append(conn, actor=actor, action="bench.append", details={"i": i})
    db.dispose()


def append_rate(backend: Backend, writers: int, per_writer: int) -> float:
    backend.fresh().dispose()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [
        ctx.Process(target=_writer, args=(backend.url, f"w{n}", per_writer, start))
        for n in range(writers)
    ]
    for proc in procs:
        proc.start()
    time.sleep(1.0)  # let every process import and connect before the clock starts
    began = time.perf_counter()
    start.set()
    for proc in procs:
        proc.join()
    elapsed = time.perf_counter() - began
    db = Database(backend.url)
    result = audit.verify(db)
    db.dispose()
    assert result.ok and result.checked == writers * per_writer, "chain broken under load"
    return writers * per_writer / elapsed


def verification(backend: Backend, count: int) -> tuple[float, float, float]:
    db = backend.fresh()
    load(db, count)
    began = time.perf_counter()
    result = audit.verify(db)
    verify_rate = count / (time.perf_counter() - began)
    assert result.ok and result.checked == count
    canonical = [
        (e["prev_hash"].encode("ascii"), canonical_bytes(e)) for e in synthetic_chain(count)
    ]
    began = time.perf_counter()
    for prev, body in canonical:
        hashlib.sha256(prev + body).hexdigest()
    raw_rate = count / (time.perf_counter() - began)
    entries = list(audit.iter_entries(db))
    began = time.perf_counter()
    for entry in entries:
        entry_hash(entry)
    encode_rate = count / (time.perf_counter() - began)
    db.dispose()
    return verify_rate, encode_rate, raw_rate


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM restarts at exec; ru_maxrss would carry the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _export_child(url: str, fmt: audit.ExportFormat, target: str, out: Any) -> None:
    db = Database(url)
    audit.count_entries(db)  # connect and warm up before the baseline is taken
    baseline = _peak_rss_mb()
    began = time.perf_counter()
    count = 0
    with open(target, "w", encoding="utf-8") as handle:
        for line in audit.export_lines(audit.iter_entries(db), fmt):
            handle.write(line)
            count += 1
    elapsed = time.perf_counter() - began
    peak = _peak_rss_mb()
    db.dispose()
    out.put((count, elapsed, baseline, peak))


def export(
    backend: Backend, count: int, fmt: audit.ExportFormat, tmp: Path
) -> tuple[float, float, float]:
    """Rate, and peak RSS of a process that does nothing but export (before and after)."""
    db = backend.fresh()
    load(db, count)
    db.dispose()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(
        target=_export_child, args=(backend.url, fmt, str(tmp / f"export.{fmt}"), queue)
    )
    child.start()
    lines, elapsed, baseline, peak = queue.get()
    child.join()
    assert lines == count + (1 if fmt == "csv" else 0)
    return count / elapsed, baseline, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=400, help="appends per writer")
    parser.add_argument("--verify-entries", type=int, default=100_000)
    parser.add_argument(
        "--export-entries", type=int, default=200_000, help="1000000 for the target"
    )
    output_arguments(parser, postgres_optional=False)
    args = parser.parse_args()
    figures: dict[str, Any] = {
        "appends_per_writer": args.appends,
        "verify_entries": args.verify_entries,
        "export_entries": args.export_entries,
        "backends": {},
    }
    with tempfile.TemporaryDirectory() as tmp_dir, databases() as dbs:
        tmp = Path(tmp_dir)
        for backend in backends(tmp, dbs):
            print(f"\n== {backend.name}")
            one = append_rate(backend, 1, args.appends)
            four = append_rate(backend, 4, args.appends)
            print(f"append, 1 writer:   {one:10,.0f} entries/s")
            print(f"append, 4 writers:  {four:10,.0f} entries/s  ({four / one:.2f}x of 1 writer)")
            verify_rate, encode_rate, raw_rate = verification(backend, args.verify_entries)
            found: dict[str, Any] = {
                "append_1_per_s": one,
                "append_4_per_s": four,
                "verify_per_s": verify_rate,
                "entry_hash_per_s": encode_rate,
                "raw_hashlib_per_s": raw_rate,
                "export": {},
            }
            figures["backends"][backend.name] = found
            print(
                f"verify {args.verify_entries:,} entries: {verify_rate:10,.0f} entries/s"
                f"  (target 100,000: {'met' if verify_rate >= 100_000 else 'MISSED'})"
            )
            print(f"  domain entry_hash over dicts:      {encode_rate:10,.0f} entries/s")
            print(
                f"  raw hashlib SHA-256, same bytes:   {raw_rate:10,.0f} entries/s"
                f"  (verify is {raw_rate / verify_rate:.1f}x slower than raw hashing)"
            )
            formats: tuple[audit.ExportFormat, ...] = ("jsonl", "csv")
            for fmt in formats:
                rate, base, peak = export(backend, args.export_entries, fmt, tmp)
                found["export"][fmt] = {"per_s": rate, "before_mb": base, "peak_mb": peak}
                print(
                    f"export {args.export_entries:,} as {fmt:<5}: {rate:10,.0f} entries/s,"
                    f" peak RSS {peak:5.0f} MB (process before export: {base:.0f} MB;"
                    " target < 200 MB)"
                )
    print(f"\nbench process peak RSS: {_peak_rss_mb():.0f} MB (holds the baselines' data)")
    finish(args.json, figures)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
