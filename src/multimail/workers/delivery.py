"""Delivery: from a queued message to bytes accepted by an SMTP server, durably.

One delivery runs in three steps, so the SMTP conversation never holds a transaction open:

1. *Start* (one write transaction): the guarded move ``queued``/``deferred`` → ``sending``.
   Here the gate's invariant is asserted once more (a gated message needs an approve
   decision or a fully allowlisted recipient list), the kill switch is honoured (a paused
   account or mailbox leaves the message queued), suppressed recipients are dropped right
   before the hand-over (API-5), and the final signed bytes are stored in ``messages.raw``,
   so every retry sends the same bytes with the same Message-ID (DUR-3).
2. *Hand over* through the relay or MX transport, outside any transaction.
3. *Finish* (one write transaction): one ``delivery_attempts`` row per SMTP session, then
   ``delivered`` / ``deferred`` (backoff, up to three days) / ``bounced`` (hard bounce,
   recipients suppressed) / ``send_failed``, with audit entries and events.

Deliveries go in batches (group commit, since each commit is an fsync): the runner's
pipelines claim up to ``batch_size`` due jobs and *start* all their messages in one commit,
hand them over concurrently, and *finish* them all, job completions included, in one more.
Each message gets its own savepoint, so one that fails is settled alone. ``deliver_now`` is a
batch of one: two commits between an approval and the relay.

The only duplicate window is a worker dying between the relay's final 250 and step 3; the
next worker then re-sends the stored bytes, Message-ID included, so receivers can drop it.
A message in ``sending`` is taken over only when no live job still holds it.

``MULTIMAIL_TEST_CRASH_POINT`` is a test hook: when set to ``before_connect``,
``after_smtp_250`` or ``after_commit`` the worker announces the point on stderr and freezes
there so a test can SIGKILL it. Unset (production) it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from sqlalchemy import (
    JSON,
    Connection,
    Select,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from multimail.config import Settings
from multimail.domain.addresses import AddressError, matches_pattern, normalize_address
from multimail.domain.linktokens import make_token, new_nonce
from multimail.domain.oversight import (
    DELIVERABLE,
    OversightMode,
    Status,
    check_transition,
    outbound_is_gated,
)
from multimail.domain.scopes import Scope
from multimail.errors import (
    InvalidInput,
    MultimailError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from multimail.ids import aware, isoformat, new_id, utcnow
from multimail.mail.compose import (
    OutboundAttachment,
    OutboundDraft,
    build_message,
    compose_html,
    compose_message,
    draft_hashes,
)
from multimail.services import audit, directory, events, identity, notify
from multimail.services import messages as message_views
from multimail.services.context import Actor, Services
from multimail.smtp.outbound import (
    DeliveryAttempt,
    MXTransport,
    OutboundTransport,
    RecipientResult,
    RelayTransport,
    make_resolver,
    parse_relay_url,
    recipient_outcomes,
)
from multimail.store import jobs
from multimail.store.jobs import DEFAULT_LEASE, Job
from multimail.store.tables import (
    accounts,
    attachments,
    delivery_attempts,
    mailbox_allowlist,
    mailboxes,
    messages,
    webhook_deliveries,
)
from multimail.store.tables import events as events_table
from multimail.store.tables import jobs as jobs_table
from multimail.workers import composer, runner, signing

__all__ = [
    "CRASH_POINT_ENV",
    "DELIVER",
    "MAX_RETRY_WINDOW",
    "RETRY_SCHEDULE",
    "SYSTEM_MAIL",
    "deliver",
    "deliver_now",
    "enqueue_delivery",
    "job_key",
    "list_captured",
    "next_attempt_at",
    "outbound_transport",
    "retry_delay",
    "unsubscribe_url",
]

DELIVER = "deliver"
SYSTEM_MAIL = "system_mail"
SWEEP = "delivery_sweep"
CRASH_POINT_ENV = "MULTIMAIL_TEST_CRASH_POINT"

#: Waits after the 1st, 2nd, ... failed attempt; the last one repeats (SPEC §2, DUR-5).
RETRY_SCHEDULE: tuple[timedelta, ...] = tuple(
    timedelta(minutes=m) for m in (1, 5, 15, 60, 120, 240, 480)
)
#: Temporary failures are retried for this long after the first attempt, then send_failed.
MAX_RETRY_WINDOW = timedelta(days=3)
_JITTER = 0.1
UNSUBSCRIBE_LIFETIME = timedelta(days=365)
SYSTEM_SENDER_LOCAL = "multimail"
# A queued message with no live job for this long is given one again by the sweep.
_SWEEP_AFTER = timedelta(minutes=2)
_SWEEP_BATCH = 500
_POLL_S = 0.02
# SMTP sessions one batch keeps open at once.
_MAX_SESSIONS = 16
# How long a runner's batch waits for its SMTP conversations before it records those that
# ended and lets the others (stragglers: a tarpit, a receiver that scans for minutes before
# its 250; RFC 5321 §4.5.3.2 allows 10 minutes for the final dot) go on in the background.
_STRAGGLER_DEADLINE = 30.0
# Stragglers one worker keeps in flight; a batch that would pass this waits for them all.
_MAX_STRAGGLERS = 64

_log = logging.getLogger(__name__)

# Built once: constructing and compiling a statement costs more than SQLite running it.
_INSERT_ATTEMPT = insert(delivery_attempts)
_ROWS = select(messages).where(messages.c.id.in_(bindparam("ids", expanding=True)))
# What starting a batch decides on (_start_many): not the body, nor the inbound columns.
_START_ROWS = select(
    *(
        messages.c[name]
        for name in (
            "id",
            "account_id",
            "mailbox_id",
            "direction",
            "status",
            "test",
            "message_id_header",
            "from_address",
            "to",
            "cc",
            "bcc",
            "oversight_mode",
            "decision",
            "raw",
        )
    )
).where(messages.c.id.in_(bindparam("ids", expanding=True)))
_START_ROWS_LOCKED = _START_ROWS.order_by(messages.c.id).with_for_update()
_MAILBOXES = select(mailboxes).where(mailboxes.c.id.in_(bindparam("ids", expanding=True)))
_ACCOUNTS = select(accounts).where(accounts.c.id.in_(bindparam("ids", expanding=True)))
_ATTACHMENTS = (
    select(
        attachments.c.message_id,
        attachments.c.filename,
        attachments.c.content_type,
        attachments.c.data,
    )
    .where(attachments.c.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(attachments.c.id)
)
# The message as recording an outcome decides on it, and as events and the monitored copy
# show it: everything but the stored bytes; locked (PostgreSQL) in id order.
_VIEW_ROWS = select(*(c for c in messages.c if c.name != "raw")).where(
    messages.c.id.in_(bindparam("ids", expanding=True))
)
_VIEW_ROWS_LOCKED = _VIEW_ROWS.order_by(messages.c.id).with_for_update()
_PREVIOUS_MANY = (
    select(delivery_attempts.c.message_id, delivery_attempts.c.recipients)
    .where(delivery_attempts.c.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(delivery_attempts.c.id)
)
_MARK_DELIVERED = (
    update(messages)
    .where(messages.c.id == bindparam("m_id"), messages.c.status == Status.SENDING.value)
    .values(
        status=Status.DELIVERED.value,
        attempts=bindparam("m_attempts"),
        delivered_at=bindparam("m_now"),
        next_attempt_at=None,
        last_error=None,
        updated_at=bindparam("m_now"),
    )
)
_PLAIN_START = frozenset({Status.QUEUED.value, Status.DEFERRED.value})
_MARK_SENDING = (
    update(messages)
    .where(messages.c.id == bindparam("m_id"), messages.c.status == bindparam("m_status"))
    .values(
        status=Status.SENDING.value,
        raw=bindparam("m_raw"),
        size_bytes=bindparam("m_size"),
        message_id_header=func.coalesce(messages.c.message_id_header, bindparam("m_header")),
        updated_at=bindparam("m_now"),
    )
)
# Events whose payload is already JSON text (see _emit_many): SQLite keeps JSON as text;
# PostgreSQL's json type takes the text as it is, through an explicit cast.
_PAYLOAD_TEXT = bindparam("payload_json", type_=Text)
_INSERT_EVENT_TEXT = {
    "sqlite": insert(events_table).values(payload=_PAYLOAD_TEXT),
    "postgresql": insert(events_table).values(payload=cast(_PAYLOAD_TEXT, JSON)),
}
_INSERT_WEBHOOK_DELIVERY = insert(webhook_deliveries)
# What jobs.complete does, for many jobs in one executemany.
_COMPLETE_JOB = (
    update(jobs_table)
    .where(jobs_table.c.id == bindparam("j_id"), jobs_table.c.locked_by == bindparam("j_worker"))
    .values(status="done", locked_by=None, locked_until=None, updated_at=bindparam("j_now"))
)


# -- schedule ------------------------------------------------------------------------------


def retry_delay(failures: int, *, jitter: float = _JITTER) -> timedelta:
    """The wait after ``failures`` failed attempts (1-based), ±``jitter`` so retries spread."""
    base = RETRY_SCHEDULE[min(max(failures, 1), len(RETRY_SCHEDULE)) - 1]
    return base * random.uniform(1 - jitter, 1 + jitter)


def next_attempt_at(first_attempt: datetime, now: datetime, failures: int) -> datetime | None:
    """When to try again, or None once the retry window since ``first_attempt`` is spent.

    The last retry is pulled in to the window's end, so the final verdict comes on time.
    """
    deadline = first_attempt + MAX_RETRY_WINDOW
    if now >= deadline:
        return None
    return min(now + retry_delay(failures), deadline)


def job_key(message_id: str) -> str:
    return f"deliver:{message_id}"


# -- small helpers -------------------------------------------------------------------------


def _crash_point(name: str) -> None:
    # Test hook (see module docstring): freeze so the test can SIGKILL us right here.
    if os.environ.get(CRASH_POINT_ENV) == name:
        sys.stderr.write(f"CRASH_POINT {name}\n")
        sys.stderr.flush()
        time.sleep(3600)


def _actor(worker_id: str, account_id: str | None) -> Actor:
    return Actor(type="system", id=worker_id, name="delivery", account_id=account_id)


def _addresses(values: Any) -> list[str]:
    out: list[str] = []
    for value in values or []:
        raw = value.get("address") or value.get("email") if isinstance(value, dict) else value
        if not isinstance(raw, str):
            continue
        try:
            out.append(normalize_address(raw))
        except AddressError:
            out.append(raw.strip())
    return out


def _recipients(row: Mapping[str, Any]) -> list[str]:
    every = [*_addresses(row["to"]), *_addresses(row["cc"]), *_addresses(row["bcc"])]
    return list(dict.fromkeys(every))


def unsubscribe_url(settings: Settings, secret: bytes, account_id: str, address: str) -> str:
    """The https half of List-Unsubscribe: a signed ``unsubscribe`` token for one address.

    Same token format as ``services.notify.unsubscribe_url``: purpose ``unsubscribe``,
    subject ``"<account_id>|<address>"``, action ``unsubscribe``, random nonce, 365 days.
    """
    token = make_token(
        secret,
        purpose="unsubscribe",
        subject_id=f"{account_id}|{normalize_address(address)}",
        action="unsubscribe",
        expires_at=int(time.time() + UNSUBSCRIBE_LIFETIME.total_seconds()),
        nonce=new_nonce(),
    )
    return f"{settings.base_url}/v1/unsubscribe/{token}"


def _unsubscribe_headers(
    services: Services, row: Mapping[str, Any], mailbox_address: str, recipients: list[str]
) -> list[tuple[str, str]]:
    """``List-Unsubscribe`` (RFC 2369) and, for one recipient, one-click (RFC 8058).

    The mailto: URI is the sending mailbox: our inbound server takes mail for it, and an
    "unsubscribe" message suppresses its sender in the account (SPEC §4), so it works from
    any mail client and names whoever sends it. The https URI must identify the recipient
    (RFC 8058 §3.1), and every recipient gets the same bytes: with several, a token for one
    would let another's click unsubscribe them, so it is offered only to a lone recipient.
    """
    # RFC 6068: what an addr-spec may hold beyond these is percent-encoded in a mailto: URI.
    address = quote(mailbox_address, safe="@+-._~!$'*=")
    mailto = f"<mailto:{address}?subject=unsubscribe>"
    if len(recipients) != 1:
        return [("List-Unsubscribe", mailto)]
    web = unsubscribe_url(services.settings, _secret(services), row["account_id"], recipients[0])
    return [
        ("List-Unsubscribe", f"{mailto}, <{web}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]


def outbound_transport(services: Services) -> OutboundTransport:
    """The relay when ``MULTIMAIL_SMTP_URL`` is set, else direct MX delivery (cached)."""
    cached = services.extras.get("outbound_transport")
    if cached is not None:
        return cached  # type: ignore[return-value]
    settings = services.settings
    transport: OutboundTransport
    if settings.smtp_url is not None:
        config = parse_relay_url(settings.smtp_url.get_secret_value())
        transport = RelayTransport(config, local_hostname=settings.domain)
    else:
        transport = MXTransport(
            make_resolver(settings.dns_resolver),
            mx_port=settings.mx_port,
            local_hostname=settings.domain,
        )
    services.extras["outbound_transport"] = transport
    return transport


async def _close_sessions(services: Services) -> None:
    """QUIT the SMTP sessions the transport keeps open for the running event loop."""
    close = getattr(services.extras.get("outbound_transport"), "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def _secret(services: Services) -> bytes:
    secret = services.extras.get("secret_key")
    if not isinstance(secret, bytes):
        raise RuntimeError("services.extras['secret_key'] must hold the link-signing secret")
    return secret


# -- composing ------------------------------------------------------------------------------


@dataclass
class _Context:
    row: dict[str, Any]
    mailbox: dict[str, Any]
    account: dict[str, Any]


def _load(conn: Connection, message_id: str, *, lock: bool = False) -> _Context | None:
    query = select(messages).where(messages.c.id == message_id)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    if row is None:
        return None
    mailbox = conn.execute(select(mailboxes).where(mailboxes.c.id == row["mailbox_id"])).mappings()
    account = conn.execute(select(accounts).where(accounts.c.id == row["account_id"])).mappings()
    return _Context(dict(row), dict(mailbox.one()), dict(account.one()))


def _load_many(
    conn: Connection, message_ids: Sequence[str], *, lock: bool = False
) -> dict[str, _Context]:
    """:func:`_load` for many messages: three queries however many there are. ``lock``:
    only the columns a start decides on (see ``_START_ROWS``), locked on PostgreSQL."""
    if not message_ids:
        return {}
    rows = (
        _rows_by_id(conn, message_ids)
        if lock
        else {r["id"]: dict(r) for r in conn.execute(_ROWS, {"ids": list(message_ids)}).mappings()}
    )
    box_ids = sorted({r["mailbox_id"] for r in rows.values()})
    account_ids = sorted({r["account_id"] for r in rows.values()})
    boxes = {b["id"]: dict(b) for b in conn.execute(_MAILBOXES, {"ids": box_ids}).mappings()}
    owners = {a["id"]: dict(a) for a in conn.execute(_ACCOUNTS, {"ids": account_ids}).mappings()}
    return {
        message_id: _Context(row, boxes[row["mailbox_id"]], owners[row["account_id"]])
        for message_id, row in rows.items()
    }


def _attachments_many(
    conn: Connection, message_ids: Sequence[str]
) -> dict[str, list[OutboundAttachment]]:
    found: dict[str, list[OutboundAttachment]] = {m: [] for m in message_ids}
    for f in conn.execute(_ATTACHMENTS, {"ids": list(message_ids)}):
        found[f.message_id].append(OutboundAttachment(f.filename, f.content_type, f.data))
    return found


def _message_id_header(ctx: _Context, settings: Settings) -> str:
    return ctx.row["message_id_header"] or f"<{ctx.row['id']}@{settings.domain}>"


def _compose(
    conn: Connection,
    services: Services,
    ctx: _Context,
    files: Sequence[OutboundAttachment] | None = None,
) -> bytes:
    """The final, DKIM-signed bytes of the message (raises on anything unsendable).

    ``files`` are its attachments when the caller read them already (in file order).
    """
    row, mailbox, account = ctx.row, ctx.mailbox, ctx.account
    settings = services.settings
    sender = row["from_address"] or mailbox["address"]
    to = _addresses(row["to"])
    recipients = _recipients(row)
    headers: list[tuple[str, str]] = []
    if row.get("created_by_key_id"):
        name = row.get("created_by_key_name") or "agent"
        headers.append(("X-MultiMail-Agent", f"{name} ({row['created_by_key_id']})"))
    if mailbox["ai_disclosure"]:
        headers.append(("X-AI-Generated", "true"))
    headers.extend(_unsubscribe_headers(services, row, mailbox["address"], recipients))
    if files is None:
        files = _attachments_many(conn, [row["id"]])[row["id"]]
    draft = OutboundDraft(
        from_address=sender,
        from_name=row.get("from_name") or mailbox.get("display_name"),
        to=to,
        cc=_addresses(row["cc"]),
        reply_to=_addresses(row.get("reply_to")),
        subject=row["subject"] or "",
        markdown=row["markdown"] or "",
        message_id=_message_id_header(ctx, settings),
        date=utcnow(),
        in_reply_to=row.get("in_reply_to"),
        references=list(row.get("references") or []),
        signature=mailbox.get("signature"),
        ai_disclosure=bool(mailbox["ai_disclosure"]),
        operator_postal_address=account.get("postal_address"),
        extra_headers=headers,
        attachments=list(files),
        # The sending service stored render_markdown(markdown).html with the message (and
        # renders again on every edit of the body): no second rendering per delivery.
        body_html=row.get("html"),
    )
    # The identity token binds this exact body (text, HTML and attachments, hashed from
    # what the parts are built from: the HTML is rendered once, for both) and Message-ID;
    # DKIM then covers the header.
    html = compose_html(draft)
    hashes = draft_hashes(draft, html=html)
    identity_header = identity.identity_header_for(
        conn,
        services,
        row,
        body_sha256=hashes.text,
        html_sha256=hashes.html,
        attachments_sha256=hashes.attachments,
        message_id=draft.message_id,
        mailbox=mailbox,
        account=account,
    )
    draft = dataclasses.replace(draft, extra_headers=[*headers, identity_header])
    composed = compose_message(draft, html=html)
    key = signing.key_for_sender(conn, services, account_id=row["account_id"], from_address=sender)
    if key is None:
        if row["test"]:
            return composed.raw  # captured, never sent: an unverified domain may rehearse
        raise PermanentDeliveryError(
            f"the domain of {sender} is not verified; only verified domains and "
            f"{settings.domain} may send live mail",
            code="domain_not_verified",
        )
    return signing.sign_composed(composed, key)


# -- step 1: start --------------------------------------------------------------------------


@dataclass
class _Plan:
    message_id: str
    account_id: str
    mailbox_id: str
    mail_from: str
    recipients: list[str]
    raw: bytes


@dataclass
class _Outcome:
    status: str
    retry_at: datetime | None = None


def _set_status(conn: Connection, row: Mapping[str, Any], new: Status, **values: Any) -> bool:
    """The guarded status change: True only for the one caller that saw the current status."""
    current = Status(row["status"])
    check_transition(current, new)
    result = conn.execute(
        update(messages)
        .where(messages.c.id == row["id"], messages.c.status == current.value)
        .values(status=new.value, updated_at=utcnow(), **values)
    )
    return bool(result.rowcount)


def _gate_refusal(conn: Connection, ctx: _Context) -> str | None:
    """Why this message must not reach SMTP under the gate, or None when it may."""
    row = ctx.row
    mode = OversightMode(row.get("oversight_mode") or ctx.mailbox["oversight_mode"])
    if not (outbound_is_gated(mode) or mode is OversightMode.READ_ONLY):
        return None
    if row.get("decision") == "approve":
        return None
    if mode is not OversightMode.READ_ONLY:
        patterns = [
            p.pattern
            for p in conn.execute(
                select(mailbox_allowlist.c.pattern).where(
                    mailbox_allowlist.c.mailbox_id == row["mailbox_id"]
                )
            )
        ]
        recipients = _recipients(row)
        if recipients and all(any(matches_pattern(r, p) for p in patterns) for r in recipients):
            return None
    return f"the message's oversight mode is {mode.value} and it has no approve decision"


def _held(ctx: _Context) -> bool:
    account = ctx.account
    return bool(account["paused"] or not account["sending_enabled"] or ctx.mailbox["paused"])


def _other_live_job(conn: Connection, message_id: str, job_id: str | None) -> bool:
    rows = conn.execute(
        select(jobs_table.c.id, jobs_table.c.payload).where(
            jobs_table.c.kind == DELIVER,
            jobs_table.c.status == "running",
            jobs_table.c.locked_until > utcnow(),
        )
    )
    return any(
        r.id != job_id and isinstance(r.payload, dict) and r.payload.get("message_id") == message_id
        for r in rows
    )


def _previous_results(conn: Connection, message_id: str) -> tuple[set[str], set[str]]:
    """Recipients already accepted, and already refused for good, by earlier attempts."""
    accepted: set[str] = set()
    refused: set[str] = set()
    rows = conn.execute(
        select(delivery_attempts.c.recipients)
        .where(delivery_attempts.c.message_id == message_id)
        .order_by(delivery_attempts.c.id)
    )
    for (results,) in rows:
        for item in results or []:
            if isinstance(item, dict) and item.get("ok"):
                accepted.add(item["address"])
            elif isinstance(item, dict) and item.get("permanent"):
                refused.add(item["address"])
    return accepted, refused


def _audit(
    conn: Connection, ctx: _Context, worker_id: str, action: str, details: Mapping[str, Any]
) -> None:
    row = ctx.row
    audit.append(
        conn,
        actor=_actor(worker_id, row["account_id"]),
        action=action,
        account_id=row["account_id"],
        subject_type="message",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        oversight_mode=row.get("oversight_mode"),
        details=details,
    )


def _emit(conn: Connection, message_id: str, *event_types: str, **extra: Any) -> None:
    """Emit ``event_types`` for the message as it now stands (its view is built once)."""
    fresh = dict(conn.execute(select(messages).where(messages.c.id == message_id)).mappings().one())
    subs = events.subscribers(conn, fresh["account_id"], fresh["mailbox_id"])
    if not any(events.wanted(subs, t) for t in event_types):
        return  # nobody would receive them: skip building the view
    view = message_views.full_view(conn, fresh)
    for event_type in event_types:
        events.emit(
            conn,
            account_id=fresh["account_id"],
            event_type=event_type,
            mailbox_id=fresh["mailbox_id"],
            message=view,
            extra=extra or None,
        )


def _fail(conn: Connection, ctx: _Context, worker_id: str, action: str, reason: str) -> _Outcome:
    if _set_status(conn, ctx.row, Status.SEND_FAILED, last_error=reason[:2000]):
        _audit(conn, ctx, worker_id, action, {"reason": reason})
        return _Outcome(Status.SEND_FAILED.value)
    return _Outcome(_current_status(conn, ctx.row["id"]))


def _current_status(conn: Connection, message_id: str) -> str:
    return str(conn.execute(select(messages.c.status).where(messages.c.id == message_id)).scalar())


def _record_captured(conn: Connection, ctx: _Context, worker_id: str, rcpts: list[str]) -> None:
    now = utcnow()
    conn.execute(
        insert(delivery_attempts).values(
            message_id=ctx.row["id"],
            started_at=now,
            finished_at=now,
            host="sandbox",
            port=0,
            smtp_code=250,
            reply="captured (test mode): never handed to SMTP",
            outcome="captured",
            recipients=[
                {"address": r, "ok": True, "permanent": False, "code": 250, "message": "captured"}
                for r in rcpts
            ],
            worker=worker_id,
        )
    )


def _start_in(
    conn: Connection,
    services: Services,
    message_id: str,
    worker_id: str,
    job_id: str | None,
    prebuilt: bytes | None,
) -> _Plan | _Outcome:
    ctx = _load(conn, message_id, lock=True)
    if ctx is None:
        return _Outcome("missing")
    row = ctx.row
    status = Status(row["status"])
    if row["direction"] != "outbound" or status not in DELIVERABLE:
        return _Outcome(status.value)
    refusal = _gate_refusal(conn, ctx)
    if refusal is not None:
        # Should be impossible: something upstream queued an unapproved gated message.
        _log.error("refusing to deliver %s: %s", message_id, refusal)
        return _fail(conn, ctx, worker_id, "delivery.refused_ungated", refusal)
    if _held(ctx):
        _log.info("delivery of %s held: the account or mailbox is paused", message_id)
        return _Outcome(status.value)
    if status is Status.SENDING:
        if _other_live_job(conn, message_id, job_id):
            return _Outcome(status.value)
        # Its worker died mid-delivery (lease expired): take it over. The stored bytes
        # go again, same Message-ID, which is the one duplicate DUR-3 allows.
        if not _set_status(conn, row, Status.QUEUED):
            return _Outcome(_current_status(conn, message_id))
        _audit(conn, ctx, worker_id, "delivery.recovered", {"from_status": "sending"})
        row["status"] = Status.QUEUED.value
    accepted, refused = _previous_results(conn, message_id)
    remaining = [r for r in _recipients(row) if r not in accepted and r not in refused]
    suppressed = directory.suppressed_among(conn, row["account_id"], remaining)
    to_send = [r for r in remaining if r not in suppressed]
    if not to_send:
        if accepted and _set_status(conn, row, Status.SENDING):
            # The rest went earlier; those still waiting were suppressed meanwhile.
            row["status"] = Status.SENDING.value
            _audit_suppressed(conn, ctx, worker_id, suppressed)
            return _finish_in(services, conn, ctx, worker_id, [], {}, None, sent_before=accepted)
        reason = (
            "every recipient is on the suppression list"
            if suppressed
            else ("the message has no deliverable recipient")
        )
        failed = _fail(conn, ctx, worker_id, "message.send_failed", reason)
        if failed.status == Status.SEND_FAILED.value:
            _audit_suppressed(conn, ctx, worker_id, suppressed)
        return failed
    raw = row["raw"]
    if raw is None:
        try:
            raw = prebuilt if prebuilt is not None else _compose(conn, services, ctx)
        except (InvalidInput, PermanentDeliveryError) as exc:
            return _fail(conn, ctx, worker_id, "message.send_failed", exc.message)
    values: dict[str, Any] = {"raw": raw, "size_bytes": len(raw)}
    if row["message_id_header"] is None:
        values["message_id_header"] = _message_id_header(ctx, services.settings)
    if not _set_status(conn, row, Status.SENDING, **values):
        return _Outcome(_current_status(conn, message_id))
    row.update(values, status=Status.SENDING.value)
    _audit_suppressed(conn, ctx, worker_id, suppressed)
    if row["test"]:
        _record_captured(conn, ctx, worker_id, to_send)
        return _finish_in(services, conn, ctx, worker_id, [], {}, None, sent_before=set(to_send))
    return _Plan(
        message_id=message_id,
        account_id=row["account_id"],
        mailbox_id=row["mailbox_id"],
        mail_from=row["from_address"] or ctx.mailbox["address"],
        recipients=to_send,
        raw=raw,
    )


def _audit_suppressed(
    conn: Connection, ctx: _Context, worker_id: str, suppressed: Collection[str]
) -> None:
    """The message's own trail says who it skipped: the suppression list is the account's."""
    if suppressed:
        _audit(
            conn,
            ctx,
            worker_id,
            "message.recipients_suppressed",
            {"recipients": sorted(suppressed)},
        )


def _prebuild(services: Services, message_ids: Sequence[str]) -> dict[str, bytes]:
    """Compose and sign outside the write transaction the messages that will need it."""
    with services.db.read() as conn:
        return _prebuild_in(conn, services, message_ids)


def _prebuild_in(
    conn: Connection, services: Services, message_ids: Sequence[str]
) -> dict[str, bytes]:
    built: dict[str, bytes] = {}
    contexts = _load_many(conn, message_ids)
    wanted = [
        ctx
        for ctx in contexts.values()
        if ctx.row["raw"] is None
        and not _held(ctx)
        and Status(ctx.row["status"]) in DELIVERABLE
        and ctx.row["direction"] == "outbound"
    ]
    files = _attachments_many(conn, [ctx.row["id"] for ctx in wanted])
    for ctx in wanted:
        message_id = ctx.row["id"]
        try:
            built[message_id] = _compose(conn, services, ctx, files[message_id])
        except MultimailError:
            continue  # the start step composes again and records the reason
    return built


# -- step 2: hand over -----------------------------------------------------------------------


@dataclass
class _HandOver:
    attempts: list[DeliveryAttempt]
    results: dict[str, RecipientResult] = field(default_factory=dict)
    error: MultimailError | None = None


async def _hand_over(transport: OutboundTransport, plan: _Plan) -> _HandOver:
    try:
        found = await transport.deliver(plan.mail_from, plan.recipients, plan.raw)
        attempts = found if isinstance(found, list) else [found]
        error: MultimailError | None = None
    except (TemporaryDeliveryError, PermanentDeliveryError) as exc:
        attempts = list(exc.context.get("attempts") or [])
        error = exc
    except InvalidInput as exc:  # the envelope itself was refused before any connection
        attempts, error = [], PermanentDeliveryError(exc.message, code=exc.code)
    results = recipient_outcomes(attempts)
    permanent = isinstance(error, PermanentDeliveryError)
    reason = error.message if error is not None else "no reply recorded"
    for rcpt in plan.recipients:
        results.setdefault(rcpt, RecipientResult(rcpt, False, permanent, None, reason))
    return _HandOver(attempts, {r: results[r] for r in plan.recipients}, error)


# -- step 3: finish --------------------------------------------------------------------------


def _attempt_outcome(results: Sequence[RecipientResult]) -> str:
    if results and all(r.ok for r in results):
        return "delivered"
    if any(r.ok for r in results):
        return "partial"
    if results and all(r.permanent for r in results):
        return "bounced"
    return "deferred"


def _result_json(result: RecipientResult) -> dict[str, Any]:
    return {
        "address": result.address,
        "ok": result.ok,
        "permanent": result.permanent,
        "code": result.code,
        "message": result.message[:500],
    }


def _attempt_rows(message_id: str, worker_id: str, handover: _HandOver) -> list[dict[str, Any]]:
    """The ``delivery_attempts`` rows of one hand-over: one per SMTP session."""
    rows = [
        {
            "message_id": message_id,
            "started_at": a.started_at,
            "finished_at": a.finished_at,
            "host": a.host,
            "port": a.port,
            "smtp_code": a.code,
            "reply": a.reply[:2000],
            "outcome": _attempt_outcome(a.recipients),
            "recipients": [_result_json(r) for r in a.recipients],
            "worker": worker_id,
        }
        for a in handover.attempts
    ]
    covered = {r.address for a in handover.attempts for r in a.recipients}
    missing = [r for a, r in handover.results.items() if a not in covered]
    if missing:
        # Nothing reached a server (e.g. a refused envelope): still one row per attempt.
        now = utcnow()
        rows.append(
            {
                "message_id": message_id,
                "started_at": now,
                "finished_at": now,
                "host": getattr(handover.error, "host", None),
                "port": None,
                "smtp_code": getattr(handover.error, "smtp_code", None),
                "reply": missing[0].message[:2000],
                "outcome": _attempt_outcome(missing),
                "recipients": [_result_json(r) for r in missing],
                "worker": worker_id,
            }
        )
    return rows


def _record_attempts(
    conn: Connection, message_id: str, worker_id: str, handover: _HandOver
) -> None:
    rows = _attempt_rows(message_id, worker_id, handover)
    if rows:
        conn.execute(_INSERT_ATTEMPT, rows)


def _first_attempt(conn: Connection, message_id: str) -> datetime:
    rows = conn.execute(
        select(delivery_attempts.c.started_at)
        .where(delivery_attempts.c.message_id == message_id)
        .order_by(delivery_attempts.c.started_at)
        .limit(1)
    ).first()
    return aware(rows.started_at) if rows is not None else utcnow()


def _reached_first(
    row: Mapping[str, Any], accepted_now: Collection[str], accepted_all: Collection[str]
) -> bool:
    """A live ``monitored`` message this attempt got to its first recipient(s): the moment
    its operator copy is due. ``accepted_all`` includes this attempt's (already recorded)."""
    earlier = set(accepted_all) - set(accepted_now)
    return (
        row.get("oversight_mode") == "monitored"
        and not row["test"]
        and bool(accepted_now)
        and not earlier
    )


def _finish_in(
    services: Services,
    conn: Connection,
    ctx: _Context,
    worker_id: str,
    attempts: list[DeliveryAttempt],
    results: Mapping[str, RecipientResult],
    error: MultimailError | None,
    *,
    sent_before: set[str] | None = None,
) -> _Outcome:
    """Commit what the hand-over achieved; ``ctx.row`` is the message as it was sending."""
    row = ctx.row
    message_id = row["id"]
    accepted_now = [r for r, res in results.items() if res.ok]
    refused_now = [r for r, res in results.items() if not res.ok and res.permanent]
    deferred_now = [r for r, res in results.items() if not res.ok and not res.permanent]
    prev_accepted, _prev_refused = _previous_results(conn, message_id)
    accepted_all = prev_accepted | set(accepted_now) | (sent_before or set())
    now = utcnow()
    if _reached_first(row, accepted_now, accepted_all):
        # monitored mode: the operator gets a copy of what went out, once, as soon as it
        # reached anyone (a message deferred or given up on for others went out too).
        notify.notify_monitored_copy(conn, services, row)
    for address in (a for a in refused_now if results[a].blames_recipient):
        directory.suppress(
            conn,
            actor=_actor(worker_id, row["account_id"]),
            account_id=row["account_id"],
            address=address,
            reason="hard_bounce",
            source_message_id=message_id,
            details=results[address].message[:500],
        )
    last = attempts[-1] if attempts else None
    host = last.host if last else ("sandbox" if row["test"] else None)
    reply = last.reply if last else (error.message if error else "")
    attempts_count = int(row.get("attempts") or 0) + 1
    if deferred_now:
        failures = attempts_count
        retry_at = next_attempt_at(_first_attempt(conn, message_id), now, failures)
        reason = results[deferred_now[0]].message
        if retry_at is None:
            values = {"attempts": attempts_count, "next_attempt_at": None}
            reason = f"gave up after {MAX_RETRY_WINDOW.days} days of temporary failures: {reason}"
            return _fail_sending(conn, ctx, worker_id, reason, values)
        if not _set_status(
            conn,
            row,
            Status.DEFERRED,
            attempts=attempts_count,
            next_attempt_at=retry_at,
            last_error=reason[:2000],
        ):
            return _Outcome(_current_status(conn, message_id))
        _audit(
            conn,
            ctx,
            worker_id,
            "message.deferred",
            {
                "host": host,
                "reply": reply[:500],
                "deferred": deferred_now,
                "accepted": accepted_now,
                "bounced": refused_now,
                "retry_at": retry_at.isoformat(),
            },
        )
        if refused_now:
            # Told now: the attempt that finally delivers to the deferred ones will not
            # know these (each attempt reports only its own refusals).
            _emit(conn, message_id, "message.bounced", bounced_recipients=refused_now, partial=True)
        return _Outcome(Status.DEFERRED.value, retry_at)
    if accepted_all:
        if not _set_status(
            conn,
            row,
            Status.DELIVERED,
            attempts=attempts_count,
            delivered_at=now,
            next_attempt_at=None,
            last_error=None,
        ):
            return _Outcome(_current_status(conn, message_id))
        _audit(
            conn,
            ctx,
            worker_id,
            "message.delivered",
            {
                "host": host,
                "reply": reply[:500],
                "recipients": sorted(accepted_all),
                "bounced": refused_now,
                "test": bool(row["test"]),
            },
        )
        _emit(conn, message_id, "message.sent", "message.delivered")
        if refused_now:
            _emit(conn, message_id, "message.bounced", bounced_recipients=refused_now, partial=True)
        return _Outcome(Status.DELIVERED.value)
    if refused_now:
        if not _set_status(
            conn,
            row,
            Status.BOUNCED,
            attempts=attempts_count,
            bounce_type="hard",
            next_attempt_at=None,
            last_error=reply[:2000],
        ):
            return _Outcome(_current_status(conn, message_id))
        _audit(
            conn,
            ctx,
            worker_id,
            "message.bounced",
            {"host": host, "reply": reply[:500], "recipients": refused_now, "bounce_type": "hard"},
        )
        _emit(conn, message_id, "message.bounced", bounced_recipients=refused_now)
        return _Outcome(Status.BOUNCED.value)
    return _fail_sending(conn, ctx, worker_id, reply or "no recipient was accepted", {})


def _fail_sending(
    conn: Connection, ctx: _Context, worker_id: str, reason: str, values: dict[str, Any]
) -> _Outcome:
    if not _set_status(conn, ctx.row, Status.SEND_FAILED, last_error=reason[:2000], **values):
        return _Outcome(_current_status(conn, ctx.row["id"]))
    _audit(conn, ctx, worker_id, "message.send_failed", {"reason": reason[:500]})
    return _Outcome(Status.SEND_FAILED.value)


@jobs.on_lost(DELIVER)
def _give_up_lost(conn: Connection, worker_id: str, lost: Sequence[Job]) -> None:
    """Settle the messages of deliver jobs whose worker was lost on their last attempt (in the
    claim's transaction): ``send_failed``, since the delivery sweep re-arms the job of any
    message left deliverable, which would send it again, for ever."""
    for job in lost:
        message_id = job.payload.get("message_id")
        ctx = _load(conn, message_id, lock=True) if isinstance(message_id, str) else None
        if (
            ctx is None
            or ctx.row["direction"] != "outbound"
            or Status(ctx.row["status"]) not in DELIVERABLE
        ):
            continue
        reason = (
            f"given up: the worker delivering it was lost (lease expired) on attempt "
            f"{job.attempts} of {job.max_attempts}, so the relay may or may not have it; "
            "not tried again"
        )
        _log.error("delivery of %s %s", message_id, reason)
        _fail_sending(conn, ctx, worker_id, reason, {"next_attempt_at": None})


def _finish(
    conn: Connection, services: Services, plan: _Plan, worker_id: str, handover: _HandOver
) -> _Outcome:
    _record_attempts(conn, plan.message_id, worker_id, handover)
    ctx = _load(conn, plan.message_id, lock=True)
    if ctx is None:
        return _Outcome("missing")
    if ctx.row["status"] != Status.SENDING.value:
        _log.warning(
            "message %s left 'sending' while we delivered it (now %s)",
            plan.message_id,
            ctx.row["status"],
        )
        return _Outcome(str(ctx.row["status"]))
    # Count this attempt's results once: _finish_in reads earlier ones from the table.
    conn_results = dict(handover.results)
    return _finish_in(
        services, conn, ctx, worker_id, handover.attempts, conn_results, handover.error
    )


# -- the entry points: a batch in two commits -------------------------------------------------


@dataclass
class _Item:
    """One message of a batch, and the job (if any) that this batch must settle."""

    message_id: str
    job: Job | None = None
    live_job_id: str | None = None
    plan: _Plan | None = None
    outcome: _Outcome | None = None
    handover: _HandOver | None = None
    failure: BaseException | None = None
    held: bool = False  # paused after its start: not handed over, back to queued


# Called inside the claim-and-start transaction; returns what this batch works on.
_Claimer = Callable[[Connection], list[_Item]]


def _settle(conn: Connection, item: _Item, worker_id: str) -> None:
    """Record the job's outcome in the same commit as the message's (runner semantics)."""
    job = item.job
    if job is None:
        return
    if item.failure is not None:
        runner.record_failure(conn, job, worker_id, item.failure)
    elif item.outcome is None or item.outcome.retry_at is None:
        jobs.complete(conn, job.id, worker_id)
    else:
        jobs.retry(conn, job.id, worker_id, run_at=item.outcome.retry_at, error="rescheduled")


def _start_many(
    conn: Connection, services: Services, items: Sequence[_Item], prebuilt: Mapping[str, bytes]
) -> list[tuple[_Item, _Plan]]:
    """Move to ``sending``, at once, the messages that need nothing but that.

    A message qualifies when :func:`_start_in` would do no more than store its bytes and
    change its status: outbound, queued or deferred (not a take-over), live (not test),
    past the gate, not held, its bytes built, and none of its remaining recipients
    suppressed. The others are left to :func:`_start_in`, one by one.
    """
    contexts = _load_many(conn, [i.message_id for i in items], lock=True)
    previous = _previous_results_many(conn, list(contexts))
    candidates: list[tuple[_Item, _Context, bytes, list[str]]] = []
    for item in items:
        ctx = contexts.get(item.message_id)
        if ctx is None:
            continue
        row = ctx.row
        if (
            row["direction"] != "outbound"
            or row["status"] not in _PLAIN_START
            or row["test"]
            or _held(ctx)
            or _gate_refusal(conn, ctx) is not None
        ):
            continue
        raw = row["raw"] if row["raw"] is not None else prebuilt.get(item.message_id)
        accepted, refused = previous[item.message_id]
        to_send = [r for r in _recipients(row) if r not in accepted and r not in refused]
        if raw is not None and to_send:
            candidates.append((item, ctx, raw, to_send))
    wanted: dict[str, set[str]] = {}
    for _item, ctx, _raw, to_send in candidates:
        wanted.setdefault(ctx.row["account_id"], set()).update(to_send)
    suppressed = {
        account_id: directory.suppressed_among(conn, account_id, sorted(addresses))
        for account_id, addresses in wanted.items()
    }
    now = utcnow()
    started: list[tuple[_Item, _Plan]] = []
    updates: list[dict[str, Any]] = []
    for item, ctx, raw, to_send in candidates:
        row = ctx.row
        if any(r in suppressed[row["account_id"]] for r in to_send):
            continue  # _start_in drops them and records that
        check_transition(Status(row["status"]), Status.SENDING)
        updates.append(
            {
                "m_id": row["id"],
                "m_status": row["status"],
                "m_raw": raw,
                "m_size": len(raw),
                "m_header": _message_id_header(ctx, services.settings),
                "m_now": now,
            }
        )
        plan = _Plan(
            message_id=row["id"],
            account_id=row["account_id"],
            mailbox_id=row["mailbox_id"],
            mail_from=row["from_address"] or ctx.mailbox["address"],
            recipients=to_send,
            raw=raw,
        )
        started.append((item, plan))
    if updates:
        changed = conn.execute(_MARK_SENDING, updates).rowcount
        if conn.dialect.supports_sane_multi_rowcount and changed != len(updates):
            raise RuntimeError(f"{len(updates) - changed} message(s) changed status meanwhile")
    return started


def _start_fast(
    conn: Connection, services: Services, items: list[_Item], prebuilt: Mapping[str, bytes]
) -> set[str]:
    """The plain starts of a batch in one statement; returns the message ids started."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.message_id] = counts.get(item.message_id, 0) + 1
    # A message twice in one batch (two jobs) goes one by one: the second must see the first.
    single = [i for i in items if counts[i.message_id] == 1]
    if not single:
        return set()
    try:
        with conn.begin_nested():
            started = _start_many(conn, services, single, prebuilt)
    except Exception:
        _log.exception("starting %d deliveries at once failed; one by one instead", len(single))
        return set()
    for item, plan in started:
        item.plan = plan
    return {item.message_id for item, _plan in started}


def _claim_and_start(
    services: Services, worker_id: str, claimer: _Claimer, prebuilt: Mapping[str, bytes]
) -> list[_Item]:
    """Commit 1: claim the jobs and move each message to ``sending`` (or settle it now)."""
    with services.db.write() as conn:
        items = claimer(conn)
        started_together = _start_fast(conn, services, items, prebuilt)
        # One lock order for every worker, so PostgreSQL row locks never deadlock.
        for item in sorted(items, key=lambda i: i.message_id):
            if item.message_id in started_together:
                continue
            job_id = item.job.id if item.job is not None else item.live_job_id
            try:
                with conn.begin_nested():
                    started = _start_in(
                        conn,
                        services,
                        item.message_id,
                        worker_id,
                        job_id,
                        prebuilt.get(item.message_id),
                    )
            except Exception as exc:  # one bad message must not sink the batch
                _log.exception("starting the delivery of %s failed", item.message_id)
                item.failure = exc
            else:
                if isinstance(started, _Plan):
                    item.plan = started
                    continue
                item.outcome = started
            _settle(conn, item, worker_id)
    return items


def _all_accepted(item: _Item) -> bool:
    handover = item.handover
    return (
        item.plan is not None
        and handover is not None
        and item.failure is None
        and handover.error is None
        and bool(handover.results)
        and all(r.ok for r in handover.results.values())
    )


def _previous_results_many(
    conn: Connection, message_ids: Sequence[str]
) -> dict[str, tuple[set[str], set[str]]]:
    """:func:`_previous_results` for many messages in one query."""
    found: dict[str, tuple[set[str], set[str]]] = {m: (set(), set()) for m in message_ids}
    for message_id, results in conn.execute(_PREVIOUS_MANY, {"ids": list(message_ids)}):
        accepted, refused = found[message_id]
        for item in results or []:
            if isinstance(item, dict) and item.get("ok"):
                accepted.add(item["address"])
            elif isinstance(item, dict) and item.get("permanent"):
                refused.add(item["address"])
    return found


def _rows_by_id(conn: Connection, message_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """What a start decides on, in one query; on PostgreSQL locked, in id order (as one by
    one)."""
    query = _START_ROWS_LOCKED if conn.dialect.name == "postgresql" else _START_ROWS
    return {
        row["id"]: dict(row) for row in conn.execute(query, {"ids": sorted(message_ids)}).mappings()
    }


def _deliver_many(
    conn: Connection, services: Services, worker_id: str, items: Sequence[_Item]
) -> list[tuple[_Item, _Outcome]]:
    """Record, at once, messages whose every recipient the server accepted this attempt.

    Writes exactly what :func:`_finish` would for each (attempt rows, ``delivered``, audit
    entry, ``message.sent`` + ``message.delivered`` events, monitored copy), with one
    statement per kind of write for the whole batch instead of several per message.
    """
    attempt_rows: list[dict[str, Any]] = []
    for item in items:
        assert item.handover is not None
        attempt_rows.extend(_attempt_rows(item.message_id, worker_id, item.handover))
    if attempt_rows:
        conn.execute(_INSERT_ATTEMPT, attempt_rows)
    ids = [i.message_id for i in items]
    # One read serves the decision and, patched with what the UPDATE below writes, the
    # events: the rows are ours until commit (write lock / FOR UPDATE), so a re-read after
    # the UPDATE would find exactly that.
    locked = _VIEW_ROWS_LOCKED if conn.dialect.name == "postgresql" else _VIEW_ROWS
    rows = {r["id"]: dict(r) for r in conn.execute(locked, {"ids": sorted(ids)}).mappings()}
    previous = _previous_results_many(conn, ids)
    handed = {i.message_id: list(i.handover.results) for i in items if i.handover is not None}
    check_transition(Status.SENDING, Status.DELIVERED)
    now = utcnow()
    outcomes: list[tuple[_Item, _Outcome]] = []
    updates: list[dict[str, Any]] = []
    entries: list[audit.Entry] = []
    delivered: list[dict[str, Any]] = []
    for item in items:
        assert item.handover is not None
        row = rows.get(item.message_id)
        if row is None:
            outcomes.append((item, _Outcome("missing")))
            continue
        if row["status"] != Status.SENDING.value:
            _log.warning(
                "message %s left 'sending' while we delivered it (now %s)",
                item.message_id,
                row["status"],
            )
            outcomes.append((item, _Outcome(str(row["status"]))))
            continue
        accepted_all = previous[item.message_id][0] | set(item.handover.results)
        last = item.handover.attempts[-1] if item.handover.attempts else None
        attempts = int(row.get("attempts") or 0) + 1
        updates.append({"m_id": row["id"], "m_attempts": attempts, "m_now": now})
        entries.append(
            audit.Entry(
                "message.delivered",
                account_id=row["account_id"],
                subject_type="message",
                subject_id=row["id"],
                mailbox_id=row["mailbox_id"],
                oversight_mode=row.get("oversight_mode"),
                details={
                    "host": last.host if last else ("sandbox" if row["test"] else None),
                    "reply": (last.reply if last else "")[:500],
                    "recipients": sorted(accepted_all),
                    "bounced": [],
                    "test": bool(row["test"]),
                },
            )
        )
        delivered.append(row)
        outcomes.append((item, _Outcome(Status.DELIVERED.value)))
    if not updates:
        return outcomes
    changed = conn.execute(_MARK_DELIVERED, updates).rowcount
    if conn.dialect.supports_sane_multi_rowcount and changed != len(updates):
        # The rows are ours (write lock / FOR UPDATE) so this cannot happen; if it does,
        # the caller rolls this back and records each message on its own.
        raise RuntimeError(f"{len(updates) - changed} message(s) left 'sending' meanwhile")
    for row, update_values in zip(delivered, updates, strict=True):
        row.update(
            status=Status.DELIVERED.value,
            attempts=update_values["m_attempts"],
            delivered_at=now,
            next_attempt_at=None,
            last_error=None,
            updated_at=now,
        )
    audit.append_many(conn, actor=_actor(worker_id, None), entries=entries)
    _emit_many(conn, delivered, ("message.sent", "message.delivered"))
    for shown in delivered:
        accepted = set(handed[shown["id"]])
        if _reached_first(shown, accepted, previous[shown["id"]][0] | accepted):
            notify.notify_monitored_copy(conn, services, shown)  # as in _finish_in
    return outcomes


def _emit_many(
    conn: Connection, rows: Sequence[Mapping[str, Any]], event_types: Sequence[str]
) -> None:
    """``events.emit`` of each of ``event_types`` for each message row, written together.

    Subscribers are read once per mailbox (``events.subscribers``; nothing here changes
    subscriptions). Only the messages some subscription wants an event of get their views
    built, so an account without webhooks costs nothing here; the events of the others are
    written with one INSERT for the events and one for their deliveries. The rows are those
    ``events.emit`` writes (same name matching, the same JSON text: see
    ``events.stored_text``), each message's compact view encoded once for all its events.
    """
    subscribers: dict[tuple[str, str], list[Any]] = {}
    wanted_rows: list[Mapping[str, Any]] = []
    for row in rows:
        key = (row["account_id"], row["mailbox_id"])
        if key not in subscribers:
            subscribers[key] = events.subscribers(conn, *key)
        if any(events.wanted(subscribers[key], t) for t in event_types):
            wanted_rows.append(row)
    if not wanted_rows:
        return
    event_rows: list[dict[str, Any]] = []
    delivery_rows: list[dict[str, Any]] = []
    # One time for the events of this commit (they become visible together).
    now = utcnow()
    created_at = isoformat(now) or ""
    for row, view in zip(wanted_rows, message_views.views(conn, wanted_rows), strict=True):
        key = (row["account_id"], row["mailbox_id"])
        view_text = json.dumps(message_views.compact_view(view))
        for event_type in event_types:
            event_id = new_id("evt")
            deliveries = events.delivery_rows(subscribers[key], event_id, event_type, now)
            if not deliveries:
                continue
            delivery_rows.extend(deliveries)
            event_rows.append(
                {
                    "id": event_id,
                    "account_id": key[0],
                    "mailbox_id": key[1],
                    "message_id": row["id"],
                    "type": event_type,
                    "payload_json": events.stored_text(
                        event_id=event_id,
                        event_type=event_type,
                        created_at=created_at,
                        mailbox_id=key[1],
                        compact_message_text=view_text,
                    ),
                    "created_at": now,
                }
            )
    conn.execute(_INSERT_EVENT_TEXT[conn.dialect.name], event_rows)
    conn.execute(_INSERT_WEBHOOK_DELIVERY, delivery_rows)
    events.nudge_after_commit(conn)


def _finish_fast(
    conn: Connection, services: Services, worker_id: str, items: list[_Item]
) -> set[str]:
    """The plain deliveries of a batch recorded together; returns the message ids done."""
    plain = [i for i in items if _all_accepted(i)]
    if not plain:
        return set()
    try:
        with conn.begin_nested():
            outcomes = _deliver_many(conn, services, worker_id, plain)
    except Exception:
        _log.exception("recording %d deliveries at once failed; one by one instead", len(plain))
        return set()
    for item, outcome in outcomes:
        item.outcome = outcome
    return {i.message_id for i in plain}


def _settle_all(conn: Connection, items: Sequence[_Item], worker_id: str) -> None:
    """:func:`_settle` for a batch: the usual completions in one statement."""
    now = utcnow()
    completions = [
        {"j_id": i.job.id, "j_worker": worker_id, "j_now": now}
        for i in items
        if i.job is not None
        and i.failure is None
        and (i.outcome is None or i.outcome.retry_at is None)
    ]
    if completions:
        conn.execute(_COMPLETE_JOB, completions)
    for item in items:
        if item.job is not None and (
            item.failure is not None
            or (item.outcome is not None and item.outcome.retry_at is not None)
        ):
            _settle(conn, item, worker_id)


def _finish_all(
    services: Services, worker_id: str, items: list[_Item], hand_back: Sequence[_Item] = ()
) -> None:
    """Commit 2: every attempt, status change, audit entry, event and job outcome at once;
    with the jobs of ``hand_back`` (a stop cut their conversations short) due again now."""
    if not items and not hand_back:
        return
    with services.db.write() as conn:
        done = _finish_fast(conn, services, worker_id, items)
        for item in items:
            if item.held:
                _hold_back(conn, item, worker_id)
                continue
            plan, handover = item.plan, item.handover
            if plan is not None and handover is not None and item.message_id not in done:
                try:
                    with conn.begin_nested():
                        item.outcome = _finish(conn, services, plan, worker_id, handover)
                except Exception as exc:
                    # Left in 'sending': the job's retry recovers it and re-sends the stored
                    # bytes, the duplicate DUR-3 allows after an unrecorded 250.
                    _log.exception("recording the delivery of %s failed", item.message_id)
                    item.failure = exc
        _settle_all(conn, items, worker_id)
        _hand_back_in(conn, hand_back, worker_id)


def _hold_back(conn: Connection, item: _Item, worker_id: str) -> None:
    """A message paused between its start and its hand-over goes back to ``queued``, as
    one paused before its start stays there; resuming gives it a deliver job again."""
    ctx = _load(conn, item.message_id, lock=True)
    if ctx is None or not _set_status(conn, ctx.row, Status.QUEUED):
        return
    _audit(conn, ctx, worker_id, "delivery.held", {"reason": "paused before hand-over"})
    _log.info("delivery of %s held before hand-over: paused meanwhile", item.message_id)


def _hand_back(services: Services, worker_id: str, items: list[_Item]) -> None:
    with services.db.write() as conn:
        _hand_back_in(conn, items, worker_id)


def _hand_back_in(conn: Connection, items: Sequence[_Item], worker_id: str) -> None:
    """The jobs of ``items`` due again now: the next worker need not wait out a lease."""
    now = utcnow()
    for item in items:
        if item.job is not None:
            jobs.retry(conn, item.job.id, worker_id, run_at=now, error="worker stopping")


# Of these mailboxes, those whose mail must not go now (the kill switch, as _held reads it).
_HELD_AMONG = (
    select(mailboxes.c.id)
    .join(accounts, accounts.c.id == mailboxes.c.account_id)
    .where(
        mailboxes.c.id.in_(bindparam("mailbox_ids", expanding=True)),
        or_(
            mailboxes.c.paused.is_(True),
            accounts.c.paused.is_(True),
            accounts.c.sending_enabled.is_(False),
        ),
    )
)
# How old the paused-mailbox snapshot may be when a message is about to be handed over.
_PAUSE_FRESHNESS = 0.1


class _PauseWatch:
    """Which of a batch's mailboxes are paused, re-read at most every ``_PAUSE_FRESHNESS`` s.

    A pause that lands after a message's start (commit 1) must still stop it if it has not
    been handed over: the start and the hand-over are apart by the composing of the batch and
    by every message queued before it on its session. Reading once per message would cost a
    query each; a snapshot this fresh narrows the window to the conversations under way.
    """

    def __init__(self, services: Services, items: Sequence[_Item]) -> None:
        self._services = services
        self._ids = sorted({i.plan.mailbox_id for i in items if i.plan is not None})
        self._held: frozenset[str] = frozenset()
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    def _read(self) -> frozenset[str]:
        with self._services.db.read() as conn:
            return frozenset(conn.execute(_HELD_AMONG, {"mailbox_ids": self._ids}).scalars())

    async def held(self, plan: _Plan) -> bool:
        async with self._lock:  # one read serves every session waiting on it
            if time.monotonic() - self._read_at > _PAUSE_FRESHNESS:
                self._held = await asyncio.to_thread(self._read)
                self._read_at = time.monotonic()
        return plan.mailbox_id in self._held


def _ended(item: _Item) -> bool:
    """Whether the message's hand-over has an outcome to record."""
    return item.handover is not None or item.held or item.failure is not None


def _any_accepted(items: Sequence[_Item]) -> bool:
    return any(i.handover and any(r.ok for r in i.handover.results.values()) for i in items)


class _Conversations:
    """One batch's hand-over: up to ``_MAX_SESSIONS`` conversations at once, each taking the
    next message when its last one is done (a task per session, not per message). A message
    whose mailbox or account ``watch`` finds paused is not handed over (``held``).

    ``ended``, once set (the batch stopped waiting for them: :class:`_Stragglers`), is told
    of each message whose hand-over ends after that.
    """

    def __init__(
        self, transport: OutboundTransport, items: list[_Item], watch: _PauseWatch | None = None
    ) -> None:
        self._transport = transport
        self._watch = watch
        self._queue = iter(items)
        self.ended: Callable[[_Item], None] | None = None
        self.sessions = {
            asyncio.create_task(self._session()) for _ in range(min(_MAX_SESSIONS, len(items)))
        }

    async def _session(self) -> None:
        for item in self._queue:
            assert item.plan is not None
            try:
                if self._watch is not None and await self._watch.held(item.plan):
                    item.held = True
                else:
                    item.handover = await _hand_over(self._transport, item.plan)
            except Exception as exc:  # a bug, not an SMTP answer: we cannot know what went out
                _log.exception("handing %s to SMTP failed", item.message_id)
                item.failure = exc
            if self.ended is not None:
                self.ended(item)

    async def wait(self, within: float | None = None) -> bool:
        """Wait for every conversation, at most ``within`` s; whether they are all over."""
        if not self.sessions:
            return True
        _done, pending = await asyncio.wait(self.sessions, timeout=within)
        return not pending

    async def cancel(self) -> None:
        """Cut the conversations under way short: their messages get no outcome."""
        for task in self.sessions:
            task.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)


async def _through(work: Awaitable[None]) -> None:
    """Await ``work`` (a thread's, which a cancelled await would not stop) to its end, even
    when cancelled meanwhile; the cancellation is raised after it."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


async def _record_stopped(services: Services, worker_id: str, items: Sequence[_Item]) -> None:
    """A stop cut ``items``' conversations short: record what the relay answered (a graceful
    stop must not send an accepted message again, SPEC §2) and hand the others back."""
    ended = [i for i in items if _ended(i)]
    cut = [i for i in items if not _ended(i)]
    with contextlib.suppress(Exception):
        await _through(asyncio.to_thread(_finish_all, services, worker_id, ended, cut))


@dataclass(eq=False)
class _Late:
    """A batch's stragglers, and those of them whose hand-over has ended, not yet recorded."""

    talk: _Conversations
    items: list[_Item]
    ended: list[_Item] = field(default_factory=list)
    signal: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self, item: _Item) -> None:
        self.ended.append(item)
        self.signal.set()

    def take(self) -> list[_Item]:
        taken, self.ended = self.ended, []
        self.signal.clear()
        return taken


@dataclass
class _Stragglers:
    """The conversations one worker's batches stopped waiting for (``_STRAGGLER_DEADLINE``):
    each is recorded when it ends, its job's lease renewed meanwhile; at most
    ``_MAX_STRAGGLERS`` at once. On a stop they get the grace the rest gets (see
    :func:`_drain_stragglers`), then what ended is recorded and the rest handed back."""

    count: int = 0
    groups: set[asyncio.Task[None]] = field(default_factory=set)

    def adopt(
        self,
        services: Services,
        worker_id: str,
        talk: _Conversations,
        working: Sequence[_Item],
        lease: timedelta,
    ) -> bool:
        """Take over the conversations of ``talk`` still under way; False (nothing taken)
        when that would pass the bound."""
        late = _Late(talk, [i for i in working if not _ended(i)])
        if self.count + len(late.items) > _MAX_STRAGGLERS:
            return False
        # Set before this returns: a hand-over ending from now on must be heard of.
        talk.ended = late.end
        self.count += len(late.items)
        group = asyncio.create_task(self._see_through(services, worker_id, late, lease))
        self.groups.add(group)
        group.add_done_callback(self.groups.discard)
        return True

    async def _see_through(
        self, services: Services, worker_id: str, late: _Late, lease: timedelta
    ) -> None:
        waiting = late.items
        every = max(0.05, lease.total_seconds() / 3)
        renew_at = time.monotonic() + every
        try:
            while waiting:
                if not late.ended:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, renew_at - time.monotonic())):
                            await late.signal.wait()
                if time.monotonic() >= renew_at:
                    await self._renew(services, worker_id, waiting, lease)
                    renew_at = time.monotonic() + every
                done = late.take()
                if not done:
                    continue
                waiting = [i for i in waiting if not _ended(i)]
                self.count -= len(done)
                if _any_accepted(done):
                    _crash_point("after_smtp_250")
                try:
                    await _through(asyncio.to_thread(_finish_all, services, worker_id, done))
                except Exception:
                    # As for a batch: left in 'sending', their leases no longer renewed, they
                    # are taken over and sent again; the other stragglers go on.
                    _log.warning("recording %d straggler(s) failed", len(done), exc_info=True)
                    continue
                _crash_point("after_commit")
        except asyncio.CancelledError:
            await late.talk.cancel()
            # ``waiting`` holds every straggler not recorded yet, ended (in ``late.ended``) or not.
            await _record_stopped(services, worker_id, waiting)
            raise
        finally:
            self.count -= len(waiting)

    @staticmethod
    async def _renew(
        services: Services, worker_id: str, items: Sequence[_Item], lease: timedelta
    ) -> None:
        job_ids = [i.job.id for i in items if i.job is not None]
        try:
            await asyncio.to_thread(jobs.extend_leases, services.db, job_ids, worker_id, lease)
        except Exception:  # a database hiccup: try again next round
            _log.warning("could not renew the leases of stragglers", exc_info=True)


_STRAGGLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Stragglers]] = (
    weakref.WeakKeyDictionary()
)


async def _drain_stragglers(services: Services, worker_id: str, at_once: bool) -> None:
    """A pipeline stops: let this worker's stragglers end (the stop's grace), or when the
    grace is over (cancelled, or ``at_once``) cut them short, recorded as a stop records."""
    pool = _STRAGGLERS.get(asyncio.get_running_loop(), {}).get(worker_id)
    groups = set(pool.groups) if pool is not None else set()
    if not groups:
        return
    if not at_once:
        try:
            await asyncio.wait(groups)
            return
        except asyncio.CancelledError:
            _stop_groups(groups)
            await asyncio.wait(groups)
            raise
    _stop_groups(groups)
    await asyncio.wait(groups)


def _stop_groups(groups: Collection[asyncio.Task[None]]) -> None:
    for group in groups:
        if not group.cancelling():  # another pipeline of this worker stopped it already
            group.cancel()


async def _keep_leases(
    services: Services, items: list[_Item], worker_id: str, lease: timedelta
) -> None:
    job_ids = [i.job.id for i in items if i.job is not None]
    while job_ids:
        await asyncio.sleep(max(0.05, lease.total_seconds() / 3))
        try:
            await asyncio.to_thread(jobs.extend_leases, services.db, job_ids, worker_id, lease)
        except Exception:  # a database hiccup: try again next round
            _log.warning("could not renew delivery leases", exc_info=True)


def _prepare_now(
    services: Services, worker_id: str, claimer: _Claimer, prebuild: Sequence[str]
) -> list[_Item]:
    prebuilt = _prebuild(services, prebuild) if prebuild else {}
    return _claim_and_start(services, worker_id, claimer, prebuilt)


async def _prepare(
    services: Services, worker_id: str, claimer: _Claimer, prebuild: Sequence[str]
) -> list[_Item]:
    """Compose and sign outside any transaction, then claim-and-start (commit 1), in one
    trip to a thread."""
    return await asyncio.to_thread(_prepare_now, services, worker_id, claimer, prebuild)


async def _complete(
    services: Services,
    worker_id: str,
    items: list[_Item],
    lease: timedelta = DEFAULT_LEASE,
    *,
    stragglers: _Stragglers | None = None,
) -> None:
    """Hand every started message over concurrently, then record it all (commit 2).

    With ``stragglers`` (a runner's batch) the wait for the conversations ends at
    ``_STRAGGLER_DEADLINE``: those still under way then go on in the background, each
    recorded when it ends, and this records the others, so the pipeline goes on.
    """
    working = [i for i in items if i.plan is not None]
    if not working:
        return
    keeper = asyncio.create_task(_keep_leases(services, working, worker_id, lease))
    try:
        _crash_point("before_connect")
        talk = _Conversations(outbound_transport(services), working, _PauseWatch(services, working))
        finished = working
        try:
            if stragglers is None:
                await talk.wait()
            elif not await talk.wait(_STRAGGLER_DEADLINE):
                if stragglers.adopt(services, worker_id, talk, working, lease):
                    finished = [i for i in working if _ended(i)]
                else:
                    await talk.wait()
        except asyncio.CancelledError:
            # Stopping past the grace: nothing is sent again that the relay accepted.
            await talk.cancel()
            await _record_stopped(services, worker_id, working)
            raise
        if _any_accepted(finished):
            _crash_point("after_smtp_250")
        await _through(asyncio.to_thread(_finish_all, services, worker_id, finished))
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    _crash_point("after_commit")


async def _run_batch(
    services: Services, worker_id: str, claimer: _Claimer, prebuild: Sequence[str]
) -> list[_Item]:
    items = await _prepare(services, worker_id, claimer, prebuild)
    await _complete(services, worker_id, items)
    return items


def _one(item: _Item) -> _Claimer:
    return lambda conn: [item]


async def deliver(
    services: Services, message_id: str, worker_id: str, *, job_id: str | None = None
) -> str:
    """Deliver one message now if it may go; returns its status afterwards."""
    item = _Item(message_id, live_job_id=job_id)
    await _run_batch(services, worker_id, _one(item), [message_id])
    if item.failure is not None:
        raise item.failure
    return item.outcome.status if item.outcome is not None else "sending"


@runner.register(DELIVER)
async def _deliver_job(services: Services, job: Job, worker_id: str) -> datetime | None:
    """One already-claimed deliver job (``runner.execute``); the runner settles the job."""
    message_id = job.payload.get("message_id")
    if not isinstance(message_id, str):
        raise InvalidInput("a deliver job needs a message_id", code="invalid_job")
    item = _Item(message_id, live_job_id=job.id)
    await _run_batch(services, worker_id, _one(item), [message_id])
    if item.failure is not None:
        raise item.failure
    return item.outcome.retry_at if item.outcome is not None else None


# The deliver jobs due now, in claim order, past those this worker's other pipelines are
# composing (``jobs.peek`` with an exclusion): corrupt payloads included, so the claim
# quarantines them instead of their filling every look for ever.
def _due_past_busy(*columns: Any) -> Select[Any]:
    """The first ``limit`` deliver jobs due at ``now``, not among ``busy``, in claim order."""
    return (
        select(*columns)
        .where(
            jobs_table.c.kind == DELIVER,
            jobs.is_due(bindparam("now")),
            jobs_table.c.id.not_in(bindparam("busy", expanding=True)),
        )
        .order_by(jobs_table.c.run_at)
        .limit(bindparam("limit"))
    )


_PEEK_DUE = _due_past_busy(jobs_table.c.id, jobs.PAYLOAD_TEXT)
# What ``jobs.claim_in`` does, for the jobs looked at: only those still due are taken.
_CLAIMABLE = (
    select(*jobs.CLAIM_COLUMNS)
    .where(
        jobs_table.c.id.in_(bindparam("ids", expanding=True)),
        jobs.is_due(bindparam("now")),
    )
    .order_by(jobs_table.c.run_at)
)
_CLAIMABLE_LOCKED = _CLAIMABLE.with_for_update(skip_locked=True)
# Other due jobs, for a claim that lost some of those it looked at to another worker process
# (whose look cannot see this one's reservations): ``jobs.claim_in`` past them.
_CLAIM_OTHERS = _due_past_busy(*jobs.CLAIM_COLUMNS)
_CLAIM_OTHERS_LOCKED = _CLAIM_OTHERS.with_for_update(skip_locked=True)


@dataclass
class _Looks:
    """The deliver jobs one worker's pipelines have looked at and not yet claimed.

    A pipeline looks at due jobs, composes their messages (the long part), then claims
    them. Only the look is taken in turns: the next pipeline looks past the jobs reserved
    here, so it composes other messages while this one composes or commits.
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    reserved: set[str] = field(default_factory=set)


_LOOKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Looks]] = (
    weakref.WeakKeyDictionary()
)


def _look(conn: Connection, looks: _Looks, limit: int) -> list[tuple[str, dict[str, Any] | None]]:
    """Up to ``limit`` due deliver jobs nobody here is composing, reserved for the caller,
    with their payloads (None for a corrupt one, which the claim quarantines)."""
    with looks.lock:
        rows = conn.execute(
            _PEEK_DUE, {"now": utcnow(), "busy": sorted(looks.reserved), "limit": limit}
        ).all()
        looks.reserved.update(r.id for r in rows)
    return [(r.id, jobs.payload_of(r.payload)) for r in rows]


@dataclass
class _Stop:
    """A batch's thread and the coroutine awaiting it, when that await is cancelled (a
    worker stopping after its grace): cancelling the await does not stop the thread, which
    would claim its jobs and move their messages to ``sending`` with nobody left to hand
    them back. The thread claims nothing once stopped; whichever side comes second hands
    back what it did claim."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: bool = False
    returned: bool = False

    def stop(self) -> bool:
        """Stop the thread; True when it has returned its batch already (the caller's to
        hand back then)."""
        with self.lock:
            self.stopped = True
            return self.returned

    def give(self) -> bool:
        """The thread is done: True when its batch is still wanted (else it hands it back)."""
        with self.lock:
            self.returned = not self.stopped
            return self.returned


def _claim_looked(
    services: Services,
    worker_id: str,
    job_ids: list[str],
    lease: timedelta,
    *,
    looks: _Looks,
    prebuilt: dict[str, bytes],
    stop: _Stop | None = None,
) -> _Claimer:
    """Claim the jobs looked at that are still due (``jobs.claim_in`` for those ids).

    Those another worker process claimed first are made up for with other due jobs, past
    the ones this worker's pipelines reserved, composed here in the claim's transaction:
    else the batch could come back empty though work is due, and the runner would sleep.
    The jobs taken so are added to ``job_ids`` and ``looks`` (the caller releases both)."""

    def claim(conn: Connection) -> list[_Item]:
        if stop is not None and stop.stopped:
            return []
        now = utcnow()
        postgres = conn.dialect.name == "postgresql"
        rows = list(
            conn.execute(
                _CLAIMABLE_LOCKED if postgres else _CLAIMABLE, {"ids": job_ids, "now": now}
            ).mappings()
        )
        others: set[str] = set()
        missing = len(job_ids) - len(rows)
        if missing > 0:
            with looks.lock:
                extra = (
                    conn.execute(
                        _CLAIM_OTHERS_LOCKED if postgres else _CLAIM_OTHERS,
                        {"now": now, "busy": sorted(looks.reserved), "limit": missing},
                    )
                    .mappings()
                    .all()
                )
                others = {r["id"] for r in extra}
                looks.reserved.update(others)
            job_ids.extend(others)
            rows.extend(extra)
        if not rows:
            return []
        # Corrupt rows quarantined, jobs of lost workers failed, as jobs.claim_in does.
        items: list[_Item] = []
        for job in jobs.take(conn, worker_id, rows, now=now, lease=lease):
            message_id = job.payload.get("message_id")
            if isinstance(message_id, str):
                items.append(_Item(message_id, job))
            else:
                jobs.fail(conn, job.id, worker_id, error="a deliver job needs a message_id")
        unbuilt = [
            i.message_id
            for i in items
            if i.job is not None and i.job.id in others and i.message_id not in prebuilt
        ]
        if unbuilt:
            prebuilt.update(_prebuild_in(conn, services, unbuilt))
        return items

    return claim


def _prepare_due(
    services: Services,
    worker_id: str,
    limit: int,
    lease: timedelta,
    looks: _Looks,
    stop: _Stop | None = None,
) -> list[_Item] | None:
    """Look at the due jobs, compose their messages, then claim-and-start (commit 1); None
    when nothing was due or ``stop`` came. The jobs looked at stay reserved from this
    worker's other pipelines until claimed (or not), so no two of them compose the same
    message."""
    pool = composer.compose_pool(services)
    if pool is not None and not pool.usable:
        pool = None  # compose in the look's transaction, as without children
    job_ids: list[str] = []
    try:
        with services.db.read() as conn:
            due = _look(conn, looks, limit)
            if not due:
                return None
            job_ids = [job_id for job_id, _payload in due]
            peeked = [
                p["message_id"]
                for _job_id, p in due
                if p is not None and isinstance(p.get("message_id"), str)
            ]
            prebuilt = _prebuild_in(conn, services, peeked) if peeked and pool is None else {}
        if stop is not None and stop.stopped:
            return None  # nobody is waiting for these any more: compose nothing
        if peeked and pool is not None:
            # The children read the rows themselves; this thread waits without the GIL.
            from_children = pool.build(peeked)
            prebuilt = from_children if from_children is not None else _prebuild(services, peeked)
        claimer = _claim_looked(
            services, worker_id, job_ids, lease, looks=looks, prebuilt=prebuilt, stop=stop
        )
        items = _claim_and_start(services, worker_id, claimer, prebuilt)
        if stop is None or stop.give():
            return items
        _hand_back(services, worker_id, items)
        return None
    finally:
        with looks.lock:
            looks.reserved.difference_update(job_ids)


@runner.register_batch(DELIVER, drain=_drain_stragglers)
async def _deliver_batch(services: Services, worker_id: str, limit: int, lease: timedelta) -> int:
    """The runner's deliver loop: up to ``limit`` due messages per two commits."""
    looks = _LOOKS.setdefault(asyncio.get_running_loop(), {}).setdefault(worker_id, _Looks())
    stop = _Stop()
    work = asyncio.ensure_future(
        asyncio.to_thread(_prepare_due, services, worker_id, limit, lease, looks, stop)
    )
    try:
        items = await asyncio.shield(work)
    except asyncio.CancelledError:
        if stop.stop():
            # Claimed before the stop came: hand the jobs back rather than leave them to
            # wait out their lease (the thread is done, so this wait is short).
            with contextlib.suppress(Exception):
                taken = await work
                if taken:
                    await asyncio.to_thread(_hand_back, services, worker_id, taken)
        raise
    if items is None:
        return 0
    pool = _STRAGGLERS.setdefault(asyncio.get_running_loop(), {}).setdefault(
        worker_id, _Stragglers()
    )
    await _complete(services, worker_id, items, lease, stragglers=pool)
    return len(items)


def enqueue_delivery(conn: Connection, message_id: str, *, run_at: datetime | None = None) -> None:
    """Give ``message_id`` a due deliver job in the caller's transaction (re-arming a spent one).

    ``jobs.enqueue`` with the ``deliver:<id>`` dedupe key adds nothing once that job has run
    (e.g. it completed while the mailbox was paused); this re-arms it instead. A quarantined
    one (a damaged row) is re-armed too, written anew: else its key kept the message from
    ever having a job again.
    """
    now = utcnow()
    rearmed = conn.execute(
        update(jobs_table)
        .where(
            jobs_table.c.dedupe_key == job_key(message_id),
            jobs_table.c.status.in_(("done", "failed", "pending", "quarantined")),
        )
        .values(
            status="pending",
            payload={"message_id": message_id},
            run_at=run_at or now,
            attempts=0,
            max_attempts=jobs.DEFAULT_MAX_ATTEMPTS,
            locked_by=None,
            locked_until=None,
            # A quarantined row may have been set aside for its created_at.
            created_at=case(
                (jobs_table.c.status == "quarantined", literal(now, jobs_table.c.created_at.type)),
                else_=jobs_table.c.created_at,
            ),
            updated_at=now,
        )
    )
    if not rearmed.rowcount:
        jobs.enqueue(
            conn,
            DELIVER,
            {"message_id": message_id},
            run_at=run_at or now,
            dedupe_key=job_key(message_id),
        )


def _claim_for_now(message_id: str, worker: str) -> _Claimer:
    """Take this message's deliver job (creating it if needed) unless someone holds it."""

    def claim(conn: Connection) -> list[_Item]:
        now = utcnow()
        status = _current_status(conn, message_id)
        if status not in {s.value for s in DELIVERABLE}:
            return []
        held = and_(jobs_table.c.status == "running", jobs_table.c.locked_until > now)
        query = select(*jobs.CLAIM_COLUMNS, held.label("held")).where(
            jobs_table.c.dedupe_key == job_key(message_id)
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).mappings().first()
        if row is None:
            jobs.enqueue(conn, DELIVER, {"message_id": message_id}, dedupe_key=job_key(message_id))
            row = conn.execute(query).mappings().one()
        if row["held"]:
            return []
        # Whatever its state, the job is taken with the one payload a deliver job has.
        payload = {"message_id": message_id}
        job = jobs.read(row, claimed=True, payload=payload)
        if isinstance(job, str):
            jobs.quarantine(conn, {job: [row["id"]]})
            return []
        if jobs.is_lost(row):
            jobs.give_up(conn, worker, [dataclasses.replace(job, attempts=row["attempts"])])
            return []
        conn.execute(
            update(jobs_table)
            .where(jobs_table.c.id == row["id"])
            .values(
                status="running",
                payload=payload,
                locked_by=worker,
                locked_until=now + DEFAULT_LEASE,
                attempts=jobs_table.c.attempts + 1,
                updated_at=now,
            )
        )
        return [_Item(message_id, job)]

    return claim


def _status(services: Services, message_id: str) -> str:
    with services.db.read() as conn:
        return _current_status(conn, message_id)


def deliver_now(services: Services, message_id: str, *, timeout: float = 3.0) -> str:
    """Try delivery right away (e.g. just after an approval) and wait at most ``timeout`` s.

    Call it after the caller's transaction has committed. Returns the message's status:
    ``delivered`` when the relay accepted it in time, else ``queued``/``sending``/
    ``deferred``/... A slower relay loses nothing: the attempt goes on in the background,
    and the job stays leased to it, so no background worker sends it a second time. The
    claim and the start share one commit, and so do the outcome and the job's completion.
    """
    deadline = time.monotonic() + timeout
    worker = f"deliver-now:{os.getpid()}:{threading.get_ident()}:{new_id('job')[-6:]}"
    finished = threading.Event()

    async def attempt() -> None:
        try:
            await _run_batch(services, worker, _claim_for_now(message_id, worker), [message_id])
        finally:
            finished.set()  # the outcome is committed: the caller need not wait for the QUIT
            # This loop ends here: its sessions cannot serve another one.
            await _close_sessions(services)

    def run() -> None:
        try:
            asyncio.run(attempt())
        except Exception:
            _log.exception("delivering %s right away failed; the job will retry", message_id)
        finally:
            finished.set()

    threading.Thread(target=run, name=f"deliver-now-{message_id}", daemon=True).start()
    finished.wait(max(0.0, deadline - time.monotonic()))
    status = _status(services, message_id)
    # Only another worker's attempt in flight is worth waiting for; a message still queued
    # after our attempt ended is held (paused account or mailbox) and will not move soon.
    while status == "sending" and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        status = _status(services, message_id)
    return status


# -- the sweep: nothing deliverable is left without a job --------------------------------------


def _sweep(services: Services, job: Job, worker_id: str) -> None:
    cutoff = utcnow() - _SWEEP_AFTER
    live = jobs_table.alias("live")
    with services.db.write() as conn:
        rows = conn.execute(
            select(messages.c.id)
            .join(mailboxes, mailboxes.c.id == messages.c.mailbox_id)
            .join(accounts, accounts.c.id == messages.c.account_id)
            .outerjoin(
                live,
                and_(
                    live.c.dedupe_key == literal("deliver:") + messages.c.id,
                    live.c.status.in_(("pending", "running")),
                ),
            )
            .where(
                messages.c.direction == "outbound",
                messages.c.status.in_([s.value for s in DELIVERABLE]),
                messages.c.updated_at < cutoff,
                mailboxes.c.paused.is_(False),
                accounts.c.paused.is_(False),
                live.c.id.is_(None),
            )
            .limit(_SWEEP_BATCH)
        ).all()
        for (message_id,) in rows:
            enqueue_delivery(conn, message_id)
    if rows:
        _log.info("delivery sweep re-armed %d message(s)", len(rows))
        runner.wake()


runner.register(SWEEP)(_sweep)
runner.on_stop(_close_sessions)
runner.on_stop(composer.close_compose_pool)
runner.every(SWEEP, 60)


# -- operator mail ------------------------------------------------------------------------------


def _system_actor(worker_id: str, account_id: str | None) -> Actor:
    return Actor(type="system", id=worker_id, name="system-mail", account_id=account_id)


def _system_payload(job: Job) -> tuple[list[str], str, str, str | None]:
    payload = job.payload
    to = payload.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to:
        raise InvalidInput("a system_mail job needs 'to'", code="invalid_job")
    account_id = payload.get("account_id")
    return (
        _addresses(to),
        str(payload.get("subject") or ""),
        str(payload.get("markdown") or ""),
        account_id if isinstance(account_id, str) else None,
    )


def _approval_request_mail(services: Services, job: Job, message_id: str) -> tuple[str, str] | str:
    """The request's ``(subject, markdown)``, or why none is sent."""
    with services.db.read() as conn:
        # Each edit of a waiting draft queues another request, and each is written when it
        # is sent, showing the draft as it is then: only the newest one still says anything.
        later = conn.execute(
            select(jobs_table.c.payload).where(
                jobs_table.c.kind == SYSTEM_MAIL,
                jobs_table.c.status == "pending",
                jobs_table.c.id > job.id,
            )
        )
        if any(
            isinstance(payload, dict)
            and payload.get("kind") == notify.APPROVAL_REQUEST_KIND
            and payload.get("message_id") == message_id
            for (payload,) in later
        ):
            return "a newer approval request for this message follows"
        written = notify.approval_request_mail(conn, services, message_id)
        return "the message no longer waits for a decision" if written is None else written


def _system_raw(services: Services, job: Job, to: list[str], subject: str, body: str) -> bytes:
    settings = services.settings
    draft = OutboundDraft(
        from_address=f"{SYSTEM_SENDER_LOCAL}@{settings.domain}",
        from_name="MultiMail",
        to=to,
        cc=(),
        reply_to=None,
        subject=subject,
        markdown=body,
        # Derived from the job: stable across retries, so receivers can drop a duplicate.
        message_id=f"<{job.id}.system@{settings.domain}>",
        date=utcnow(),
        ai_disclosure=False,
        extra_headers=[("Auto-Submitted", "auto-generated")],
    )
    return signing.sign(build_message(draft), signing.default_key(services))


def _system_unsuppressed(services: Services, account_id: str | None, to: list[str]) -> list[str]:
    if account_id is None:
        return to
    with services.db.read() as conn:
        suppressed = directory.suppressed_among(conn, account_id, to)
    return [a for a in to if a not in suppressed]


def _system_record(
    services: Services,
    job: Job,
    worker_id: str,
    account_id: str | None,
    action: str,
    details: dict[str, Any],
    remaining: list[str] | None = None,
) -> None:
    with services.db.write() as conn:
        audit.append(
            conn,
            actor=_system_actor(worker_id, account_id),
            action=action,
            account_id=account_id,
            subject_type="job",
            subject_id=job.id,
            details=details,
        )
        if remaining is not None:
            conn.execute(
                update(jobs_table)
                .where(jobs_table.c.id == job.id, jobs_table.c.locked_by == worker_id)
                .values(payload={**job.payload, "to": remaining})
            )


@runner.register(SYSTEM_MAIL)
async def _system_mail_job(services: Services, job: Job, worker_id: str) -> datetime | None:
    """Operator notifications, from ``multimail@<domain>`` with the null sender.

    The null reverse-path (``MAIL FROM:<>``) means a bounce of this mail is never answered
    with more mail, and a bounce of a bounce cannot happen.
    """
    to, subject, body, account_id = _system_payload(job)
    message_id = job.payload.get("message_id")
    # The audit entries are about the job; one naming a message is found from it too.
    about = {"message_id": message_id} if isinstance(message_id, str) else {}

    async def record(
        action: str, details: dict[str, Any], remaining: list[str] | None = None
    ) -> None:
        await asyncio.to_thread(
            _system_record,
            services,
            job,
            worker_id,
            account_id,
            action,
            {**details, **about},
            remaining,
        )

    if (
        job.payload.get("kind") == notify.APPROVAL_REQUEST_KIND
        and isinstance(message_id, str)
        and not body
    ):
        # The send only recorded that a decision is asked for; the mail is written now, so
        # its links start their 72 hours when it goes out and a decided message gets none.
        written = await asyncio.to_thread(_approval_request_mail, services, job, message_id)
        if isinstance(written, str):
            await record(
                "system_mail.skipped",
                {"to": to, "reason": written},
            )
            return None
        subject, body = written
    rcpts = await asyncio.to_thread(_system_unsuppressed, services, account_id, to)
    if not rcpts:
        await record(
            "system_mail.skipped",
            {"to": to, "subject": subject, "reason": "every recipient is suppressed"},
        )
        return None
    # A non-delivery report is an RFC 3464 message of its own, not composed from markdown.
    report = notify.non_delivery_raw(services, job.payload)
    raw = (
        signing.sign(report, signing.default_key(services))
        if report is not None
        else _system_raw(services, job, rcpts, subject, body)
    )
    plan = _Plan(job.id, account_id or "", "", "", rcpts, raw)
    handover = await _hand_over(outbound_transport(services), plan)
    accepted = [r for r, res in handover.results.items() if res.ok]
    refused = [r for r, res in handover.results.items() if not res.ok and res.permanent]
    deferred = [r for r, res in handover.results.items() if not res.ok and not res.permanent]
    expired = utcnow() - job.created_at >= MAX_RETRY_WINDOW or job.attempts >= job.max_attempts
    if accepted:
        await record(
            "system_mail.sent",
            {"to": accepted, "subject": subject, "kind": job.payload.get("kind")},
        )
    if refused or (deferred and expired):
        failed = refused + (deferred if expired else [])
        await record(
            "system_mail.failed",
            {
                "to": failed,
                "subject": subject,
                "reason": next(handover.results[r].message for r in failed)[:500],
            },
        )
    if deferred and not expired:
        await record(
            "system_mail.deferred",
            {"to": deferred, "subject": subject},
            deferred,
        )
        return utcnow() + retry_delay(job.attempts)
    return None


# -- the sandbox ------------------------------------------------------------------------------


def list_captured(
    services: Services, actor: Actor, *, mailbox_id: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Messages sent with test keys: run through the whole pipeline, captured, never sent."""
    actor.require(Scope.READ)
    query = (
        select(messages)
        .where(
            messages.c.account_id == actor.account_id,
            messages.c.direction == "outbound",
            messages.c.test.is_(True),
            messages.c.status == Status.DELIVERED.value,
        )
        .order_by(messages.c.id.desc())
        .limit(max(1, min(int(limit), 200)))
    )
    if mailbox_id is not None:
        query = query.where(messages.c.mailbox_id == mailbox_id)
    if actor.mailbox_ids is not None:
        query = query.where(messages.c.mailbox_id.in_(actor.mailbox_ids))
    with services.db.read() as conn:
        rows: list[Mapping[str, Any]] = [dict(r) for r in conn.execute(query).mappings()]
        views = message_views.views(conn, rows)
    for item, row in zip(views, rows, strict=True):
        item["captured"] = True
        item["captured_at"] = item.get("delivered_at")
        item["raw"] = (row["raw"] or b"").decode("utf-8", "replace")
    return views
