"""APP-1: random sequences of send / decide / edit / cancel / schedule / time / worker runs,
against the real services, a real database and a capturing SMTP relay. After every step:

- everything the relay received from a gated message was approved first (the approval's audit
  entry precedes the delivery's), and its body is the approved — or reviewer-edited — text;
- rejected, cancelled and expired messages never arrive; nothing arrives twice.
"""

from __future__ import annotations

import email
import email.policy
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule
from pydantic import SecretStr
from sqlalchemy import select, update

from multimail.config import Settings
from multimail.errors import MultimailError
from multimail.ids import utcnow
from multimail.runtime import build_services
from multimail.services import accounts, keys, mailboxes, oversight, sending
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries, messages
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import delivery

MODES = ["gated_send", "gated_all", "monitored", "autonomous"]
GATED = {"gated_send", "gated_all"}


class World:
    def __init__(self, services: Services, relay: CapturingSMTPServer) -> None:
        self.services = services
        self.relay = relay
        boot = accounts.bootstrap(services.db, account_name="Gate", operator_email="gate@mm.test")
        self.agent = keys.authenticate(services.db, boot.agent_key)
        self.reviewer = keys.authenticate(services.db, boot.reviewer_key)
        operator = Actor(
            type="user", id="usr_test", name="operator", account_id=self.agent.account_id
        )
        with services.db.write() as conn:
            for mode in MODES:
                mailboxes.create_mailbox(
                    conn,
                    actor=operator,
                    settings=services.settings,
                    address=f"{mode.replace('_', '-')}@mm.test",
                    oversight_mode=mode,
                )


@pytest.fixture
def world(settings: Settings, boot: accounts.Bootstrap) -> Iterator[World]:
    del boot  # a first account exists; the machine makes its own
    with CapturingSMTPServer() as relay:
        svc = build_services(
            settings.model_copy(update={"smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}")}),
            run_migrations=False,
        )
        yield World(svc, relay)
        svc.db.dispose()


class GateMachine(RuleBasedStateMachine):
    world: World
    sent = Bundle("sent")

    def __init__(self) -> None:
        super().__init__()
        self.expected_body: dict[str, str] = {}  # message id -> text that must be delivered

    # --- actions -------------------------------------------------------------------------
    @initialize(target=sent)
    def a_gated_draft(self) -> str:
        """Every run starts with a draft waiting for a reviewer, so decisions have work."""
        return self.send("gated_send", None, False, "gate_first")

    @rule(
        target=sent,
        mode=st.sampled_from(MODES),
        requested=st.none() | st.sampled_from(MODES),
        scheduled=st.booleans(),
        timing=st.sampled_from(["gate_first", "schedule_first"]),
    )
    def send(self, mode: str, requested: str | None, scheduled: bool, timing: str) -> str:
        body = f"draft {uuid.uuid4().hex}"
        request = sending.SendRequest(
            to=["customer@example.com"],
            subject="Hello",
            markdown=body,
            oversight_mode=requested,
            send_at=(utcnow() + timedelta(hours=1)).isoformat() if scheduled else None,
            gate_timing=timing if scheduled else None,
        )
        result = sending.send(
            self.world.services,
            self.world.agent,
            mailbox_ref=f"{mode.replace('_', '-')}@mm.test",
            request=request,
        )
        message_id = str(result.response["id"])
        self.expected_body[message_id] = body
        return message_id

    @rule(message_id=sent, edit=st.booleans())
    def approve(self, message_id: str, edit: bool) -> None:
        revised = f"edited {uuid.uuid4().hex}" if edit else None
        try:
            oversight.decide(
                self.world.services,
                self.world.reviewer,
                email_id=message_id,
                action="approve",
                revised_markdown=revised,
            )
        except MultimailError:
            return  # not pending (already decided, cancelled, ungated): refused, nothing sent
        if revised:
            self.expected_body[message_id] = revised

    @rule(message_id=sent)
    def reject(self, message_id: str) -> None:
        try:
            oversight.decide(
                self.world.services,
                self.world.reviewer,
                email_id=message_id,
                action="reject",
                note="no",
            )
        except MultimailError:
            return

    @rule(message_id=sent)
    def agent_tries_to_approve_its_own(self, message_id: str) -> None:
        with pytest.raises(MultimailError):
            oversight.decide(
                self.world.services, self.world.agent, email_id=message_id, action="approve"
            )

    @rule(message_id=sent)
    def cancel(self, message_id: str) -> None:
        try:
            sending.cancel(self.world.services, self.world.agent, message_id)
        except MultimailError:
            return

    @rule(message_id=sent)
    def edit_draft(self, message_id: str) -> None:
        text = f"rewritten {uuid.uuid4().hex}"
        try:
            sending.edit_scheduled(
                self.world.services,
                self.world.agent,
                message_id,
                sending.ScheduleEdit(markdown=text),
            )
        except MultimailError:
            return
        self.expected_body[message_id] = text

    @rule(message_id=sent)
    def time_passes(self, message_id: str) -> None:
        """send_at arrives for one scheduled message, and its release job runs."""
        with self.world.services.db.write() as conn:
            conn.execute(
                update(messages)
                .where(messages.c.id == message_id, messages.c.send_at.is_not(None))
                .values(send_at=utcnow() - timedelta(seconds=1))
            )
        sending.release_scheduled(self.world.services, message_id)

    @rule()
    def worker_runs(self) -> None:
        """The delivery worker hands every queued or deferred message over."""
        with self.world.services.db.read() as conn:
            due = [
                r.id
                for r in conn.execute(
                    select(messages.c.id).where(messages.c.status.in_(["queued", "deferred"]))
                )
            ]
        for message_id in due:
            delivery.deliver_now(self.world.services, message_id, timeout=5.0)

    # --- the promise -----------------------------------------------------------------------
    @invariant()
    def only_approved_text_ever_reaches_smtp(self) -> None:
        received = self.world.relay.messages
        by_header: dict[str, list[Any]] = {}
        for captured in received:
            parsed = email.message_from_bytes(captured.data, policy=email.policy.default)
            by_header.setdefault(str(parsed["Message-ID"]), []).append(parsed)
        with self.world.services.db.read() as conn:
            rows = {
                r["message_id_header"]: dict(r)
                for r in conn.execute(
                    select(messages).where(messages.c.direction == "outbound")
                ).mappings()
            }
            for header, copies in by_header.items():
                row = rows.get(header)
                assert row is not None, f"the relay got a message we never created: {header}"
                assert len(copies) == 1, f"{row['id']} arrived {len(copies)} times"
                assert row["status"] not in ("rejected", "cancelled", "expired")
                if row["oversight_mode"] in GATED:
                    assert row["decision"] == "approve", f"{row['id']} sent without approval"
                    trail = [
                        e.action
                        for e in conn.execute(
                            select(audit_entries.c.action)
                            .where(audit_entries.c.subject_id == row["id"])
                            .order_by(audit_entries.c.seq)
                        )
                    ]
                    assert "message.approved" in trail and "message.delivered" in trail
                    assert trail.index("message.approved") < trail.index("message.delivered")
                expected = self.expected_body.get(row["id"])
                if expected is not None:
                    text = copies[0].get_body(preferencelist=("plain",)).get_content()
                    assert expected in text, (
                        f"{row['id']}: the received body is not the approved one"
                    )
            for row in rows.values():
                if row["status"] in ("rejected", "cancelled", "expired"):
                    assert row["message_id_header"] not in by_header


def test_the_gate_holds_under_random_sequences(world: World) -> None:
    """No gated message reaches SMTP without an approval recorded first; what arrives is what
    was approved; rejected and cancelled messages never arrive; nothing arrives twice."""
    GateMachine.world = world
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        GateMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    # Not vacuous: a gated draft approved here must arrive, and the runs delivered gated mail.
    machine = GateMachine()
    draft = machine.send("gated_all", "autonomous", False, "gate_first")
    machine.approve(draft, edit=True)
    machine.worker_runs()
    machine.only_approved_text_ever_reaches_smtp()
    with world.services.db.read() as conn:
        gated_delivered = conn.execute(
            select(messages.c.id).where(
                messages.c.status == "delivered", messages.c.oversight_mode.in_(sorted(GATED))
            )
        ).all()
    assert draft in {row.id for row in gated_delivered}
