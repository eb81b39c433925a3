"""Audit of the outbound RELIABILITY.md tests (issue #3): each case here injects the fault a
RELIABILITY.md line names, with the real API, workers and a capturing relay, and asserts what
that line says must hold, where the tests named in docs/reliability.md inject a gentler fault
or assert less.

- APP-1: the state machine of ``test_gate_stateful`` plus time passing the approval expiry
  (the sweep), decisions by one-click link (also a link minted before an edit) and
  reviewer revisions by link-less API; expired and link-refused drafts never arrive.
- APP-2: an Approve link followed while the agent edits the draft approves nothing the
  operator was not shown (PostgreSQL: row locks order the two requests deterministically).
- APP-3: 50 concurrent decisions over every decision route (REST, batch, tool form,
  approval links; approve, approve with a revision, reject): one winner, every other 409,
  one decision audit entry, and the relay gets the winner's text once or nothing.
- API-4: concurrent duplicates over two API servers and both send routes, half with another
  body: one message, one delivery at the receiver, the others 200 (same body) or 422.
- API-5: an address suppressed after its message was approved (by a one-click
  unsubscribe, by another message's hard bounce), while the message waits for a retry,
  never receives it.
- AUTH-1: every kind of outbound mail (plain, HTML with attachment and non-ASCII subject,
  reply, reviewer-revised, the operator's approval request) verifies with dkimpy against the
  published key, with From oversigned and no ``l=``.
- SMTP-4: CR/LF, raw or RFC 2047-encoded, in each field of a send adds no header and no
  recipient at the receiver.

Strict xfails mark product defects found here: an Approve link approving an edit made while
it was followed (APP-2); the same JSON and key on POST /send_email after POST /v1/send
answering 422 when ``to`` is a string (API-4); a recipient dropped as suppressed on a retry
leaving no ``message.recipients_suppressed`` entry on the message (API-5).
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import dkim
import httpx
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.pool import NullPool

from multimail.errors import MultimailError
from multimail.ids import utcnow
from multimail.runtime import build_services
from multimail.services import notify, oversight
from multimail.store.tables import audit_entries, jobs, messages
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturedMessage
from multimail.workers import delivery, runner, signing
from tests.conftest import BACKEND
from tests.integration.send_support import Stack, customer_mail, stack
from tests.integration.test_gate_stateful import GateMachine, world

__all__ = ["stack", "world"]  # fixtures, re-exported so pytest finds them here

DECISIONS = ("message.approved", "message.rejected")


# --------------------------------------------------------------------------- helpers


def _wait(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)


def _from(stack: Stack, address: str) -> list[CapturedMessage]:
    return [m for m in stack.relay.messages if m.mail_from == address]


def _audit(stack: Stack, subject_id: str) -> list[dict[str, Any]]:
    with stack.services.db.read() as conn:
        rows = conn.execute(
            select(audit_entries)
            .where(audit_entries.c.subject_id == subject_id)
            .order_by(audit_entries.c.seq)
        ).mappings()
        return [dict(r) for r in rows]


def _link_path(link: str) -> str:
    return "/v1/approve/" + link.rsplit("/v1/approve/", 1)[1]


def _plain(captured: CapturedMessage) -> str:
    parsed = email.message_from_bytes(captured.data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    part = parsed.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def _make_due(stack: Stack, message_id: str) -> None:
    """Time passes to the deliver job's next retry; the in-process workers look at once."""
    with stack.services.db.write() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.dedupe_key == delivery.job_key(message_id))
            .values(run_at=utcnow() - timedelta(seconds=1))
        )
    runner.wake()


# --------------------------------------------------------------------------- APP-1


class ExpiryAndLinkMachine(GateMachine):
    """GateMachine with the RELIABILITY.md steps it leaves out: time passing the approval
    expiry (the sweep runs 30 days ahead), decisions by one-click link, and a link minted
    for a draft that the agent then edits. The invariants are GateMachine's."""

    def __init__(self) -> None:
        super().__init__()
        self.stale_links: dict[str, str] = {}

    @rule()
    def approval_expiry_passes(self) -> None:
        oversight.sweep_pending(self.world.services, now=utcnow() + timedelta(days=30))

    def _row(self, message_id: str) -> dict[str, Any]:
        with self.world.services.db.read() as conn:
            found = conn.execute(select(messages).where(messages.c.id == message_id))
            return dict(found.mappings().one())

    @rule(message_id=GateMachine.sent, approve=st.booleans())
    def decide_by_link(self, message_id: str, approve: bool) -> None:
        row = self._row(message_id)
        link = notify.approval_link(self.world.services, row, "approve" if approve else "reject")
        token = link.rsplit("/v1/approve/", 1)[1]
        try:
            oversight.decide_by_link(self.world.services, token)
        except MultimailError:
            return
        # The link approved the draft it showed: that text must be what arrives.
        self.expected_body[message_id] = str(row["markdown"])

    @rule(message_id=GateMachine.sent)
    def mint_a_link_then_edit(self, message_id: str) -> None:
        row = self._row(message_id)
        link = notify.approval_link(self.world.services, row, "approve")
        self.stale_links[message_id] = link.rsplit("/v1/approve/", 1)[1]
        self.edit_draft(message_id)

    @rule(message_id=GateMachine.sent)
    def follow_a_stale_link(self, message_id: str) -> None:
        token = self.stale_links.pop(message_id, None)
        if token is None:
            return
        before = self._row(message_id)
        try:
            oversight.decide_by_link(self.world.services, token)
        except MultimailError:
            return
        # Accepted only if the draft is still the one the link showed (the edit was refused).
        assert before["decision"] is None
        assert self._row(message_id)["markdown"] == before["markdown"]


def test_app1_gate_holds_with_expiry_links_and_stale_links(world: Any) -> None:
    """APP-1 with expiry, links and stale links: everything received was approved first and
    is the approved text; expired, rejected and cancelled drafts never arrive; once each."""
    ExpiryAndLinkMachine.world = world
    run_state_machine_as_test(
        ExpiryAndLinkMachine,
        settings=hypothesis_settings(
            max_examples=20,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    # Not vacuous: a draft past its expiry is expired by the sweep and never sent.
    machine = ExpiryAndLinkMachine()
    draft = machine.send("gated_send", None, False, "gate_first")
    machine.approval_expiry_passes()
    assert machine._row(draft)["status"] == "expired"
    machine.approve(draft, edit=False)
    machine.decide_by_link(draft, approve=True)
    # A link approves the draft it showed, and that text arrives.
    by_link = machine.send("gated_all", None, False, "gate_first")
    machine.decide_by_link(by_link, approve=True)
    # A link minted before an edit approves nothing.
    stale = machine.send("gated_send", None, False, "gate_first")
    machine.mint_a_link_then_edit(stale)
    machine.follow_a_stale_link(stale)
    machine.worker_runs()
    machine.only_approved_text_ever_reaches_smtp()
    assert machine._row(draft)["status"] == "expired"
    assert machine._row(by_link)["status"] == "delivered"
    assert machine._row(stale)["status"] == "pending_send_approval"


# --------------------------------------------------------------------------- APP-2


def _lock_waiters(conn: Any) -> int:
    return int(
        conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
    )


@pytest.mark.skipif(
    BACKEND != "postgres",
    reason="needs row locks queued in order (PostgreSQL); SQLite's busy wait has no order",
)
def test_app2_an_approve_link_never_approves_an_edit_it_did_not_show(stack: Stack) -> None:
    """An operator follows the Approve link of draft v1 while the agent edits it to v2: the
    edit lands between the link's check and its decision. The link must not approve v2
    (409, the draft stays pending with v2) and nothing reaches the relay."""
    box = stack.mailbox("agent", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": "ceo@bank.example", "subject": "Lunch", "markdown": "Lunch at noon?"},
    )
    assert sent.status_code == 202, sent.text
    message_id = sent.json()["id"]
    link = notify.approval_link(stack.services, stack.row(message_id), "approve")

    url = stack.services.settings.effective_database_url
    engine = create_engine(url, poolclass=NullPool)
    results: dict[str, httpx.Response] = {}
    try:
        with engine.connect() as watcher, engine.connect() as holder:
            holder.begin()
            # A slow transaction holds the draft's row: both requests queue behind it.
            holder.execute(
                text("SELECT id FROM messages WHERE id = :id FOR UPDATE"), {"id": message_id}
            )

            def edit() -> None:
                results["edit"] = agent.patch(
                    f"/v1/mailboxes/{box['id']}/emails/{message_id}/schedule",
                    json={"markdown": "Please wire $1M to account 7."},
                )

            def follow() -> None:
                results["link"] = httpx.post(stack.live.base_url + _link_path(link), timeout=30)

            editing = threading.Thread(target=edit)
            editing.start()
            _wait(lambda: _lock_waiters(watcher) >= 1, what="the edit waiting on the row")
            following = threading.Thread(target=follow)
            following.start()
            _wait(lambda: _lock_waiters(watcher) >= 2, what="the link waiting on the row")
            holder.commit()
            editing.join(30)
            following.join(30)
    finally:
        engine.dispose()
        agent.close()
    assert results["edit"].status_code == 200, results["edit"].text
    time.sleep(1.0)
    received = _from(stack, "agent@mm.test")
    assert not any(b"wire $1M" in m.data for m in received), "the link approved the edit"
    assert received == [], "the relay got a draft"
    row = stack.row(message_id)
    assert row["status"] == "pending_send_approval" and row["decision"] is None
    assert results["link"].status_code == 409


# --------------------------------------------------------------------------- APP-3


def _decision_call(stack: Stack, message_id: str, i: int, links: list[str]) -> Callable[[], Any]:
    """The i-th of 50 decisions: every route and both actions, some with a revision."""
    route = i % 6
    key = stack.boot.reviewer_key

    def api(path: str, body: dict[str, Any]) -> Callable[[], Any]:
        def call() -> tuple[str, httpx.Response, str | None]:
            with stack.client(key) as client:
                return (path, client.post(path, json=body), body.get("revised_markdown"))

        return call

    if route == 0:
        return api("/v1/oversight/decide", {"email_id": message_id, "action": "approve"})
    if route == 1:
        return api(
            "/v1/oversight/decide",
            {"email_id": message_id, "action": "approve", "revised_markdown": f"rev {i}"},
        )
    if route == 2:
        return api("/v1/oversight/decide", {"email_id": message_id, "action": "reject"})
    if route == 3:
        return api("/v1/oversight/decide", {"email_ids": [message_id], "action": "approve"})
    if route == 4:
        return api(
            "/decide_email",
            {"message_id": message_id, "decision": "approve" if i % 4 else "reject"},
        )
    link = links[i]

    def follow() -> tuple[str, httpx.Response, str | None]:
        return ("link", httpx.post(stack.live.base_url + _link_path(link), timeout=60), None)

    return follow


def test_app3_fifty_decisions_over_every_route_have_one_winner(stack: Stack) -> None:
    """50 concurrent decisions on one draft by REST, batch, tool form and approval links:
    exactly one succeeds, every other answers 409 (a batch entry: not ok, already decided);
    one decision audit entry; the relay gets the winner's text once, or nothing."""
    box = stack.mailbox("agent", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    for round_ in range(3):
        body = f"Original draft {round_} {uuid.uuid4().hex}"
        sent = agent.post(
            f"/v1/mailboxes/{box['id']}/send",
            json={"to": f"bob{round_}@example.test", "subject": "Numbers", "markdown": body},
        )
        assert sent.status_code == 202, sent.text
        message_id = sent.json()["id"]
        row = stack.row(message_id)
        links = [
            notify.approval_link(stack.services, row, "approve" if i % 2 else "reject")
            for i in range(50)
        ]
        calls = [_decision_call(stack, message_id, i, links) for i in range(50)]
        barrier = threading.Barrier(50)

        def run(call: Callable[[], Any], barrier: threading.Barrier = barrier) -> Any:
            barrier.wait()
            return call()

        with ThreadPoolExecutor(50) as pool:
            outcomes = list(pool.map(run, calls))

        winners = []
        for path, response, revision in outcomes:
            if path == "/v1/oversight/decide" and "results" in response.text:
                (entry,) = response.json()["results"]
                assert response.status_code == 200, response.text
                if entry["ok"]:
                    winners.append((path, revision))
                else:
                    assert entry["code"] in ("already_decided",), entry
            elif response.status_code == 200:
                winners.append((path, revision))
            else:
                assert response.status_code == 409, (path, response.status_code, response.text)
        assert len(winners) == 1, winners
        _, revision = winners[0]

        decided = [a for a in _audit(stack, message_id) if a["action"] in DECISIONS]
        assert len(decided) == 1, [a["action"] for a in decided]
        final = stack.settled(message_id)
        if final["decision"] == "reject":
            assert final["status"] == "rejected"
            time.sleep(0.5)
            assert [m for m in _from(stack, "agent@mm.test") if body in _plain(m)] == []
        else:
            assert final["status"] == "delivered", final["status"]
            expected = revision or body
            got = [m for m in _from(stack, "agent@mm.test") if m.rcpt_tos == [row["to"][0]]]
            time.sleep(0.3)
            got = [m for m in _from(stack, "agent@mm.test") if m.rcpt_tos == [row["to"][0]]]
            assert len(got) == 1, f"round {round_}: {len(got)} copies"
            assert expected in _plain(got[0])
    agent.close()


# --------------------------------------------------------------------------- API-4


def test_api4_concurrent_duplicates_over_two_servers_are_one_message_at_the_receiver(
    stack: Stack,
) -> None:
    """20 requests with one idempotency_key at once, through two API servers on one database
    and both send routes, a quarter with another subject: one message, one deliver job, one
    copy at the receiver; the answers are the one 202, 200s naming it, or 422 for the other
    body; a replay after delivery still names the original message."""
    box = stack.mailbox("agent", "autonomous")
    second = build_services(stack.services.settings, run_migrations=False)
    try:
        with LiveServer(second) as other:
            bases = [stack.live.base_url, other.base_url]
            barrier = threading.Barrier(20)
            key = "order-4711-confirmation"

            def one(i: int) -> tuple[str, httpx.Response]:
                subject = "Other subject" if i % 4 == 3 else "Order 4711"
                body = {
                    "to": ["customer@example.test"],
                    "subject": subject,
                    "markdown": "Your order shipped.",
                    "idempotency_key": key,
                }
                path = f"/v1/mailboxes/{box['id']}/send"
                if i % 4 == 2:
                    path, body = "/send_email", {**body, "mailbox_id": box["id"]}
                with httpx.Client(
                    base_url=bases[i % 2],
                    timeout=60,
                    headers={"Authorization": f"Bearer {stack.boot.agent_key}"},
                ) as client:
                    barrier.wait()
                    return subject, client.post(path, json=body)

            with ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(one, range(20)))
    finally:
        second.db.dispose()

    created = [(s, r) for s, r in answers if r.status_code == 202]
    assert len(created) == 1, sorted(r.status_code for _, r in answers)
    winner_subject, winner = created[0]
    message_id = winner.json()["id"]
    for subject, response in answers:
        if response.status_code == 200:
            assert response.json()["id"] == message_id and response.json()["idempotent"]
        else:
            assert response.status_code in (202, 422), response.text
            if response.status_code == 422:
                assert response.json()["code"] == "idempotency_key_reused"
                assert subject != winner_subject, "the winner's own body was refused"
    with stack.services.db.read() as conn:
        outbound = conn.execute(
            select(messages.c.id).where(messages.c.mailbox_id == box["id"])
        ).all()
        deliver_jobs = [
            j
            for j in conn.execute(select(jobs.c.payload).where(jobs.c.kind == "deliver"))
            if j.payload.get("message_id") in {r.id for r in outbound}
        ]
    assert [r.id for r in outbound] == [message_id]
    assert len(deliver_jobs) == 1
    assert stack.settled(message_id)["status"] == "delivered"
    time.sleep(0.5)
    received = _from(stack, "agent@mm.test")
    assert len(received) == 1
    assert email.message_from_bytes(received[0].data)["Subject"] == winner_subject
    with stack.client(stack.boot.agent_key) as agent:
        replay = agent.post(
            f"/v1/mailboxes/{box['id']}/send",
            json={
                "to": ["customer@example.test"],
                "subject": winner_subject,
                "markdown": "Your order shipped.",
                "idempotency_key": key,
            },
        )
    assert replay.status_code == 200 and replay.json()["id"] == message_id
    time.sleep(0.3)
    assert len(_from(stack, "agent@mm.test")) == 1


@pytest.mark.parametrize(
    "to",
    [
        pytest.param("customer@example.test", id="to-string"),
        pytest.param(["customer@example.test"], id="to-list"),
    ],
)
def test_api4_the_same_request_on_the_tool_route_replays(stack: Stack, to: Any) -> None:
    """The same JSON with the same idempotency_key sent to POST /v1/send and then to its
    tool form POST /send_email ("same behaviour", SPEC 5.2) is a replay: 200, the original
    message, nothing new at the receiver."""
    box = stack.mailbox("agent", "autonomous")
    body = {
        "from": box["address"],
        "to": to,
        "subject": "Order 4711",
        "markdown": "Your order shipped.",
        "idempotency_key": f"k-{uuid.uuid4().hex}",
    }
    with stack.client(stack.boot.agent_key) as agent:
        first = agent.post("/v1/send", json=body)
        assert first.status_code == 202, first.text
        again = agent.post("/send_email", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert stack.settled(first.json()["id"])["status"] == "delivered"
    time.sleep(0.3)
    assert len(_from(stack, "agent@mm.test")) == 1


# --------------------------------------------------------------------------- API-5


def _approved_and_deferred(stack: Stack, box: dict[str, Any], to: list[str], held: str) -> str:
    """A gated message to ``to``, approved by a reviewer while the relay defers ``held``."""
    stack.relay.fail_with(451, "try again later", stage="rcpt", only_for=[held])
    with stack.client(stack.boot.agent_key) as agent:
        sent = agent.post(
            f"/v1/mailboxes/{box['id']}/send",
            json={"to": to, "subject": "Your invoice", "markdown": f"Invoice {uuid.uuid4().hex}"},
        )
    assert sent.status_code == 202 and sent.json()["status"] == "pending_send_approval"
    message_id = sent.json()["id"]
    with stack.client(stack.boot.reviewer_key) as reviewer:
        decided = reviewer.post(
            "/v1/oversight/decide", json={"email_id": message_id, "action": "approve"}
        )
    assert decided.status_code == 200, decided.text
    _wait(lambda: stack.row(message_id)["status"] in ("deferred", "delivered"), what="attempt")
    assert stack.row(message_id)["status"] in ("deferred", "delivered")
    return message_id


def _unsubscribed_after_approval(stack: Stack) -> str:
    """Alice and Bob's approved message: Bob gets it, the relay defers Alice; then Alice
    follows the one-click unsubscribe link an earlier mail gave her (sent to her in other
    letter case) and the retry comes due. Returns the message's id once it settled."""
    news = stack.mailbox("news", "autonomous")
    box = stack.mailbox("billing", "gated_send")
    with stack.client(stack.boot.agent_key) as agent:
        earlier = agent.post(
            f"/v1/mailboxes/{news['id']}/send",
            json={"to": "Alice@Example.TEST", "subject": "News", "markdown": "Hello"},
        )
    assert stack.settled(earlier.json()["id"])["status"] == "delivered"
    (first,) = _from(stack, "news@mm.test")
    header = str(email.message_from_bytes(first.data)["List-Unsubscribe"])
    https = next(p.strip(" <>") for p in header.split(",") if "/v1/unsubscribe/" in p)

    message_id = _approved_and_deferred(
        stack, box, ["alice@example.test", "bob@example.test"], "alice@example.test"
    )
    one_click = httpx.post(
        stack.live.base_url + "/v1/unsubscribe/" + https.rsplit("/v1/unsubscribe/", 1)[1],
        data={"List-Unsubscribe": "One-Click"},
        timeout=30,
    )
    assert one_click.status_code == 200, one_click.text
    stack.relay.reset_behaviour()
    _make_due(stack, message_id)
    _wait(lambda: stack.row(message_id)["status"] in ("delivered", "send_failed"), what="retry")
    time.sleep(0.5)
    return message_id


def test_api5_unsubscribed_after_approval_never_receives_the_retry(stack: Stack) -> None:
    """API-5 by one-click unsubscribe: the approved message's retry skips Alice; Bob got it
    once; the message ends delivered (to Bob)."""
    message_id = _unsubscribed_after_approval(stack)
    to_alice = [m for m in _from(stack, "billing@mm.test") if "alice@example.test" in m.rcpt_tos]
    to_bob = [m for m in _from(stack, "billing@mm.test") if "bob@example.test" in m.rcpt_tos]
    assert to_alice == [] and len(to_bob) == 1
    assert stack.row(message_id)["status"] == "delivered"


def test_api5_a_recipient_dropped_as_suppressed_is_audited_on_the_message(
    stack: Stack,
) -> None:
    """The message's own trail says Alice was dropped as suppressed (as it does when the
    drop happens on a first attempt), not just a delivery to Bob."""
    message_id = _unsubscribed_after_approval(stack)
    trail = _audit(stack, message_id)
    dropped = [a for a in trail if a["action"] == "message.recipients_suppressed"]
    assert dropped, [a["action"] for a in trail]
    assert "alice@example.test" in str(dropped[-1]["details"])


def test_api5_hard_bounced_elsewhere_after_approval_never_receives(stack: Stack) -> None:
    """API-5 by a hard bounce: Carol's approved message waits for a retry; another message
    to her hard-bounces (suppressing her); the retry sends nothing and the message fails
    with the suppression as its reason."""
    news = stack.mailbox("news", "autonomous")
    box = stack.mailbox("billing", "gated_send")
    message_id = _approved_and_deferred(stack, box, ["carol@example.test"], "carol@example.test")
    stack.relay.fail_with(550, "no such user", stage="rcpt", only_for=["carol@example.test"])
    with stack.client(stack.boot.agent_key) as agent:
        bounced = agent.post(
            f"/v1/mailboxes/{news['id']}/send",
            json={"to": "carol@example.test", "subject": "News", "markdown": "Hello Carol"},
        )
    assert stack.settled(bounced.json()["id"])["status"] == "bounced"
    stack.relay.reset_behaviour()
    _make_due(stack, message_id)
    final = stack.settled(message_id)
    time.sleep(0.5)
    assert [m for m in stack.relay.messages if "carol@example.test" in m.rcpt_tos] == []
    assert final["status"] == "send_failed"
    assert "suppression" in (final["last_error"] or "")
    trail = [a["action"] for a in _audit(stack, message_id)]
    assert trail.index("message.approved") < trail.index("message.send_failed"), trail


# --------------------------------------------------------------------------- AUTH-1


def _published(stack: Stack) -> Callable[..., bytes | None]:
    name, value = signing.default_dkim_record(stack.services)

    def lookup(qname: bytes, timeout: int = 5) -> bytes | None:
        del timeout
        return value.encode() if qname.decode().rstrip(".").lower() == name.lower() else None

    return lookup


def _signature_tags(captured: CapturedMessage) -> dict[str, str]:
    header = email.message_from_bytes(captured.data)["DKIM-Signature"]
    assert header is not None, captured.data[:400]
    flat = "".join(str(header).split())
    return dict(t.split("=", 1) for t in flat.split(";") if "=" in t)


def test_auth1_every_kind_of_outbound_mail_verifies_with_dkimpy(stack: Stack) -> None:
    """A plain send, an HTML send with an attachment and a non-ASCII subject to To and Cc,
    a reply, a reviewer-revised approval and the operator's approval request mail: each
    verifies with plain dkimpy against the published record; From oversigned; no l=."""
    auto = stack.mailbox("agent", "autonomous")
    gated = stack.mailbox("careful", "gated_send", display_name="Zoë Agent")
    inbound_id = stack.inbound(customer_mail("agent@mm.test"), "agent@mm.test")
    with stack.client(stack.boot.agent_key) as agent:
        ids = [
            agent.post(
                f"/v1/mailboxes/{auto['id']}/send",
                json={"to": "a@example.test", "subject": "Plain", "text": "Plain text.\n"},
            ),
            agent.post(
                f"/v1/mailboxes/{auto['id']}/send",
                json={
                    "to": ["b@example.test"],
                    "cc": ["c@example.test"],
                    "subject": "Grüße aus Köln — 見積もり",
                    "html": "<p>Hallo <b>Welt</b></p>\n<p>.</p>",
                    "attachments": [
                        {
                            "filename": "Angebot Ü.pdf",
                            "content_type": "application/pdf",
                            "content_base64": base64.b64encode(b"%PDF-1.4\n" * 300).decode(),
                        }
                    ],
                },
            ),
            agent.post(
                f"/v1/mailboxes/{auto['id']}/reply/{inbound_id}",
                json={"markdown": "It ships **today**."},
            ),
        ]
        held = agent.post(
            f"/v1/mailboxes/{gated['id']}/send",
            json={"to": "d@example.test", "subject": "Offer", "markdown": "Draft offer"},
        )
    for sent in [*ids, held]:
        assert sent.status_code == 202, sent.text
    # The operator's approval request goes out (from <>) before anyone decides.
    _wait(lambda: [m for m in stack.relay.messages if m.mail_from == ""], what="operator mail")
    with stack.client(stack.boot.reviewer_key) as reviewer:
        decided = reviewer.post(
            "/v1/oversight/decide",
            json={
                "email_id": held.json()["id"],
                "action": "approve",
                "revised_markdown": "Revised offer: 10 % off\n\n.\n",
            },
        )
    assert decided.status_code == 200, decided.text
    for message_id in [*(s.json()["id"] for s in ids), held.json()["id"]]:
        assert stack.settled(message_id)["status"] == "delivered"
    captured = stack.relay.messages
    kinds = {m.mail_from for m in captured}
    assert {"agent@mm.test", "careful@mm.test", ""} <= kinds, kinds
    lookup = _published(stack)
    for got in captured:
        assert dkim.verify(got.data, dnsfunc=lookup), (got.mail_from, got.data[:600])
        tags = _signature_tags(got)
        assert "l" not in tags, got.mail_from
        signed = [h.lower() for h in tags["h"].split(":")]
        assert signed.count("from") >= 2, (got.mail_from, signed)


# --------------------------------------------------------------------------- SMTP-4

_EVIL = "thief@evil.example"
_B64_CRLF = base64.b64encode(b"x\r\nBcc: thief@evil.example").decode()
INJECTIONS: list[tuple[str, dict[str, Any]]] = [
    ("subject raw", {"subject": "Hi\r\nBcc: thief@evil.example"}),
    ("subject lf", {"subject": "Hi\nX-Injected: yes"}),
    ("subject encoded", {"subject": "=?utf-8?q?Hi=0D=0ABcc:_thief@evil.example?="}),
    ("subject b64", {"subject": f"=?utf-8?b?{_B64_CRLF}?="}),
    ("to name", {"to": ["Eve\r\nBcc: thief@evil.example <bob@example.test>"]}),
    ("to encoded name", {"to": [f"=?utf-8?b?{_B64_CRLF}?= <bob@example.test>"]}),
    ("to bare", {"to": ["bob@example.test\r\nBcc: thief@evil.example"]}),
    ("cc", {"cc": ["carol@example.test\nBcc: thief@evil.example"]}),
    ("bcc", {"bcc": ["carol@example.test\r\nX-Injected: yes"]}),
    (
        "attachment name",
        {
            "attachments": [
                {
                    "filename": "a.txt\r\nBcc: thief@evil.example",
                    "content_base64": base64.b64encode(b"hello").decode(),
                }
            ]
        },
    ),
    (
        "attachment encoded name",
        {
            "attachments": [
                {
                    "filename": f"=?utf-8?b?{_B64_CRLF}?=",
                    "content_base64": base64.b64encode(b"hello").decode(),
                }
            ]
        },
    ),
    (
        "attachment type",
        {
            "attachments": [
                {
                    "filename": "a.txt",
                    "content_type": "text/plain\r\nBcc: thief@evil.example",
                    "content_base64": base64.b64encode(b"hello").decode(),
                }
            ]
        },
    ),
    ("metadata", {"metadata": {"case": "1\r\nBcc: thief@evil.example"}}),
    ("thread id", {"thread_id": "zd-1\r\nBcc: thief@evil.example"}),
]


def test_smtp4_crlf_in_any_send_field_adds_no_header_or_recipient(stack: Stack) -> None:
    """Each field of a send carrying CR/LF (raw or RFC 2047) is refused (4xx, nothing sent)
    or delivered to exactly the intended recipients with no injected header line."""
    box = stack.mailbox("agent", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    refused: list[str] = []
    delivered: list[str] = []
    try:
        for name, fields in INJECTIONS:
            body = {
                "to": ["bob@example.test"],
                "subject": "Hello",
                "markdown": f"Case {name} {uuid.uuid4().hex}",
            } | fields
            before = len(stack.relay.messages)
            answer = agent.post(f"/v1/mailboxes/{box['id']}/send", json=body)
            if 400 <= answer.status_code < 500:
                refused.append(name)
                continue
            delivered.append(name)
            assert answer.status_code == 202, (name, answer.text)
            row = stack.settled(answer.json()["id"])
            assert row["status"] == "delivered", (name, row["status"], row["last_error"])
            _wait(lambda: len(stack.relay.messages) > before, what=name)  # noqa: B023
            for got in stack.relay.messages[before:]:
                assert _EVIL not in got.rcpt_tos, name
                assert set(got.rcpt_tos) <= {"bob@example.test", "carol@example.test"}, name
                head = got.data.split(b"\r\n\r\n", 1)[0]
                for line in head.split(b"\r\n"):
                    if line[:1] in (b" ", b"\t"):
                        continue
                    field = line.split(b":", 1)[0].strip().lower()
                    assert field not in (b"bcc", b"x-injected"), (name, line)
                    assert b"thief" not in line or field in (
                        b"subject",
                        b"x-multimail-metadata",
                    ), (name, line)
                parsed = email.message_from_bytes(got.data, policy=email.policy.default)
                rcpts = [
                    a
                    for f in ("To", "Cc")
                    for _, a in email.utils.getaddresses(parsed.get_all(f, []))
                ]
                assert _EVIL not in rcpts, (name, rcpts)
                assert len(parsed.get_all("Subject", [])) == 1, name
    finally:
        agent.close()
    assert delivered and refused, "both outcomes are exercised (subject: folded; to: refused)"
    time.sleep(0.5)
    assert all(_EVIL not in m.rcpt_tos for m in stack.relay.messages)
