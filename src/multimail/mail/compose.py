"""Build the outbound MIME message from a draft.

Everything a caller puts in a header is checked here, because the stdlib email package
decodes RFC 2047 encoded-words in values it is given and will then happily write a
decoded CR LF onto the wire (``Subject: =?utf-8?q?x=0D=0ABcc:_y?=`` becomes a real Bcc
header). Every value is therefore decoded the way the email package will decode it, until
nothing changes, before it is checked. As a second line of defence the finished bytes are
parsed again and must show exactly the headers and recipients we meant to write.
"""

from __future__ import annotations

import email.policy
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import errors as email_errors
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import Policy
from email.utils import format_datetime

from multimail.errors import InvalidInput
from multimail.mail.markdown import normalise_text, render_markdown

__all__ = [
    "AI_DISCLOSURE",
    "OutboundAttachment",
    "OutboundDraft",
    "body_sha256",
    "build_message",
    "compose_body",
    "draft_body_sha256",
    "safe_subject",
    "text_sha256",
]

AI_DISCLOSURE = "*This message was written by an AI agent.*"
SIGNATURE_SEPARATOR = "-- "
MAX_SUBJECT_CHARS = 998
MAX_DISPLAY_NAME_CHARS = 256
MAX_FILENAME_CHARS = 255
MAX_LINE_OCTETS = 998
_MAX_DECODE_ROUNDS = 8
_FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD stay within 78 characters

# 7bit keeps the message deliverable through relays without 8BITMIME.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_DECODE_POLICY = email.policy.default

# Everything str.splitlines() treats as a line boundary, plus NUL.
_BREAKS = re.compile("\r\n|[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00]")
_OTHER_CONTROLS = re.compile("[\x01-\x08\x0e-\x1f\x7f]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_PRINTABLE_ASCII = re.compile(r"[ -~\t]*")
_MSG_ID = re.compile(r"<[!-;=?-~]+>")
_HOSTNAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_MIME_TYPE = re.compile(r"([a-z0-9][a-z0-9!#$&^_.+-]*)/([a-z0-9][a-z0-9!#$&^_.+-]*)")

_RESERVED_HEADERS = frozenset(
    {
        "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id",
        "in-reply-to", "references", "mime-version", "dkim-signature", "return-path",
        "received", "authentication-results",
    }
)  # fmt: skip
_RESERVED_PREFIXES = ("content-", "resent-", "arc-")


@dataclass(frozen=True)
class OutboundAttachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class OutboundDraft:
    """One message as the agent (or the reviewer's edit) wrote it, before MIME."""

    from_address: str
    from_name: str | None
    to: Sequence[str]
    cc: Sequence[str]
    reply_to: str | None
    subject: str
    markdown: str
    message_id: str
    date: datetime
    in_reply_to: str | None = None
    references: Sequence[str] = ()
    signature: str | None = None
    ai_disclosure: bool = True
    operator_postal_address: str | None = None
    extra_headers: Sequence[tuple[str, str]] = ()
    attachments: Sequence[OutboundAttachment] = ()


class _RawHeader(str):
    """A header value written as given, folded only at its own spaces.

    The email package RFC 2047-encodes any unstructured token longer than a line, which
    would turn a List-Unsubscribe URL, a long Message-ID or an identity token into
    ``=?utf-8?q?...?=`` that receivers do not decode. EmailPolicy stores and folds an
    object with ``name`` and ``fold`` as a ready-made header.
    """

    name: str

    def __new__(cls, name: str, value: str) -> _RawHeader:
        obj = super().__new__(cls, " ".join(value.split()))
        obj.name = name
        if any(len(line) > MAX_LINE_OCTETS for line in obj.fold(policy=_POLICY).split("\r\n")):
            raise InvalidInput(
                f"the {name} header has a word too long for one line",
                code="header_too_long",
                header=name,
            )
        return obj

    def fold(self, *, policy: Policy) -> str:
        # The first word stays beside the name: a value starting with folding white
        # space is read with a leading space by some parsers.
        first, *rest = self.split(" ")
        lines = [f"{self.name}: {first}"]
        for word in rest:
            if len(lines[-1]) + 1 + len(word) > _FOLD_AT:
                lines.append("")
            lines[-1] += " " + word
        return policy.linesep.join(lines) + policy.linesep


def _decode_like_email_package(value: str) -> str:
    # Decode with the same parser EmailMessage.__setitem__ uses, until a fixed point.
    # Honest text is encoded once; nesting deeper than a few levels is an attack.
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = str(_DECODE_POLICY.header_factory("x-multimail-check", value))
        if decoded == value:
            return value
        value = decoded
    raise InvalidInput("a header value is nested in too many encodings", code="header_injection")


def _refuse_breaks(value: str, what: str) -> str:
    decoded = _decode_like_email_package(value) if not _BREAKS.search(value) else value
    if _BREAKS.search(decoded):
        raise InvalidInput(
            f"line breaks are not allowed in {what}", code="header_injection", field=what
        )
    return decoded


def _address(value: str, what: str) -> str:
    value = _refuse_breaks(value, what).strip()
    if "@" not in value:
        raise InvalidInput(f"invalid email address in {what}", code="invalid_address", field=what)
    local, _, domain = value.rpartition("@")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_domain = ""
    spec = f"{local}@{ascii_domain.lower()}"
    try:
        parsed = Address(addr_spec=spec)
    except (ValueError, IndexError, email_errors.HeaderParseError):
        parsed = None
    valid = (
        parsed is not None
        and parsed.addr_spec == spec
        and spec.isascii()
        and len(spec) <= 254
        and bool(parsed.username)
        and _HOSTNAME.fullmatch(ascii_domain) is not None
    )
    if not valid:
        raise InvalidInput(f"invalid email address in {what}", code="invalid_address", field=what)
    return spec


def _display_name(value: str | None) -> str:
    if not value:
        return ""
    name = _SURROGATES.sub("\ufffd", _refuse_breaks(value, "the sender name"))
    name = _OTHER_CONTROLS.sub("", name).strip()
    if len(name) > MAX_DISPLAY_NAME_CHARS:
        raise InvalidInput("the sender name is too long", code="display_name_too_long")
    return name


def safe_subject(subject: str) -> str:
    """The subject with every line break folded into a space, encoded-words included.

    An inbound subject reused in "Re: ..." may carry anything; it must never become a
    second header.
    """
    if len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidInput(
            f"the subject is longer than {MAX_SUBJECT_CHARS} characters", code="subject_too_long"
        )
    value = subject
    for _ in range(_MAX_DECODE_ROUNDS):
        cleaned = _OTHER_CONTROLS.sub("", _BREAKS.sub(" ", _SURROGATES.sub("\ufffd", value)))
        cleaned = _decode_like_email_package(cleaned)
        if cleaned == value:
            return value
        value = cleaned
    raise InvalidInput("the subject is nested in too many encodings", code="header_injection")


def _message_id(value: str, what: str) -> str:
    _refuse_breaks(value, what)
    value = value.strip()
    if not _MSG_ID.fullmatch(value) or len(value) > 900:
        raise InvalidInput(f"invalid message id in {what}", code="invalid_message_id", field=what)
    return value


def _extra_header(name: str, value: str) -> tuple[str, str | _RawHeader]:
    if not _FIELD_NAME.fullmatch(name):
        raise InvalidInput("invalid header name", code="header_injection", header=name)
    lowered = name.lower()
    if lowered in _RESERVED_HEADERS or lowered.startswith(_RESERVED_PREFIXES):
        raise InvalidInput(f"the {name} header is set by MultiMail", code="reserved_header")
    decoded = _refuse_breaks(value, f"the {name} header")
    if _OTHER_CONTROLS.search(decoded):
        raise InvalidInput(f"control characters in the {name} header", code="header_injection")
    if _PRINTABLE_ASCII.fullmatch(value):
        return name, _RawHeader(name, value)
    return name, _SURROGATES.sub("\ufffd", value)


def _attachment_type(attachment: OutboundAttachment) -> tuple[str, str]:
    match = _MIME_TYPE.fullmatch(attachment.content_type.strip().lower())
    if match is None or match.group(1) == "multipart":
        raise InvalidInput(
            "invalid attachment content type",
            code="invalid_content_type",
            content_type=attachment.content_type[:100],
        )
    if match.group(1) == "message":
        # message/* may not be base64-encoded (RFC 2046 5.2.1) and an attached message
        # is not guaranteed 7-bit clean; clients still open a .eml sent as bytes.
        return "application", "octet-stream"
    return match.group(1), match.group(2)


def _filename(value: str) -> str:
    name = _refuse_breaks(value, "an attachment filename")
    if _OTHER_CONTROLS.search(name) or _SURROGATES.search(name):
        raise InvalidInput("control characters in a filename", code="header_injection")
    name = name.strip()
    if not name or len(name) > MAX_FILENAME_CHARS or "/" in name or "\\" in name:
        raise InvalidInput("invalid attachment filename", code="invalid_filename")
    return name


def compose_body(draft: OutboundDraft) -> str:
    """The markdown as sent: body, signature after "-- ", then the footers.

    This is the text of the text/plain part, and what identity tokens and the audit log
    hash (see ``draft_body_sha256``).
    """
    sections = [normalise_text(draft.markdown).rstrip()]
    if draft.signature and draft.signature.strip():
        sections.append(f"{SIGNATURE_SEPARATOR}\n{normalise_text(draft.signature).strip()}")
    footer = []
    if draft.ai_disclosure:
        footer.append(AI_DISCLOSURE)
    if draft.operator_postal_address and draft.operator_postal_address.strip():
        footer.append(normalise_text(draft.operator_postal_address).strip())
    if footer:
        sections.append("---\n\n" + "\n\n".join(footer))
    return "\n\n".join(s for s in sections if s) + "\n"


def text_sha256(text: str) -> str:
    """Hex SHA-256 of a text body, insensitive to what transport does to line ends."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    canonical = "\n".join(line.rstrip(" \t") for line in lines).rstrip("\n")
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def draft_body_sha256(draft: OutboundDraft) -> str:
    """What ``body_sha256`` will return for ``build_message(draft)``, without building it."""
    return text_sha256(render_markdown(compose_body(draft)).text)


def body_sha256(raw_message: bytes) -> str:
    """Hex SHA-256 of the message's text/plain body as a receiver decodes it."""
    message = BytesParser(policy=_DECODE_POLICY).parsebytes(raw_message)
    assert isinstance(message, EmailMessage)
    part = message.get_body(preferencelist=("plain",))
    if part is None:
        raise InvalidInput("the message has no text/plain part", code="no_text_part")
    try:
        content = part.get_content()
    except LookupError as exc:
        raise InvalidInput(
            "the text/plain part has an unknown charset", code="no_text_part"
        ) from exc
    if not isinstance(content, str):
        raise InvalidInput("the text/plain part could not be decoded", code="no_text_part")
    return text_sha256(content)


def _html_document(fragment: str) -> str:
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n'
        f"{fragment}</body></html>\n"
    )


def build_message(draft: OutboundDraft) -> bytes:
    """The message as CRLF-terminated bytes ready for DKIM signing and SMTP.

    Raises ``InvalidInput`` (``header_injection``, ``invalid_address``, ...) rather than
    write anything a receiver could read as an extra header or recipient.
    """
    sender = _address(draft.from_address, "from")
    recipients = {
        "to": [_address(a, "to") for a in draft.to],
        "cc": [_address(a, "cc") for a in draft.cc],
    }
    reply_to = _address(draft.reply_to, "reply_to") if draft.reply_to else None
    if draft.date.tzinfo is None or draft.date.utcoffset() is None:
        raise InvalidInput("the message date must carry a time zone", code="validation_error")

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = Address(display_name=_display_name(draft.from_name), addr_spec=sender)
    if reply_to:
        msg["Reply-To"] = Address(addr_spec=reply_to)
    for field, addresses in recipients.items():
        if addresses:
            msg[field.capitalize()] = [Address(addr_spec=a) for a in addresses]
    msg["Subject"] = safe_subject(draft.subject)
    msg["Date"] = format_datetime(draft.date.astimezone(UTC))
    msg["Message-ID"] = _RawHeader("Message-ID", _message_id(draft.message_id, "message_id"))
    if draft.in_reply_to:
        value = _message_id(draft.in_reply_to, "in_reply_to")
        msg["In-Reply-To"] = _RawHeader("In-Reply-To", value)
    if draft.references:
        ids = [_message_id(r, "references") for r in draft.references]
        msg["References"] = _RawHeader("References", " ".join(ids))
    msg["MIME-Version"] = "1.0"
    for name, value in draft.extra_headers:
        field_name, field_value = _extra_header(name, value)
        msg[field_name] = field_value
    intended = [name.lower() for name in msg]

    rendered = render_markdown(compose_body(draft))
    msg.set_content(rendered.text)
    msg.add_alternative(_html_document(rendered.html), subtype="html")
    for attachment in draft.attachments:
        maintype, subtype = _attachment_type(attachment)
        msg.add_attachment(
            attachment.data, maintype, subtype, filename=_filename(attachment.filename)
        )
    for part in msg.walk():
        if part is not msg:
            # The email package stamps MIME-Version on every part; only the top needs it.
            del part["MIME-Version"]

    raw = msg.as_bytes(policy=_POLICY)
    _check_wire(raw)
    _check_headers(raw, [*intended, "content-type"], sender, recipients, reply_to)
    return raw


def _check_wire(raw: bytes) -> None:
    lines = raw.split(b"\r\n")
    unsafe = raw.find(b"\0") >= 0 or any(
        b"\r" in line or b"\n" in line or len(line) > MAX_LINE_OCTETS for line in lines
    )
    if unsafe or not raw.endswith(b"\r\n"):
        raise InvalidInput("the message could not be encoded safely", code="unsafe_message")


def _check_headers(
    raw: bytes,
    intended: list[str],
    sender: str,
    recipients: dict[str, list[str]],
    reply_to: str | None,
) -> None:
    parsed = BytesParser(policy=_DECODE_POLICY).parsebytes(raw, headersonly=True)
    found = sorted(name.lower() for name in parsed)
    addresses = {
        field: [a.addr_spec for h in parsed.get_all(field, []) for a in h.addresses]
        for field in ("from", "to", "cc", "reply-to", "bcc")
    }
    expected = {
        "from": [sender],
        "to": recipients["to"],
        "cc": recipients["cc"],
        "reply-to": [reply_to] if reply_to else [],
        "bcc": [],
    }
    if found != sorted(intended) or addresses != expected:
        raise InvalidInput(
            "a header value would have changed the message's headers or recipients",
            code="header_injection",
        )
