"""Mail to the operator (approval requests, reminders, codes, monitored copies) and the
one-click links that mail carries.

Nothing here talks SMTP: each notification is a ``system_mail`` job written in the caller's
transaction, so it exists exactly when the change that caused it does. The delivery worker
sends it from ``multimail@<server domain>`` to the account's ``oversight_email``.

Job payload (the contract with the worker), one of::

    {"to": ["ops@example.com"], "subject": "...", "markdown": "...",
     "account_id": "acct_...", "kind": "reminder" | "approval_code" | "monitored_copy" | ...}

    {"to": ["ops@example.com"], "kind": "approval_request",
     "account_id": "acct_...", "message_id": "msg_..."}

    {"to": ["alice@example.com"], "kind": "non_delivery", "subject": "...", "markdown": "...",
     "inbound_id": "inb_...", "recipients": ["gone@..."], "arrival_date": "...Z",
     "queued_at": "...Z", "original_headers": "From: ...\r\n..."}

The first is sent as it stands. The second only records that a decision is asked for: the
worker writes the mail when it sends it (:func:`approval_request_mail`: fresh links, the
draft as it is then) and sends nothing when the message no longer waits for a decision.
Approval requests queued by earlier releases carry subject and markdown and are sent as
they stand. The third is a delivery status notification to the sender of mail we accepted
and could not deliver: :func:`non_delivery_raw` writes it (RFC 3464) from the payload, and
its subject and markdown say the same in case a worker of an earlier release sends it.

Agent-written text (drafts, subjects, thread excerpts) is shown inside fenced code blocks
(:func:`multimail.services.fences.fenced`, which also counts look-alike backticks): a draft
must never be able to put its own "Approve" link into the operator's email.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, RowMapping, select

from multimail.domain.addresses import AddressError, normalize_address
from multimail.domain.linktokens import make_token, new_nonce, read_token
from multimail.domain.oversight import DECIDABLE
from multimail.errors import InvalidInput
from multimail.ids import isoformat, parse_datetime, utcnow
from multimail.mail.parse import ParsedMessage
from multimail.mail.reports import DSN_SUBJECT, build_dsn, dsn_explanation, header_section
from multimail.services import directory
from multimail.services import messages as message_views
from multimail.services.context import Actor, Services
from multimail.services.fences import fenced as fenced  # approvals fences its summary with it
from multimail.store import jobs
from multimail.store.tables import accounts, mailboxes, messages

SYSTEM_MAIL_JOB = "system_mail"
APPROVAL_REQUEST_KIND = "approval_request"
APPROVAL_PURPOSE = "approval"
UNSUBSCRIBE_PURPOSE = "unsubscribe"
APPROVAL_LINK_TTL = timedelta(hours=72)
UNSUBSCRIBE_LINK_TTL = timedelta(days=365)
THREAD_CONTEXT_LIMIT = 5
EXCERPT_CHARS = 300
POSTMASTER_FORWARD_KIND = "postmaster_forward"
POSTMASTER_TEXT_CHARS = 20_000
NON_DELIVERY_KIND = "non_delivery"
# The returned header section: room for any honest header, and a bound on the job row and
# on the report a forged-looking message can make us send.
NON_DELIVERY_HEADER_BYTES = 64 * 1024
# A header value shown in a forward: RFC 5322's line limit is room for any honest one.
_HEADER_CHARS = 998

_SPACES = re.compile(r"\s+")
# An approval link's subject: "<message id>|<draft digest>". The whole SHA-256: the agent
# writes both drafts, so what it needs is a collision, which a 64-bit digest would give it
# for about 2**32 hashes. Links minted with the 16-character digest of the release before
# are still read (for the 72 hours they live) by comparing that prefix.
_DIGEST_SEP = "|"
_DIGEST_CHARS = 64
_LEGACY_DIGEST_CHARS = 16


def secret_key(services: Services) -> bytes:
    secret = services.extras.get("secret_key")
    if not isinstance(secret, bytes):
        raise RuntimeError("services.extras['secret_key'] must hold the link-signing secret")
    return secret


def oversight_address(conn: Connection, account_id: str) -> str | None:
    row = conn.execute(select(accounts.c.oversight_email).where(accounts.c.id == account_id))
    found = row.first()
    return found.oversight_email if found is not None else None


def mask_address(address: str) -> str:
    """``operator@acme.example`` → ``o******r@acme.example``: recognisable, not harvestable."""
    local, _, domain = address.partition("@")
    if len(local) <= 2:
        return f"{local[:1]}*@{domain}"
    return f"{local[0]}{'*' * (len(local) - 2)}{local[-1]}@{domain}"


class _Unknown:
    """Marks a hint the caller did not give (None is a real answer: no oversight address)."""


_UNKNOWN = _Unknown()


def enqueue_operator_mail(
    conn: Connection,
    services: Services,
    account_id: str,
    subject: str,
    markdown: str,
    kind: str,
) -> str | None:
    """Queue one email to the account's oversight address; None when the account has none."""
    to = oversight_address(conn, account_id)
    if not to:
        return None
    return enqueue_system_mail(
        conn, to=to, subject=subject, markdown=markdown, kind=kind, account_id=account_id
    )


def enqueue_system_mail(
    conn: Connection,
    *,
    to: str,
    subject: str,
    markdown: str,
    kind: str,
    account_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Queue one email from ``multimail@<server domain>`` to ``to``; returns the job's id.

    ``account_id`` makes the account's suppression list apply to it; mail for the server's
    own operator (no account) has none."""
    payload: dict[str, Any] = {
        **(extra or {}),
        "to": [to],
        "subject": subject,
        "markdown": markdown,
        "kind": kind,
    }
    if account_id is not None:
        payload["account_id"] = account_id
    job_id = jobs.enqueue(conn, SYSTEM_MAIL_JOB, payload)
    if job_id is None:  # only a dedupe key skips the insert, and none is given
        raise RuntimeError("the system mail job was not written")
    return job_id


def _link(services: Services, purpose: str, subject_id: str, action: str, ttl: timedelta) -> str:
    token = make_token(
        secret_key(services),
        purpose=purpose,
        subject_id=subject_id,
        action=action,
        expires_at=int(time.time() + ttl.total_seconds()),
        nonce=new_nonce(),
    )
    path = "approve" if purpose == APPROVAL_PURPOSE else "unsubscribe"
    return f"{services.settings.base_url}/v1/{path}/{token}"


def draft_digest(row: Mapping[str, Any] | RowMapping) -> str:
    """A short digest of what a reviewer approves: recipients, subject and body."""
    content = [
        row.get("subject") or "",
        row.get("markdown") or "",
        *(list(row.get(field) or []) for field in ("to", "cc", "bcc")),
    ]
    encoded = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()[:_DIGEST_CHARS]


def draft_matches(row: Mapping[str, Any] | RowMapping, digest: str) -> bool:
    """True when an approval link's ``digest`` names the draft ``row`` holds now."""
    if len(digest) not in (_DIGEST_CHARS, _LEGACY_DIGEST_CHARS):
        return False
    return hmac.compare_digest(digest, draft_digest(row)[: len(digest)])


def approval_link(services: Services, draft: Mapping[str, Any] | RowMapping, action: str) -> str:
    """A signed, single-use, 72-hour link whose POST approves or rejects the message ``draft``
    is the row of; an Approve link approves only this draft (see :func:`link_subject`)."""
    if action not in ("approve", "reject"):
        raise InvalidInput("an approval link is for 'approve' or 'reject'")
    subject_id = f"{draft['id']}{_DIGEST_SEP}{draft_digest(draft)}"
    return _link(services, APPROVAL_PURPOSE, subject_id, action, APPROVAL_LINK_TTL)


def link_subject(subject_id: str) -> tuple[str, str | None]:
    """``(message_id, digest)`` of an approval link's subject; the digest is None in links
    minted before links named the draft they showed."""
    message_id, separator, digest = subject_id.partition(_DIGEST_SEP)
    return message_id, (digest if separator else None)


def unsubscribe_url(services: Services, account_id: str, address: str) -> str:
    """The https half of ``List-Unsubscribe``: its POST suppresses ``address`` (RFC 8058)."""
    subject = f"{account_id}|{normalize_address(address)}"
    return _link(services, UNSUBSCRIBE_PURPOSE, subject, "unsubscribe", UNSUBSCRIBE_LINK_TTL)


def read_unsubscribe_token(services: Services, token: str) -> tuple[str, str]:
    """``(account_id, address)`` from a valid unsubscribe token; InvalidLinkToken otherwise."""
    link = read_token(
        secret_key(services), token, purpose=UNSUBSCRIBE_PURPOSE, now=int(time.time())
    )
    account_id, sep, address = link.subject_id.partition("|")
    if not sep or not account_id:
        raise InvalidInput("this unsubscribe link names no recipient", code="link_token_invalid")
    try:
        return account_id, normalize_address(address)
    except AddressError:
        raise InvalidInput(
            "this unsubscribe link names no recipient", code="link_token_invalid"
        ) from None


def unsubscribe(services: Services, token: str) -> dict[str, Any]:
    """Suppress the address the token names (idempotent: a second click changes nothing)."""
    account_id, address = read_unsubscribe_token(services, token)
    actor = Actor(type="system", id=None, name="list-unsubscribe", account_id=account_id)
    with services.db.write() as conn:
        if conn.execute(select(accounts.c.id).where(accounts.c.id == account_id)).first() is None:
            raise InvalidInput(
                "this unsubscribe link is no longer valid", code="link_token_invalid"
            )
        directory.suppress(
            conn,
            actor=actor,
            account_id=account_id,
            address=address,
            reason="unsubscribe",
            details="List-Unsubscribe one-click",
        )
    return {"address": address, "suppressed": True}


def _excerpt(row: Mapping[str, Any] | RowMapping) -> str:
    body = row.get("text") or row.get("markdown") or ""
    flat = _SPACES.sub(" ", str(body)).strip()
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 1] + "…"


def thread_context(
    conn: Connection, row: Mapping[str, Any] | RowMapping, *, limit: int = THREAD_CONTEXT_LIMIT
) -> list[dict[str, Any]]:
    """The messages before this one in its thread, oldest first, each summarised."""
    if not row.get("thread_id"):
        return []
    earlier = (
        conn.execute(
            select(messages)
            .where(messages.c.thread_id == row["thread_id"], messages.c.id < row["id"])
            .order_by(messages.c.id.desc())
            .limit(limit)
        )
        .mappings()
        .all()
    )
    return [
        {
            "id": r["id"],
            "direction": r["direction"],
            "status": r["status"],
            "from": r["from_address"],
            "to": list(r["to"] or []),
            "subject": r["subject"] or "",
            "date": isoformat(r["created_at"]),
            "excerpt": _excerpt(r),
        }
        for r in reversed(earlier)
    ]


def _mailbox_address(conn: Connection, mailbox_id: str) -> str:
    found = conn.execute(select(mailboxes.c.address).where(mailboxes.c.id == mailbox_id)).first()
    return str(found.address) if found is not None else mailbox_id


def _draft_markdown(conn: Connection, row: Mapping[str, Any] | RowMapping) -> list[str]:
    mailbox = _mailbox_address(conn, row["mailbox_id"])
    lines = [
        f"- **Mailbox:** {mailbox}",
        f"- **Direction:** {row['direction']}",
        f"- **From:** {row.get('from_address') or '-'}",
        f"- **To:** {', '.join(row.get('to') or []) or '-'}",
    ]
    if row.get("cc"):
        lines.append(f"- **Cc:** {', '.join(row['cc'])}")
    if row.get("bcc"):
        # An approval covers every recipient: a hidden copy is where a misled agent leaks.
        lines.append(f"- **Bcc (hidden from the other recipients):** {', '.join(row['bcc'])}")
    if row.get("created_by_key_name"):
        lines.append(f"- **Written by:** {row['created_by_key_name']}")
    lines += ["", "**Subject:**", "", fenced(row.get("subject") or ""), "", "**Body:**", ""]
    lines.append(fenced(row.get("markdown") or ""))
    files = message_views.attachments_for(conn, [row["id"]])[row["id"]]
    if files:
        # Fenced: a file name is the agent's text and must not become a link in this mail.
        listed = "\n".join(
            f"{_SPACES.sub(' ', a['filename'])} ({a['content_type']}, {a['size_bytes']} bytes)"
            for a in files
        )
        lines += ["", "**Attached:**", "", fenced(listed)]
    findings = row.get("scan_findings") or []
    if findings:
        lines += ["", "**Scan findings:**", ""]
        for finding in findings:
            if isinstance(finding, Mapping):
                label = finding.get("message") or finding.get("code") or str(dict(finding))
                lines.append(f"- {_SPACES.sub(' ', str(label))}")
            else:
                lines.append(f"- {_SPACES.sub(' ', str(finding))}")
    context = thread_context(conn, row)
    if context:
        lines += ["", "**Earlier in this thread:**", ""]
        for item in context:
            lines.append(f"- {item['date']} · {item['direction']} · from {item['from'] or '-'}")
            lines.append("")
            lines.append(fenced(f"{item['subject']}\n\n{item['excerpt']}"))
    return lines


def notify_pending(
    conn: Connection,
    services: Services,
    message_row: Mapping[str, Any],
    *,
    oversight_email: str | _Unknown | None = _UNKNOWN,
) -> str | None:
    """Record that the operator is owed an approval request for this message.

    Only the job is written here; the worker writes the mail when it sends it
    (:func:`approval_request_mail`), so a send does not pay for the links and the draft
    text, and the links' 72 hours start when the mail goes out. ``oversight_email`` is the
    account's oversight address when the caller read it in this transaction already.
    """
    account_id = str(message_row["account_id"])
    to = (
        oversight_address(conn, account_id)
        if isinstance(oversight_email, _Unknown)
        else oversight_email
    )
    if not to:
        return None
    payload = {
        "to": [to],
        "kind": APPROVAL_REQUEST_KIND,
        "account_id": account_id,
        "message_id": str(message_row["id"]),
    }
    return jobs.enqueue(conn, SYSTEM_MAIL_JOB, payload)


def approval_request_mail(
    conn: Connection, services: Services, message_id: str
) -> tuple[str, str] | None:
    """The approval request for ``message_id`` as ``(subject, markdown)``, with fresh
    one-click Approve / Reject links; None when the message no longer waits for a decision
    (decided, cancelled, expired or gone).
    """
    found = conn.execute(select(messages).where(messages.c.id == message_id)).mappings().first()
    if found is None or found["status"] not in DECIDABLE:
        return None
    approve = approval_link(services, found, "approve")
    reject = approval_link(services, found, "reject")
    lines = [
        "A message is waiting for your decision.",
        "",
        *_draft_markdown(conn, found),
        "",
        f"[Approve]({approve}) · [Reject]({reject})",
        "",
        "Each link opens a confirmation page first; nothing is decided until you confirm. "
        "The links work once and expire in 72 hours. You can also decide in the dashboard "
        f"or with `POST /v1/oversight/decide` (message {message_id}).",
    ]
    subject = f"[MultiMail] Approval needed: {_SPACES.sub(' ', found['subject'] or '')}"
    return subject[:200], "\n".join(lines)


def notify_reminder(
    conn: Connection, services: Services, message_row: Mapping[str, Any]
) -> str | None:
    """The one reminder for a message that has waited past its mailbox's approval timeout."""
    message_id = str(message_row["id"])
    lines = [
        "Reminder: this message is still waiting for your decision. If nobody decides, it "
        "expires and is never sent.",
        "",
        *_draft_markdown(conn, message_row),
        "",
        f"[Approve]({approval_link(services, message_row, 'approve')}) · "
        f"[Reject]({approval_link(services, message_row, 'reject')})",
    ]
    subject = f"[MultiMail] Reminder: approval needed ({message_id})"
    return enqueue_operator_mail(
        conn, services, str(message_row["account_id"]), subject, "\n".join(lines), "reminder"
    )


def notify_monitored_copy(
    conn: Connection, services: Services, message_row: Mapping[str, Any]
) -> str | None:
    """``monitored`` mode: the operator gets a copy of what the agent sent."""
    lines = [
        "A monitored mailbox sent this message (no approval was needed; this is your copy).",
        "",
        *_draft_markdown(conn, message_row),
    ]
    subject = f"[MultiMail] Sent (monitored): {_SPACES.sub(' ', message_row.get('subject') or '')}"
    return enqueue_operator_mail(
        conn,
        services,
        str(message_row["account_id"]),
        subject[:200],
        "\n".join(lines),
        "monitored_copy",
    )


def _header_line(name: str, value: str | None) -> str:
    # One line per field, whatever the sender folded into it: a value cannot make a line
    # that reads as another field.
    shown = _SPACES.sub(" ", value or "").strip()[:_HEADER_CHARS]
    return f"{name}: {shown or '-'}"


def postmaster_forward_mail(
    *,
    postmasters: Sequence[str],
    inbound_id: str,
    mail_from: str,
    parsed: ParsedMessage,
    authentication: str,
    spam_score: float,
    spam_threshold: float,
    reader: str,
) -> tuple[str, str]:
    """Mail that reached ``postmasters`` (postmaster@<domain>, no mailbox) as ``(subject,
    markdown)`` for the human who reads that domain's postmaster mail, ``reader`` saying who
    that is. Whatever the sender wrote (headers, text, file names) is shown only inside
    :func:`fenced` blocks, so none of it can pass for MultiMail's own words or links."""
    first = postmasters[0]
    headers = [
        _header_line("Envelope sender", f"<{mail_from}>"),
        _header_line("Envelope recipient", ", ".join(postmasters)),
        _header_line("From", parsed.header("From")),
        _header_line("To", parsed.header("To")),
    ]
    if parsed.header("Cc"):
        headers.append(_header_line("Cc", parsed.header("Cc")))
    headers += [
        _header_line("Date", parsed.header("Date")),
        _header_line("Message-ID", parsed.header("Message-ID")),
        _header_line("Subject", parsed.subject),
    ]
    checks = [
        # Our header, but the domains in it are the sender's: fenced like the rest.
        _header_line("Authentication-Results", authentication),
        f"Spam score: {spam_score:g} (spam from {spam_threshold:g})",
    ]
    text = parsed.text
    cut = len(text) > POSTMASTER_TEXT_CHARS
    lines = [
        f"Mail to {first} arrived and no mailbox has that address. Every mail domain must "
        f"accept postmaster mail (RFC 5321 section 4.5.1); it comes to you as {reader}. "
        f"The original is kept as inbound message {inbound_id}.",
        "",
        "Everything inside the boxes below was written by the sender and is shown as it "
        "came; none of it is from MultiMail.",
        "",
        "**Envelope and headers:**",
        "",
        fenced("\n".join(headers)),
        "",
        "**MultiMail's checks:**",
        "",
        fenced("\n".join(checks)),
        "",
        "**Text:**",
        "",
        fenced(text[:POSTMASTER_TEXT_CHARS] if cut else text),
    ]
    if cut:
        lines += [
            "",
            f"The text was cut at {POSTMASTER_TEXT_CHARS:,} of its {len(text):,} characters; "
            f"the whole message is kept as inbound message {inbound_id}.",
        ]
    if parsed.attachments:
        listed = "\n".join(
            f"{_SPACES.sub(' ', a.filename)} ({a.content_type}, {len(a.data)} bytes)"
            for a in parsed.attachments
        )
        lines += ["", "**Attached (not forwarded):**", "", fenced(listed)]
    subject = _SPACES.sub(" ", f"[MultiMail] Mail to {first}: {parsed.subject}").strip()
    return subject[:200], "\n".join(lines)


def enqueue_non_delivery(
    conn: Connection,
    services: Services,
    *,
    to: str,
    inbound_id: str,
    recipients: Sequence[str],
    arrival_date: datetime,
    original: bytes,
) -> str:
    """Queue the delivery status notification (RFC 3464) telling ``to``, the envelope sender
    of the message stored as ``inbound_id`` (``original``, as we stored it), that it was not
    delivered to ``recipients``; returns the job's id. The report is written when it is sent
    (:func:`non_delivery_raw`), from what the payload keeps: the header section of
    ``original``, cut at NON_DELIVERY_HEADER_BYTES, and never its body."""
    return enqueue_system_mail(
        conn,
        to=to,
        subject=DSN_SUBJECT,
        markdown=dsn_explanation(services.settings.domain, list(recipients)),
        kind=NON_DELIVERY_KIND,
        extra={
            "inbound_id": inbound_id,
            "recipients": list(recipients),
            "arrival_date": isoformat(arrival_date),
            # The report's Date: one time for every attempt, so a retry is the same bytes.
            "queued_at": isoformat(utcnow()),
            "original_headers": header_section(original, NON_DELIVERY_HEADER_BYTES),
        },
    )


def _text_field(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name!r} must be text")
    return value


def non_delivery_raw(services: Services, payload: Mapping[str, Any]) -> bytes | None:
    """The RFC 3464 report a ``non_delivery`` system-mail payload asks for, ready to sign and
    send with the null reverse-path; None for a payload of any other kind. A payload the
    report cannot be written from raises InvalidInput (``invalid_job``): retrying it would
    not help."""
    if payload.get("kind") != NON_DELIVERY_KIND:
        return None
    try:
        to = payload.get("to")
        if isinstance(to, list) and len(to) == 1:
            to = to[0]
        recipients = payload.get("recipients")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise ValueError("'recipients' must be a list of addresses")
        if not isinstance(to, str):
            raise ValueError("'to' must name the one envelope sender")
        return build_dsn(
            reporting_domain=services.settings.domain,
            to=to,
            recipients=recipients,
            arrival_date=parse_datetime(_text_field(payload, "arrival_date")),
            original_headers=_text_field(payload, "original_headers"),
            report_id=_text_field(payload, "inbound_id"),
            date=parse_datetime(_text_field(payload, "queued_at")),
        )
    except ValueError as exc:
        raise InvalidInput(
            f"this non-delivery report cannot be written: {exc}", code="invalid_job"
        ) from exc
