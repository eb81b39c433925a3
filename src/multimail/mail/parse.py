"""Inbound messages, parsed defensively into what the rest of MultiMail needs.

``parse_message`` is total over anything that looks like a message: broken MIME, lying
charsets, absurd nesting and garbage encodings are recorded in ``defects`` and parsed as far
as they go. The one refusal is input with no header field at all (empty input included),
which is not an RFC 5322 message; that raises ``UnparseableMessage`` so the caller can keep
the raw bytes aside instead of storing an empty message.

Decisions worth knowing:

* Bodies in an unknown or missing charset are tried as UTF-8, then windows-1252, then
  latin-1 (which never fails). A declared charset that exists decodes with replacement.
* ``text`` is the text/plain body; for HTML-only mail (or a blank text/plain alternative
  beside the HTML) it is the markdown rendering, which reads as plain text and keeps quotes
  as ``>`` lines so the reply split still works.
* A text/* attachment's ``content_type`` keeps the charset the sender declared
  (``text/plain; charset=iso-8859-15``): its bytes are stored undecoded.
* ``content_id`` is stored without its angle brackets, the form ``cid:`` URLs use.
* ``from_count`` counts From header fields; a single From listing several mailboxes is
  recorded as the defect ``from_lists_several_mailboxes``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import mimetypes
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from multimail.errors import InvalidInput
from multimail.mail.htmlmd import html_to_markdown, sanitize_html

__all__ = [
    "MAX_MIME_DEPTH",
    "MAX_MIME_PARTS",
    "ParsedAttachment",
    "ParsedMessage",
    "UnparseableMessage",
    "decode_bytes",
    "decode_header_value",
    "parse_message",
    "prepend_header",
    "read_mime",
    "sanitize_filename",
    "split_reply",
    "strip_headers",
]

MAX_MIME_DEPTH = 20
MAX_MIME_PARTS = 500
_MAX_FILENAME = 200
_SINGLETON_HEADERS = frozenset(
    {"from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id"}
    | {"in-reply-to", "references"}
)


class UnparseableMessage(InvalidInput):
    """The bytes carry no header field at all, so they are not an email message."""

    code = "unparseable_message"


@dataclass(frozen=True)
class ParsedAttachment:
    filename: str
    content_type: str
    data: bytes
    inline: bool = False
    content_id: str | None = None


@dataclass(frozen=True)
class ParsedMessage:
    message_id: str | None
    in_reply_to: str | None
    references: list[str]
    subject: str
    from_address: str | None
    from_name: str | None
    from_count: int
    to: list[str]
    cc: list[str]
    reply_to: list[str]
    date: datetime | None
    text: str
    markdown: str
    html: str | None
    new_content: str
    quoted_content: str
    attachments: list[ParsedAttachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    auto_submitted: bool = False
    defects: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first decoded value of header ``name`` (case-insensitive), if present."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


# --------------------------------------------------------------------------- MIME reading


class _BoundedMessage(EmailMessage):
    """An EmailMessage that knows its depth, so the stdlib parser stops descending.

    The feed parser recurses once per nested multipart or message/* part and dies with
    RecursionError near 1,000 levels. It decides whether to descend by asking the part for
    its content type, so a part beyond the cap answers application/octet-stream and its
    remaining bytes are kept as an opaque payload instead.
    """

    _mm_depth = 0

    def attach(self, payload: Any) -> None:
        if isinstance(payload, _BoundedMessage):
            payload._mm_depth = self._mm_depth + 1
        super().attach(payload)

    def declared_content_type(self) -> str:
        return super().get_content_type()

    def too_deep(self) -> bool:
        return self._mm_depth >= MAX_MIME_DEPTH and self.declared_content_type().startswith(
            ("multipart/", "message/")
        )

    def get_content_type(self) -> str:
        if self.too_deep():
            return "application/octet-stream"
        return self.declared_content_type()


def read_mime(raw: bytes) -> EmailMessage:
    """Parse ``raw`` with the stdlib (policy.default), capping nesting at MAX_MIME_DEPTH."""
    parser = BytesParser(_class=_BoundedMessage, policy=email_policy.default)
    return parser.parsebytes(raw)


# --------------------------------------------------------------------------- decoding

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]+")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])|\r(?=[ \t])")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_NON_TEXT_CHARSETS = frozenset({"unknown-8bit", "x-unknown", "8bit", "binary", "default"})


def decode_bytes(data: bytes, charset: str | None) -> tuple[str, bool]:
    """Decode ``data``; the flag says the declared charset was unknown or wrong."""
    name = (charset or "").strip().strip("\"'").lower()
    doubtful = False
    if name and name not in _NON_TEXT_CHARSETS:
        try:
            codec = codecs.lookup(name).name
            if codec == "ascii" and not data.isascii():
                # Mislabelled 8-bit text is far more common than real ASCII with noise.
                raise LookupError(name)
            return data.decode(codec, "replace"), False
        except Exception:
            doubtful = True
    for fallback in ("utf-8", "cp1252"):
        try:
            return data.decode(fallback), doubtful
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), doubtful


def _fix_8bit(value: str) -> str:
    # The bytes parser keeps raw 8-bit header bytes as surrogate escapes.
    if value.isascii():
        return value
    return decode_bytes(value.encode("utf-8", "surrogateescape"), None)[0]


def _decode_word(encoding: str, payload: str) -> bytes:
    raw = payload.encode("utf-8", "surrogateescape")
    if encoding in "bB":
        try:
            return base64.b64decode(raw + b"=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            return raw
    return _Q_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw.replace(b"_", b" "))


def _decode_encoded_words(text: str) -> str:
    # Adjacent words of one charset are joined as bytes first: senders split multi-byte
    # characters across words. Whitespace between encoded words is not content (RFC 2047).
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    pos = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            out.append(decode_bytes(bytes(pending), pending_charset)[0])
            pending.clear()
            pending_charset = None

    for match in _ENCODED_WORD.finditer(text):
        between = text[pos : match.start()]
        charset = match.group(1).split("*", 1)[0]
        if between.strip() or pending_charset is None or charset.lower() != pending_charset:
            flush()
            if between.strip() or not out or pos == 0:
                out.append(between)
        pending.extend(_decode_word(match.group(2), match.group(3)))
        pending_charset = charset.lower()
        pos = match.end()
    flush()
    out.append(text[pos:])
    return "".join(out)


def decode_header_value(value: str) -> str:
    """Unfold, repair 8-bit bytes, decode RFC 2047 words and fold CR/LF/controls to spaces."""
    text = _fix_8bit(_UNFOLD.sub("", value))
    if "=?" in text:
        text = _decode_encoded_words(text)
    return _CONTROL.sub(" ", text).strip()


def _snake(name: str) -> str:
    name = name.removesuffix("Defect")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


# --------------------------------------------------------------------------- headers


def _raw_headers(msg: Message) -> list[tuple[str, str]]:
    return [(name, str(value)) for name, value in msg.raw_items()]


def _values(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    wanted = name.lower()
    return [value for key, value in headers if key.lower() == wanted]


def _addresses(raw_values: Iterable[str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for raw in raw_values:
        unfolded = _fix_8bit(_UNFOLD.sub("", raw))
        for name, addr in getaddresses([unfolded]):
            addr = _CONTROL.sub("", addr).strip()
            if addr and not any(ch.isspace() for ch in addr):
                found.append((decode_header_value(name), addr))
    return found


_MSGID = re.compile(r"<([^<>]+)>")


def _msg_ids(value: str) -> list[str]:
    ids = ["<" + "".join(m.group(1).split()) + ">" for m in _MSGID.finditer(value)]
    if ids:
        return [i for i in ids if i != "<>"]
    return [f"<{token.strip('<>')}>" for token in value.split() if token.strip("<>")]


def _first_msg_id(values: list[str]) -> str | None:
    for value in values:
        ids = _msg_ids(decode_header_value(value))
        if ids:
            return ids[0]
    return None


def _date(values: list[str], defects: list[str]) -> datetime | None:
    if not values:
        return None
    try:
        parsed = parsedate_to_datetime(decode_header_value(values[0]))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        defects.append("invalid_date")
        return None


def _is_auto_submitted(headers: Sequence[tuple[str, str]]) -> bool:
    for value in _values(headers, "Auto-Submitted"):
        token = decode_header_value(value).split(";")[0].strip().lower()
        if token and token != "no":
            return True
    precedence = {decode_header_value(v).strip().lower() for v in _values(headers, "Precedence")}
    return bool(precedence & {"bulk", "junk", "list"})


# --------------------------------------------------------------------------- body and parts


def _part_header(part: Message, name: str) -> str | None:
    values = _values(_raw_headers(part), name)
    return decode_header_value(values[0]) if values else None


def _payload_bytes(part: Message) -> bytes:
    if part.is_multipart():
        # A message/* part: keep the enclosed message as it was, minus our own headers.
        whole = part.as_bytes(policy=email_policy.compat32)
        _head, sep, body = whole.partition(b"\n\n")
        return body if sep else whole
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _disposition(part: Message) -> str | None:
    value = _part_header(part, "Content-Disposition")
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        return None
    return decode_header_value(str(name)) if name else None


def sanitize_filename(name: str | None, content_type: str, index: int) -> str:
    """A filename safe to show and to store: no directories, no control or bidi characters."""
    cleaned = ""
    if name:
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        cleaned = "".join(ch for ch in base if unicodedata.category(ch) not in {"Cc", "Cf"})
        cleaned = cleaned.strip().lstrip(".").strip()
    if not cleaned:
        if content_type == "message/rfc822":
            extension = ".eml"
        else:
            extension = mimetypes.guess_extension(content_type, strict=False) or ".bin"
        return f"attachment-{index}{extension}"
    if len(cleaned) > _MAX_FILENAME:
        stem, dot, ext = cleaned.rpartition(".")
        if dot and 0 < len(ext) <= 16:
            cleaned = stem[: _MAX_FILENAME - len(ext) - 1] + "." + ext
        else:
            cleaned = cleaned[:_MAX_FILENAME]
    return cleaned


@dataclass
class _Body:
    plain: str | None = None
    html: str | None = None
    attachments: list[ParsedAttachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)


def _text_of(part: Message, body: _Body) -> str:
    text, doubtful = decode_bytes(_payload_bytes(part), part.get_content_charset())
    if doubtful:
        body.defects.append("unknown_charset")
    return text.replace("\r\n", "\n").replace("\r", "\n")


_CHARSET_NAME = re.compile(r"[A-Za-z0-9!#$%&'+^_`{}~.-]{1,40}")  # a bare RFC 2045 token


def _with_charset(ctype: str, part: Message) -> str:
    """``ctype``, plus the charset the sender declared if it is text: its bytes are kept as
    they came, so whoever downloads them needs the charset to read them."""
    if not ctype.startswith("text/"):
        return ctype
    charset = part.get_content_charset()
    if charset and _CHARSET_NAME.fullmatch(charset):
        return f"{ctype}; charset={charset}"
    return ctype


def _leaf(part: Message, body: _Body) -> None:
    ctype = part.get_content_type()
    if isinstance(part, _BoundedMessage) and part.too_deep():
        body.defects.append("mime_depth_exceeded")
        ctype = part.declared_content_type()
    elif ctype.startswith("multipart/"):
        # Declared multipart but never split (no or unmatched boundary): keep it as text.
        ctype = "text/plain"
    disposition = _disposition(part)
    filename = _filename(part)
    is_body_candidate = disposition != "attachment" and filename is None
    if ctype == "text/plain" and is_body_candidate and body.plain is None:
        body.plain = _text_of(part, body)
        return
    if ctype == "text/html" and is_body_candidate and body.html is None:
        body.html = _text_of(part, body)
        return
    content_id = _part_header(part, "Content-ID")
    content_id = content_id.strip().strip("<>").strip() or None if content_id else None
    inline = disposition == "inline" or (disposition is None and content_id is not None)
    body.attachments.append(
        ParsedAttachment(
            filename=sanitize_filename(filename, ctype, len(body.attachments) + 1),
            content_type=_with_charset(ctype, part),
            data=_payload_bytes(part),
            inline=inline,
            content_id=content_id,
        )
    )


_BOUNDARY_LINE = re.compile(r"^--([0-9A-Za-z'()+_,./:=?-]{1,70})[ \t\r]*$", re.MULTILINE)


def _with_guessed_boundary(part: Message) -> Message | None:
    """Re-read a multipart whose boundary parameter is missing, using its first ``--`` line."""
    payload = part.get_payload()
    if not isinstance(payload, str):
        return None
    match = _BOUNDARY_LINE.search(payload)
    if match is None or match.group(1).endswith("--"):
        return None
    head = f'Content-Type: {part.get_content_type()}; boundary="{match.group(1)}"\n\n'
    return read_mime(head.encode() + payload.encode("utf-8", "surrogateescape"))


def _collect(root: Message) -> _Body:
    body = _Body()
    stack: list[Message] = [root]
    seen = 0
    guessed = False
    while stack:
        part = stack.pop()
        seen += 1
        if seen > MAX_MIME_PARTS:
            body.defects.append("mime_part_limit_exceeded")
            break
        body.defects.extend(_snake(type(d).__name__) for d in part.defects)
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart":
            if isinstance(payload, list):
                stack.extend(c for c in reversed(payload) if isinstance(c, Message))
                continue
            # Only once per message, so a guessed part cannot restart the depth count forever.
            recovered = None if guessed else _with_guessed_boundary(part)
            if recovered is not None:
                guessed = True
                body.defects.append("boundary_guessed")
                stack.append(recovered)
                continue
        _leaf(part, body)
        # Decoding may have found more defects (bad base64 and the like).
        body.defects.extend(_snake(type(d).__name__) for d in part.defects)
    return body


# --------------------------------------------------------------------------- reply split

_ATTRIBUTION = re.compile(
    r"^\s*(on\b.{0,400}\bwrote|le\b.{0,400}\ba écrit|am\b.{0,400}\bschrieb.{0,200}"
    r"|el\b.{0,400}\bescribió|op\b.{0,400}\bschreef)\s*:\s*$",
    re.IGNORECASE,
)
_EVERYTHING_BELOW = re.compile(
    r"^\s*(-{2,}\s*original message\s*-{2,}|-{2,}\s*forwarded message\s*-{2,}"
    r"|begin forwarded message:|_{10,})\s*$",
    re.IGNORECASE,
)


def _is_quote(line: str) -> bool:
    return line.lstrip().startswith(">")


def _next_content(lines: list[str], start: int) -> str:
    return next((line for line in lines[start:] if line.strip()), "")


def split_reply(text: str) -> tuple[str, str]:
    """Split a reply into (new content, quoted content).

    Quoted content is every ``>`` line, an "On … wrote:" attribution (one or two lines)
    with its quote, and everything from an "Original Message"/forward/underscore divider
    down. Text written below a quote (bottom-posting) stays new content.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    new: list[str] = []
    quoted: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _EVERYTHING_BELOW.match(line):
            quoted.extend(lines[i:])
            break
        span = 0
        if _ATTRIBUTION.match(line):
            span = 1
        elif i + 1 < len(lines) and _ATTRIBUTION.match(line + " " + lines[i + 1]):
            span = 2
        if span:
            quoted.extend(lines[i : i + span])
            if not _is_quote(_next_content(lines, i + span)):
                # The quote lost its ">" markers (HTML mail): the rest is the quote.
                quoted.extend(lines[i + span :])
                break
            i += span
            continue
        (quoted if _is_quote(line) else new).append(line)
        i += 1
    return "\n".join(new).strip(), "\n".join(quoted).strip()


# --------------------------------------------------------------------------- entry point


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse an inbound message; raises only ``UnparseableMessage`` (no headers at all)."""
    if not raw.strip():
        raise UnparseableMessage("The message is empty.")
    try:
        msg = read_mime(raw)
        raw_headers = _raw_headers(msg)
    except Exception as exc:
        return _unreadable(raw, exc)
    if not raw_headers:
        raise UnparseableMessage("The input has no header fields, so it is not an email message.")
    try:
        return _build(msg, raw_headers)
    except Exception as exc:
        return _unreadable(raw, exc)


def _build(msg: Message, raw_headers: list[tuple[str, str]]) -> ParsedMessage:
    defects: list[str] = []
    counts: dict[str, int] = {}
    for name, _ in raw_headers:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    defects.extend(
        f"duplicate_{n.replace('-', '_')}_header"
        for n, c in counts.items()
        if c > 1 and n in _SINGLETON_HEADERS
    )
    from_values = _values(raw_headers, "From")
    senders = _addresses(from_values)
    if any(len(_addresses([value])) > 1 for value in from_values):
        defects.append("from_lists_several_mailboxes")
    subjects = _values(raw_headers, "Subject")
    body = _collect(msg)
    plain = body.plain
    if plain is not None and not plain.strip() and body.html is not None:
        # A blank plain alternative (some senders emit one) beside the real HTML body.
        plain = None
    markdown = plain if plain is not None else ""
    clean_html = None
    if body.html is not None:
        clean_html = sanitize_html(body.html)
        if plain is None:
            markdown = html_to_markdown(body.html)
    text = plain if plain is not None else markdown
    new_content, quoted_content = split_reply(text)
    references: list[str] = []
    for value in _values(raw_headers, "References"):
        references.extend(_msg_ids(decode_header_value(value)))
    return ParsedMessage(
        message_id=_first_msg_id(_values(raw_headers, "Message-ID")),
        in_reply_to=_first_msg_id(_values(raw_headers, "In-Reply-To")),
        references=_dedupe(references),
        subject=decode_header_value(subjects[0]) if subjects else "",
        from_address=senders[0][1] if senders else None,
        from_name=(senders[0][0] or None) if senders else None,
        from_count=counts.get("from", 0),
        to=[addr for _, addr in _addresses(_values(raw_headers, "To"))],
        cc=[addr for _, addr in _addresses(_values(raw_headers, "Cc"))],
        reply_to=[addr for _, addr in _addresses(_values(raw_headers, "Reply-To"))],
        date=_date(_values(raw_headers, "Date"), defects),
        text=text,
        markdown=markdown,
        html=clean_html,
        new_content=new_content,
        quoted_content=quoted_content,
        attachments=body.attachments,
        headers=[(name, decode_header_value(value)) for name, value in raw_headers],
        auto_submitted=_is_auto_submitted(raw_headers),
        defects=_dedupe(defects + body.defects),
    )


def _unreadable(raw: bytes, exc: Exception) -> ParsedMessage:
    # Last resort so one stdlib corner case never loses a message: keep the bytes as text.
    text = decode_bytes(raw, None)[0]
    return ParsedMessage(
        message_id=None,
        in_reply_to=None,
        references=[],
        subject="",
        from_address=None,
        from_name=None,
        from_count=0,
        to=[],
        cc=[],
        reply_to=[],
        date=None,
        text=text,
        markdown=text,
        html=None,
        new_content=text,
        quoted_content="",
        defects=[f"parser_error_{_snake(type(exc).__name__)}"],
    )


# --------------------------------------------------------------------------- raw editing

_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_VALID_NAME = re.compile(r"[!-9;-~]+")


def _header_block_end(lines: list[bytes]) -> int:
    for index, line in enumerate(lines):
        if line in (b"\r\n", b"\n", b"\r"):
            return index
        if line[:1] in (b" ", b"\t") and index > 0:
            continue
        if index == 0 and line.startswith(b"From "):
            continue
        if not _FIELD_NAME.match(line):
            return index
    return len(lines)


def strip_headers(raw: bytes, names: Sequence[str]) -> bytes:
    """Remove every top-level occurrence of the named fields (with continuation lines).

    Every other byte, including the body and the other fields' folding, is kept as is.
    """
    unwanted = {name.strip().lower().encode("ascii", "replace") for name in names}
    lines = raw.splitlines(keepends=True)
    end = _header_block_end(lines)
    kept: list[bytes] = []
    dropping = False
    for line in lines[:end]:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        match = _FIELD_NAME.match(line)
        dropping = bool(match and match.group(1).lower() in unwanted)
        if not dropping:
            kept.append(line)
    return b"".join(kept + lines[end:])


def _fold(name: str, value: str, limit: int = 78) -> list[str]:
    lines: list[str] = []
    current = f"{name}:"
    for word in value.split():
        if len(current) + 1 + len(word) > limit and current != f"{name}:":
            lines.append(current)
            current = ""
        current += " " + word
    lines.append(current)
    return lines


def prepend_header(raw: bytes, name: str, value: str) -> bytes:
    """Put ``name: value`` on top of the message, folded, using the message's line ending.

    CR/LF in ``value`` are folded to spaces so a value can never start a new field.
    """
    if not _VALID_NAME.fullmatch(name):
        raise InvalidInput(f"{name!r} is not a valid header field name.", field="name")
    clean = " ".join(_CONTROL.sub(" ", value).split())
    first_line, has_newline, _ = raw.partition(b"\n")
    newline = b"\n" if has_newline and not first_line.endswith(b"\r") else b"\r\n"
    folded = newline.join(line.encode("utf-8") for line in _fold(name, clean))
    return folded + newline + raw
