"""APP-2: every way around the gate gets a 4xx, leaves an audit entry, and sends nothing."""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts, notify
from multimail.services.context import Services
from multimail.store.tables import audit_entries
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers.inbound import run_inbound_worker, run_smtp
from multimail.workers.runner import run_workers
from tests.integration.oversight_support import message_row


class Stack:
    def __init__(self, services: Services, server: LiveServer, relay: CapturingSMTPServer):
        self.services = services
        self.server = server
        self.relay = relay

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def refusals(self) -> list[dict[str, Any]]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(audit_entries).where(
                    audit_entries.c.action.in_(["request.refused", "message.bypass_attempt"])
                )
            ).mappings()
            return [dict(r) for r in rows]


def agent_mail(stack: Stack) -> list[Any]:
    return [m for m in stack.relay.messages if m.mail_from == "agent@mm.test"]


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with CapturingSMTPServer() as relay:
        svc = build_services(
            settings.model_copy(
                update={"smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}"), "smtp_port": 0}
            ),
            run_migrations=False,
        )
        with LiveServer(svc, components=[run_workers, run_smtp, run_inbound_worker]) as server:
            yield Stack(svc, server, relay)
        svc.db.dispose()


def test_no_way_around_the_gate(stack: Stack, boot: accounts.Bootstrap) -> None:
    """Bypass fields, self-approval, a foreign reviewer, a replayed decision, editing after
    approval, re-sending rejected content by reply, relaying through inbound SMTP, a forged
    approval link and loosening the mode: each is refused (4xx) and audited; the relay
    receives nothing that was not approved."""
    admin = stack.client(boot.admin_key)
    agent = stack.client(boot.agent_key)
    reviewer = stack.client(boot.reviewer_key)
    box = admin.post(
        "/v1/mailboxes", json={"address": "agent@mm.test", "oversight_mode": "gated_send"}
    ).json()
    send = f"/v1/mailboxes/{box['id']}/send"
    draft = {"to": ["ceo@bank.example"], "subject": "Wire", "markdown": "Please wire $1M."}

    # 1. extra fields that claim the gate already passed
    for extra in ({"status": "approved"}, {"gated": False}, {"approved": True}):
        refused = agent.post(send, json=draft | extra)
        assert refused.status_code == 422 and refused.json()["code"] == "unknown_fields"

    held = agent.post(send, json=draft).json()
    assert held["status"] == "pending_send_approval"

    # 2. the agent approving its own message, by every door
    for path, body in (
        ("/v1/oversight/decide", {"email_id": held["id"], "action": "approve"}),
        ("/decide_email", {"message_id": held["id"], "decision": "approve"}),
    ):
        response = agent.post(path, json=body)
        assert response.status_code == 403, response.text

    # 3. a reviewer of another account
    other = accounts.bootstrap(stack.services.db, account_name="Other", operator_email="o@x.test")
    foreign = stack.client(other.reviewer_key).post(
        "/v1/oversight/decide", json={"email_id": held["id"], "action": "approve"}
    )
    assert foreign.status_code == 404

    # 4. a forged approval link
    forged = httpx.post(f"{stack.server.base_url}/v1/approve/v1.e30.AAAA")
    assert forged.status_code in (400, 403)

    # 5. loosening the mode without the operator; an agent asking for autonomous still waits
    loosen = agent.patch(f"/v1/mailboxes/{box['id']}", json={"oversight_mode": "autonomous"})
    assert loosen.status_code == 403
    sneaky = agent.post(send, json=draft | {"oversight_mode": "autonomous"}).json()
    assert sneaky["status"] == "pending_send_approval"

    # 6. the reviewer rejects; re-sending the same content as a new send is gated again
    rejected = reviewer.post(
        "/v1/oversight/decide",
        json={"email_id": held["id"], "action": "reject", "reason": "never"},
    )
    assert rejected.json()["status"] == "rejected"
    replay = reviewer.post(
        "/v1/oversight/decide", json={"email_id": held["id"], "action": "approve"}
    )
    assert replay.status_code == 409
    again = agent.post(send, json=draft).json()
    assert again["status"] == "pending_send_approval"

    # 7. relaying through our inbound SMTP server to an outside address
    port = int(stack.services.extras["smtp_port"])  # type: ignore[call-overload]
    with smtplib.SMTP("127.0.0.1", port) as smtp, pytest.raises(smtplib.SMTPRecipientsRefused):
        smtp.sendmail("agent@mm.test", ["ceo@bank.example"], b"Subject: hi\r\n\r\nwire\r\n")

    # 8. editing after approval: approve one, then try to change its content
    approved = reviewer.post(
        "/v1/oversight/decide", json={"email_id": again["id"], "action": "approve"}
    ).json()
    assert approved["status"] in ("queued", "delivered")
    deadline = time.monotonic() + 15
    while not agent_mail(stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    edit = agent.patch(
        f"/v1/mailboxes/{box['id']}/emails/{again['id']}/schedule",
        json={"markdown": "Actually, wire $10M."},
    )
    assert edit.status_code == 409

    # a link for an already-decided message cannot decide it again
    link = notify.approval_link(stack.services, message_row(stack.services, again["id"]), "reject")
    path = "/v1/approve/" + link.rsplit("/v1/approve/", 1)[1]
    assert httpx.post(stack.server.base_url + path).status_code in (409, 410)

    # Only the one approved message reached SMTP, with the approved text (the rest of the
    # relay's traffic is operator notifications, sent from <>).
    received = agent_mail(stack)
    assert len(received) == 1
    assert b"wire $1M" in received[0].data and b"$10M" not in received[0].data

    refusals = stack.refusals()
    assert sum(r["action"] == "message.bypass_attempt" for r in refusals) == 3
    refused = [r for r in refusals if r["action"] == "request.refused"]
    codes = sorted(json.loads(r["details"])["code"] for r in refused)
    assert len(refused) == 6, codes
    assert {"already_decided", "already_approved", "message_not_found"} <= set(codes), codes
    for client in (admin, agent, reviewer):
        client.close()


def test_a_message_read_shows_its_audit_trail_in_order(
    stack: Stack, boot: accounts.Bootstrap
) -> None:
    """GET …/emails/{id} carries the message's audit trail: created → scanned → held →
    approved (with the reviewer) → delivered, so a compliance reviewer sees it in one place."""
    admin = stack.client(boot.admin_key)
    agent = stack.client(boot.agent_key)
    reviewer = stack.client(boot.reviewer_key)
    box = admin.post("/v1/mailboxes", json={"address": "agent@mm.test"}).json()
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": "jane@example.com", "subject": "Hi", "markdown": "Hello Jane"},
    ).json()
    reviewer.post("/v1/oversight/decide", json={"email_id": sent["id"], "action": "approve"})
    deadline = time.monotonic() + 15
    while not agent_mail(stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        read = agent.get(f"/v1/mailboxes/{box['id']}/emails/{sent['id']}").json()
        if read["status"] == "delivered":
            break
        time.sleep(0.05)
    trail = [entry["action"] for entry in read["audit_trail"]]
    assert trail[0] == "message.created"
    for earlier, later in [
        ("message.created", "message.scanned"),
        ("message.scanned", "message.approved"),
        ("message.approved", "message.delivered"),
    ]:
        assert trail.index(earlier) < trail.index(later), trail
    approval = next(e for e in read["audit_trail"] if e["action"] == "message.approved")
    assert approval["actor_name"] == "reviewer"
    for client in (admin, agent, reviewer):
        client.close()
