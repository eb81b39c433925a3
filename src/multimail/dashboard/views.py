"""The review side of the dashboard: the pending queue (live), messages, and decisions.

Each view parses the form, calls one service function as the signed-in operator (an Actor of
type ``user`` named by their email, so every decision records the person), and renders.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from multimail.dashboard.auth import (
    PREFIX,
    DashboardRoute,
    checked_choices,
    checked_form,
    current_session,
    operator_actor,
    services_of,
)
from multimail.dashboard.render import render
from multimail.domain.oversight import Status
from multimail.errors import Conflict, InvalidInput
from multimail.services import (
    audit,
    inbox,
    mailboxes,
    messages,
    notify,
    operators,
    oversight,
    sending,
)
from multimail.services.context import Actor, Services
from multimail.services.operators import OperatorSession

router = APIRouter(prefix=PREFIX, route_class=DashboardRoute, include_in_schema=False)
STATIC = Path(__file__).parent / "static"

# An SSE stream ends after this long and the browser reconnects: server shutdown never
# waits on a dashboard left open for longer than this.
STREAM_SECONDS = 25.0
POLL_SECONDS = 1.0

NOTICES = {
    "approved": "Approved. The message is on its way.",
    "approved_and_sent": "Approved and handed to the mail server.",
    "rejected": "Rejected. The agent can read your note.",
    "cancelled": "Cancelled. It will not be sent.",
    "signed_in": "Signed in.",
}


def _notice(request: Request) -> str | None:
    return NOTICES.get(request.query_params.get("ok", ""))


def _back(path: str, outcome: str) -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}{path}?ok={outcome}", status_code=303)


# --- the queue -------------------------------------------------------------------------------


def _pending(
    services: Services, actor: Actor, limit: int = 50, cursor: str | None = None
) -> dict[str, Any]:
    return oversight.list_pending(services, actor, limit=limit, cursor=cursor)


def _first_steps(services: Services, actor: Actor) -> dict[str, Any]:
    """What the empty queue needs to tell a new operator how to send a first message."""
    with services.db.read() as conn:
        boxes = mailboxes.list_mailboxes(conn, actor)
    return {
        "first_mailbox": boxes[0] if boxes else None,
        "domain": services.settings.domain,
        "base_url": services.settings.base_url,
    }


@router.get("", response_class=Response)
@router.get("/", response_class=Response)
def home() -> Response:
    return RedirectResponse(f"{PREFIX}/queue", status_code=303)


@router.get("/queue")
def queue(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    svc = services_of(request)
    # Newest first, a page at a time: the oldest drafts (the next to expire) are on the
    # last page, reached by the "Older drafts" link.
    cursor = request.query_params.get("cursor") or None
    # Read before the list: a change in between makes the page redraw once, never go stale.
    state = oversight.pending_state(svc, actor)
    pending = _pending(svc, actor, cursor=cursor)
    return render(
        request,
        "queue.html",
        nav="queue",
        pending=pending,
        pending_count=pending["pending_count"],
        cursor=cursor,
        state=state,
        notice=_notice(request),
        batch=None,
        **_first_steps(svc, actor),
    )


@router.get("/queue/items")
def queue_items(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    """The list alone, fetched by the page when the event stream says it changed."""
    svc = services_of(request)
    cursor = request.query_params.get("cursor") or None
    pending = _pending(svc, actor, cursor=cursor)
    return render(
        request,
        "_queue_items.html",
        nav="queue",
        pending=pending,
        cursor=cursor,
        **_first_steps(svc, actor),
    )


@router.post("/queue/batch")
def queue_batch(
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, list[str]] = Depends(checked_choices),
) -> Response:
    """Approve or reject the ticked drafts; each is decided on its own, so one that another
    reviewer already decided is reported beside the others instead of undoing them."""
    svc = services_of(request)
    action = (form.get("op") or [""])[-1]
    if action not in ("approve", "reject"):
        raise InvalidInput("choose Approve or Reject for the selection", code="invalid_decision")
    ids = [i for i in form.get("ids", []) if i]
    if not ids:
        raise InvalidInput("tick at least one message first", code="nothing_selected")
    note = (form.get("note") or [""])[-1].strip() or None
    if action == "reject" and note is None:
        raise InvalidInput(
            "say why in the note: the agents read it to revise their messages",
            code="note_required",
        )
    # Each card posts the digest of the draft it shows (digest_<id>): a draft the agent
    # edited after the queue was drawn is refused in the results, not approved unseen.
    digests = {i: form[f"digest_{i}"][-1] for i in ids if form.get(f"digest_{i}")}
    outcome = oversight.decide_many(
        svc, actor, email_ids=ids, action=action, note=note, draft_digests=digests
    )
    state = oversight.pending_state(svc, actor)
    pending = _pending(svc, actor)
    return render(
        request,
        "queue.html",
        nav="queue",
        pending=pending,
        pending_count=pending["pending_count"],
        cursor=None,
        state=state,
        batch={"action": action, "results": outcome["results"]},
        **_first_steps(svc, actor),
    )


@router.get("/events")
async def event_stream(
    request: Request, session: OperatorSession = Depends(current_session)
) -> Response:
    """Server-sent events: ``pending`` whenever the queue's count, newest item or latest
    change (an agent's edit of a waiting draft) changes."""
    svc = services_of(request)
    actor = session.actor

    async def stream() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STREAM_SECONDS
        yield "retry: 1000\n\n"
        last: dict[str, Any] | None = None
        while loop.time() < deadline and not await request.is_disconnected():
            state = await asyncio.to_thread(oversight.pending_state, svc, actor)
            if state != last:
                yield f"event: pending\ndata: {json.dumps(state)}\n\n"
                last = state
            await asyncio.sleep(POLL_SECONDS)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# --- messages --------------------------------------------------------------------------------


@router.get("/messages")
def message_list(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    svc = services_of(request)
    params = request.query_params
    chosen = {
        "mailbox": params.get("mailbox") or "",
        "status": params.get("status") or "",
        "direction": params.get("direction") or "",
        "q": params.get("q") or "",
    }
    filters = inbox.EmailFilters(
        status=chosen["status"] or None,
        direction=chosen["direction"] or None,
        subject_contains=chosen["q"] or None,
        cursor=params.get("cursor") or None,
        limit=50,
    )
    with svc.db.read() as conn:
        boxes = mailboxes.list_mailboxes(conn, actor)
        found = inbox.list_emails(conn, actor, mailbox=chosen["mailbox"] or None, filters=filters)
    return render(
        request,
        "messages.html",
        nav="messages",
        emails=found["emails"],
        next_cursor=found["next_cursor"],
        mailboxes=boxes,
        chosen=chosen,
        statuses=sorted(s.value for s in Status),
    )


def _detail(services: Services, actor: Actor, message_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        row = messages.get_row(conn, actor, message_id)
        # The decision forms post the digest of the draft shown here (see oversight.decide).
        message = messages.full_view(conn, row) | {"draft_digest": notify.draft_digest(row)}
        thread = inbox.get_thread(conn, actor, row["thread_id"]) if row.get("thread_id") else None
        trail = audit.trail_for_message(conn, actor, row["id"])
        attempts = operators.delivery_attempts(conn, actor, row["id"])
        box = mailboxes.mailbox_view(mailboxes.resolve(conn, actor, row["mailbox_id"]))
    others = [m for m in (thread or {}).get("messages", []) if m["id"] != message["id"]]
    return {
        "message": message,
        "thread": thread,
        "thread_messages": others,
        "trail": trail,
        "attempts": attempts,
        "mailbox": box,
    }


@router.get("/messages/{message_id}")
def message_page(
    message_id: str, request: Request, actor: Actor = Depends(operator_actor)
) -> Response:
    context = _detail(services_of(request), actor, message_id)
    return render(
        request,
        "message.html",
        nav="messages",
        notice=_notice(request),
        problem=None,
        edit=None,
        **context,
    )


def _draft_changed(
    request: Request,
    actor: Actor,
    message_id: str,
    exc: Conflict,
    edit: dict[str, Any] | None = None,
) -> Response:
    """The message page again, showing the draft as it is now under the refusal, so the
    operator reviews what the agent changed before deciding (their edit is kept)."""
    context = _detail(services_of(request), actor, message_id)
    return render(
        request,
        "message.html",
        status_code=409,
        nav="messages",
        problem=exc.message,
        edit=edit,
        **context,
    )


@router.post("/messages/{message_id}/approve")
def approve(
    message_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    try:
        result = oversight.decide(
            services_of(request),
            actor,
            email_id=message_id,
            action="approve",
            note=form.get("note"),
            draft_digest=form.get("draft_digest") or None,
        )
    except Conflict as exc:
        if exc.code != "draft_changed":
            raise
        return _draft_changed(request, actor, message_id, exc)
    return _back(f"/messages/{message_id}", result["result"])


@router.post("/messages/{message_id}/edit")
def edit_and_approve(
    message_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    """``op=preview`` shows the revision rendered; ``op=approve`` approves it as edited."""
    svc = services_of(request)
    subject = form.get("subject", "")
    markdown = form.get("markdown", "").replace("\r\n", "\n")
    if not markdown.strip():
        raise InvalidInput("the edited body is empty", code="empty_body")
    digest = form.get("draft_digest") or None
    if form.get("op") == "preview":
        context = _detail(svc, actor, message_id)
        return render(
            request,
            "message.html",
            nav="messages",
            problem=None,
            # The preview keeps the digest of the draft first shown: approving from it still
            # covers only that draft, whatever the agent changed meanwhile.
            edit={"subject": subject, "markdown": markdown, "draft_digest": digest},
            **context,
        )
    with svc.db.read() as conn:
        current = messages.get_row(conn, actor, message_id)
    try:
        result = oversight.decide(
            svc,
            actor,
            email_id=message_id,
            action="approve",
            note=form.get("note") or None,
            revised_subject=subject if subject != current["subject"] else None,
            # A browser submits the textarea with CRLF line breaks (normalised above): compared
            # with the stored draft as raw text, an untouched CRLF draft would count as an edit.
            revised_markdown=None
            if markdown == (current["markdown"] or "").replace("\r\n", "\n")
            else markdown,
            draft_digest=digest,
        )
    except Conflict as exc:
        if exc.code != "draft_changed":
            raise
        edit = {"subject": subject, "markdown": markdown, "draft_digest": None}
        return _draft_changed(request, actor, message_id, exc, edit)
    return _back(f"/messages/{message_id}", result["result"])


@router.post("/messages/{message_id}/reject")
def reject(
    message_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    note = form.get("note", "").strip()
    if not note:
        raise InvalidInput(
            "say why in the note: the agent reads it to revise the message", code="note_required"
        )
    oversight.decide(services_of(request), actor, email_id=message_id, action="reject", note=note)
    return _back(f"/messages/{message_id}", "rejected")


@router.post("/messages/{message_id}/cancel")
def cancel(
    message_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    sending.cancel(services_of(request), actor, message_id, form.get("reason") or None)
    return _back(f"/messages/{message_id}", "cancelled")
