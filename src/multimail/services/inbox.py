"""The agent's inbox: listing, reading, threads, tags, attachments, waiting, spam, usage.

Held inbound mail (``pending_inbound_approval``, and what a reviewer refused instead of
releasing) is invisible to callers without the ``oversight`` scope: not listed, not
readable, not in threads. Spam is left out of a listing unless its status filter asks for it.
Lists are keyset-paginated on the id (ULIDs sort by creation), newest first, so the cursor
(the last id returned) stays valid while new mail arrives.

``since_id`` (a listing's and ``wait_for_email``'s) asks for mail that became visible to the
agent after the message it names did. Mail is visible from its arrival (its id), or from
when a reviewer released it or it was marked not spam: that mints ``surfaced_id``, a later
``msg_`` id, so mail released out of order still comes after what a poller has seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Select, and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from multimail.domain.oversight import Status, can_transition
from multimail.domain.scopes import Scope, satisfies
from multimail.errors import Conflict, InvalidInput, NotFound
from multimail.ids import id_cursor, is_id, new_id, parse_datetime, utcnow
from multimail.mail.dkim import verify_message
from multimail.services import audit, mailboxes, messages, threads
from multimail.services.authresults import dns_txt_func, make_resolver
from multimail.services.common import clamp_limit
from multimail.services.context import Actor, Services
from multimail.services.inbound import signals
from multimail.store.db import contains_folded
from multimail.store.tables import attachments, message_tags
from multimail.store.tables import mailboxes as mailboxes_table
from multimail.store.tables import messages as messages_table

__all__ = [
    "MAX_WAIT_SECONDS",
    "Attachment",
    "EmailFilters",
    "delete_tag",
    "download_attachment",
    "get_tags",
    "get_thread",
    "list_emails",
    "mark_not_spam",
    "read_email",
    "read_email_verified",
    "report_spam",
    "set_tags",
    "usage",
    "wait_for_email",
]

MAX_WAIT_SECONDS = 120.0
_FALLBACK_POLL_S = 1.0  # for mail processed by another process, whose notify we cannot hear
_STATUSES = frozenset(s.value for s in Status)


def can_see_held(actor: Actor) -> bool:
    return actor.is_operator or satisfies(actor.scopes, Scope.OVERSIGHT)


def visible(actor: Actor) -> ColumnElement[bool]:
    """The messages ``actor`` may see: all, or none of the inbound mail not released."""
    if can_see_held(actor):
        return messages_table.c.id.is_not(None)
    return or_(
        messages_table.c.direction != "inbound",
        messages_table.c.status.not_in(messages.HELD_STATUSES),
    )


def _row(conn: Connection, actor: Actor, ref: str, mailbox_id: str | None) -> dict[str, Any]:
    row = messages.get_row(conn, actor, ref, mailbox_id=mailbox_id)
    if messages.held_from_agents(row) and not can_see_held(actor):
        raise NotFound(f"message {ref!r} not found", code="message_not_found")
    return row


def _fetch(conn: Connection, query: Select[Any]) -> list[Mapping[str, Any]]:
    return [dict(r) for r in conn.execute(query).mappings()]


def _mailbox_id(conn: Connection, actor: Actor, ref: str | None) -> str | None:
    return mailboxes.resolve(conn, actor, ref)["id"] if ref else None


def _mode(conn: Connection, mailbox_id: str) -> str | None:
    """The mailbox's oversight mode now: a message's audit entries record the mode in effect."""
    found = conn.execute(
        select(mailboxes_table.c.oversight_mode).where(mailboxes_table.c.id == mailbox_id)
    )
    mode: str | None = found.scalar_one_or_none()
    return mode


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class EmailFilters:
    status: str | None = None
    sender: str | None = None
    subject_contains: str | None = None
    date_after: str | None = None
    date_before: str | None = None
    direction: str | None = None
    has_attachments: bool | None = None
    since_id: str | None = None
    cursor: str | None = None
    offset: int = 0
    limit: int | None = None


def _date(value: str, name: str) -> datetime:
    try:
        return parse_datetime(value)
    except ValueError:
        raise InvalidInput(f"{name} must be an ISO 8601 date or time", field=name) from None


def _surfaced_after(key: str) -> ColumnElement[bool]:
    # coalesce(surfaced_id, id) > key, spelt so that each side can use its own index.
    return or_(
        and_(messages_table.c.surfaced_id.is_(None), messages_table.c.id > key),
        messages_table.c.surfaced_id > key,
    )


def _since_key(conn: Connection, actor: Actor, since_id: str, mailbox_id: str | None) -> str:
    """The point ``since_id`` names: when the message it names became visible to the agent.

    A ``msg_`` id no stored message has (deleted, or never ours) is its own point; a
    Message-ID (``<…>``) must name a message the caller can read.
    """
    if is_id(since_id, "msg"):
        found = conn.execute(
            select(func.coalesce(messages_table.c.surfaced_id, messages_table.c.id)).where(
                messages_table.c.id == since_id,
                messages_table.c.account_id == actor.account_id,
            )
        ).scalar_one_or_none()
        return str(found or since_id)
    if len(since_id) > 2 and since_id.startswith("<") and since_id.endswith(">"):
        row = _row(conn, actor, since_id, mailbox_id)
        return str(row["surfaced_id"] or row["id"])
    raise InvalidInput(
        "since_id must be the id (msg_…) of the newest message you have seen, or its "
        "Message-ID in angle brackets",
        code="invalid_since_id",
        field="since_id",
    )


def _conditions(
    conn: Connection, actor: Actor, f: EmailFilters, mailbox_id: str | None
) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    if f.status:
        wanted = [s.strip() for s in f.status.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in _STATUSES]
        if unknown:
            raise InvalidInput(f"unknown status {unknown[0]!r}", field="status")
        out.append(messages_table.c.status.in_(wanted))
    else:
        # Quarantined: found with status=spam (list_spam), like wait_for_email skips it.
        out.append(messages_table.c.status != Status.SPAM.value)
    if f.sender:
        out.append(contains_folded(messages_table.c.from_address, f.sender))
    if f.subject_contains:
        out.append(contains_folded(messages_table.c.subject, f.subject_contains))
    if f.date_after:
        out.append(messages_table.c.created_at >= _date(f.date_after, "date_after"))
    if f.date_before:
        out.append(messages_table.c.created_at < _date(f.date_before, "date_before"))
    if f.direction:
        if f.direction not in ("inbound", "outbound"):
            raise InvalidInput("direction must be inbound or outbound", field="direction")
        out.append(messages_table.c.direction == f.direction)
    if f.has_attachments is not None:
        has = exists().where(attachments.c.message_id == messages_table.c.id)
        out.append(has if f.has_attachments else ~has)
    if f.since_id:
        out.append(_surfaced_after(_since_key(conn, actor, f.since_id, mailbox_id)))
    cursor = id_cursor(f.cursor, "msg")
    if cursor:
        out.append(messages_table.c.id < cursor)
    if f.offset < 0:
        raise InvalidInput("offset must not be negative", field="offset")
    return out


def list_emails(
    conn: Connection, actor: Actor, *, mailbox: str | None, filters: EmailFilters
) -> dict[str, Any]:
    """``{"emails", "next_cursor", "count"}``, newest first."""
    actor.require(Scope.READ)
    limit = clamp_limit(filters.limit)
    mailbox_id = _mailbox_id(conn, actor, mailbox)
    query = select(messages_table).where(
        messages_table.c.account_id == actor.account_id,
        visible(actor),
        *_conditions(conn, actor, filters, mailbox_id),
    )
    if mailbox_id:
        query = query.where(messages_table.c.mailbox_id == mailbox_id)
    elif actor.mailbox_ids is not None:
        query = query.where(messages_table.c.mailbox_id.in_(actor.mailbox_ids))
    query = query.order_by(messages_table.c.id.desc()).offset(filters.offset).limit(limit + 1)
    rows = _fetch(conn, query)
    more = len(rows) > limit
    rows = rows[:limit]
    emails = messages.views(conn, rows)
    return {
        "emails": emails,
        "next_cursor": rows[-1]["id"] if more and rows else None,
        "count": len(emails),
        "has_more": more,
    }


# --------------------------------------------------------------------------- reading


def read_email(
    conn: Connection, actor: Actor, ref: str, *, mailbox: str | None = None
) -> dict[str, Any]:
    """The full message; an unread one becomes read (audited)."""
    actor.require(Scope.READ)
    row = _row(conn, actor, ref, _mailbox_id(conn, actor, mailbox))
    if row["status"] == Status.UNREAD.value:
        now = utcnow()
        changed = conn.execute(
            update(messages_table)
            .where(messages_table.c.id == row["id"], messages_table.c.status == "unread")
            .values(status=Status.READ.value, read_at=now, updated_at=now)
        ).rowcount
        if changed:
            row.update(status=Status.READ.value, read_at=now, updated_at=now)
            audit.append(
                conn,
                actor=actor,
                action="message.read",
                subject_type="message",
                subject_id=row["id"],
                mailbox_id=row["mailbox_id"],
                oversight_mode=_mode(conn, row["mailbox_id"]),
            )
    data = messages.full_view(conn, row)
    data["trusted"] = {
        key: data[key]
        for key in (
            "id",
            "mailbox_id",
            "thread_id",
            "direction",
            "status",
            "from",
            "from_name",
            "to",
            "cc",
            "subject",
            "created_at",
            "attachments",
            "tags",
        )
    }
    data["trusted"]["auth_results"] = row.get("auth_results")
    data["untrusted_body"] = data["body"]
    data["auth_results"] = row.get("auth_results")
    # Who did what to this message, in order (draft, scan, decision, delivery): a compliance
    # reviewer reads the whole story in one response.
    data["audit_trail"] = audit.trail_for_message(conn, actor, row["id"])
    return data


def _dkim_verified(services: Services, row: Mapping[str, Any]) -> bool | None:
    if row["direction"] == "inbound":
        results = row.get("auth_results") or {}
        result = (results.get("dkim") or {}).get("result")
        return None if result in (None, "none") else result == "pass"
    raw = row.get("raw")
    if not raw:
        return None
    resolver = make_resolver(services.settings.dns_resolver)
    try:
        return verify_message(bytes(raw), dnsfunc=dns_txt_func(resolver))
    except Exception:
        return False


def read_email_verified(
    services: Services, actor: Actor, ref: str, *, mailbox: str | None = None
) -> dict[str, Any]:
    """:func:`read_email` plus ``dkim_verified`` and the top-level ``reviewer`` (SPEC §5.2).

    An outbound message's own DKIM signature is checked again against DNS, so this takes the
    services (for the resolver) and runs the lookup after the transaction commits.
    """
    with services.db.write() as conn:
        data = read_email(conn, actor, ref, mailbox=mailbox)
        row = messages.get_row(conn, actor, data["id"])
    # DNS is asked outside the transaction: a slow resolver must not hold the write lock.
    data["dkim_verified"] = _dkim_verified(services, row)
    data.setdefault("decision", None)
    data["reviewer"] = (data["decision"] or {}).get("reviewer")
    return data


# --------------------------------------------------------------------------- threads


# A reply in one of these is sent or on its way (a reviewer or the clock may still stop it):
# the question is being answered, and the agent must not draft a second answer.
_ANSWERING = frozenset(
    s.value
    for s in (
        Status.PENDING_SCAN,
        Status.PENDING_SEND_APPROVAL,
        Status.SCHEDULED,
        Status.QUEUED,
        Status.SENDING,
        Status.DEFERRED,
        Status.DELIVERED,
    )
)


def _unanswered(rows: Sequence[Mapping[str, Any]]) -> bool:
    last_inbound = max(
        (i for i, row in enumerate(rows) if row["direction"] == "inbound"), default=None
    )
    if last_inbound is None:
        return False
    return not any(
        row["direction"] == "outbound" and row["status"] in _ANSWERING
        for row in rows[last_inbound + 1 :]
    )


def get_thread(
    conn: Connection, actor: Actor, ref: str, *, mailbox: str | None = None
) -> dict[str, Any]:
    """The thread's messages in order, its participants and ``unanswered``.

    ``unanswered`` is true when the thread holds inbound mail and no reply after the latest
    inbound message is sent or on its way: pending scan or approval, scheduled, queued,
    sending, deferred or delivered. Replies that ended cancelled, rejected, expired,
    send_failed or bounced answered nothing, so they leave the thread unanswered. A thread
    with no inbound mail is not unanswered.
    """
    actor.require(Scope.READ)
    thread = threads.resolve(conn, actor, ref, mailbox_id=_mailbox_id(conn, actor, mailbox))
    rows = _fetch(
        conn,
        select(messages_table)
        .where(messages_table.c.thread_id == thread["id"], visible(actor))
        .order_by(messages_table.c.id),
    )
    items = messages.views(conn, rows)
    for item in items:
        item["date"] = item["created_at"]
    participants: list[str] = []
    for row in rows:
        for address in [row["from_address"], *(row["to"] or []), *(row["cc"] or [])]:
            if address and address.lower() not in participants:
                participants.append(address.lower())
    return {
        "thread_id": threads.public_thread_id(thread),
        "id": threads.public_thread_id(thread),
        "mailbox_id": thread["mailbox_id"],
        "subject": thread["subject"],
        "messages": items,
        "participants": participants,
        "message_count": len(items),
        "last_activity": items[-1]["created_at"] if items else None,
        "unanswered": _unanswered(rows),
    }


# --------------------------------------------------------------------------- tags


def _tag_map(tags: Any) -> dict[str, str]:
    if isinstance(tags, str):
        tags = [tags]
    if isinstance(tags, Sequence) and not isinstance(tags, str):
        tags = {str(label): "" for label in tags}
    if not isinstance(tags, Mapping):
        raise InvalidInput("tags must be a list of labels or an object", field="tags")
    out: dict[str, str] = {}
    for key, value in tags.items():
        key = str(key).strip()
        text = "" if value is None else str(value)
        if "\x00" in key + text or not key.isprintable():
            raise InvalidInput("tags may not contain NUL or control characters", field="tags")
        if not key or len(key) > 200:
            raise InvalidInput("a tag key must have 1 to 200 characters", field="tags")
        if len(text) > 2000:
            raise InvalidInput(f"the value of tag {key!r} is too long", field="tags")
        out[key] = text
    if len(out) > 100:
        raise InvalidInput("at most 100 tags per request", field="tags")
    return out


def get_tags(
    conn: Connection, actor: Actor, ref: str, *, mailbox: str | None = None
) -> dict[str, Any]:
    actor.require(Scope.READ)
    row = _row(conn, actor, ref, _mailbox_id(conn, actor, mailbox))
    return {"message_id": row["id"], "tags": messages.tags_for(conn, [row["id"]])[row["id"]]}


def set_tags(
    conn: Connection, actor: Actor, ref: str, tags: Any, *, mailbox: str | None = None
) -> dict[str, Any]:
    """Merge key-value tags (a list of labels becomes ``{label: ""}``); the tags may also
    come wrapped as ``{"tags": ...}``."""
    actor.require(Scope.READ)
    if isinstance(tags, dict) and set(tags) == {"tags"}:
        tags = tags["tags"]
    wanted = _tag_map(tags)
    row = _row(conn, actor, ref, _mailbox_id(conn, actor, mailbox))
    current = messages.tags_for(conn, [row["id"]])[row["id"]]
    for key, value in wanted.items():
        if key in current:
            conn.execute(
                update(message_tags)
                .where(message_tags.c.message_id == row["id"], message_tags.c.key == key)
                .values(value=value)
            )
        else:
            conn.execute(insert(message_tags).values(message_id=row["id"], key=key, value=value))
    audit.append(
        conn,
        actor=actor,
        action="message.tagged",
        subject_type="message",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        oversight_mode=_mode(conn, row["mailbox_id"]),
        details={"tags": wanted},
    )
    return {"message_id": row["id"], "tags": {**current, **wanted}}


def delete_tag(
    conn: Connection, actor: Actor, ref: str, key: str, *, mailbox: str | None = None
) -> dict[str, Any]:
    actor.require(Scope.READ)
    row = _row(conn, actor, ref, _mailbox_id(conn, actor, mailbox))
    removed = conn.execute(
        delete(message_tags).where(
            message_tags.c.message_id == row["id"], message_tags.c.key == key
        )
    ).rowcount
    if not removed:
        raise NotFound(f"message has no tag {key!r}", code="tag_not_found")
    audit.append(
        conn,
        actor=actor,
        action="message.untagged",
        subject_type="message",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        oversight_mode=_mode(conn, row["mailbox_id"]),
        details={"key": key},
    )
    return {"message_id": row["id"], "tags": messages.tags_for(conn, [row["id"]])[row["id"]]}


# --------------------------------------------------------------------------- attachments


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


def download_attachment(
    conn: Connection, actor: Actor, ref: str, filename: str, *, mailbox: str | None = None
) -> Attachment:
    """By file name, or by attachment id (``att_…``) or Content-ID."""
    actor.require(Scope.READ)
    row = _row(conn, actor, ref, _mailbox_id(conn, actor, mailbox))
    found = (
        conn.execute(
            select(attachments)
            .where(
                attachments.c.message_id == row["id"],
                or_(
                    attachments.c.filename == filename,
                    attachments.c.id == filename,
                    attachments.c.content_id == filename,
                ),
            )
            .order_by(attachments.c.id)
            .limit(1)
        )
        .mappings()
        .first()
    )
    if found is None:
        raise NotFound(f"no attachment {filename!r} on this message", code="attachment_not_found")
    return Attachment(found["filename"], found["content_type"], bytes(found["data"]))


# --------------------------------------------------------------------------- waiting


def _newest_visible(
    services: Services, actor: Actor, mailbox_id: str | None, after: str | None
) -> tuple[list[dict[str, Any]], str]:
    """The inbound mail visible after point ``after`` in the order it became visible (or,
    with no ``after``, the one that became visible last), and the point the last one marks."""
    surfaced = func.coalesce(messages_table.c.surfaced_id, messages_table.c.id)
    with services.db.read() as conn:
        query = select(messages_table).where(
            messages_table.c.account_id == actor.account_id,
            messages_table.c.direction == "inbound",
            visible(actor),
            messages_table.c.status != Status.SPAM.value,
        )
        if mailbox_id:
            query = query.where(messages_table.c.mailbox_id == mailbox_id)
        elif actor.mailbox_ids is not None:
            query = query.where(messages_table.c.mailbox_id.in_(actor.mailbox_ids))
        if after:
            query = query.where(_surfaced_after(after))
            rows = _fetch(conn, query.order_by(surfaced).limit(50))
        else:
            rows = _fetch(conn, query.order_by(surfaced.desc()).limit(1))
        point = str(rows[-1]["surfaced_id"] or rows[-1]["id"]) if rows else ""
        return messages.views(conn, rows), point


async def wait_for_email(
    services: Services,
    actor: Actor,
    *,
    mailbox: str | None = None,
    timeout_s: float = 30.0,
    since_id: str | None = None,
) -> dict[str, Any]:
    """Return as soon as inbound mail newer than ``since_id`` (default: now) is visible."""
    actor.require(Scope.READ)
    if not 0 <= timeout_s <= MAX_WAIT_SECONDS:
        raise InvalidInput(
            f"timeout must be between 0 and {MAX_WAIT_SECONDS:g} seconds", field="timeout"
        )

    def start() -> tuple[str | None, str]:
        with services.db.read() as conn:
            mailbox_id = _mailbox_id(conn, actor, mailbox)
            if since_id:
                return mailbox_id, _since_key(conn, actor, since_id, mailbox_id)
        return mailbox_id, _newest_visible(services, actor, mailbox_id, None)[1]

    mailbox_id, after = await asyncio.to_thread(start)
    deadline = time.monotonic() + timeout_s
    arrived = signals(services).arrived
    while True:
        with arrived.listen() as wake:
            found, _ = await asyncio.to_thread(
                _newest_visible, services, actor, mailbox_id, after or "0"
            )
            remaining = deadline - time.monotonic()
            if found or remaining <= 0:
                return {
                    "email": found[0] if found else None,
                    "emails": found,
                    "timed_out": not found,
                    "count": len(found),
                }
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(remaining, _FALLBACK_POLL_S))


# --------------------------------------------------------------------------- spam


def _move(
    conn: Connection, actor: Actor, ref: str, target: Status, action: str, allowed: set[str]
) -> dict[str, Any]:
    actor.require(Scope.READ)
    row = _row(conn, actor, ref, None)
    if row["direction"] != "inbound":
        raise Conflict("only received mail can be marked as spam or not spam", code="not_inbound")
    current = Status(row["status"])
    if current is target:
        return messages.full_view(conn, row)
    if current.value not in allowed or not can_transition(current, target):
        raise Conflict(
            f"a message in status {current.value!r} cannot become {target.value!r}",
            code="invalid_status_transition",
        )
    values: dict[str, Any] = {"status": target.value, "updated_at": utcnow()}
    if current is Status.SPAM:
        # Out of quarantine, it is new to the agent: since_id pollers must see it.
        values["surfaced_id"] = new_id("msg")
    changed = conn.execute(
        update(messages_table)
        .where(messages_table.c.id == row["id"], messages_table.c.status == current.value)
        .values(**values)
    ).rowcount
    if not changed:
        raise Conflict("the message changed meanwhile; try again", code="concurrent_change")
    audit.append(
        conn,
        actor=actor,
        action=action,
        subject_type="message",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        oversight_mode=_mode(conn, row["mailbox_id"]),
        details={"from_status": current.value, "to_status": target.value},
    )
    row.update(values)
    return messages.full_view(conn, row)


def report_spam(conn: Connection, actor: Actor, ref: str) -> dict[str, Any]:
    return _move(
        conn, actor, ref, Status.SPAM, "message.reported_spam", {"unread", "read", "archived"}
    )


def mark_not_spam(conn: Connection, actor: Actor, ref: str) -> dict[str, Any]:
    return _move(conn, actor, ref, Status.UNREAD, "message.not_spam", {"spam"})


# --------------------------------------------------------------------------- usage


def usage(
    conn: Connection, actor: Actor, services: Services, *, period: str = "summary"
) -> dict[str, Any]:
    actor.require(Scope.READ)
    if period not in ("summary", "daily"):
        raise InvalidInput("period must be summary or daily", field="period")
    account = messages_table.c.account_id == actor.account_id
    sent_statuses = ("delivered", "bounced", "sending", "deferred")
    received = and_(account, messages_table.c.direction == "inbound")
    sent = and_(
        account,
        messages_table.c.direction == "outbound",
        messages_table.c.status.in_(sent_statuses),
    )
    count = func.count(messages_table.c.id)
    stored = conn.execute(
        select(func.coalesce(func.sum(messages_table.c.size_bytes), 0)).where(account)
    ).scalar_one()
    attached = conn.execute(
        select(func.coalesce(func.sum(attachments.c.size_bytes), 0))
        .select_from(attachments.join(messages_table))
        .where(account)
    ).scalar_one()
    data: dict[str, Any] = {
        "period": period,
        "sent": conn.execute(select(count).where(sent)).scalar_one(),
        "received": conn.execute(select(count).where(received)).scalar_one(),
        "storage_bytes": int(stored) + int(attached),
        "limits": {
            "max_message_bytes": services.settings.max_message_bytes,
            "max_recipients": services.settings.max_recipients,
            "rate_limit_per_minute": services.settings.rate_limit_per_minute,
        },
    }
    if period == "daily":
        since = utcnow() - timedelta(days=30)
        rows = conn.execute(
            select(
                messages_table.c.direction, messages_table.c.status, messages_table.c.created_at
            ).where(account, messages_table.c.created_at >= since)
        )
        days: dict[str, dict[str, int]] = {}
        for row in rows:
            day = row.created_at.strftime("%Y-%m-%d")
            bucket = days.setdefault(day, {"sent": 0, "received": 0})
            if row.direction == "inbound":
                bucket["received"] += 1
            elif row.status in sent_statuses:
                bucket["sent"] += 1
        data["daily"] = [{"date": d, **v} for d, v in sorted(days.items())]
    return data
