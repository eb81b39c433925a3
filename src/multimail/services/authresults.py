"""SPF, DKIM and DMARC for inbound mail, asked of the configured resolver.

Every lookup goes through one dnspython resolver built from ``settings.dns_resolver``, so a
test's ``LocalDNSServer`` (or an operator's own resolver) answers all three checks. pyspf
evaluates SPF (RFC 7208) but looks names up through a module-level function bound to the
system resolver; :class:`_SPFQuery` overrides its one lookup method instead. dkimpy verifies
signatures with a ``dnsfunc`` backed by the same resolver. DMARC (RFC 7489) is small enough to
evaluate here: the policy record, then relaxed or strict alignment of the SPF and DKIM
domains with the From domain. A message with more than one From field never passes DMARC
(RFC 7489 §6.6.1: the author cannot be determined), whatever its signatures say.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import dkim
import dns.exception
import dns.resolver
import spf
from publicsuffix2 import get_sld  # type: ignore[import-untyped]

from multimail.services.domains import make_sync_resolver

__all__ = [
    "AuthResult",
    "AuthResults",
    "authenticate",
    "check_dkim",
    "check_dmarc",
    "check_spf",
    "dns_txt_func",
    "make_resolver",
]

_DMARC_TAG = re.compile(r"^\s*([a-z]+)\s*=\s*(.*?)\s*$", re.IGNORECASE)
# A result token is one word; anything else from a library would corrupt our header.
_TOKEN = re.compile(r"[^a-z]")


@dataclass(frozen=True)
class AuthResult:
    """One method's outcome (``pass``, ``fail``, ``none``, ...) and the domain it is about."""

    result: str
    domain: str | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "domain": self.domain, "detail": self.detail}


@dataclass(frozen=True)
class AuthResults:
    spf: AuthResult
    dkim: AuthResult
    dmarc: AuthResult
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "spf": self.spf.to_json(),
            "dkim": self.dkim.to_json(),
            "dmarc": self.dmarc.to_json(),
            **self.extra,
        }

    def header_value(self, authserv_id: str) -> str:
        """The RFC 8601 ``Authentication-Results`` value, ``authserv_id`` first."""
        parts = [_safe_host(authserv_id)]
        for name, item, prop in (
            ("spf", self.spf, "smtp.mailfrom"),
            ("dkim", self.dkim, "header.d"),
            ("dmarc", self.dmarc, "header.from"),
        ):
            text = f"{name}={_TOKEN.sub('', item.result.lower()) or 'none'}"
            if item.domain:
                text += f" {prop}={_safe_host(item.domain)}"
            parts.append(text)
        return "; ".join(parts)


def _safe_host(value: str) -> str:
    # Domains come from the sender; keep only host characters so nothing can fold a header.
    return re.sub(r"[^A-Za-z0-9.\-_]", "", value)[:253] or "unknown"


def make_resolver(address: str | None, *, lifetime: float = 5.0) -> dns.resolver.Resolver:
    return make_sync_resolver(address, lifetime=lifetime)


def _txt(resolver: dns.resolver.Resolver, name: str) -> list[bytes]:
    try:
        answer = resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [b"".join(rdata.strings) for rdata in answer]


def dns_txt_func(resolver: dns.resolver.Resolver) -> Any:
    """A dkimpy ``dnsfunc``: the TXT record at ``name`` joined, or None."""

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            values = _txt(resolver, name.decode("ascii").rstrip("."))
        except (dns.exception.DNSException, UnicodeDecodeError):
            return None
        return values[0] if values else None

    return txt


# --------------------------------------------------------------------------- SPF


class _SPFQuery(spf.query):  # type: ignore[misc]
    """pyspf's evaluator with its DNS lookups sent to our resolver."""

    def __init__(self, resolver: dns.resolver.Resolver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resolver = resolver

    def dns(
        self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        cached = self.cache.get((name, qtype))
        if cached:
            return list(cached)
        try:
            answer = self._resolver.resolve(name, "TXT" if qtype == "SPF" else qtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            answer = None
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        result: list[Any] = []
        for rdata in answer or []:
            if qtype in ("A", "AAAA"):
                result.append(rdata.address)
            elif qtype == "MX":
                result.append((rdata.preference, rdata.exchange))
            elif qtype == "PTR":
                result.append(rdata.target.to_text(True))
            else:
                result.append(rdata.strings)
        if not result and not ignore_void:
            # RFC 7208 §4.6.4: at most two lookups may come back empty.
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        self.cache[(name, qtype)] = result
        return result


def check_spf(
    resolver: dns.resolver.Resolver, *, peer_ip: str | None, mail_from: str, helo: str
) -> AuthResult:
    """SPF for the envelope sender (the HELO name for bounces, RFC 7208 §2.4)."""
    identity = mail_from or (f"postmaster@{helo}" if helo else "")
    domain = identity.rpartition("@")[2].lower() or None
    if not peer_ip or not domain:
        return AuthResult("none", domain, "no client address or sender domain to check")
    try:
        ipaddress.ip_address(peer_ip)
    except ValueError:
        return AuthResult("none", domain, "client address is not an IP address")
    try:
        query = _SPFQuery(resolver, i=peer_ip, s=identity, h=helo or domain, querytime=20)
        result, _code, explanation = query.check()
    except Exception as exc:  # pyspf raises bare exceptions on odd input
        return AuthResult("temperror", domain, type(exc).__name__)
    return AuthResult(str(result), domain, str(explanation)[:300] or None)


# --------------------------------------------------------------------------- DKIM


def _signature_domains(raw: bytes) -> list[str]:
    message = dkim.DKIM(raw)
    domains: list[str] = []
    for name, value in message.headers:
        if name.lower() != b"dkim-signature":
            continue
        try:
            tags = dkim.util.parse_tag_value(value)
        except Exception:
            domains.append("")
            continue
        domains.append(tags.get(b"d", b"").decode("ascii", "replace").lower())
    return domains


def check_dkim(raw: bytes, resolver: dns.resolver.Resolver) -> list[AuthResult]:
    """One result per DKIM-Signature, in header order; empty when unsigned."""
    try:
        signed = _signature_domains(raw)
    except Exception:
        return [AuthResult("permerror", None, "message headers cannot be read")]
    results: list[AuthResult] = []
    dnsfunc = dns_txt_func(resolver)
    for index, domain in enumerate(signed):
        try:
            ok = dkim.DKIM(raw).verify(idx=index, dnsfunc=dnsfunc)
        except dkim.DKIMException as exc:
            # dkimpy raises for a changed body; RFC 8601 calls that a plain failure.
            kind = "fail" if "body hash mismatch" in str(exc) else "permerror"
            results.append(AuthResult(kind, domain or None, str(exc)[:200]))
            continue
        except Exception as exc:
            results.append(AuthResult("temperror", domain or None, type(exc).__name__))
            continue
        results.append(AuthResult("pass" if ok else "fail", domain or None))
    return results


def _best_dkim(results: list[AuthResult], from_domain: str | None) -> AuthResult:
    if not results:
        return AuthResult("none")
    passing = [r for r in results if r.result == "pass"]
    if passing:
        aligned = [r for r in passing if from_domain and _aligned(r.domain, from_domain, False)]
        return (aligned or passing)[0]
    return results[0]


# --------------------------------------------------------------------------- DMARC


def _org(domain: str) -> str:
    return str(get_sld(domain) or domain).lower()


def _aligned(domain: str | None, from_domain: str, strict: bool) -> bool:
    if not domain:
        return False
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    return domain == from_domain if strict else _org(domain) == _org(from_domain)


def _dmarc_record(resolver: dns.resolver.Resolver, domain: str) -> dict[str, str] | None:
    for name in dict.fromkeys([domain, _org(domain)]):
        records = [
            r.decode("utf-8", "replace")
            for r in _txt(resolver, f"_dmarc.{name}")
            if r.lower().startswith(b"v=dmarc1")
        ]
        if len(records) == 1:  # RFC 7489 §6.6.3: several records count as none
            tags: dict[str, str] = {}
            for part in records[0].split(";"):
                match = _DMARC_TAG.match(part)
                if match:
                    tags[match.group(1).lower()] = match.group(2)
            return tags
    return None


def check_dmarc(
    resolver: dns.resolver.Resolver,
    *,
    from_domain: str | None,
    from_count: int,
    spf_result: AuthResult,
    dkim_results: list[AuthResult],
) -> AuthResult:
    if from_count != 1 or not from_domain:
        return AuthResult(
            "fail" if from_count > 1 else "none",
            from_domain,
            "the message must have exactly one From field",
        )
    try:
        record = _dmarc_record(resolver, from_domain)
    except dns.exception.DNSException as exc:
        return AuthResult("temperror", from_domain, type(exc).__name__)
    if record is None:
        return AuthResult("none", from_domain, "no DMARC record")
    strict_spf = record.get("aspf", "r").lower() == "s"
    strict_dkim = record.get("adkim", "r").lower() == "s"
    spf_ok = spf_result.result == "pass" and _aligned(spf_result.domain, from_domain, strict_spf)
    dkim_ok = any(
        r.result == "pass" and _aligned(r.domain, from_domain, strict_dkim) for r in dkim_results
    )
    policy = record.get("p", "none").lower()
    if spf_ok or dkim_ok:
        return AuthResult("pass", from_domain, f"policy={policy}")
    return AuthResult("fail", from_domain, f"policy={policy}")


def sender_verified(auth: AuthResults, from_address: str | None, from_count: int = 1) -> bool:
    """True when the From address is vouched for: DMARC passes, or (for a domain with no
    DMARC record) SPF or DKIM passes for a domain aligned with it. What a request made in the
    sender's name (an "unsubscribe" reply) needs before we act on it: anyone can write any
    From."""
    if from_count != 1 or not from_address or "@" not in from_address:
        return False
    if auth.dmarc.result == "pass":
        return True
    if auth.dmarc.result not in ("none", ""):
        return False  # the domain publishes DMARC and this message failed it
    from_domain = from_address.rpartition("@")[2]
    return any(
        item.result == "pass" and _aligned(item.domain, from_domain, False)
        for item in (auth.spf, auth.dkim)
    )


def authenticate(
    raw: bytes,
    *,
    resolver: dns.resolver.Resolver,
    peer_ip: str | None,
    mail_from: str,
    helo: str,
    from_address: str | None,
    from_count: int,
) -> AuthResults:
    """All three checks for one received message."""
    from_domain = from_address.rpartition("@")[2].lower() if from_address else None
    spf_result = check_spf(resolver, peer_ip=peer_ip, mail_from=mail_from, helo=helo)
    dkim_results = check_dkim(raw, resolver)
    dmarc = check_dmarc(
        resolver,
        from_domain=from_domain,
        from_count=from_count,
        spf_result=spf_result,
        dkim_results=dkim_results,
    )
    return AuthResults(
        spf=spf_result,
        dkim=_best_dkim(dkim_results, from_domain),
        dmarc=dmarc,
        extra={"dkim_signatures": [r.to_json() for r in dkim_results]},
    )
