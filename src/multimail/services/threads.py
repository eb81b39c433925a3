"""Threads: stitched by Message-ID / In-Reply-To / References, or by a caller's ``thread_id``.

The thread id callers see is their own (``zd-4711``) when they chose one, else ours
(``thr_…``); either is accepted wherever a thread is named.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, or_, select, update

from multimail.errors import InvalidInput, NotFound
from multimail.ids import new_id, utcnow
from multimail.services.context import Actor
from multimail.store import fast
from multimail.store.tables import messages, threads

_PREFIX = re.compile(r"^\s*((re|fw|fwd|aw|sv|wg)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
# Matched whole (fullmatch): "$" would also accept a final newline.
_EXTERNAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,199}")


def normalize_subject(subject: str | None) -> str:
    """``Re: Fwd: Hello`` → ``hello``: the subject-fallback key."""
    return " ".join(_PREFIX.sub("", subject or "").split()).lower()[:300]


def public_thread_id(row: Any) -> str:
    return str(row["external_id"] or row["id"])


# Built once: constructing an INSERT/UPDATE with values per call costs more than running it.
_INSERT = fast.Compiled(threads.insert())
_TOUCH = (
    update(threads)
    .where(threads.c.id == bindparam("thread_id"))
    .values(message_count=threads.c.message_count + 1, last_activity_at=bindparam("touched_at"))
)


def _create(
    conn: Connection,
    *,
    account_id: str,
    mailbox_id: str,
    subject: str | None,
    external_id: str | None = None,
    message_count: int = 0,
    at: datetime | None = None,
) -> dict[str, Any]:
    now = at or utcnow()
    record = {
        "id": new_id("thr"),
        "account_id": account_id,
        "mailbox_id": mailbox_id,
        "external_id": external_id,
        "subject": subject,
        "normalized_subject": normalize_subject(subject),
        "message_count": message_count,
        "created_at": now,
        "last_activity_at": now,
    }
    _INSERT.execute(conn, record)
    return record


def _existing_for_outbound(
    conn: Connection,
    *,
    mailbox_id: str,
    external_id: str | None,
    replying_to: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """The thread an outbound message joins when it exists; None when a new one is needed."""
    if external_id is not None:
        if not _EXTERNAL_ID.fullmatch(external_id):
            raise InvalidInput(
                "thread_id may hold letters, digits and . _ : @ / + - (at most 200 characters)",
                code="invalid_thread_id",
            )
        if external_id.startswith("thr_"):
            row = (
                conn.execute(
                    select(threads).where(
                        threads.c.id == external_id, threads.c.mailbox_id == mailbox_id
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                raise NotFound(
                    f"thread {external_id!r} not found in this mailbox", code="thread_not_found"
                )
            return dict(row)
        row = (
            conn.execute(
                select(threads).where(
                    threads.c.mailbox_id == mailbox_id, threads.c.external_id == external_id
                )
            )
            .mappings()
            .first()
        )
        if row is not None:
            return dict(row)
        if replying_to is None:
            return None
    if replying_to is not None and replying_to.get("thread_id"):
        row = (
            conn.execute(select(threads).where(threads.c.id == replying_to["thread_id"]))
            .mappings()
            .first()
        )
        if row is not None:
            if external_id and not row["external_id"]:
                conn.execute(
                    update(threads).where(threads.c.id == row["id"]).values(external_id=external_id)
                )
                return {**row, "external_id": external_id}
            return dict(row)
    return None


def for_outbound(
    conn: Connection,
    *,
    account_id: str,
    mailbox_id: str,
    subject: str | None,
    external_id: str | None = None,
    replying_to: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The thread an outbound message joins: the caller's, the one it replies in, or a new one."""
    found = _existing_for_outbound(
        conn, mailbox_id=mailbox_id, external_id=external_id, replying_to=replying_to
    )
    if found is not None:
        return found
    return _create(
        conn, account_id=account_id, mailbox_id=mailbox_id, subject=subject, external_id=external_id
    )


def join_outbound(
    conn: Connection,
    *,
    account_id: str,
    mailbox_id: str,
    subject: str | None,
    at: datetime,
    external_id: str | None = None,
    replying_to: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`for_outbound` with the joining message counted (as :func:`touch` would).

    Returns the thread as it was before the message joined it. A new thread is inserted
    already counting its first message: one statement, not an insert and then a touch.
    """
    found = _existing_for_outbound(
        conn, mailbox_id=mailbox_id, external_id=external_id, replying_to=replying_to
    )
    if found is not None:
        touch(conn, found["id"], at)
        return found
    created = _create(
        conn,
        account_id=account_id,
        mailbox_id=mailbox_id,
        subject=subject,
        external_id=external_id,
        message_count=1,
        at=at,
    )
    return created | {"message_count": 0}


def for_inbound(
    conn: Connection,
    *,
    account_id: str,
    mailbox_id: str,
    subject: str | None,
    in_reply_to: str | None,
    references: Sequence[str],
    sender: str | None = None,
) -> dict[str, Any]:
    """Join the thread of any message this one refers to; without those headers, the latest
    thread of the same subject that ``sender`` already took part in (never a stranger's)."""
    wanted = [r for r in [in_reply_to, *references] if r]
    if wanted:
        row = conn.execute(
            select(messages.c.thread_id)
            .where(
                messages.c.mailbox_id == mailbox_id,
                messages.c.message_id_header.in_(wanted),
                messages.c.thread_id.is_not(None),
            )
            .order_by(messages.c.id.desc())
            .limit(1)
        ).first()
        if row is not None:
            thread = conn.execute(select(threads).where(threads.c.id == row.thread_id)).mappings()
            found = thread.first()
            if found is not None:
                return dict(found)
    else:
        same = _same_subject_with(conn, mailbox_id, normalize_subject(subject), sender)
        if same is not None:
            return same
    return _create(conn, account_id=account_id, mailbox_id=mailbox_id, subject=subject)


# Threads of one subject looked at for a sender, newest first: two customers writing
# "Pricing question" are two conversations, and an old thread is a new one's start anyway.
_SUBJECT_CANDIDATES = 5
_PARTICIPANTS_READ = 500


def _same_subject_with(
    conn: Connection, mailbox_id: str, key: str, sender: str | None
) -> dict[str, Any] | None:
    if not key or not sender:
        return None
    candidates = [
        dict(r)
        for r in conn.execute(
            select(threads)
            .where(threads.c.mailbox_id == mailbox_id, threads.c.normalized_subject == key)
            .order_by(threads.c.last_activity_at.desc())
            .limit(_SUBJECT_CANDIDATES)
        ).mappings()
    ]
    if not candidates:
        return None
    wanted = sender.lower()
    taking_part: set[str] = set()
    for row in conn.execute(
        select(messages.c.thread_id, messages.c.from_address, messages.c.to, messages.c.cc)
        .where(messages.c.thread_id.in_([t["id"] for t in candidates]))
        .order_by(messages.c.id.desc())
        .limit(_PARTICIPANTS_READ)
    ):
        named = [row.from_address, *(row.to or []), *(row.cc or [])]
        if any(isinstance(a, str) and a.lower() == wanted for a in named):
            taking_part.add(row.thread_id)
    return next((t for t in candidates if t["id"] in taking_part), None)


def touch(conn: Connection, thread_id: str, at: datetime | None = None) -> None:
    conn.execute(_TOUCH, {"thread_id": thread_id, "touched_at": at or utcnow()})


def resolve(
    conn: Connection, actor: Actor, ref: str, mailbox_id: str | None = None
) -> dict[str, Any]:
    """A thread of the caller's account by our id or the caller's id."""
    query = select(threads).where(
        threads.c.account_id == actor.account_id,
        or_(threads.c.id == ref, threads.c.external_id == ref),
    )
    if mailbox_id:
        query = query.where(threads.c.mailbox_id == mailbox_id)
    if actor.mailbox_ids is not None:
        query = query.where(threads.c.mailbox_id.in_(actor.mailbox_ids))
    found = (
        conn.execute(query.order_by(threads.c.last_activity_at.desc()).limit(1)).mappings().first()
    )
    if found is None:
        raise NotFound(f"thread {ref!r} not found", code="thread_not_found")
    return dict(found)
