"""``jobs.enqueue_many`` writes exactly the rows ``jobs.enqueue`` writes, in one statement."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text

from multimail.ids import utcnow
from multimail.services.context import Services
from multimail.store import jobs
from multimail.store.tables import jobs as jobs_table


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements sent to the database inside the block (BEGIN left out)."""
    seen: list[str] = []

    def on_statement(*args: Any) -> None:
        sql = str(args[2])
        if not sql.startswith("BEGIN"):
            seen.append(sql)

    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)


def _rows(services: Services, ids: list[str]) -> list[dict[str, Any]]:
    with services.db.read() as conn:
        query = select(jobs_table).where(jobs_table.c.id.in_(ids)).order_by(jobs_table.c.id)
        return [dict(r) for r in conn.execute(query).mappings()]


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A row without what differs by construction: the id and the moment it was written."""
    return {k: v for k, v in row.items() if k not in {"id", "run_at", "created_at", "updated_at"}}


def test_enqueue_many_writes_enqueues_rows_in_one_statement(services: Services) -> None:
    payloads: list[dict[str, Any]] = [{"inbound_id": f"inb_{n}"} for n in range(20)]
    payloads.append({"at": utcnow(), "n": 1.5})  # not plain JSON: stored as it reads back
    with services.db.write() as conn:
        one_by_one = [jobs.enqueue(conn, "process_inbound", p) for p in payloads]
    with statements(services.db.engine) as seen, services.db.write() as conn:
        together = jobs.enqueue_many(conn, [("process_inbound", p) for p in payloads])
    assert len(seen) == 1 and seen[0].startswith("INSERT INTO jobs"), seen
    assert len(together) == len(set(together)) == len(payloads)

    singles = {r["id"]: r for r in _rows(services, [i for i in one_by_one if i])}
    batch = {r["id"]: r for r in _rows(services, together)}
    expected = [_comparable(singles[i]) for i in one_by_one if i]
    assert [_comparable(batch[i]) for i in together] == expected
    for row in batch.values():
        assert row["status"] == "pending" and row["attempts"] == 0
        assert row["max_attempts"] == 50 and row["dedupe_key"] is None
        assert row["run_at"] == row["created_at"] == row["updated_at"]


def test_enqueue_many_takes_enqueues_options_and_nothing_is_no_statement(
    services: Services,
) -> None:
    later = utcnow() + timedelta(minutes=5)
    with statements(services.db.engine) as seen, services.db.write() as conn:
        assert jobs.enqueue_many(conn, []) == []
    assert seen == []
    with services.db.write() as conn:
        single = jobs.enqueue(conn, "deliver", {"message_id": "m"}, run_at=later, max_attempts=3)
        (many,) = jobs.enqueue_many(
            conn, [("deliver", {"message_id": "m"})], run_at=later, max_attempts=3
        )
    assert single is not None
    rows = {r["id"]: r for r in _rows(services, [single, many])}
    assert _comparable(rows[many]) == _comparable(rows[single])
    assert rows[many]["run_at"] == rows[single]["run_at"]
    with services.db.read() as conn:
        due_now = jobs.peek(conn, kinds=["deliver"])
    assert due_now == [], "a job enqueued for later is not due now"


def test_a_job_whose_payload_is_not_json_is_quarantined_and_the_others_are_claimed(
    services: Services,
) -> None:
    """DUR-4: SQLite stores any text in the JSON column; one row that does not decode must
    not make every peek and claim raise."""
    if not services.db.is_sqlite:
        pytest.skip("PostgreSQL refuses to store a payload that is not JSON")
    with services.db.write() as conn:
        broken = jobs.enqueue(conn, "deliver", {"message_id": "broken"})
        good = jobs.enqueue(conn, "deliver", {"message_id": "good"})
        conn.execute(
            text("UPDATE jobs SET payload = :raw WHERE id = :id"),
            {"raw": '{"message_id": "trunc', "id": broken},
        )
    with services.db.read() as conn:
        assert [j.id for j in jobs.peek(conn, kinds=["deliver"])] == [good]
    (claimed,) = jobs.claim(services.db, "w1", kinds=["deliver"])
    assert claimed.id == good and claimed.payload == {"message_id": "good"}
    assert claimed.attempts == 1
    with services.db.read() as conn:
        found = conn.execute(
            select(jobs_table.c.id, jobs_table.c.status).where(jobs_table.c.id.in_([broken, good]))
        )
        statuses = {row.id: row.status for row in found}
    assert statuses == {broken: "quarantined", good: "running"}
