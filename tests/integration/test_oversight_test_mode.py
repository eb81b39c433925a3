"""A test key (``mm_test_``) in the oversight queue: it sees and decides only test messages.

SPEC §1: a test key runs the whole pipeline but never hands mail to SMTP. A sandbox reviewer
key deciding a live draft, or lifting a live pause, would; so live messages answer as absent
to it (404, like every other cross-boundary read) and resuming is refused.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from multimail.services import accounts, keys
from multimail.services.context import SYSTEM, Services
from multimail.store.tables import messages
from multimail.testing.smtp import CapturingSMTPServer
from tests.conftest import Api
from tests.integration.oversight_support import (
    key_id,
    make_mailbox,
    make_message,
    message_row,
    relay,
    settings,
)

__all__ = ["relay", "settings"]  # fixtures, re-exported so pytest finds them here


def _key(services: Services, boot: accounts.Bootstrap, **fields: Any) -> str:
    with services.db.write() as conn:
        created = keys.create_key(conn, actor=SYSTEM, account_id=boot.account["id"], **fields)
    return created.raw_key


def _sandbox_reviewer(services: Services, boot: accounts.Bootstrap) -> str:
    return _key(services, boot, name="sandbox reviewer", scopes=["oversight", "read"], mode="test")


def _drafts(services: Services, boot: accounts.Bootstrap) -> tuple[dict[str, Any], ...]:
    """One live and one test draft, both waiting for a reviewer in the same mailbox."""
    box = make_mailbox(services, boot.account["id"], address="mixed-desk@mm.test")
    agent = key_id(services, "agent", boot.account["id"])
    live = make_message(services, box, subject="LIVE draft", created_by_key_id=agent)
    test = make_message(services, box, subject="TEST draft", created_by_key_id=agent)
    with services.db.write() as conn:
        conn.execute(update(messages).where(messages.c.id == test["id"]).values(test=True))
    return box, live, test


def test_test_key_queue_lists_only_test_messages(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    _box, live, test = _drafts(services, boot)
    sandbox = api.client(_sandbox_reviewer(services, boot))
    for path in ("/v1/oversight/pending", "/v1/pending"):
        body = sandbox.get(path).json()
        ids = {item["id"] for item in body["pending"]}
        assert ids == {test["id"]}, (path, body)
        assert body["pending_count"] == 1
        assert "LIVE draft" not in str(body)
    tool = sandbox.post("/list_pending", json={}).json()
    assert {item["id"] for item in tool["messages"]} == {test["id"]}
    # A live reviewer's queue is unchanged: both drafts.
    live_queue = api.client(boot.reviewer_key).get("/v1/oversight/pending").json()
    assert {live["id"], test["id"]} <= {item["id"] for item in live_queue["pending"]}


def test_test_key_cannot_decide_a_live_draft_anywhere(
    api: Api, services: Services, boot: accounts.Bootstrap, relay: CapturingSMTPServer
) -> None:
    _box, live, _test = _drafts(services, boot)
    sandbox = api.client(_sandbox_reviewer(services, boot))
    absent = sandbox.post(
        "/v1/oversight/decide", json={"email_id": "msg_nothere", "action": "approve"}
    )
    assert absent.status_code == 404
    for action in ("approve", "reject"):
        answer = sandbox.post(
            "/v1/oversight/decide", json={"email_id": live["id"], "action": action}
        )
        assert answer.status_code == 404, answer.text
        assert answer.json()["code"] == absent.json()["code"] == "message_not_found"
        tool = sandbox.post("/decide_email", json={"email_id": live["id"], "action": action})
        assert tool.status_code == 404, tool.text
    batch = sandbox.post(
        "/v1/oversight/decide", json={"email_ids": [live["id"]], "action": "approve"}
    )
    assert batch.status_code == 200, batch.text
    [result] = batch.json()["results"]
    assert (result["ok"], result["code"]) == (False, "message_not_found"), result
    row = message_row(services, live["id"])
    assert (row["status"], row["decision"]) == ("pending_send_approval", None)
    assert relay.messages == []


def test_test_key_decides_a_test_draft_which_never_reaches_smtp(
    api: Api, services: Services, boot: accounts.Bootstrap, relay: CapturingSMTPServer
) -> None:
    _box, live, test = _drafts(services, boot)
    sandbox = api.client(_sandbox_reviewer(services, boot))
    answer = sandbox.post(
        "/v1/oversight/decide", json={"email_id": test["id"], "action": "approve"}
    )
    assert answer.status_code == 200, answer.text
    assert message_row(services, test["id"])["decision"] == "approve"
    assert message_row(services, live["id"])["status"] == "pending_send_approval"
    assert relay.messages == []


def test_test_key_may_pause_but_not_resume(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    box = make_mailbox(services, boot.account["id"], address="paused-desk@mm.test")
    sandbox = api.client(_sandbox_reviewer(services, boot))
    paused = sandbox.post("/v1/oversight/pause", json={"mailbox_id": box["id"]})
    assert paused.status_code == 200, paused.text
    for body in ({"mailbox_id": box["id"]}, None):
        refused = sandbox.post("/v1/oversight/resume", json=body)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "test_key_cannot_release"
    resumed = api.client(boot.reviewer_key).post(
        "/v1/oversight/resume", json={"mailbox_id": box["id"]}
    )
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["paused"] is False


def test_test_key_cannot_cancel_or_edit_a_live_message(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """A test send key could cancel live mail, and redirect a live scheduled message to a new
    recipient that would really be mailed (found by review). Live messages answer as absent
    to its changes; its own test messages stay its to change."""
    box, live, test = _drafts(services, boot)
    sandbox = api.client(_key(services, boot, name="sandbox agent", scopes=["send"], mode="test"))
    for message in (live, test):
        redirect = sandbox.patch(
            f"/v1/mailboxes/{box['id']}/emails/{message['id']}/schedule",
            json={"to": ["mallory@example.org"]},
        )
        cancel = sandbox.post(f"/v1/mailboxes/{box['id']}/emails/{message['id']}/cancel")
        if message is live:
            assert (redirect.status_code, cancel.status_code) == (404, 404)
            row = message_row(services, live["id"])
            assert row["status"] == "pending_send_approval"
            assert "mallory@example.org" not in str(row["to"])
        else:
            assert redirect.status_code == 200, redirect.text
            assert cancel.status_code == 200, cancel.text
            assert message_row(services, test["id"])["status"] == "cancelled"
