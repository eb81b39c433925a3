"""Crashes and outages: workers killed with SIGKILL, the relay down, the database gone.

SPEC §2's invariant under faults: nothing accepted is lost, a gated message reaches SMTP only
after its approval is audited, and a message goes twice only from the "relay said 250, we had
not committed" window (DUR-3), then with the same Message-ID. ``/readyz`` says 503 while the
database or a worker role is away and 200 again by itself once it is back.
"""

from __future__ import annotations

import email
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url

from multimail.config import Settings
from multimail.ids import utcnow
from multimail.services import accounts, health, keys, mailboxes, oversight, sending
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries, messages
from multimail.store.tables import jobs as jobs_table
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import runner
from tests.conftest import BACKEND, PG_ADMIN_URL
from tests.integration import relay_support
from tests.integration.relay_support import relayed_services
from tests.integration.test_delivery_crash import Worker

relay = relay_support.relay


@pytest.fixture
def svc(settings: Settings, relay: CapturingSMTPServer) -> Iterator[Services]:
    with relayed_services(settings, relay) as services:
        yield services


class Desk:
    """One account: a mailbox in the given mode, the agent's and the reviewer's actors."""

    def __init__(self, services: Services, mode: str) -> None:
        self.services = services
        self.boot = accounts.bootstrap(services.db, account_name="Acme", operator_email="o@mm.test")
        agent = keys.authenticate(services.db, self.boot.agent_key)
        reviewer = keys.authenticate(services.db, self.boot.reviewer_key)
        assert isinstance(agent, Actor) and isinstance(reviewer, Actor)
        self.agent, self.reviewer = agent, reviewer
        operator = Actor(type="system", id=None, name="test", account_id=self.boot.account["id"])
        with services.db.write() as conn:
            self.mailbox = mailboxes.create_mailbox(
                conn,
                actor=operator,
                settings=services.settings,
                address="agent@mm.test",
                display_name="Agent",
                oversight_mode=mode,
            )

    def send(self, n: int) -> str:
        request = sending.SendRequest(
            to=[f"r{n}@example.test"], subject=f"Message {n}", markdown=f"Body number {n}."
        )
        result = sending.send(
            self.services, self.agent, mailbox_ref=self.mailbox["id"], request=request
        )
        return str(result.response["id"])

    def statuses(self) -> dict[str, str]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(messages.c.id, messages.c.status).where(messages.c.direction == "outbound")
            )
            return {r.id: r.status for r in rows}

    def jobs(self) -> Counter[str]:
        with self.services.db.read() as conn:
            rows = conn.execute(select(jobs_table.c.kind, jobs_table.c.status))
            return Counter(f"{r.kind}:{r.status}" for r in rows)

    def headers(self) -> dict[str, str]:
        with self.services.db.read() as conn:
            rows = conn.execute(select(messages.c.id, messages.c.message_id_header))
            return {r.message_id_header: r.id for r in rows}

    def audit_seqs(self) -> dict[str, dict[str, list[int]]]:
        """``{message id: {action: [seq, ...]}}``."""
        found: dict[str, dict[str, list[int]]] = {}
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(audit_entries.c.subject_id, audit_entries.c.action, audit_entries.c.seq)
            )
            for r in rows:
                found.setdefault(str(r.subject_id), {}).setdefault(r.action, []).append(r.seq)
        return found


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, state: Callable[[], object] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout} s; {state()}")
        time.sleep(0.05)


def received_ids(relay: CapturingSMTPServer, headers: dict[str, str]) -> Counter[str]:
    """How many copies of each of our messages the relay holds (by Message-ID)."""
    copies: Counter[str] = Counter()
    for captured in relay.messages:
        header = email.message_from_bytes(captured.data)["Message-ID"]
        if header.endswith(".system@mm.test>"):
            continue  # the operator's approval requests go through the same relay
        assert header in headers, f"the relay got a message we never wrote: {header}"
        copies[headers[header]] += 1
    return copies


# -- crash: workers killed with SIGKILL at random moments ------------------------------------


def test_gated_messages_approved_while_workers_are_killed_arrive_once(
    svc: Services, relay: CapturingSMTPServer, tmp_path: Path
) -> None:
    """100 gated messages approved while worker processes are SIGKILLed at random and
    restarted: each arrives; a second copy only for a message whose delivery was recovered
    from `sending` (the 250-before-commit window), with the same Message-ID and bytes; each
    delivery is preceded in the audit log by its approval."""
    desk = Desk(svc, "gated_send")
    ids = [desk.send(n) for n in range(100)]
    assert set(desk.statuses().values()) == {"pending_send_approval"}
    rng = random.Random(9)
    # Paused while the first 40 approvals land, so the killed workers (not this process's
    # immediate hand-over after an approval) deliver those; the other 60 race both paths.
    oversight.pause(svc, desk.reviewer, desk.mailbox["id"])
    order = ids[:]
    rng.shuffle(order)
    done = threading.Event()

    def approve(message_id: str) -> None:
        oversight.decide(svc, desk.reviewer, email_id=message_id, action="approve")

    kills = 0

    def after_a_kill(seen: int) -> None:
        # However fast delivery gets, approvals keep coming while workers die: each batch
        # waits for the kill after the previous one.
        deadline = time.monotonic() + 20
        while kills <= seen and time.monotonic() < deadline:
            time.sleep(0.02)

    def approve_all() -> None:
        # Several reviewers (few enough to stay inside the connection pool), ten approvals
        # a batch.
        with ThreadPoolExecutor(10) as pool:
            for batch in range(0, 40, 10):
                list(pool.map(approve, order[batch : batch + 10]))
                after_a_kill(kills)
        oversight.resume(svc, desk.reviewer, desk.mailbox["id"])
        with ThreadPoolExecutor(4) as pool:
            for batch in range(40, len(order), 20):
                list(pool.map(approve, order[batch : batch + 20]))
                after_a_kill(kills)
        done.set()

    approver = threading.Thread(target=approve_all)
    workers = [Worker(svc, tmp_path / f"w{i}.log", None) for i in range(2)]
    started = 2
    approver.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            not done.is_set() or set(desk.statuses().values()) != {"delivered"}
        ):
            # A worker needs about a second to start: kill some while starting, most at work.
            time.sleep(rng.uniform(0.3, 2.0))
            victim = rng.randrange(len(workers))
            workers[victim].kill()
            kills += 1
            workers[victim] = Worker(svc, tmp_path / f"w{started}.log", None)
            started += 1
        approver.join(30)
        wait_until(
            lambda: set(desk.statuses().values()) == {"delivered"},
            30,
            "all delivered",
            lambda: (Counter(desk.statuses().values()), desk.jobs()),
        )
        time.sleep(0.3)  # anything in flight would arrive now
    finally:
        for worker in workers:
            worker.kill()
    assert kills >= 3
    copies = received_ids(relay, desk.headers())
    assert set(copies) == set(ids), "a message was lost"
    seqs = desk.audit_seqs()
    for message_id in ids:
        actions = seqs[message_id]
        assert len(actions["message.approved"]) == 1
        assert min(actions["message.approved"]) < min(actions["message.delivered"])
        assert len(actions["message.delivered"]) == 1
        # Each extra copy needs its own worker death in the 250-before-commit window, after
        # which the next worker recovers the message from `sending`.
        recovered = len(actions.get("delivery.recovered", []))
        assert copies[message_id] <= 1 + recovered, (message_id, copies[message_id], actions)
    # Agents' messages are resent from their stored bytes. (The operator's approval requests
    # are rebuilt on a retry: same Message-ID, fresh Date and MIME boundaries.)
    by_id: dict[str, set[bytes]] = {}
    for captured in relay.messages:
        header = email.message_from_bytes(captured.data)["Message-ID"]
        if not header.endswith(".system@mm.test>"):
            by_id.setdefault(header, set()).add(captured.data)
    changed = [h for h, versions in by_id.items() if len(versions) > 1]
    assert not changed, f"a retry changed the bytes of {changed}"


# -- the relay down ----------------------------------------------------------------------------


def _advance_retries(services: Services) -> None:
    """Bring every deferred message's next attempt to now instead of sleeping through backoff."""
    now = utcnow()
    with services.db.write() as conn:
        conn.execute(
            update(messages).where(messages.c.status == "deferred").values(next_attempt_at=now)
        )
        conn.execute(
            update(jobs_table)
            .where(jobs_table.c.kind == "deliver", jobs_table.c.status == "pending")
            .values(run_at=now)
        )
    runner.wake()


def _live(services: Services) -> LiveServer:
    return LiveServer(services, components=[runner.run_workers])


def test_relay_down_defers_then_delivers_everything_once(
    svc: Services, relay: CapturingSMTPServer
) -> None:
    """While the relay answers 451 every message is deferred (none lost, none failed); once it
    is back and the retry time comes, each arrives exactly once."""
    desk = Desk(svc, "autonomous")
    relay.fail_with(451, "try again later", stage="mail")
    with _live(svc) as live:
        ids = [desk.send(n) for n in range(20)]
        wait_until(
            lambda: set(desk.statuses().values()) == {"deferred"}, 20, "all deferred while down"
        )
        assert not relay.messages
        ready = httpx.get(f"{live.base_url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text  # a relay outage is not ours to report
        relay.reset_behaviour()
        _advance_retries(svc)
        wait_until(lambda: set(desk.statuses().values()) == {"delivered"}, 20, "delivered")
        time.sleep(0.2)
    assert received_ids(relay, desk.headers()) == Counter(dict.fromkeys(ids, 1))


# -- readiness ---------------------------------------------------------------------------------


def test_readiness_tracks_worker_heartbeats(svc: Services) -> None:
    """A running worker beats and makes its role expected; a role silent for longer than the
    staleness limit makes readiness fail; a clean stop removes the beat, so a role scaled down
    on purpose does not."""
    with _live(svc) as live:
        wait_until(
            lambda: "jobs" in health.readiness(svc.db).checks.get("workers", {}),
            10,
            "the runner's first heartbeat",
        )
        body = httpx.get(f"{live.base_url}/readyz", timeout=5).json()
        assert body["checks"] == {"database": "ok", "workers": {"jobs": "ok"}}
        later = utcnow() + health.STALE_AFTER + timedelta(seconds=5)
        stale = health.readiness(svc.db, now=later)
        assert not stale.ready and stale.checks["workers"]["jobs"].startswith("stale")
    assert health.readiness(svc.db).checks["workers"] == {}
    # A killed worker leaves its row: the role is expected and late until another one beats.
    with svc.db.write() as conn:
        health.beat(conn, "jobs", "killed", now=utcnow() - timedelta(minutes=5))
    assert not health.readiness(svc.db).ready
    with svc.db.write() as conn:
        health.beat(conn, "jobs", "replacement")
    assert health.readiness(svc.db).ready


# -- the database gone -------------------------------------------------------------------------


def _database_name(url: str) -> str:
    name = make_url(url).database
    assert name
    return name


def _set_allowed(url: str, allowed: bool) -> None:
    """Open or close *our* test database only: other tests share the PostgreSQL server."""
    name = _database_name(url)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
    finally:
        admin.dispose()


@pytest.mark.skipif(
    BACKEND != "postgres",
    reason="a database restart needs a database server; SQLite is a file in the process",
)
def test_database_outage_makes_readyz_fail_and_recovery_is_automatic(
    svc: Services, relay: CapturingSMTPServer
) -> None:
    """Our PostgreSQL database refuses connections and every session is cut: /readyz answers
    503 while it is away and 200 again by itself afterwards; messages accepted before the
    outage and after it are all delivered, each once."""
    desk = Desk(svc, "autonomous")
    relay.fail_with(451, "busy", stage="mail")
    url = svc.settings.effective_database_url
    with _live(svc) as live:
        before = [desk.send(n) for n in range(10)]
        wait_until(lambda: set(desk.statuses().values()) == {"deferred"}, 20, "deferred")
        wait_until(
            lambda: httpx.get(f"{live.base_url}/readyz", timeout=5).status_code == 200,
            10,
            "ready before the outage",
        )
        _set_allowed(url, False)
        try:
            down = httpx.get(f"{live.base_url}/readyz", timeout=10)
            assert down.status_code == 503, down.text
            assert down.json()["checks"]["database"].startswith("unavailable")
            assert httpx.get(f"{live.base_url}/healthz", timeout=5).status_code == 200
            time.sleep(1.0)  # the workers meet the outage too
        finally:
            _set_allowed(url, True)
        relay.reset_behaviour()
        wait_until(
            lambda: httpx.get(f"{live.base_url}/readyz", timeout=5).status_code == 200,
            20,
            "ready again by itself",
        )
        after = [desk.send(n) for n in range(10, 20)]
        _advance_retries(svc)
        wait_until(lambda: set(desk.statuses().values()) == {"delivered"}, 30, "delivered")
        time.sleep(0.2)
    assert received_ids(relay, desk.headers()) == Counter(dict.fromkeys(before + after, 1))
