"""The oversight side: the pending queue, decisions, the kill switch, reminders and expiry.

A decision is one guarded UPDATE (``WHERE id = :id AND status = :pending``) in the same
transaction as its audit entry, event and delivery job, so under any number of concurrent
reviewers exactly one decision lands and exactly one audit entry records it. Delivery is
attempted right after the commit ("approve tries delivery at once"); the job written with the
decision makes sure the message goes out even if that attempt does not finish.

A draft past its mailbox's approval expiry is expired, never decided: a decision that arrives
before the sweep does expires it itself (as the sweep would) and answers 409
``approval_expired``. A reviewer's revision is scanned like the send path scans a draft; a
blocking finding refuses the approval (422 ``scan_blocked``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    RowMapping,
    and_,
    case,
    cast,
    extract,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from multimail.domain.linktokens import read_token
from multimail.domain.oversight import (
    DECIDABLE,
    GateTiming,
    Status,
    TransitionError,
    after_approval,
    check_transition,
)
from multimail.domain.scopes import Scope, satisfies
from multimail.errors import Conflict, Forbidden, InvalidInput, MultimailError, NotFound
from multimail.ids import aware, id_cursor, isoformat, new_id, utcnow
from multimail.mail.compose import safe_subject
from multimail.mail.markdown import render_markdown
from multimail.services import audit, events, mailboxes, notify, sending
from multimail.services import messages as message_views
from multimail.services.common import clamp_limit
from multimail.services.context import Actor, Services
from multimail.store import jobs
from multimail.store.tables import accounts, messages, used_link_tokens
from multimail.store.tables import jobs as job_table
from multimail.store.tables import mailboxes as mailbox_table

log = logging.getLogger("multimail.oversight")

APPROVE_DELIVERY_WAIT_S = 3.0
MAX_BATCH = 100
MAX_MARKDOWN_CHARS = 262_144
SWEEP_BATCH = 500
# What notify.draft_digest gives: the reviewer copies it from the queue unchanged.
_DIGEST = re.compile(r"[0-9a-f]{64}")
DRAFT_CHANGED = "the draft changed after you opened it: review it again"

_ACTIONS = {
    "approve": "approve",
    "approved": "approve",
    "approval": "approve",
    "reject": "reject",
    "rejected": "reject",
    "deny": "reject",
}


class LinkAlreadyUsed(Conflict):
    """An approval link was already used; each link decides at most once."""

    code = "link_already_used"


class ApprovalExpired(Conflict):
    """The draft waited past its mailbox's approval expiry: it is expired, never sent."""

    code = "approval_expired"


@dataclass(frozen=True)
class Revision:
    subject: str | None = None
    markdown: str | None = None

    @property
    def empty(self) -> bool:
        return self.subject is None and self.markdown is None


def parse_action(value: str | None) -> str:
    action = _ACTIONS.get((value or "").strip().lower())
    if action is None:
        raise InvalidInput(
            "give 'action' (or 'decision') as 'approve' or 'reject'", code="invalid_decision"
        )
    return action


# --- the pending queue -----------------------------------------------------------------------


def _pending_since(row: Mapping[str, Any]) -> datetime:
    """When the wait started: when it went back to the queue, if it did; else a schedule_first
    message only asks once its send time came."""
    if row.get("pending_since"):
        return aware(row["pending_since"])
    created = aware(row["created_at"])
    if row.get("gate_timing") == GateTiming.SCHEDULE_FIRST.value and row.get("send_at"):
        return max(created, aware(row["send_at"]))
    return created


def _can_see_held_inbound(actor: Actor) -> bool:
    # gated_all: the agent must not read inbound mail before a reviewer releases it.
    return actor.is_operator or satisfies(actor.scopes, Scope.OVERSIGHT)


def _pending_where(
    conn: Connection, actor: Actor, mailbox_ref: str | None = None
) -> list[ColumnElement[bool]]:
    """The messages in ``actor``'s pending queue."""
    statuses = [Status.PENDING_SEND_APPROVAL.value]
    if _can_see_held_inbound(actor):
        statuses.append(Status.PENDING_INBOUND_APPROVAL.value)
    where = [messages.c.account_id == actor.account_id, messages.c.status.in_(statuses)]
    if mailbox_ref:
        where.append(messages.c.mailbox_id == mailboxes.resolve(conn, actor, mailbox_ref)["id"])
    if actor.mailbox_ids is not None:
        where.append(messages.c.mailbox_id.in_(actor.mailbox_ids))
    if actor.test_mode:
        where.append(messages.c.test.is_(True))  # a test key's queue is the sandbox's
    return where


def pending_state(services: Services, actor: Actor) -> dict[str, Any]:
    """What a live view of the queue compares to know it must redraw: the count, the newest
    draft, and the latest change, so a draft an agent edited in place is shown again."""
    actor.require(Scope.READ)
    with services.db.read() as conn:
        where = _pending_where(conn, actor)
        count, newest, changed = conn.execute(
            select(func.count(), func.max(messages.c.id), func.max(messages.c.updated_at)).where(
                *where
            )
        ).one()
    return {
        "count": int(count),
        "newest": newest,
        # Only compared for equality: full precision, whatever type the driver gives back.
        "changed": str(changed) if changed is not None else None,
    }


def list_pending(
    services: Services,
    actor: Actor,
    mailbox_ref: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Messages waiting for a decision, newest first, with thread context and expiry."""
    actor.require(Scope.READ)
    size = clamp_limit(limit)
    cursor = id_cursor(cursor, "msg")
    with services.db.read() as conn:
        where = _pending_where(conn, actor, mailbox_ref)
        total = conn.execute(select(func.count()).select_from(messages).where(*where)).scalar_one()
        query = select(messages).where(*where)
        if cursor:
            query = query.where(messages.c.id < cursor)
        rows: list[Mapping[str, Any]] = [
            dict(r)
            for r in conn.execute(query.order_by(messages.c.id.desc()).limit(size + 1)).mappings()
        ]
        page = rows[:size]
        expiry = {
            r.id: r.approval_expiry_seconds
            for r in conn.execute(
                select(mailbox_table.c.id, mailbox_table.c.approval_expiry_seconds).where(
                    mailbox_table.c.id.in_({r["mailbox_id"] for r in page})
                )
            )
        }
        items = message_views.views(conn, page)
        for item, row in zip(items, page, strict=True):
            item["thread_context"] = notify.thread_context(conn, row)
            # Given back with the decision, it limits an approval to the draft read here.
            item["draft_digest"] = notify.draft_digest(row)
            seconds = expiry.get(row["mailbox_id"])
            item["expires_at"] = (
                isoformat(_pending_since(row) + timedelta(seconds=seconds)) if seconds else None
            )
    return {
        "pending": items,
        "messages": items,
        "pending_count": int(total),
        "next_cursor": page[-1]["id"] if len(rows) > size else None,
    }


# --- decisions -------------------------------------------------------------------------------


def _clean_revision(row: Mapping[str, Any], action: str, revision: Revision) -> Revision:
    if revision.empty:
        return revision
    if action != "approve":
        raise InvalidInput(
            "a revised subject or body goes with 'approve'; a rejection carries a note",
            code="revision_needs_approve",
        )
    if row["direction"] != "outbound":
        raise InvalidInput("only outbound drafts can be revised", code="revision_not_allowed")
    subject = None if revision.subject is None else safe_subject(revision.subject)
    markdown = revision.markdown
    if markdown is not None and len(markdown) > MAX_MARKDOWN_CHARS:
        raise InvalidInput(
            f"the revised body is longer than {MAX_MARKDOWN_CHARS} characters",
            code="body_too_long",
        )
    return Revision(subject=subject, markdown=markdown)


def _expired_error(row: Mapping[str, Any]) -> ApprovalExpired:
    return ApprovalExpired(
        f"message {row['id']} waited longer than its mailbox's approval expiry and has "
        "expired: it will never be sent, and no decision can be recorded on it; the agent "
        "can send it again for a fresh review",
        status=Status.EXPIRED.value,
    )


def _already_decided(row: Mapping[str, Any]) -> Conflict:
    if row["status"] == Status.EXPIRED.value and not row.get("decision"):
        return _expired_error(row)
    if row.get("decision"):
        return Conflict(
            f"message {row['id']} was already decided: {row['decision']} by "
            f"{row.get('reviewer') or 'a reviewer'} at {isoformat(row.get('decided_at'))}; "
            "decisions are final",
            code="already_decided",
            status=row["status"],
            decision={
                "action": row["decision"],
                "reviewer": row.get("reviewer"),
                "decided_at": isoformat(row.get("decided_at")),
            },
        )
    return Conflict(
        f"message {row['id']} is {row['status']}, not waiting for a decision",
        code="not_pending",
        status=row["status"],
    )


def _target_status(row: Mapping[str, Any], action: str, now: datetime) -> Status:
    if action == "reject":
        return Status.REJECTED
    if row["direction"] == "inbound":
        return Status.UNREAD
    send_at = row.get("send_at")
    future = send_at is not None and aware(send_at) > now
    return after_approval(scheduled_in_future=future)


def _expiry_seconds(conn: Connection, mailbox_id: str) -> int:
    return int(
        conn.execute(
            select(mailbox_table.c.approval_expiry_seconds).where(mailbox_table.c.id == mailbox_id)
        ).scalar_one()
    )


def _past_expiry(row: Mapping[str, Any], expiry_seconds: int, now: datetime) -> bool:
    """Held inbound mail never expires; an outbound draft does once it waited ``expiry``."""
    if row["status"] != Status.PENDING_SEND_APPROVAL.value:
        return False
    return now - _pending_since(row) >= timedelta(seconds=expiry_seconds)


def _scan_revision(
    conn: Connection, services: Services, row: Mapping[str, Any], revision: Revision
) -> dict[str, Any]:
    """Scan the draft as the reviewer's edit leaves it, with the send path's own scan.

    Returns the columns the edit writes (body, findings, size); a blocking finding refuses
    the approval with the envelope a scheduled message's content edit gets.
    """
    subject = row["subject"] if revision.subject is None else revision.subject
    markdown = row["markdown"] if revision.markdown is None else revision.markdown
    values: dict[str, Any] = {}
    if revision.subject is not None:
        values["subject"] = subject
    html = row.get("html") or ""
    if revision.markdown is not None:
        rendered = render_markdown(markdown)
        html = rendered.html
        text = message_views.text_column(markdown, rendered.text)
        values.update(markdown=markdown, html=html, text=text)
    recipients = [*(row.get("to") or []), *(row.get("cc") or []), *(row.get("bcc") or [])]
    values.update(
        sending.rescan_stored_draft(
            conn,
            services,
            row["id"],
            row["account_id"],
            recipients=recipients,
            subject=subject,
            markdown=markdown,
            html=html,
            what="the revised message",
        )
    )
    return values


def _decide_locked(
    conn: Connection,
    services: Services,
    actor: Actor,
    row: dict[str, Any],
    *,
    action: str,
    note: str | None,
    reviewer: str,
    revision: Revision,
) -> dict[str, Any]:
    """Record one decision on ``row`` inside the caller's transaction; returns the new row.

    A draft found past its approval expiry is expired instead (status, audit entry and event
    as the sweep writes them) and the row comes back ``expired``: the caller commits that and
    then answers 409 (``_after_commit`` raises ``approval_expired``).
    """
    current = Status(row["status"])
    if current not in DECIDABLE:
        raise _already_decided(row)
    now = utcnow()
    if current is Status.PENDING_SEND_APPROVAL and _past_expiry(
        row, _expiry_seconds(conn, row["mailbox_id"]), now
    ):
        expired = _expire(
            conn, row, now, noticed_by={"decision": action, "reviewer": reviewer[:200]}
        )
        if not expired:  # someone else changed it between our read and our write
            now_row = conn.execute(select(messages).where(messages.c.id == row["id"]))
            raise _already_decided(dict(now_row.mappings().one()))
        return {**row, "status": Status.EXPIRED.value, "updated_at": now}
    revision = _clean_revision(row, action, revision)
    target = _target_status(row, action, now)
    try:
        check_transition(current, target)
    except TransitionError as exc:
        raise Conflict(str(exc), code="invalid_transition") from None
    values: dict[str, Any] = {
        "status": target.value,
        "decision": action,
        "reviewer": reviewer[:200],
        "decision_note": note,
        "decided_at": now,
        "updated_at": now,
    }
    if target is Status.UNREAD:
        # Released held mail is new to the agent now, not at arrival: since_id pollers that
        # saw mail released before it must still get it (services.inbox).
        values["surfaced_id"] = new_id("msg")
    if not revision.empty:
        values["original_subject"] = row["subject"]
        values["original_markdown"] = row["markdown"]
        values.update(_scan_revision(conn, services, row, revision))
    result = conn.execute(
        update(messages)
        .where(messages.c.id == row["id"], messages.c.status == current.value)
        .values(**values)
    )
    if result.rowcount != 1:
        # Someone else decided between our read and our write; theirs stands.
        fresh = conn.execute(select(messages).where(messages.c.id == row["id"])).mappings().one()
        raise _already_decided(dict(fresh))
    new_row = {**row, **values}
    if target is Status.QUEUED:
        jobs.enqueue(conn, "deliver", {"message_id": row["id"]}, dedupe_key=f"deliver:{row['id']}")
    elif target is Status.SCHEDULED:
        # Moves a release job still pending (an earlier approval's, at the old send_at) or
        # adds one: after a schedule edit voided an approval, or a schedule_first release,
        # a job under the plain key has run already and a second would be skipped.
        sending.schedule_release(conn, row["id"], aware(row["send_at"]))
    audit.append(
        conn,
        actor=actor,
        action="message.approved" if action == "approve" else "message.rejected",
        account_id=row["account_id"],
        subject_type="message",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        oversight_mode=row.get("oversight_mode"),
        details={
            "decision": action,
            "reviewer": values["reviewer"],
            "reviewer_key": actor.name if actor.type == "key" else None,
            "note": note,
            "edited": not revision.empty,
            "from_status": current.value,
            "to_status": target.value,
        },
    )
    view = message_views.full_view(conn, new_row)
    event = "oversight.approved" if action == "approve" else "oversight.rejected"
    events.emit(
        conn,
        account_id=row["account_id"],
        event_type=event,
        mailbox_id=row["mailbox_id"],
        message=view,
        extra={"reviewer": values["reviewer"], "note": note},
    )
    if target is Status.UNREAD:
        events.emit(
            conn,
            account_id=row["account_id"],
            event_type="message.received",
            mailbox_id=row["mailbox_id"],
            message=view,
        )
    return new_row


def _attempt_delivery(services: Services, message_id: str) -> str:
    # Imported here: the delivery worker imports the services, not the other way round.
    from multimail.workers.delivery import deliver_now

    return str(deliver_now(services, message_id, timeout=APPROVE_DELIVERY_WAIT_S))


def _respond(row: Mapping[str, Any], status: str) -> dict[str, Any]:
    action = row["decision"]
    if action == "reject":
        result = "rejected"
    else:
        result = "approved_and_sent" if status == Status.DELIVERED.value else "approved"
    return {
        "id": row["id"],
        "message_id": row["id"],
        "email_id": row["id"],
        "status": status,
        "decision": {
            "action": action,
            "decision": action,
            "reviewer": row["reviewer"],
            "note": row["decision_note"],
            "decided_at": isoformat(row["decided_at"]),
            "edited": row.get("original_markdown") is not None
            or row.get("original_subject") is not None,
        },
        "result": result,
    }


def _after_commit(services: Services, row: Mapping[str, Any]) -> dict[str, Any]:
    status = str(row["status"])
    if status == Status.EXPIRED.value:
        # _decide_locked expired the draft instead of deciding it; that is committed now.
        raise _expired_error(row)
    if row["direction"] == "outbound" and status == Status.QUEUED.value:
        try:
            status = _attempt_delivery(services, row["id"])
        except MultimailError as exc:
            # The decision is committed and the deliver job exists: the worker retries.
            log.warning("immediate delivery of %s failed: %s", row["id"], exc)
    return _respond(row, status)


def decide(
    services: Services,
    actor: Actor,
    *,
    email_id: str,
    action: str,
    note: str | None = None,
    reviewer: str | None = None,
    revised_subject: str | None = None,
    revised_markdown: str | None = None,
    draft_digest: str | None = None,
) -> dict[str, Any]:
    """Approve or reject one pending message; final, and the agent can never decide its own.

    With ``draft_digest`` (the queue's, or the dashboard form's, digest of the draft the
    reviewer read) an approval covers that draft only: if the agent edited it since, nothing
    is decided and the answer is 409 ``draft_changed``.
    """
    actor.require(Scope.OVERSIGHT)
    action = parse_action(action)
    if reviewer is not None and len(reviewer) > 200:
        raise InvalidInput("reviewer is at most 200 characters", code="invalid_field")
    _check_digest(draft_digest)
    revision = Revision(subject=revised_subject, markdown=revised_markdown)
    with services.db.write() as conn:
        # A test key finds only test messages to decide (get_row, for_update).
        row = message_views.get_row(conn, actor, email_id, for_update=True)
        if actor.id is not None and actor.id == row.get("created_by_key_id"):
            raise Forbidden(
                "the key that wrote a message can never decide it; a reviewer's key must",
                code="self_approval_forbidden",
            )
        if (
            action == "approve"
            and draft_digest is not None
            and Status(row["status"]) in DECIDABLE
            and not notify.draft_matches(row, draft_digest)
        ):
            # Compared under the row lock: an agent's edit (PATCH …/schedule) that landed
            # while the reviewer read the draft must not ride on this approval.
            raise _draft_changed(row, DRAFT_CHANGED)
        decided = _decide_locked(
            conn,
            services,
            actor,
            row,
            action=action,
            note=note,
            reviewer=(reviewer or "").strip() or actor.label,
            revision=revision,
        )
    return _after_commit(services, decided)


def _check_digest(value: str | None) -> None:
    if value is not None and not _DIGEST.fullmatch(value):
        raise InvalidInput(
            "draft_digest is the 64-character hex value GET /v1/oversight/pending gives for "
            "the message: copy it unchanged, or leave it out",
            code="invalid_draft_digest",
        )


def decide_many(
    services: Services,
    actor: Actor,
    *,
    email_ids: list[str],
    action: str,
    draft_digests: Mapping[str, str] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Each message decided on its own (own transaction): one failure does not undo others.

    A revision is the reviewer's edit of one draft: with more than one message it is refused
    as a whole (nothing decided), never written over every draft of the batch.
    ``draft_digests`` maps a message id to the digest of the draft the reviewer read; a
    message whose draft changed since is refused (``draft_changed``) beside the others.
    """
    actor.require(Scope.OVERSIGHT)
    if not email_ids:
        raise InvalidInput("email_ids is empty", code="invalid_field")
    if len(email_ids) > MAX_BATCH:
        raise InvalidInput(f"at most {MAX_BATCH} messages per batch", code="batch_too_large")
    parse_action(action)
    digests = dict(draft_digests or {})
    stray = sorted(set(digests) - set(email_ids))
    if stray:
        raise InvalidInput(
            f"draft_digests names {', '.join(stray)[:200]}, not in email_ids: give a digest "
            "only for a message you decide; nothing was decided",
            code="invalid_draft_digest",
        )
    for digest in digests.values():
        _check_digest(digest)
    revised = [
        name for name in ("revised_subject", "revised_markdown") if fields.get(name) is not None
    ]
    if revised and len(dict.fromkeys(email_ids)) > 1:
        raise InvalidInput(
            "a revised subject or body is the edit of one draft: approve an edited message "
            "on its own (email_id), not with email_ids; nothing was decided",
            code="revision_needs_one_message",
        )
    results: list[dict[str, Any]] = []
    for email_id in dict.fromkeys(email_ids):
        try:
            outcome = decide(
                services,
                actor,
                email_id=email_id,
                action=action,
                draft_digest=digests.get(email_id),
                **fields,
            )
            results.append({"id": email_id, "ok": True, **outcome})
        except MultimailError as exc:
            results.append(
                {
                    "id": email_id,
                    "ok": False,
                    "status": exc.context.get("status"),
                    "error": exc.message,
                    "code": exc.code,
                }
            )
    return {"results": results}


# --- one-click links -------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkRequest:
    message: dict[str, Any]
    action: str
    nonce: str
    reviewer: str
    thread_context: list[dict[str, Any]]
    # Past its mailbox's approval expiry, though the sweep has not marked it yet: the page
    # offers no button (the POST would expire it and answer 409 approval_expired).
    expired: bool = False
    # The digest of the draft the link showed (None in links minted before they named one).
    digest: str | None = None


def _draft_changed(
    row: Mapping[str, Any] | RowMapping,
    message: str = "the draft changed after this link was sent: approve it from the newest "
    "approval request or in the dashboard",
) -> Conflict:
    return Conflict(message, code="draft_changed", status=row["status"])


def read_approval_link(services: Services, token: str) -> LinkRequest:
    """What an approval link asks, without deciding anything (the GET confirmation page)."""
    link = read_token(
        notify.secret_key(services), token, purpose=notify.APPROVAL_PURPOSE, now=int(time.time())
    )
    action = parse_action(link.action)
    with services.db.read() as conn:
        used = conn.execute(
            select(used_link_tokens.c.nonce).where(used_link_tokens.c.nonce == link.nonce)
        ).first()
        if used is not None:
            raise LinkAlreadyUsed("this link was already used", status="used")
        message_id, digest = notify.link_subject(link.subject_id)
        row = conn.execute(select(messages).where(messages.c.id == message_id)).mappings()
        first = row.first()
        if first is None:
            raise NotFound("the message of this link no longer exists", code="message_not_found")
        found = dict(first)
        if action == "approve" and digest is not None and not notify.draft_matches(found, digest):
            # The approval covers the draft the operator was shown, nothing else.
            raise _draft_changed(found)
        email = notify.oversight_address(conn, found["account_id"]) or "operator"
        return LinkRequest(
            message=message_views.full_view(conn, found),
            action=action,
            nonce=link.nonce,
            reviewer=f"email link ({email})",
            thread_context=notify.thread_context(conn, found),
            digest=digest,
            expired=found["status"] == Status.PENDING_SEND_APPROVAL.value
            and _past_expiry(found, _expiry_seconds(conn, found["mailbox_id"]), utcnow()),
        )


def decide_by_link(services: Services, token: str) -> dict[str, Any]:
    """The POST behind an approval link: decides once; the token's nonce is spent with it."""
    request = read_approval_link(services, token)
    with services.db.write() as conn:
        query = select(messages).where(messages.c.id == request.message["id"])
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).mappings().one()
        if (
            request.action == "approve"
            and request.digest is not None
            and not notify.draft_matches(row, request.digest)
        ):
            # Checked again under the lock: an edit that committed after the read above
            # must not ride on this approval (APP-2).
            raise _draft_changed(row)
        account_id = row["account_id"]
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(used_link_tokens).values(
                        nonce=request.nonce, purpose=notify.APPROVAL_PURPOSE, used_at=utcnow()
                    )
                )
        except IntegrityError:
            raise LinkAlreadyUsed("this link was already used", status="used") from None
        actor = Actor(type="user", id=None, name=request.reviewer, account_id=account_id)
        decided = _decide_locked(
            conn,
            services,
            actor,
            dict(row),
            action=request.action,
            note="decided from the email link",
            reviewer=request.reviewer,
            revision=Revision(),
        )
    return _after_commit(services, decided)


# --- the kill switch -------------------------------------------------------------------------


def _require_admin_or_oversight(actor: Actor) -> None:
    if actor.type == "key" and not (
        satisfies(actor.scopes, Scope.ADMIN) or satisfies(actor.scopes, Scope.OVERSIGHT)
    ):
        raise Forbidden(
            "pausing and resuming needs a key with the 'admin' or 'oversight' scope",
            code="insufficient_scope",
            required_scope="admin|oversight",
        )


def _set_paused(
    services: Services, actor: Actor, mailbox_ref: str | None, paused: bool
) -> dict[str, Any]:
    _require_admin_or_oversight(actor)
    if actor.test_mode and not paused:
        # Pausing only holds mail back; lifting a pause lets live mail out to SMTP, which a
        # test key never does (SPEC §1).
        raise Forbidden(
            "a test key (mm_test_) cannot resume sending: that releases live mail; "
            "use a live key or the dashboard",
            code="test_key_cannot_release",
        )
    account_id = actor.account_id
    action = "paused" if paused else "resumed"
    released = 0
    with services.db.write() as conn:
        if mailbox_ref:
            box = mailboxes.resolve(conn, actor, mailbox_ref, for_update=True)
            conn.execute(
                update(mailbox_table)
                .where(mailbox_table.c.id == box["id"])
                .values(paused=paused, updated_at=utcnow())
            )
            scope: dict[str, Any] = {"mailbox_id": box["id"], "address": box["address"]}
            subject_type, subject_id, mode = "mailbox", box["id"], box["oversight_mode"]
        else:
            if actor.mailbox_ids is not None:
                raise Forbidden(
                    "a key restricted to some mailboxes can pause only those: give mailbox_id",
                    code="mailbox_restricted_key",
                )
            conn.execute(
                update(accounts)
                .where(accounts.c.id == account_id)
                .values(paused=paused, updated_at=utcnow())
            )
            scope = {"account_id": account_id}
            subject_type, subject_id, mode = "account", account_id, None
        if not paused:
            released = _release_queued(conn, str(account_id), scope.get("mailbox_id"))
        audit.append(
            conn,
            actor=actor,
            action=f"{subject_type}.{action}",
            subject_type=subject_type,
            subject_id=subject_id,
            mailbox_id=scope.get("mailbox_id"),
            oversight_mode=mode,
            details={"paused": paused, "released": released},
        )
    return {**scope, "paused": paused, "released": released}


def _release_queued(conn: Connection, account_id: str, mailbox_id: str | None) -> int:
    """Give every queued message that may now go a deliver job (the worker left them queued)."""
    account_paused = conn.execute(
        select(accounts.c.paused).where(accounts.c.id == account_id)
    ).scalar_one()
    if account_paused:
        return 0
    query = (
        select(messages.c.id)
        .join(mailbox_table, mailbox_table.c.id == messages.c.mailbox_id)
        .where(
            messages.c.account_id == account_id,
            messages.c.status == Status.QUEUED.value,
            mailbox_table.c.paused.is_(False),
        )
    )
    if mailbox_id:
        query = query.where(messages.c.mailbox_id == mailbox_id)
    ids = [r.id for r in conn.execute(query)]
    # Resume is a rare operator action: reading the open deliver jobs is cheap enough.
    open_jobs = conn.execute(
        select(job_table.c.payload).where(
            job_table.c.kind == "deliver", job_table.c.status.in_(["pending", "running"])
        )
    )
    waiting = {str(r.payload.get("message_id")) for r in open_jobs if isinstance(r.payload, dict)}
    released = 0
    for message_id in ids:
        if message_id in waiting:
            continue
        # The first deliver job is spent (the worker completed it while paused); delivery
        # itself is guarded, so an extra job can never send twice.
        jobs.enqueue(conn, "deliver", {"message_id": message_id})
        released += 1
    return released


def pause(services: Services, actor: Actor, mailbox_ref: str | None = None) -> dict[str, Any]:
    """Kill switch: nothing of the account (or mailbox) is handed to SMTP until resumed."""
    return _set_paused(services, actor, mailbox_ref, True)


def resume(services: Services, actor: Actor, mailbox_ref: str | None = None) -> dict[str, Any]:
    """Lift the kill switch and release the messages that waited in ``queued``."""
    return _set_paused(services, actor, mailbox_ref, False)


# --- reminders and expiry --------------------------------------------------------------------

SWEEPER = Actor(type="system", id=None, name="approval sweeper", account_id=None)


def _expire(
    conn: Connection,
    row: dict[str, Any],
    now: datetime,
    *,
    noticed_by: dict[str, Any] | None = None,
) -> bool:
    """Expire a pending draft (status, audit entry, the agent's event); ``noticed_by`` says
    which decision found it past its expiry before the sweep did."""
    result = conn.execute(
        update(messages)
        .where(messages.c.id == row["id"], messages.c.status == Status.PENDING_SEND_APPROVAL.value)
        .values(status=Status.EXPIRED.value, updated_at=now, last_error="approval expired")
    )
    if result.rowcount != 1:
        return False
    new_row = {**row, "status": Status.EXPIRED.value, "updated_at": now}
    audit.append(
        conn,
        actor=SWEEPER,
        action="message.expired",
        account_id=row["account_id"],
        subject_type="message",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        oversight_mode=row.get("oversight_mode"),
        details={
            "pending_since": isoformat(_pending_since(row)),
            "reason": "expired",
            **({"noticed_by": noticed_by} if noticed_by else {}),
        },
    )
    events.emit(
        conn,
        account_id=row["account_id"],
        event_type="oversight.rejected",
        mailbox_id=row["mailbox_id"],
        message=message_views.full_view(conn, new_row),
        extra={"reason": "expired"},
    )
    return True


def _remind(conn: Connection, services: Services, row: dict[str, Any], now: datetime) -> bool:
    result = conn.execute(
        update(messages)
        .where(
            messages.c.id == row["id"],
            messages.c.status == row["status"],
            messages.c.reminded_at.is_(None),
        )
        .values(reminded_at=now)
    )
    if result.rowcount != 1:
        return False
    notify.notify_reminder(conn, services, row)
    audit.append(
        conn,
        actor=SWEEPER,
        action="message.reminder_sent",
        account_id=row["account_id"],
        subject_type="message",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        oversight_mode=row.get("oversight_mode"),
        details={"pending_since": isoformat(_pending_since(row))},
    )
    return True


def _epoch_seconds(conn: Connection, value: ColumnElement[Any]) -> ColumnElement[Any]:
    """A timestamp column as epoch seconds (SQLite: whole seconds, rounded down)."""
    if conn.dialect.name == "postgresql":
        return extract("epoch", value)
    return cast(func.strftime("%s", value), Integer)


def _due_query(conn: Connection, now: datetime, after: str) -> Any:
    """The next batch of decidable messages owed a reminder or an expiry, oldest id first.

    Only due rows are read (the loop re-checks each in Python), so however many drafts wait
    that are not due yet, they never crowd a due one out of the batch.
    """
    since = func.coalesce(
        messages.c.pending_since,
        case(
            (
                and_(
                    messages.c.gate_timing == GateTiming.SCHEDULE_FIRST.value,
                    messages.c.send_at.is_not(None),
                    messages.c.send_at > messages.c.created_at,
                ),
                messages.c.send_at,
            ),
            else_=messages.c.created_at,
        ),
    )
    waited = now.timestamp() - _epoch_seconds(conn, since)
    return (
        select(
            messages,
            mailbox_table.c.approval_timeout_seconds,
            mailbox_table.c.approval_expiry_seconds,
        )
        .join(mailbox_table, mailbox_table.c.id == messages.c.mailbox_id)
        .where(
            messages.c.status.in_([s.value for s in DECIDABLE]),
            messages.c.id > after,
            or_(
                and_(
                    messages.c.status == Status.PENDING_SEND_APPROVAL.value,
                    waited >= mailbox_table.c.approval_expiry_seconds,
                ),
                and_(
                    messages.c.reminded_at.is_(None),
                    waited >= mailbox_table.c.approval_timeout_seconds,
                ),
            ),
        )
        .order_by(messages.c.id)
        .limit(SWEEP_BATCH)
    )


def sweep_pending(services: Services, now: datetime | None = None) -> dict[str, int]:
    """One reminder after the mailbox's approval timeout; ``expired`` after its expiry.

    Held inbound mail is reminded about but never expires: releasing it unreviewed would
    loosen the gate and dropping it would lose mail. Due messages are read in batches of
    ``SWEEP_BATCH`` (ids ascending, each batch after the last) until none is left.
    """
    now = now or utcnow()
    counts = {"reminded": 0, "expired": 0}
    after = ""
    while True:
        with services.db.read() as conn:
            rows = conn.execute(_due_query(conn, now, after)).mappings().all()
        for found in rows:
            row = dict(found)
            timeout = timedelta(seconds=row.pop("approval_timeout_seconds"))
            expiry = timedelta(seconds=row.pop("approval_expiry_seconds"))
            age = now - _pending_since(row)
            outbound = row["status"] == Status.PENDING_SEND_APPROVAL.value
            with services.db.write() as conn:
                if outbound and age >= expiry:
                    counts["expired"] += _expire(conn, row, now)
                elif age >= timeout and row.get("reminded_at") is None:
                    counts["reminded"] += _remind(conn, services, row, now)
        if len(rows) < SWEEP_BATCH:
            return counts
        after = str(rows[-1]["id"])
