"""Sends that arrive together may share a commit; each still stands or falls on its own."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from multimail.config import Settings
from multimail.errors import Forbidden
from multimail.runtime import build_services
from multimail.services import accounts, audit, keys, sending
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries, idempotency_keys, messages
from tests.integration.test_sending import make_mailbox

SENDERS = 16


def _mailbox(services: Services, boot: accounts.Bootstrap, name: str, mode: str) -> str:
    return str(make_mailbox(services, boot, name, mode)["id"])


def _send_together(
    services: Services, actor: Actor, requests: list[tuple[str, dict[str, Any]]]
) -> list[Any]:
    """Run every (mailbox, body) send at once; each slot gets its SendResult or exception."""
    outcomes: list[Any] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(index: int) -> None:
        mailbox, body = requests[index]
        start.wait()
        try:
            request = sending.SendRequest.model_validate(body)
            outcomes[index] = sending.send(services, actor, mailbox_ref=mailbox, request=request)
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_concurrent_sends_are_each_stored_with_their_audit_entries(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """16 sends at once: every caller gets its own message id, every message is stored once
    with its three audit entries, and the audit chain verifies."""
    box = _mailbox(services, boot, "together", "gated_send")
    agent = keys.authenticate(services.db, boot.agent_key)
    requests = [
        (box, {"to": f"c{n}@example.com", "subject": f"Order {n}", "markdown": "Shipped."})
        for n in range(SENDERS)
    ]
    outcomes = _send_together(services, agent, requests)
    assert all(isinstance(o, sending.SendResult) and o.created for o in outcomes), outcomes
    ids = [o.response["id"] for o in outcomes]
    assert len(set(ids)) == SENDERS
    with services.db.read() as conn:
        stored = conn.execute(select(messages.c.id, messages.c.subject)).all()
        per_message = Counter(
            conn.execute(
                select(audit_entries.c.subject_id).where(audit_entries.c.subject_id.in_(ids))
            ).scalars()
        )
    assert {row.id for row in stored} == set(ids)
    subjects = {o.response["id"]: o.response["subject"] for o in outcomes}
    assert all(subjects[row.id] == row.subject for row in stored)
    assert all(per_message[i] == 3 for i in ids), per_message
    assert audit.verify(services.db).ok


def test_a_refused_send_leaves_nothing_and_does_not_undo_its_neighbours(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """Half the sends claim an idempotency key and are then refused (read_only mailbox):
    those callers get their own 403 and leave no key behind; the other half are stored."""
    open_box = _mailbox(services, boot, "open", "autonomous")
    closed_box = _mailbox(services, boot, "closed", "read_only")
    agent = keys.authenticate(services.db, boot.agent_key)
    requests = [
        (
            closed_box if n % 2 else open_box,
            {"to": "c@example.com", "subject": f"N {n}", "text": "Hi", "idempotency_key": f"k{n}"},
        )
        for n in range(SENDERS)
    ]
    outcomes = _send_together(services, agent, requests)
    for n, outcome in enumerate(outcomes):
        if n % 2:
            assert isinstance(outcome, Forbidden), outcome
            assert outcome.code == "mailbox_read_only"
        else:
            assert isinstance(outcome, sending.SendResult) and outcome.created, outcome
    with services.db.read() as conn:
        kept_keys = set(conn.execute(select(idempotency_keys.c.key)).scalars())
        stored = conn.execute(select(func.count()).select_from(messages)).scalar_one()
    assert kept_keys == {f"k{n}" for n in range(0, SENDERS, 2)}
    assert stored == SENDERS // 2
    assert audit.verify(services.db).ok


def test_concurrent_sends_to_two_databases_each_land_in_their_own(
    settings: Settings, services: Services, boot: accounts.Bootstrap, tmp_path: Path
) -> None:
    """Two installations in one process (two databases) sending at the same moment: a
    shared commit never carries one database's send into the other."""
    if not services.db.is_sqlite:
        pytest.skip("shared commits are SQLite's")
    other = build_services(
        settings.model_copy(
            update={
                "data_dir": tmp_path / "other",
                "database_url": f"sqlite:///{tmp_path / 'other.db'}",
            }
        )
    )
    try:
        other_boot = accounts.bootstrap(other.db, account_name="Other", operator_email="o@mm.test")
        here = _mailbox(services, boot, "here", "autonomous")
        there = _mailbox(other, other_boot, "there", "autonomous")
        agents = {
            "here": (services, keys.authenticate(services.db, boot.agent_key), here),
            "there": (other, keys.authenticate(other.db, other_boot.agent_key), there),
        }
        rounds = 8
        outcomes: dict[str, list[Any]] = {"here": [], "there": []}
        start = threading.Barrier(2 * rounds)

        def run(name: str, n: int) -> None:
            svc, agent, box = agents[name]
            request = sending.SendRequest.model_validate(
                {"to": "c@example.com", "subject": f"{name} {n}", "text": "Hi"}
            )
            start.wait()
            try:
                result = sending.send(svc, agent, mailbox_ref=box, request=request)
                outcomes[name].append(result)
            except Exception as exc:
                outcomes[name].append(exc)

        threads = [
            threading.Thread(target=run, args=(name, n))
            for n in range(rounds)
            for name in ("here", "there")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for name, (svc, _, _) in agents.items():
            assert all(isinstance(o, sending.SendResult) for o in outcomes[name]), outcomes
            with svc.db.read() as conn:
                subjects = sorted(conn.execute(select(messages.c.subject)).scalars())
            assert subjects == sorted(f"{name} {n}" for n in range(rounds))
    finally:
        other.db.dispose()


class _Interrupted(BaseException):
    """Something no send catches (as KeyboardInterrupt would be)."""


def test_the_writer_thread_stops_when_idle_and_never_strands_a_send(
    services: Services,
) -> None:
    """The database's writer thread exits after a quiet second and the next send starts
    another; one killed by an error nothing catches answers its batch and is replaced."""
    if not services.db.is_sqlite:
        pytest.skip("shared commits are SQLite's")
    committer = sending._shared_commits(services.db)

    def ok(conn: Any, actor: Any) -> sending.SendResult:
        return sending.SendResult({"ok": True}, created=True)

    def interrupted(conn: Any, actor: Any) -> sending.SendResult:
        raise _Interrupted

    assert committer.run(ok).response == {"ok": True}
    deadline = time.monotonic() + committer.IDLE_SECONDS + 5
    while committer._writer is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert committer._writer is None
    assert committer.run(ok).response == {"ok": True}
    with pytest.raises(RuntimeError, match="interrupted"):
        committer.run(interrupted)
    assert committer.run(ok).response == {"ok": True}

    async def from_a_coroutine() -> sending.SendResult:
        return await committer.run_async(ok)

    assert asyncio.run(from_a_coroutine()).response == {"ok": True}
