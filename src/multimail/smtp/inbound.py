"""The inbound SMTP front door: an aiosmtpd protocol engine that knows nothing of our database.

Recipients are checked and messages stored through an injected :class:`InboundSink`; this
module only speaks SMTP, enforces the limits and refuses the known protocol attacks. The
flow follows "decide at RCPT, store at DATA, work afterwards": ``250`` after the final dot
is sent only once ``sink.store`` has returned, so an acknowledged message is the sink's.

What aiosmtpd 1.4.6 already does, and what this module adds on top:

* End of DATA is only ``<CRLF>.<CRLF>`` (its fix for CVE-2024-27305), so no smuggled
  sequence splits a message; but it stores bare CR / LF as they came. We refuse such
  messages outright (like Postfix's ``smtpd_forbid_bare_newline``), so nothing we store can
  be re-split by a lenient hop downstream.
* After STARTTLS it discards plaintext buffered behind the command (its fix for
  CVE-2024-34083); our tests check that the pipelined command really has no effect.
* Its replies lack RFC 3463 enhanced status codes; :meth:`_InboundProtocol.push` rewords them.
* It offers AUTH once TLS is up, and answers a second STARTTLS inside TLS with 220 before
  failing; we take no SMTP AUTH (502) and refuse the second STARTTLS (554).

As the server of final delivery (RFC 5321 §4.4) we put ``Return-Path: <reverse-path>`` and our
Received line on top of each message; :func:`split_trace` takes them off again.

The bare ``<Postmaster>`` (RFC 5321 §4.1.1.3) passes the syntax check and reaches the sink as
``postmaster``; only the sink knows which domains are served, so accepting ``postmaster@`` each
of them (§4.5.1) is its decision.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import ipaddress
import logging
import re
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import AnyStr, NamedTuple, Protocol

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from multimail.domain.addresses import idna_ascii
from multimail.errors import InvalidInput, Unavailable

__all__ = [
    "ACCEPT",
    "RELAY_DENIED",
    "UNKNOWN_MAILBOX",
    "InboundEnvelope",
    "InboundLimits",
    "InboundSMTPServer",
    "InboundSink",
    "RecipientVerdict",
    "StorageFull",
    "Trace",
    "split_trace",
]

log = logging.getLogger(__name__)


class StorageFull(Unavailable):
    """The sink cannot store the message because its disk (or quota) is full."""

    code = "storage_full"


@dataclass(frozen=True)
class RecipientVerdict:
    """The sink's answer to ``RCPT TO``: accept, or an SMTP reply to refuse with."""

    code: int = 250
    message: str = "2.1.5 Recipient OK"

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599 or 300 <= self.code < 400:
            raise InvalidInput(f"not an SMTP RCPT reply code: {self.code}", code="invalid_reply")
        # A CR or LF from the sink would let it inject extra reply lines into the session.
        if not self.message.isprintable():
            raise InvalidInput("SMTP reply text must be printable", code="invalid_reply")

    @property
    def accepted(self) -> bool:
        return self.code < 300

    @classmethod
    def reject(cls, code: int, message: str) -> RecipientVerdict:
        if code < 400:
            raise InvalidInput(f"a rejection needs a 4xx or 5xx code, not {code}")
        return cls(code, message)

    def reply(self) -> str:
        return f"{self.code} {self.message}"


ACCEPT = RecipientVerdict()
UNKNOWN_MAILBOX = RecipientVerdict.reject(550, "5.1.1 Mailbox does not exist")
# RFC 5321 §3.4 / §3.6.2: a server that is not the recipient's home refuses rather than relays.
RELAY_DENIED = RecipientVerdict.reject(551, "5.7.1 Recipient not local; relaying denied")


@dataclass(frozen=True)
class InboundEnvelope:
    """One accepted message: the SMTP envelope and the raw data, under our Return-Path and
    Received lines."""

    mail_from: str  # "" for the null reverse-path of bounces (RFC 5321 §4.5.5)
    rcpt_tos: tuple[str, ...]
    data: bytes
    peer: str  # the client's IP address
    helo: str
    received_at: datetime
    tls: bool


class InboundSink(Protocol):
    """Where the server asks about recipients and hands over messages."""

    async def check_recipient(self, address: str) -> RecipientVerdict: ...

    async def store(self, envelope: InboundEnvelope) -> str:
        """Store durably, then return a queue id; raise StorageFull when out of space."""
        ...


@dataclass(frozen=True)
class InboundLimits:
    """Resource limits of one server; each default is justified beside it."""

    # SPEC §12 (25 MB), announced as SIZE (RFC 1870) so clients can give up before DATA.
    max_message_size: int = 25 * 1024 * 1024
    # RFC 5321 §4.5.3.1.8 asks for 100 buffered recipients; above our lower cap we answer
    # 452 4.5.3, which §4.5.3.1.10 lets the client treat as "send the rest in a new transaction".
    max_recipients: int = 50
    # Each session costs buffers and a task; past this we answer 421 at greeting (RFC 5321 §3.8).
    max_connections: int = 100
    # Sessions from one client address (an IPv6 /64), so one peer cannot hold every slot;
    # None is half of max_connections, Postfix's smtpd_client_connection_count_limit default.
    max_connections_per_peer: int | None = None
    # Refused recipients per session before we answer 421 and hang up: walking a list of
    # guessed names finds the hosted ones (Postfix: smtpd_hard_error_limit, also 20).
    max_refused_recipients: int = 20
    # RFC 5321 §4.5.3.1.6 fixes text lines at 1000 octets with CRLF; real senders exceed it,
    # so like Stalwart we accept up to 4096 (CRLF and any transparency dot included) and
    # refuse a longer line with 554 5.3.4.
    max_line_length: int = 4096
    # Bounds the header section that downstream parsers must hold and scan (RELIABILITY SMTP-6).
    max_header_bytes: int = 1024 * 1024
    # RFC 5321 §4.5.3.2.7: at least 5 minutes waiting for the next command.
    command_timeout: float = 300.0
    # RFC 5321 §4.5.3.2.5-6: the whole DATA phase, including our store, gets 10 minutes.
    data_timeout: float = 600.0

    def __post_init__(self) -> None:
        # aiosmtpd reads commands through the same stream limit, and RFC 5321 §4.5.3.1.4
        # allows 512-octet command lines plus extension parameters.
        if self.max_line_length < 1001:
            raise InvalidInput("max_line_length below RFC 5321's 1000 octets + dot")
        numbers = (self.max_message_size, self.max_recipients, self.max_connections)
        if min(numbers) < 1 or self.max_header_bytes < 1 or self.max_refused_recipients < 1:
            raise InvalidInput("SMTP limits must be positive")
        if self.max_connections_per_peer is not None and self.max_connections_per_peer < 1:
            raise InvalidInput("SMTP limits must be positive")
        if self.command_timeout <= 0 or self.data_timeout <= 0:
            raise InvalidInput("SMTP timeouts must be positive")

    @property
    def peer_connection_limit(self) -> int:
        if self.max_connections_per_peer is not None:
            return self.max_connections_per_peer
        return max(1, self.max_connections // 2)


# Replies aiosmtpd writes itself, reworded with the RFC 3463 enhanced codes clients act on.
_REWORDED = {
    "500 Command line too long": "500 5.5.2 Command line too long (RFC 5321 section 4.5.3.1.4)",
    "500 Line too long (see RFC5321 4.5.3.1.6)": (
        "554 5.3.4 Line too long (RFC 5321 section 4.5.3.1.6)"
    ),
    "552 Error: Too much mail data": "552 5.3.4 Message exceeds fixed maximum message size",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ),
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
}

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL = rf'(?:{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[\x21-\x5a\x5e-\x7e]+\])"
# RFC 5321 §4.1.2 Mailbox; §4.5.3.1.1-3 length limits are checked beside it.
_MAILBOX = re.compile(rf"(?P<local>{_LOCAL})@(?P<domain>{_DOMAIN})")
# RFC 5321 §4.1.2 Path: "<" [source route ":"] Mailbox ">", the route accepted and ignored
# (§C); a bare address without brackets is tolerated as Postfix does by default.
_PATH = re.compile(
    r'<(?:@[^:<>\s]+:)?(?P<path>(?:"(?:[^"\\\r\n]|\\.)*"|[^<>\s"])*)>|(?P<bare>[^<>\s]+)'
)
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED_PAIR = re.compile(r"\\(.)")
# The "by" clause of the Received line _received_header writes; the client's HELO, the only
# text of theirs before it, cannot hold a space or a parenthesis.
_OUR_RECEIVED = re.compile(rb"\A[^\n]*\n\tby \S+ \(MultiMail\) with ")


def _has_bare_newline(content: bytes) -> bool:
    """True when a CR or LF is not part of a CRLF pair (RFC 5321 §2.3.8 allows only CRLF).

    Bare CR and LF are the raw material of SMTP smuggling. Every CRLF pairs one CR with one
    LF, so the counts agree exactly when none is bare; three C-level counts cost about a
    tenth of a look-around regex over a 5 KB message."""
    pairs = content.count(b"\r\n")
    return content.count(b"\n") != pairs or content.count(b"\r") != pairs


def _is_valid_mailbox(address: str) -> bool:
    """True for an RFC 5321 mailbox within the §4.5.3.1 size limits."""
    match = _MAILBOX.fullmatch(address)
    return (
        match is not None
        and len(match["local"]) <= 64
        and len(match["domain"]) <= 255
        and len(address) <= 254  # §4.5.3.1.3: the path is 256 octets with its brackets
    )


def _dot_atom_form(address: str) -> str:
    """``"bot"@example.com`` as ``bot@example.com``: RFC 5321 §4.1.2 makes every quoted form
    of a local part equivalent to the unquoted one. A quoted local part that no dot-atom can
    write (a space, an @, two dots in a row) is returned as it came."""
    local, _, domain = address.rpartition("@")
    if not local.startswith('"'):
        return address
    content = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return f"{content}@{domain}" if _DOT_ATOM.fullmatch(content) else address


@functools.lru_cache(maxsize=1024)
def _peer_key(host: str) -> str:
    """What one client is for the per-peer connection cap: its IPv4 address, or its IPv6
    /64, the block one subscriber is usually given (else each address would be a new peer)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:  # a dual-stack socket shows IPv4 clients this way
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def _first_field(data: bytes) -> tuple[bytes, bytes]:
    """The first header field of ``data`` with its folded lines, and what follows it."""
    end = 0
    while True:
        end = data.find(b"\n", end) + 1
        if end == 0:
            return data, b""
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


class Trace(NamedTuple):
    """Stored data taken apart: the trace of final delivery and the client's bytes."""

    return_path: bytes  # the "Return-Path: <...>" field of final delivery, or b""
    received: bytes  # our Received field, or b""
    client: bytes  # the bytes the client sent


def split_trace(data: bytes) -> Trace:
    """Take our Return-Path and Received fields off the top of stored data.

    A Return-Path that is the very first field was written at final delivery: ours, or that
    of the operator's MTA for mail handed over by it; any other Return-Path is the sender's
    (RFC 5321 §4.4). Data stored before the Return-Path was added starts at our Received."""
    field, rest = _first_field(data)
    return_path = b""
    if field[:12].lower() == b"return-path:":
        return_path, data = field, rest
        field, rest = _first_field(data)
    if field.startswith(b"Received: from ") and _OUR_RECEIVED.search(field):
        return Trace(return_path, field, rest)
    return Trace(return_path, b"", data)


@functools.lru_cache(maxsize=1024)  # one parse per peer, not per message
def _address_literal(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "[unknown]"
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def _return_path(mail_from: str) -> bytes:
    """RFC 5321 §4.4: final delivery records the reverse-path, ``<>`` for a bounce."""
    return f"Return-Path: <{mail_from}>\r\n".encode("ascii")


def _received_header(
    *,
    helo: str,
    peer: str,
    hostname: str,
    trace_id: str,
    protocol: str,
    recipients: tuple[str, ...],
    when: datetime,
) -> bytes:
    """The RFC 5321 §4.4 trace line we put on top of each message, folded with CRLF."""
    # The client chooses its HELO name; anything outside domain characters could forge
    # header structure, so it is replaced, not trusted.
    safe_helo = _HELO_UNSAFE.sub("?", helo)[:255] or "unknown"
    lines = [
        f"Received: from {safe_helo} ({_address_literal(peer)})",
        f"\tby {hostname} (MultiMail) with {protocol} id {trace_id}",
    ]
    # Naming the recipient helps tracing, but with several it would show each the others (Bcc).
    stamp = format_datetime(when)
    lines.append(f"\tfor <{recipients[0]}>; {stamp}" if len(recipients) == 1 else f"\t; {stamp}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _oversized_header(content: bytes, limit: int) -> bool:
    # The header section ends at the first empty line (RFC 5322 §2.1); search no further
    # than the limit so a huge message costs no more than a huge header would.
    if content.startswith(b"\r\n"):
        return False
    end = content.find(b"\r\n\r\n", 0, limit + 4)
    if end == -1:
        return len(content) > limit
    return end + 2 > limit


class _DataOutcome(enum.Enum):
    """How reading a message ended; the refusals are aiosmtpd's (reworded by ``push``)."""

    OK = ""
    TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
    TOO_MUCH = "552 Error: Too much mail data"


def _longest_line(data: bytes | bytearray) -> int:
    """The longest CRLF-delimited line of ``data`` with its CRLF (a last partial one without)."""
    lines = data.split(b"\r\n")
    last = lines.pop()
    return max(max(map(len, lines), default=-2) + 2, len(last))


async def _read_message(
    reader: asyncio.StreamReader, size_limit: int | None, line_limit: int
) -> tuple[_DataOutcome, bytes]:
    """Read DATA up to its end (``<CRLF>.<CRLF>`` only); the content, dot-unstuffed.

    Equivalent to aiosmtpd's line-by-line loop (the end of data, the size limit counted on
    the dot-stuffed bytes, the line length with its CRLF, the same refusals after reading to
    the end) at a fraction of its cost: a 5 KB message is a few reads instead of one read,
    log call and join per line. The reader is asked for ``".\r\n"``; whether the two bytes
    before it are a CRLF is decided on what was read, which starts with the CRLF that ended
    the DATA command, so a first line of ``"."`` ends an empty message as RFC 5321 §4.1.1.4
    has it. Whatever the client sent after the end stays in the reader as its next commands.
    """
    data = bytearray(b"\r\n")  # the DATA command's line end, dropped again below
    size = 0  # bytes after DATA, dot-stuffing included, as aiosmtpd counts them
    outcome = _DataOutcome.OK
    while True:
        try:
            chunk = await reader.readuntil(b".\r\n")
            ended = (data[-2:] + chunk)[-5:-3] == b"\r\n"
        except asyncio.LimitOverrunError as exc:
            # No ".\r\n" within the reader's limit: take what cannot be part of one.
            chunk = await reader.read(exc.consumed)
            ended = False
        size += len(chunk)
        if outcome is _DataOutcome.OK:
            data += chunk
        else:
            # Refused already: keep only the two bytes the end-of-data test looks back at.
            data = (data[-2:] + chunk)[-2:]
        if ended:
            size -= 3  # the terminating ".\r\n" is not content
            break
        if outcome is _DataOutcome.OK and size_limit and size > size_limit:
            # Whichever limit broke first answers; drop the data at once, as aiosmtpd does.
            too_long = _longest_line(data[2:]) > line_limit
            outcome = _DataOutcome.TOO_LONG if too_long else _DataOutcome.TOO_MUCH
            data = data[-2:]
    if outcome is not _DataOutcome.OK:
        return outcome, b""
    del data[-3:]
    if size_limit and size > size_limit:
        outcome = _DataOutcome.TOO_MUCH
    if _longest_line(data[2:]) > line_limit:
        outcome = _DataOutcome.TOO_LONG
    if outcome is not _DataOutcome.OK:
        return outcome, b""
    # RFC 5321 §4.5.2: a leading dot of a line is transparency, not content.
    return outcome, bytes(data).replace(b"\r\n.", b"\r\n")[2:]


class _InboundHandler:
    """The aiosmtpd handler: recipient policy, message checks and the hand-over to the sink."""

    def __init__(self, sink: InboundSink, limits: InboundLimits, hostname: str) -> None:
        self._sink = sink
        self._limits = limits
        self._hostname = hostname
        self.storing: set[asyncio.Task[str]] = set()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # aiosmtpd offers AUTH once TLS is up, with mechanisms that can only ever answer 535;
        # an MX that takes no SMTP AUTH must not offer it (RFC 4954 section 3).
        session.host_name = hostname  # this hook replaces aiosmtpd's own assignment
        return [line for line in responses if not line[4:].upper().startswith("AUTH")]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address != "<>" and not _is_valid_mailbox(address):
            return "553 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = await self._recipient(envelope, address, options)
        if reply[:1] == "5" and isinstance(server, _InboundProtocol) and server.refused_too_often():
            return f"421 4.7.0 {self._hostname} Too many errors"
        return reply

    async def _recipient(self, envelope: Envelope, address: str, options: list[str]) -> str:
        # RFC 5321 §4.1.1.3: <Postmaster> without a domain must be accepted for the server.
        # The name is case-insensitive; one spelling keeps a second RCPT of it a duplicate.
        if address.lower() == "postmaster":
            address = "postmaster"
        elif not _is_valid_mailbox(address):
            return "553 5.1.3 Bad recipient address syntax"
        else:
            address = _dot_atom_form(address)
        if address in envelope.rcpt_tos:
            return "250 2.1.5 Recipient OK (duplicate ignored)"
        if len(envelope.rcpt_tos) >= self._limits.max_recipients:
            return "452 4.5.3 Too many recipients"  # RFC 5321 §4.5.3.1.10
        try:
            verdict = await self._sink.check_recipient(address)
        except Exception:
            log.exception("recipient check failed for %r", address)
            return "451 4.3.0 Temporary failure checking recipient; try again later"
        if verdict.accepted:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return verdict.reply()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if _has_bare_newline(content):
            # CVE-2023-51764/51765/51766: a lenient hop would read these as end-of-data.
            return (
                "550 5.6.0 Message refused: bare CR or LF in message data (RFC 5321 section 2.3.8)"
            )
        if content[:1] in (b" ", b"\t"):
            # Under our Received line this would read as its continuation (RFC 5322
            # section 2.2.3), letting the sender write into our trace header.
            return "550 5.6.0 Message refused: header section starts with a folded line"
        if _oversized_header(content, self._limits.max_header_bytes):
            return "552 5.3.4 Message header section exceeds fixed maximum size"
        received_at = datetime.now(UTC)
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        # Kept as the client sent it, minus controls, so no consumer can be fed a bare CR.
        helo = session.host_name or ""
        if not helo.isprintable():
            helo = "".join(ch for ch in helo if ch.isprintable())
        tls = session.ssl is not None
        protocol = ("ESMTPS" if tls else "ESMTP") if session.extended_smtp else "SMTP"
        rcpt_tos = tuple(envelope.rcpt_tos)
        trace = _received_header(
            helo=helo,
            peer=peer,
            hostname=self._hostname,
            trace_id=secrets.token_hex(8).upper(),
            protocol=protocol,  # RFC 3848 names
            recipients=rcpt_tos,
            when=received_at,
        )
        mail_from = "" if envelope.mail_from == "<>" else (envelope.mail_from or "")
        inbound = InboundEnvelope(
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            data=_return_path(mail_from) + trace + content,
            peer=peer,
            helo=helo,
            received_at=received_at,
            tls=tls,
        )
        if isinstance(server, _InboundProtocol):
            server.restart_deadline(self._limits.data_timeout)
        return await self._store(inbound)

    async def _store(self, inbound: InboundEnvelope) -> str:
        # Shielded: a client hanging up mid-store must not cancel the sink halfway through
        # its write. A completed store without our 250 only risks a duplicate, which
        # RFC 5321 §6.1 prefers to a loss.
        task = asyncio.ensure_future(self._sink.store(inbound))
        self.storing.add(task)
        task.add_done_callback(self._forget)
        try:
            queue_id = await asyncio.shield(task)
        except StorageFull:
            log.warning("storage full; deferring message from %s", inbound.peer)
            return "452 4.3.1 Insufficient system storage; try again later"
        except Exception:
            log.exception("storing a message from %s failed", inbound.peer)
            return "451 4.3.0 Temporary failure storing message; try again later"
        safe_id = re.sub(r"[^\x21-\x7e]", "", queue_id)[:128]
        return f"250 2.0.0 OK queued as {safe_id}"

    def _forget(self, task: asyncio.Task[str]) -> None:
        self.storing.discard(task)
        # Retrieve the outcome so an orphaned (shielded) failure is logged, not warned about.
        if not task.cancelled() and (error := task.exception()) is not None:
            log.debug("store finished with %r", error)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default reply would show the exception text to the client.
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Internal server error; try again later"


class _InboundProtocol(SMTP):
    """aiosmtpd's SMTP with our limits, deadlines and reply wording."""

    def __init__(
        self,
        handler: _InboundHandler,
        *,
        limits: InboundLimits,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        require_starttls: bool,
        on_close: Callable[[_InboundProtocol], None],
        admit: Callable[[_InboundProtocol, str], bool] | None = None,
    ) -> None:
        # Read by SMTP.__init__ to size its StreamReader, so it must be set first; the
        # class-level size table is shared by every session, so each gets its own.
        self.line_length_limit = limits.max_line_length
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(
            handler,
            data_size_limit=limits.max_message_size,
            hostname=hostname,
            ident="MultiMail ESMTP",
            tls_context=tls_context,
            require_starttls=require_starttls,
            timeout=limits.command_timeout,
            loop=asyncio.get_running_loop(),
        )
        self._command_timeout = limits.command_timeout
        self._data_timeout = limits.data_timeout
        self._admit = admit
        self._admitted = False
        self._on_close = on_close
        self._refusals_left = limits.max_refused_recipients
        self._hanging_up = False
        self._storing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._admitted:
            # The TCP connection (STARTTLS calls this again for the TLS layer): only now is
            # the peer known, so the per-peer cap is applied here, before the greeting.
            self._admitted = True
            peer = transport.get_extra_info("peername")
            host = peer[0] if isinstance(peer, tuple) else str(peer)
            if self._admit is not None and not self._admit(self, host):
                busy = _TooBusy(self.hostname)
                transport.set_protocol(busy)
                busy.connection_made(transport)
                return
        super().connection_made(transport)

    def refused_too_often(self) -> bool:
        """Count one refused recipient; True once the session is past its limit."""
        self._refusals_left -= 1
        self._hanging_up = self._refusals_left < 0
        return self._hanging_up

    def shut_down(self) -> None:
        """RFC 5321 §3.8: tell the client we are going away, then hang up. A session whose
        message is being stored is hung up on without a word: its reply is the store's."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._storing and isinstance(transport, asyncio.WriteTransport):
            transport.write(f"421 4.3.2 {self.hostname} Service shutting down\r\n".encode())
        transport.close()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses paths with email's lenient header parser, which repairs rather
        # than refuses: "<a b@x>" becomes '"a b"@x' and comments vanish. Keep the bytes
        # the client sent, so the handler's syntax check sees them.
        if not arg:
            return "", ""
        match = _PATH.match(arg.lstrip())
        if match is None:
            return None, None
        rest = arg.lstrip()[match.end() :]
        if rest and not rest[0].isspace():
            return None, None
        path = match["bare"] if match["bare"] is not None else match["path"]
        return path or "<>", rest.strip()

    def restart_deadline(self, seconds: float) -> None:
        if self.transport is not None:
            self._reset_timeout(seconds)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            status = _REWORDED.get(status, status)  # type: ignore[assignment]
        await super().push(status)

    async def smtp_AUTH(self, arg: str) -> None:
        # Not offered in EHLO (see handle_EHLO) and no HELP text: no SMTP AUTH here at all.
        await self.push("502 5.5.1 AUTH not available: this server takes no SMTP AUTH")

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            # aiosmtpd would answer 220 and then fail to layer TLS on TLS (RFC 3207 §4.2).
            await self.push("554 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(arg)
        if self._hanging_up and self.transport is not None:
            self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd restarts its idle timer only between commands, so without this the whole
        # message would have to arrive within the command timeout.
        self.restart_deadline(self._data_timeout)
        await self._data(arg)
        self.restart_deadline(self._command_timeout)

    async def _data(self, arg: str) -> None:
        """aiosmtpd's DATA command with the message read in bulk instead of line by line.

        The checks, replies and their order are aiosmtpd 1.4.6's; only the reading differs
        (see :func:`_read_message`)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            outcome, content = await _read_message(
                self._reader, self.data_size_limit, self.line_length_limit
            )
        except (asyncio.CancelledError, asyncio.IncompleteReadError):
            # The client went away mid-message (aiosmtpd cancels us on EOF; the read error
            # is the same end seen first): nothing is answered or stored.
            log.info("connection lost during DATA")
            self._writer.close()
            raise asyncio.CancelledError from None
        if outcome is not _DataOutcome.OK:
            await self.push(outcome.value)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = content
        self.envelope.original_content = content
        self._storing = True
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self._storing = False
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    def _timeout_cb(self) -> None:
        # RFC 5321 §3.8: say why before closing, so the client retries instead of guessing.
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def connection_lost(self, error: Exception | None) -> None:
        self._on_close(self)
        super().connection_lost(error)


class _TooBusy(asyncio.Protocol):
    """Greets with 421 and hangs up: the answer past max_connections (RFC 5321 §3.8)."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(f"421 4.7.0 {self.hostname} Too many connections; try later\r\n".encode())
        transport.close()


class InboundSMTPServer:
    """An SMTP server on the running asyncio loop that hands accepted mail to a sink."""

    def __init__(
        self,
        sink: InboundSink,
        *,
        host: str = "127.0.0.1",
        port: int = 2525,
        hostname: str = "localhost",
        limits: InboundLimits | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
    ) -> None:
        if require_starttls and tls_context is None:
            raise InvalidInput("require_starttls needs a tls_context")
        self._host = host
        self._port = port
        # RFC 5321 §2.3.5: a domain on the wire is its A-label (greeting, EHLO, Received).
        hostname = hostname if hostname.isascii() else idna_ascii(hostname)
        self._hostname = hostname
        self._limits = limits or InboundLimits()
        self._tls_context = tls_context
        self._require_starttls = require_starttls
        self._handler = _InboundHandler(sink, self._limits, hostname)
        self._sessions: set[_InboundProtocol] = set()
        self._peers: dict[_InboundProtocol, str] = {}
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the configured one."""
        if self._server is not None and self._server.sockets:
            port: int = self._server.sockets[0].getsockname()[1]
            return port
        return self._port

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def _make_protocol(self) -> asyncio.Protocol:
        if len(self._sessions) >= self._limits.max_connections:
            return _TooBusy(self._hostname)
        session = _InboundProtocol(
            self._handler,
            limits=self._limits,
            hostname=self._hostname,
            tls_context=self._tls_context,
            require_starttls=self._require_starttls,
            on_close=self._closed,
            admit=self._admit,
        )
        # Counted at creation, not at connection_made: one accept batch may create
        # several protocols before any of them is told it is connected.
        self._sessions.add(session)
        return session

    def _admit(self, session: _InboundProtocol, host: str) -> bool:
        peer = _peer_key(host)
        if self._per_peer[peer] >= self._limits.peer_connection_limit:
            self._sessions.discard(session)
            return False
        self._per_peer[peer] += 1
        self._peers[session] = peer
        return True

    def _closed(self, session: _InboundProtocol) -> None:
        self._sessions.discard(session)
        peer = self._peers.pop(session, None)
        if peer is not None:
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the inbound SMTP server is already running")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._make_protocol, self._host, self._port)
        log.info("inbound SMTP listening on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop listening, say 421 to open sessions and hang up, let in-flight stores finish."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for session in list(self._sessions):
            session.shut_down()
        await server.wait_closed()
        if self._handler.storing:
            # Their outcomes are already handled in the sessions; only completion matters.
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._handler.storing, return_exceptions=True)

    async def __aenter__(self) -> InboundSMTPServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
