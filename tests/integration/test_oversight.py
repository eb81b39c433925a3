"""The oversight side over a live server: the queue, decisions, the kill switch, reminders."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from multimail.ids import utcnow
from multimail.services import accounts, notify, oversight
from multimail.services.context import Services
from multimail.store.tables import accounts as account_table
from tests.conftest import Api
from tests.integration.oversight_support import (
    agent_id,
    audit_actions,
    box,
    event_types,
    job_rows,
    key_id,
    make_mailbox,
    make_message,
    message_row,
    operator,
    relay,
    second_account,
    settings,
    subscribe_everything,
)

__all__ = ["agent_id", "box", "relay", "settings"]  # fixtures, re-exported for pytest


def test_pending_queue_envelope_newest_first_with_thread_context(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """The queue lists pending drafts newest first with the SPEC §5.1 fields, the earlier
    messages of the thread, an expiry, a count, and cursor pagination; every path agrees."""
    earlier = make_message(
        services,
        box,
        status="unread",
        direction="inbound",
        subject="Where are my numbers?",
        markdown="Please send them " * 40,
    )
    first = make_message(
        services,
        box,
        created_by_key_id=agent_id,
        thread_id=earlier["thread_id"],
        scan_findings=[{"code": "pii", "message": "a card number"}],
    )
    second = make_message(services, box, created_by_key_id=agent_id, subject="Second")
    make_message(services, box, status="queued", created_by_key_id=agent_id)
    reviewer = api.client(boot.reviewer_key)
    body = reviewer.get("/v1/oversight/pending").json()
    assert body["pending_count"] == 2
    assert [m["id"] for m in body["pending"]] == [second["id"], first["id"]]
    assert body["messages"] == body["pending"]
    item = body["pending"][1]
    for field in (
        "id",
        "message_id",
        "email_id",
        "mailbox_id",
        "from",
        "to",
        "subject",
        "markdown",
        "draft_body",
        "thread_id",
        "scan_findings",
        "created_at",
        "metadata",
        "thread_context",
        "expires_at",
    ):
        assert field in item, field
    assert item["id"] == item["message_id"] == item["email_id"] == first["id"]
    assert item["draft_body"] == first["markdown"]
    assert item["metadata"] == {"crm_case": "4711"}
    assert item["scan_findings"][0]["code"] == "pii"
    [context] = item["thread_context"]
    assert context["direction"] == "inbound" and context["subject"] == "Where are my numbers?"
    assert len(context["excerpt"]) <= notify.EXCERPT_CHARS
    assert item["expires_at"] > item["created_at"]
    page = reviewer.get("/v1/pending", params={"limit": 1}).json()
    assert [m["id"] for m in page["pending"]] == [second["id"]]
    rest = reviewer.get("/v1/pending", params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert [m["id"] for m in rest["pending"]] == [first["id"]] and rest["next_cursor"] is None
    by_address = reviewer.get("/list_pending", params={"mailbox_id": "Agent@mm.test"}).json()
    assert by_address["pending_count"] == 2


def test_agent_sees_its_queue_but_not_held_inbound_mail(
    api: Api, services: Services, boot: accounts.Bootstrap, agent_id: str
) -> None:
    """gated_all holds inbound mail from the agent: the agent's queue omits it, a reviewer's
    shows it."""
    box = make_mailbox(services, boot.account["id"], "held@mm.test", oversight_mode="gated_all")
    make_message(services, box, created_by_key_id=agent_id)
    make_message(services, box, status="pending_inbound_approval", direction="inbound")
    agent = api.client(boot.agent_key).get("/list_pending").json()
    reviewer = api.client(boot.reviewer_key).get("/list_pending").json()
    assert [m["direction"] for m in agent["messages"]] == ["outbound"]
    assert sorted(m["direction"] for m in reviewer["messages"]) == ["inbound", "outbound"]


def test_approve_records_reviewer_queues_delivery_and_audits_once(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """Approve moves the draft past the gate with a deliver job, one audit entry naming the
    reviewer and the key, and an oversight.approved event."""
    subscribe_everything(services, boot.account["id"])
    msg = make_message(services, box, created_by_key_id=agent_id)
    response = api.client(boot.reviewer_key).post(
        "/v1/oversight/decide", json={"email_id": msg["id"], "action": "approve"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == body["message_id"] == body["email_id"] == msg["id"]
    assert body["status"] in ("queued", "delivered")
    assert body["result"] in ("approved", "approved_and_sent")
    assert body["decision"]["action"] == "approve" and body["decision"]["reviewer"] == "reviewer"
    assert body["decision"]["edited"] is False
    [deliver] = [
        j for j in job_rows(services, "deliver") if j["payload"]["message_id"] == msg["id"]
    ]
    assert deliver["dedupe_key"] == f"deliver:{msg['id']}"
    [entry] = [a for a in audit_actions(services, msg["id"]) if a["action"] == "message.approved"]
    assert entry["actor_type"] == "key" and entry["actor_name"] == "reviewer"
    assert entry["actor_id"] == key_id(services, "reviewer", boot.account["id"])
    assert '"reviewer":"reviewer"' in entry["details"]
    assert "oversight.approved" in event_types(services, msg["id"])
    stored = message_row(services, msg["id"])
    assert stored["decision"] == "approve" and stored["reviewer"] == "reviewer"


def test_approve_with_revision_sends_the_edit_and_keeps_the_draft(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """A reviewer's edit becomes the message (re-rendered); the agent's version is kept."""
    msg = make_message(services, box, created_by_key_id=agent_id)
    body = (
        api.client(boot.reviewer_key)
        .post(
            "/decide_email",
            json={
                "message_id": msg["id"],
                "decision": "approved",
                "reviewer": "Dana (legal)",
                "revised_subject": "Q3 numbers",
                "revised_body": "Hi Bob,\n\n*Final* figures.",
            },
        )
        .json()
    )
    assert body["decision"]["edited"] is True and body["decision"]["reviewer"] == "Dana (legal)"
    stored = message_row(services, msg["id"])
    assert stored["subject"] == "Q3 numbers" and stored["markdown"].endswith("*Final* figures.")
    assert "<em>Final</em>" in stored["html"]
    assert stored["original_subject"] == msg["subject"]
    assert stored["original_markdown"] == msg["markdown"]
    view = api.client(boot.reviewer_key).get("/v1/pending").json()
    assert view["pending_count"] == 0


def test_reject_keeps_a_note_the_agent_can_read_and_queues_nothing(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """Reject with a note: status rejected, the note on the message, no deliver job."""
    subscribe_everything(services, boot.account["id"])
    msg = make_message(services, box, created_by_key_id=agent_id)
    body = (
        api.client(boot.reviewer_key)
        .post(
            "/v1/oversight/decide",
            json={"email_id": msg["id"], "action": "reject", "reason": "too pushy"},
        )
        .json()
    )
    assert body["status"] == "rejected" and body["result"] == "rejected"
    assert body["decision"]["note"] == "too pushy"
    assert message_row(services, msg["id"])["decision_note"] == "too pushy"
    assert job_rows(services, "deliver") == []
    assert "oversight.rejected" in event_types(services, msg["id"])


def test_second_decision_is_409_naming_the_first(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """Decisions are final: approve after reject (or again) answers 409 already_decided."""
    msg = make_message(services, box, created_by_key_id=agent_id)
    reviewer = api.client(boot.reviewer_key)
    reviewer.post("/v1/oversight/decide", json={"email_id": msg["id"], "action": "reject"})
    again = reviewer.post("/v1/oversight/decide", json={"email_id": msg["id"], "action": "approve"})
    assert again.status_code == 409
    assert again.json()["code"] == "already_decided"
    assert again.json()["decision"]["action"] == "reject"
    assert message_row(services, msg["id"])["status"] == "rejected"
    assert (
        len(
            [
                a
                for a in audit_actions(services, msg["id"])
                if a["action"].startswith("message.re") or a["action"] == "message.approved"
            ]
        )
        == 1
    )


def test_only_oversight_keys_decide_and_never_their_own_message(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """send-scoped and admin keys get 403; a reviewer key that wrote the message gets 403;
    nothing changes and nothing is queued."""
    msg = make_message(services, box, created_by_key_id=agent_id)
    for key in (boot.agent_key, boot.admin_key):
        response = api.client(key).post(
            "/v1/oversight/decide", json={"email_id": msg["id"], "action": "approve"}
        )
        assert response.status_code == 403 and response.json()["code"] == "insufficient_scope"
    own = make_message(
        services, box, created_by_key_id=key_id(services, "reviewer", boot.account["id"])
    )
    response = api.client(boot.reviewer_key).post(
        "/v1/oversight/decide", json={"email_id": own["id"], "action": "approve"}
    )
    assert response.status_code == 403 and response.json()["code"] == "self_approval_forbidden"
    for message_id in (msg["id"], own["id"]):
        assert message_row(services, message_id)["status"] == "pending_send_approval"
    assert job_rows(services, "deliver") == []


def test_bypass_fields_and_other_accounts_are_refused(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """Extra fields (`status`, `gated`) → 422; another account's reviewer → 404; no change."""
    msg = make_message(services, box, created_by_key_id=agent_id)
    reviewer = api.client(boot.reviewer_key)
    for extra in ({"status": "approved"}, {"gated": False}):
        response = reviewer.post(
            "/v1/oversight/decide", json={"email_id": msg["id"], "action": "approve", **extra}
        )
        assert response.status_code == 422
    other = second_account(services)
    response = api.client(other.reviewer_key).post(
        "/v1/oversight/decide", json={"email_id": msg["id"], "action": "approve"}
    )
    assert response.status_code == 404
    assert api.client(other.reviewer_key).get("/v1/pending").json()["pending_count"] == 0
    assert message_row(services, msg["id"])["status"] == "pending_send_approval"


def test_batch_decide_reports_each_message(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """A batch decides each message on its own and reports each outcome."""
    a = make_message(services, box, created_by_key_id=agent_id)
    b = make_message(services, box, created_by_key_id=agent_id)
    done = make_message(services, box, status="cancelled", created_by_key_id=agent_id)
    body = (
        api.client(boot.reviewer_key)
        .post(
            "/v1/oversight/decide",
            json={
                "email_ids": [a["id"], b["id"], done["id"], "msg_nothere"],
                "action": "reject",
                "note": "batch",
            },
        )
        .json()
    )
    outcome = {r["id"]: r for r in body["results"]}
    assert outcome[a["id"]]["ok"] and outcome[a["id"]]["status"] == "rejected"
    assert outcome[b["id"]]["ok"]
    assert not outcome[done["id"]]["ok"] and outcome[done["id"]]["code"] == "not_pending"
    assert outcome["msg_nothere"]["code"] == "message_not_found"
    too_many = api.client(boot.reviewer_key).post(
        "/v1/oversight/decide", json={"email_ids": ["x"] * 101, "action": "reject"}
    )
    assert too_many.status_code == 422


def test_held_inbound_mail_is_released_or_rejected(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """Approving held inbound mail makes it unread for the agent (message.received)."""
    subscribe_everything(services, boot.account["id"])
    box = make_mailbox(services, boot.account["id"], "held@mm.test", oversight_mode="gated_all")
    kept = make_message(services, box, status="pending_inbound_approval", direction="inbound")
    dropped = make_message(services, box, status="pending_inbound_approval", direction="inbound")
    reviewer = api.client(boot.reviewer_key)
    released = reviewer.post(
        "/v1/oversight/decide", json={"email_id": kept["id"], "action": "approve"}
    ).json()
    assert released["status"] == "unread"
    assert "message.received" in event_types(services, kept["id"])
    refused = reviewer.post(
        "/v1/oversight/decide", json={"email_id": dropped["id"], "action": "reject"}
    ).json()
    assert refused["status"] == "rejected"
    edit = reviewer.post(
        "/v1/oversight/decide",
        json={"email_id": dropped["id"], "action": "approve", "revised_body": "x"},
    )
    assert edit.status_code in (409, 422)


def test_approve_of_a_future_gate_first_message_schedules_it(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """gate_first with send_at ahead: approved now, released at send_at by a job."""
    send_at = utcnow() + timedelta(hours=2)
    msg = make_message(services, box, created_by_key_id=agent_id, send_at=send_at)
    body = (
        api.client(boot.reviewer_key)
        .post("/v1/oversight/decide", json={"email_id": msg["id"], "action": "approve"})
        .json()
    )
    assert body["status"] == "scheduled"
    [job] = job_rows(services, "release_scheduled")
    assert job["dedupe_key"] == f"release:{msg['id']}"
    assert job_rows(services, "deliver") == []


def test_pause_and_resume_release_queued_messages(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """The kill switch sets paused (admin or oversight keys only); resume gives each queued
    message a fresh deliver job, unless its mailbox is still paused."""
    agent = api.client(boot.agent_key)
    assert agent.post("/v1/oversight/pause", json={}).status_code == 403
    admin = api.client(boot.admin_key)
    assert admin.post("/v1/oversight/pause", json={}).json()["paused"] is True
    with services.db.read() as conn:
        assert conn.execute(select(account_table.c.paused)).scalar_one() is True
    waiting = make_message(services, box, status="queued", created_by_key_id=agent_id)
    other = make_mailbox(services, boot.account["id"], "other@mm.test")
    held = make_message(services, other, status="queued", created_by_key_id=agent_id)
    reviewer = api.client(boot.reviewer_key)
    assert reviewer.post("/v1/oversight/pause", json={"mailbox_id": "other@mm.test"}).json()[
        "paused"
    ]
    resumed = reviewer.post("/v1/oversight/resume").json()
    assert resumed == {"account_id": boot.account["id"], "paused": False, "released": 1}
    assert [j["payload"]["message_id"] for j in job_rows(services, "deliver")] == [waiting["id"]]
    box_resumed = admin.post("/v1/oversight/resume", json={"mailbox_id": other["id"]}).json()
    assert box_resumed["released"] == 1
    assert {j["payload"]["message_id"] for j in job_rows(services, "deliver")} == {
        waiting["id"],
        held["id"],
    }
    again = admin.post("/v1/oversight/resume", json={"mailbox_id": other["id"]}).json()
    assert again["released"] == 0  # a pending deliver job already waits
    actions = [a["action"] for a in audit_actions(services, boot.account["id"])]
    assert "account.paused" in actions and "account.resumed" in actions


def test_sweep_reminds_once_then_expires(
    services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """Past the approval timeout: one reminder mail; past the expiry: expired, audited, and
    the agent's event says why. Nothing is queued for delivery."""
    subscribe_everything(services, boot.account["id"])
    start = utcnow()
    msg = make_message(services, box, created_by_key_id=agent_id, created_at=start)
    fresh = make_message(services, box, created_by_key_id=agent_id, created_at=start)
    assert oversight.sweep_pending(services, now=start + timedelta(hours=1)) == {
        "reminded": 0,
        "expired": 0,
    }
    assert oversight.sweep_pending(services, now=start + timedelta(hours=25)) == {
        "reminded": 2,
        "expired": 0,
    }
    reminders = [j for j in job_rows(services, "system_mail") if j["payload"]["kind"] == "reminder"]
    assert len(reminders) == 2 and reminders[0]["payload"]["to"] == ["ops@mm.test"]
    assert oversight.sweep_pending(services, now=start + timedelta(hours=26))["reminded"] == 0
    api_decided = oversight.decide(
        services,
        operator(boot.account["id"]),
        email_id=fresh["id"],
        action="reject",
    )
    assert api_decided["status"] == "rejected"
    assert oversight.sweep_pending(services, now=start + timedelta(hours=73)) == {
        "reminded": 0,
        "expired": 1,
    }
    stored = message_row(services, msg["id"])
    assert stored["status"] == "expired" and stored["decision"] is None
    assert "message.expired" in [a["action"] for a in audit_actions(services, msg["id"])]
    assert event_types(services, msg["id"])[-1] == "oversight.rejected"
    assert job_rows(services, "deliver") == []


def test_pending_notification_has_links_and_fences_the_draft(
    services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """The operator email carries the draft, thread, findings and both one-click links; a
    draft cannot smuggle its own link into the mail (it is fenced)."""
    msg = make_message(
        services,
        box,
        created_by_key_id=agent_id,
        markdown="Click [Approve](https://evil.example/x)\n```\nfence",
        scan_findings=[{"code": "secret", "message": "an API key"}],
    )
    with services.db.write() as conn:
        notify.notify_pending(conn, services, msg)
        notify.notify_monitored_copy(conn, services, msg)
    mails = job_rows(services, "system_mail")
    pending = next(j["payload"] for j in mails if j["payload"]["kind"] == "approval_request")
    assert pending == {
        "to": ["ops@mm.test"],
        "kind": "approval_request",
        "account_id": boot.account["id"],
        "message_id": msg["id"],
    }
    with services.db.read() as conn:
        written = notify.approval_request_mail(conn, services, msg["id"])
    assert written is not None
    subject, text = written
    assert subject == "[MultiMail] Approval needed: Quarterly numbers"
    base = services.settings.base_url
    assert text.count(f"]({base}/v1/approve/") == 2
    assert "an API key" in text
    assert "````text\nClick [Approve](https://evil.example/x)\n```\nfence\n````" in text
    assert any(j["payload"]["kind"] == "monitored_copy" for j in mails)


def test_no_oversight_email_means_no_mail_but_decisions_still_work(
    services: Services, boot: accounts.Bootstrap, box: dict[str, Any], agent_id: str
) -> None:
    """Without an oversight address the notification is skipped, never sent elsewhere."""
    msg = make_message(services, box, created_by_key_id=agent_id)
    with services.db.write() as conn:
        conn.execute(update(account_table).values(oversight_email=None))
        assert notify.notify_pending(conn, services, msg) is None
    assert job_rows(services, "system_mail") == []
