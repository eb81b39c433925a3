"""Spam scoring that an operator can read: a few weighted rules, each with its sentence.

Pure: the caller gathers the signals (authentication results, parsed headers and body) and
this module only adds points. A message at or above ``SPAM_THRESHOLD`` is spam. The weights
are chosen so that no single weak signal reaches the threshold, while a DMARC failure plus
almost anything else, or a forged-looking sender with a phishing phrase, does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = [
    "SPAM_THRESHOLD",
    "SpamReason",
    "SpamSignals",
    "SpamVerdict",
    "count_links",
    "has_mismatched_link_text",
    "is_executable_filename",
    "score_message",
]

SPAM_THRESHOLD = 5.0
MANY_LINKS = 15

# Files that run when opened on common desktops; also their macro-enabled Office cousins.
EXECUTABLE_EXTENSIONS = frozenset(
    {"exe", "com", "scr", "pif", "bat", "cmd", "msi", "msp", "vbs", "vbe", "js", "jse", "wsf"}
    | {"wsh", "hta", "cpl", "jar", "ps1", "psm1", "reg", "lnk", "iso", "img", "vhd", "dll"}
    | {"docm", "xlsm", "pptm", "apk", "app", "dmg", "sh", "run"}
)


@dataclass(frozen=True)
class SpamSignals:
    spf: str = "none"
    dkim: str = "none"
    dmarc: str = "none"
    from_count: int = 1
    subject: str = ""
    text: str = ""
    has_executable_attachment: bool = False
    sender_display_name: str | None = None
    sender_address: str | None = None
    link_count: int = 0
    mismatched_link_text: bool = False


@dataclass(frozen=True)
class SpamReason:
    code: str
    points: float
    explanation: str


@dataclass(frozen=True)
class SpamVerdict:
    score: float
    is_spam: bool
    reasons: list[SpamReason] = field(default_factory=list)
    threshold: float = SPAM_THRESHOLD


@dataclass(frozen=True)
class _Pattern:
    code: str
    points: float
    explanation: str
    regex: re.Pattern[str]


def _words(*alternatives: str) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(alternatives) + r")\b", re.IGNORECASE)


_PATTERNS = (
    _Pattern(
        "phishing_account_phrase",
        2.5,
        "The message asks the reader to verify, confirm or unlock an account, a classic "
        "phishing lure.",
        _words(
            r"verify your (account|identity|email|mailbox)",
            r"confirm your (account|password|identity|login|billing)",
            r"(account|mailbox) (has been|will be) (suspended|locked|closed|deactivated)",
            r"unusual sign[- ]?in activity",
            r"update your (payment|billing) (details|information)",
        ),
    ),
    _Pattern(
        "password_expiry_phrase",
        2.0,
        "The message claims a password is expiring, a common credential-harvesting pretext.",
        _words(
            r"password (expires|will expire|has expired|expiration)", r"reset your password now"
        ),
    ),
    _Pattern(
        "urgent_payment_phrase",
        2.5,
        "The message pushes an urgent wire transfer, gift card or cryptocurrency payment.",
        # Both words anywhere. Anchored at the start: unanchored, search() ran the two
        # ".*" look-aheads from every position, quadratic in the text (a 5 KB body of one
        # repeated letter took 0.35 s, 50 KB 30 s, in the inbound worker).
        re.compile(
            r"\A(?=.*?\b(urgent(ly)?|immediately|right away|within 24 hours|asap|today)\b)"
            r"(?=.*?\b(wire transfer|bank transfer|gift cards?|bitcoin|btc|usdt|crypto(currency)?"
            r"|wallet address)\b)",
            re.IGNORECASE | re.DOTALL,
        ),
    ),
    _Pattern(
        "lottery_phrase",
        2.5,
        "The message announces a lottery win, prize or inheritance the reader never asked for.",
        _words(
            r"you (have )?won",
            r"lottery",
            r"claim your (prize|reward|winnings)",
            r"unclaimed (inheritance|funds)",
            r"next of kin",
        ),
    ),
)

_URL = re.compile(r"https?://[^\s<>()\[\]\"']+", re.IGNORECASE)
_MD_LINK = re.compile(r"\[([^\]\n]{1,300})\]\((\S+?)\)")
_HOST_IN_TEXT = re.compile(
    r"(?:https?://)?((?:[a-z0-9-]+\.)+[a-z]{2,})(?:[/:?#]\S*)?$", re.IGNORECASE
)
_DOMAIN_IN_NAME = re.compile(r"(?:@|\b)((?:[a-z0-9-]+\.)+[a-z]{2,})\b", re.IGNORECASE)


def is_executable_filename(filename: str) -> bool:
    """True when the name ends in an extension that runs code when opened."""
    name = filename.strip().rstrip(". ").lower()
    return "." in name and name.rsplit(".", 1)[1] in EXECUTABLE_EXTENSIONS


def count_links(text: str) -> int:
    """The number of http(s) URLs in a text or markdown body."""
    return len(_URL.findall(text))


def _registrable(host: str) -> str:
    # Without a public-suffix list, the last two labels are a fair approximation for the
    # question asked here: "do these two hosts belong to the same site?"
    labels = host.lower().strip(".").split(".")
    return ".".join(labels[-2:])


def has_mismatched_link_text(markdown: str) -> bool:
    """True when a link's visible text names one site and its target is another."""
    for text, target in _MD_LINK.findall(markdown):
        shown = _HOST_IN_TEXT.match(text.strip())
        if shown is None:
            continue
        host = urlsplit(target).hostname
        if host and _registrable(shown.group(1)) != _registrable(host):
            return True
    return False


def _domain_of(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    return address.rsplit("@", 1)[1].strip().lower() or None


def _spoofed_domain(display_name: str | None, address: str | None) -> str | None:
    """A domain shown in the display name that is not the sender's own domain."""
    sender = _domain_of(address)
    if not display_name or sender is None:
        return None
    for match in _DOMAIN_IN_NAME.finditer(display_name):
        shown = match.group(1).lower()
        if _registrable(shown) != _registrable(sender):
            return shown
    return None


def _caps_subject(subject: str) -> bool:
    letters = [c for c in subject if c.isalpha()]
    return len(letters) >= 8 and sum(c.isupper() for c in letters) / len(letters) >= 0.9


def _authentication(signals: SpamSignals) -> Iterable[SpamReason]:
    dmarc, spf, dkim = (s.strip().lower() for s in (signals.dmarc, signals.spf, signals.dkim))
    if dmarc == "fail":
        yield SpamReason(
            "dmarc_fail",
            4.0,
            "DMARC failed: the domain in From did not authorise this message through SPF or "
            "DKIM, so the sender is probably forged.",
        )
    if spf == "fail":
        yield SpamReason(
            "spf_fail",
            2.0,
            "SPF failed: the sending server is not allowed to send for this domain.",
        )
    elif spf == "softfail":
        yield SpamReason(
            "spf_softfail",
            1.0,
            "SPF soft-failed: the domain says this server is probably not one of its senders.",
        )
    if dkim == "fail":
        yield SpamReason(
            "dkim_fail",
            1.5,
            "A DKIM signature did not verify: the message was altered or the signature forged.",
        )
    if spf in {"none", "neutral"} and dkim == "none" and dmarc != "pass":
        yield SpamReason(
            "unauthenticated",
            0.5,
            "The message carries no SPF pass and no DKIM signature, so its origin is unproven.",
        )


def _headers(signals: SpamSignals) -> Iterable[SpamReason]:
    if signals.from_count > 1:
        yield SpamReason(
            "multiple_from",
            4.0,
            f"The message has {signals.from_count} From headers; mail clients may show a "
            "different sender than the one that was checked.",
        )
    elif signals.from_count == 0:
        yield SpamReason("missing_from", 1.5, "The message has no From header at all.")
    spoofed = _spoofed_domain(signals.sender_display_name, signals.sender_address)
    if spoofed is not None:
        yield SpamReason(
            "display_name_spoofing",
            3.0,
            f"The sender's display name shows {spoofed}, but the message comes from "
            f"{_domain_of(signals.sender_address)}.",
        )
    if _caps_subject(signals.subject):
        yield SpamReason("all_caps_subject", 1.0, "The subject is written in capital letters.")


def _content(signals: SpamSignals) -> Iterable[SpamReason]:
    haystack = f"{signals.subject}\n{signals.text}"
    for pattern in _PATTERNS:
        if pattern.regex.search(haystack):
            yield SpamReason(pattern.code, pattern.points, pattern.explanation)
    if signals.has_executable_attachment:
        yield SpamReason(
            "executable_attachment",
            4.0,
            "An attachment is a program or script that runs when opened.",
        )
    if signals.mismatched_link_text:
        yield SpamReason(
            "mismatched_link_text",
            2.5,
            "A link's text shows one web address while it actually leads to another site.",
        )
    if signals.link_count > MANY_LINKS:
        yield SpamReason(
            "many_links",
            1.0,
            f"The message contains {signals.link_count} links (more than {MANY_LINKS}).",
        )


def score_message(signals: SpamSignals) -> SpamVerdict:
    """Add up the rules that apply; each reason says in one sentence why it counted."""
    reasons = [*_authentication(signals), *_headers(signals), *_content(signals)]
    score = round(float(sum(r.points for r in reasons)), 2)
    return SpamVerdict(score=score, is_spam=score >= SPAM_THRESHOLD, reasons=reasons)
