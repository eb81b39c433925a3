"""Regression tests for the decision guards and the sweep (SPEC §2, Oversight).

- A revision is the edit of one draft: a batch carrying one is refused whole (422).
- The reviewer's revision is scanned like a draft; a blocking finding refuses the approval.
- A decision on a draft past its approval expiry expires it (as the sweep would) and answers
  409 ``approval_expired``: API, batch and one-click link alike.
- The sweep reads only due rows, in bounded batches, until none is left.

Live server and real services (fixtures from ``oversight_support``); nothing is mocked.
"""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from multimail.ids import utcnow
from multimail.services import accounts, notify, oversight
from multimail.services.context import Services
from multimail.store.tables import events
from multimail.testing.smtp import CapturingSMTPServer
from tests.conftest import Api
from tests.integration.oversight_support import (
    agent_id,
    audit_actions,
    box,
    event_types,
    job_rows,
    make_mailbox,
    make_message,
    message_row,
    relay,
    settings,
    subscribe_everything,
)

__all__ = [
    "agent_id",
    "box",
    "relay",
    "settings",
]  # fixtures, re-exported so pytest finds them here

PAST_THE_GATE = ("queued", "sending", "deferred", "delivered", "scheduled")
PEM = (
    "Here is the key:\n\n-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAx3Zk8vJ2mA9Qp7cL0rS1tU2vW3xY4zA5bB6cC7dD8eE9fF0g\n"
    "-----END RSA PRIVATE KEY-----\n"
)
LINK = re.compile(r"\((http://[^)]+/v1/approve/[^)]+)\)")


def _actions(services: Services, message_id: str) -> list[str]:
    return [a["action"] for a in audit_actions(services, message_id)]


# --- 1. a revision belongs to one draft --------------------------------------------------------


@pytest.mark.parametrize(
    "revision",
    [{"revised_body": "Dear Ann, 40 EUR."}, {"revised_subject": "Refund"}],
    ids=["body", "subject"],
)
def test_a_batch_with_a_revision_is_refused_whole(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    agent_id: str,
    revision: dict[str, str],
) -> None:
    """A revised subject or body with several email_ids: 422 revision_needs_one_message, and
    no message of the batch is decided or changed."""
    a = make_message(services, box, created_by_key_id=agent_id, markdown="Dear Ann.")
    b = make_message(services, box, created_by_key_id=agent_id, markdown="Dear Ben.")
    response = api.client(boot.reviewer_key).post(
        "/v1/oversight/decide",
        json={"email_ids": [a["id"], b["id"]], "action": "approve", **revision},
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "revision_needs_one_message"
    assert "email_id" in body["error"]
    for before in (a, b):
        stored = message_row(services, before["id"])
        assert stored["status"] == "pending_send_approval" and stored["decision"] is None
        assert (stored["subject"], stored["markdown"]) == (before["subject"], before["markdown"])
        assert "message.approved" not in _actions(services, before["id"])


def test_a_batch_of_one_message_may_carry_its_revision(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """The same id named twice is one message: its revision applies to it."""
    a = make_message(services, box, created_by_key_id=agent_id, markdown="Dear Ann.")
    response = api.client(boot.reviewer_key).post(
        "/v1/oversight/decide",
        json={"email_ids": [a["id"], a["id"]], "action": "approve", "revised_body": "Dear Ann!"},
    )
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert result["ok"] and result["decision"]["edited"] is True
    stored = message_row(services, a["id"])
    assert stored["markdown"] == "Dear Ann!" and stored["original_markdown"] == "Dear Ann."


# --- 2. the revision is scanned ------------------------------------------------------------


def test_a_revision_with_a_blocking_finding_is_refused_and_nothing_changes(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    agent_id: str,
    relay: CapturingSMTPServer,
) -> None:
    """422 scan_blocked with the findings (the envelope a scheduled edit gets); the draft stays
    pending as written; a clean revision is then approved and its findings are stored."""
    msg = make_message(services, box, created_by_key_id=agent_id)
    reviewer = api.client(boot.reviewer_key)
    refused = reviewer.post(
        "/v1/oversight/decide",
        json={"email_id": msg["id"], "action": "approve", "revised_body": PEM},
    )
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert body["code"] == "scan_blocked" and "private key" in body["error"]
    assert "private_key" in [f["code"] for f in body["scan_findings"]]
    stored = message_row(services, msg["id"])
    assert stored["status"] == "pending_send_approval" and stored["decision"] is None
    assert stored["markdown"] == msg["markdown"] and stored["original_markdown"] is None
    assert "message.approved" not in _actions(services, msg["id"])
    assert job_rows(services, "deliver") == []

    iban = "Please pay to DE89 3704 0044 0532 0130 00 by Friday."
    approved = reviewer.post(
        "/v1/oversight/decide",
        json={"email_id": msg["id"], "action": "approve", "revised_body": iban},
    )
    assert approved.status_code == 200, approved.text
    stored = message_row(services, msg["id"])
    assert stored["markdown"] == iban and stored["status"] in PAST_THE_GATE
    assert [f["code"] for f in stored["scan_findings"]] == ["iban"]  # a warning, stored
    relay.wait_for(1, timeout=10)
    assert "DE89" in relay.messages[0].as_email().get_body(("plain",)).get_content()  # type: ignore[union-attr]


def test_a_revised_subject_is_scanned_too(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    agent_id: str,
    relay: CapturingSMTPServer,
) -> None:
    msg = make_message(services, box, created_by_key_id=agent_id)
    leaked = "Your key mm_live_" + "A1b2C3d4" * 5
    response = api.client(boot.reviewer_key).post(
        "/v1/oversight/decide",
        json={"email_id": msg["id"], "action": "approve", "revised_subject": leaked},
    )
    assert response.status_code == 422 and response.json()["code"] == "scan_blocked"
    stored = message_row(services, msg["id"])
    assert stored["subject"] == msg["subject"] and stored["status"] == "pending_send_approval"
    time.sleep(0.2)
    assert relay.messages == []


# --- 3. a decision past the expiry ---------------------------------------------------------


def _stale(services: Services, box: dict[str, Any], agent_id: str, **fields: Any) -> Any:
    """A draft older than the mailbox's default 72 h expiry that no sweep has reached."""
    return make_message(
        services,
        box,
        created_by_key_id=agent_id,
        created_at=utcnow() - timedelta(hours=73),
        **fields,
    )


def _held_inbound(services: Services, boot: accounts.Bootstrap, created_at: Any) -> Any:
    """An inbound message held for approval in a gated_all mailbox (it never expires)."""
    held_box = make_mailbox(
        services, boot.account["id"], "held@mm.test", oversight_mode="gated_all"
    )
    return make_message(
        services,
        held_box,
        status="pending_inbound_approval",
        direction="inbound",
        created_at=created_at,
    )


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_a_decision_past_the_expiry_expires_the_draft_as_the_sweep_would(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    agent_id: str,
    relay: CapturingSMTPServer,
    action: str,
) -> None:
    """409 approval_expired; the draft is expired (status, audit entry, the agent's event) in
    the same transaction; no decision is recorded; asking again answers the same."""
    subscribe_everything(services, boot.account["id"])
    msg = _stale(services, box, agent_id)
    reviewer = api.client(boot.reviewer_key)
    for _ in range(2):
        response = reviewer.post(
            "/v1/oversight/decide",
            json={"email_id": msg["id"], "action": action, "note": "too late?"},
        )
        assert response.status_code == 409, response.text
        body = response.json()
        assert body["code"] == "approval_expired" and body["status"] == "expired"
        assert "expired" in body["error"]
    stored = message_row(services, msg["id"])
    assert stored["status"] == "expired" and stored["decision"] is None
    assert stored["last_error"] == "approval expired"
    actions = _actions(services, msg["id"])
    assert actions.count("message.expired") == 1
    assert "message.approved" not in actions and "message.rejected" not in actions
    [entry] = [a for a in audit_actions(services, msg["id"]) if a["action"] == "message.expired"]
    details = entry["details"]
    details = details if isinstance(details, dict) else json.loads(details)
    assert details["reason"] == "expired" and details["noticed_by"]["decision"] == action
    assert event_types(services, msg["id"]).count("oversight.rejected") == 1
    with services.db.read() as conn:
        payload = conn.execute(
            select(events.c.payload).where(events.c.message_id == msg["id"])
        ).scalar_one()
    assert "expired" in str(payload)
    assert job_rows(services, "deliver") == []
    assert oversight.sweep_pending(services) == {"reminded": 0, "expired": 0}
    time.sleep(0.2)
    assert relay.messages == []


def test_a_batch_reports_the_expired_draft_and_decides_the_others(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    stale = _stale(services, box, agent_id)
    fresh = make_message(services, box, created_by_key_id=agent_id)
    body = (
        api.client(boot.reviewer_key)
        .post(
            "/v1/oversight/decide",
            json={"email_ids": [stale["id"], fresh["id"]], "action": "reject", "note": "no"},
        )
        .json()
    )
    outcome = {r["id"]: r for r in body["results"]}
    assert not outcome[stale["id"]]["ok"]
    assert outcome[stale["id"]]["code"] == "approval_expired"
    assert outcome[stale["id"]]["status"] == "expired"
    assert outcome[fresh["id"]]["ok"] and outcome[fresh["id"]]["status"] == "rejected"
    assert message_row(services, stale["id"])["status"] == "expired"


def test_schedule_first_and_held_inbound_are_not_expired_by_their_age_alone(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """A schedule_first draft waits from its send time, not its creation; held inbound mail
    never expires (SPEC: dropping it would lose mail)."""
    old = utcnow() - timedelta(hours=100)
    waiting = make_message(
        services,
        box,
        created_by_key_id=agent_id,
        created_at=old,
        send_at=utcnow() - timedelta(hours=1),
        gate_timing="schedule_first",
    )
    held = _held_inbound(services, boot, created_at=old)
    reviewer = api.client(boot.reviewer_key)
    rejected = reviewer.post(
        "/v1/oversight/decide", json={"email_id": waiting["id"], "action": "reject", "note": "x"}
    )
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    released = reviewer.post(
        "/v1/oversight/decide", json={"email_id": held["id"], "action": "approve"}
    )
    assert released.status_code == 200 and released.json()["status"] == "unread"


def test_the_approve_link_past_the_expiry_answers_409_and_expires_the_draft(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    agent_id: str,
    relay: CapturingSMTPServer,
) -> None:
    msg = _stale(services, box, agent_id)
    with services.db.write() as conn:
        notify.notify_pending(conn, services, msg)
    with services.db.read() as conn:
        written = notify.approval_request_mail(conn, services, msg["id"])
    assert written is not None
    approve, _reject = LINK.findall(written[1])
    # The confirmation page offers no button for a draft past its expiry (the sweep has not
    # marked it yet): it used to offer "Approve and send" for a POST that could only fail.
    page = api.client(None).get("/v1/" + approve.split("/v1/", 1)[1])
    assert page.status_code == 409 and "has expired" in page.text
    assert "Approve and send" not in page.text
    assert (
        message_row(services, msg["id"])["status"] == "pending_send_approval"
    )  # GET writes nothing
    response = api.client(None).post("/v1/" + approve.split("/v1/", 1)[1])
    assert response.status_code == 409, response.text
    assert "expired" in response.text
    stored = message_row(services, msg["id"])
    assert stored["status"] == "expired" and stored["decision"] is None
    assert "message.expired" in _actions(services, msg["id"])
    time.sleep(0.2)
    assert relay.messages == []


# --- 4. the sweep reads due rows only, batch after batch -------------------------------------


def test_the_sweep_reads_only_due_rows_batch_after_batch(
    services: Services,
    boot: accounts.Bootstrap,
    agent_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With batches of 3: a backlog of undue drafts (older ids) crowds nothing out, and one
    sweep expires every due draft and reminds every draft past its timeout."""
    monkeypatch.setattr(oversight, "SWEEP_BATCH", 3)
    now = utcnow()
    slow = make_mailbox(
        services,
        boot.account["id"],
        "slow@mm.test",
        approval_timeout_seconds=30 * 86400,
        approval_expiry_seconds=60 * 86400,
    )
    undue = [make_message(services, slow, created_by_key_id=agent_id) for _ in range(4)]
    fast = make_mailbox(services, boot.account["id"], "fast@mm.test")  # 24 h / 72 h
    expiring = [
        make_message(
            services, fast, created_by_key_id=agent_id, created_at=now - timedelta(hours=80)
        )
        for _ in range(7)
    ]
    reminding = [
        make_message(
            services, fast, created_by_key_id=agent_id, created_at=now - timedelta(hours=30)
        )
        for _ in range(5)
    ]
    held = _held_inbound(services, boot, created_at=now - timedelta(hours=200))
    late_start = make_message(  # schedule_first: waits from send_at (2 h ago), not creation
        services,
        fast,
        created_by_key_id=agent_id,
        created_at=now - timedelta(hours=200),
        send_at=now - timedelta(hours=2),
        gate_timing="schedule_first",
    )
    assert oversight.sweep_pending(services, now=now) == {"reminded": 6, "expired": 7}
    assert all(message_row(services, m["id"])["status"] == "expired" for m in expiring)
    for m in [*reminding, held]:
        stored = message_row(services, m["id"])
        assert stored["reminded_at"] is not None and stored["status"].startswith("pending_")
    for m in [*undue, late_start]:
        stored = message_row(services, m["id"])
        assert stored["status"] == "pending_send_approval" and stored["reminded_at"] is None
    # Nothing is due any more: the next sweep reads nothing and changes nothing.
    assert oversight.sweep_pending(services, now=now) == {"reminded": 0, "expired": 0}
    # The held inbound message, reminded once, never expires.
    # Ten days on: the reminded drafts and the schedule_first one expire; the slow mailbox's
    # drafts are still not due; the held inbound message, reminded once, never expires.
    later = now + timedelta(days=10)
    assert oversight.sweep_pending(services, now=later) == {"reminded": 0, "expired": 6}
    assert message_row(services, held["id"])["status"] == "pending_inbound_approval"
    assert all(message_row(services, m["id"])["status"] == "pending_send_approval" for m in undue)
