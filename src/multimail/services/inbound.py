"""Inbound mail: the SMTP sink (decide at RCPT, store at DATA) and the processing job.

``DatabaseSink`` answers RCPT from the mailbox table and stores each accepted message in
``inbound_raw`` together with its ``process_inbound`` job, committing before the server may
answer 250 (SQLite ``synchronous=FULL``; PostgreSQL ``synchronous_commit``). Concurrent
sessions share commits: stores that arrive while a commit is in flight go into the next one,
so a burst pays one fsync per batch instead of one per message.

``process_inbound`` turns a stored message into one message row per recipient mailbox. It
runs in one transaction that also flips ``inbound_raw.status`` from ``stored`` with a guarded
UPDATE, so a re-run after a crash (or a second worker) creates nothing twice. A second copy
of a message a mailbox already has (the client resent it after losing our 250: same
Message-ID, same envelope sender, same bytes) is audited and not delivered again.

Postmaster (RFC 5321 §4.5.1, §4.1.1.3): ``postmaster@`` every domain we serve, and the bare
``<postmaster>`` (taken as ``postmaster@<server domain>``), is accepted at RCPT. A live mailbox
with that address gets it like any other mail; otherwise the message is forwarded as system
mail to a human (the server's ``postmaster_email``, or the operator of the account that owns
the verified domain) or, where that would be wrong or is impossible, kept in ``inbound_raw``
and audited (``postmaster.kept`` with a reason). Delivery reports addressed to postmaster go
to the report logic that handles them in a mailbox.

Undeliverable after acceptance (RFC 5321 §6.1): once we answered 250 the message is ours to
deliver or to report. A recipient whose mailbox was deleted (or whose domain stopped being
ours) between RCPT and processing is audited (``message.undeliverable``), and the envelope
sender gets an RFC 3464 report as system mail, but only where that cannot be backscatter: a
sender that is not null and not a mail system's own, a message that is no report and no
spam, an envelope sender's domain that SPF or an aligned DKIM signature vouches for, and at
most NON_DELIVERY_HOURLY_CAP reports an hour to one sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dns.resolver
from sqlalchemy import Connection, func, insert, select, text, update
from sqlalchemy.exc import OperationalError

from multimail.domain.addresses import AddressError, idna_ascii, normalize_address
from multimail.domain.oversight import (
    MAY_HAVE_LEFT,
    OversightMode,
    Status,
    can_transition,
    check_transition,
    inbound_is_held,
)
from multimail.domain.scopes import Scope
from multimail.domain.spam import (
    SpamSignals,
    SpamVerdict,
    count_links,
    has_mismatched_link_text,
    is_executable_filename,
    score_message,
)
from multimail.errors import InvalidInput, NotFound, TooLarge
from multimail.ids import isoformat, new_id, utcnow
from multimail.mail.parse import (
    ParsedMessage,
    UnparseableMessage,
    parse_message,
    prepend_header,
    strip_headers,
)
from multimail.mail.reports import (
    ComplaintReport,
    DeliveryStatusReport,
    RecipientStatus,
    is_bounce_sender,
    is_unsubscribe_request,
    parse_arf,
    parse_dsn,
)
from multimail.services import audit, directory, events, mailboxes, messages, notify, threads
from multimail.services.authresults import (
    AuthResult,
    AuthResults,
    authenticate,
    make_resolver,
    sender_verified,
)
from multimail.services.context import Actor, Services
from multimail.smtp.inbound import (
    ACCEPT,
    RELAY_DENIED,
    UNKNOWN_MAILBOX,
    InboundEnvelope,
    RecipientVerdict,
    StorageFull,
    split_trace,
)
from multimail.store import jobs
from multimail.store.tables import attachments, audit_entries, domains, inbound_raw
from multimail.store.tables import mailboxes as mailboxes_table
from multimail.store.tables import messages as messages_table

__all__ = [
    "JOB_KIND",
    "NON_DELIVERY_HOURLY_CAP",
    "POSTMASTER_HOURLY_CAP",
    "DatabaseSink",
    "Signal",
    "accept_raw",
    "process_inbound",
    "recipient_verdict",
    "signals",
    "store_envelopes",
]

log = logging.getLogger(__name__)

JOB_KIND = "process_inbound"
_BATCH = 128  # stores per shared commit; bounds one transaction's size
_VERDICT_TTL_S = 2.0


class Signal:
    """Wakes asyncio waiters in any thread's loop when something happened; no polling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(event.set)

    @contextlib.contextmanager
    def listen(self) -> Iterator[asyncio.Event]:
        """Register before checking state, so a notify between check and wait is not lost."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                self._waiters.discard(entry)


@dataclass
class InboundSignals:
    stored: Signal  # a raw message was committed (wakes the processing worker)
    arrived: Signal  # a message became visible in an inbox (wakes wait_for_email)


_signals_lock = threading.Lock()


def signals(services: Services) -> InboundSignals:
    with _signals_lock:
        found = services.extras.get("inbound_signals")
        if not isinstance(found, InboundSignals):
            found = InboundSignals(stored=Signal(), arrived=Signal())
            services.extras["inbound_signals"] = found
        return found


def _system(account_id: str | None) -> Actor:
    return Actor(type="system", id="smtp", name="smtp", account_id=account_id)


# --------------------------------------------------------------------------- RCPT


def _server_domain(services: Services) -> str:
    """The server's own domain as addresses and headers carry it: its A-label."""
    try:
        return idna_ascii(services.settings.domain)
    except AddressError:
        return services.settings.domain.lower()


def _our_domains(conn: Connection, services: Services) -> set[str]:
    names = {_server_domain(services)}
    names.update(r.name.lower() for r in conn.execute(select(domains.c.name)))
    return names


_POSTMASTER = "postmaster"


def _as_address(recipient: str, server_domain: str) -> str:
    """A recipient as mailboxes store it; the bare ``<postmaster>`` is the server's (RFC 5321
    §4.1.1.3). Raises AddressError for anything that is no address."""
    if recipient.lower() == _POSTMASTER:
        return f"{_POSTMASTER}@{server_domain}"
    return normalize_address(recipient)


def recipient_verdict(services: Services, address: str) -> RecipientVerdict:
    """Accept a live mailbox of any account, and postmaster at every domain we serve (RFC 5321
    §4.5.1: a server MUST); refuse the rest without ever relaying."""
    try:
        wanted = _as_address(address, _server_domain(services))
    except AddressError:
        return UNKNOWN_MAILBOX
    with services.db.read() as conn:
        found = conn.execute(
            select(mailboxes_table.c.id).where(
                mailboxes_table.c.address == wanted, mailboxes_table.c.deleted_at.is_(None)
            )
        ).first()
        if found is not None:
            return ACCEPT
        local, _, domain = wanted.rpartition("@")
        if domain not in _our_domains(conn, services):
            return RELAY_DENIED
        return ACCEPT if local == _POSTMASTER else UNKNOWN_MAILBOX


# --------------------------------------------------------------------------- DATA


def _is_storage_full(exc: BaseException) -> bool:
    for error in (exc, getattr(exc, "orig", None), exc.__cause__):
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if error is not None and "disk is full" in str(error).lower():
            return True
        sqlstate = getattr(error, "sqlstate", None) or ""
        if sqlstate.startswith("53"):  # PostgreSQL class 53: insufficient resources
            return True
    return False


def store_envelopes(
    services: Services,
    envelopes: Sequence[InboundEnvelope],
    *,
    actor: Actor | None = None,
    jobs_run_at: datetime | None = None,
) -> list[str]:
    """Store raw messages and their jobs in one committed transaction; return their ids.

    ``actor`` is the API key that handed the messages over (``POST /v1/inbound``): the
    hand-over is its act, so it is audited as such; SMTP arrivals are the system's and are
    audited when processed (``message.received``). ``jobs_run_at`` holds the jobs back when
    the caller processes the messages itself: they are then only the backstop."""
    ids = [new_id("inb") for _ in envelopes]
    try:
        with services.db.write() as conn:
            conn.execute(
                insert(inbound_raw),
                [
                    {
                        "id": inbound_id,
                        "mail_from": env.mail_from[:320],
                        "rcpt_tos": list(env.rcpt_tos),
                        "data": env.data,
                        "peer": env.peer[:100],
                        "helo": env.helo[:255],
                        "tls": env.tls,
                        "status": "stored",
                        "received_at": env.received_at,
                    }
                    for inbound_id, env in zip(ids, envelopes, strict=True)
                ],
            )
            # One statement for the batch's jobs: the SMTP path pays it before every 250.
            jobs.enqueue_many(
                conn,
                [(JOB_KIND, {"inbound_id": inbound_id}) for inbound_id in ids],
                run_at=jobs_run_at,
            )
            for inbound_id, env in zip(ids, envelopes, strict=True):
                if actor is not None:
                    audit.append(
                        conn,
                        actor=actor,
                        action="inbound.accepted",
                        subject_type="inbound",
                        subject_id=inbound_id,
                        details={"mail_from": env.mail_from, "rcpt_to": list(env.rcpt_tos)},
                    )
    except (OperationalError, OSError) as exc:
        if _is_storage_full(exc):
            raise StorageFull("no space left to store the message") from exc
        raise
    return ids


class DatabaseSink:
    """The InboundSink of the real server: mailbox table at RCPT, inbound_raw at DATA."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._pending: list[tuple[InboundEnvelope, asyncio.Future[str]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._verdicts: dict[str, tuple[float, RecipientVerdict]] = {}

    async def check_recipient(self, address: str) -> RecipientVerdict:
        # A short memory spares the database one query per RCPT under load; a mailbox
        # deleted meanwhile is caught again when the message is processed.
        now = time.monotonic()
        cached = self._verdicts.get(address)
        if cached is not None and cached[0] > now:
            return cached[1]
        verdict = await asyncio.to_thread(recipient_verdict, self._services, address)
        if len(self._verdicts) > 10_000:
            self._verdicts.clear()
        self._verdicts[address] = (now + _VERDICT_TTL_S, verdict)
        return verdict

    async def store(self, envelope: InboundEnvelope) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((envelope, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            try:
                ids = await asyncio.to_thread(
                    store_envelopes, self._services, [env for env, _ in batch]
                )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), inbound_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(inbound_id)
            signals(self._services).stored.notify()


# --------------------------------------------------------------------------- processing


_resolver_lock = threading.Lock()


def _resolver(services: Services) -> dns.resolver.Resolver:
    """One resolver per process with dnspython's cache, which keeps each answer for its TTL:
    a run of messages from one domain costs its SPF and DMARC look-ups once, not each time
    (they were a fifth of the processing CPU, and a round trip each)."""
    with _resolver_lock:
        found = services.extras.get("inbound_resolver")
        if not isinstance(found, dns.resolver.Resolver):
            found = make_resolver(services.settings.dns_resolver)
            found.cache = dns.resolver.LRUCache(10_000)
            services.extras["inbound_resolver"] = found
        return found


@dataclass(frozen=True)
class _Analysis:
    parsed: ParsedMessage
    auth: AuthResults
    stored_raw: bytes
    verdict: SpamVerdict
    dsn: DeliveryStatusReport | None
    arf: ComplaintReport | None
    unsubscribe: bool


def _analyse(services: Services, row: dict[str, Any], parsed: ParsedMessage) -> _Analysis:
    raw = bytes(row["data"])
    resolver = _resolver(services)
    # Verify over the bytes as received: a signature may cover the fields we strip below.
    auth = authenticate(
        raw,
        resolver=resolver,
        peer_ip=row["peer"],
        mail_from=row["mail_from"] or "",
        helo=row["helo"] or "",
        from_address=parsed.from_address,
        from_count=parsed.from_count,
    )
    # RELIABILITY SMTP-5: results claimed by earlier hops are not ours to vouch for; and
    # RFC 5321 §4.4: the Return-Path of final delivery replaces any the sender wrote.
    trace = split_trace(raw)
    client = strip_headers(trace.client, ["Authentication-Results", "Return-Path"])
    stored = prepend_header(
        trace.return_path + trace.received + client,
        "Authentication-Results",
        auth.header_value(_server_domain(services)),
    )
    verdict = score_message(
        SpamSignals(
            spf=auth.spf.result,
            dkim=auth.dkim.result,
            dmarc=auth.dmarc.result,
            from_count=parsed.from_count,
            subject=parsed.subject,
            text=parsed.text,
            has_executable_attachment=any(
                is_executable_filename(a.filename) for a in parsed.attachments
            ),
            sender_display_name=parsed.from_name,
            sender_address=parsed.from_address,
            link_count=count_links(parsed.markdown),
            mismatched_link_text=has_mismatched_link_text(parsed.markdown),
        )
    )
    dsn = parse_dsn(raw)
    arf = parse_arf(raw) if dsn is None else None
    unsubscribe = dsn is None and arf is None and is_unsubscribe_request(parsed)
    return _Analysis(parsed, auth, stored, verdict, dsn, arf, unsubscribe)


def _recipient_mailboxes(
    conn: Connection, rcpt_tos: Sequence[str], server_domain: str
) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for address in rcpt_tos:
        try:
            wanted = _as_address(address, server_domain)
        except AddressError:
            continue
        row = (
            conn.execute(
                select(mailboxes_table).where(
                    mailboxes_table.c.address == wanted, mailboxes_table.c.deleted_at.is_(None)
                )
            )
            .mappings()
            .first()
        )
        if row is not None:
            found.setdefault(row["id"], dict(row))
    return list(found.values())


def _initial_status(mailbox: dict[str, Any], analysis: _Analysis) -> Status:
    mode = OversightMode(mailbox["oversight_mode"])
    if inbound_is_held(mode):
        # Held even when spammy: the spam folder is readable by the agent, the hold is not.
        target = Status.PENDING_INBOUND_APPROVAL
    elif analysis.dsn is not None or analysis.arf is not None:
        check_transition(Status.RECEIVED, Status.UNREAD)
        target = Status.ARCHIVED  # kept for the record; the agent has nothing to answer
        check_transition(Status.UNREAD, target)
        return target
    elif analysis.verdict.is_spam:
        target = Status.SPAM
    else:
        target = Status.UNREAD
    check_transition(Status.RECEIVED, target)
    return target


def _id_forms(message_ids: Sequence[str | None]) -> list[str]:
    """Each Message-ID with and without its angle brackets, as stored rows may hold it."""
    forms: list[str] = []
    for value in message_ids:
        if value:
            inner = value.strip().strip("<>")
            forms.extend([inner, f"<{inner}>"])
    return forms


def _our_message(
    conn: Connection, account_id: str, message_ids: Sequence[str | None], *, outbound: bool
) -> dict[str, Any] | None:
    forms = _id_forms(message_ids)
    if not forms:
        return None
    query = select(messages_table).where(
        messages_table.c.account_id == account_id,
        messages_table.c.message_id_header.in_(forms),
    )
    if outbound:
        query = query.where(messages_table.c.direction == "outbound")
    row = conn.execute(query.order_by(messages_table.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def _without_nul(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL; senders can put one anywhere, so it becomes U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _insert_message(
    conn: Connection, mailbox: dict[str, Any], analysis: _Analysis, status: Status
) -> dict[str, Any]:
    parsed = analysis.parsed
    thread = threads.for_inbound(
        conn,
        account_id=mailbox["account_id"],
        mailbox_id=mailbox["id"],
        subject=parsed.subject,
        in_reply_to=parsed.in_reply_to,
        references=parsed.references,
        sender=parsed.from_address,
    )
    now = utcnow()
    threads.touch(conn, thread["id"], now)
    answered = _our_message(conn, mailbox["account_id"], [parsed.in_reply_to], outbound=True)
    row: dict[str, Any] = {
        "id": new_id("msg"),
        "account_id": mailbox["account_id"],
        "mailbox_id": mailbox["id"],
        "thread_id": thread["id"],
        "direction": "inbound",
        "status": status.value,
        "test": False,
        "message_id_header": (parsed.message_id or "")[:998] or None,
        "in_reply_to": (parsed.in_reply_to or "")[:998] or None,
        "references": parsed.references,
        "reply_to_email_id": answered["id"] if answered else None,
        "from_address": (parsed.from_address or "").lower()[:320] or None,
        "from_name": (parsed.from_name or "")[:200] or None,
        "to": parsed.to,
        "cc": parsed.cc,
        "bcc": [],
        "reply_to": parsed.reply_to,
        "subject": parsed.subject,
        "markdown": parsed.markdown,
        "html": parsed.html,
        "text": parsed.text,
        "quoted_text": parsed.quoted_content or None,
        "headers": [[name, value] for name, value in parsed.headers],
        "auth_results": analysis.auth.to_json(),
        "spam_score": analysis.verdict.score,
        "spam_reasons": [
            {"code": r.code, "points": r.points, "explanation": r.explanation}
            for r in analysis.verdict.reasons
        ],
        "scan_findings": [{"code": "mime_defect", "detail": d} for d in parsed.defects],
        "oversight_mode": mailbox["oversight_mode"],
        "raw": analysis.stored_raw,
        "size_bytes": len(analysis.stored_raw),
        "created_at": now,
        "updated_at": now,
    }
    row = _without_nul(row)
    conn.execute(insert(messages_table).values(**row))
    if parsed.attachments:
        conn.execute(
            insert(attachments),
            [
                {
                    "id": new_id("att"),
                    "message_id": row["id"],
                    "filename": _without_nul(att.filename[:255]),
                    "content_type": _without_nul(att.content_type[:255]),
                    "size_bytes": len(att.data),
                    "sha256": hashlib.sha256(att.data).hexdigest(),
                    "inline": att.inline,
                    "content_id": _without_nul((att.content_id or "")[:255]) or None,
                    "data": att.data,
                }
                for att in parsed.attachments
            ],
        )
    return row


def _suppress(
    conn: Connection, account_id: str, address: str | None, reason: str, source: str, note: str
) -> str | None:
    if not address:
        return None
    try:
        directory.suppress(
            conn,
            actor=_system(account_id),
            account_id=account_id,
            address=address,
            reason=reason,
            source_message_id=source,
            details=note[:500],
        )
    except InvalidInput:
        log.info("not suppressing unusable address %r", address)
        return None
    return address.lower()


def _news_in(conn: Connection, account_id: str, hard: Sequence[str]) -> bool:
    return bool(set(hard) - directory.suppressed_among(conn, account_id, list(hard)))


def _plain_address(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return normalize_address(value)
    except AddressError:
        return value.strip().lower() or None


def _failures_we_sent(
    original: Mapping[str, Any], report: DeliveryStatusReport
) -> list[tuple[RecipientStatus, str]]:
    """The report's failed recipients that ``original`` was sent to, each with the address
    we used. Anyone who got one of our messages knows its Message-ID and can mail a report
    naming any address; only the original's own recipients count. Original-Recipient is
    the address as we gave it (RFC 3464 §2.3.1), Final-Recipient may be an alias the remote
    server expanded it to: the next send goes to ours, so ours is the one matched."""
    named = {
        _plain_address(str(a))
        for a in [*(original["to"] or []), *(original["cc"] or []), *(original["bcc"] or [])]
    }
    found: list[tuple[RecipientStatus, str]] = []
    for recipient in report.recipients:
        if recipient.action != "failed":
            continue
        for candidate in (recipient.original_recipient, recipient.final_recipient):
            address = _plain_address(candidate)
            if address is not None and address in named:
                found.append((recipient, address))
                break
    return found


def _apply_bounce(
    conn: Connection, account_id: str, report: DeliveryStatusReport, source: Mapping[str, Any]
) -> None:
    original = _our_message(conn, account_id, [report.original_message_id], outbound=True)
    if original is None or not any(r.action == "failed" for r in report.recipients):
        return  # a delay notice, or a bounce of nothing we sent: nobody is suppressed
    current = Status(original["status"])
    failed = _failures_we_sent(original, report)
    why = None
    if current not in MAY_HAVE_LEFT:
        why = f"that message was never handed to a mail server (it is {current.value})"
    elif not failed:
        why = "the report names no recipient of that message as failed"
    if why is not None:
        _keep_for_operator(
            conn,
            source,
            "message.bounce_unmatched",
            original_message_id=report.original_message_id,
            recipients=[r.original_recipient or r.final_recipient for r in report.recipients],
            why=why,
        )
        return
    hard = sorted({address for r, address in failed if r.bounce_type == "hard"})
    bounce_type = "hard" if hard else "soft"
    diagnostic = next((r.diagnostic_code for r, _ in failed if r.diagnostic_code), None)
    if current is Status.BOUNCED and not _news_in(conn, account_id, hard):
        # DUR-5: one bounce notice per message. A later report (the relay's own 550 already
        # bounced it, or a second DSN) only counts if it names a hard-failed recipient that is
        # not suppressed yet; the report itself is stored and audited as an arrival anyway.
        return
    if can_transition(current, Status.BOUNCED):
        changed = conn.execute(
            update(messages_table)
            .where(messages_table.c.id == original["id"], messages_table.c.status == current.value)
            .values(
                status=Status.BOUNCED.value,
                bounce_type=bounce_type,
                last_error=(diagnostic or "bounced")[:2000],
                updated_at=utcnow(),
            )
        ).rowcount
        if not changed:
            return  # another actor moved it first; its own rules apply
    # Else already bounced, or final (send_failed after some recipients accepted it): the
    # status stays, the hard-failed recipients are suppressed all the same.
    suppressed = []
    for address in hard:
        done = _suppress(
            conn, account_id, address, "hard_bounce", original["id"], diagnostic or "hard bounce"
        )
        if done:
            suppressed.append(done)
    audit.append(
        conn,
        actor=_system(account_id),
        action="message.bounced",
        subject_type="message",
        subject_id=original["id"],
        mailbox_id=original["mailbox_id"],
        oversight_mode=original["oversight_mode"],
        details={
            "bounce_type": bounce_type,
            "recipients": [address for _, address in failed],
            "suppressed": suppressed,
            **_report_ref(source),
            "diagnostic": diagnostic,
            "status_before": current.value,
        },
    )
    refreshed = messages.get_row(conn, _system(account_id), original["id"])
    events.emit(
        conn,
        account_id=account_id,
        event_type="message.bounced",
        mailbox_id=original["mailbox_id"],
        message=messages.full_view(conn, refreshed),
        extra={"bounce_type": bounce_type, "bounced_recipients": suppressed},
    )


def _unmatched_complaint(conn: Connection, account_id: str, report: ComplaintReport) -> str | None:
    """Why a feedback report (RFC 5965) is not acted on, or None when it is: it must name a
    message this account sent (the Message-ID of the original it carries, as mailbox
    providers' feedback loops include) and a complainant among that message's recipients."""
    original = _our_message(conn, account_id, [report.original_message_id], outbound=True)
    if original is None:
        return "the report names no message this account sent"
    try:
        complainant = normalize_address(report.complainant or "")
    except AddressError:
        return "the report names no complainant address"
    named = [*(original["to"] or []), *(original["cc"] or []), *(original["bcc"] or [])]
    recipients = {str(a).lower() for a in named}
    if complainant.lower() not in recipients:
        return "the complainant was not a recipient of the message the report names"
    return None


def _apply_complaint(
    conn: Connection,
    account_id: str,
    *,
    complainant: str | None,
    reason: str,
    original_ids: Sequence[str | None],
    report_row: Mapping[str, Any],
) -> None:
    suppressed = _suppress(conn, account_id, complainant, reason, report_row["id"], reason)
    original = _our_message(conn, account_id, original_ids, outbound=True)
    subject = original or report_row
    audit.append(
        conn,
        actor=_system(account_id),
        action="message.complained",
        subject_type="message",
        subject_id=subject["id"],
        mailbox_id=subject["mailbox_id"],
        details={"reason": reason, "address": suppressed, **_report_ref(report_row)},
    )
    events.emit(
        conn,
        account_id=account_id,
        event_type="message.complained",
        mailbox_id=subject["mailbox_id"],
        message=messages.full_view(conn, subject),
        extra={"reason": reason, "complainant": suppressed},
    )


def _deliver(conn: Connection, mailbox: dict[str, Any], analysis: _Analysis) -> dict[str, Any]:
    status = _initial_status(mailbox, analysis)
    row = _insert_message(conn, mailbox, analysis, status)
    account_id = mailbox["account_id"]
    audit.append(
        conn,
        actor=_system(account_id),
        action="message.received",
        subject_type="message",
        subject_id=row["id"],
        mailbox_id=mailbox["id"],
        oversight_mode=mailbox["oversight_mode"],
        details={
            "status": status.value,
            "from": row["from_address"],
            "message_id_header": row["message_id_header"],
            "spam_score": analysis.verdict.score,
            "auth": {
                k: v["result"] for k, v in analysis.auth.to_json().items() if isinstance(v, dict)
            },
            "size_bytes": row["size_bytes"],
        },
    )
    if status in (Status.UNREAD, Status.PENDING_INBOUND_APPROVAL):
        # Held mail (gated_all) is announced to the reviewers' subscribers, as a held send
        # is; message.received follows when a reviewer releases it.
        events.emit(
            conn,
            account_id=account_id,
            event_type="message.received" if status is Status.UNREAD else "oversight.pending",
            mailbox_id=mailbox["id"],
            message=messages.full_view(conn, row),
        )
    if analysis.dsn is not None or analysis.arf is not None:
        _apply_report(conn, account_id, analysis, row)
    elif analysis.unsubscribe and sender_verified(
        analysis.auth, row["from_address"], analysis.parsed.from_count
    ):
        _apply_complaint(
            conn,
            account_id,
            complainant=row["from_address"],
            reason="unsubscribe",
            original_ids=[analysis.parsed.in_reply_to, *analysis.parsed.references],
            report_row=row,
        )
    elif analysis.unsubscribe:
        # A forged From would otherwise stop the account's mail to anyone.
        _keep_for_operator(
            conn,
            row,
            "message.unsubscribe_unverified",
            address=row["from_address"],
            spf=analysis.auth.spf.result,
            dkim=analysis.auth.dkim.result,
            dmarc=analysis.auth.dmarc.result,
        )
    return row


def _apply_report(
    conn: Connection, account_id: str, analysis: _Analysis, source: Mapping[str, Any]
) -> None:
    """Act on a delivery report or feedback report stored as ``source``, for ``account_id``."""
    if analysis.dsn is not None:
        _apply_bounce(conn, account_id, analysis.dsn, source)
    elif analysis.arf is not None:
        unmatched = _unmatched_complaint(conn, account_id, analysis.arf)
        if unmatched is None:
            _apply_complaint(
                conn,
                account_id,
                complainant=analysis.arf.complainant,
                reason="complaint",
                original_ids=[analysis.arf.original_message_id],
                report_row=source,
            )
        else:
            # Anyone can mail a feedback report naming any address: acted on unchecked, one
            # forged report would stop the account's mail to a customer.
            _keep_for_operator(
                conn,
                source,
                "message.complaint_unmatched",
                address=analysis.arf.complainant,
                original_message_id=analysis.arf.original_message_id,
                why=unmatched,
            )


def _keep_for_operator(
    conn: Connection, row: Mapping[str, Any], action: str, **details: Any
) -> None:
    """A request to stop mail that is not acted on: the message stays in the mailbox (or, sent
    to postmaster, in ``inbound_raw``), and the audit entry says why, for the operator to act
    on."""
    audit.append(
        conn,
        actor=_system(row["account_id"]),
        action=action,
        subject_type=_source_type(row),
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        details=details,
    )


def _source_type(source: Mapping[str, Any]) -> str:
    """What a report was stored as: a message in a mailbox, or (mail to postmaster that no
    mailbox took) only the raw message; ids carry their table's prefix."""
    return "inbound" if str(source["id"]).startswith("inb_") else "message"


def _report_ref(source: Mapping[str, Any]) -> dict[str, Any]:
    return {f"report_{_source_type(source)}_id": source["id"]}


# Copies of one Message-ID for one mailbox are checked and delivered one at a time: on
# PostgreSQL two workers could otherwise both find no earlier copy (SQLite's single writer
# already serialises them). The two-key form keeps these locks apart from the audit chain's.
_COPIES_LOCK_SPACE = 7_240_004


def _lock_copies(conn: Connection, mailbox_ids: Sequence[str], header: str) -> None:
    """Lock every recipient mailbox's copies of ``header``, in one order and before the
    transaction's first audit append, so no two deliveries can wait on each other."""
    if conn.dialect.name != "postgresql":
        return
    keys = {
        int.from_bytes(hashlib.sha256(f"{m}\0{header}".encode()).digest()[:4], "big", signed=True)
        for m in mailbox_ids
    }
    for key in sorted(keys):
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": _COPIES_LOCK_SPACE, "key": key},
        )


def _delivery_key(stored: bytes) -> bytes | None:
    """The envelope sender and the client's bytes of a stored message, as one digest; None
    when the message records no envelope sender (stored before Return-Path was added).

    Our Authentication-Results and Received fields (with a queue id and time of their own)
    differ between two copies of one resent message, so they are left out."""
    trace = split_trace(strip_headers(stored, ["Authentication-Results"]))
    if not trace.return_path:
        return None
    return hashlib.sha256(trace.return_path + b"\0" + trace.client).digest()


def _earlier_copy(
    conn: Connection, mailbox: Mapping[str, Any], header: str, stored: bytes
) -> str | None:
    """The id of the message in ``mailbox`` that delivering ``stored`` would repeat."""
    found = conn.execute(
        select(messages_table.c.id, messages_table.c.raw).where(
            messages_table.c.message_id_header == header,
            messages_table.c.mailbox_id == mailbox["id"],
            messages_table.c.direction == "inbound",
        )
    ).all()
    # Hashed only when the Message-ID is already there: almost every message is new.
    key = _delivery_key(stored) if found else None
    if key is None:
        return None
    for message_id, raw in found:
        if raw is not None and _delivery_key(bytes(raw)) == key:
            return str(message_id)
    return None


def _drop_copy(
    conn: Connection, mailbox: Mapping[str, Any], earlier_id: str, row: Mapping[str, Any]
) -> None:
    audit.append(
        conn,
        actor=_system(mailbox["account_id"]),
        action="message.duplicate_dropped",
        subject_type="message",
        subject_id=earlier_id,
        mailbox_id=mailbox["id"],
        oversight_mode=mailbox["oversight_mode"],
        details={"inbound_id": row["id"], "mail_from": row["mail_from"]},
    )


# --------------------------------------------------------------------------- postmaster

POSTMASTER_HOURLY_CAP = 20
_FORWARDED = "postmaster.forwarded"
_KEPT = "postmaster.kept"
_CAP_WINDOW = timedelta(hours=1)
# Forwards to one destination are counted and written one transaction at a time (see
# _lock_destinations); a key space of its own keeps these locks apart from the others.
_POSTMASTER_LOCK_SPACE = 7_240_005


@dataclass(frozen=True)
class _PostmasterRoute:
    """Mail to postmaster@<a domain we serve> that no live mailbox takes, and where it goes."""

    address: str  # postmaster@<domain>; the bare <postmaster> is the server domain's
    domain: str
    account_id: str | None  # the account that owns the domain; None for the server's own
    destination: str | None
    hold: str | None  # why it is kept whatever it says: no one (or no one safe) to send it to

    @property
    def reader(self) -> str:
        if self.account_id is None:
            return "the server's postmaster (MULTIMAIL_POSTMASTER_EMAIL)"
        return f"the operator of the MultiMail account that owns {self.domain}"


def _postmaster_route(
    conn: Connection, services: Services, address: str, domain: str, server_domain: str
) -> _PostmasterRoute | None:
    """Where mail to ``address`` goes; None when ``domain`` is no longer one we serve (the
    claim was deleted after RCPT), which makes it an address without a mailbox like any other."""
    if domain == server_domain:
        destination = services.settings.postmaster_email
        hold = None if destination else "no_destination"
        return _PostmasterRoute(address, domain, None, destination, hold)
    claims = conn.execute(
        select(domains.c.account_id, domains.c.status).where(func.lower(domains.c.name) == domain)
    ).all()
    if not claims:
        return None
    # Only one account can hold a domain verified. Anyone can claim one pending, and
    # forwarding would let a squatter read the real owner's postmaster mail.
    owner = next((c.account_id for c in claims if c.status == "verified"), None)
    if owner is None:
        return _PostmasterRoute(address, domain, None, None, "domain_unverified")
    destination = notify.oversight_address(conn, owner)
    if not destination:
        return _PostmasterRoute(address, domain, owner, None, "no_oversight_email")
    if destination.strip().lower() == address:
        # The operator reads postmaster@ through another server that hands it back to us:
        # each forward would arrive as new postmaster mail.
        return _PostmasterRoute(address, domain, owner, None, "loop")
    return _PostmasterRoute(address, domain, owner, destination, None)


def _postmaster_routes(
    conn: Connection,
    services: Services,
    rcpt_tos: Sequence[str],
    recipients: Sequence[Mapping[str, Any]],
) -> list[_PostmasterRoute]:
    """The message's postmaster recipients that no live mailbox takes, one route each."""
    server_domain = _server_domain(services)
    taken = {str(m["address"]) for m in recipients}
    routes: dict[str, _PostmasterRoute] = {}
    for recipient in rcpt_tos:
        try:
            address = _as_address(recipient, server_domain)
        except AddressError:
            continue
        local, _, domain = address.rpartition("@")
        if local != _POSTMASTER or address in taken or address in routes:
            continue
        route = _postmaster_route(conn, services, address, domain, server_domain)
        if route is not None:
            routes[address] = route
    return list(routes.values())


def _keep_reason(route: _PostmasterRoute, analysis: _Analysis) -> str | None:
    """Why mail to ``route`` is kept rather than forwarded; None to forward it."""
    if analysis.dsn is not None or analysis.arf is not None:
        return "report"  # acted on by the report logic, as in a mailbox
    if route.hold is not None:
        return route.hold
    if analysis.verdict.is_spam:
        return "spam"
    return None


def _destination_key(services: Services, destination: str) -> str:
    """Names a destination in the audit log for counting, without writing the address there
    in a form anyone could read back or confirm a guess against (keyed by the server secret)."""
    digest = hmac.new(
        notify.secret_key(services),
        b"postmaster-destination\0" + destination.strip().lower().encode(),
        hashlib.sha256,
    )
    return digest.hexdigest()[:32]


def _lock_destinations(conn: Connection, keys: Sequence[str]) -> None:
    """Serialise forwards to the same destinations on PostgreSQL, where two workers would
    otherwise both count 20 and both send (SQLite's single writer serialises them already).
    Taken after the copies' locks and before the first audit append, in one order, like them."""
    if conn.dialect.name != "postgresql":
        return
    for key in sorted({int.from_bytes(bytes.fromhex(k)[:4], "big", signed=True) for k in keys}):
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": _POSTMASTER_LOCK_SPACE, "key": key},
        )


def _last_hour(conn: Connection, action: str) -> list[dict[str, Any]]:
    """The details of the audit entries ``action`` of the last hour (the caps' window); few,
    and found through the action's index."""
    cutoff = isoformat(utcnow() - _CAP_WINDOW) or ""
    found = conn.execute(
        select(audit_entries.c.details).where(
            audit_entries.c.action == action, audit_entries.c.at >= cutoff
        )
    )
    return [json.loads(details or "{}") for (details,) in found]


def _recent_forwards(conn: Connection, key: str) -> list[dict[str, Any]]:
    """The forwards to the destination ``key`` names in the last hour, from the audit log.

    The audit log, not the jobs table: an entry is written in the transaction that decides
    the forward and is never changed or pruned, while a system_mail job's recipients are
    rewritten as it is retried. Counted under the destination's lock (_lock_destinations),
    so a concurrent worker's forward is either committed and seen here or waits for us."""
    return [e for e in _last_hour(conn, _FORWARDED) if e.get("destination_key") == key]


def _copy_key(analysis: _Analysis) -> str | None:
    key = _delivery_key(analysis.stored_raw)
    return key.hex()[:32] if key is not None else None


def _keep_postmaster(
    conn: Connection,
    row: Mapping[str, Any],
    route: _PostmasterRoute,
    analysis: _Analysis,
    reason: str,
    **details: Any,
) -> None:
    audit.append(
        conn,
        actor=_system(route.account_id),
        action=_KEPT,
        subject_type="inbound",
        subject_id=row["id"],
        details={
            "inbound_id": row["id"],
            "postmaster": route.address,
            "reason": reason,
            "mail_from": row["mail_from"],
            "from": analysis.parsed.from_address,
            "spam_score": analysis.verdict.score,
            **details,
        },
    )


def _report_account(
    conn: Connection, services: Services, analysis: _Analysis, route: _PostmasterRoute
) -> str | None:
    """The account whose outbound message a report sent to ``route`` names: mail to
    postmaster@<domain> concerns mail from that domain, and for a claimed domain only the
    accounts that claimed it."""
    report = analysis.dsn or analysis.arf
    forms = _id_forms([report.original_message_id if report is not None else None])
    if not forms:
        return None
    owners: set[str] | None = None
    if route.domain != _server_domain(services):
        claims = select(domains.c.account_id).where(func.lower(domains.c.name) == route.domain)
        owners = {str(account_id) for (account_id,) in conn.execute(claims)}
    found = conn.execute(
        select(messages_table.c.account_id, messages_table.c.from_address)
        .where(
            messages_table.c.message_id_header.in_(forms),
            messages_table.c.direction == "outbound",
        )
        .order_by(messages_table.c.id.desc())
    )
    for account_id, from_address in found:
        if (from_address or "").rpartition("@")[2].lower() != route.domain:
            continue
        if owners is None or account_id in owners:
            return str(account_id)
    return None


def _route_postmaster(
    conn: Connection,
    services: Services,
    row: Mapping[str, Any],
    analysis: _Analysis,
    routes: Sequence[_PostmasterRoute],
    keys: Mapping[str, str],
    handled: set[str],
) -> None:
    """Forward or keep the message for each postmaster route; ``keys`` holds the destination
    key of every destination a route may be forwarded to, already locked; ``handled`` the
    accounts whose report logic has seen this message (in a mailbox of theirs)."""
    groups: dict[str, list[_PostmasterRoute]] = {}
    for route in routes:
        reason = _keep_reason(route, analysis)
        if reason == "report":
            account_id = _report_account(conn, services, analysis, route)
            if account_id is not None and account_id not in handled:
                handled.add(account_id)
                _apply_report(
                    conn,
                    account_id,
                    analysis,
                    {"id": row["id"], "account_id": account_id, "mailbox_id": None},
                )
            report = analysis.dsn or analysis.arf
            _keep_postmaster(
                conn,
                row,
                route,
                analysis,
                reason,
                report="dsn" if analysis.dsn is not None else "arf",
                original_message_id=report.original_message_id if report else None,
                matched_account=account_id,
            )
        elif reason is not None:
            _keep_postmaster(conn, row, route, analysis, reason)
        else:
            assert route.destination is not None  # a route without one has a hold
            groups.setdefault(route.destination, []).append(route)
    copy = _copy_key(analysis)
    for destination, group in groups.items():
        key = keys[destination]
        recent = _recent_forwards(conn, key)
        if copy is not None and any(entry.get("copy_key") == copy for entry in recent):
            # The client resent the message after losing our 250 (RFC 5321 §6.1).
            for route in group:
                _keep_postmaster(conn, row, route, analysis, "duplicate")
            continue
        if len(recent) >= POSTMASTER_HOURLY_CAP:
            for route in group:
                _keep_postmaster(conn, row, route, analysis, "flood_cap", cap=POSTMASTER_HOURLY_CAP)
            continue
        subject, markdown = notify.postmaster_forward_mail(
            postmasters=[route.address for route in group],
            inbound_id=row["id"],
            mail_from=row["mail_from"],
            parsed=analysis.parsed,
            authentication=analysis.auth.header_value(_server_domain(services)),
            spam_score=analysis.verdict.score,
            spam_threshold=analysis.verdict.threshold,
            reader=group[0].reader,
        )
        account_id = group[0].account_id
        job_id = notify.enqueue_system_mail(
            conn,
            to=destination,
            subject=subject,
            markdown=markdown,
            kind=notify.POSTMASTER_FORWARD_KIND,
            account_id=account_id,
            extra={"inbound_id": row["id"]},
        )
        audit.append(
            conn,
            actor=_system(account_id),
            action=_FORWARDED,
            subject_type="inbound",
            subject_id=row["id"],
            details={
                "inbound_id": row["id"],
                "postmaster": [route.address for route in group],
                "to": notify.mask_address(destination),
                "destination_key": key,
                "copy_key": copy,
                "job_id": job_id,
                "mail_from": row["mail_from"],
                "from": analysis.parsed.from_address,
            },
        )


# --------------------------------------------------------------------------- undeliverable

NON_DELIVERY_HOURLY_CAP = 10
_UNDELIVERABLE = "message.undeliverable"
_UNDELIVERABLE_REASON = "the mailbox was deleted after the message was accepted"
# Reports to one envelope sender are counted and written one transaction at a time (see
# _lock_sender), in a key space apart from the copies', the destinations' and the audit's.
_NON_DELIVERY_LOCK_SPACE = 7_240_006


def _undeliverable(
    rcpt_tos: Sequence[str],
    recipients: Sequence[Mapping[str, Any]],
    routes: Sequence[_PostmasterRoute],
    server_domain: str,
) -> list[str]:
    """The message's recipients that no live mailbox and no postmaster route takes: accepted
    at RCPT, gone since. An address RCPT could not read was refused there, never stored."""
    taken = {str(m["address"]) for m in recipients} | {route.address for route in routes}
    lost: dict[str, None] = {}
    for recipient in rcpt_tos:
        try:
            address = _as_address(recipient, server_domain)
        except AddressError:
            continue
        if address not in taken:
            lost[address] = None
    return list(lost)


def _former_owner(conn: Connection, addresses: Sequence[str]) -> str | None:
    """The account whose mailboxes had ``addresses`` last, when that is one account: the audit
    entry is then theirs, as the deletion was. Mixed or unknown: the server's."""
    if not addresses:
        return None
    found = conn.execute(
        select(mailboxes_table.c.address, mailboxes_table.c.account_id)
        .where(
            mailboxes_table.c.address.in_(list(addresses)),
            mailboxes_table.c.deleted_at.is_not(None),
        )
        .order_by(mailboxes_table.c.deleted_at.desc())
    )
    latest: dict[str, str] = {}
    for address, account_id in found:
        latest.setdefault(str(address), str(account_id))
    owners = {latest.get(address) for address in addresses}
    return owners.pop() if len(owners) == 1 else None


def _report_target(mail_from: str | None) -> tuple[str | None, str | None]:
    """``(address, None)`` to report to, or ``(None, why not)`` when the envelope alone says
    no report may go: the null sender is a report already (RFC 5321 §6.1, §4.5.5), and a
    mail system's own address answers reports with reports."""
    if not mail_from:
        return None, "null_sender"
    try:
        address = normalize_address(mail_from)
    except AddressError:
        return None, "unusable_sender"
    if is_bounce_sender(address):
        return None, "bounce_sender"
    return address, None


def _sender_authenticated(auth: AuthResults, sender: str) -> bool:
    """True when the envelope sender's domain vouches for this message: SPF passed for it, or
    a DKIM signature of an aligned domain verified. Anyone can write any MAIL FROM, and a
    report to a forged one is backscatter to a stranger.

    ``sender_verified``'s rule for a domain without DMARC is this rule; DMARC itself speaks
    for the From domain, not the envelope's, so it is left out of the evidence."""
    signatures = auth.extra.get("dkim_signatures")
    passing = [
        AuthResult("pass", str(item["domain"]))
        for item in (signatures if isinstance(signatures, list) else [])
        if isinstance(item, Mapping) and item.get("result") == "pass" and item.get("domain")
    ]
    for dkim in passing or [AuthResult("none")]:
        evidence = AuthResults(spf=auth.spf, dkim=dkim, dmarc=AuthResult("none"))
        if sender_verified(evidence, sender):
            return True
    return False


def _report_refusal(analysis: _Analysis, sender: str) -> str | None:
    """Why the message gets no report although its sender could take one; None if it does."""
    if analysis.dsn is not None or analysis.arf is not None:
        return "report"  # never a report of a report (RELIABILITY DUR-5)
    if analysis.verdict.is_spam:
        return "spam"
    if not _sender_authenticated(analysis.auth, sender):
        return "unauthenticated"
    return None


def _lock_sender(conn: Connection, sender: str) -> None:
    """Serialise reports to one envelope sender on PostgreSQL, where two workers would
    otherwise both count ten and both send; taken before the transaction's first audit
    append, after the copies' and the destinations' locks, like them."""
    if conn.dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.sha256(sender.encode()).digest()[:4], "big", signed=True)
    conn.execute(
        text("SELECT pg_advisory_xact_lock(:space, :key)"),
        {"space": _NON_DELIVERY_LOCK_SPACE, "key": key},
    )


def _recent_reports(conn: Connection, sender: str) -> list[dict[str, Any]]:
    """The reports queued for ``sender`` in the last hour, from the audit log: its entries are
    written in the transaction that queues the report and never change (see _recent_forwards)."""
    return [
        e
        for e in _last_hour(conn, _UNDELIVERABLE)
        if e.get("dsn_queued") and e.get("dsn_to") == sender
    ]


def _record_undeliverable(
    conn: Connection,
    services: Services,
    row: Mapping[str, Any],
    lost: Sequence[str],
    owner: str | None,
    analysis: _Analysis | None,
    *,
    report_to: str | None,
    refusal: str | None,
) -> None:
    """Audit that ``lost`` recipients got nothing, and queue the sender's report when one is
    owed (``report_to`` without a ``refusal``) and neither a copy of it nor the hourly cap
    stops it; the lock on ``report_to`` is held."""
    copy = _copy_key(analysis) if analysis is not None else None
    job_id = None
    if report_to is not None and refusal is None and analysis is not None:
        recent = _recent_reports(conn, report_to)
        if copy is not None and any(entry.get("copy_key") == copy for entry in recent):
            refusal = "duplicate"  # the client resent the message after losing our 250
        elif len(recent) >= NON_DELIVERY_HOURLY_CAP:
            refusal = "hourly_cap"
        else:
            job_id = notify.enqueue_non_delivery(
                conn,
                services,
                to=report_to,
                inbound_id=row["id"],
                recipients=lost,
                arrival_date=row["received_at"],
                original=analysis.stored_raw,
            )
    details: dict[str, Any] = {
        "inbound_id": row["id"],
        "recipients": list(lost),
        "reason": _UNDELIVERABLE_REASON,
        "mail_from": row["mail_from"],
        "dsn_queued": job_id is not None,
        "dsn_skipped": refusal,
        "dsn_to": report_to if job_id is not None else None,
        "job_id": job_id,
        "copy_key": copy,
    }
    if refusal == "hourly_cap":
        details["cap"] = NON_DELIVERY_HOURLY_CAP
    audit.append(
        conn,
        actor=_system(owner),
        action=_UNDELIVERABLE,
        subject_type="inbound",
        subject_id=row["id"],
        details=details,
    )


def _mark_failed(services: Services, row: dict[str, Any], error: str) -> None:
    with services.db.write() as conn:
        changed = conn.execute(
            update(inbound_raw)
            .where(inbound_raw.c.id == row["id"], inbound_raw.c.status == "stored")
            .values(status="failed", error=error[:2000], processed_at=utcnow())
        ).rowcount
        if changed:
            audit.append(
                conn,
                actor=_system(None),
                action="inbound.failed",
                subject_type="inbound",
                subject_id=row["id"],
                details={"error": error[:500], "mail_from": row["mail_from"]},
            )


def process_inbound(services: Services, inbound_id: str) -> list[str]:
    """Turn one stored raw message into inbox messages; returns the ids created by this call."""
    server_domain = _server_domain(services)
    with services.db.read() as conn:
        found = conn.execute(select(inbound_raw).where(inbound_raw.c.id == inbound_id))
        raw_row = found.mappings().first()
        if raw_row is None:
            raise NotFound(f"inbound message {inbound_id!r} not found", code="inbound_not_found")
        row = dict(raw_row)
        if row["status"] != "stored":
            return []
        rcpt_tos = row["rcpt_tos"] or []
        recipients = _recipient_mailboxes(conn, rcpt_tos, server_domain)
        routes = _postmaster_routes(conn, services, rcpt_tos, recipients)
        lost = _undeliverable(rcpt_tos, recipients, routes, server_domain)
        owner = _former_owner(conn, lost)
    try:
        parsed = parse_message(bytes(row["data"]))
    except UnparseableMessage as exc:
        # The bytes stay in inbound_raw; only the attempt to make a message of them ends.
        _mark_failed(services, row, exc.message)
        return []
    report_to, refusal = _report_target(row["mail_from"]) if lost else (None, None)
    # The analysis (SPF, DKIM, DMARC: DNS round trips) is for the mail we deliver, and for a
    # report we might owe; a null or daemon sender is owed none whatever the message says.
    wanted = bool(recipients or routes) or report_to is not None
    analysis = _analyse(services, row, parsed) if wanted else None
    if report_to is not None and analysis is not None:
        refusal = _report_refusal(analysis, report_to)
    keys = {}
    if analysis is not None:
        keys = {
            route.destination: _destination_key(services, route.destination)
            for route in routes
            if route.destination is not None and _keep_reason(route, analysis) is None
        }
    created: list[dict[str, Any]] = []
    with services.db.write() as conn:
        claimed = conn.execute(
            update(inbound_raw)
            .where(inbound_raw.c.id == inbound_id, inbound_raw.c.status == "stored")
            .values(
                status="processed",
                processed_at=utcnow(),
                # Postmaster mail that is forwarded or kept is handled on purpose, not lost.
                error=None if recipients or routes else "no live recipient mailbox",
            )
        ).rowcount
        if not claimed:
            return []
        header = None
        if analysis is not None:
            # RFC 5321 §6.1: a client that lost our 250 sends the message again; SPEC §12
            # allows no duplicate, so a copy the mailbox already has is recorded and not
            # delivered.
            header = _without_nul((analysis.parsed.message_id or "")[:998]) or None
            if header is not None:
                _lock_copies(conn, [mailbox["id"] for mailbox in recipients], header)
            _lock_destinations(conn, list(keys.values()))
        if report_to is not None and refusal is None:
            _lock_sender(conn, report_to)
        if analysis is not None:
            for mailbox in recipients:
                earlier = header and _earlier_copy(conn, mailbox, header, analysis.stored_raw)
                if earlier:
                    _drop_copy(conn, mailbox, earlier, row)
                    continue
                created.append(_deliver(conn, mailbox, analysis))
            if routes:
                handled = {str(mailbox["account_id"]) for mailbox in recipients}
                _route_postmaster(conn, services, row, analysis, routes, keys, handled)
        if lost:
            _record_undeliverable(
                conn, services, row, lost, owner, analysis, report_to=report_to, refusal=refusal
            )
    if any(r["status"] == Status.UNREAD.value for r in created):
        signals(services).arrived.notify()
    return [r["id"] for r in created]


# --------------------------------------------------------------------------- POST /v1/inbound

API_HANDOVER_BACKSTOP = timedelta(minutes=2)


def accept_raw(
    services: Services,
    actor: Actor,
    raw: bytes,
    *,
    mail_from: str | None = None,
    rcpt_to: Sequence[str] | None = None,
    peer_ip: str | None = None,
    helo: str | None = None,
    received_at: datetime | None = None,
) -> dict[str, Any]:
    """A message handed over by the operator's own MTA: stored, then processed at once."""
    actor.require(Scope.ADMIN)
    if len(raw) > services.settings.max_message_bytes:
        raise TooLarge(
            f"the message is {len(raw)} bytes; the limit is {services.settings.max_message_bytes}",
            code="message_too_large",
        )
    if b"\n" in raw and b"\r\n" not in raw:
        raw = raw.replace(b"\n", b"\r\n")  # pipes from local MTAs speak bare LF
    try:
        parsed = parse_message(raw)
    except UnparseableMessage as exc:
        raise InvalidInput(exc.message, code=exc.code) from exc
    with services.db.read() as conn:
        if rcpt_to:
            targets = [mailboxes.resolve(conn, actor, address)["address"] for address in rcpt_to]
        else:
            targets = []
            for address in [*parsed.to, *parsed.cc]:
                with contextlib.suppress(NotFound):
                    targets.append(mailboxes.resolve(conn, actor, address)["address"])
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise InvalidInput(
            "no recipient of this message is a mailbox of this account; pass rcpt_to",
            code="no_local_recipient",
        )
    if len(targets) > services.settings.max_recipients:
        raise InvalidInput("too many recipients", code="too_many_recipients")
    envelope = InboundEnvelope(
        mail_from=mail_from if mail_from is not None else (parsed.from_address or ""),
        rcpt_tos=tuple(targets),
        data=raw,
        peer=peer_ip or "",
        helo=helo or "",
        received_at=received_at or utcnow(),
        tls=False,
    )
    # The answer names the messages made, so this call processes the message itself; an
    # inbound worker taking the job first would leave it nothing to name. The job waits
    # in case this process dies between the commit and the processing.
    (inbound_id,) = store_envelopes(
        services, [envelope], actor=actor, jobs_run_at=utcnow() + API_HANDOVER_BACKSTOP
    )
    created = process_inbound(services, inbound_id)
    with services.db.read() as conn:
        rows: list[Mapping[str, Any]] = [
            messages.get_row(conn, actor, message_id) for message_id in created
        ]
        views = messages.views(conn, rows)
    return {
        "inbound_id": inbound_id,
        "status": "processed",
        "message_ids": created,
        "emails": views,
    }
