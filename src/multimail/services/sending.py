"""The send path: a request becomes one message, scanned, gated and queued in one transaction.

``send`` and ``reply`` check the request in a fixed order, each refusal with its own ``code``
(scope, unknown fields, the mailbox, its mode, the sending domain, recipients and sizes, send
caps and quota, repeated replies), then write the thread, the message, its attachments, the
audit entries, the events and the delivery or release job together: a message exists exactly
when everything it needs does.

Idempotency keys (24 h) are inserted first in that same transaction, so the unique constraint
decides which of many concurrent duplicates creates the message; the others answer with the
winner's message as it is now. A test key's sends have a key space of their own, and a
request refused as it stands (its ``send_at`` passed meanwhile) still replays the message it
created before.

``release_scheduled`` is what the job runner calls when a ``scheduled`` message's time comes;
``cancel`` and ``edit_scheduled`` change messages that have not passed the gate yet. Every
status change asks ``domain.oversight.check_transition`` and is a guarded UPDATE.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import logging
import math
import mimetypes
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    Connection,
    Select,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from multimail.domain.addresses import domain_of, matches_pattern
from multimail.domain.oversight import (
    CANCELLABLE,
    PAST_THE_GATE,
    GateTiming,
    OversightMode,
    Status,
    check_transition,
    effective_mode,
    first_outbound_status,
    outbound_is_gated,
    parse_mode,
    stricter,
)
from multimail.domain.scan import Finding, ScanAttachment, ScanInput, blocking, scan
from multimail.domain.scopes import Scope, satisfies
from multimail.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    MultimailError,
    NotFound,
    RateLimited,
    TooLarge,
)
from multimail.ids import aware, isoformat, new_id, parse_datetime, utcnow
from multimail.mail.compose import (
    MAX_SUBJECT_CHARS,
    attachment_content_type,
    attachment_filename,
    check_message_id,
    plain_address,
    safe_subject,
)
from multimail.mail.htmlmd import html_to_markdown
from multimail.mail.markdown import RenderedBody, render_markdown
from multimail.services import audit, directory, events, mailboxes, notify, threads
from multimail.services import messages as message_views
from multimail.services.context import Actor, Services
from multimail.store import fast, jobs
from multimail.store.db import Database
from multimail.store.tables import (
    accounts,
    api_keys,
    attachments,
    domains,
    idempotency_keys,
    mailbox_allowlist,
    messages,
)
from multimail.store.tables import (
    jobs as job_rows,
)
from multimail.store.tables import (
    mailboxes as mailbox_rows,
)
from multimail.store.tables import (
    suppressions as suppression_rows,
)
from multimail.store.tables import (
    webhooks as webhook_rows,
)

_log = logging.getLogger(__name__)

__all__ = [
    "AttachmentIn",
    "Gate",
    "ScheduleEdit",
    "SendRequest",
    "SendResult",
    "admits_in_shared_commit",
    "cancel",
    "edit_scheduled",
    "release_scheduled",
    "reply",
    "reply_admitting",
    "schedule_release",
    "send",
    "send_admitting",
    "send_in_shared_commit",
]

MAX_MARKDOWN_CHARS = 262_144
MAX_METADATA_BYTES = 16 * 1024
IDEMPOTENCY_TTL = timedelta(hours=24)
DUPLICATE_REPLY_WINDOW = timedelta(seconds=60)
MAX_SCHEDULE_AHEAD = timedelta(days=366)
MAX_REFERENCES = 30
_ROUTING_FIELDS = frozenset({"from_", "mailbox_id", "idempotency_key"})

AddressInput = list[str] | str | None


class AttachmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=255)
    filename: str | None = Field(None, max_length=255)
    content_base64: str | None = None
    content: str | None = Field(None, description="alias of content_base64")
    content_type: str | None = Field(None, max_length=255)


class SendRequest(BaseModel):
    """A send or reply as callers write it (SPEC §5.1); unknown fields are refused by the service.

    Extra fields are kept rather than refused by validation so the service can refuse them with
    ``unknown_fields`` and audit the attempt (``status: "approved"`` is a bypass attempt).
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    from_: str | None = Field(None, alias="from", description="the mailbox address (short forms)")
    mailbox_id: str | None = None
    to: AddressInput = None
    cc: AddressInput = None
    bcc: AddressInput = None
    reply_to: AddressInput = None
    subject: str | None = None
    markdown: str | None = None
    text: str | None = None
    body: str | None = None
    html: str | None = None
    attachments: list[AttachmentIn] | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)
    send_at: str | None = Field(None, description="ISO 8601; in the future, within a year")
    gate_timing: str | None = None
    oversight_mode: str | None = None
    thread_id: str | None = None
    metadata: dict[str, Any] | None = None


class ScheduleEdit(BaseModel):
    """Changes to a message that has not passed the gate (PATCH …/schedule)."""

    model_config = ConfigDict(extra="allow")

    send_at: str | None = None
    to: AddressInput = None
    cc: AddressInput = None
    bcc: AddressInput = None
    subject: str | None = None
    markdown: str | None = None
    text: str | None = None
    body: str | None = None
    html: str | None = None


@dataclass(frozen=True)
class SendResult:
    """The response body, and whether this call created the message (False: idempotent replay)."""

    response: dict[str, Any]
    created: bool


@dataclass(frozen=True)
class _Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class _Draft:
    to: list[str]
    cc: list[str]
    bcc: list[str]
    reply_to: list[str]
    subject: str | None
    markdown: str | None
    attachments: list[_Attachment]
    send_at: datetime | None
    gate_timing: GateTiming | None
    mode: OversightMode | None
    thread_id: str | None
    metadata: dict[str, Any] | None
    idempotency_key: str | None


# --- parsing ---------------------------------------------------------------------------------


def _address(item: str, field: str) -> str:
    return plain_address(item, field)


def _addresses(value: AddressInput, field: str) -> list[str]:
    if value is None:
        return []
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
    # A dict keeps the first occurrence's order and dedupes in constant time per address
    # (a list's ``in`` made a long recipient list quadratic, before the key was checked).
    out: dict[str, None] = {}
    for item in items:
        if not item:
            continue
        out[_address(item, field)] = None
    return list(out)


_BODY_FIELDS = ("markdown", "text", "body", "html")


def _body_of(model: SendRequest | ScheduleEdit) -> str | None:
    """The body as markdown: ``markdown`` (``text`` and ``body`` are other names for it), or
    ``html`` converted. Fields that would make two different bodies are refused
    (``ambiguous_body``), never one of them dropped unseen."""
    given = {name: getattr(model, name) for name in _BODY_FIELDS}
    given = {name: value for name, value in given.items() if value is not None}
    named = " and ".join(repr(name) for name in given)
    if "html" in given and len(given) > 1:
        # One body makes both parts: the text part is the markdown, the HTML part its
        # rendering. A text and an HTML rendering given together cannot both be sent.
        raise InvalidInput(
            f"{named} were given together, but a message has one body: MultiMail writes its "
            "text and its HTML part from it. Send the body in 'markdown' (links and "
            "formatting as Markdown), or the HTML alone in 'html'",
            code="ambiguous_body",
            fields=list(given),
        )
    if len(set(given.values())) > 1:
        raise InvalidInput(
            f"{named} give different bodies; they are names for the same field (the "
            "message's markdown): send the body in one of them",
            code="ambiguous_body",
            fields=list(given),
        )
    if "html" in given:
        return html_to_markdown(given["html"])
    return next(iter(given.values()), None)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_body(markdown: str | None) -> str | None:
    if markdown is not None and len(markdown) > MAX_MARKDOWN_CHARS:
        raise InvalidInput(
            f"the body is {len(markdown)} characters; at most {MAX_MARKDOWN_CHARS} are allowed",
            code="body_too_long",
            limit=MAX_MARKDOWN_CHARS,
        )
    if markdown is not None and _LONE_SURROGATE.search(markdown):
        # The HTTP edge refuses these already; MCP and the CLI call in-process, and such a
        # body could be stored but never encoded for the wire or a response.
        raise InvalidInput(
            "the body contains an unpaired UTF-16 surrogate: send valid Unicode (text cut in "
            "the middle of an emoji must be cut before or after it)",
            code="invalid_text",
        )
    return markdown


def _check_subject(subject: str | None) -> str | None:
    if subject is None:
        return None
    if len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidInput(
            f"the subject is {len(subject)} characters; at most {MAX_SUBJECT_CHARS} are allowed",
            code="subject_too_long",
            limit=MAX_SUBJECT_CHARS,
        )
    return safe_subject(subject)


def _send_at(value: str | None, now: datetime) -> datetime | None:
    if value is None:
        return None
    try:
        when = parse_datetime(value)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"send_at {value!r} is not an ISO 8601 time such as 2030-01-31T09:00:00Z",
            code="invalid_send_at",
        ) from None
    if when <= now:
        raise InvalidInput(
            "send_at is in the past; leave it out to send now", code="send_at_in_past"
        )
    if when > now + MAX_SCHEDULE_AHEAD:
        raise InvalidInput("send_at may be at most a year ahead", code="send_at_too_far")
    return when


def _attachments(items: list[AttachmentIn] | None) -> list[_Attachment]:
    """The attachments as the message will carry them: the composer's own rules decide
    what a name and a content type may be, and the name stored (shown to the reviewer,
    scanned, sent) is the one mail programs will show, RFC 2047 encoded-words decoded."""
    out = []
    for index, item in enumerate(items or []):
        given = item.name or item.filename or ""
        try:
            name = attachment_filename(given)
        except InvalidInput:
            raise InvalidInput(
                f"attachment {index + 1} needs a plain file 'name' (no slashes, line breaks "
                "or control characters, at most 255 characters)",
                code="invalid_attachment",
            ) from None
        encoded = item.content_base64 if item.content_base64 is not None else item.content
        if encoded is None:
            raise InvalidInput(
                f"attachment {name!r} has no content_base64", code="invalid_attachment"
            )
        try:
            data = base64.b64decode("".join(encoded.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(
                f"attachment {name!r}: content_base64 is not valid base64",
                code="invalid_base64",
            ) from None
        ctype = item.content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        try:
            ctype = attachment_content_type(ctype)
        except InvalidInput as exc:
            raise InvalidInput(
                f"attachment {name!r}: {exc.message}", code=exc.code, **exc.context
            ) from None
        out.append(_Attachment(name, ctype, data))
    return out


def _parse(request: SendRequest, now: datetime) -> _Draft:
    mode = None
    if request.oversight_mode is not None:
        try:
            mode = parse_mode(request.oversight_mode)
        except ValueError as exc:
            raise InvalidInput(str(exc), code="invalid_oversight_mode") from None
    timing = None
    if request.gate_timing is not None:
        try:
            timing = GateTiming(request.gate_timing)
        except ValueError:
            raise InvalidInput(
                "gate_timing must be 'gate_first' or 'schedule_first'", code="invalid_gate_timing"
            ) from None
    if request.metadata is not None:
        try:
            # allow_nan=False: NaN and Infinity are not JSON; ensure_ascii=False and encode():
            # a lone surrogate cannot be UTF-8. Stored, either would fail every later reading
            # of the message (the 202 itself, webhooks, the API). Callers other than HTTP
            # (MCP, the CLI in-process) reach this without the API's body checks.
            text = json.dumps(request.metadata, default=str, allow_nan=False, ensure_ascii=False)
            size = len(text.encode())
        except UnicodeEncodeError as exc:
            raise InvalidInput(
                f"metadata contains an unpaired UTF-16 surrogate "
                f"(\\u{ord(exc.object[exc.start]):04x}): send valid Unicode",
                code="invalid_metadata",
            ) from None
        except ValueError:
            raise InvalidInput(
                "metadata may not hold NaN or infinite numbers (they are not JSON); send "
                "them as strings or null",
                code="invalid_metadata",
            ) from None
        if size > MAX_METADATA_BYTES:
            raise InvalidInput(
                f"metadata is {size} bytes of JSON; at most {MAX_METADATA_BYTES} are allowed",
                code="metadata_too_large",
            )
    return _Draft(
        to=_addresses(request.to, "to"),
        cc=_addresses(request.cc, "cc"),
        bcc=_addresses(request.bcc, "bcc"),
        reply_to=_addresses(request.reply_to, "reply_to"),
        subject=_check_subject(request.subject),
        markdown=_check_body(_body_of(request)),
        attachments=_attachments(request.attachments),
        send_at=_send_at(request.send_at, now),
        gate_timing=timing,
        mode=mode,
        thread_id=request.thread_id,
        metadata=request.metadata,
        idempotency_key=request.idempotency_key,
    )


@dataclass(frozen=True)
class _RequestHash:
    """What a send asked for, hashed. ``current`` is what is stored; ``legacy`` is the hash of
    the caller's spelling that earlier releases stored, which rows written before still hold
    for their 24 hours."""

    current: str
    legacy: str

    def matches(self, stored: str) -> bool:
        return stored in (self.current, self.legacy)


def _hash_of(mailbox_id: str, reply_to: str | None, body: Mapping[str, Any]) -> str:
    canonical = json.dumps(
        {"mailbox": mailbox_id, "reply_to_email": reply_to, "body": body},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _request_hash(request: SendRequest, mailbox_id: str, reply_to: str | None) -> _RequestHash:
    """The request's meaning, not its spelling: ``"to": "a@x"`` is ``["a@x"]``, and ``body`` or
    ``text`` is ``markdown`` (the one the service takes), so the same JSON retried on
    ``/send_email`` (which folds them first) replays a send made on ``/v1/send``."""
    body = request.model_dump(mode="json", exclude_none=True, exclude=set(_ROUTING_FIELDS))
    meaning = dict(body)
    for field in ("to", "cc", "bcc", "reply_to"):
        if isinstance(meaning.get(field), str):
            meaning[field] = [meaning[field]]
    texts = [meaning.pop(k) for k in ("markdown", "text", "body") if meaning.get(k) is not None]
    if texts:
        meaning["markdown"] = texts[0]
    return _RequestHash(
        current=_hash_of(mailbox_id, reply_to, meaning), legacy=_hash_of(mailbox_id, reply_to, body)
    )


def _bypass_refusal(
    conn: Connection, actor: Actor, extra: Mapping[str, Any], action: str
) -> InvalidInput:
    """Record the attempt in ``conn``'s transaction; the refusal to raise once it commits."""
    names = sorted(extra)
    audit.append(
        conn,
        actor=actor,
        action="message.bypass_attempt",
        subject_type="request",
        subject_id=action,
        details={"unknown_fields": names},
    )
    return InvalidInput(
        f"unknown field(s): {', '.join(names)}; a message's status and oversight are set by "
        "MultiMail, never by the sender",
        code="unknown_fields",
        fields=names,
    )


def _refuse_unknown(
    services: Services, actor: Actor, extra: Mapping[str, Any] | None, action: str
) -> None:
    """Fields we do not know are refused, and recorded: ``status: approved`` is an attack."""
    if not extra:
        return
    with services.db.write() as conn:
        refusal = _bypass_refusal(conn, actor, extra, action)
    raise refusal


# --- checks that need the database -----------------------------------------------------------


def _choose_mailbox(
    conn: Connection, actor: Actor, refs: Sequence[str | None]
) -> dict[str, Any] | None:
    """The mailbox named (by path, ``from`` or ``mailbox_id``); they must agree."""
    chosen: dict[str, Any] | None = None
    for ref in refs:
        if not ref:
            continue
        row = mailboxes.resolve(conn, actor, ref)
        if chosen is not None and chosen["id"] != row["id"]:
            raise InvalidInput(
                f"'from' / 'mailbox_id' name {row['address']}, but the request is for "
                f"{chosen['address']}",
                code="from_mismatch",
            )
        chosen = row
    return chosen


def _only_mailbox(conn: Connection, actor: Actor) -> dict[str, Any]:
    listed = mailboxes.list_mailboxes(conn, actor)
    if len(listed) != 1:
        raise InvalidInput(
            "say which mailbox sends this: give 'from' (its address) or 'mailbox_id'",
            code="mailbox_required",
        )
    return mailboxes.resolve(conn, actor, listed[0]["id"])


def _stored_key(key: str, test_mode: bool) -> str:
    """The idempotency key as stored. A test key's sends have a key space of their own: a
    live send must never be answered by a sandbox rehearsal that used the same key (keys
    are often derived from CRM ids, the same in both). Live keys are stored as given, as
    they always were; test keys as a digest under a prefix, which fits the column whatever
    the key's length. Rows of test sends written before under the plain key are told apart
    by their message (see ``_replay``)."""
    if not test_mode:
        return key
    return "mm_test:" + hashlib.sha256(key.encode()).hexdigest()


def _key_row(conn: Connection, account_id: str, stored: str) -> Any:
    return (
        conn.execute(
            select(idempotency_keys).where(
                idempotency_keys.c.account_id == account_id, idempotency_keys.c.key == stored
            )
        )
        .mappings()
        .first()
    )


def _replay(
    conn: Connection, row: Mapping[str, Any], request_hash: _RequestHash, test_mode: bool
) -> dict[str, Any] | None:
    """The answer to a repeated key: the original message as it is now (its status may
    have moved on since: approved, cancelled, delivered), with ``"idempotent": true``.
    None when the row belongs to the other mode (a test send stored under the plain key
    before test keys had their own space). Refuses a key reused for another request."""
    message: dict[str, Any] | None = None
    if row["message_id"] is not None:
        found = conn.execute(select(messages).where(messages.c.id == row["message_id"]))
        current = found.mappings().first()
        message = dict(current) if current is not None else None
    stored = dict(row["response"] or {})
    was_test = bool(message["test"]) if message is not None else bool(stored.get("test"))
    if was_test and not test_mode:
        return None
    if not request_hash.matches(row["request_hash"]) or was_test != test_mode:
        raise InvalidInput(
            "this idempotency_key was already used with a different request; use a new key "
            "for a different message",
            code="idempotency_key_reused",
        )
    if message is None:
        return stored | {"idempotent": True}  # the message is gone: what was answered then
    thread_ids = message_views.public_thread_ids(conn, [message["thread_id"]])
    return _summary(message, thread_ids.get(message["thread_id"] or "")) | {"idempotent": True}


def _find_replay(
    conn: Connection,
    account_id: str,
    key: str,
    request_hash: _RequestHash,
    now: datetime,
    test_mode: bool,
) -> dict[str, Any] | None:
    """The replay of an earlier send with this key and request, if there is one; nothing
    is written (for a request that would be refused, see ``_write_send``)."""
    row = _key_row(conn, account_id, _stored_key(key, test_mode))
    if (
        row is None
        or aware(row["expires_at"]) <= now
        or not request_hash.matches(row["request_hash"])
    ):
        return None
    return _replay(conn, row, request_hash, test_mode)


def _claim_idempotency(
    conn: Connection,
    account_id: str,
    key: str,
    request_hash: _RequestHash,
    now: datetime,
    test_mode: bool,
) -> dict[str, Any] | None:
    """None when this call owns the key; the original message when it is a replay."""
    stored = _stored_key(key, test_mode)
    row = _key_row(conn, account_id, stored)
    if row is not None:
        if aware(row["expires_at"]) > now:
            replay = _replay(conn, row, request_hash, test_mode)
            if replay is not None:
                return replay
        # Expired, or a test send's row under the plain key (see _stored_key): not ours.
        conn.execute(
            delete(idempotency_keys).where(
                idempotency_keys.c.account_id == account_id, idempotency_keys.c.key == stored
            )
        )
    try:
        with conn.begin_nested():
            conn.execute(
                insert(idempotency_keys).values(
                    account_id=account_id,
                    key=stored,
                    request_hash=request_hash.current,
                    created_at=now,
                    expires_at=now + IDEMPOTENCY_TTL,
                )
            )
    except IntegrityError:
        # A concurrent duplicate committed first (PostgreSQL waits for it on the unique index).
        row = _key_row(conn, account_id, stored)
        if row is None:
            raise
        replay = _replay(conn, row, request_hash, test_mode)
        if replay is None:
            raise
        return replay
    return None


def _check_domain(
    conn: Connection, services: Services, actor: Actor, mailbox: Mapping[str, Any]
) -> None:
    if actor.test_mode:
        return  # test keys capture instead of delivering: any owned address may play
    domain = domain_of(mailbox["address"])
    if domain == services.settings.domain.lower():
        return
    row = conn.execute(
        select(domains.c.status).where(
            domains.c.account_id == mailbox["account_id"], domains.c.name == domain
        )
    ).first()
    if row is None or row.status != "verified":
        raise Forbidden(
            f"{mailbox['address']} is on {domain}, which is not verified yet; publish the DNS "
            f"records from GET /v1/domains and call POST /v1/domains/{{id}}/verify, or send "
            "with a mm_test_ key meanwhile",
            code="domain_not_verified",
            domain=domain,
        )


def _enforce_window(
    conn: Connection, condition: Any, cap: int, window: timedelta, now: datetime, what: str
) -> None:
    rows = conn.execute(
        select(messages.c.created_at)
        .where(condition, messages.c.direction == "outbound", messages.c.created_at > now - window)
        .order_by(messages.c.created_at.desc())
        .limit(max(cap, 1))
    ).all()
    if len(rows) < cap:
        return
    # When the cap-th newest message leaves the window, one more send fits.
    frees_at = aware(rows[cap - 1].created_at) + window if cap > 0 else now + window
    retry_after = max(1, math.ceil((frees_at - now).total_seconds()))
    raise RateLimited(
        f"{what}; retry after {retry_after} s",
        retry_after=retry_after,
        code="send_cap_exceeded",
        cap=cap,
        window=what.rsplit(" ", 1)[-1],
    )


@dataclass(frozen=True)
class _Limits:
    """The account's and the sending key's numbers a send needs, read in one query."""

    daily_send_quota: int | None
    oversight_email: str | None
    key_cap_hour: int | None
    key_cap_day: int | None
    # Read with the mailbox when it is named by id (None: not read, ask the database):
    # its allowlist patterns, and whether any webhook could receive its events.
    allowlist: tuple[str, ...] | None = None
    webhooks_possible: bool | None = None
    # Of the (lower-cased) addresses asked about with the mailbox, those suppressed.
    suppression_asked: frozenset[str] = frozenset()
    suppressed: frozenset[str] = frozenset()


_LIMITS = (
    select(
        accounts.c.daily_send_quota,
        accounts.c.oversight_email,
        api_keys.c.send_cap_hour,
        api_keys.c.send_cap_day,
    )
    .select_from(accounts.outerjoin(api_keys, api_keys.c.id == bindparam("key_id")))
    .where(accounts.c.id == bindparam("account_id"))
)


# The usual send names its mailbox by id in the path: the mailbox and the limits in one
# prebuilt query (what ``mailboxes.resolve`` and ``_limits`` read, in one round trip).
_LIMIT_LABELS = (
    "lim_daily_send_quota",
    "lim_oversight_email",
    "lim_key_cap_hour",
    "lim_key_cap_day",
)
_ALLOWLIST_LABEL = "lim_allowlist"
_WEBHOOKS_LABEL = "lim_webhooks"
# Patterns cannot hold a line break (they are addresses or *@domain).
_ALLOWLIST_OF_MAILBOX = (
    select(func.aggregate_strings(mailbox_allowlist.c.pattern, "\n"))
    .where(mailbox_allowlist.c.mailbox_id == mailbox_rows.c.id)
    .scalar_subquery()
)
# Any subscription that could match the mailbox's events (what events.emit would read).
_WEBHOOKS_OF_MAILBOX = exists().where(
    or_(
        and_(
            webhook_rows.c.account_id == mailbox_rows.c.account_id,
            webhook_rows.c.mailbox_id.is_(None),
        ),
        webhook_rows.c.mailbox_id == mailbox_rows.c.id,
    )
)
_SUPPRESSED_LABEL = "lim_suppressed"
# Recipients the request names, asked about with the mailbox (up to this many; auto_cc,
# auto_bcc and reply recipients, known only later, are asked about separately).
_SUPPRESSED_WITH_MAILBOX = 8


def _mailbox_and_limits_query(asked: int, locked: bool) -> Select[Any]:
    columns: list[Any] = [
        mailbox_rows,
        accounts.c.daily_send_quota.label(_LIMIT_LABELS[0]),
        accounts.c.oversight_email.label(_LIMIT_LABELS[1]),
        api_keys.c.send_cap_hour.label(_LIMIT_LABELS[2]),
        api_keys.c.send_cap_day.label(_LIMIT_LABELS[3]),
        _ALLOWLIST_OF_MAILBOX.label(_ALLOWLIST_LABEL),
        _WEBHOOKS_OF_MAILBOX.label(_WEBHOOKS_LABEL),
    ]
    if asked:
        # What _suppressed_among would answer for these addresses (one bind each).
        suppressed = (
            select(func.aggregate_strings(suppression_rows.c.address, "\n"))
            .where(
                suppression_rows.c.account_id == mailbox_rows.c.account_id,
                suppression_rows.c.address.in_([bindparam(f"s{i}") for i in range(asked)]),
            )
            .scalar_subquery()
        )
        columns.append(suppressed.label(_SUPPRESSED_LABEL))
    query = (
        select(*columns)
        .select_from(
            mailbox_rows.join(accounts, accounts.c.id == mailbox_rows.c.account_id).outerjoin(
                api_keys, api_keys.c.id == bindparam("key_id")
            )
        )
        .where(
            mailbox_rows.c.id == bindparam("mailbox_id"),
            mailbox_rows.c.account_id == bindparam("account_id"),
            mailbox_rows.c.deleted_at.is_(None),
        )
    )
    # PostgreSQL: the mailbox row locked at once (see ``_write_send``), not read and re-read.
    return query.with_for_update(of=mailbox_rows) if locked else query


_MAILBOX_AND_LIMITS = {
    (asked, locked): fast.Compiled(_mailbox_and_limits_query(asked, locked))
    for asked in range(_SUPPRESSED_WITH_MAILBOX + 1)
    for locked in (False, True)
}


def _mailbox_and_limits(
    conn: Connection, actor: Actor, mailbox_id: str, recipients: Sequence[str] = ()
) -> tuple[dict[str, Any], _Limits]:
    """``mailboxes.resolve(conn, actor, mailbox_id, for_update=True)`` and ``_limits`` in one
    query, with which of ``recipients`` (the request's own) are suppressed."""
    key_id = actor.id if actor.type == "key" else None
    params: dict[str, Any] = {
        "mailbox_id": mailbox_id,
        "account_id": actor.account_id,
        "key_id": key_id,
    }
    asked = list(dict.fromkeys(a.lower() for a in recipients))
    if len(asked) > _SUPPRESSED_WITH_MAILBOX:
        asked = []
    params.update((f"s{i}", address) for i, address in enumerate(asked))
    query = _MAILBOX_AND_LIMITS[(len(asked), conn.dialect.name == "postgresql")]
    row = query.first(conn, params)
    if row is None or (actor.mailbox_ids is not None and row["id"] not in actor.mailbox_ids):
        raise NotFound(f"mailbox {mailbox_id!r} not found", code="mailbox_not_found")
    patterns = row.pop(_ALLOWLIST_LABEL)
    suppressed = row.pop(_SUPPRESSED_LABEL, None)
    quota, oversight_email, cap_hour, cap_day = (row.pop(label) for label in _LIMIT_LABELS)
    limits = _Limits(
        quota,
        oversight_email,
        cap_hour,
        cap_day,
        allowlist=tuple(patterns.split("\n")) if patterns else (),
        webhooks_possible=bool(row.pop(_WEBHOOKS_LABEL)),
        suppression_asked=frozenset(asked),
        suppressed=frozenset(suppressed.split("\n")) if suppressed else frozenset(),
    )
    return row, limits


def _limits(conn: Connection, actor: Actor, account_id: str) -> _Limits:
    key_id = actor.id if actor.type == "key" else None
    row = conn.execute(_LIMITS, {"account_id": account_id, "key_id": key_id}).first()
    if row is None:
        return _Limits(None, None, None, None)
    return _Limits(row.daily_send_quota, row.oversight_email, row.send_cap_hour, row.send_cap_day)


# PostgreSQL: the rows a key's caps and the account's daily quota are counted under, locked
# before counting so that concurrent sends through one key (or one account) to different
# mailboxes count each other's committed messages. FOR NO KEY UPDATE: it serialises these
# sends without blocking the foreign-key checks of rows that reference the key or account.
_LOCK_KEY = fast.Compiled(
    select(api_keys.c.id)
    .where(api_keys.c.id == bindparam("key_id"))
    .with_for_update(key_share=True)
)
_LOCK_ACCOUNT = fast.Compiled(
    select(accounts.c.id)
    .where(accounts.c.id == bindparam("account_id"))
    .with_for_update(key_share=True)
)


def _lock_counted(conn: Connection, actor: Actor, account_id: str, limits: _Limits) -> None:
    """Lock what ``_check_caps`` and ``_check_quota`` count under, only when they will count.

    The send's lock order is the mailbox row (``_targets``), then the API key, then the
    account, then what the send writes (idempotency key, thread, audit chain); nothing else
    locks a mailbox after a key or an account. Taken before anything the send writes, so a
    send waiting here holds no row of its own that another send could be waiting for."""
    if conn.dialect.name != "postgresql":
        return  # SQLite serialises writers
    if _key_capped(actor, limits):
        _LOCK_KEY.first(conn, {"key_id": actor.id})
    if not actor.test_mode and limits.daily_send_quota is not None:
        _LOCK_ACCOUNT.first(conn, {"account_id": account_id})


def _key_capped(actor: Actor, limits: _Limits) -> bool:
    return (
        actor.type == "key"
        and bool(actor.id)
        and (limits.key_cap_hour is not None or limits.key_cap_day is not None)
    )


# Built once: composing the clause on every send cost ~0.1 ms though most mailboxes have no cap.
_SAME_KIND = {flag: messages.c.test.is_(flag) for flag in (False, True)}


def _check_caps(
    conn: Connection, actor: Actor, mailbox: Mapping[str, Any], limits: _Limits, now: datetime
) -> None:
    """Per-mailbox and per-key send caps. A test key's captured mail (which never leaves the
    server, and which the daily quota leaves out) is counted apart from live mail: test sends
    have caps of their own, so a sandbox still meets the 429, and never use up the live cap."""
    windows = (("hour", timedelta(hours=1)), ("day", timedelta(days=1)))
    same_kind = _SAME_KIND[actor.test_mode]
    kind = " in test mode" if actor.test_mode else ""
    for label, window in windows:
        cap = mailbox.get(f"send_cap_{label}")
        if cap is not None:
            _enforce_window(
                conn,
                and_(messages.c.mailbox_id == mailbox["id"], same_kind),
                cap,
                window,
                now,
                f"this mailbox may send {cap} messages{kind} per {label}",
            )
    if not _key_capped(actor, limits):
        return
    key_caps = (("hour", limits.key_cap_hour), ("day", limits.key_cap_day))
    for (label, window), (_, cap) in zip(windows, key_caps, strict=True):
        if cap is not None:
            _enforce_window(
                conn,
                and_(messages.c.created_by_key_id == actor.id, same_kind),
                cap,
                window,
                now,
                f"this API key may send {cap} messages per {label}",
            )


# What the daily quota counts (one definition for the quota enforced here and the quota shown
# by GET /v1/account): live outbound messages created since midnight UTC. Captured test mail
# (mm_test_ keys) never leaves the server, so it is left out. Built once: it runs on the send
# path of every account with a quota.
_SENT_TODAY = fast.Compiled(
    select(func.count())
    .select_from(messages)
    .where(
        messages.c.account_id == bindparam("account_id"),
        messages.c.direction == "outbound",
        messages.c.test.is_(False),
        messages.c.created_at >= bindparam("since"),
    )
)


def quota_day_start(now: datetime) -> datetime:
    """Midnight UTC of ``now``'s day: when the daily send quota was last reset."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def sent_today_for_quota(conn: Connection, account_id: str, now: datetime) -> int:
    """The messages the account's daily send quota counts for ``now``'s day (UTC)."""
    since = quota_day_start(now)
    return int(_SENT_TODAY.scalar(conn, {"account_id": account_id, "since": since}) or 0)


def _check_quota(
    conn: Connection, actor: Actor, account_id: str, limits: _Limits, now: datetime
) -> None:
    if actor.test_mode:
        return  # captured test mail never leaves the server
    quota = limits.daily_send_quota
    if quota is None:
        return
    used = sent_today_for_quota(conn, account_id, now)
    if used >= quota:
        midnight = quota_day_start(now)
        retry_after = max(1, math.ceil((midnight + timedelta(days=1) - now).total_seconds()))
        raise RateLimited(
            f"the account's daily send quota of {quota} messages is used up; it resets at "
            "midnight UTC",
            retry_after=retry_after,
            code="daily_quota_exceeded",
            quota=quota,
        )


_NEVER_SENT = [
    Status.CANCELLED.value,
    Status.SEND_FAILED.value,
    Status.REJECTED.value,
    Status.EXPIRED.value,
]


def _check_duplicate_reply(conn: Connection, original_id: str, now: datetime) -> None:
    recent = conn.execute(
        select(messages.c.id)
        .where(
            messages.c.reply_to_email_id == original_id,
            messages.c.direction == "outbound",
            messages.c.created_at > now - DUPLICATE_REPLY_WINDOW,
            # Only a reply that was (or may still be) sent is a repeat: a rejected one is
            # revised and resubmitted at once (SPEC §2), an expired one never went out.
            messages.c.status.not_in(_NEVER_SENT),
        )
        .limit(1)
    ).first()
    if recent is not None:
        raise Conflict(
            f"a reply to this message was just sent ({recent.id}); to send another within "
            f"{int(DUPLICATE_REPLY_WINDOW.total_seconds())} s give it a new idempotency_key",
            code="duplicate_reply",
            existing_message_id=recent.id,
        )


def _suppressed_query(count: int) -> Select[Any]:
    # One plain bind parameter per address: an expanding IN is re-rendered on every call.
    return select(suppression_rows.c.address).where(
        suppression_rows.c.account_id == bindparam("account_id"),
        suppression_rows.c.address.in_([bindparam(f"a{i}") for i in range(count)]),
    )


_SUPPRESSED_AMONG = {count: _suppressed_query(count) for count in range(1, 9)}


def _suppressed_among(conn: Connection, account_id: str, addresses: list[str]) -> set[str]:
    """``directory.suppressed_among`` as a prebuilt statement (it runs on every send)."""
    if not addresses:
        return set()
    wanted = list(dict.fromkeys(a.lower() for a in addresses))
    statement = _SUPPRESSED_AMONG.get(len(wanted))
    if statement is None:
        statement = _suppressed_query(len(wanted))
    params: dict[str, Any] = {f"a{i}": address for i, address in enumerate(wanted)}
    params["account_id"] = account_id
    return {r.address for r in conn.execute(statement, params)}


_ALLOWLIST = select(mailbox_allowlist.c.pattern).where(
    mailbox_allowlist.c.mailbox_id == bindparam("mailbox_id")
)


def _all_allowlisted(
    conn: Connection,
    mailbox_id: str,
    recipients: Iterable[str],
    patterns: Sequence[str] | None = None,
) -> bool:
    """Whether every recipient matches the mailbox's allowlist (``patterns`` when the caller
    read them in this transaction already)."""
    if patterns is None:
        patterns = [r.pattern for r in conn.execute(_ALLOWLIST, {"mailbox_id": mailbox_id})]
    wanted = list(recipients)
    return bool(patterns and wanted) and all(
        any(matches_pattern(a, p) for p in patterns) for a in wanted
    )


# --- building the message --------------------------------------------------------------------


def _merge(first: Iterable[str], extra: Iterable[str], exclude: Iterable[str]) -> list[str]:
    seen = set(exclude)
    out = []
    for address in [*first, *extra]:
        if address not in seen:
            seen.add(address)
            out.append(address)
    return out


def _estimated_size(
    subject: str, markdown: str, html: str, files: Sequence[_Attachment], recipients: int
) -> int:
    """Bytes on the wire, near enough: headers, text and HTML parts, base64 attachments."""
    attached = sum(4 * ((len(a.data) + 2) // 3) * 78 // 76 + 300 for a in files)
    return (
        2048
        + 80 * recipients
        + len(subject.encode())
        + len(markdown.encode()) * 2
        + len(html.encode())
        + attached
    )


def _reply_subject(original: Mapping[str, Any]) -> str:
    subject = safe_subject((original.get("subject") or "")[: MAX_SUBJECT_CHARS - 4])
    if threads.normalize_subject(subject) and subject.lower().startswith("re:"):
        return subject
    return f"Re: {subject}".strip()


def _writable_id(value: Any) -> str | None:
    """A message id from someone's headers as the composer will write it, or None when it
    would refuse it (non-ASCII, no angle brackets, ...): those are dropped, never sent."""
    if not isinstance(value, str):
        return None
    try:
        return check_message_id(value, "references")
    except InvalidInput:
        return None


def _reply_threading(original: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """In-Reply-To and References of a reply (RFC 5322 3.6.4): the parent's References (or,
    without them, its In-Reply-To) followed by its Message-ID. The customer's headers are
    untrusted: an id the composer would refuse is dropped rather than fail the accepted
    reply at delivery. Trimmed to MAX_REFERENCES, the thread's first id stays first (RFC
    5537 3.4.4: readers that thread by the root key on it) before the newest ones."""
    parent = _writable_id(original.get("message_id_header"))
    chain = list(original.get("references") or [])
    if not chain and original.get("in_reply_to"):
        chain = [original["in_reply_to"]]
    ids = [i for i in dict.fromkeys(map(_writable_id, chain)) if i and i != parent]
    if parent is not None:
        ids.append(parent)
    if len(ids) > MAX_REFERENCES:
        ids = [ids[0], *ids[1 - MAX_REFERENCES :]]
    return parent, ids


def _reply_recipients(original: Mapping[str, Any]) -> list[str]:
    if original["direction"] == "inbound":
        found = list(original.get("reply_to") or []) or [original.get("from_address") or ""]
    else:
        found = list(original.get("to") or [])
    out = []
    for item in found:
        try:
            out.append(_address(item, "to"))
        except InvalidInput:
            continue  # an address nobody can write to (the reply needs an explicit 'to')
    return out


def rescan_stored_draft(
    conn: Connection,
    services: Services,
    message_id: str,
    account_id: str,
    *,
    recipients: Sequence[str],
    subject: str,
    markdown: str,
    html: str,
    what: str,
) -> dict[str, Any]:
    """The scan an edit of a stored draft goes through (an agent's schedule edit, a
    reviewer's revision): the send path's own, with the draft's attachments and the
    account's suppressions as they are now.

    Returns the columns the edit writes (``scan_findings``, ``size_bytes``); a blocking
    finding raises 422 ``scan_blocked`` with every finding, ``what`` naming the draft.
    """
    files = [
        _Attachment(a.filename, a.content_type, a.data)
        for a in conn.execute(
            select(attachments.c.filename, attachments.c.content_type, attachments.c.data).where(
                attachments.c.message_id == message_id
            )
        )
    ]
    size = _estimated_size(subject, markdown, html, files, len(recipients))
    suppressed = directory.suppressed_among(conn, account_id, list(recipients))
    findings = _scan_input(services, recipients, subject, markdown, files, suppressed, size)
    blockers = blocking(findings)
    if blockers:
        raise InvalidInput(
            f"{what} fails the scan: " + "; ".join(f.message for f in blockers),
            code="scan_blocked",
            scan_findings=[f.as_dict() for f in findings],
        )
    return {"scan_findings": [f.as_dict() for f in findings], "size_bytes": size}


def _scan_input(
    services: Services,
    recipients: Sequence[str],
    subject: str,
    markdown: str,
    files: Sequence[_Attachment],
    suppressed: set[str],
    size: int,
) -> list[Finding]:
    return scan(
        ScanInput(
            recipients=list(recipients),
            subject=subject,
            markdown=markdown,
            attachments=[ScanAttachment(a.filename, a.content_type, a.data) for a in files],
            suppressed=frozenset(suppressed),
            size_bytes=size,
            max_recipients=services.settings.max_recipients,
            max_message_bytes=services.settings.max_message_bytes,
        )
    )


def _summary(row: Mapping[str, Any], thread_public_id: str | None) -> dict[str, Any]:
    """The send response (202 body): what an agent needs to follow its message."""
    return {
        "id": row["id"],
        "message_id": row["id"],
        "email_id": row["id"],
        "status": row["status"],
        "thread_id": thread_public_id or row.get("thread_id"),
        "mailbox_id": row["mailbox_id"],
        "from": row.get("from_address"),
        "to": list(row.get("to") or []),
        "cc": list(row.get("cc") or []),
        "bcc": list(row.get("bcc") or []),
        "subject": row.get("subject") or "",
        "oversight_mode": row.get("oversight_mode"),
        "gate_timing": row.get("gate_timing"),
        "send_at": isoformat(row.get("send_at")),
        "scan_findings": list(row.get("scan_findings") or []),
        "last_error": row.get("last_error"),
        "metadata": row.get("metadata") or {},
        "message_id_header": row.get("message_id_header"),
        "in_reply_to": row.get("in_reply_to"),
        "reply_to_email_id": row.get("reply_to_email_id"),
        "test": bool(row.get("test")),
        "created_at": isoformat(row.get("created_at")),
        "idempotent": False,
    }


def _message_id_header(message_id: str, address: str) -> str:
    """Stable and ours: the ULID of the message at the sending domain."""
    return f"<{message_id.removeprefix('msg_')}@{domain_of(address)}>"


def schedule_release(conn: Connection, message_id: str, send_at: datetime) -> None:
    """Make sure a release job runs at ``send_at`` (approve-then-schedule uses this too)."""
    moved = conn.execute(
        update(job_rows)
        .where(
            job_rows.c.kind == "release_scheduled",
            job_rows.c.dedupe_key.like(f"release:{message_id}%"),
            job_rows.c.status == "pending",
        )
        .values(run_at=send_at, updated_at=utcnow())
    )
    if moved.rowcount:
        return
    # The first release job keeps the plain key; later ones (after edits) get the time too.
    if (
        jobs.enqueue(
            conn,
            "release_scheduled",
            {"message_id": message_id},
            run_at=send_at,
            dedupe_key=f"release:{message_id}",
        )
        is None
    ):
        jobs.enqueue(
            conn,
            "release_scheduled",
            {"message_id": message_id},
            run_at=send_at,
            dedupe_key=f"release:{message_id}:{int(send_at.timestamp() * 1000)}",
        )


def _enqueue_delivery(conn: Connection, message_id: str) -> None:
    jobs.enqueue(conn, "deliver", {"message_id": message_id}, dedupe_key=f"deliver:{message_id}")


# Built once: constructing and coercing an INSERT per call costs more than running it.
_INSERT_MESSAGE = fast.Compiled(messages.insert())
_INSERT_ATTACHMENT = attachments.insert()

_STATUS_ACTION = {
    Status.QUEUED: "message.queued",
    Status.PENDING_SEND_APPROVAL: "message.held_for_approval",
    Status.SCHEDULED: "message.scheduled",
    Status.SEND_FAILED: "message.scan_blocked",
}


@dataclass
class _Work:
    """One send waiting for a shared commit.

    ``admit``, when given, runs first in the shared transaction and outside the send's
    savepoint: what it writes (the caller's rate-limit token, a recorded refusal) stays even
    when it or the send then fails. It returns the actor the send acts for.

    The caller waits on ``done`` (a thread) or ``future`` (a coroutine on ``loop``)."""

    write: Callable[[Connection, Actor | None], SendResult]
    admit: Callable[[Connection], Actor] | None = None
    done: threading.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[SendResult] | None = None
    result: SendResult | None = None
    error: Exception | None = None


def _settle(works: list[_Work]) -> None:
    """On the waiters' event loop: hand each coroutine its outcome."""
    for work in works:
        future = work.future
        if future is None or future.done():
            continue  # the request was cancelled meanwhile (the client went away)
        if work.error is not None:
            future.set_exception(work.error)
        else:
            future.set_result(work.result)  # type: ignore[arg-type]


class _SharedCommits:
    """Concurrent sends to one SQLite database share one transaction and one commit.

    On SQLite a commit is an fsync under the database's single write lock, so sends that
    arrive together queue for it anyway; here one writer thread takes every queued send,
    runs each in its own savepoint of one transaction, and commits once. A send that fails
    rolls back to its savepoint and raises in its own caller; the others stand. Nobody is
    answered before the commit that holds their message, so durability is that of one
    transaction per send. PostgreSQL keeps one transaction per send, in the caller's
    thread: its row locks (the mailbox, then the audit chain) would be taken out of order
    across a shared batch.

    The writer is a thread of its own, not one of the waiting callers: coroutines hand it
    their send without a thread hop of their own, and a batch wakes each event loop once
    (measured: the executor hand-off, the leader lock and the future chaining of one hop
    per send were ~12% of the server's samples). It stops after a second without work, so
    an idle database keeps no thread, and a process forked from this one starts its own.
    """

    MAX_BATCH = 32
    IDLE_SECONDS = 1.0

    def __init__(self, db: Database) -> None:
        self._db = db
        self._queue: collections.deque[_Work] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        self._writer_pid = 0

    def run(
        self,
        write: Callable[[Connection, Actor | None], SendResult],
        admit: Callable[[Connection], Actor] | None = None,
    ) -> SendResult:
        """The send's outcome, waiting in this thread (raises what the send raised)."""
        db = self._db
        if not db.is_sqlite:
            actor = None
            if admit is not None:
                with db.write() as conn:
                    actor = admit(conn)
            with db.write() as conn:
                return write(conn, actor)
        work = _Work(write, admit, done=threading.Event())
        self._enqueue(work)
        assert work.done is not None
        work.done.wait()
        if work.error is not None:
            raise work.error
        assert work.result is not None
        return work.result

    async def run_async(
        self,
        write: Callable[[Connection, Actor | None], SendResult],
        admit: Callable[[Connection], Actor] | None = None,
    ) -> SendResult:
        """:meth:`run` for a coroutine (SQLite only): no thread of the caller's waits."""
        assert self._db.is_sqlite
        loop = asyncio.get_running_loop()
        work = _Work(write, admit, loop=loop, future=loop.create_future())
        self._enqueue(work)
        assert work.future is not None
        return await work.future

    def _enqueue(self, work: _Work) -> None:
        with self._lock:
            self._queue.append(work)
            if self._writer is None or self._writer_pid != os.getpid():
                self._start_writer()
            else:
                self._wakeup.notify()

    def _start_writer(self) -> None:
        # Called with the lock held.
        self._writer = threading.Thread(
            target=self._serve, name="multimail-send-commits", daemon=True
        )
        self._writer_pid = os.getpid()
        self._writer.start()

    def _serve(self) -> None:
        try:
            self._serve_batches()
        except BaseException:
            # Its batch has been answered (with an error) already; the next writer takes
            # over below. Logged rather than left to the thread's excepthook on stderr.
            _log.exception("the shared-commit writer stopped on an error nothing caught")
        finally:
            # Whatever ended this writer (idle, or an error no send caught), sends queued
            # since must not wait for it.
            with self._lock:
                if self._writer is threading.current_thread():
                    self._writer = None
                    if self._queue:
                        self._start_writer()

    def _serve_batches(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._wakeup.wait(self.IDLE_SECONDS)
                if not self._queue:
                    return  # decided under the lock: the next send starts a new writer
                batch = [
                    self._queue.popleft() for _ in range(min(len(self._queue), self.MAX_BATCH))
                ]
            try:
                self._commit(self._db, batch)
            finally:
                self._answer(batch)

    @staticmethod
    def _answer(batch: list[_Work]) -> None:
        loops: dict[asyncio.AbstractEventLoop, list[_Work]] = {}
        for work in batch:
            if work.result is None and work.error is None:
                work.error = RuntimeError("the send was interrupted before it was written")
            if work.done is not None:
                work.done.set()
            elif work.loop is not None:
                loops.setdefault(work.loop, []).append(work)
        for loop, works in loops.items():
            # A closed loop (that server has stopped) has nobody left to answer.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, works)

    @staticmethod
    def _commit(db: Database, batch: list[_Work]) -> None:
        try:
            with db.write() as conn:
                if len(batch) == 1 and batch[0].admit is None:
                    # Alone: a failure rolls the whole transaction back, no savepoint needed.
                    batch[0].result = batch[0].write(conn, None)
                    return
                driver = conn.connection.driver_connection
                assert driver is not None
                for work in batch:
                    actor = None
                    try:
                        if work.admit is not None:
                            actor = work.admit(conn)
                        with _savepoint(conn):
                            work.result = work.write(conn, actor)
                    except Exception as exc:
                        work.error = exc
                        if not driver.in_transaction:
                            # SQLite rolled the whole transaction back (disk full, I/O error,
                            # out of memory), not just this savepoint: the sends before this
                            # one are gone with it, and nothing after it may start a new one.
                            raise _TransactionLost(exc) from exc
        except BaseException as exc:
            cause: Exception
            if isinstance(exc, _TransactionLost):
                cause = exc.cause
            elif isinstance(exc, Exception):
                cause = exc
            else:
                cause = RuntimeError("the send was interrupted before it was written")
            # Nobody in this batch is answered as stored: its transaction did not commit.
            for work in batch:
                work.result, work.error = None, work.error or cause
            if not isinstance(exc, Exception):
                raise


class _TransactionLost(Exception):
    """A shared transaction ended under the batch; ``cause`` is what ended it."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


# One per database: a batch is one transaction, so it must never mix two databases' sends
# (two installations in one process, as tests and embedded uses have).
_COMMITTERS: weakref.WeakKeyDictionary[Database, _SharedCommits] = weakref.WeakKeyDictionary()
_COMMITTERS_LOCK = threading.Lock()


def _shared_commits(db: Database) -> _SharedCommits:
    with _COMMITTERS_LOCK:
        committer = _COMMITTERS.get(db)
        if committer is None:
            committer = _COMMITTERS[db] = _SharedCommits(db)
        return committer


@contextmanager
def _savepoint(conn: Connection) -> Iterator[None]:
    """One send's savepoint in a shared SQLite transaction, issued on the driver connection:
    SQLAlchemy's ``begin_nested`` spends ~40 us per send on bookkeeping this loop does not
    need (measured: 44 us against 1 us for SAVEPOINT and RELEASE). Savepoints the send
    itself opens through SQLAlchemy nest inside it and are closed before it ends."""
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute("SAVEPOINT multimail_send")
    try:
        yield
    except BaseException:
        # Some errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM) roll back the whole
        # transaction; the savepoint is gone then, and the caller must see the cause.
        if driver.in_transaction:
            driver.execute("ROLLBACK TO SAVEPOINT multimail_send")
            driver.execute("RELEASE SAVEPOINT multimail_send")
        raise
    driver.execute("RELEASE SAVEPOINT multimail_send")


@dataclass(frozen=True)
class _Prepared:
    """What a send computes before it needs the database (or the caller's identity)."""

    request: SendRequest
    mailbox_refs: Sequence[str | None]
    reply_ref: str | None
    now: datetime
    draft: _Draft | None
    prerendered: RenderedBody | None
    # A refusal of the request's own content, raised once the caller has been admitted.
    error: MultimailError | None = None


def _prepare(
    request: SendRequest,
    mailbox_ref: str | None,
    reply_ref: str | None,
    *,
    keep_error: bool = False,
) -> _Prepared:
    # The mailbox as the path names it, else as the body does (short routes, /v1/send).
    mailbox_refs = [mailbox_ref, request.from_, request.mailbox_id]
    now = utcnow()
    try:
        draft = _parse(request, now)
    except MultimailError as exc:
        if not keep_error:
            raise
        return _Prepared(request, mailbox_refs, reply_ref, now, None, None, exc)
    # Rendering is pure and the slowest step that needs no database: keep it out of the lock.
    prerendered = render_markdown(draft.markdown or "")
    return _Prepared(request, mailbox_refs, reply_ref, now, draft, prerendered)


def _submit(
    services: Services,
    actor: Actor,
    *,
    mailbox_ref: str | None,
    request: SendRequest,
    reply_ref: str | None,
) -> SendResult:
    actor.require(Scope.SEND)
    _refuse_unknown(services, actor, request.model_extra, "reply" if reply_ref else "send")
    # A refused request that names an idempotency_key is answered in the transaction: it
    # may be the retry of one accepted before (see _replay_of_refused).
    prepared = _prepare(
        request, mailbox_ref, reply_ref, keep_error=request.idempotency_key is not None
    )

    def write(conn: Connection, _: Actor | None) -> SendResult:
        return _write_send(conn, services, actor, prepared)

    return _shared_commits(services.db).run(write)


class Gate(Protocol):
    """Who is sending, and their request's rate-limit token: asked by the send itself.

    Both methods authenticate the caller (revocation included) and spend one token, raising
    ``AuthenticationFailed`` or ``RateLimited`` to refuse; whatever they write (the token,
    the key's last use) must stand even when they then refuse or the send fails."""

    def admit(self, conn: Connection) -> Actor:
        """In ``conn``'s write transaction (the send's, shared with concurrent sends)."""
        ...

    def admit_alone(self) -> Actor:
        """In a transaction of its own, committed before the send's."""
        ...


# Bodies up to this size are parsed and rendered before the caller is known, so that the
# caller's key, token and send share one transaction; larger ones wait until the caller is
# admitted (an unknown key must not buy a long render).
PREADMIT_MAX_CHARS = 16_384


# Bodies up to this size are prepared on the event loop itself (about a millisecond of
# rendering; 16 KiB would hold the loop for 10 ms and more), larger ones in a thread.
PREPARE_ON_LOOP_MAX_CHARS = 4_096


def _body_chars(request: SendRequest) -> int | None:
    """The characters of the request's body fields; None when it carries attachments."""
    if request.attachments:
        return None
    size = 0
    for value in (request.markdown, request.text, request.body, request.html):
        size += len(value) if value is not None else 0
    return size


def _address_items(value: AddressInput) -> int:
    """How many addresses a field names, counted without parsing them."""
    if value is None:
        return 0
    return value.count(",") + 1 if isinstance(value, str) else len(value)


def _few_recipients(services: Services, request: SendRequest) -> bool:
    """Whether the request names few enough addresses to be parsed before its key is checked:
    parsing is linear, but an unauthenticated caller must not buy CPU with a long list."""
    named = sum(
        _address_items(value) for value in (request.to, request.cc, request.bcc, request.reply_to)
    )
    return named <= services.settings.max_recipients


def _cheap_to_prepare(services: Services, request: SendRequest) -> bool:
    size = _body_chars(request)
    return size is not None and size <= PREADMIT_MAX_CHARS and _few_recipients(services, request)


def _submit_admitting(
    services: Services,
    gate: Gate,
    *,
    mailbox_ref: str | None,
    request: SendRequest,
    reply_ref: str | None,
) -> SendResult:
    if not services.db.is_sqlite or not _cheap_to_prepare(services, request):
        # PostgreSQL: the token's row lock must not be held for the whole send.
        actor = gate.admit_alone()
        return _submit(
            services, actor, mailbox_ref=mailbox_ref, request=request, reply_ref=reply_ref
        )
    write, admit = _admitted_work(services, gate, mailbox_ref, request, reply_ref)
    return _shared_commits(services.db).run(write, admit)


_WriteFn = Callable[[Connection, Actor | None], SendResult]
_AdmitFn = Callable[[Connection], Actor]


def _admitted_work(
    services: Services,
    gate: Gate,
    mailbox_ref: str | None,
    request: SendRequest,
    reply_ref: str | None,
) -> tuple[_WriteFn, _AdmitFn]:
    """The send prepared (parsed, rendered) and its two steps in the shared transaction:
    admitting the caller (key, token, scope, unknown fields) and writing the message."""
    prepared = _prepare(request, mailbox_ref, reply_ref, keep_error=True)
    action = "reply" if reply_ref else "send"

    def admit(conn: Connection) -> Actor:
        actor = gate.admit(conn)
        actor.require(Scope.SEND)
        if request.model_extra:
            raise _bypass_refusal(conn, actor, request.model_extra, action)
        return actor

    def write(conn: Connection, actor: Actor | None) -> SendResult:
        assert actor is not None
        return _write_send(conn, services, actor, prepared)

    return write, admit


def admits_in_shared_commit(services: Services, request: SendRequest) -> bool:
    """Whether :func:`send_in_shared_commit` takes this request (SQLite, a small body that
    can be prepared on the event loop)."""
    size = _body_chars(request)
    return (
        services.db.is_sqlite
        and size is not None
        and size <= PREPARE_ON_LOOP_MAX_CHARS
        and _few_recipients(services, request)
    )


async def send_in_shared_commit(
    services: Services,
    gate: Gate,
    *,
    mailbox_ref: str | None,
    request: SendRequest,
    email_id: str | None = None,
) -> SendResult:
    """:func:`send_admitting` (or, with ``email_id``, :func:`reply_admitting`) from a
    coroutine, without a thread of its own: the small body is prepared here and the send
    waits for the database's writer (:class:`_SharedCommits`). Only for requests
    :func:`admits_in_shared_commit` takes."""
    write, admit = _admitted_work(services, gate, mailbox_ref, request, email_id)
    return await _shared_commits(services.db).run_async(write, admit)


def _targets(
    conn: Connection, actor: Actor, prepared: _Prepared, recipients: Sequence[str]
) -> tuple[dict[str, Any], _Limits | None, dict[str, Any] | None]:
    """The sending mailbox (locked on PostgreSQL), the limits when read with it (the
    suppressed among ``recipients`` too), and the message replied to."""
    mailbox_refs, reply_ref = prepared.mailbox_refs, prepared.reply_ref
    named = [ref for ref in mailbox_refs if ref]
    by_id = named[0] if len(named) == 1 and named[0].startswith("mbx_") else None

    limits: _Limits | None = None
    mailbox: dict[str, Any] | None
    if by_id is not None:
        mailbox, limits = _mailbox_and_limits(conn, actor, by_id, recipients)
    else:
        mailbox = _choose_mailbox(conn, actor, mailbox_refs)
    original = None
    if reply_ref is not None:
        original = message_views.get_row(
            conn, actor, reply_ref, mailbox_id=mailbox["id"] if mailbox else None
        )
        if mailbox is None:
            mailbox = mailboxes.resolve(conn, actor, original["mailbox_id"])
    if mailbox is None:
        mailbox = _only_mailbox(conn, actor)
    if conn.dialect.name == "postgresql" and limits is None:
        # Serialises sends per mailbox so caps are counted against committed messages
        # (_mailbox_and_limits, which set limits, has locked the row already).
        mailbox = mailboxes.resolve(conn, actor, mailbox["id"], for_update=True)
    return mailbox, limits, original


def _replay_of_refused(conn: Connection, actor: Actor, prepared: _Prepared) -> SendResult | None:
    """A request refused as it stands now (its ``send_at`` has passed since, a rule has
    become stricter) may be the retry of one accepted before under its idempotency_key:
    SPEC §5.1 answers that with the original message. None otherwise; nothing is written."""
    request = prepared.request
    if not request.idempotency_key or not isinstance(prepared.error, InvalidInput):
        return None
    try:
        mailbox, _, original = _targets(conn, actor, prepared, ())
    except MultimailError:
        return None  # the request's own refusal says more
    request_hash = _request_hash(request, mailbox["id"], original["id"] if original else None)
    replay = _find_replay(
        conn,
        mailbox["account_id"],
        request.idempotency_key,
        request_hash,
        prepared.now,
        actor.test_mode,
    )
    return None if replay is None else SendResult(replay, created=False)


def _write_send(
    conn: Connection, services: Services, actor: Actor, prepared: _Prepared
) -> SendResult:
    """The send's work inside its transaction: checks that read the database, then writes."""
    if prepared.error is not None:
        replayed = _replay_of_refused(conn, actor, prepared)
        if replayed is not None:
            return replayed
        raise prepared.error
    assert prepared.draft is not None and prepared.prerendered is not None
    draft, prerendered, now = prepared.draft, prepared.prerendered, prepared.now
    request = prepared.request
    settings = services.settings
    mailbox, limits, original = _targets(conn, actor, prepared, [*draft.to, *draft.cc, *draft.bcc])
    account_id = mailbox["account_id"]
    if limits is None:
        limits = _limits(conn, actor, account_id)
    _lock_counted(conn, actor, account_id, limits)
    if draft.idempotency_key:
        request_hash = _request_hash(request, mailbox["id"], original["id"] if original else None)
        replay = _claim_idempotency(
            conn, account_id, draft.idempotency_key, request_hash, now, actor.test_mode
        )
        if replay is not None:
            return SendResult(replay, created=False)
    mode = effective_mode(OversightMode(mailbox["oversight_mode"]), draft.mode)
    if mode is OversightMode.READ_ONLY:
        raise Forbidden(
            f"{mailbox['address']} is read_only: it cannot send. Ask the operator for an "
            f"upgrade with POST /v1/mailboxes/{mailbox['id']}/request-upgrade (a one-time "
            "code is mailed to the oversight address)",
            code="mailbox_read_only",
            mailbox_id=mailbox["id"],
        )
    _check_domain(conn, services, actor, mailbox)
    to = draft.to or (_reply_recipients(original) if original else [])
    if not to:
        raise InvalidInput("give at least one recipient in 'to'", code="missing_recipient")
    cc = _merge(draft.cc, mailbox.get("auto_cc") or [], to)
    bcc = _merge(draft.bcc, mailbox.get("auto_bcc") or [], [*to, *cc])
    recipients = [*to, *cc, *bcc]
    if len(recipients) > settings.max_recipients:
        raise InvalidInput(
            f"{len(recipients)} recipients (auto_cc/auto_bcc included); at most "
            f"{settings.max_recipients} are allowed",
            code="too_many_recipients",
            limit=settings.max_recipients,
        )
    subject = (
        draft.subject
        if draft.subject is not None
        else (_reply_subject(original) if original else "")
    )
    markdown = draft.markdown or ""
    if not subject and not markdown and not draft.attachments:
        raise InvalidInput("the message has no subject, body or attachment", code="empty_message")
    rendered = prerendered
    size = _estimated_size(subject, markdown, rendered.html, draft.attachments, len(recipients))
    if size > settings.max_message_bytes:
        raise TooLarge(
            f"the message would be about {size} bytes; at most "
            f"{settings.max_message_bytes} are allowed",
            code="message_too_large",
            limit=settings.max_message_bytes,
        )
    _check_caps(conn, actor, mailbox, limits, now)
    _check_quota(conn, actor, account_id, limits, now)
    if original is not None and not draft.idempotency_key:
        _check_duplicate_reply(conn, original["id"], now)

    # Counted as joined here (a new thread is inserted counting it), not touched later.
    thread = threads.join_outbound(
        conn,
        account_id=account_id,
        mailbox_id=mailbox["id"],
        subject=subject,
        at=now,
        external_id=draft.thread_id,
        replying_to=original,
    )
    if limits.suppression_asked and {a.lower() for a in recipients} <= limits.suppression_asked:
        suppressed = set(limits.suppressed)
    else:
        suppressed = _suppressed_among(conn, account_id, recipients)
    findings = _scan_input(
        services, recipients, subject, markdown, draft.attachments, suppressed, size
    )
    blockers = blocking(findings)
    timing = draft.gate_timing or GateTiming(mailbox["gate_timing"])
    allowlisted = mode is OversightMode.GATED_SEND and _all_allowlisted(
        conn, mailbox["id"], recipients, limits.allowlist
    )
    if blockers:
        status = Status.SEND_FAILED
    else:
        status = first_outbound_status(
            mode, scheduled=draft.send_at is not None, timing=timing, allowlisted=allowlisted
        )
    check_transition(Status.PENDING_SCAN, status)

    message_id = new_id("msg")
    in_reply_to, references = _reply_threading(original) if original else (None, [])
    row: dict[str, Any] = {
        "id": message_id,
        "account_id": account_id,
        "mailbox_id": mailbox["id"],
        "thread_id": thread["id"],
        "direction": "outbound",
        "status": status.value,
        "test": actor.test_mode,
        "message_id_header": _message_id_header(message_id, mailbox["address"]),
        "in_reply_to": in_reply_to,
        "references": references,
        "reply_to_email_id": original["id"] if original else None,
        "from_address": mailbox["address"],
        "from_name": mailbox.get("display_name"),
        "to": to,
        "cc": cc,
        "bcc": bcc,
        "reply_to": draft.reply_to,
        "subject": subject,
        "markdown": markdown,
        "html": rendered.html,
        "text": message_views.text_column(markdown, rendered.text),
        "metadata": draft.metadata,
        "scan_findings": [f.as_dict() for f in findings],
        "oversight_mode": mode.value,
        "gate_timing": timing.value,
        "send_at": draft.send_at,
        "idempotency_key": draft.idempotency_key,
        "created_by_key_id": actor.id if actor.type == "key" else None,
        "created_by_key_name": actor.name,
        "size_bytes": size,
        "last_error": "; ".join(f.message for f in blockers) or None,
        "created_at": now,
        "updated_at": now,
    }
    _INSERT_MESSAGE.execute(conn, row)
    if draft.attachments:
        conn.execute(
            _INSERT_ATTACHMENT,
            [
                {
                    "id": new_id("att"),
                    "message_id": message_id,
                    "filename": item.filename,
                    "content_type": item.content_type,
                    "size_bytes": len(item.data),
                    "sha256": hashlib.sha256(item.data).hexdigest(),
                    "inline": False,
                    "data": item.data,
                }
                for item in draft.attachments
            ],
        )
    thread_public = threads.public_thread_id(thread)
    common = {
        "subject_type": "message",
        "subject_id": message_id,
        "mailbox_id": mailbox["id"],
        "oversight_mode": mode.value,
    }
    created = {
        "to": to,
        "cc": cc,
        "bcc": bcc,
        "subject": subject,
        "body_sha256": hashlib.sha256(markdown.encode()).hexdigest(),
        "attachments": [a.filename for a in draft.attachments],
        "mailbox_mode": mailbox["oversight_mode"],
        "requested_mode": draft.mode.value if draft.mode else None,
        "effective_mode": mode.value,
        "gate_timing": timing.value,
        "send_at": isoformat(draft.send_at),
        "test": actor.test_mode,
        "reply_to_email_id": row["reply_to_email_id"],
        "thread_id": thread_public,
        "idempotency_key": draft.idempotency_key,
    }
    scanned = {
        "findings": [{"code": f.code, "severity": f.severity} for f in findings],
        "blocked": bool(blockers),
    }
    outcome = {"status": status.value, "allowlisted": allowlisted, "reason": row["last_error"]}
    audit.append_many(
        conn,
        actor=actor,
        entries=[
            audit.Entry("message.created", **common, details=created),
            audit.Entry("message.scanned", **common, details=scanned),
            audit.Entry(_STATUS_ACTION[status], **common, details=outcome),
        ],
    )
    if status is Status.QUEUED:
        _enqueue_delivery(conn, message_id)
    elif status is Status.SCHEDULED:
        assert draft.send_at is not None
        schedule_release(conn, message_id, draft.send_at)
    elif status is Status.PENDING_SEND_APPROVAL:
        events.emit(
            conn,
            account_id=account_id,
            event_type="oversight.pending",
            mailbox_id=mailbox["id"],
            message=message_views.view(
                row,
                attachment_list=[
                    {
                        "filename": a.filename,
                        "content_type": a.content_type,
                        "size_bytes": len(a.data),
                    }
                    for a in draft.attachments
                ],
                thread_public_id=thread_public,
            ),
            no_subscribers=limits.webhooks_possible is False
            and not (mailbox.get("webhook_url") and mailbox.get("deleted_at") is None),
        )
        notify.notify_pending(conn, services, row, oversight_email=limits.oversight_email)
    response = _summary(row, thread_public)
    if draft.idempotency_key:
        conn.execute(
            update(idempotency_keys)
            .where(
                idempotency_keys.c.account_id == account_id,
                idempotency_keys.c.key == _stored_key(draft.idempotency_key, actor.test_mode),
            )
            .values(message_id=message_id, response=response)
        )
    return SendResult(response, created=True)


def send(
    services: Services, actor: Actor, *, mailbox_ref: str | None, request: SendRequest
) -> SendResult:
    """Create one outbound message from ``mailbox_ref`` (or the ``from``/``mailbox_id`` fields)."""
    return _submit(services, actor, mailbox_ref=mailbox_ref, request=request, reply_ref=None)


def reply(
    services: Services,
    actor: Actor,
    *,
    mailbox_ref: str | None,
    email_id: str,
    request: SendRequest,
) -> SendResult:
    """Answer ``email_id`` in its thread (In-Reply-To, References); the mailbox defaults to its."""
    return _submit(services, actor, mailbox_ref=mailbox_ref, request=request, reply_ref=email_id)


def send_admitting(
    services: Services, gate: Gate, *, mailbox_ref: str | None, request: SendRequest
) -> SendResult:
    """:func:`send` for a caller not yet authenticated: ``gate`` admits them (key, rate
    limit) inside the send's own transaction when it can, in one of its own otherwise. The
    refusals and their order are :func:`send`'s behind the API's ``require_send``."""
    return _submit_admitting(
        services, gate, mailbox_ref=mailbox_ref, request=request, reply_ref=None
    )


def reply_admitting(
    services: Services,
    gate: Gate,
    *,
    mailbox_ref: str | None,
    email_id: str,
    request: SendRequest,
) -> SendResult:
    """:func:`reply` for a caller not yet authenticated (see :func:`send_admitting`)."""
    return _submit_admitting(
        services, gate, mailbox_ref=mailbox_ref, request=request, reply_ref=email_id
    )


# --- after creation: release, cancel, edit --------------------------------------------------


def _system(account_id: str, name: str) -> Actor:
    return Actor(type="system", id=None, name=name, account_id=account_id)


def _guarded_update(conn: Connection, row: Mapping[str, Any], new: Status, **values: Any) -> bool:
    """Change status only if nobody else did since we read it."""
    check_transition(Status(row["status"]), new)
    result = conn.execute(
        update(messages)
        .where(messages.c.id == row["id"], messages.c.status == row["status"])
        .values(status=new.value, updated_at=utcnow(), **values)
    )
    return bool(result.rowcount)


def release_scheduled(services: Services, message_id: str) -> str | None:
    """A scheduled message's time has come: queue it, or ask for approval (schedule_first).

    Idempotent: anything not ``scheduled`` (cancelled, already released) is left alone, and a
    message whose ``send_at`` was moved later waits for the job of its new time. Returns the
    new status, or None when nothing changed.
    """
    with services.db.write() as conn:
        query = select(messages).where(messages.c.id == message_id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        found = conn.execute(query).mappings().first()
        if found is None or found["status"] != Status.SCHEDULED.value:
            return None
        row = dict(found)
        now = utcnow()
        if row["send_at"] is not None and aware(row["send_at"]) > now + timedelta(seconds=1):
            return None
        # Tightening is immediate (SPEC §2): a message that has not passed the gate yet goes
        # through it under the stricter of the mode it was sent under and the mailbox's now.
        stored = OversightMode(row["oversight_mode"] or OversightMode.GATED_SEND.value)
        mailbox_mode = conn.execute(
            select(mailbox_rows.c.oversight_mode).where(mailbox_rows.c.id == row["mailbox_id"])
        ).scalar_one_or_none()
        mode = stored if mailbox_mode is None else stricter(stored, OversightMode(mailbox_mode))
        recipients = [*row["to"], *row["cc"], *row["bcc"]]
        needs_approval = (
            # read_only cannot send: only a reviewer's approval lets the message out (as the
            # delivery worker's gate check has it), so it waits for one.
            (outbound_is_gated(mode) or mode is OversightMode.READ_ONLY)
            and row["decision"] != "approve"
            and not (
                mode is OversightMode.GATED_SEND
                and _all_allowlisted(conn, row["mailbox_id"], recipients)
            )
        )
        new = Status.PENDING_SEND_APPROVAL if needs_approval else Status.QUEUED
        changed = {"oversight_mode": mode.value} if mode is not stored else {}
        if not _guarded_update(conn, row, new, **changed):
            return None
        row.update(status=new.value, **changed)
        actor = _system(row["account_id"], "scheduler")
        details: dict[str, Any] = {
            "status": new.value,
            "released": True,
            "send_at": isoformat(row["send_at"]),
        }
        if changed:
            details.update(sent_under_mode=stored.value, mailbox_mode=mailbox_mode)
        audit.append(
            conn,
            actor=actor,
            action=_STATUS_ACTION[new],
            subject_type="message",
            subject_id=message_id,
            mailbox_id=row["mailbox_id"],
            oversight_mode=mode.value,
            details=details,
        )
        if new is Status.QUEUED:
            _enqueue_delivery(conn, message_id)
        else:
            events.emit(
                conn,
                account_id=row["account_id"],
                event_type="oversight.pending",
                mailbox_id=row["mailbox_id"],
                message=message_views.full_view(conn, row),
            )
            notify.notify_pending(conn, services, row)
    return new.value


def _require_any(actor: Actor, *scopes: Scope) -> None:
    if actor.is_operator or any(satisfies(actor.scopes, s) for s in scopes):
        return
    actor.require(scopes[0])


def _mailbox_filter(conn: Connection, actor: Actor, mailbox_ref: str | None) -> str | None:
    return mailboxes.resolve(conn, actor, mailbox_ref)["id"] if mailbox_ref else None


def cancel(
    services: Services,
    actor: Actor,
    message_ref: str,
    reason: str | None = None,
    *,
    mailbox_ref: str | None = None,
) -> dict[str, Any]:
    """Cancel a message that has not passed the gate; cancelling twice answers the same."""
    _require_any(actor, Scope.SEND, Scope.OVERSIGHT)
    if reason is not None and len(reason) > 2000:
        raise InvalidInput("reason may be at most 2000 characters", code="invalid_field")
    with services.db.write() as conn:
        mailbox_id = _mailbox_filter(conn, actor, mailbox_ref)
        row = message_views.get_row(
            conn, actor, message_ref, mailbox_id=mailbox_id, for_update=True
        )
        status = Status(row["status"])
        thread_ids = message_views.public_thread_ids(conn, [row["thread_id"]])
        if status is Status.CANCELLED:
            return _summary(row, thread_ids.get(row["thread_id"] or "")) | {
                "cancelled": True,
                "already_cancelled": True,
            }
        if status not in CANCELLABLE or not _guarded_update(conn, row, Status.CANCELLED):
            current = conn.execute(
                select(messages.c.status).where(messages.c.id == row["id"])
            ).scalar_one()
            raise Conflict(
                f"the message is {current} and can no longer be cancelled (only pending, "
                "held or scheduled messages can)",
                code="not_cancellable",
                status=current,
            )
        row["status"] = Status.CANCELLED.value
        audit.append(
            conn,
            actor=actor,
            action="message.cancelled",
            subject_type="message",
            subject_id=row["id"],
            mailbox_id=row["mailbox_id"],
            oversight_mode=row["oversight_mode"],
            details={"reason": reason, "previous_status": status.value},
        )
        events.emit(
            conn,
            account_id=row["account_id"],
            event_type="message.cancelled",
            mailbox_id=row["mailbox_id"],
            message=message_views.full_view(conn, row),
            extra={"reason": reason},
        )
        return _summary(row, thread_ids.get(row["thread_id"] or "")) | {
            "cancelled": True,
            "already_cancelled": False,
            "previous_status": status.value,
        }


_EDITABLE = frozenset({Status.SCHEDULED, Status.PENDING_SEND_APPROVAL})


def _edit_values(
    services: Services,
    row: Mapping[str, Any],
    mailbox: Mapping[str, Any],
    changes: ScheduleEdit,
) -> dict[str, Any]:
    """The new column values of a content edit (recipients, subject, body), validated."""
    fields = changes.model_fields_set
    values: dict[str, Any] = {}
    to = _addresses(changes.to, "to") if "to" in fields else list(row["to"])
    if not to:
        raise InvalidInput("give at least one recipient in 'to'", code="missing_recipient")
    cc = (
        _merge(_addresses(changes.cc, "cc"), mailbox.get("auto_cc") or [], to)
        if ("cc" in fields)
        else list(row["cc"])
    )
    bcc = (
        _merge(_addresses(changes.bcc, "bcc"), mailbox.get("auto_bcc") or [], [*to, *cc])
        if ("bcc" in fields)
        else list(row["bcc"])
    )
    values.update(to=to, cc=cc, bcc=bcc)
    if len([*to, *cc, *bcc]) > services.settings.max_recipients:
        raise InvalidInput(
            f"at most {services.settings.max_recipients} recipients are allowed",
            code="too_many_recipients",
        )
    if "subject" in fields:
        values["subject"] = _check_subject(changes.subject) or ""
    body = _check_body(_body_of(changes))
    if body is not None:
        values["markdown"] = body
        rendered = render_markdown(body)
        values.update(html=rendered.html, text=message_views.text_column(body, rendered.text))
    changed = {k: v for k, v in values.items() if v != row.get(k)}
    # A row written before text_column holds the text part even where it is the markdown:
    # the same text part shown is no change (a change would re-open the approval).
    if "text" in changed and message_views.shown_text(
        {**row, **changed}
    ) == message_views.shown_text(row):
        del changed["text"]
    return changed


def edit_scheduled(
    services: Services,
    actor: Actor,
    message_ref: str,
    changes: ScheduleEdit,
    *,
    mailbox_ref: str | None = None,
) -> dict[str, Any]:
    """Move ``send_at`` or change recipients/subject/body before the gate lets the message out.

    Content edits are scanned again; gated mail goes (back) to a reviewer, because an approval
    covers the content that was approved and nothing else.
    """
    actor.require(Scope.SEND)
    _refuse_unknown(services, actor, changes.model_extra, "edit_scheduled")
    now = utcnow()
    new_send_at = _send_at(changes.send_at, now) if changes.send_at is not None else None
    with services.db.write() as conn:
        mailbox_id = _mailbox_filter(conn, actor, mailbox_ref)
        row = message_views.get_row(
            conn, actor, message_ref, mailbox_id=mailbox_id, for_update=True
        )
        status = Status(row["status"])
        if row["direction"] != "outbound" or status not in _EDITABLE:
            already = status in PAST_THE_GATE
            raise Conflict(
                f"the message is {status.value}; "
                + (
                    "it was already approved or sent and can no longer be edited"
                    if already
                    else "only scheduled or pending messages can be edited"
                ),
                code="already_approved" if already else "not_editable",
                status=status.value,
            )
        mailbox = mailboxes.resolve(conn, actor, row["mailbox_id"])
        content = _edit_values(services, row, mailbox, changes)
        diff: dict[str, Any] = {
            k: {"from": row.get(k), "to": v}
            for k, v in content.items()
            if k not in ("html", "text")
        }
        values: dict[str, Any] = dict(content)
        if new_send_at is not None and (
            row["send_at"] is None or aware(row["send_at"]) != new_send_at
        ):
            values["send_at"] = new_send_at
            diff["send_at"] = {"from": isoformat(row["send_at"]), "to": isoformat(new_send_at)}
        if not values:
            thread_ids = message_views.public_thread_ids(conn, [row["thread_id"]])
            return _summary(row, thread_ids.get(row["thread_id"] or "")) | {"changed": []}
        mailbox_mode = OversightMode(mailbox["oversight_mode"])
        mode = stricter(OversightMode(row["oversight_mode"] or mailbox_mode), mailbox_mode)
        new_status = status
        merged = {**row, **values}
        if content:
            recipients = [*merged["to"], *merged["cc"], *merged["bcc"]]
            values.update(
                rescan_stored_draft(
                    conn,
                    services,
                    row["id"],
                    row["account_id"],
                    recipients=recipients,
                    subject=merged["subject"],
                    markdown=merged["markdown"],
                    html=merged["html"] or "",
                    what="the edited message",
                )
            )
            gated = outbound_is_gated(mode) and not (
                mode is OversightMode.GATED_SEND
                and _all_allowlisted(conn, row["mailbox_id"], recipients)
            )
            if gated and status is Status.SCHEDULED and row["decision"] == "approve":
                # The approval covered the old content: a reviewer must see the new one.
                new_status = Status.PENDING_SEND_APPROVAL
                # Its wait (reminder, expiry) starts now, not when the message was written.
                values.update(
                    decision=None,
                    reviewer=None,
                    decision_note=None,
                    decided_at=None,
                    pending_since=utcnow(),
                    reminded_at=None,
                )
        if new_status is status:
            result = conn.execute(
                update(messages)
                .where(messages.c.id == row["id"], messages.c.status == status.value)
                .values(updated_at=utcnow(), **values)
            )
            changed = bool(result.rowcount)
        else:
            changed = _guarded_update(conn, row, new_status, **values)
        if not changed:
            raise Conflict(
                "the message changed while it was being edited; read it and retry",
                code="already_approved",
                status=status.value,
            )
        fresh = dict(
            conn.execute(select(messages).where(messages.c.id == row["id"])).mappings().one()
        )
        if fresh["status"] == Status.SCHEDULED.value and "send_at" in values:
            schedule_release(conn, row["id"], fresh["send_at"] and aware(fresh["send_at"]))
        audit.append(
            conn,
            actor=actor,
            action="message.schedule_edited",
            subject_type="message",
            subject_id=row["id"],
            mailbox_id=row["mailbox_id"],
            oversight_mode=mode.value,
            details={
                "changes": diff,
                "status_before": status.value,
                "status_after": new_status.value,
                "rescanned": bool(content),
            },
        )
        if new_status is Status.PENDING_SEND_APPROVAL and content:
            events.emit(
                conn,
                account_id=row["account_id"],
                event_type="oversight.pending",
                mailbox_id=row["mailbox_id"],
                message=message_views.full_view(conn, fresh),
                extra={"edited": True},
            )
            notify.notify_pending(conn, services, fresh)
        thread_ids = message_views.public_thread_ids(conn, [fresh["thread_id"]])
        return _summary(fresh, thread_ids.get(fresh["thread_id"] or "")) | {"changed": sorted(diff)}
