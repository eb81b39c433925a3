"""Where a webhook may point: the guard against server-side request forgery.

An agent can create a webhook, so a webhook URL is attacker-controlled input. Three
checks keep it from reaching our own network:

1. :func:`check_webhook_url` when the URL is saved: scheme, no credentials, a real host
   name or IP literal, a valid port, and no internal IP literal.
2. :func:`resolve_and_check` when a request is about to be sent: every address the name
   resolves to must be public. The dispatcher must then connect to one of the returned
   addresses (not resolve again), or DNS rebinding could swap in an internal address
   between the check and the connect.
3. :func:`is_forbidden_target`, the address rule both use.

``allow_private`` (``MULTIMAIL_ALLOW_PRIVATE_WEBHOOKS``) lifts the address rule for
local development and tests; nothing else does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from multimail.errors import Forbidden, InvalidInput, TemporaryDeliveryError

__all__ = [
    "ParsedTarget",
    "Resolver",
    "check_webhook_url",
    "is_forbidden_target",
    "resolve_and_check",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Checked in order; the first match names the reason. Ranges follow the IANA
# special-purpose registries (RFC 6890 and successors).
_FORBIDDEN_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("169.254.169.254/32"), "cloud metadata service"),
    (_V4("0.0.0.0/8"), "unspecified (this network)"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("10.0.0.0/8"), "private (RFC 1918)"),
    (_V4("172.16.0.0/12"), "private (RFC 1918)"),
    (_V4("192.168.0.0/16"), "private (RFC 1918)"),
    (_V4("100.64.0.0/10"), "carrier-grade NAT (RFC 6598)"),
    (_V4("169.254.0.0/16"), "link-local"),
    (_V4("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_V4("192.0.2.0/24"), "reserved (documentation)"),
    (_V4("198.51.100.0/24"), "reserved (documentation)"),
    (_V4("203.0.113.0/24"), "reserved (documentation)"),
    (_V4("198.18.0.0/15"), "reserved (benchmarking)"),
    (_V4("192.88.99.0/24"), "reserved (6to4 relay anycast)"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("240.0.0.0/4"), "reserved"),
)

_FORBIDDEN_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("::/96"), "reserved (IPv4-compatible, deprecated)"),
    (_V6("fc00::/7"), "private (unique local)"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "reserved (site-local)"),
    (_V6("ff00::/8"), "multicast"),
    (_V6("64:ff9b:1::/48"), "private (local-use NAT64)"),
    (_V6("100::/64"), "reserved (discard-only)"),
    (_V6("2001:db8::/32"), "reserved (documentation)"),
)

# Prefixes whose low bits carry an IPv4 address that a gateway will connect to.
_EMBEDS_V4_LOW32 = (_V6("::ffff:0:0/96"), _V6("64:ff9b::/96"))
_SIX_TO_FOUR = _V6("2002::/16")

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _embedded_v4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    for network in _EMBEDS_V4_LOW32:
        if address in network:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), f"inside {network}"
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF), "inside 6to4"
    if address.teredo is not None:
        server, client = address.teredo
        for inner in (client, server):
            if _v4_reason(inner):
                return inner, "inside Teredo"
    return None


def _v4_reason(address: ipaddress.IPv4Address) -> str | None:
    for network, reason in _FORBIDDEN_V4:
        if address in network:
            return reason
    if not address.is_global:
        return "reserved"
    return None


def is_forbidden_target(ip: str | IPAddress) -> str | None:
    """Why a webhook must not connect to ``ip``, or None when it is a public address.

    IPv6 forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4,
    Teredo) are judged by the address they carry as well.
    """
    if isinstance(ip, str):
        try:
            address: IPAddress = ipaddress.ip_address(ip.strip("[]"))
        except ValueError as exc:
            raise InvalidInput(f"{ip!r} is not an IP address", code="invalid_ip_address") from exc
    else:
        address = ip
    if isinstance(address, ipaddress.IPv4Address):
        return _v4_reason(address)
    unscoped = ipaddress.IPv6Address(int(address))
    for network, reason in _FORBIDDEN_V6:
        if unscoped in network:
            return reason
    embedded = _embedded_v4(unscoped)
    if embedded is not None:
        inner, where = embedded
        inner_reason = _v4_reason(inner)
        if inner_reason is not None:
            return f"{inner_reason}, {where}"
    if unscoped.is_multicast:
        return "multicast"
    if embedded is None and not unscoped.is_global:
        return "reserved"
    return None


@dataclass(frozen=True, slots=True)
class ParsedTarget:
    """A webhook URL that passed :func:`check_webhook_url`."""

    url: str
    scheme: str
    host: str  # lower-case ASCII (IDNA) name, or an IP literal without brackets
    port: int
    path: str  # path plus query, ready for the request line
    is_ip_literal: bool


def _invalid(url: str, why: str) -> InvalidInput:
    return InvalidInput(f"webhook URL {why}", code="webhook_url_invalid", url=url)


def _looks_numeric(host: str) -> bool:
    # Resolvers read "2130706433", "0x7f.1" or "127.1" as IPv4 addresses; such
    # spellings are only ever used to slip an internal address past a filter.
    try:
        socket.inet_aton(host)
    except OSError:
        return host.rsplit(".", 1)[-1].isdigit()
    return True


def _normalise_host(url: str, raw_host: str) -> tuple[str, bool]:
    try:
        return str(ipaddress.ip_address(raw_host)), True
    except ValueError:
        pass
    try:
        host = raw_host.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise _invalid(url, "has an invalid host name") from exc
    host = host.removesuffix(".")
    if len(host) > 253 or _looks_numeric(host):
        raise _invalid(url, "has an invalid host name")
    if not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise _invalid(url, "has an invalid host name")
    return host, False


def check_webhook_url(url: str, *, allow_http: bool, allow_private: bool) -> ParsedTarget:
    """Validate a webhook URL before it is stored; raise :class:`InvalidInput` if unusable.

    Codes: ``webhook_url_insecure`` (http without ``allow_http``), ``webhook_url_invalid``,
    ``webhook_target_forbidden`` (an internal IP literal or ``localhost`` without
    ``allow_private``). Names are resolved and checked again at send time.
    """
    if len(url) > 2048 or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise _invalid(url, "is too long or contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _invalid(url, "cannot be parsed or has an invalid port") from exc
    scheme = parts.scheme.lower()
    if scheme == "http" and not allow_http:
        raise InvalidInput("webhook URL must use https", code="webhook_url_insecure", url=url)
    if scheme not in {"http", "https"}:
        raise _invalid(url, "must use https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        # The URL itself is left out of the error: it holds a password, and errors get logged.
        raise InvalidInput("webhook URL must not contain credentials", code="webhook_url_invalid")
    if not parts.hostname:
        raise _invalid(url, "has no host")
    if port == 0:
        raise _invalid(url, "has port 0")
    host, is_ip = _normalise_host(url, parts.hostname)
    if not allow_private:
        reason = is_forbidden_target(host) if is_ip else None
        if host == "localhost" or host.endswith(".localhost"):
            reason = "loopback"
        if reason is not None:
            raise InvalidInput(
                f"webhook URL points at a {reason} address",
                code="webhook_target_forbidden",
                url=url,
            )
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return ParsedTarget(
        url=url,
        scheme=scheme,
        host=host,
        port=port if port is not None else (443 if scheme == "https" else 80),
        path=path,
        is_ip_literal=is_ip,
    )


async def _system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


async def resolve_and_check(
    host: str, port: int, *, allow_private: bool, resolver: Resolver | None = None
) -> list[str]:
    """Resolve ``host`` and return its addresses (deduplicated, in resolver order).

    Raises :class:`Forbidden` (``webhook_target_forbidden``) if ANY address is internal,
    since a name with one internal address could be steered there, and
    :class:`TemporaryDeliveryError` (``webhook_dns_failed``) when the name does not
    resolve.
    """
    resolve = resolver or _system_resolver
    try:
        found = await resolve(host, port)
    except OSError as exc:
        raise TemporaryDeliveryError(
            f"cannot resolve {host}: {exc}", code="webhook_dns_failed", host=host
        ) from exc
    addresses = list(dict.fromkeys(found))
    if not addresses:
        raise TemporaryDeliveryError(
            f"{host} has no addresses", code="webhook_dns_failed", host=host
        )
    if allow_private:
        return addresses
    for address in addresses:
        reason = is_forbidden_target(address)
        if reason is not None:
            raise Forbidden(
                f"webhook host {host} resolves to a {reason} address",
                code="webhook_target_forbidden",
                host=host,
                address=address,
                reason=reason,
            )
    return addresses
