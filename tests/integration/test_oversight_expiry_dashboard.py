"""The dashboard's Approve on a draft past its approval expiry: refused (409 page), and the
draft is expired as the sweep would expire it; nothing reaches the relay.

Uses the dashboard's own HTTP fixtures (sign-in, CSRF) from ``test_dashboard_http``.
"""

from __future__ import annotations

import time
from contextlib import closing
from datetime import timedelta

from multimail.ids import utcnow
from multimail.services.context import Services
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from tests.integration.oversight_support import audit_actions, make_message, message_row
from tests.integration.test_dashboard_http import (
    Tenant,
    _dashboard_in_app,
    acme,
    live,
    relay,
    signed_in,
    svc,
)

__all__ = ["_dashboard_in_app", "acme", "live", "relay", "svc"]  # fixtures


def test_dashboard_approve_past_the_expiry_is_refused_and_expires_the_draft(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    box = {**acme.mailbox, "account_id": acme.account_id}
    msg = make_message(svc, box, created_at=utcnow() - timedelta(hours=73))
    client, token = signed_in(live, acme)
    with closing(client):
        response = client.post(
            f"/dashboard/messages/{msg['id']}/approve", data={"csrf_token": token}
        )
    assert response.status_code == 409, response.text
    assert "approval_expired" in response.text
    stored = message_row(svc, msg["id"])
    assert stored["status"] == "expired" and stored["decision"] is None
    actions = [a["action"] for a in audit_actions(svc, msg["id"])]
    assert "message.expired" in actions and "message.approved" not in actions
    time.sleep(0.2)
    assert relay.messages == []
