"""Email address syntax (pure). Addresses are stored lower-cased so lookups are exact."""

from __future__ import annotations

import re

# RFC 5322 dot-atom local part (no quoted strings: nobody hosts those) and an RFC 1035 host
# name; single-label hosts such as ``localhost`` are allowed for the server's own domain.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class AddressError(ValueError):
    """Not an address we can use; the message says why."""


def normalize_domain(domain: str) -> str:
    value = domain.strip().rstrip(".").lower()
    try:
        value = value.encode("idna").decode("ascii")
    except UnicodeError:
        raise AddressError(f"{domain!r} is not a valid domain name") from None
    if not value or len(value) > 253 or not all(_LABEL.match(p) for p in value.split(".")):
        raise AddressError(f"{domain!r} is not a valid domain name")
    return value


def normalize_address(address: str) -> str:
    """``Local@Example.COM`` → ``local@example.com``; raises AddressError with a reason."""
    if not isinstance(address, str):
        raise AddressError("an address must be a string like name@example.com")
    value = address.strip()
    if any(c in value for c in '\r\n\0 <>"(),;:[]\\'):
        raise AddressError(
            f"{address!r} is not a plain email address; give it as name@example.com "
            "without a display name, spaces or brackets"
        )
    local, sep, domain = value.rpartition("@")
    if not sep or not local or not domain:
        raise AddressError(f"{address!r} is not an email address; use the form name@example.com")
    if len(local) > 64 or not _LOCAL.match(local):
        raise AddressError(f"the local part of {address!r} is not valid")
    normalized = f"{local.lower()}@{normalize_domain(domain)}"
    if len(normalized) > 254:
        raise AddressError(f"{address!r} is longer than 254 characters")
    return normalized


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def matches_pattern(address: str, pattern: str) -> bool:
    """Allowlist patterns: an exact address or ``*@domain``."""
    address = address.lower()
    pattern = pattern.lower()
    if pattern.startswith("*@"):
        return domain_of(address) == pattern[2:]
    return address == pattern
