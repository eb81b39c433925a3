"""Handing a message to the next SMTP hop: the configured relay, or the recipients' MX hosts.

A transport takes an envelope and the finished message bytes (CRLF line endings, already
DKIM-signed) and reports what each server said, per recipient. When no recipient was
accepted it raises :class:`~multimail.errors.TemporaryDeliveryError` (4xx, timeouts,
refused or lost connections: retry later) or :class:`~multimail.errors.PermanentDeliveryError`
(5xx: bounce); either carries ``smtp_code``, ``host`` and ``context["attempts"]``. When some
recipients were accepted it returns the attempts, and :func:`recipient_outcomes` tells the
caller which of the others to retry and which to bounce.

A connection that dies after the whole message was sent but before the server's reply
(``DeliveryAttempt.reply_lost``) is temporary, yet the receiver may already have the
message: the retry must carry the same Message-ID.

Each transport keeps a few SMTP sessions open per server (:class:`SessionPool`), so
back-to-back messages skip the TCP, TLS and EHLO round trips. A session carries the next
message only after a transaction that ended cleanly, and never more than ``max_messages``
or after ``idle_seconds``. A kept session found dead before DATA (closed, 421, or a failed
RSET probe after a pause) is replaced by a fresh one for that same message, once: nothing
was judged yet, so this is neither a deferral nor a risk of a duplicate. Once DATA began,
a lost line is ``reply_lost`` as on any session.

Each step of a session has its own time limit (:class:`SMTPTimeouts`), RFC 5321
§4.5.3.2's: a receiver that takes minutes to scan a message before answering the final dot
has it, and cutting it off would send it again at every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import ipaddress
import logging
import random
import re
import socket
import ssl
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver
from aiosmtplib.protocol import SMTPProtocol

from multimail.errors import InvalidInput, PermanentDeliveryError, TemporaryDeliveryError

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DATA_BLOCK_TIMEOUT",
    "DEFAULT_DATA_END_TIMEOUT",
    "DEFAULT_DATA_START_TIMEOUT",
    "DEFAULT_GREETING_TIMEOUT",
    "DEFAULT_MAIL_TIMEOUT",
    "DEFAULT_RCPT_TIMEOUT",
    "DeliveryAttempt",
    "MXTransport",
    "OutboundTransport",
    "RecipientResult",
    "RelayConfig",
    "RelayTransport",
    "ReplyClass",
    "ReplyStage",
    "SMTPTimeouts",
    "SessionPool",
    "classify_reply",
    "enhanced_status",
    "make_resolver",
    "parse_relay_url",
    "recipient_outcomes",
    "resolve_mx",
]

# The TCP connection alone (the RFC sets no value): a host that does not even answer SYN
# should not hold a worker for the greeting's five minutes.
DEFAULT_CONNECT_TIMEOUT = 10.0
# RFC 5321 §4.5.3.2: the least a client should wait for each reply.
DEFAULT_GREETING_TIMEOUT = 300.0  # §4.5.3.2.1 the initial 220
DEFAULT_MAIL_TIMEOUT = 300.0  # §4.5.3.2.2
DEFAULT_RCPT_TIMEOUT = 300.0  # §4.5.3.2.3
DEFAULT_DATA_START_TIMEOUT = 120.0  # §4.5.3.2.4 DATA initiation (the 354)
DEFAULT_DATA_BLOCK_TIMEOUT = 180.0  # §4.5.3.2.5 each block of the message sent
DEFAULT_DATA_END_TIMEOUT = 600.0  # §4.5.3.2.6 DATA termination (the reply to the final dot)
# EHLO/HELO, STARTTLS and AUTH, for which the RFC names no value: Postfix's
# smtp_helo_timeout and smtp_starttls_timeout are 300 s.
DEFAULT_COMMAND_TIMEOUT = 300.0
# A polite QUIT must never hold up (or undo) a delivery that already got its 250.
_QUIT_TIMEOUT = 5.0
# Postfix tries at most 5 MX addresses per delivery (smtp_mx_address_limit); a few more
# here costs little and rides out a dead IPv6 address per host.
_MAX_ADDRESSES_PER_DOMAIN = 10
# DNS answers kept per resolver (each domain needs an MX and up to two address answers).
_DNS_CACHE_ENTRIES = 4096

_log = logging.getLogger(__name__)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# Whitespace, angle brackets and NUL would end or extend the SMTP command line.
_ENVELOPE_FORBIDDEN = re.compile(r"[\s<>\x00-\x1f\x7f]")
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
# re's literal search finds this two-byte needle in a few microseconds per 5 KB, about
# twice as fast as ``in`` on this text, where every line ending is a partial match.
_LINE_START_DOT = re.compile(rb"\n\.")
# Same story: faster than data.count(b"\r\n") on mail text.
_BARE_CR = re.compile(rb"\r(?!\n)")


# -- relay configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class RelayConfig:
    """Where and how to reach the outbound relay. The password never appears in repr."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = False
    tls: bool = False
    verify_tls: bool = True

    def __post_init__(self) -> None:
        if not self.host:
            raise InvalidInput("the relay needs a host", code="invalid_relay_url")
        if not 0 < self.port < 65536:
            raise InvalidInput("the relay port must be 1-65535", code="invalid_relay_url")
        if self.starttls and self.tls:
            raise InvalidInput(
                "choose implicit TLS (smtps://) or STARTTLS, not both", code="invalid_relay_url"
            )
        if self.username is not None and not (self.starttls or self.tls or _is_loopback(self.host)):
            # Fail closed: AUTH PLAIN/LOGIN over a clear connection hands the password to
            # anyone on the path (Postfix refuses it too: smtp_sasl_security_options).
            raise InvalidInput(
                "relay credentials need TLS: use smtps:// or ?starttls=true",
                code="invalid_relay_url",
            )

    @property
    def redacted_url(self) -> str:
        """The relay as a URL fit for logs: the password is replaced by ``***``."""
        scheme = "smtps" if self.tls else "smtp"
        userinfo = f"{self.username}:***@" if self.username is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "?starttls=true" if self.starttls else ""
        if not self.verify_tls:
            query += "&verify=false" if query else "?verify=false"
        return f"{scheme}://{userinfo}{host}:{self.port}{query}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidInput(f"relay URL option {name!r} must be true or false", code="invalid_relay_url")


def parse_relay_url(url: str) -> RelayConfig:
    """Read ``MULTIMAIL_SMTP_URL``: ``smtp://user:pass@host:587?starttls=true`` or ``smtps://…``.

    User and password are percent-decoded. Options: ``starttls`` and ``verify`` (also
    spelled ``verify_tls``), each true/false. Errors never quote the URL, which may hold
    the password.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise InvalidInput("the relay URL is malformed", code="invalid_relay_url") from exc
    if parts.scheme not in ("smtp", "smtps"):
        raise InvalidInput(
            "the relay URL must start with smtp:// or smtps://", code="invalid_relay_url"
        )
    if not parts.hostname:
        raise InvalidInput("the relay URL has no host", code="invalid_relay_url")
    if parts.path not in ("", "/") or parts.fragment:
        raise InvalidInput("the relay URL must not have a path", code="invalid_relay_url")

    starttls = False
    verify_tls = True
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "starttls":
            starttls = _flag(key, value)
        elif key in ("verify", "verify_tls"):
            verify_tls = _flag(key, value)
        else:
            raise InvalidInput(f"unknown relay URL option {key!r}", code="invalid_relay_url")

    implicit_tls = parts.scheme == "smtps"
    if port is None:
        port = 465 if implicit_tls else 587 if starttls else 25
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return RelayConfig(
        host=parts.hostname,
        port=port,
        username=username or None,
        password=password if username else None,
        starttls=starttls,
        tls=implicit_tls,
        verify_tls=verify_tls,
    )


# -- DNS ---------------------------------------------------------------------------------


def make_resolver(address: str | None, *, lifetime: float = 5.0) -> dns.asyncresolver.Resolver:
    """A resolver for ``MULTIMAIL_DNS_RESOLVER`` (``host:port``, ``[v6]:port`` or ``host``).

    None means the system configuration. Queries give up after ``lifetime`` seconds, so a
    dead resolver turns into a temporary failure instead of a stuck worker. Answers are kept
    for their TTL, as an MTA's resolver keeps them: without that every message to a domain
    costs an MX and two address lookups. Failures (timeouts, SERVFAIL) are never kept.
    """
    if address is None or not address.strip():
        resolver = dns.asyncresolver.Resolver()
    else:
        host, port = _split_host_port(address.strip())
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
    resolver.timeout = min(2.0, lifetime)
    resolver.lifetime = lifetime
    resolver.cache = dns.resolver.LRUCache(_DNS_CACHE_ENTRIES)
    return resolver


def _split_host_port(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", address)
    if match is None:
        raise InvalidInput("the DNS resolver must be host:port", code="invalid_dns_resolver")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or 53)
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise InvalidInput(
            "the DNS resolver must be an IP address", code="invalid_dns_resolver"
        ) from exc
    if not 0 < port < 65536:
        raise InvalidInput("the DNS resolver port must be 1-65535", code="invalid_dns_resolver")
    return host, port


def _dns_name(name: Any) -> str:
    return str(name).rstrip(".").lower()


async def resolve_mx(domain: str, resolver: dns.asyncresolver.Resolver) -> list[tuple[int, str]]:
    """The hosts that take mail for ``domain``, most preferred first.

    No MX records means the domain itself, if it has an address (RFC 5321 §5.1). A null MX
    (RFC 7505), a missing domain or a domain with neither MX nor address is permanent; DNS
    timeouts and server failures are temporary.
    """
    try:
        answer = await resolver.resolve(domain, "MX")
    except dns.resolver.NXDOMAIN as exc:
        raise PermanentDeliveryError(
            f"the domain {domain} does not exist", code="no_such_domain", domain=domain
        ) from exc
    except dns.resolver.NoAnswer:
        if await _addresses(domain, resolver):
            return [(0, domain.rstrip(".").lower())]
        raise PermanentDeliveryError(
            f"the domain {domain} has no MX and no address record",
            code="no_mail_host",
            domain=domain,
        ) from None
    except dns.exception.DNSException as exc:
        raise _dns_trouble(domain, exc) from exc

    hosts = [(int(r.preference), _dns_name(r.exchange)) for r in answer]
    # A null MX ("0 .") is the domain saying it takes no mail at all.
    usable = [(pref, host) for pref, host in hosts if host]
    if not usable:
        raise PermanentDeliveryError(
            f"the domain {domain} accepts no mail (null MX)", code="null_mx", domain=domain
        )
    # RFC 5321 §5.1: spread load across hosts of equal preference.
    random.shuffle(usable)
    usable.sort(key=lambda item: item[0])
    return usable


def _dns_trouble(name: str, exc: BaseException) -> TemporaryDeliveryError:
    return TemporaryDeliveryError(
        f"DNS lookup for {name} failed: {type(exc).__name__}", code="dns_failure", domain=name
    )


async def _addresses(host: str, resolver: dns.asyncresolver.Resolver) -> list[str]:
    """IPv4 then IPv6 addresses of ``host``; [] when it has none."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    found: list[str] = []
    for rtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(host, rtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            raise _dns_trouble(host, exc) from exc
        found.extend(r.address for r in answer)
    return found


# -- timeouts and how a refusal is judged ------------------------------------------------


@dataclass(frozen=True)
class SMTPTimeouts:
    """Seconds to wait at each step of an SMTP session; the defaults are RFC 5321's.

    ``connect`` bounds the TCP connection only, ``greeting`` the 220 after it (with implicit
    TLS, the handshake too), ``command`` each of EHLO/HELO, STARTTLS and AUTH, ``mail`` and
    ``rcpt`` their replies, ``data_start`` the 354, ``data_block`` each block of the message
    handed to the kernel, ``data_end`` the reply to the final dot.
    """

    connect: float = DEFAULT_CONNECT_TIMEOUT
    greeting: float = DEFAULT_GREETING_TIMEOUT
    command: float = DEFAULT_COMMAND_TIMEOUT
    mail: float = DEFAULT_MAIL_TIMEOUT
    rcpt: float = DEFAULT_RCPT_TIMEOUT
    data_start: float = DEFAULT_DATA_START_TIMEOUT
    data_block: float = DEFAULT_DATA_BLOCK_TIMEOUT
    data_end: float = DEFAULT_DATA_END_TIMEOUT

    def __post_init__(self) -> None:
        for item in fields(self):
            if not getattr(self, item.name) > 0:
                raise InvalidInput(
                    f"the SMTP {item.name} timeout must be a positive number of seconds",
                    code="invalid_smtp_timeout",
                )


ReplyStage = Literal["session", "mail", "rcpt", "data"]


class ReplyClass(enum.Enum):
    """What a refusal means for one recipient (see :func:`classify_reply`)."""

    # Try again later (at the next MX now, at the next retry otherwise).
    TEMPORARY = "temporary"
    # The message fails for this recipient, but the address may be fine: no suppression.
    PERMANENT = "permanent"
    # The address itself is refused: the message fails and the address is suppressed.
    PERMANENT_BAD_ADDRESS = "permanent_bad_address"

    @property
    def permanent(self) -> bool:
        return self is not ReplyClass.TEMPORARY

    @property
    def blames_recipient(self) -> bool:
        return self is ReplyClass.PERMANENT_BAD_ADDRESS


# RFC 3463 §2 (RFC 2034 puts it first in the text): class.subject.detail.
_ENHANCED_STATUS = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")


def enhanced_status(text: str) -> tuple[int, int, int] | None:
    """The RFC 3463 enhanced status code that opens a reply's text, if any."""
    match = _ENHANCED_STATUS.match(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def classify_reply(
    code: int, enhanced: tuple[int, int, int] | None, stage: ReplyStage
) -> ReplyClass:
    """Judge a reply that refused what was asked: ``code`` (RFC 5321 §4.2), the RFC 3463
    ``enhanced`` status code from its text, and the ``stage`` it answered: ``session``
    (greeting, EHLO/HELO, STARTTLS, AUTH), ``mail`` (MAIL FROM), ``rcpt`` (RCPT TO) or
    ``data`` (DATA and the final dot).

    - Anything but a 5xx is temporary (RFC 5321 §4.2.1; an unexpected 2xx/3xx too).
    - A 5xx before MAIL says this host will not serve us (RFC 5321 §3.1), not that a mailbox
      is gone; a refused login is our configuration: temporary, the next MX or the retries
      may do better (Postfix's smtp_skip_5xx_greeting).
    - X.5.3 (too many recipients) and X.2.2 (mailbox full) are temporary at any stage
      (RFC 3463 §3.6, §3.3: a full mailbox is not a bad address), and so is 552 to RCPT,
      RFC 821's "too many recipients" (RFC 5321 §4.5.3.1.10 says to treat it as temporary).
    - A 5xx to MAIL FROM judges our sender: permanent, never the recipients' fault.
    - At RCPT, X.1.x (addressing, RFC 3463 §3.2) and X.2.1 (mailbox disabled) are about the
      address, and so is a 5xx with no enhanced code (a bare "550 no such user"); other
      subjects (X.7 policy or relay denied, X.3 system, X.6 content, ...) refuse the message.
    - After DATA only X.1.x and X.2.1 blame the address; otherwise the message is refused.

    Only the subject and detail are read: the class digit repeats the reply code.
    """
    if not 500 <= code < 600 or stage == "session":
        return ReplyClass.TEMPORARY
    about = enhanced[1:] if enhanced is not None else None
    if about in ((5, 3), (2, 2)) or (stage == "rcpt" and code == 552):
        return ReplyClass.TEMPORARY
    if stage == "mail":
        return ReplyClass.PERMANENT
    if about is not None and (about[0] == 1 or about == (2, 1)):
        return ReplyClass.PERMANENT_BAD_ADDRESS
    if stage == "rcpt" and about is None:
        return ReplyClass.PERMANENT_BAD_ADDRESS
    return ReplyClass.PERMANENT


# C0 and C1 controls but tab, and the Unicode line separators: a reply reaches the logs.
_REPLY_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]+")


def _reply_text(text: str) -> str:
    """A server's text fit to store and log.

    aiosmtplib keeps bytes that are not UTF-8 (a Latin-1 reply) as lone surrogates, which
    no database encoding takes; they become U+FFFD. The lines of a multi-line reply,
    joined with LF, are joined with a space instead.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte made
        raw = text.encode("utf-8", "replace")
    return _REPLY_CONTROLS.sub(" ", raw.decode("utf-8", "replace")).strip()


# -- results -----------------------------------------------------------------------------


@dataclass
class RecipientResult:
    """What became of one recipient at one server."""

    address: str
    ok: bool
    permanent: bool
    code: int | None
    message: str
    # False when a permanent refusal was about our sender or the session, not this address
    # (a 5xx to MAIL FROM, a server without SMTPUTF8): the message fails, but the address
    # is not suppressed, which would stop every later mail to it from the whole account.
    blames_recipient: bool = True


@dataclass
class DeliveryAttempt:
    """One SMTP session with one server (or, with ``port`` 0, a DNS lookup that ended early).

    ``reply_lost`` means the message went out whole and no reply came back: the receiver
    may have it.
    """

    host: str
    port: int
    started_at: dt.datetime
    finished_at: dt.datetime
    code: int | None
    reply: str
    recipients: list[RecipientResult]
    address: str = ""
    tls: bool = False
    reply_lost: bool = False


def recipient_outcomes(attempts: Sequence[DeliveryAttempt]) -> dict[str, RecipientResult]:
    """The final word on each recipient: the last result any attempt recorded for it."""
    outcomes: dict[str, RecipientResult] = {}
    for attempt in attempts:
        for result in attempt.recipients:
            outcomes[result.address] = result
    return outcomes


class OutboundTransport(Protocol):
    async def deliver(
        self, mail_from: str, rcpts: Sequence[str], data: bytes
    ) -> DeliveryAttempt | list[DeliveryAttempt]: ...


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_envelope(mail_from: str, rcpts: Sequence[str]) -> None:
    for address in (mail_from, *rcpts):
        if _ENVELOPE_FORBIDDEN.search(address):
            raise InvalidInput(
                "an envelope address contains a space, control character or angle bracket",
                code="header_injection",
            )
    if not rcpts:
        raise InvalidInput("a message needs at least one recipient", code="no_recipients")
    for rcpt in rcpts:
        local, _, domain = rcpt.rpartition("@")
        if not local or not domain:
            raise InvalidInput("a recipient must be local@domain", code="invalid_address")


class _Wire(NamedTuple):
    """A message ready for DATA, with what MAIL FROM announces about it."""

    payload: bytes
    # RFC 1870 SIZE: the message's octets before dot-stuffing and the closing dot.
    size: int
    eight_bit: bool


def _wire_data(data: bytes) -> _Wire:
    """The DATA payload: every line ending CRLF (RFC 5321 §2.3.8), lines starting with "."
    doubled (§4.5.2), and the closing ``CRLF.CRLF``: the bytes ``SMTP.data`` would write.

    Callers hand us CRLF already; this makes sure a stray bare LF or CR never reaches the
    wire, where receivers disagree about it (the SMTP smuggling family of bugs). With no CR
    outside a CRLF there are as many CRLFs as CRs, so equal CR and LF counts leave no bare
    LF either: "CRLF only" in three C-speed scans; the rewriting runs only when that fails.
    """
    if data.count(b"\n") != data.count(b"\r") or _BARE_CR.search(data):
        data = _LINE_ENDING.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    size = len(data)
    # Every line now ends in CRLF, so a line start is the first byte or follows "\n".
    if _LINE_START_DOT.search(data):
        data = data.replace(b"\n.", b"\n..")
    if data[:1] == b".":
        data = b"." + data
    return _Wire(data + b".\r\n", size, not data.isascii())


def _needs_smtputf8(mail_from: str, rcpts: Sequence[str]) -> bool:
    return not all(address.isascii() for address in (mail_from, *rcpts))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- open sessions kept for the next message --------------------------------------------------


@dataclass
class _Open:
    """An SMTP session between transactions: connected, greeted, ready for MAIL FROM."""

    client: aiosmtplib.SMTP
    tls: bool
    sent: int = 0
    idle_since: float = 0.0


# Idle sessions by (host, address, port).
_Idle = dict[tuple[str, str, int], list[_Open]]


class SessionPool:
    """Open SMTP sessions per server address, so the next message skips TCP, TLS and EHLO.

    A session goes back only after a transaction that ended cleanly (DATA answered, or
    every recipient refused and RSET accepted), and is dropped after ``max_messages``
    messages or ``idle_seconds`` unused. Sessions belong to the event loop that opened
    them: another loop (``deliver_now`` runs its own) never sees them.
    """

    def __init__(
        self, *, per_server: int = 16, max_messages: int = 100, idle_seconds: float = 15.0
    ) -> None:
        self.per_server = per_server
        self.max_messages = max_messages
        self.idle_seconds = idle_seconds
        self._open: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Idle] = (
            weakref.WeakKeyDictionary()
        )
        # The last loop asked about and its sessions: a worker asks from one loop, and
        # WeakKeyDictionary.setdefault builds a weak reference on every call.
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], _Idle] | None = None

    def _here(self) -> _Idle:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        here = self._open.setdefault(loop, {})
        self._last = (weakref.ref(loop), here)
        return here

    def take(self, key: tuple[str, str, int]) -> _Open | None:
        idle = self._here().get(key)
        now = time.monotonic()
        while idle:
            session = idle.pop()
            if session.client.is_connected and now - session.idle_since < self.idle_seconds:
                return session
            session.client.close()
        return None

    async def give(self, key: tuple[str, str, int], session: _Open) -> None:
        idle = self._here().setdefault(key, [])
        if (
            session.client.is_connected
            and session.sent < self.max_messages
            and len(idle) < self.per_server
        ):
            session.idle_since = time.monotonic()
            idle.append(session)
            return
        await _quit(session.client)
        session.client.close()

    async def close(self) -> None:
        """QUIT and close this loop's idle sessions (a worker stopping, a loop ending)."""
        sessions = [s for idle in self._here().values() for s in idle]
        self._open.pop(asyncio.get_running_loop(), None)
        self._last = None
        await asyncio.gather(*(_quit(s.client) for s in sessions), return_exceptions=True)
        for session in sessions:
            session.client.close()


async def _quit(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
        async with asyncio.timeout(_QUIT_TIMEOUT):
            await client.quit()


# The steps of _Session._transaction as classify_reply knows them; any other is "session".
_REPLY_STAGES: dict[str, ReplyStage] = {"mail": "mail", "rcpt": "rcpt", "data": "data"}


def _reply_stage(stage: str) -> ReplyStage:
    return _REPLY_STAGES.get(stage, "session")


# An idle session older than this is probed with RSET before it carries a message; back to
# back, the previous DATA reply already reset the transaction (RFC 5321 §4.1.1.4).
_PROBE_AFTER_S = 1.0
# Errors that mean the reused session was dead, not that the server judged the message.
_DEAD_SESSION = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, OSError)


# An address aiosmtplib's quoting would hand back unchanged (its email.utils parse costs
# more than the rest of the command); "" is the null reverse-path. Others go through it.
_PLAIN_ADDRESS = re.compile(r"(?:[A-Za-z0-9._+-]+@[A-Za-z0-9.-]+)?")


async def _mail(
    client: aiosmtplib.SMTP, sender: str, options: list[str], encoding: str
) -> aiosmtplib.SMTPResponse:
    """``client.mail`` for an EHLO'd session, without re-parsing a plain address."""
    if not _PLAIN_ADDRESS.fullmatch(sender):
        return await client.mail(sender, options=options, encoding=encoding, timeout=None)
    line = b"MAIL FROM:<" + sender.encode("ascii") + b">"
    if options:
        line += b" " + " ".join(options).encode("ascii")
    response = await _command(client, line + b"\r\n")
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
    return response


async def _rcpt(client: aiosmtplib.SMTP, rcpt: str, encoding: str) -> aiosmtplib.SMTPResponse:
    """``client.rcpt`` for an EHLO'd session, without re-parsing a plain address."""
    if not _PLAIN_ADDRESS.fullmatch(rcpt):
        return await client.rcpt(rcpt, encoding=encoding, timeout=None)
    response = await _command(client, b"RCPT TO:<" + rcpt.encode("ascii") + b">\r\n")
    if response.code not in (aiosmtplib.SMTPStatus.completed, aiosmtplib.SMTPStatus.will_forward):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, rcpt)
    return response


async def _command(client: aiosmtplib.SMTP, line: bytes) -> aiosmtplib.SMTPResponse:
    """``client.execute_command`` for one whole line (or the DATA payload), written straight
    to aiosmtplib's protocol.

    The session is ours alone between ``take()`` and ``give()``, so no command lock is
    needed; MAIL and RCPT arguments passed _check_envelope and _PLAIN_ADDRESS, so there is
    no control character to screen again; the transaction's one ``asyncio.timeout`` scope,
    moved on before each command (:func:`_arm`), bounds every reply, so no timer of its own.
    As in aiosmtplib, a lost line or a 421 closes the session.
    """
    protocol = _protocol(client)
    try:
        # No await between the write and read_response, which marks a reply as expected:
        # the reply cannot arrive unclaimed.
        protocol.write(line)
        response = await protocol.read_response(timeout=None)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    if response.code == aiosmtplib.SMTPStatus.domain_unavailable:
        # 421: the server is closing the session (RFC 5321 §3.8); so do we.
        client.close()
    return response


def _protocol(client: aiosmtplib.SMTP) -> SMTPProtocol:
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    return protocol


def _arm(timer: asyncio.Timeout, seconds: float) -> None:
    """Give the next reply (or block) ``seconds`` from now: one timer per transaction."""
    timer.reschedule(asyncio.get_running_loop().time() + seconds)


# The message goes to the kernel in blocks this big, each with the data block timeout
# (RFC 5321 §4.5.3.2.5 times each TCP send); it is also the transport's high-water mark.
_DATA_BLOCK = 64 * 1024


async def _data(
    client: aiosmtplib.SMTP, payload: bytes, timer: asyncio.Timeout, timeouts: SMTPTimeouts
) -> aiosmtplib.SMTPResponse:
    """``client.data`` for a payload :func:`_wire_data` made.

    The same bytes go on the wire (``DATA``, then the payload), but aiosmtplib would make
    two more passes over the message to normalise and dot-stuff it again.
    """
    _arm(timer, timeouts.data_start)
    start = await _command(client, b"DATA\r\n")
    if start.code != aiosmtplib.SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    if len(payload) <= _DATA_BLOCK:
        # One write, below the high-water mark: the transport takes it at once, and the
        # wait for the reply to the dot covers its way out.
        _arm(timer, timeouts.data_end)
        response = await _command(client, payload)
    else:
        response = await _data_blocks(client, payload, timer, timeouts)
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _data_blocks(
    client: aiosmtplib.SMTP, payload: bytes, timer: asyncio.Timeout, timeouts: SMTPTimeouts
) -> aiosmtplib.SMTPResponse:
    """Send a large payload block by block, each given ``data_block`` seconds to drain, and
    read the reply to the dot."""
    protocol = _protocol(client)
    # Claimed before the first block goes out, as _command claims its reply: a server that
    # refuses part-way (552, too big) and hangs up is heard, not taken for a lost line. The
    # task's first step runs before any received data is handled (both wait for the loop).
    reply = asyncio.ensure_future(protocol.read_response(timeout=None))
    reply.add_done_callback(_retrieved)
    sent = 0
    try:
        try:
            # Once the server has answered, the rest would not be read.
            while sent < len(payload) and not reply.done():
                _arm(timer, timeouts.data_block)
                protocol.write(payload[sent : sent + _DATA_BLOCK])
                sent += _DATA_BLOCK
                # FlowControlMixin's wait for the transport to go below its low-water mark
                # (StreamWriter.drain's); aiosmtplib has no public name for it.
                await protocol._drain_helper()
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
            # Closed mid-message: the reply, if one came before, says why.
            pass
        _arm(timer, timeouts.data_end)
        response = await reply
        if sent < len(payload):
            # Answered before the final dot: the session is out of step, never to be reused.
            client.close()
        return response
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    finally:
        reply.cancel()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a task's exception as seen (it is raised where it matters, or moot)."""
    if not task.cancelled():
        task.exception()


async def _connect(client: aiosmtplib.SMTP, host: str, port: int, timeouts: SMTPTimeouts) -> None:
    """Connect within ``timeouts.connect`` and wait ``timeouts.greeting`` for the 220.

    aiosmtplib's ``connect`` gives both one timeout; RFC 5321 §4.5.3.2.1 says servers may
    hold the greeting until load permits, so the TCP connection is made here and handed
    over. Errors are aiosmtplib's, as ``connect`` would raise them.
    """
    sock = await _open_socket(host, port, timeouts.connect)
    try:
        await client.connect(sock=sock, timeout=timeouts.greeting)
    except BaseException:
        # aiosmtplib closes its transport (and with it the socket) on failure, but not a
        # socket it never took over; closing twice is harmless.
        sock.close()
        raise


async def _open_socket(host: str, port: int, seconds: float) -> socket.socket:
    """A connected non-blocking TCP socket to ``host``'s first reachable address, within
    ``seconds``."""
    loop = asyncio.get_running_loop()
    failure: OSError | None = None
    try:
        async with asyncio.timeout(seconds):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            for family, kind, proto, _name, address in infos:
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, address)
                except OSError as exc:
                    sock.close()
                    failure = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                return sock
    except TimeoutError as exc:
        raise aiosmtplib.SMTPConnectTimeoutError(
            f"Timed out connecting to {host} on port {port}"
        ) from exc
    except OSError as exc:
        failure = exc
    raise aiosmtplib.SMTPConnectError(
        f"Error connecting to {host} on port {port}: {failure}"
    ) from failure


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, and HELO on the same connection when EHLO is refused: a server without ESMTP
    (RFC 5321 §3.2, §4.1.4), as aiosmtplib's own ``_ehlo_or_helo_if_needed`` does."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


# -- one SMTP session ---------------------------------------------------------------------


@dataclass
class _Transaction:
    results: dict[str, RecipientResult] = field(default_factory=dict)
    code: int | None = None
    reply: str = ""
    reply_lost: bool = False
    tls: bool = False
    # The session may carry the next message (the transaction ended cleanly).
    reusable: bool = False
    # A reused session died before DATA: nothing was judged, a fresh one may try again.
    retry_fresh: bool = False
    # The TLS handshake after STARTTLS failed: opportunistic TLS goes on in clear text.
    retry_clear: bool = False


@dataclass
class _Session:
    """Runs one SMTP transaction and turns every outcome into a DeliveryAttempt.

    ``opportunistic_tls`` (MX hosts; the client options then say ``start_tls=False``):
    STARTTLS when offered, and in clear text when it is refused or its handshake fails, as
    RFC 7435 and RFC 3207 §4 allow and MTAs do (Postfix's ``may``); without a policy that
    requires TLS, holding the mail for days would protect nothing. A relay is never
    opportunistic: its ``starttls`` setting is a requirement.
    """

    host: str
    address: str
    port: int
    local_hostname: str
    timeouts: SMTPTimeouts
    client_options: dict[str, Any]
    pool: SessionPool | None = None
    opportunistic_tls: bool = False

    async def run(self, mail_from: str, rcpts: Sequence[str], wire: _Wire) -> DeliveryAttempt:
        started = _now()
        key = (self.host, self.address, self.port)
        reused = self.pool.take(key) if self.pool is not None else None
        outcome: _Transaction | None = None
        if reused is not None:
            outcome = await self._transaction(reused, mail_from, rcpts, wire)
            if outcome.retry_fresh:
                _log.info("SMTP %s [%s]: reused session was closed; reconnecting", self.host, key)
                reused.client.close()
                outcome, reused = None, None
        if outcome is None:
            reused = self._open()
            outcome = await self._transaction(reused, mail_from, rcpts, wire, fresh=True)
            if outcome.retry_clear:
                _log.info("SMTP %s [%s]: TLS handshake failed; going on in clear", self.host, key)
                reused.client.close()
                reused = self._open()
                outcome = await self._transaction(
                    reused, mail_from, rcpts, wire, fresh=True, tls=False
                )
        assert reused is not None
        if outcome.reusable and self.pool is not None:
            reused.sent += 1
            await self.pool.give(key, reused)
        elif outcome.reusable:
            await _quit(reused.client)
            reused.client.close()
        else:
            reused.client.close()
        code, reply, reply_lost = outcome.code, outcome.reply, outcome.reply_lost
        _log.info(
            "SMTP %s [%s]:%d answered %s %s%s",
            self.host,
            self.address,
            self.port,
            code,
            reply[:200],
            " (reply lost after DATA)" if reply_lost else "",
        )
        return DeliveryAttempt(
            host=self.host,
            port=self.port,
            started_at=started,
            finished_at=_now(),
            code=code,
            reply=reply,
            recipients=[outcome.results[r] for r in rcpts],
            address=self.address,
            tls=outcome.tls,
            reply_lost=reply_lost,
        )

    def _open(self) -> _Open:
        # No port: _connect hands aiosmtplib a connected socket. The hostname is still
        # what TLS checks the certificate against.
        client = aiosmtplib.SMTP(
            hostname=self.address,
            local_hostname=self.local_hostname,
            timeout=self.timeouts.command,
            **self.client_options,
        )
        return _Open(client, tls=False)

    async def _starttls(self, client: aiosmtplib.SMTP) -> None:
        """Opportunistic STARTTLS on a fresh session (see the class); a refusal leaves the
        session as it was (RFC 3207 §4), so it goes on in clear text on the same one."""
        await _greet(client)
        if not client.supports_extension("starttls"):
            return
        try:
            await client.starttls()
        except aiosmtplib.SMTPResponseException as exc:
            _log.info(
                "SMTP %s [%s]: STARTTLS refused (%s %s); going on in clear",
                self.host,
                self.address,
                exc.code,
                _reply_text(exc.message)[:200],
            )

    async def _transaction(
        self,
        session: _Open,
        mail_from: str,
        rcpts: Sequence[str],
        wire: _Wire,
        *,
        fresh: bool = False,
        tls: bool = True,
    ) -> _Transaction:
        client = session.client
        out = _Transaction(tls=session.tls)
        results = out.results
        stage = "connect" if fresh else "probe"
        timeouts = self.timeouts
        try:
            # Unarmed while aiosmtplib's own calls run with their own timeouts (connect,
            # EHLO, STARTTLS, AUTH); armed for each of our commands.
            async with asyncio.timeout(None) as timer:
                if fresh:
                    await _connect(client, self.address, self.port, timeouts)
                    if self.opportunistic_tls and tls:
                        stage = "starttls"
                        await self._starttls(client)
                        stage = "connect"
                    # Else connect() has done any STARTTLS already (or the session began
                    # in TLS).
                    session.tls = out.tls = client.get_transport_info("sslcontext") is not None
                    if client.is_ehlo_or_helo_needed:
                        await _greet(client)
                elif time.monotonic() - session.idle_since >= _PROBE_AFTER_S:
                    async with asyncio.timeout(_QUIT_TIMEOUT):
                        await client.rset()
                stage = "mail"
                utf8 = _needs_smtputf8(mail_from, rcpts)
                if utf8 and not client.supports_extension("smtputf8"):
                    out.reply = "the server does not offer SMTPUTF8 (RFC 6531 §3.2)"
                    self._settle(
                        results,
                        rcpts,
                        ok=False,
                        permanent=True,
                        code=None,
                        text=out.reply,
                        blames_recipient=False,
                    )
                    out.reusable = True  # nothing was started on it
                else:
                    encoding = "utf-8" if utf8 else "ascii"
                    _arm(timer, timeouts.mail)
                    await _mail(client, mail_from, self._mail_options(client, wire, utf8), encoding)
                    stage = "rcpt"
                    accepted = await self._recipients(
                        client, rcpts, results, encoding, timer, timeouts.rcpt
                    )
                    if accepted:
                        stage = "data"
                        response = await _data(client, wire.payload, timer, timeouts)
                        out.code, out.reply = response.code, _reply_text(response.message)
                        self._settle(
                            results,
                            accepted,
                            ok=True,
                            permanent=False,
                            code=out.code,
                            text=out.reply,
                        )
                        out.reusable = True
                    else:
                        last = results[rcpts[-1]]
                        out.code, out.reply = last.code, last.message
                        out.reusable = await self._reset(client)
        except aiosmtplib.SMTPResponseException as exc:
            if not fresh and (stage == "probe" or (stage == "mail" and exc.code == 421)):
                # The old session is refused or closing (RFC 5321 §3.8): not a verdict.
                results.clear()
                out.retry_fresh = True
                return out
            out.code, out.reply = exc.code, _reply_text(exc.message)
            verdict = classify_reply(exc.code, enhanced_status(out.reply), _reply_stage(stage))
            self._settle(
                results,
                rcpts,
                ok=False,
                permanent=verdict.permanent,
                code=out.code,
                text=out.reply,
                blames_recipient=verdict.blames_recipient,
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            if stage == "starttls":
                # The handshake failed (the reply to STARTTLS was 220): this connection is
                # lost, a clear one may carry the mail.
                results.clear()
                out.retry_clear = True
                return out
            dead = stage in ("mail", "rcpt") and isinstance(exc, _DEAD_SESSION)
            if not fresh and (stage == "probe" or dead):
                # A pooled session that died while idle: nothing reached DATA, so a fresh
                # connection may try once more without risking a duplicate.
                results.clear()
                out.retry_fresh = True
                return out
            reply = _describe(exc) if not isinstance(exc, TimeoutError) else "timed out"
            out.reply_lost = stage == "data"
            if out.reply_lost:
                reply = f"connection lost before the reply to DATA ({reply})"
            out.reply = _reply_text(reply)
            self._settle(results, rcpts, ok=False, permanent=False, code=None, text=out.reply)
        return out

    @staticmethod
    async def _reset(client: aiosmtplib.SMTP) -> bool:
        """RSET after a transaction that never reached DATA; True when the session is clean."""
        try:
            async with asyncio.timeout(_QUIT_TIMEOUT):
                await client.rset()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return True

    @staticmethod
    def _settle(
        results: dict[str, RecipientResult],
        rcpts: Sequence[str],
        *,
        ok: bool,
        permanent: bool,
        code: int | None,
        text: str,
        blames_recipient: bool = True,
    ) -> None:
        """Record an outcome for each of ``rcpts`` that has none yet."""
        for rcpt in rcpts:
            results.setdefault(
                rcpt, RecipientResult(rcpt, ok, permanent, code, text, blames_recipient)
            )

    @staticmethod
    def _mail_options(client: aiosmtplib.SMTP, wire: _Wire, utf8: bool) -> list[str]:
        options: list[str] = []
        if client.supports_extension("size"):
            options.append(f"SIZE={wire.size}")
        if wire.eight_bit and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if utf8:
            options.append("SMTPUTF8")
        return options

    @staticmethod
    async def _recipients(
        client: aiosmtplib.SMTP,
        rcpts: Sequence[str],
        results: dict[str, RecipientResult],
        encoding: str,
        timer: asyncio.Timeout,
        seconds: float,
    ) -> list[str]:
        accepted: list[str] = []
        for rcpt in rcpts:
            _arm(timer, seconds)
            try:
                await _rcpt(client, rcpt, encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                text = _reply_text(exc.message)
                verdict = classify_reply(exc.code, enhanced_status(text), "rcpt")
                results[rcpt] = RecipientResult(
                    rcpt, False, verdict.permanent, exc.code, text, verdict.blames_recipient
                )
            else:
                accepted.append(rcpt)
        return accepted


def _conclude(attempts: list[DeliveryAttempt], rcpts: Sequence[str]) -> list[DeliveryAttempt]:
    """Return the attempts if anyone was accepted; otherwise raise the right failure."""
    outcomes = recipient_outcomes(attempts)
    if any(outcomes[r].ok for r in rcpts if r in outcomes):
        return attempts
    failures = [outcomes[r] for r in rcpts if r in outcomes]
    last = attempts[-1] if attempts else None
    code = next((f.code for f in reversed(failures) if f.code is not None), None)
    host = last.host if last is not None else None
    reply = last.reply if last is not None else "no attempt was made"
    if failures and all(f.permanent for f in failures):
        raise PermanentDeliveryError(
            f"every recipient was refused: {reply}", smtp_code=code, host=host, attempts=attempts
        )
    raise TemporaryDeliveryError(
        f"delivery deferred: {reply}", smtp_code=code, host=host, attempts=attempts
    )


# -- transports ---------------------------------------------------------------------------


class RelayTransport:
    """Sends every message, whatever its recipients, through one configured relay, waiting
    at each step as long as ``timeouts`` says (RFC 5321's by default)."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        local_hostname: str = "localhost",
        timeouts: SMTPTimeouts | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self.timeouts = timeouts or SMTPTimeouts()
        self._tls_context = tls_context
        # Two delivery pipelines of 16 sessions each may talk to the relay at once.
        self.pool = SessionPool(per_server=32)

    async def close(self) -> None:
        """QUIT the sessions kept open for this event loop."""
        await self.pool.close()

    def __repr__(self) -> str:
        return f"RelayTransport({self.config.redacted_url})"

    def _client_options(self) -> dict[str, Any]:
        config = self.config
        options: dict[str, Any] = {
            "use_tls": config.tls,
            "start_tls": config.starttls,
            "validate_certs": config.verify_tls,
        }
        if self._tls_context is not None:
            options["tls_context"] = self._tls_context
        if config.username is not None:
            options["username"] = config.username
            options["password"] = config.password or ""
        return options

    async def deliver(
        self, mail_from: str, rcpts: Sequence[str], data: bytes
    ) -> list[DeliveryAttempt]:
        _check_envelope(mail_from, rcpts)
        session = _Session(
            host=self.config.host,
            address=self.config.host,
            port=self.config.port,
            local_hostname=self.local_hostname,
            timeouts=self.timeouts,
            client_options=self._client_options(),
            pool=self.pool,
        )
        attempt = await session.run(mail_from, rcpts, _wire_data(data))
        return _conclude([attempt], rcpts)


class MXTransport:
    """Delivers straight to each recipient domain's MX hosts, in preference order.

    STARTTLS is used whenever offered, without checking the certificate, as MTAs do for
    opportunistic TLS (RFC 7435). Recipients deferred by one host are tried at the next.
    Each step waits as long as ``timeouts`` says (RFC 5321's by default).
    """

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        mx_port: int = 25,
        local_hostname: str = "localhost",
        timeouts: SMTPTimeouts | None = None,
    ) -> None:
        self.resolver = resolver
        self.mx_port = mx_port
        self.local_hostname = local_hostname
        self.timeouts = timeouts or SMTPTimeouts()
        self.pool = SessionPool(per_server=4)

    async def close(self) -> None:
        """QUIT the sessions kept open for this event loop."""
        await self.pool.close()

    async def deliver(
        self, mail_from: str, rcpts: Sequence[str], data: bytes
    ) -> list[DeliveryAttempt]:
        _check_envelope(mail_from, rcpts)
        wire = _wire_data(data)
        by_domain: dict[str, list[str]] = {}
        for rcpt in dict.fromkeys(rcpts):
            by_domain.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
        attempts: list[DeliveryAttempt] = []
        for domain, domain_rcpts in by_domain.items():
            attempts.extend(await self._deliver_domain(domain, mail_from, domain_rcpts, wire))
        return _conclude(attempts, list(dict.fromkeys(rcpts)))

    async def _deliver_domain(
        self, domain: str, mail_from: str, rcpts: list[str], wire: _Wire
    ) -> list[DeliveryAttempt]:
        started = _now()
        try:
            hosts = await resolve_mx(domain, self.resolver)
        except (PermanentDeliveryError, TemporaryDeliveryError) as exc:
            return [self._without_session(domain, started, rcpts, exc)]

        attempts: list[DeliveryAttempt] = []
        pending = rcpts
        tried = 0
        for _preference, host in hosts:
            started = _now()
            try:
                addresses = await _addresses(host, self.resolver)
            except TemporaryDeliveryError as exc:
                attempts.append(self._without_session(host, started, pending, exc))
                continue
            if not addresses:
                missing = TemporaryDeliveryError(f"the mail host {host} has no address")
                attempts.append(self._without_session(host, started, pending, missing))
                continue
            for address in addresses:
                if tried >= _MAX_ADDRESSES_PER_DOMAIN:
                    return attempts
                tried += 1
                attempt = await self._session(host, address).run(mail_from, pending, wire)
                attempts.append(attempt)
                pending = [r.address for r in attempt.recipients if not r.ok and not r.permanent]
                # After a lost reply the message may already be there: a second host
                # would make a duplicate, so the retry waits for the next round.
                if not pending or attempt.reply_lost:
                    return attempts
        return attempts

    def _session(self, host: str, address: str) -> _Session:
        return _Session(
            host=host,
            address=address,
            port=self.mx_port,
            local_hostname=self.local_hostname,
            timeouts=self.timeouts,
            client_options={"start_tls": False, "validate_certs": False},
            pool=self.pool,
            opportunistic_tls=True,
        )

    @staticmethod
    def _without_session(
        host: str,
        started: dt.datetime,
        rcpts: Sequence[str],
        exc: PermanentDeliveryError | TemporaryDeliveryError,
    ) -> DeliveryAttempt:
        """Record a lookup that ended before any connection, so each recipient has a result."""
        permanent = isinstance(exc, PermanentDeliveryError)
        return DeliveryAttempt(
            host=host,
            port=0,
            started_at=started,
            finished_at=_now(),
            code=None,
            reply=exc.message,
            recipients=[RecipientResult(r, False, permanent, None, exc.message) for r in rcpts],
        )
