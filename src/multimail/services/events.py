"""Events: written in the same transaction as the change that caused them.

``emit`` stores the event and one ``webhook_deliveries`` row per matching subscription, so a
committed change always has its deliveries queued and a rolled-back one has none. The
dispatcher (``multimail.workers.webhooks``) posts them.

Rules callers can rely on:

* Call ``emit`` inside the ``db.write()`` transaction that makes the change, after the change
  (so ``message`` is the view of the new state). Never in a separate transaction: a crash
  between the two would lose the event or announce a change that never happened.
* Subscriptions match by canonical name, by alias (delivered under the alias), or by ``"*"``.
  One subscription gets one delivery per event, under the first of its names that matches.
* A mailbox's ``webhook_url`` is an implicit subscription to all of that mailbox's events: a
  ``webhooks`` row with ``source = "mailbox"`` kept in step with the mailbox
  (:func:`sync_mailbox_subscription`). Its secret is not shown at creation (the mailbox API
  does not carry it); ``POST /v1/webhooks/{id}/rotate-secret`` reveals a fresh one.
* Dispatchers in this process are nudged once the transaction commits (never on rollback), so
  delivery starts within milliseconds instead of at the next poll.
* ``events.payload`` holds :func:`stored_payload` (the message's view once, no copies); read it
  through :func:`expanded_payload`, which gives back the payload receivers get, to the byte.
* An event is stored only when at least one subscription receives it. The events table is
  the webhooks' outbox, read only through their deliveries; the history of what happened is
  the audit log. So an account without webhooks pays nothing for events, and a subscription
  gets the events from its creation on, never older ones.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, event, insert, or_, select, update

from multimail.errors import InvalidInput
from multimail.ids import isoformat, new_id, utcnow
from multimail.services import audit, messages
from multimail.services.context import Actor
from multimail.store import fast
from multimail.store.tables import events, mailboxes, webhook_deliveries, webhooks
from multimail.webhook_signature import generate_secret

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
WILDCARD = "*"
SUBSCRIBABLE = (*CANONICAL, *ALIASES, WILDCARD)
DELIVERY_EVENTS = ("message.delivered", "message.sent", "message.bounced")


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def validate_names(names: Iterable[str] | str | None) -> list[str]:
    """Subscription names as given (aliases kept), deduplicated; unknown names are refused."""
    if names is None:
        return [WILDCARD]
    if isinstance(names, str):
        names = [names]
    clean = list(dict.fromkeys(str(n).strip() for n in names))
    unknown = [n for n in clean if n not in SUBSCRIBABLE]
    if unknown:
        raise InvalidInput(
            f"unknown event names: {', '.join(unknown)}; use any of: {', '.join(SUBSCRIBABLE)}",
            code="unknown_event",
            unknown=unknown,
            allowed=list(SUBSCRIBABLE),
        )
    return clean or [WILDCARD]


def delivered_name(subscribed: Iterable[str], event_type: str) -> str | None:
    """The name this subscription receives ``event_type`` under, or None if it does not."""
    names = list(subscribed) or [WILDCARD]
    for name in names:
        if name == WILDCARD:
            return event_type
        if canonical(name) == event_type:
            return name
    return None


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
        if event_type in DELIVERY_EVENTS:
            # The guides tag "the original message" on delivery: the inbound mail a reply
            # answered, or the sent message itself when it answered nothing.
            body["original_message_id"] = message.get("reply_to_email_id") or message.get("id")
    body.update(extra or {})
    return body


# Always stored: the event's own fields (the rest of a payload comes from its message).
_EVENT_KEYS = frozenset({"id", "type", "event", "created_at", "mailbox_id", "message"})
_NONE = object()  # what a key payload_for does not derive is "derived" as: equal to nothing


def stored_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` as the events table keeps it: the message's view once, without copies.

    :func:`payload_for` repeats the message's fields at the top level and the view repeats
    its body; kept whole, a delivered message's two events store its body sixteen times.
    What :func:`expanded_payload` derives is left out when it equals the derivation, so an
    ``extra`` that overrides a derived field is kept.
    """
    message = payload.get("message")
    if not isinstance(message, dict):
        return payload
    derived = payload_for(
        event_id=payload.get("id", ""),
        event_type=str(payload.get("type", "")),
        created_at=payload.get("created_at", ""),
        mailbox_id=payload.get("mailbox_id"),
        message=message,
    )
    out: dict[str, Any] = {}
    for key, value in payload.items():
        if key == "message":
            out[key] = messages.compact_view(message)
        elif key in _EVENT_KEYS or not messages.same_json_value(value, derived.get(key, _NONE)):
            out[key] = value
    return out


def stored_text(
    *,
    event_id: str,
    event_type: str,
    created_at: str,
    mailbox_id: str | None,
    compact_message_text: str,
) -> str:
    """``json.dumps(stored_payload(payload_for(...)))`` for a payload without ``extra``.

    ``compact_message_text`` is ``json.dumps(messages.compact_view(view))``. Without
    ``extra`` every top-level field beyond the event's own equals its derivation, so the
    stored payload is the event's fields and the compact view: a writer of several events
    per message (the delivery worker: ``sent`` and ``delivered``) encodes the view once.
    """
    head = json.dumps(
        {
            "id": event_id,
            "type": event_type,
            "event": event_type,
            "created_at": created_at,
            "mailbox_id": mailbox_id,
        }
    )
    return f'{head[:-1]}, "message": {compact_message_text}}}'


def expanded_payload(stored: dict[str, Any]) -> dict[str, Any]:
    """The payload :func:`stored_payload` kept ``stored`` of (a whole one comes back as is)."""
    message = stored.get("message")
    if not isinstance(message, dict):
        return dict(stored)
    out = payload_for(
        event_id=stored.get("id", ""),
        event_type=str(stored.get("type", "")),
        created_at=stored.get("created_at", ""),
        mailbox_id=stored.get("mailbox_id"),
        message=messages.expand_view(message),
    )
    for key, value in stored.items():
        if key != "message":
            out[key] = value
    return out


def renamed(payload: dict[str, Any], name: str) -> dict[str, Any]:
    """The stored payload as one subscriber receives it: ``type``/``event`` = its name."""
    return {**payload, "type": name, "event": name}


# --- nudging dispatchers after commit ---------------------------------------------------------

_listeners: list[Callable[[], None]] = []
_listeners_lock = threading.Lock()


def add_commit_listener(callback: Callable[[], None]) -> None:
    """Call ``callback`` (from any thread) after a transaction that emitted events commits."""
    with _listeners_lock:
        _listeners.append(callback)


def remove_commit_listener(callback: Callable[[], None]) -> None:
    with _listeners_lock:
        if callback in _listeners:
            _listeners.remove(callback)


def notify_listeners() -> None:
    with _listeners_lock:
        current = list(_listeners)
    for callback in current:
        callback()


def nudge_after_commit(conn: Connection) -> None:
    """Wake this process's dispatchers once the caller's transaction commits."""
    if conn.info.get("multimail_events_nudge"):
        return
    conn.info["multimail_events_nudge"] = True

    def _committed(_conn: Connection) -> None:
        conn.info.pop("multimail_events_nudge", None)
        notify_listeners()

    def _rolled_back(_conn: Connection) -> None:
        conn.info.pop("multimail_events_nudge", None)

    # SQLAlchemy's "commit" hook runs just before the DBAPI commit; dispatchers re-check
    # shortly after a nudge that found nothing, so the early signal is harmless.
    event.listen(conn, "commit", _committed, once=True)
    event.listen(conn, "rollback", _rolled_back, once=True)


# --- the implicit subscription behind a mailbox's webhook_url ----------------------------------

CLEARED = "the mailbox's webhook_url was cleared"
DELETED = "the mailbox was deleted"


def _restores(url: str | None, row: Any) -> bool:
    """Whether the mailbox's ``url`` re-enables its subscription: a new URL does, and so does
    setting again the URL that was cleared (never a subscription disabled for another reason,
    such as a 410 from the endpoint, while its URL stays the same)."""
    if not url:
        return False
    return url != row["url"] or (not row["enabled"] and row["disabled_reason"] == CLEARED)


def _stop_pending(conn: Connection, webhook_id: str, why: str) -> int:
    """End the subscription's queued deliveries (``failed``, ``last_error`` saying why); the
    number ended. Deliveries are read with the subscription's URL when claimed, so without
    this a changed URL would carry events queued for the old endpoint to the new one, and a
    re-enabled one would resume them. They stay listed, and can be redelivered on purpose."""
    result = conn.execute(
        update(webhook_deliveries)
        .where(
            webhook_deliveries.c.webhook_id == webhook_id,
            webhook_deliveries.c.status == "pending",
        )
        .values(status="failed", last_error=f"not sent: {why}")
    )
    return int(result.rowcount or 0)


def sync_mailbox_subscription(
    conn: Connection, mailbox_id: str, *, actor: Actor | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """Make the mailbox's ``source="mailbox"`` subscription match its ``webhook_url``.

    Returns the subscription row (None when the mailbox has no URL and never had one) and the
    secret when this call created it (so a caller able to show it once can). A changed URL
    re-enables the subscription; a cleared URL (or a deleted mailbox) disables it (its history
    is kept). Either way the deliveries still pending for the old URL are ended, never sent
    (:func:`_stop_pending`): an operator who withdraws a URL expects no further POSTs to it.
    """
    box = conn.execute(
        select(
            mailboxes.c.id, mailboxes.c.account_id, mailboxes.c.webhook_url, mailboxes.c.deleted_at
        ).where(mailboxes.c.id == mailbox_id)
    ).first()
    if box is None:
        return None, None
    url = box.webhook_url if box.deleted_at is None else None
    row = (
        conn.execute(
            select(webhooks).where(
                webhooks.c.mailbox_id == mailbox_id, webhooks.c.source == "mailbox"
            )
        )
        .mappings()
        .first()
    )
    who = actor or Actor(type="system", id=None, name="system", account_id=box.account_id)
    now = utcnow()
    if row is None:
        if not url:
            return None, None
        secret = generate_secret()
        record: dict[str, Any] = {
            "id": new_id("whk"),
            "account_id": box.account_id,
            "mailbox_id": mailbox_id,
            "url": url,
            "events": [WILDCARD],
            "secret": secret,
            "enabled": True,
            "description": "the mailbox's webhook_url",
            "source": "mailbox",
            "created_at": now,
            "updated_at": now,
        }
        conn.execute(insert(webhooks).values(**record))
        audit.append(
            conn,
            actor=who,
            account_id=box.account_id,
            action="webhook.created",
            subject_type="webhook",
            subject_id=record["id"],
            mailbox_id=mailbox_id,
            details={"url": url, "events": [WILDCARD], "source": "mailbox"},
        )
        return record, secret
    changes: dict[str, Any] = {}
    reason = CLEARED if box.deleted_at is None else DELETED
    if _restores(url, row):
        changes = {"url": url, "enabled": True, "disabled_reason": None, "failing_since": None}
    elif not url and row["enabled"]:
        changes = {"enabled": False, "disabled_reason": reason}
    stopped = 0
    # Deliveries before the webhook row: the dispatcher's recorder locks them in that order.
    if url != row["url"]:
        why = reason if not url else "the mailbox's webhook_url was changed"
        stopped = _stop_pending(conn, row["id"], why)
    if not changes and not stopped:
        return dict(row), None
    if changes:
        conn.execute(
            update(webhooks).where(webhooks.c.id == row["id"]).values(**changes, updated_at=now)
        )
    details: dict[str, Any] = {
        "source": "mailbox",
        "changes": {k: v for k, v in changes.items() if v is not None},
    }
    if stopped:
        details["stopped_deliveries"] = stopped
    audit.append(
        conn,
        actor=who,
        account_id=box.account_id,
        action="webhook.updated" if url else "webhook.disabled",
        subject_type="webhook",
        subject_id=row["id"],
        mailbox_id=mailbox_id,
        details=details,
    )
    return {**dict(row), **changes}, None


# --- emitting ---------------------------------------------------------------------------------

# Built once: constructing and coercing a statement per call costs more than running it.
_INSERT_EVENT = fast.Compiled(events.insert())
_INSERT_DELIVERY = fast.Compiled(webhook_deliveries.insert())
_SUBSCRIBERS = (
    select(webhooks.c.id, webhooks.c.events)
    .where(
        webhooks.c.account_id == bindparam("account_id"),
        webhooks.c.enabled.is_(True),
        or_(webhooks.c.mailbox_id.is_(None), webhooks.c.mailbox_id == bindparam("mailbox_id")),
    )
    .order_by(webhooks.c.id)
)
_MAILBOX_SUBSCRIPTION = fast.Compiled(
    select(
        mailboxes.c.webhook_url,
        mailboxes.c.deleted_at,
        webhooks.c.id.label("webhook_id"),
        webhooks.c.url,
        webhooks.c.enabled,
        webhooks.c.disabled_reason,
    )
    .select_from(
        mailboxes.outerjoin(
            webhooks,
            and_(webhooks.c.mailbox_id == mailboxes.c.id, webhooks.c.source == "mailbox"),
        )
    )
    .where(mailboxes.c.id == bindparam("mailbox_id"))
)


def _subscription_in_step(conn: Connection, mailbox_id: str) -> bool:
    """True when :func:`sync_mailbox_subscription` would change nothing (one query, not two).

    Every emit must see the mailbox's current ``webhook_url``, but it almost never changed
    since the last one: checking costs one joined read, syncing is left for when it differs.
    """
    rows = _MAILBOX_SUBSCRIPTION.all(conn, {"mailbox_id": mailbox_id})
    if len(rows) != 1:
        return not rows  # no such mailbox: nothing to sync; several subscriptions: let sync pick
    row = rows[0]
    url = row["webhook_url"] if row["deleted_at"] is None else None
    if row["webhook_id"] is None:
        return not url
    if not url:
        return not row["enabled"]
    # A differing URL is out of step (sync re-points it and ends what was queued for the old).
    return url == row["url"] and not _restores(url, row)


def delivery_rows(
    subscribers: Iterable[Any], event_id: str, event_type: str, now: datetime
) -> list[dict[str, Any]]:
    """The pending webhook-delivery rows of one event, one per subscriber that wants it
    (each under the name it subscribed with)."""
    rows = []
    for sub in subscribers:
        name = delivered_name(sub.events or [], event_type)
        if name is not None:
            rows.append(
                {
                    "id": new_id("dlv"),
                    "webhook_id": sub.id,
                    "event_id": event_id,
                    "event_name": name,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
            )
    return rows


def subscribers(conn: Connection, account_id: str, mailbox_id: str | None) -> list[Any]:
    """The enabled subscriptions an event of this account and mailbox can go to.

    The mailbox's ``webhook_url`` subscription is brought in step first, so a URL set or
    cleared in an earlier transaction counts. Nothing in a transaction that only emits
    changes subscriptions, so a writer of many events may read this once per mailbox.
    """
    if mailbox_id is not None and not _subscription_in_step(conn, mailbox_id):
        sync_mailbox_subscription(conn, mailbox_id)
    return list(conn.execute(_SUBSCRIBERS, {"account_id": account_id, "mailbox_id": mailbox_id}))


def wanted(subs: Iterable[Any], event_type: str) -> bool:
    """True when one of ``subs`` (from :func:`subscribers`) receives ``event_type``."""
    return any(delivered_name(sub.events or [], event_type) is not None for sub in subs)


def emit(
    conn: Connection,
    *,
    account_id: str,
    event_type: str,
    mailbox_id: str | None = None,
    message: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    no_subscribers: bool = False,
) -> str | None:
    """Queue an event for every subscription that wants it; returns its ``evt_…`` id, or
    None when no subscription wants it (then nothing is stored).

    ``message`` is the message's ``messages.view``/``full_view`` dict (its ``metadata`` and
    ``tags`` reach receivers); ``extra`` adds top-level payload fields. Raises ``ValueError``
    for a name outside :data:`CANONICAL` so a typo fails the caller's transaction loudly.

    ``no_subscribers``: the caller read in this transaction that no ``webhooks`` row can
    match (none account-wide, none for the mailbox) and the mailbox has no live
    ``webhook_url``; the subscription check and the subscriber read are then skipped, as
    they would find nothing to sync and nobody to deliver to.
    """
    if event_type not in CANONICAL:
        raise ValueError(f"unknown event type {event_type!r}; use one of {', '.join(CANONICAL)}")
    if no_subscribers:
        return None
    if mailbox_id is None and message is not None:
        mailbox_id = message.get("mailbox_id")
    event_id = new_id("evt")
    now = utcnow()
    deliveries = delivery_rows(subscribers(conn, account_id, mailbox_id), event_id, event_type, now)
    if not deliveries:
        return None
    payload = payload_for(
        event_id=event_id,
        event_type=event_type,
        created_at=isoformat(now) or "",
        mailbox_id=mailbox_id,
        message=message,
        extra=extra,
    )
    _INSERT_EVENT.execute(
        conn,
        {
            "id": event_id,
            "account_id": account_id,
            "mailbox_id": mailbox_id,
            "message_id": message.get("id") if message else None,
            "type": event_type,
            "payload": stored_payload(payload),
            "created_at": now,
        },
    )
    _INSERT_DELIVERY.executemany(conn, deliveries)
    nudge_after_commit(conn)
    return event_id
