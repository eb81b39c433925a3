"""Review of the storage changes 823893b (events store a compact payload) and 7f10275 (an
outbound row stores ``text`` only when it is not the markdown): tests for the defects
found, each failed before its fix. On SQLite and PostgreSQL.

Rows written before 7f10275 hold ``text`` equal to the markdown; the tests make such a row
by writing the column back the way the old send path did.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from multimail.ids import isoformat, utcnow
from multimail.services import accounts
from multimail.services.context import Services
from multimail.store.tables import events, messages
from tests.conftest import Api
from tests.integration.test_sending import audit_actions, make_mailbox, message_row, rows, send

LATER = isoformat(utcnow() + timedelta(days=2))


def _as_written_before_7f10275(services: Services, message_id: str) -> None:
    """The text column as the send path stored it before 7f10275: the normalised markdown
    (here the markdown itself, which is already normal)."""
    with services.db.write() as conn:
        conn.execute(
            update(messages).where(messages.c.id == message_id).values(text=messages.c.markdown)
        )


def test_rescheduling_an_older_approved_message_with_its_own_body_keeps_the_approval(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """A client that moves send_at and sends the draft's body back unchanged (a whole-draft
    PATCH) edits nothing but the time: the approval stays, no new review is asked for, no
    content edit is audited. Before 7f10275 this held for every row; after it, a row stored
    before the upgrade goes back to the reviewers."""
    box = make_mailbox(services, boot, "legacyedit")
    agent = api.client(boot.agent_key)
    body = "Your refund is on its way."
    msg = send(agent, box["id"], markdown=body, send_at=LATER, gate_timing="schedule_first")
    msg_id = msg.json()["id"]
    with services.db.write() as conn:  # approved first, waiting for send_at
        conn.execute(
            update(messages)
            .where(messages.c.id == msg_id)
            .values(decision="approve", reviewer="rita", decided_at=utcnow())
        )
    _as_written_before_7f10275(services, msg_id)

    sooner = isoformat(utcnow() + timedelta(hours=3))
    path = f"/v1/mailboxes/{box['id']}/emails/{msg_id}/schedule"
    edited = agent.patch(path, json={"markdown": body, "send_at": sooner})

    assert edited.status_code == 200, edited.text
    assert edited.json()["status"] == "scheduled"
    assert edited.json()["changed"] == ["send_at"]
    row = message_row(services, msg_id)
    assert row["status"] == "scheduled" and row["decision"] == "approve"
    assert [e["type"] for e in rows(services, events, events.c.message_id == msg_id)] == []


def test_an_edit_that_changes_nothing_on_an_older_row_writes_and_audits_nothing(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Sending a scheduled message's own body back is a no-op (``changed`` empty, no audit
    entry, ``updated_at`` unchanged), for rows stored before 7f10275 as for newer ones."""
    box = make_mailbox(services, boot, "legacynoop", "autonomous")
    agent = api.client(boot.agent_key)
    body = "See you on Monday."
    msg_id = send(agent, box["id"], markdown=body, send_at=LATER).json()["id"]
    _as_written_before_7f10275(services, msg_id)
    before = message_row(services, msg_id)

    path = f"/v1/mailboxes/{box['id']}/emails/{msg_id}/schedule"
    edited = agent.patch(path, json={"markdown": body})

    assert edited.status_code == 200, edited.text
    assert edited.json()["changed"] == []
    assert "message.schedule_edited" not in audit_actions(services, msg_id)
    assert message_row(services, msg_id)["updated_at"] == before["updated_at"]
