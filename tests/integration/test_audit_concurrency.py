"""Separate processes appending to the audit log at once keep one linear, verifiable chain."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter

from sqlalchemy import select

from multimail.services import audit
from multimail.services.context import Services
from multimail.store.tables import audit_entries

PER_PROCESS = 60

WRITER = """
import sys
import time
from multimail.services import audit
from multimail.services.context import Actor
from multimail.store.db import Database

url, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = Database(url)
actor = Actor(type="system", id=name, name=name, account_id=None)
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdin.readline()  # start together, so the appends really interleave
for i in range(count):
    with db.write() as conn:
        audit.append(conn, actor=actor, action="test.append", details={"i": i})
    # SQLite's busy handler sleeps: without a pause the committing writer re-takes the lock
    # at once and the other never gets a turn.
    time.sleep(0.002)
db.dispose()
"""


def test_two_processes_appending_keep_one_linear_chain(services: Services) -> None:
    """2 processes, N appends each, each in its own transaction: 2N entries, seq 1..2N, one
    chain with no fork, every writer's entries all present and in its own order."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    url = services.settings.effective_database_url
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, f"writer-{n}", str(PER_PROCESS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for n in range(2)
    ]
    try:
        for proc in writers:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in writers:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in writers:
            assert proc.wait(timeout=120) == 0
    finally:
        for proc in writers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    result = audit.verify(services.db)
    assert result.ok, result.first_break
    with services.db.read() as conn:
        rows = conn.execute(
            select(audit_entries.c.seq, audit_entries.c.actor_id, audit_entries.c.details)
            .where(audit_entries.c.action == "test.append")
            .order_by(audit_entries.c.seq)
        ).all()
        prev_hashes = conn.execute(select(audit_entries.c.prev_hash)).scalars().all()
    assert Counter(r.actor_id for r in rows) == {"writer-0": PER_PROCESS, "writer-1": PER_PROCESS}
    assert result.checked == result.last_seq == audit.entry_count(services.db)
    assert len(set(prev_hashes)) == len(prev_hashes)  # no two entries share a parent: no fork
    for writer in ("writer-0", "writer-1"):
        mine = [
            audit.row_to_entry(r._mapping)["details"]["i"] for r in rows if r.actor_id == writer
        ]
        assert mine == list(range(PER_PROCESS))
    switches = sum(1 for a, b in itertools.pairwise(rows) if a.actor_id != b.actor_id)
    assert switches > 1, "the writers never interleaved; the test proved nothing"
