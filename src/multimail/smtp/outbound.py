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
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import random
import re
import ssl
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.resolver

from multimail.errors import InvalidInput, PermanentDeliveryError, TemporaryDeliveryError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "DeliveryAttempt",
    "MXTransport",
    "OutboundTransport",
    "RecipientResult",
    "RelayConfig",
    "RelayTransport",
    "SessionPool",
    "make_resolver",
    "parse_relay_url",
    "recipient_outcomes",
    "resolve_mx",
]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_TOTAL_TIMEOUT = 60.0
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
    no control character to screen again; the transaction's one ``asyncio.timeout`` scope
    bounds every reply, so no timer per command. As in aiosmtplib, a lost line or a 421
    closes the session.
    """
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
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


async def _data(client: aiosmtplib.SMTP, payload: bytes) -> aiosmtplib.SMTPResponse:
    """``client.data`` for a payload :func:`_wire_data` made.

    The same bytes go on the wire (``DATA``, then the payload as one write), but aiosmtplib
    would make two more passes over the message to normalise and dot-stuff it again.
    """
    start = await _command(client, b"DATA\r\n")
    if start.code != aiosmtplib.SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    response = await _command(client, payload)
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


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
    connect_timeout: float
    total_timeout: float
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
        client = aiosmtplib.SMTP(
            hostname=self.address,
            port=self.port,
            local_hostname=self.local_hostname,
            timeout=self.total_timeout,
            **self.client_options,
        )
        return _Open(client, tls=False)

    async def _starttls(self, client: aiosmtplib.SMTP) -> None:
        """Opportunistic STARTTLS on a fresh session (see the class); a refusal leaves the
        session as it was (RFC 3207 §4), so it goes on in clear text on the same one."""
        await client.ehlo()
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
                exc.message[:200],
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
        try:
            async with asyncio.timeout(self.total_timeout):
                if fresh:
                    await client.connect(timeout=self.connect_timeout)
                    if self.opportunistic_tls and tls:
                        stage = "starttls"
                        await self._starttls(client)
                        stage = "connect"
                    # Else connect() has done any STARTTLS already (or the session began
                    # in TLS).
                    session.tls = out.tls = client.get_transport_info("sslcontext") is not None
                    if client.is_ehlo_or_helo_needed:
                        await client.ehlo()
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
                    await _mail(client, mail_from, self._mail_options(client, wire, utf8), encoding)
                    stage = "rcpt"
                    accepted = await self._recipients(client, rcpts, results, encoding)
                    if accepted:
                        stage = "data"
                        response = await _data(client, wire.payload)
                        out.code, out.reply = response.code, response.message
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
            out.code, out.reply = exc.code, exc.message
            # A refused login is our configuration, not the message: keep it for retry
            # rather than bouncing mail because a password expired. A 5xx greeting or EHLO
            # says this host will not serve us (RFC 5321 §3.1), not that a mailbox is gone:
            # the next MX may (Postfix's smtp_skip_5xx_greeting), else the retries.
            before_mail = stage in ("connect", "starttls")
            permanent = (
                500 <= exc.code < 600
                and not before_mail
                and not isinstance(exc, aiosmtplib.SMTPAuthenticationError)
            )
            self._settle(
                results,
                rcpts,
                ok=False,
                permanent=permanent,
                code=out.code,
                text=out.reply,
                # Refusing MAIL FROM judges our sender; after DATA, the message to them.
                blames_recipient=not before_mail and stage != "mail",
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
            out.reply = reply
            self._settle(results, rcpts, ok=False, permanent=False, code=None, text=reply)
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
    ) -> list[str]:
        accepted: list[str] = []
        for rcpt in rcpts:
            try:
                await _rcpt(client, rcpt, encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                results[rcpt] = RecipientResult(rcpt, False, exc.code >= 500, exc.code, exc.message)
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
    """Sends every message, whatever its recipients, through one configured relay."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        local_hostname: str = "localhost",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self.connect_timeout = connect_timeout
        self.total_timeout = total_timeout
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
            connect_timeout=self.connect_timeout,
            total_timeout=self.total_timeout,
            client_options=self._client_options(),
            pool=self.pool,
        )
        attempt = await session.run(mail_from, rcpts, _wire_data(data))
        return _conclude([attempt], rcpts)


class MXTransport:
    """Delivers straight to each recipient domain's MX hosts, in preference order.

    STARTTLS is used whenever offered, without checking the certificate, as MTAs do for
    opportunistic TLS (RFC 7435). Recipients deferred by one host are tried at the next.
    """

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        mx_port: int = 25,
        local_hostname: str = "localhost",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.mx_port = mx_port
        self.local_hostname = local_hostname
        self.connect_timeout = connect_timeout
        self.total_timeout = total_timeout
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
            connect_timeout=self.connect_timeout,
            total_timeout=self.total_timeout,
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
