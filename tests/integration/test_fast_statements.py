"""store.fast runs statements the way conn.execute does, on both databases.

Each case writes or reads through a :class:`Compiled` statement and through SQLAlchemy, and
compares what the database holds or returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import bindparam, event, func, select, update
from sqlalchemy.exc import IntegrityError

from multimail.ids import new_id
from multimail.store.db import Database
from multimail.store.fast import Compiled
from multimail.store.tables import accounts, events, jobs

NOW = datetime(2026, 11, 21, 13, 5, 7, 123456, tzinfo=UTC)

INSERT_EVENT = Compiled(events.insert())
SELECT_EVENT = Compiled(
    select(events.c.id, events.c.type, events.c.payload, events.c.created_at).where(
        events.c.id == bindparam("id")
    )
)
SELECT_ACCOUNT = Compiled(
    select(accounts.c.id, accounts.c.paused, accounts.c.created_at, accounts.c.deleted_at).where(
        accounts.c.id == bindparam("id"), accounts.c.status == "active"
    )
)
RETRY_JOB = Compiled(
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"), jobs.c.status == "pending")
    .values(attempts=jobs.c.attempts + 1, last_error=bindparam("error"))
)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url if "://" in db_url else f"sqlite:///{db_url}")
    with database.write() as conn:
        conn.execute(
            accounts.insert(),
            {"id": "acct_fast", "name": "fast", "created_at": NOW, "updated_at": NOW},
        )
    yield database
    database.dispose()


def _event(payload: Any, at: datetime = NOW) -> dict[str, Any]:
    return {
        "id": new_id("evt"),
        "account_id": "acct_fast",
        "mailbox_id": None,
        "message_id": "msg_x",
        "type": "message.sent",
        "payload": payload,
        "created_at": at,
    }


def _stored_event(db: Database, event_id: str) -> dict[str, Any]:
    with db.read() as conn:
        row = conn.execute(select(events).where(events.c.id == event_id)).mappings().one()
    return {k: v for k, v in row.items() if k != "seq"} | {"id": "-"}


def test_an_insert_stores_what_sqlalchemy_stores(db: Database) -> None:
    payload = {"to": ["a@example.com"], "n": 1, "nested": {"ok": True, "none": None}}
    fast, slow = _event(payload), _event(payload)
    with db.write() as conn:
        assert INSERT_EVENT.execute(conn, fast) == 1
        conn.execute(events.insert(), slow)
    assert _stored_event(db, fast["id"]) == _stored_event(db, slow["id"])
    stored = _stored_event(db, fast["id"])
    assert stored["payload"] == payload
    assert stored["created_at"].replace(tzinfo=UTC) == NOW


def test_a_select_returns_what_sqlalchemy_returns(db: Database) -> None:
    row = _event({"k": [1, 2.5, "x"]})
    with db.write() as conn:
        INSERT_EVENT.execute(conn, row)
    with db.read() as conn:
        fast = SELECT_EVENT.first(conn, {"id": row["id"]})
        slow = conn.execute(SELECT_EVENT_STATEMENT, {"id": row["id"]}).mappings().one()
        account = SELECT_ACCOUNT.first(conn, {"id": "acct_fast"})
        account_slow = conn.execute(SELECT_ACCOUNT_STATEMENT, {"id": "acct_fast"}).mappings().one()
        assert SELECT_EVENT.first(conn, {"id": "evt_none"}) is None
        assert SELECT_EVENT.scalar(conn, {"id": row["id"]}) == row["id"]
    assert fast == dict(slow)
    assert account == dict(account_slow)
    assert account is not None and account["paused"] is False and account["deleted_at"] is None


SELECT_EVENT_STATEMENT = select(
    events.c.id, events.c.type, events.c.payload, events.c.created_at
).where(events.c.id == bindparam("id"))
SELECT_ACCOUNT_STATEMENT = select(
    accounts.c.id, accounts.c.paused, accounts.c.created_at, accounts.c.deleted_at
).where(accounts.c.id == bindparam("id"), accounts.c.status == "active")


def test_update_uses_literal_and_given_parameters_and_counts_rows(db: Database) -> None:
    job = {
        "id": new_id("job"),
        "kind": "deliver",
        "payload": {"message_id": "msg_1"},
        "run_at": NOW,
        "created_at": NOW,
        "updated_at": NOW,
    }
    with db.write() as conn:
        conn.execute(jobs.insert(), job)
        assert RETRY_JOB.execute(conn, {"job_id": job["id"], "error": "421 busy"}) == 1
        assert RETRY_JOB.execute(conn, {"job_id": "job_missing", "error": "x"}) == 0
    with db.read() as conn:
        stored = conn.execute(select(jobs).where(jobs.c.id == job["id"])).mappings().one()
    assert (stored["attempts"], stored["last_error"]) == (1, "421 busy")


def test_a_missing_parameter_is_refused_before_the_driver(db: Database) -> None:
    with db.write() as conn, pytest.raises(KeyError, match="error"):
        RETRY_JOB.execute(conn, {"job_id": "job_x"})


def test_executemany_inserts_every_row_inside_the_callers_transaction(db: Database) -> None:
    rows = [_event({"i": i}) for i in range(5)]
    with pytest.raises(RuntimeError), db.write() as conn:
        INSERT_EVENT.executemany(conn, rows)
        with db.engine.connect() as other:
            # SQLite: the other connection does not see uncommitted rows either way.
            assert (
                other.execute(select(events.c.id).where(events.c.id == rows[0]["id"])).first()
                is None
            )
        raise RuntimeError("roll back")
    with db.read() as conn:
        assert (
            conn.execute(select(events.c.id).where(events.c.account_id == "acct_fast")).all() == []
        )
    with db.write() as conn:
        INSERT_EVENT.executemany(conn, rows)
    with db.read() as conn:
        stored = conn.execute(select(events.c.payload).order_by(events.c.seq)).scalars().all()
    assert stored == [{"i": i} for i in range(5)]


def test_a_constraint_violation_raises_sqlalchemys_error(db: Database) -> None:
    row = _event({})
    with db.write() as conn:
        INSERT_EVENT.execute(conn, row)
    with pytest.raises(IntegrityError), db.write() as conn:
        INSERT_EVENT.execute(conn, row)
    # The failed transaction left the connection usable and the first row alone.
    with db.read() as conn:
        assert SELECT_EVENT.first(conn, {"id": row["id"]}) is not None


def test_statement_listeners_see_fast_statements(db: Database) -> None:
    seen: list[str] = []

    def on_statement(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(db.engine, "before_cursor_execute", on_statement)
    try:
        with db.write() as conn:
            INSERT_EVENT.execute(conn, _event({}))
    finally:
        event.remove(db.engine, "before_cursor_execute", on_statement)
    assert any(s.lstrip().upper().startswith("INSERT INTO EVENTS") for s in seen)


def test_expanding_in_lists_of_any_length_match_sqlalchemy(db: Database) -> None:
    rows = [_event({"i": i}, NOW + timedelta(seconds=i)) for i in range(4)]
    by_ids = select(events.c.id, events.c.payload).where(
        events.c.id.in_(bindparam("ids", expanding=True)),
        events.c.created_at.in_(bindparam("times", expanding=True)),
        events.c.type == "message.sent",
    )
    fast = Compiled(by_ids)
    with db.write() as conn:
        INSERT_EVENT.executemany(conn, rows)
        for ids, times in (
            ([], [NOW]),
            ([rows[0]["id"]], [NOW]),
            ([r["id"] for r in rows], [NOW, NOW + timedelta(seconds=2)]),
            ([r["id"] for r in rows[1:]], [r["created_at"] for r in rows]),
        ):
            params = {"ids": ids, "times": times}
            got = sorted(fast.all(conn, params), key=lambda r: r["id"])
            want = conn.execute(by_ids, params).mappings().all()
            assert got == sorted((dict(r) for r in want), key=lambda r: r["id"])
        assert len(fast.all(conn, {"ids": [r["id"] for r in rows], "times": [NOW]})) == 1
        with pytest.raises(TypeError, match="executemany"):
            fast.executemany(conn, [{"ids": ["a"], "times": [NOW]}])


def test_statements_that_need_execution_time_work_are_refused(db: Database) -> None:
    literal = Compiled(select(events.c.id).where(events.c.id == literal_column_param()))
    with db.read() as conn, pytest.raises(TypeError, match="literal parameter"):
        literal.all(conn, {"given": "a"})


def literal_column_param() -> Any:
    return bindparam("given", literal_execute=True)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=json_values,
    at=st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
)
def test_any_json_and_time_round_trip_like_sqlalchemy(
    db: Database, payload: Any, at: datetime
) -> None:
    fast, slow = _event(payload, at), _event(payload, at)
    with db.write() as conn:
        INSERT_EVENT.execute(conn, fast)
        conn.execute(events.insert(), slow)
    with db.read() as conn:
        a = SELECT_EVENT.first(conn, {"id": fast["id"]})
        b = SELECT_EVENT.first(conn, {"id": slow["id"]})
        c = conn.execute(SELECT_EVENT_STATEMENT, {"id": fast["id"]}).mappings().one()
    assert a is not None and b is not None
    assert {**a, "id": "-"} == {**b, "id": "-"}
    assert a == dict(c)
    assert a["payload"] == payload
    assert a["created_at"].replace(tzinfo=UTC) - at == timedelta(0)


def test_constant_literal_parameters_are_written_into_the_sql(db: Database) -> None:
    # aggregate_strings' separator is a literal SQLAlchemy renders at execution time.
    joined = select(func.aggregate_strings(events.c.type, "\n").label("types")).where(
        events.c.account_id == bindparam("account_id")
    )
    with db.write() as conn:
        INSERT_EVENT.executemany(conn, [_event({}), _event({})])
        fast = Compiled(joined).scalar(conn, {"account_id": "acct_fast"})
        slow = conn.execute(joined, {"account_id": "acct_fast"}).scalar()
    assert fast == slow == "message.sent\nmessage.sent"
