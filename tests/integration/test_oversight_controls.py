"""The oversight gate's operator controls against SPEC §2.

Each test states the contract it checks; each began as a reviewer's strict xfail naming a
defect (session 6) and became a plain test with its fix. They use the
live server and the real services (fixtures from ``oversight_support``); nothing is mocked.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from multimail.ids import isoformat, utcnow
from multimail.services import accounts, keys, sending
from multimail.services.context import Services
from multimail.store.tables import mailboxes as mailbox_table
from multimail.store.tables import webhooks
from multimail.testing.smtp import CapturingSMTPServer
from tests.conftest import BACKEND, Api
from tests.integration.oversight_support import (
    agent_id,
    box,
    job_rows,
    make_mailbox,
    make_message,
    message_row,
    operator,
    relay,
    settings,
)

__all__ = ["agent_id", "box", "relay", "settings"]  # fixtures, re-exported for pytest

PAST_THE_GATE = ("queued", "sending", "deferred", "delivered")


def _mailbox_row(services: Services, mailbox_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        return dict(
            conn.execute(select(mailbox_table).where(mailbox_table.c.id == mailbox_id))
            .mappings()
            .one()
        )


# --- expiry (batch revisions, scanned revisions and the sweep's batches are in
# test_oversight_decisions_guard) ------------------------------------------------------------


def test_approval_after_the_expiry_deadline_is_refused(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    agent_id: str,
    relay: CapturingSMTPServer,
) -> None:
    """SPEC §2: after approval_expiry the message is expired, never sent. The queue shows each
    draft's expires_at; an approval arriving after it (the sweep runs only every few minutes,
    or is down) must not send the message."""
    box = make_mailbox(
        services,
        boot.account["id"],
        "expiring@mm.test",
        approval_timeout_seconds=600,
        approval_expiry_seconds=3600,
    )
    msg = make_message(
        services, box, created_by_key_id=agent_id, created_at=utcnow() - timedelta(hours=2)
    )
    reviewer = api.client(boot.reviewer_key)
    [item] = reviewer.get("/v1/oversight/pending").json()["pending"]
    assert item["expires_at"] < isoformat(utcnow())  # the queue itself says it has expired
    response = reviewer.post(
        "/v1/oversight/decide", json={"email_id": msg["id"], "action": "approve"}
    )
    assert response.status_code == 409, response.text
    assert message_row(services, msg["id"])["status"] not in PAST_THE_GATE
    assert relay.messages == []


# --- send caps and the allowlist -----------------------------------------------------------


def _send(client: httpx.Client, mailbox_id: str, n: int = 0) -> httpx.Response:
    return client.post(
        f"/v1/mailboxes/{mailbox_id}/send",
        json={"to": "bob@example.org", "subject": f"hello {n}", "markdown": "Hi Bob."},
    )


def test_test_mode_sends_do_not_use_up_the_live_send_cap(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """A test key runs the pipeline but never hands mail to SMTP. A mailbox capped at 2
    messages per hour still sends its live mail after two sandbox sends."""
    capped = make_mailbox(services, boot.account["id"], "capped@mm.test", send_cap_hour=2)
    with services.db.write() as conn:
        test_key = keys.create_key(
            conn,
            actor=operator(boot.account["id"]),
            account_id=boot.account["id"],
            name="sandbox agent",
            scopes=["send", "read"],
            mode="test",
        ).raw_key
    sandbox = api.client(test_key)
    for n in range(2):
        assert _send(sandbox, capped["id"], n).status_code == 202
    live = _send(api.client(boot.agent_key), capped["id"])
    assert live.status_code == 202, live.text


@pytest.mark.skipif(BACKEND != "postgres", reason="SQLite serialises writers; PostgreSQL race")
def test_key_send_cap_holds_under_concurrent_sends_to_different_mailboxes(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """SPEC §2: per-key caps are enforced at send time. A key capped at 3 messages per hour
    gets at most 3 accepted sends, however they are spread over mailboxes and threads."""
    boxes = [make_mailbox(services, boot.account["id"], f"race{i}@mm.test") for i in range(10)]
    with services.db.write() as conn:
        capped_key = keys.create_key(
            conn,
            actor=operator(boot.account["id"]),
            account_id=boot.account["id"],
            name="capped agent",
            scopes=["send", "read"],
            send_cap_hour=3,
        ).raw_key
    clients = [api.client(capped_key) for _ in boxes]
    start = threading.Barrier(len(boxes))
    codes: list[int] = []

    def one(i: int) -> None:
        start.wait()
        codes.append(_send(clients[i], boxes[i]["id"], i).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(boxes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes).count(202) <= 3, codes


def test_lifting_a_send_cap_needs_the_operator(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """SPEC §2: loosening needs the operator (trust ladder, allowlist 'like any loosening').
    A key that is not the operator's own cannot remove the cap the operator set."""
    capped = make_mailbox(services, boot.account["id"], "capped@mm.test", send_cap_hour=5)
    response = api.client(minted_admin_key).patch(
        f"/v1/mailboxes/{capped['id']}", json={"send_cap_hour": None}
    )
    assert response.status_code in (202, 403), response.text
    assert _mailbox_row(services, capped["id"])["send_cap_hour"] == 5


# --- the trust ladder: tightening is immediate -----------------------------------------------


def test_tightening_the_mode_holds_a_scheduled_message_not_yet_released(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """SPEC §2: tightening is immediate. A message still waiting for its send_at has not passed
    any gate yet; when its time comes under a mailbox the operator tightened to gated_send, it
    must wait for approval instead of going out."""
    free = make_mailbox(services, boot.account["id"], "free@mm.test", oversight_mode="autonomous")
    send_at = utcnow() + timedelta(seconds=2)
    sent = api.client(boot.agent_key).post(
        f"/v1/mailboxes/{free['id']}/send",
        json={
            "to": "bob@example.org",
            "subject": "Tomorrow's offer",
            "markdown": "Hi Bob, 50% off.",
            "send_at": isoformat(send_at),
        },
    )
    assert sent.status_code == 202 and sent.json()["status"] == "scheduled", sent.text
    tightened = api.client(boot.admin_key).patch(
        f"/v1/mailboxes/{free['id']}", json={"oversight_mode": "gated_send"}
    )
    assert tightened.status_code == 200 and tightened.json()["oversight_mode"] == "gated_send"
    time.sleep(max(0.0, (send_at - utcnow()).total_seconds()) + 0.2)
    # What the release_scheduled job does when send_at comes.
    status = sending.release_scheduled(services, sent.json()["id"])
    assert status == "pending_send_approval"
    assert job_rows(services, "deliver") == []


# --- approval_code flows --------------------------------------------------------------------


def test_setting_a_mailbox_webhook_url_needs_the_operator_code(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    minted_admin_key: str,
) -> None:
    """SPEC §2: creating a webhook needs the operator's approval_code. A mailbox's webhook_url
    receives all of that mailbox's events (inbound mail bodies included), so setting it is
    creating a webhook and must answer 202 approval_required as POST /v1/webhooks does."""
    admin = api.client(minted_admin_key)
    url = "https://hooks.example.test/collect"
    direct = admin.post("/v1/webhooks", json={"url": url, "mailbox_id": box["id"]})
    assert direct.status_code == 202 and direct.json()["status"] == "approval_required"
    patched = admin.patch(f"/v1/mailboxes/{box['id']}", json={"webhook_url": url})
    assert patched.status_code == 202, patched.text
    assert patched.json()["status"] == "approval_required"
    assert _mailbox_row(services, box["id"])["webhook_url"] is None
    with services.db.read() as conn:
        assert conn.execute(select(webhooks.c.id).where(webhooks.c.url == url)).first() is None
