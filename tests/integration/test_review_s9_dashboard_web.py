"""Review of the dashboard and the one-click approval pages as a web application (session 9).

The first three were a reviewer's strict xfails naming a defect (approvals not bound to
the draft the operator was shown); the rest pin the fix on every surface. A real server on
loopback with a capturing SMTP relay (the fixtures of ``test_dashboard_http``); httpx plays
the browser and posts what the rendered form posts.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx

from multimail.services import keys, notify
from multimail.services.context import Actor, Services
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from tests.integration.test_dashboard_http import (
    Tenant,
    _dashboard_in_app,
    _status,
    acme,
    live,
    relay,
    send_gated,
    signed_in,
    svc,
)

__all__ = ["_dashboard_in_app", "acme", "live", "relay", "svc"]  # fixtures used here

ATTACKER = "exfil@attacker.example"


def _form_fields(page: str, action: str) -> dict[str, str]:
    """The hidden fields of the form posting to ``action``, as the browser would send them."""
    form = re.search(rf'<form[^>]*action="{re.escape(action)}"[^>]*>(.*?)</form>', page, re.S)
    assert form, f"the page has no form posting to {action}"
    fields: dict[str, str] = {}
    for tag in re.findall(r"<input[^>]*>", form.group(1)):
        name = re.search(r'name="([^"]*)"', tag)
        value = re.search(r'value="([^"]*)"', tag)
        if name and 'type="hidden"' in tag:
            fields[html.unescape(name.group(1))] = html.unescape(value.group(1) if value else "")
    return fields


def _linked_hidden(page: str, form_id: str) -> dict[str, str]:
    """Hidden inputs placed outside a form but attached to it with ``form="<id>"``."""
    fields: dict[str, str] = {}
    for tag in re.findall(r"<input[^>]*>", page):
        name = re.search(r'name="([^"]*)"', tag)
        value = re.search(r'value="([^"]*)"', tag)
        if name and 'type="hidden"' in tag and f'form="{form_id}"' in tag:
            fields[html.unescape(name.group(1))] = html.unescape(value.group(1) if value else "")
    return fields


def _agent_edit(live: LiveServer, tenant: Tenant, message_id: str, **changes: object) -> None:
    with httpx.Client(base_url=live.base_url, timeout=30) as agent:
        response = agent.patch(
            f"/v1/emails/{message_id}/schedule",
            headers={"Authorization": f"Bearer {tenant.agent_key}"},
            json=changes,
        )
    assert response.status_code == 200, response.text


def test_dashboard_approve_covers_only_the_draft_the_operator_saw(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """The Approve form names the draft on the page: an agent's edit after the page loaded
    (new recipients and body) is refused with 409, and the message stays pending."""
    message_id = send_gated(live, acme, subject="Quote for Jane")
    client, _token = signed_in(live, acme)
    with closing(client):
        page = client.get(f"/dashboard/messages/{message_id}")
        assert page.status_code == 200 and "jane@example.com" in page.text
        form = _form_fields(page.text, f"/dashboard/messages/{message_id}/approve")
        # A prompt-injected agent swaps the recipient and the body while the page is open.
        _agent_edit(live, acme, message_id, to=[ATTACKER], markdown="All customer records: ...")
        assert _status(svc, message_id)["status"] == "pending_send_approval"
        decided = client.post(f"/dashboard/messages/{message_id}/approve", data=form)
    row = _status(svc, message_id)
    assert row["decision"] is None and row["status"] == "pending_send_approval", (
        f"the operator approved a draft they never saw (to={row['to']}, response "
        f"{decided.status_code})"
    )
    assert decided.status_code == 409


def test_edit_and_approve_covers_only_the_recipients_the_operator_saw(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """Edit & approve posts the digest of the draft shown, so recipients an agent changed
    after the page loaded are never approved along with the operator's edit."""
    message_id = send_gated(live, acme, subject="Quote for Jane")
    client, _token = signed_in(live, acme)
    action = f"/dashboard/messages/{message_id}/edit"
    with closing(client):
        page = client.get(f"/dashboard/messages/{message_id}")
        assert page.status_code == 200 and "jane@example.com" in page.text
        form = _form_fields(page.text, action)
        form |= {"subject": "Quote for Jane", "markdown": "Hello Jane, revised.", "op": "approve"}
        _agent_edit(live, acme, message_id, to=[ATTACKER])
        decided = client.post(action, data=form)
    row = _status(svc, message_id)
    assert row["decision"] is None and row["status"] == "pending_send_approval", (
        f"the edit approved recipients the operator never saw (to={row['to']}, response "
        f"{decided.status_code})"
    )
    assert decided.status_code == 409


def test_batch_approve_covers_only_the_drafts_the_operator_saw(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """Each queue card posts its draft's digest with the batch form: a draft an agent edited
    after the queue was drawn is not approved by the batch."""
    message_id = send_gated(live, acme, subject="Quote for Jane")
    client, _token = signed_in(live, acme)
    with closing(client):
        page = client.get("/dashboard/queue")
        assert page.status_code == 200 and "jane@example.com" in page.text
        form = _form_fields(page.text, "/dashboard/queue/batch")
        form |= _linked_hidden(page.text, "batch")
        _agent_edit(live, acme, message_id, to=[ATTACKER], markdown="All customer records: ...")
        decided = client.post(
            "/dashboard/queue/batch", data={**form, "ids": [message_id], "op": "approve"}
        )
    assert decided.status_code == 200
    row = _status(svc, message_id)
    assert row["decision"] is None and row["status"] == "pending_send_approval", (
        f"the batch approved a draft the operator never saw (to={row['to']})"
    )


CHANGED = "The draft changed after you opened it: review it again"


def test_refused_approval_shows_the_draft_as_it_is_now_and_approves_from_there(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """The 409 is the message page again: the sentence says what happened, the page shows
    the agent's new draft, and its Approve form (now naming that draft) approves it."""
    message_id = send_gated(live, acme)
    action = f"/dashboard/messages/{message_id}/approve"
    client, _token = signed_in(live, acme)
    with closing(client):
        form = _form_fields(client.get(f"/dashboard/messages/{message_id}").text, action)
        _agent_edit(live, acme, message_id, to=["jane.doe@example.com"], markdown="Hi Jane")
        refused = client.post(action, data=form)
        assert refused.status_code == 409
        assert CHANGED in refused.text and 'role="alert"' in refused.text
        assert "jane.doe@example.com" in refused.text and "Hi Jane" in refused.text
        approved = client.post(action, data=_form_fields(refused.text, action))
    assert approved.status_code == 303
    row = _status(svc, message_id)
    assert row["decision"] == "approve" and row["to"] == ["jane.doe@example.com"]


def test_edit_preview_keeps_naming_the_draft_first_shown(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """A preview does not adopt an agent's edit made meanwhile: approving from the preview
    is refused, and the refusal keeps the operator's edited text in the form."""
    message_id = send_gated(live, acme)
    action = f"/dashboard/messages/{message_id}/edit"
    client, _token = signed_in(live, acme)
    with closing(client):
        form = _form_fields(client.get(f"/dashboard/messages/{message_id}").text, action)
        form |= {"subject": "Quote for Jane", "markdown": "Hello Jane, revised."}
        _agent_edit(live, acme, message_id, to=[ATTACKER])
        preview = client.post(action, data={**form, "op": "preview"})
        assert preview.status_code == 200
        assert _form_fields(preview.text, action)["draft_digest"] == form["draft_digest"]
        refused = client.post(action, data={**_form_fields(preview.text, action), **form})
    assert refused.status_code == 409 and CHANGED in refused.text
    assert "Hello Jane, revised." in refused.text
    assert _status(svc, message_id)["status"] == "pending_send_approval"


def test_batch_refuses_the_edited_draft_and_approves_the_others(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """One draft edited after the queue was drawn is reported as changed in the batch
    results; the untouched draft of the same batch is approved."""
    edited, untouched = send_gated(live, acme, "Edited"), send_gated(live, acme, "Untouched")
    client, _token = signed_in(live, acme)
    with closing(client):
        page = client.get("/dashboard/queue").text
        form = _form_fields(page, "/dashboard/queue/batch") | _linked_hidden(page, "batch")
        assert set(form) >= {f"digest_{edited}", f"digest_{untouched}"}
        _agent_edit(live, acme, edited, to=[ATTACKER])
        decided = client.post(
            "/dashboard/queue/batch", data={**form, "ids": [edited, untouched], "op": "approve"}
        )
    assert decided.status_code == 200
    assert "Approved 1 of 2" in decided.text and CHANGED.lower() in decided.text
    assert _status(svc, edited)["status"] == "pending_send_approval"
    assert _status(svc, untouched)["decision"] == "approve"


def _next_state(lines: Iterator[str]) -> dict[str, Any]:
    data = next(line for line in lines if line.startswith("data:"))
    state: dict[str, Any] = json.loads(data.removeprefix("data:").strip())
    return state


def test_live_queue_redraws_a_draft_edited_in_place(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """The queue's event stream reports an in-place edit (same count, same newest draft),
    the page starts from the stream's state (no needless redraw), and the redrawn list
    shows the new draft under its new digest."""
    message_id = send_gated(live, acme)
    client, _token = signed_in(live, acme)
    with closing(client):
        page = client.get("/dashboard/queue").text
        before = _linked_hidden(page, "batch")[f"digest_{message_id}"]
        with client.stream("GET", "/dashboard/events") as stream:
            lines = stream.iter_lines()
            first = _next_state(lines)
            assert f'data-changed="{html.escape(first["changed"])}"' in page
            _agent_edit(live, acme, message_id, to=[ATTACKER])
            second = _next_state(lines)
        items = client.get("/dashboard/queue/items").text
    assert (first["count"], first["newest"]) == (1, message_id)
    assert (second["count"], second["newest"]) == (first["count"], first["newest"])
    assert second["changed"] != first["changed"]
    assert ATTACKER in items
    assert _linked_hidden(items, "batch")[f"digest_{message_id}"] != before


# --- the REST surface (SPEC §5.1): the queue gives each draft's digest, decide checks it ---


def _reviewer(live: LiveServer, svc: Services, tenant: Tenant) -> httpx.Client:
    """An API client with an ``oversight`` key of ``tenant``'s account."""
    system = Actor(type="system", id=None, name="test", account_id=tenant.account_id)
    with svc.db.write() as conn:
        key = keys.create_key(
            conn,
            actor=system,
            account_id=tenant.account_id,
            name="api reviewer",
            scopes=["oversight", "read"],
        )
    return httpx.Client(
        base_url=live.base_url, timeout=30, headers={"Authorization": f"Bearer {key.raw_key}"}
    )


def test_api_decide_with_the_queues_digest_covers_only_that_draft(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """``GET /v1/oversight/pending`` gives each draft's ``draft_digest``; an approval sent
    with it after the agent edited the draft is 409 ``draft_changed`` and nothing is decided;
    with the new digest it approves. A rejection is not held back by an old digest."""
    edited, kept = send_gated(live, acme, "Edited"), send_gated(live, acme, "Kept")
    with _reviewer(live, svc, acme) as api:
        queue = api.get("/v1/oversight/pending").json()
        digests = {item["id"]: item["draft_digest"] for item in queue["pending"]}
        for item in queue["pending"]:
            assert item["draft_digest"] == notify.draft_digest(_status(svc, item["id"]))
        _agent_edit(live, acme, edited, to=[ATTACKER])
        stale = {"email_id": edited, "action": "approve", "draft_digest": digests[edited]}
        refused = api.post("/v1/oversight/decide", json=stale)
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["code"] == "draft_changed" and "review it again" in body["error"]
        assert body["status"] == "pending_send_approval"
        assert _status(svc, edited)["decision"] is None
        fresh = api.get("/v1/oversight/pending").json()["pending"]
        new_digest = next(i["draft_digest"] for i in fresh if i["id"] == edited)
        approved = api.post("/v1/oversight/decide", json={**stale, "draft_digest": new_digest})
        assert approved.status_code == 200, approved.text
        rejected = api.post(
            "/v1/oversight/decide",
            json={"email_id": kept, "action": "reject", "note": "No.", "draft_digest": "0" * 64},
        )
        assert rejected.status_code == 200, rejected.text
    assert _status(svc, edited)["decision"] == "approve"
    assert _status(svc, kept)["decision"] == "reject"


def test_the_decide_email_tool_takes_the_digest_too(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """The tool-named route (and so MCP and the Python client, fed by the same catalogue)
    passes ``draft_digest`` through: a stale one is 409 ``draft_changed``."""
    edited = send_gated(live, acme, "Edited")
    with _reviewer(live, svc, acme) as api:
        digest = api.get("/v1/oversight/pending").json()["pending"][0]["draft_digest"]
        _agent_edit(live, acme, edited, to=[ATTACKER])
        stale = {"message_id": edited, "decision": "approve", "draft_digest": digest}
        refused = api.post("/decide_email", json=stale)
        assert refused.status_code == 409 and refused.json()["code"] == "draft_changed"
    assert _status(svc, edited)["decision"] is None


def test_api_batch_decide_checks_each_drafts_digest(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """``email_ids`` with ``draft_digests`` ({id: digest}): a draft edited since the queue
    was read is refused in the results with ``draft_changed``; the others are approved."""
    edited, kept = send_gated(live, acme, "Edited"), send_gated(live, acme, "Kept")
    with _reviewer(live, svc, acme) as api:
        queue = api.get("/v1/oversight/pending").json()["pending"]
        digests = {item["id"]: item["draft_digest"] for item in queue}
        _agent_edit(live, acme, edited, markdown="All customer records: ...")
        decided = api.post(
            "/v1/oversight/decide",
            json={"email_ids": [edited, kept], "action": "approve", "draft_digests": digests},
        )
    assert decided.status_code == 200, decided.text
    results = {r["id"]: r for r in decided.json()["results"]}
    assert results[edited]["ok"] is False and results[edited]["code"] == "draft_changed"
    assert results[kept]["ok"] is True
    assert _status(svc, edited)["status"] == "pending_send_approval"
    assert _status(svc, kept)["decision"] == "approve"


def test_api_draft_digest_mistakes_are_refused_with_a_sentence(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """A digest that is not one the queue gives, one given for a message outside the batch,
    or a single ``draft_digest`` with ``email_ids`` is a 422 ``invalid_draft_digest`` saying
    what to send instead; nothing is decided."""
    message_id = send_gated(live, acme)
    with _reviewer(live, svc, acme) as api:
        digest = api.get("/v1/oversight/pending").json()["pending"][0]["draft_digest"]
        wrong = [
            ({"email_id": message_id, "draft_digest": digest[:20]}, "64-character hex"),
            ({"email_id": message_id, "draft_digest": digest.upper()}, "copy it unchanged"),
            ({"email_id": message_id, "draft_digests": {message_id: digest}}, "email_ids"),
            ({"email_ids": [message_id], "draft_digest": digest}, "draft_digests"),
            ({"email_ids": [message_id], "draft_digests": {"msg_other": digest}}, "msg_other"),
        ]
        for body, hint in wrong:
            response = api.post("/v1/oversight/decide", json={**body, "action": "approve"})
            assert response.status_code == 422, (body, response.text)
            assert response.json()["code"] == "invalid_draft_digest"
            assert hint in response.json()["error"]
    assert _status(svc, message_id)["decision"] is None
