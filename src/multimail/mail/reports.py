"""Machine reports about mail we sent: bounces (RFC 3464 DSN), complaints (RFC 5965 ARF),
and human "unsubscribe" replies.

Each parser answers ``None`` when the message is not that kind of report, so the inbound
pipeline can try them in turn. Non-standard bounces (plain-text notices from MAILER-DAEMON)
are recognised only when the original Message-ID can be found, because a bounce we cannot
tie to a message we sent must not suppress anybody.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from email.policy import default as default_policy
from typing import Literal

from multimail.mail.parse import (
    MAX_MIME_PARTS,
    ParsedMessage,
    decode_bytes,
    decode_header_value,
    read_mime,
)

__all__ = [
    "ComplaintReport",
    "DeliveryStatusReport",
    "RecipientStatus",
    "find_unsubscribe_phrase",
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
