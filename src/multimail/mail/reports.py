"""Machine reports about mail: bounces (RFC 3464 DSN), complaints (RFC 5965 ARF), human
"unsubscribe" replies, and the one report we write ourselves (:func:`build_dsn`).

Each parser answers ``None`` when the message is not that kind of report, so the inbound
pipeline can try them in turn. Non-standard bounces (plain-text notices from MAILER-DAEMON)
are recognised only when the original Message-ID can be found, because a bounce we cannot
tie to a message we sent must not suppress anybody.

:func:`build_dsn` writes the non-delivery report for mail we accepted and then could not put
in a mailbox (RFC 5321 §6.1). It is pure: the inbound pipeline decides whether one is owed.
"""

from __future__ import annotations

import hashlib
import quopri
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import HeaderParser
from email.policy import default as default_policy
from email.utils import format_datetime
from typing import Literal

from multimail.domain.addresses import AddressError, idna_ascii, normalize_address
from multimail.mail.parse import (
    MAX_MIME_PARTS,
    ParsedMessage,
    decode_bytes,
    decode_header_value,
    read_mime,
)

__all__ = [
    "DSN_SUBJECT",
    "ComplaintReport",
    "DeliveryStatusReport",
    "RecipientStatus",
    "build_dsn",
    "dsn_explanation",
    "find_unsubscribe_phrase",
    "header_section",
    "is_bounce_sender",
    "is_unsubscribe_request",
    "parse_arf",
    "parse_dsn",
]

BounceType = Literal["hard", "soft"]

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_MSGID = re.compile(r"<[^<>\s]+@[^<>\s]+>")
_ADDRESS = re.compile(r"[^\s<>()\[\]\";:,@]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


@dataclass(frozen=True)
class RecipientStatus:
    final_recipient: str | None
    action: str
    status: str | None
    diagnostic_code: str | None = None
    original_recipient: str | None = None

    @property
    def bounce_type(self) -> BounceType | None:
        """ "hard" for a permanent (5.x.x) failure, "soft" for 4.x.x or a delay, else None."""
        if self.action == "delayed" or (self.status or "").startswith("4"):
            return "soft"
        if self.action == "failed":
            return "soft" if (self.status or "5").startswith("4") else "hard"
        return None


@dataclass(frozen=True)
class DeliveryStatusReport:
    original_message_id: str | None
    recipients: list[RecipientStatus]
    original_envelope_id: str | None = None
    reporting_mta: str | None = None
    standard: bool = True  # False for a recognised non-RFC-3464 bounce notice

    @property
    def bounce_type(self) -> BounceType | None:
        """The worst outcome over all recipients: any hard failure makes the report hard."""
        kinds = {r.bounce_type for r in self.recipients}
        if "hard" in kinds:
            return "hard"
        return "soft" if "soft" in kinds else None

    @property
    def failed_recipients(self) -> list[str]:
        return [
            r.final_recipient
            for r in self.recipients
            if r.bounce_type == "hard" and r.final_recipient is not None
        ]


@dataclass(frozen=True)
class ComplaintReport:
    feedback_type: str
    original_message_id: str | None
    original_mail_from: str | None = None
    original_rcpt_to: list[str] = field(default_factory=list)
    original_from: str | None = None
    original_to: list[str] = field(default_factory=list)
    user_agent: str | None = None
    reported_domain: str | None = None
    source_ip: str | None = None

    @property
    def complainant(self) -> str | None:
        """The recipient who complained: Original-Rcpt-To, else the original To."""
        candidates = self.original_rcpt_to or self.original_to
        return candidates[0] if candidates else None


# --------------------------------------------------------------------------- MIME helpers


def _parts(root: Message) -> Iterator[Message]:
    # Bounded walk: a report is never deep, and hostile input must not make us recurse.
    stack = [root]
    seen = 0
    while stack and seen < MAX_MIME_PARTS:
        part = stack.pop()
        seen += 1
        yield part
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart" and isinstance(payload, list):
            stack.extend(c for c in reversed(payload) if isinstance(c, Message))


def _is_report(root: Message, report_type: str) -> bool:
    if root.get_content_type() != "multipart/report":
        return False
    declared = root.get_param("report-type")
    return isinstance(declared, str) and declared.strip().lower() == report_type


# RFC 6533's types: the email package knows neither, so it parses each as an encapsulated
# message (the first field block as its headers, the rest as its body).
_GLOBAL_FIELDS = frozenset({"message/global-delivery-status", "message/global-headers"})


def _global_text(part: Message) -> str | None:
    """The text of a message/global-delivery-status or -headers part, put back together."""
    payload = part.get_payload()
    if part.get_content_type() not in _GLOBAL_FIELDS or not isinstance(payload, list):
        return None
    inner = payload[0] if payload else None
    if not isinstance(inner, Message):
        return ""
    head = "".join(f"{name}: {value}\n" for name, value in inner.raw_items())
    body = inner.get_payload()
    return head + "\n" + (body if isinstance(body, str) else "")


def _blocks_of(text: str) -> list[list[tuple[str, str]]]:
    blocks = []
    for chunk in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        fields = HeaderParser(policy=default_policy).parsestr(chunk.strip("\n") + "\n")
        items = [(k, decode_header_value(str(v))) for k, v in fields.raw_items()]
        if items:
            blocks.append(items)
    return blocks


def _field_blocks(part: Message) -> list[list[tuple[str, str]]]:
    """The header-style field blocks of a delivery-status or feedback-report part."""
    rebuilt = _global_text(part)
    if rebuilt is not None:
        return _blocks_of(rebuilt)
    payload = part.get_payload()
    if isinstance(payload, list) and payload:
        return [
            [(k, decode_header_value(str(v))) for k, v in block.raw_items()]
            for block in payload
            if isinstance(block, Message)
        ]
    raw = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""
    if str(part.get("Content-Transfer-Encoding", "")).strip().lower() in {
        "base64",
        "quoted-printable",
    }:
        decoded = part.get_payload(decode=True)
        raw = decoded if isinstance(decoded, bytes) else raw
    return _blocks_of(decode_bytes(raw, part.get_content_charset())[0])


def _get(block: list[tuple[str, str]], name: str) -> str | None:
    wanted = name.lower()
    return next((v for k, v in block if k.lower() == wanted), None)


def _typed_value(value: str | None) -> str | None:
    # "rfc822; user@example.com" -> "user@example.com"
    if value is None:
        return None
    _, sep, rest = value.partition(";")
    result = (rest if sep else value).strip().strip("<>").strip()
    return result or None


def _original_headers(root: Message) -> Message | None:
    """The headers of the returned original: message/rfc822 or text/rfc822-headers."""
    for part in _parts(root):
        ctype = part.get_content_type()
        payload = part.get_payload()
        if ctype in {"message/rfc822", "message/global"} and isinstance(payload, list):
            inner = payload[0] if payload else None
            if isinstance(inner, Message):
                return inner
        if ctype == "message/global-headers":
            rebuilt = _global_text(part) or ""
            return HeaderParser(policy=default_policy).parsestr(rebuilt)
        if ctype == "text/rfc822-headers":
            data = part.get_payload(decode=True)
            text = decode_bytes(data if isinstance(data, bytes) else b"", None)[0]
            return HeaderParser(policy=default_policy).parsestr(text.replace("\r\n", "\n"))
    return None


def _header(msg: Message | None, name: str) -> str | None:
    if msg is None:
        return None
    wanted = name.lower()
    value = next((str(v) for k, v in msg.raw_items() if k.lower() == wanted), None)
    return decode_header_value(value) if value is not None else None


def _msgid(value: str | None) -> str | None:
    if not value:
        return None
    match = re.search(r"<([^<>]+)>", value)
    token = match.group(1) if match else value.split()[0] if value.split() else ""
    token = "".join(token.split())
    return f"<{token}>" if token else None


def _addresses(value: str | None) -> list[str]:
    return _ADDRESS.findall(value or "")


def _xtext(value: str) -> str:
    # RFC 3461 xtext: "+XX" is a hex-escaped byte.
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


# --------------------------------------------------------------------------- DSN


def parse_dsn(raw: bytes) -> DeliveryStatusReport | None:
    """Read an RFC 3464 bounce (or a recognised plain-text one); None if it is not a bounce."""
    try:
        root = read_mime(raw)
    except Exception:
        return None
    if _is_report(root, "delivery-status"):
        for part in _parts(root):
            if part.get_content_type() in {
                "message/delivery-status",
                "message/global-delivery-status",
            }:
                return _standard_dsn(root, _field_blocks(part))
    return _nonstandard_bounce(root)


def _standard_dsn(root: Message, blocks: list[list[tuple[str, str]]]) -> DeliveryStatusReport:
    per_message = blocks[0] if blocks else []
    recipients = []
    for block in blocks:
        final = _typed_value(_get(block, "Final-Recipient"))
        original = _typed_value(_get(block, "Original-Recipient"))
        action = (_get(block, "Action") or "").strip().lower()
        if final is None and original is None and not action:
            continue
        status_match = _STATUS.search(_get(block, "Status") or "")
        recipients.append(
            RecipientStatus(
                final_recipient=final or original,
                action=action or "failed",
                status=status_match.group(0) if status_match else None,
                diagnostic_code=_get(block, "Diagnostic-Code"),
                original_recipient=original,
            )
        )
    envelope = _get(per_message, "Original-Envelope-Id")
    envelope_id = _xtext(envelope.strip()) if envelope else None
    message_id = _msgid(_header(_original_headers(root), "Message-ID"))
    if message_id is None and envelope_id and "@" in envelope_id:
        message_id = _msgid(envelope_id)
    return DeliveryStatusReport(
        original_message_id=message_id,
        recipients=recipients,
        original_envelope_id=envelope_id,
        reporting_mta=_typed_value(_get(per_message, "Reporting-MTA")),
    )


_BOUNCE_SUBJECTS = re.compile(
    r"undelivered mail returned to sender|delivery status notification \((failure|delay)\)"
    r"|mail delivery failed|undeliverable:|returned mail:|failure notice"
    r"|delivery (has )?failed|mail delivery subsystem|delayed mail",
    re.IGNORECASE,
)
_BOUNCE_SENDERS = re.compile(r"^(mailer-daemon|postmaster|mail-daemon)@", re.IGNORECASE)


def is_bounce_sender(address: str) -> bool:
    """True for the addresses mail systems send their reports from (MAILER-DAEMON@ and the
    like): a report to one of them would answer a report, the loop RFC 3834 §2 warns of."""
    return _BOUNCE_SENDERS.match(address.strip()) is not None


def _nonstandard_bounce(root: Message) -> DeliveryStatusReport | None:
    sender = _header(root, "From") or ""
    addresses = _addresses(sender)
    subject = _header(root, "Subject") or ""
    from_daemon = any(_BOUNCE_SENDERS.match(a) for a in addresses) or "mailer-daemon" in (
        sender.lower()
    )
    if not (from_daemon and _BOUNCE_SUBJECTS.search(subject)):
        return None
    original = _original_headers(root)
    message_id = _msgid(_header(original, "Message-ID"))
    body = _plain_body(root)
    if message_id is None:
        # Some MTAs paste the original headers into the text instead of attaching them.
        match = re.search(r"^\s*message-id:\s*(<[^<>\s]+>)", body, re.IGNORECASE | re.MULTILINE)
        message_id = match.group(1) if match else None
    if message_id is None:
        return None
    delayed = re.search(r"delay", subject, re.IGNORECASE) is not None
    status = _STATUS.search(body)
    failed: list[str | None] = list(_addresses(_header(root, "X-Failed-Recipients")))
    if not failed:
        # Postfix's plain notice: "<user@example.com>: host ... said: 550 5.1.1 ..."
        failed = list(re.findall(r"^<([^<>\s]+@[^<>\s]+)>:", body, re.MULTILINE))
    recipients = [
        RecipientStatus(
            final_recipient=address,
            action="delayed" if delayed else "failed",
            status=status.group(0) if status else None,
            diagnostic_code=_diagnostic_line(body, status),
        )
        for address in (failed or [None])
    ]
    return DeliveryStatusReport(message_id, recipients, standard=False)


def _diagnostic_line(body: str, status: re.Match[str] | None) -> str | None:
    if status is None:
        return None
    start = body.rfind("\n", 0, status.start()) + 1
    end = body.find("\n", status.end())
    return body[start : end if end >= 0 else None].strip() or None


def _plain_body(root: Message) -> str:
    for part in _parts(root):
        if part.get_content_type() == "text/plain":
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                return decode_bytes(data, part.get_content_charset())[0].replace("\r\n", "\n")
    return ""


# --------------------------------------------------------------------------- ARF


def parse_arf(raw: bytes) -> ComplaintReport | None:
    """Read an RFC 5965 abuse/feedback report; None if the message is not one."""
    try:
        root = read_mime(raw)
    except Exception:
        return None
    if not _is_report(root, "feedback-report"):
        return None
    report = next(
        (p for p in _parts(root) if p.get_content_type() == "message/feedback-report"), None
    )
    if report is None:
        return None
    fields = [item for block in _field_blocks(report) for item in block]
    original = _original_headers(root)
    return ComplaintReport(
        feedback_type=(_get(fields, "Feedback-Type") or "other").strip().lower(),
        original_message_id=_msgid(_header(original, "Message-ID")),
        original_mail_from=_typed_value(_get(fields, "Original-Mail-From")),
        original_rcpt_to=[
            address
            for k, v in fields
            if k.lower() == "original-rcpt-to"
            for address in _addresses(v)
        ],
        original_from=next(iter(_addresses(_header(original, "From"))), None),
        original_to=_addresses(_header(original, "To")),
        user_agent=_get(fields, "User-Agent"),
        reported_domain=_get(fields, "Reported-Domain"),
        source_ip=_get(fields, "Source-IP"),
    )


# --------------------------------------------------------------------------- unsubscribe

# Each phrase is a human way of saying "stop mailing me"; matched on word boundaries,
# case-insensitively, in the subject and the first lines the sender actually wrote.
UNSUBSCRIBE_PHRASES: tuple[str, ...] = (
    "unsubscribe",
    "remove me",
    "stop emailing",
    "stop e-mailing",
    "stop mailing",
    "stop sending",
    "stop contacting",
    "take me off",
    "opt out",
    "opt-out",
    "do not email",
    "don't email",
    "do not contact",
    "don't contact",
)
_UNSUBSCRIBE = re.compile(
    r"\b(" + "|".join(re.escape(p) for p in UNSUBSCRIBE_PHRASES) + r")\b", re.IGNORECASE
)
_LINES_READ = 5


def find_unsubscribe_phrase(parsed: ParsedMessage) -> str | None:
    """The phrase that makes ``parsed`` an unsubscribe request, or None; quotes are ignored."""
    written = [line for line in parsed.new_content.splitlines() if line.strip()]
    for text in [parsed.subject, *written[:_LINES_READ]]:
        match = _UNSUBSCRIBE.search(text.replace("\u2019", "'"))
        if match:
            return match.group(1).lower()
    # A reply that says nothing but "STOP" is the SMS convention, and just as clear.
    if [line.strip(" .!").lower() for line in written] == ["stop"]:
        return "stop"
    return None


def is_unsubscribe_request(parsed: ParsedMessage) -> bool:
    """True when the subject or the sender's own first lines ask to stop receiving mail."""
    return find_unsubscribe_phrase(parsed) is not None


# --------------------------------------------------------------------------- DSN we write

DSN_SUBJECT = "Undelivered Mail Returned to Sender"
_DSN_STATUS = "5.1.1"
_DSN_DIAGNOSTIC = "smtp; 550 5.1.1 mailbox no longer exists"
_MAX_LINE = 998  # RFC 5322 §2.1.1, without the CRLF
_REPORT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NEWLINES = re.compile(r"\r\n|\r|\n")
_PLAIN_LINE = re.compile(r"[ -~\t]*")


def header_section(raw: bytes, limit: int) -> str:
    """The header section of ``raw`` as text: whole fields (each with its continuation lines)
    while they fit in ``limit`` bytes, so a cut never leaves half a field behind.

    Undecodable bytes become U+FFFD and NUL too (PostgreSQL text cannot hold NUL); what the
    header said is for a human to read, byte-exactness is not needed."""
    fields: list[bytes] = []
    for line in raw.splitlines(keepends=True):
        if not line.strip(b"\r\n"):
            break  # the blank line that ends the header section
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    kept: list[bytes] = []
    size = 0
    for item in fields:
        if size + len(item) > limit:
            break
        kept.append(item)
        size += len(item)
    return b"".join(kept).decode("utf-8", "replace").replace("\x00", "\ufffd")


def dsn_explanation(reporting_domain: str, recipients: Sequence[str]) -> str:
    """The human-readable part of the report :func:`build_dsn` writes, as plain text."""
    them = "it" if len(recipients) == 1 else "them"
    listed = "\n".join(f"    <{address}>" for address in recipients)
    return (
        f"This is the mail system at {reporting_domain}.\n"
        "\n"
        "Your message could not be delivered to the following "
        f"{'recipient' if len(recipients) == 1 else 'recipients'}:\n"
        "\n"
        f"{listed}\n"
        "\n"
        f"The message was accepted for {them}, but the mailbox was deleted before the message\n"
        "could be put into it: the mailbox no longer exists. The message has not been\n"
        "delivered there and no further attempt will be made.\n"
        "\n"
        "The header of your message is attached below.\n"
    )


def _checked_address(value: str) -> str:
    # Every address this report writes becomes a header or a field line: refused unless it
    # is a plain one, which also keeps CR, LF and spaces out of the report.
    try:
        return normalize_address(value)
    except AddressError as exc:
        raise ValueError(f"cannot write a delivery report for {value!r}: {exc}") from None


def _crlf(lines: Sequence[str]) -> str:
    return "".join(f"{line}\r\n" for line in lines)


def _headers_part(original_headers: str) -> tuple[str, str]:
    """The returned header section as ``(part headers, part body)``.

    Whatever line breaks the sender's bytes held become CRLF, and empty lines are dropped:
    an empty line would end the section early for a reader. Text that is not plain ASCII,
    or a line too long for SMTP, is sent quoted-printable, so the report is 7-bit clean
    whatever the original was (and signs and relays as such)."""
    lines = [line for line in _NEWLINES.split(original_headers) if line.strip()]
    plain = all(len(line) <= _MAX_LINE and _PLAIN_LINE.fullmatch(line) for line in lines)
    if plain:
        return "Content-Type: text/rfc822-headers\r\n", _crlf(lines)
    encoded = quopri.encodestring("\n".join(lines).encode("utf-8") + b"\n").decode("ascii")
    return (
        "Content-Type: text/rfc822-headers; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n",
        encoded.replace("\n", "\r\n"),
    )


def _boundary(report_id: str, bodies: Sequence[str]) -> str:
    # Derived from the content, so the same report is the same bytes on every retry; the
    # sender's header text cannot hold it unless it holds a hash of itself, and is checked.
    seed = hashlib.sha256("\0".join([report_id, *bodies]).encode("utf-8")).hexdigest()
    for counter in range(1000):
        boundary = f"=_dsn_{seed[:24]}_{counter}"
        if not any(boundary in body for body in bodies):
            return boundary
    raise ValueError("no MIME boundary fits this report")  # unreachable outside a bug


def _date(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return format_datetime(value.astimezone(UTC))


def build_dsn(
    *,
    reporting_domain: str,
    to: str,
    recipients: Sequence[str],
    arrival_date: datetime,
    original_headers: str,
    report_id: str,
    date: datetime,
) -> bytes:
    """An RFC 3464 delivery status notification: ``recipients`` of a message that arrived at
    ``arrival_date`` failed for good (5.1.1, the mailbox no longer exists). Sent to ``to``
    (the envelope sender) from ``MAILER-DAEMON@<reporting_domain>``.

    ``original_headers`` (the header section of the message, see :func:`header_section`)
    is returned in a ``text/rfc822-headers`` part and nowhere else: the sender's text cannot
    add a field to the report, and no body or attachment travels back. ``report_id`` names
    the report (the inbound message's id) and makes its Message-ID, so a retry of the same
    report is recognisable. Raises ValueError for an address or domain it cannot write."""
    if not recipients:
        raise ValueError("a delivery report needs at least one recipient")
    if not _REPORT_ID.fullmatch(report_id):
        raise ValueError(f"{report_id!r} cannot name a report")
    try:
        domain = idna_ascii(reporting_domain)
    except AddressError as exc:
        raise ValueError(f"cannot report as {reporting_domain!r}: {exc}") from None
    sender = _checked_address(to)
    failed = list(dict.fromkeys(_checked_address(address) for address in recipients))
    text = _crlf(_NEWLINES.split(dsn_explanation(domain, failed).rstrip("\n")))
    per_message = [f"Reporting-MTA: dns; {domain}", f"Arrival-Date: {_date(arrival_date)}"]
    blocks = [_crlf(per_message)]
    for address in failed:
        blocks.append(
            _crlf(
                [
                    f"Final-Recipient: rfc822; {address}",
                    "Action: failed",
                    f"Status: {_DSN_STATUS}",
                    f"Diagnostic-Code: {_DSN_DIAGNOSTIC}",
                ]
            )
        )
    status = "\r\n".join(blocks)
    headers_type, headers_body = _headers_part(original_headers)
    boundary = _boundary(report_id, [text, status, headers_body])
    parts = [
        ("Content-Type: text/plain; charset=us-ascii\r\n", text),
        ("Content-Type: message/delivery-status\r\n", status),
        (headers_type, headers_body),
    ]
    head = _crlf(
        [
            f"From: Mail Delivery System <MAILER-DAEMON@{domain}>",
            f"To: {sender}",
            f"Subject: {DSN_SUBJECT}",
            f"Date: {_date(date)}",
            f"Message-ID: <{report_id}.dsn@{domain}>",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            "Content-Type: multipart/report; report-type=delivery-status;",
            f' boundary="{boundary}"',
        ]
    )
    body = "This is a delivery status notification (RFC 3464) in MIME format.\r\n"
    for part_headers, part_body in parts:
        # Each body ends with CRLF; the CRLF before the next delimiter is the delimiter's
        # own (RFC 2046 §5.1.1), so the blank line keeps the body's last line break.
        body += f"\r\n--{boundary}\r\n{part_headers}\r\n{part_body}"
    body += f"\r\n--{boundary}--\r\n"
    return (head + "\r\n" + body).encode("ascii")
