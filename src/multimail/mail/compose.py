"""Build the outbound MIME message from a draft.

Everything a caller puts in a header is checked here, because the stdlib email package
decodes RFC 2047 encoded-words in values it is given and will then happily write a
decoded CR LF onto the wire (``Subject: =?utf-8?q?x=0D=0ABcc:_y?=`` becomes a real Bcc
header). Every value is therefore decoded the way the email package will decode it, until
nothing changes, before it is checked. As a second line of defence the finished bytes must
split into exactly the header fields we meant to write, whenever the email package wrote an
address field its parser must read back exactly the recipients we meant, and the display
name, the subject and the other text fields must read back, as an RFC 2047 reader decodes
them (``email.header.decode_header``), as the text we meant.

Display names and unstructured text are always written here: plain ASCII words as they
are, anything else as base64 encoded-words that carry every space themselves. (The email
package's folder writes a real space as the only white space between two encoded-words,
and RFC 2047 6.2 readers drop it: "службы поддержки" arrived as "службыподдержки".) The
other common shapes (plain addresses, text + HTML, base64 attachments with plain names) are
written here too, since the email package's header registry and generator cost milliseconds
per message; an unusual address or attachment goes through it one header or one attachment
at a time. The tests hold the two writers to the same headers and decoded parts, and the
text fields to the text meant.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import errors as email_errors
from email.header import decode_header
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser
from email.policy import Policy
from email.utils import encode_rfc2231, unquote
from functools import lru_cache

from multimail.domain.addresses import AddressError, idna_ascii, normalize_address
from multimail.domain.headertext import (
    LINE_BREAKS,
    MAX_DECODE_ROUNDS,
    HeaderTextError,
    decoded_header_text,
)
from multimail.errors import InvalidInput
from multimail.mail.markdown import normalise_text, render_markdown, sanitise_fragment

__all__ = [
    "AI_DISCLOSURE",
    "BodyHashes",
    "ComposedMessage",
    "OutboundAttachment",
    "OutboundDraft",
    "attachment_content_type",
    "attachment_filename",
    "attachments_sha256",
    "body_sha256",
    "build_message",
    "check_address",
    "check_message_id",
    "compose_body",
    "compose_html",
    "compose_message",
    "draft_body_sha256",
    "draft_hashes",
    "message_hashes",
    "safe_subject",
    "text_sha256",
]

AI_DISCLOSURE = "*This message was written by an AI agent.*"
SIGNATURE_SEPARATOR = "-- "
MAX_SUBJECT_CHARS = 998
MAX_DISPLAY_NAME_CHARS = 256
MAX_FILENAME_CHARS = 255
MAX_LINE_OCTETS = 998
_FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD stay within 78 characters

# 7bit keeps the message deliverable through relays without 8BITMIME.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_DECODE_POLICY = email.policy.default

# One definition with the settings that end up in headers (a mailbox's display name).
_BREAKS = LINE_BREAKS
_OTHER_CONTROLS = re.compile("[\x01-\x08\x0e-\x1f\x7f]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_FIELD_NAME_BYTES = re.compile(rb"[!-9;-~]+")
_PRINTABLE_ASCII = re.compile(r"[ -~\t]*")
_MSG_ID = re.compile(r"<[!-;=?-~]+>")
_HOSTNAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_DOT_ATOM_ADDRESS = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[A-Za-z0-9.-]+")
_MIME_TYPE = re.compile(r"([a-z0-9][a-z0-9!#$&^_.+-]*)/([a-z0-9][a-z0-9!#$&^_.+-]*)")
# RFC 2045 5.1: parameter = attribute "=" value; value := token / quoted-string. Quoted
# strings hold printable ASCII but no quoted-pair: readers (the email package among them)
# disagree on where a string with an escaped quote or backslash ends.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MIME_PARAMETER = re.compile(
    rf'[ \t]*;[ \t]*({_TOKEN})[ \t]*=[ \t]*({_TOKEN}|"[ !#-\[\]-~]*")[ \t]*'
)
_TOKEN_VALUE = re.compile(_TOKEN)
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# Parameters a Content-Type never carries from a caller: the file's name is the
# Content-Disposition's (a second name in ``name=`` is one more a reader may show, unscanned),
# and a boundary belongs to multipart types only.
_DROPPED_PARAMETERS = frozenset({"name", "filename", "boundary"})

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
    #: Every address of the Reply-To field (an address-list, RFC 5322 3.6.2); None or empty
    #: for none. A bare string is one address (a str is a Sequence[str] to the type checker,
    #: so one passed by mistake must not be read as a list of one-letter addresses).
    reply_to: Sequence[str] | None
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
    #: ``render_markdown(markdown).html``, when the caller has it already: the sending
    #: service stores it with the message (``messages.html``), and the delivery worker
    #: passes it on so each delivery does not render the body again (it is sanitised
    #: again, a few microseconds). None renders it here. Anything else would send an HTML
    #: part that is not the text.
    body_html: str | None = None


class _RawHeader(str):
    """A header value written as given, folded only at its own spaces.

    The email package RFC 2047-encodes any unstructured token longer than a line, which
    would turn a List-Unsubscribe URL, a long Message-ID or an identity token into
    ``=?utf-8?q?...?=`` that receivers do not decode. EmailPolicy stores and folds an
    object with ``name`` and ``fold`` as a ready-made header.
    """

    name: str
    wire: bytes  # the folded field as written, kept from the length check

    def __new__(cls, name: str, value: str) -> _RawHeader:
        obj = super().__new__(cls, " ".join(value.split()))
        obj.name = name
        folded = obj.fold(policy=_POLICY)
        if any(len(line) > MAX_LINE_OCTETS for line in folded.split("\r\n")):
            raise InvalidInput(
                f"the {name} header has a word too long for one line",
                code="header_too_long",
                header=name,
            )
        obj.wire = folded.encode("ascii")
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
    # Decoded with the parser EmailMessage.__setitem__ uses (a test pins the shortcut for
    # text without encoded-words against it).
    try:
        return decoded_header_text(value)
    except HeaderTextError:
        raise InvalidInput(
            "a header value is nested in too many encodings", code="header_injection"
        ) from None


def _refuse_breaks(value: str, what: str) -> str:
    decoded = _decode_like_email_package(value) if not _BREAKS.search(value) else value
    if _BREAKS.search(decoded):
        raise InvalidInput(
            f"line breaks are not allowed in {what}", code="header_injection", field=what
        )
    return decoded


def check_address(value: str, what: str = "an address") -> str:
    """The address as the message will carry it (encoded-words decoded, the domain in IDNA
    ASCII), or ``InvalidInput`` (``header_injection``, ``invalid_address``) when it cannot be
    written into a header field. The sending service calls this on every recipient it
    accepts, so that an accepted message is never refused here at delivery."""
    value = _refuse_breaks(value, what).strip()
    local, at, domain = value.rpartition("@")
    if not at:
        raise InvalidInput(f"invalid email address in {what}", code="invalid_address", field=what)
    if domain.isascii():
        ascii_domain = domain  # _HOSTNAME judges it below
    elif domain.endswith("."):
        ascii_domain = ""  # idna_ascii would drop the root's dot: not the address given
    else:
        try:
            ascii_domain = idna_ascii(domain)  # IDNA 2008 + UTS #46, as the service stores it
        except AddressError:
            ascii_domain = ""
    spec = f"{local}@{ascii_domain.lower()}"
    if not _valid_addr_spec(spec, ascii_domain):
        raise InvalidInput(f"invalid email address in {what}", code="invalid_address", field=what)
    return spec


_address = check_address


def plain_address(value: str, field: str) -> str:
    """``value`` normalised, refused with 422 ``invalid_address`` naming ``field`` unless it is
    exactly what :func:`check_address` will write into a header for it. The send path's
    recipients and the address settings (``auto_cc``, ``auto_bcc``, ``oversight_email``) both
    pass here, so an address accepted now is never refused, or read as another (an RFC 2047
    encoded-word in the local part is decoded by mail programs), after approval."""
    try:
        address = normalize_address(value)
    except AddressError as exc:
        raise InvalidInput(f"{field}: {exc}", code="invalid_address", field=field) from None
    try:
        written = check_address(address, field)
    except InvalidInput:
        written = None
    if written != address:
        raise InvalidInput(
            f"{field}: {value!r} is not a plain email address (it holds an RFC 2047 "
            "encoded-word, =?...?=, that mail programs would decode, or something no header "
            "can carry); give it as name@example.com",
            code="invalid_address",
            field=field,
        )
    return address


def _valid_addr_spec(spec: str, ascii_domain: str) -> bool:
    if len(spec) > 254 or not spec.isascii() or _HOSTNAME.fullmatch(ascii_domain) is None:
        return False
    if _DOT_ATOM_ADDRESS.fullmatch(spec):
        return True  # a dot-atom local part: the parser below would give it back unchanged
    try:
        parsed = Address(addr_spec=spec)
    except (ValueError, IndexError, email_errors.HeaderParseError):
        return False
    return parsed.addr_spec == spec and bool(parsed.username)


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
    for _ in range(MAX_DECODE_ROUNDS):
        cleaned = _OTHER_CONTROLS.sub("", _BREAKS.sub(" ", _SURROGATES.sub("\ufffd", value)))
        cleaned = _decode_like_email_package(cleaned)
        if cleaned == value:
            return value
        value = cleaned
    raise InvalidInput("the subject is nested in too many encodings", code="header_injection")


def check_message_id(value: str, what: str = "a message id") -> str:
    """``value`` as the message will carry it in Message-ID, In-Reply-To or References, or
    ``InvalidInput`` (``invalid_message_id``, ``header_injection``)."""
    _refuse_breaks(value, what)
    value = value.strip()
    if not _MSG_ID.fullmatch(value) or len(value) > 900:
        raise InvalidInput(f"invalid message id in {what}", code="invalid_message_id", field=what)
    return value


_message_id = check_message_id


def _extra_header(name: str, value: str) -> tuple[str, str | _RawHeader]:
    """The header as it will be written: a ``_RawHeader`` for printable ASCII, else the text
    a mail reader will show (encoded-words in ``value`` decoded, as readers decode them),
    which ``_unstructured_header`` writes as encoded-words."""
    if not _FIELD_NAME.fullmatch(name):
        raise InvalidInput("invalid header name", code="header_injection", header=name)
    lowered = name.lower()
    if lowered in _RESERVED_HEADERS or lowered.startswith(_RESERVED_PREFIXES):
        raise InvalidInput(f"the {name} header is set by MultiMail", code="reserved_header")
    if value.isascii() and value.isprintable() and "=?" not in value:
        # Printable ASCII (str methods, much cheaper than the regex on a long identity
        # token): no line break, no control, nothing the email package would decode, so
        # the checks below would pass it unchanged.
        return name, _RawHeader(name, value)
    decoded = _refuse_breaks(value, f"the {name} header")
    if _OTHER_CONTROLS.search(decoded):
        raise InvalidInput(f"control characters in the {name} header", code="header_injection")
    if _PRINTABLE_ASCII.fullmatch(value):
        return name, _RawHeader(name, value)
    return name, _SURROGATES.sub("\ufffd", decoded)


def _content_type(value: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(maintype, subtype, parameters) of a caller's content type, or ``InvalidInput``."""
    text = value.strip()
    slash_end = re.match(r"[^;]*", text)
    assert slash_end is not None
    match = _MIME_TYPE.fullmatch(slash_end.group().strip().lower())
    if match is None or match.group(1) == "multipart":
        raise InvalidInput(
            f"the content type {value[:100]!r} is not a MIME type such as 'application/pdf' or "
            "'text/csv; charset=utf-8'",
            code="invalid_content_type",
            content_type=value[:100],
        )
    parameters: list[tuple[str, str]] = []
    seen: set[str] = set()
    position = slash_end.end()
    while position < len(text):
        if not text[position:].strip(" \t;"):
            break  # a trailing ";" (as some libraries write) ends the list
        parameter = _MIME_PARAMETER.match(text, position)
        if parameter is None or parameter.end() == position:
            raise InvalidInput(
                f"the content type {value[:100]!r} has a parameter that is not "
                'name=value (the value a token or a "quoted string" of printable ASCII '
                "without quotes or backslashes in it)",
                code="invalid_content_type",
                content_type=value[:100],
            )
        position = parameter.end()
        attribute, raw = parameter.group(1).lower(), parameter.group(2)
        if attribute in seen:
            raise InvalidInput(
                f"the content type {value[:100]!r} gives the parameter {attribute!r} twice",
                code="invalid_content_type",
                content_type=value[:100],
            )
        seen.add(attribute)
        if attribute.split("*", 1)[0] in _DROPPED_PARAMETERS:
            continue
        if raw.startswith('"'):
            if attribute.endswith("*"):
                raise InvalidInput(
                    f"the content type {value[:100]!r} quotes the RFC 2231 value of "
                    f"{attribute!r}; write it unquoted (charset'language'percent-encoded)",
                    code="invalid_content_type",
                    content_type=value[:100],
                )
            raw = raw[1:-1]
        parameters.append((attribute, raw))
    return match.group(1), match.group(2), parameters


def _parameter(attribute: str, value: str) -> str:
    """``attribute=value``, the value quoted unless it is a plain word (RFC 2045 5.1 allows
    any token bare, but readers, the email package among them, misread some: ``x='``).
    An RFC 2231 extended value (``title*=utf-8''a%20b``) is never quoted."""
    if _PLAIN_VALUE.fullmatch(value) or (attribute.endswith("*") and _TOKEN_VALUE.fullmatch(value)):
        return f"{attribute}={value}"
    return f'{attribute}="{value}"'


def attachment_content_type(value: str) -> str:
    """The content type as an attachment part will carry it: ``type/subtype`` in lower
    case, then its well-formed parameters (``charset``, ``method``, ...; ``name`` and
    ``boundary`` are dropped), values quoted only where RFC 2045 needs it. Raises
    ``InvalidInput`` (``invalid_content_type``) for anything else: a reader could not parse
    it, or it would be a second header. The sending service stores what this returns."""
    maintype, subtype, parameters = _content_type(value)
    return "; ".join([f"{maintype}/{subtype}", *(_parameter(a, v) for a, v in parameters)])


def _attachment_content(attachment: OutboundAttachment) -> tuple[str, str, list[tuple[str, str]]]:
    maintype, subtype, parameters = _content_type(attachment.content_type)
    if maintype == "message":
        # message/* may not be base64-encoded (RFC 2046 5.2.1) and an attached message
        # is not guaranteed 7-bit clean; clients still open a .eml sent as bytes.
        return "application", "octet-stream", []
    return maintype, subtype, parameters


def _attachment_type(attachment: OutboundAttachment) -> tuple[str, str]:
    maintype, subtype, _ = _attachment_content(attachment)
    return maintype, subtype


def attachment_filename(value: str) -> str:
    """The filename as a recipient's mail program will show it (RFC 2047 encoded-words
    decoded), or ``InvalidInput`` (``header_injection``, ``invalid_filename``): line breaks,
    control characters, slashes, an empty or overlong name. What the scan must judge."""
    name = _refuse_breaks(value, "an attachment filename")
    if _OTHER_CONTROLS.search(name) or _SURROGATES.search(name):
        raise InvalidInput("control characters in a filename", code="header_injection")
    name = name.strip()
    if not name or len(name) > MAX_FILENAME_CHARS or "/" in name or "\\" in name:
        raise InvalidInput("invalid attachment filename", code="invalid_filename")
    return name


_filename = attachment_filename


def compose_body(draft: OutboundDraft) -> str:
    """The markdown as sent: body, signature after "-- ", then the footers.

    This is the text of the text/plain part, and what identity tokens and the audit log
    hash (see ``draft_body_sha256``).
    """
    body = normalise_text(draft.markdown).rstrip()
    tail = _tail(draft.signature, draft.ai_disclosure, draft.operator_postal_address)[0]
    return f"{body}\n\n{tail}\n" if body and tail else f"{body or tail}\n"


@lru_cache(maxsize=256)
def _tail(
    signature: str | None, ai_disclosure: bool, postal_address: str | None
) -> tuple[str, str]:
    """The signature and footer sections as markdown, and their sanitised HTML.

    These are per-mailbox (and per-account) settings, the same for every message of a
    mailbox, so their rendering is kept; a message body is never cached. The HTML is
    rendered apart from the body's, so nothing in a body (an unclosed code fence, a
    link definition) can swallow or rewrite the signature or the AI disclosure.
    """
    sections = []
    if signature and signature.strip():
        sections.append(f"{SIGNATURE_SEPARATOR}\n{normalise_text(signature).strip()}")
    footer = []
    if ai_disclosure:
        footer.append(AI_DISCLOSURE)
    if postal_address and postal_address.strip():
        footer.append(normalise_text(postal_address).strip())
    if footer:
        sections.append("---\n\n" + "\n\n".join(footer))
    text = "\n\n".join(sections)
    return text, render_markdown(text).html if text else ""


def compose_html(draft: OutboundDraft) -> str:
    """The HTML fragment of the message: the body's rendering, then the signature's and the
    footers' (see ``_tail``)."""
    if draft.body_html is None:
        body = render_markdown(draft.markdown).html
    else:
        body = sanitise_fragment(draft.body_html)
    return body + _tail(draft.signature, draft.ai_disclosure, draft.operator_postal_address)[1]


def text_sha256(text: str) -> str:
    """Hex SHA-256 of a text body, insensitive to what transport does to line ends."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    canonical = "\n".join(line.rstrip(" \t") for line in lines).rstrip("\n")
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def draft_body_sha256(draft: OutboundDraft) -> str:
    """What ``body_sha256`` will return for ``build_message(draft)``, without building it."""
    # The text part is compose_body less its final LF (normalise_text changes nothing
    # else in it), and text_sha256 ignores final LFs: no need to render or normalise again.
    return text_sha256(compose_body(draft))


def body_sha256(raw_message: bytes) -> str:
    """Hex SHA-256 of the message's text/plain body as a receiver decodes it."""
    message = BytesParser(policy=_DECODE_POLICY).parsebytes(raw_message)
    assert isinstance(message, EmailMessage)
    return text_sha256(_decoded_text(message.get_body(preferencelist=("plain",)), "plain"))


def _decoded_text(part: EmailMessage | MIMEPart | None, subtype: str) -> str:
    """A text part's content with its transfer encoding and charset undone."""
    code = "no_text_part" if subtype == "plain" else "no_html_part"
    if part is None:
        raise InvalidInput(f"the message has no text/{subtype} part", code=code)
    try:
        content = part.get_content()
    except LookupError as exc:
        raise InvalidInput(f"the text/{subtype} part has an unknown charset", code=code) from exc
    if not isinstance(content, str):
        raise InvalidInput(f"the text/{subtype} part could not be decoded", code=code)
    return content


def attachments_sha256(contents: Sequence[bytes]) -> str:
    """Hex SHA-256 binding the attachments, in order: of each one's hex SHA-256 plus LF.

    Only the content (as decoded from its transfer encoding) is covered, not the file
    name or content type; no attachments give the hash of the empty string.
    """
    digest = hashlib.sha256()
    for content in contents:
        digest.update(hashlib.sha256(content).hexdigest().encode("ascii") + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class BodyHashes:
    """What an identity token binds of a message body (see ``mail.identity``).

    ``text`` is ``body_sha256``: the text/plain part. ``html`` is ``text_sha256`` of the
    decoded text/html part (None when a received message has none). ``attachments`` is
    ``attachments_sha256`` of every other leaf part's decoded content, in order.
    """

    text: str
    html: str | None
    attachments: str


def draft_hashes(draft: OutboundDraft, *, html: str | None = None) -> BodyHashes:
    """What ``message_hashes`` will return for ``compose_message(draft)``, without building it.

    ``html`` is ``compose_html(draft)`` when the caller has it already (pass the same to
    ``compose_message``, so the HTML is sanitised once per message).
    """
    fragment = compose_html(draft) if html is None else html
    return BodyHashes(
        text=draft_body_sha256(draft),
        html=text_sha256(_html_document(fragment)),
        attachments=attachments_sha256([a.data for a in draft.attachments]),
    )


def message_hashes(raw_message: bytes) -> BodyHashes:
    """The ``BodyHashes`` of a received message, parsed once.

    Raises ``InvalidInput`` (``no_text_part``) as ``body_sha256`` does; a missing or
    undecodable HTML part gives ``html=None``.
    """
    message = BytesParser(policy=_DECODE_POLICY).parsebytes(raw_message)
    assert isinstance(message, EmailMessage)
    text_part = message.get_body(preferencelist=("plain",))
    text = text_sha256(_decoded_text(text_part, "plain"))
    html_part = message.get_body(preferencelist=("html",))
    try:
        html: str | None = text_sha256(_decoded_text(html_part, "html"))
    except InvalidInput:
        html = None
    others: list[bytes] = []
    for part in message.walk():
        if part.is_multipart() or part is text_part or part is html_part:
            continue
        payload = part.get_payload(decode=True)
        others.append(payload if isinstance(payload, bytes) else b"")
    return BodyHashes(text=text, html=html, attachments=attachments_sha256(others))


def _html_document(fragment: str) -> str:
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n'
        f"{fragment}</body></html>\n"
    )


# -- writing the message -----------------------------------------------------------------
#
# The stdlib email package spends milliseconds per message in its header registry and
# generator. The common shapes are written here directly; an address or an attachment
# outside the plain alphabets below is handed, one header or one attachment at a time, to
# the email package, which stays the reference for them (tests check both give the same
# headers and decoded parts). Text (names, subjects) never is: see the module docstring.

# A display name that is a run of atoms needs no quoting (RFC 5322 3.2.5 phrase).
_ATOM_PHRASE = re.compile(rf"[{_ATEXT}]+(?: [{_ATEXT}]+)*")
# Printable ASCII words separated by single spaces: safe as a quoted string or as
# unstructured text folded at its spaces.
_PLAIN_WORDS = re.compile(r"[!-~]+(?: [!-~]+)*")
_FILENAME_CHARS = re.compile(r"[ !#-\[\]-~]+")  # printable ASCII but " and \
_ASCII_BYTES = bytes(range(128))
_TEXT_LINE_OCTETS = 78  # longer lines are encoded, as the email package does
_CRLF = b"\r\n"


def _plain(value: str) -> bool:
    return "=?" not in value and _PLAIN_WORDS.fullmatch(value) is not None


def _fold_words(name: str, words: Sequence[str], separator: str = " ") -> bytes:
    """``name: w1<sep>w2 ...`` folded before a word that would pass column 78."""
    line = f"{name}: {words[0]}"
    lines = []
    for word in words[1:]:
        if len(line) + len(separator) + len(word) > _FOLD_AT:
            lines.append(line + separator.rstrip())
            line = " " + word
        else:
            line += separator + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _stdlib_header(name: str, value: object) -> bytes:
    # Exactly what EmailMessage + BytesGenerator would write for this one header.
    header = _POLICY.header_store_parse(name, value)[1]
    return _POLICY.fold_binary(name, header)


def _from_header(sender: str, name: str) -> tuple[bytes, bool]:
    """The From field, and whether its address was written here (True) or by the email
    package, or in a form it must read back (False)."""
    dot_atom = _DOT_ATOM_ADDRESS.fullmatch(sender) is not None
    if not name:
        if dot_atom and len(sender) + 6 <= _FOLD_AT:
            return f"From: {sender}\r\n".encode("ascii"), True
        return _stdlib_header("From", Address(addr_spec=sender)), False
    if dot_atom and _plain(name):
        if _ATOM_PHRASE.fullmatch(name):
            phrase = name
        else:
            phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        # Folded at the name's single spaces, inside the quotes too: unfolding gives each
        # space back (RFC 5322 3.2.4 lets a quoted-string hold folding white space).
        words = [*phrase.split(" "), f"<{sender}>"]
        if len(words[0]) + 6 <= _FOLD_AT and max(map(len, words)) < _FOLD_AT:
            return _fold_words("From", words), True
    # Everything else (non-ASCII, "=?", runs of blanks, words longer than a line) as
    # encoded-words that carry every space themselves: the email package's folder puts a
    # real space between two encoded-words, which RFC 2047 6.2 readers drop.
    return _encoded_field("From", name, f"<{sender}>"), dot_atom


def _address_header(name: str, addresses: Sequence[str]) -> tuple[bytes, bool]:
    """An address-list field, and whether it was written here (True) or by the email package."""
    if all(_DOT_ATOM_ADDRESS.fullmatch(a) and "=?" not in a for a in addresses):
        return _fold_words(name, addresses, separator=", "), True
    return _stdlib_header(name, [Address(addr_spec=a) for a in addresses]), False


def _unstructured_header(name: str, value: str) -> bytes:
    if _plain(value):
        words = value.split(" ")
        if max(len(w) for w in words) < _FOLD_AT - len(name) - 2:
            return _fold_words(name, words)
    # Anything else as encoded-words holding every character, blanks at either end and
    # runs of them included (see _from_header for why not the email package).
    return _encoded_field(name, value)


# RFC 2047: a line holding an encoded-word is at most 76 characters, and each encoded-word
# at most 75 and a whole number of characters.
_ENCODED_LINE = 76
_ENCODED_WORD_PREFIX = "=?utf-8?b?"


def _encoded_field(name: str, text: str, trailer: str = "") -> bytes:
    """``name: <text as base64 encoded-words>[ trailer]``, folded between the words.

    The words carry every character of ``text`` (spaces included), so a reader decodes
    exactly ``text``; their alphabet (base64 between ``=?utf-8?b?`` and ``?=``) holds no
    character a header parser could take for structure. ``trailer`` is a plain token
    (``<addr-spec>``) written after them.
    """
    data = text.encode("utf-8")
    lines = [f"{name}:"]
    start = 0
    while start < len(data):
        room = _ENCODED_LINE - len(lines[-1]) - 1 - len(_ENCODED_WORD_PREFIX) - 2
        if room < 8:  # not even two characters fit: start a line
            lines.append("")
            continue
        end = min(len(data), start + room // 4 * 3)
        while end < len(data) and data[end] & 0xC0 == 0x80:
            end -= 1  # never split a character between two words
        space = data.rfind(b" ", start, end) if end < len(data) else -1
        if space > start:
            # Readers that keep the white space between two words in a display name
            # (against RFC 2047 6.2, the email package's among them) then show a doubled
            # space rather than one inside a word.
            end = space + 1
        word = base64.b64encode(data[start:end]).decode("ascii")
        lines[-1] += f" {_ENCODED_WORD_PREFIX}{word}?="
        start = end
        if start < len(data):
            lines.append("")
    if trailer:
        if len(lines[-1]) + 1 + len(trailer) > _ENCODED_LINE:
            lines.append("")
        lines[-1] += " " + trailer
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _raw_header(header: _RawHeader) -> bytes:
    return header.wire


def _encode_text(text: str) -> tuple[str, bytes]:
    """The transfer encoding and the encoded body of one text part (email package rules:
    7bit when ASCII with short lines, else quoted-printable or base64, whichever is shorter).
    """
    data = text.encode("utf-8")
    # bytes.splitlines splits on CR, LF and CRLF only, like the email package does here.
    lines = data.splitlines()
    ascii_only = data.isascii()
    if ascii_only and max(map(len, lines), default=0) <= _TEXT_LINE_OCTETS:
        return "7bit", _CRLF.join(lines) + _CRLF
    body = b"\n".join(lines) + b"\n"
    eight_bit = 0 if ascii_only else len(body.translate(None, _ASCII_BYTES))
    # Quoted-printable spends two extra octets per escaped octet, base64 a third overall.
    if 6 * (eight_bit + body.count(b"=")) > len(body):
        return "base64", _base64_lines(body)
    # Fed CRLF, b2a_qp would keep it but count the CR in the line length and wrap some
    # lines elsewhere than the email package does.
    return "quoted-printable", binascii.b2a_qp(body, istext=True).replace(b"\n", _CRLF)


def _base64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", _CRLF)


def _text_part(subtype: str, text: str) -> bytes:
    cte, payload = _encode_text(text)
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n'
    return head.encode("ascii") + _CRLF + payload


def _disposition(filename: str) -> str | None:
    """The Content-Disposition field for ``filename`` as the email package writes it when
    it fits one or two lines (a quoted ASCII name, or RFC 2231 percent-encoded UTF-8, whose
    alphabet has no structure in it); None for the rest."""
    if "=?" in filename:
        return None
    if _FILENAME_CHARS.fullmatch(filename):
        parameter = f'filename="{filename}"'
    elif not filename.isascii():
        parameter = "filename*=" + encode_rfc2231(filename, "utf-8")
    else:
        return None  # a quote, a backslash or a tab in an ASCII name
    field = f"Content-Disposition: attachment; {parameter}"
    if len(field) <= _FOLD_AT:
        return field
    if len(parameter) + 1 <= _FOLD_AT:
        return f"Content-Disposition: attachment;\r\n {parameter}"
    return None


def _attachment_part(attachment: OutboundAttachment) -> bytes:
    maintype, subtype, parameters = _attachment_content(attachment)
    filename = _filename(attachment.filename)
    disposition = _disposition(filename)
    if disposition is None:
        part = MIMEPart(policy=_POLICY)
        part.set_content(
            attachment.data,
            maintype,
            subtype,
            disposition="attachment",
            filename=filename,
            params=dict(parameters),
        )
        return part.as_bytes(policy=_POLICY)
    # Parameters are printable ASCII (see _content_type): folded between them, each whole.
    content_type = _fold_words(
        "Content-Type",
        [f"{maintype}/{subtype}", *(_parameter(a, v) for a, v in parameters)],
        separator="; ",
    )
    head = content_type + f"Content-Transfer-Encoding: base64\r\n{disposition}\r\n".encode()
    return head + _CRLF + _base64_lines(attachment.data)


def _multipart(subtype: str, parts: Sequence[bytes]) -> tuple[bytes, bytes]:
    """A multipart entity: its Content-Type field, and what follows the blank line after it."""
    while True:
        boundary = f"==============={secrets.token_hex(10)}=="
        delimiter = f"--{boundary}".encode("ascii")
        if not any(delimiter in part for part in parts):
            break
    field = f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"\r\n'
    # Each part keeps its own final CRLF; the CRLF before the next delimiter belongs to the
    # delimiter (RFC 2046 5.1.1), as in the email package's output.
    inner = _CRLF + delimiter + _CRLF
    body = b"".join([delimiter, _CRLF, inner.join(parts), _CRLF, delimiter, b"--\r\n"])
    return field.encode("ascii"), body


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _date_header(value: datetime) -> bytes:
    """``Date:`` in UTC, as ``email.utils.format_datetime`` writes it (a test holds them
    equal), without its time-tuple round trip."""
    d = value.astimezone(UTC)
    return (
        f"Date: {_DAYS[d.weekday()]}, {d.day:02d} {_MONTHS[d.month - 1]} {d.year:04d} "
        f"{d.hour:02d}:{d.minute:02d}:{d.second:02d} +0000\r\n"
    ).encode("ascii")


@dataclass(frozen=True, slots=True)
class ComposedMessage:
    """A built message, with its header fields as they were read back from ``raw``.

    ``fields`` are (name, everything after the colon up to and including the field's
    final CRLF) in order, and ``raw[body_start:]`` is the body: what a DKIM signer would
    split ``raw`` into (``dkim.sign_split`` takes them as they are).
    """

    raw: bytes
    fields: list[tuple[bytes, bytes]]
    body_start: int


def build_message(draft: OutboundDraft) -> bytes:
    """The message as CRLF-terminated bytes ready for DKIM signing and SMTP.

    Raises ``InvalidInput`` (``header_injection``, ``invalid_address``, ...) rather than
    write anything a receiver could read as an extra header or recipient.
    """
    return compose_message(draft).raw


def compose_message(draft: OutboundDraft, *, html: str | None = None) -> ComposedMessage:
    """``build_message``, keeping the header fields it checked for the DKIM signer.

    ``html`` is ``compose_html(draft)`` when the caller has it already (it hashed it for
    the identity token with ``draft_hashes``); None computes it here.
    """
    sender = _address(draft.from_address, "from")
    recipients = {
        "to": [_address(a, "to") for a in draft.to],
        "cc": [_address(a, "cc") for a in draft.cc],
    }
    given_reply_to = [draft.reply_to] if isinstance(draft.reply_to, str) else draft.reply_to
    reply_to = [_address(a, "reply_to") for a in given_reply_to or ()]
    if draft.date.tzinfo is None or draft.date.utcoffset() is None:
        raise InvalidInput("the message date must carry a time zone", code="validation_error")

    from_name = _display_name(draft.from_name)
    from_field, plain = _from_header(sender, from_name)
    headers: list[tuple[str, bytes]] = [("from", from_field)]
    written_here = [plain]
    # What a reader must show of each text field: header index -> (text, what follows it).
    texts = {0: (from_name, f" <{sender}>")} if from_name else {}
    address_fields = [("reply-to", reply_to), *recipients.items()]
    for field, addresses in address_fields:
        if addresses:
            name = "Reply-To" if field == "reply-to" else field.capitalize()
            field_value, plain = _address_header(name, addresses)
            headers.append((field, field_value))
            written_here.append(plain)
    subject = safe_subject(draft.subject)
    texts[len(headers)] = (subject, "")
    headers.append(("subject", _unstructured_header("Subject", subject)))
    headers.append(("date", _date_header(draft.date)))
    message_id = _message_id(draft.message_id, "message_id")
    headers.append(("message-id", _raw_header(_RawHeader("Message-ID", message_id))))
    if draft.in_reply_to:
        value = _message_id(draft.in_reply_to, "in_reply_to")
        headers.append(("in-reply-to", _raw_header(_RawHeader("In-Reply-To", value))))
    if draft.references:
        ids = " ".join(_message_id(r, "references") for r in draft.references)
        headers.append(("references", _raw_header(_RawHeader("References", ids))))
    headers.append(("mime-version", b"MIME-Version: 1.0\r\n"))
    for name, value in draft.extra_headers:
        field_name, extra = _extra_header(name, value)
        if isinstance(extra, _RawHeader):
            headers.append((field_name.lower(), _raw_header(extra)))
        else:
            texts[len(headers)] = (extra, "")
            headers.append((field_name.lower(), _unstructured_header(field_name, extra)))

    # normalise_text(compose_body(draft)): the body is normalised text ending in one LF.
    text = compose_body(draft)[:-1]
    content_type, body = _multipart(
        "alternative",
        [
            _text_part("plain", text),
            _text_part("html", _html_document(compose_html(draft) if html is None else html)),
        ],
    )
    if draft.attachments:
        alternative = content_type + _CRLF + body
        content_type, body = _multipart(
            "mixed", [alternative, *(_attachment_part(a) for a in draft.attachments)]
        )
    raw = b"".join([*(h for _, h in headers), content_type, _CRLF, body])
    _check_wire(raw)
    intended = [*(n for n, _ in headers), "content-type"]
    fields = _check_headers(
        raw, intended, sender, recipients, reply_to, parse=not all(written_here)
    )
    _check_texts(fields, texts)
    return ComposedMessage(raw, fields, len(raw) - len(body))


def _check_wire(raw: bytes) -> None:
    # bytes.splitlines breaks at CRLF, CR and LF alike (several times faster than
    # split(b"\r\n")): with a final CRLF there are as many lines as CRs and as LFs only
    # when every CR and every LF is part of a CRLF.
    lines = raw.splitlines()
    unsafe = (
        not raw.endswith(b"\r\n")
        or raw.count(b"\r") != len(lines)  # a bare CR or LF makes a line of its own
        or raw.count(b"\n") != len(lines)
        or b"\0" in raw
        or not raw.isascii()
        or max(map(len, lines)) > MAX_LINE_OCTETS
    )
    if unsafe:
        raise InvalidInput("the message could not be encoded safely", code="unsafe_message")


def _header_fields(head: bytes) -> list[tuple[bytes, bytes]] | None:
    """The fields of a header block as any RFC 5322 reader splits it: (name, the rest of
    the field after the colon with its CRLFs); None if a line is neither a field nor a
    continuation."""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return None
            name, value = fields[-1]
            fields[-1] = (name, value + line + _CRLF)
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME_BYTES.fullmatch(name):
            return None
        fields.append((name, value + _CRLF))
    return fields


def _check_headers(
    raw: bytes,
    intended: list[str],
    sender: str,
    recipients: dict[str, list[str]],
    reply_to: list[str],
    *,
    parse: bool,
) -> list[tuple[bytes, bytes]]:
    """The header fields of ``raw`` (see ``_header_fields``); refuses unless the bytes show
    exactly the fields (and, if ``parse``, the recipients) we meant to write.

    The recipients are read back with the email package's own parser whenever it wrote an
    address field (its encoder is what could be talked into writing more than it was
    given); fields written here come only from the plain alphabets checked above, or
    hold non-ASCII text as base64 encoded-words, whose alphabet has no structure in it.
    """
    head = raw[: raw.find(b"\r\n\r\n")]
    fields = _header_fields(head)
    names = None if fields is None else sorted(n.decode("ascii").lower() for n, _ in fields)
    refused = names != sorted(intended)
    if not refused and parse:
        parsed = BytesParser(policy=_DECODE_POLICY).parsebytes(raw, headersonly=True)
        addresses = {
            field: [a.addr_spec for h in parsed.get_all(field, []) for a in h.addresses]
            for field in ("from", "to", "cc", "reply-to", "bcc")
        }
        expected = {
            "from": [sender],
            "to": recipients["to"],
            "cc": recipients["cc"],
            "reply-to": reply_to,
            "bcc": [],
        }
        refused = addresses != expected
    if refused or fields is None:
        raise InvalidInput(
            "a header value would have changed the message's headers or recipients",
            code="header_injection",
        )
    return fields


_FOLD = re.compile(r"\r\n(?=[ \t])")


def _rfc2047_reading(value: str) -> str:
    """Unstructured text as an RFC 2047 reader shows it (``email.header.decode_header``):
    adjacent encoded-words joined, the white space between them dropped (6.2)."""
    if "=?" not in value:
        return value
    return "".join(
        part.decode(charset or "ascii", "replace") if isinstance(part, bytes) else part
        for part, charset in decode_header(value)
    )


def _field_text(value: bytes, trailer: str) -> str | None:
    """What a mail program shows of a field written here: its unstructured text, or (a
    From field, ``trailer`` its `` <addr-spec>``) its display name, quotes undone. None
    when the field does not end in ``trailer``."""
    text = _FOLD.sub("", value.decode("ascii")).removesuffix("\r\n").removeprefix(" ")
    if not text.endswith(trailer):
        return None
    phrase = text[: len(text) - len(trailer)]
    if trailer and phrase.startswith('"'):
        return unquote(phrase)
    return _rfc2047_reading(phrase)


def _check_texts(fields: list[tuple[bytes, bytes]], texts: dict[int, tuple[str, str]]) -> None:
    """Refuses unless each text field (header index -> (text, trailer), see
    ``_field_text``) reads back as that text.

    The second line of defence for the writers above: a space lost between two
    encoded-words, or a quote left open, changes what the recipient sees without changing
    any field or recipient."""
    for index, (text, trailer) in texts.items():
        name, value = fields[index]
        if _field_text(value, trailer) != text:
            raise InvalidInput(
                f"the {name.decode('ascii')} header would not read back as written; this is a "
                "bug in MultiMail, please report it with the text of the header",
                code="unsafe_message",
            )
