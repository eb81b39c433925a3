"""Email address syntax (pure). Addresses are stored lower-cased so lookups are exact."""

from __future__ import annotations

import re

import idna

# RFC 5322 dot-atom local part (no quoted strings: nobody hosts those) and an RFC 1035 host
# name; single-label hosts such as ``localhost`` are allowed for the server's own domain.
# Used with ``fullmatch``: ``$`` would also match before a final newline.
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class AddressError(ValueError):
    """Not an address we can use; the message says why."""


def idna_ascii(domain: str) -> str:
    """A domain name as the lower-case ASCII of DNS and SMTP: ``Faß.Test`` → ``xn--fa-hia.test``.

    IDNA 2008 (RFC 5890-5893) with the UTS #46 non-transitional mapping, via the ``idna``
    package: ß, the Greek final sigma and the joiners ZWJ/ZWNJ (where their context allows
    them) are kept as themselves, not folded to ss, sigma or nothing as Python's IDNA 2003
    ``"idna"`` codec does, which names a different domain. A single trailing dot (the DNS
    root) is dropped. Plain letter-digit-hyphen labels are taken as they are (lower-cased);
    ``xn--`` labels must be valid A-labels. Raises AddressError saying why otherwise.
    """
    if not isinstance(domain, str):
        raise AddressError("a domain name must be a string like example.com")
    if domain.isascii():
        mapped = domain.lower()
    else:
        try:
            mapped = idna.uts46_remap(domain, std3_rules=False)
        except UnicodeError as exc:  # idna.IDNAError is a UnicodeError
            raise AddressError(f"{domain!r} is not a valid domain name: {exc}") from None
    if mapped.endswith("."):
        mapped = mapped[:-1]
    labels = []
    for label in mapped.split("."):
        if not label:
            raise AddressError(f"{domain!r} is not a valid domain name: it has an empty label")
        if _LABEL.fullmatch(label) and not label.startswith("xn--"):
            labels.append(label)
            continue
        try:
            labels.append(idna.alabel(label).decode("ascii"))
        except UnicodeError as exc:
            raise AddressError(f"{domain!r} is not a valid domain name: {exc}") from None
    value = ".".join(labels)
    if len(value) > 253:
        raise AddressError(f"{domain!r} is not a valid domain name: longer than 253 characters")
    return value


def normalize_domain(domain: str) -> str:
    return idna_ascii(domain.strip().rstrip("."))


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
    if len(local) > 64 or not _LOCAL.fullmatch(local):
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
