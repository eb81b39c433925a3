"""Events: written in the same transaction as the change that caused them.

``emit`` stores the event and one ``webhook_deliveries`` row per matching subscription, so a
committed change always has its deliveries queued and a rolled-back one has none. The
dispatcher (``multimail.workers.webhooks``) posts them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, or_, select

from multimail.ids import isoformat, new_id, utcnow
from multimail.store.tables import events, webhook_deliveries, webhooks

CANONICAL = (
    "message.received",
    "message.sent",
    "message.delivered",
    "message.bounced",
    "message.complained",
    "oversight.pending",
    "oversight.approved",
    "oversight.rejected",
    "message.cancelled",
    "webhook.test",
)
# Names used in the guides, accepted when subscribing and delivered under the name subscribed.
ALIASES = {
    "email.received": "message.received",
    "email.delivered": "message.delivered",
    "email.pending_approval": "oversight.pending",
    "approval.requested": "oversight.pending",
    "message.approved": "oversight.approved",
    "message.rejected": "oversight.rejected",
}


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def payload_for(
    *,
    event_id: str,
    event_type: str,
    created_at: str,
    mailbox_id: str | None,
    message: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body receivers get (SPEC §6), with the top-level fields the guides read."""
    body: dict[str, Any] = {
        "id": event_id,
        "type": event_type,
        "event": event_type,
        "created_at": created_at,
        "mailbox_id": mailbox_id,
        "message": message,
    }
    if message is not None:
        body.update(
            {
                "message_id": message.get("id"),
                "email_id": message.get("id"),
                "thread_id": message.get("thread_id"),
                "from": {"address": message.get("from"), "name": message.get("from_name")},
                "sender": message.get("from"),
                "to": message.get("to"),
                "subject": message.get("subject"),
                "body_text": message.get("body_text"),
                "tags": message.get("tags") or {},
                "metadata": message.get("metadata") or {},
                "status": message.get("status"),
            }
        )
        if event_type in ("message.delivered", "message.sent", "message.bounced"):
            body["original_message_id"] = message.get("reply_to_email_id") or message.get("id")
    body.update(extra or {})
    return body


def emit(
    conn: Connection,
    *,
    account_id: str,
    event_type: str,
    mailbox_id: str | None = None,
    message: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Record an event and queue it for every subscription that wants it."""
    if event_type not in CANONICAL:
        raise ValueError(f"unknown event type {event_type!r}")
    event_id = new_id("evt")
    now = utcnow()
    payload = payload_for(
        event_id=event_id,
        event_type=event_type,
        created_at=isoformat(now) or "",
        mailbox_id=mailbox_id,
        message=message,
        extra=extra,
    )
    conn.execute(
        insert(events).values(
            id=event_id,
            account_id=account_id,
            mailbox_id=mailbox_id,
            message_id=message.get("id") if message else None,
            type=event_type,
            payload=payload,
            created_at=now,
        )
    )
    subs = conn.execute(
        select(webhooks.c.id, webhooks.c.events).where(
            webhooks.c.account_id == account_id,
            webhooks.c.enabled.is_(True),
            or_(webhooks.c.mailbox_id.is_(None), webhooks.c.mailbox_id == mailbox_id),
        )
    ).all()
    for sub in subs:
        wanted = list(sub.events or [])
        names = [n for n in wanted if canonical(n) == event_type or n == "*"]
        if not wanted:
            names = [event_type]
        for name in names[:1]:
            conn.execute(
                insert(webhook_deliveries).values(
                    id=new_id("dlv"),
                    webhook_id=sub.id,
                    event_id=event_id,
                    event_name=event_type if name == "*" else name,
                    status="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                )
            )
    return event_id
