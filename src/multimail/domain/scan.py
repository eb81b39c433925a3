"""The scan step every outbound message passes before the gate (SPEC §2). Pure: no I/O.

A finding either blocks the message (it ends in ``send_failed`` with the reason) or warns
(the reviewer sees it beside the draft). What blocks: every recipient suppressed, too many
recipients, too large, executable attachments, private keys and MultiMail's own API keys —
things no reviewer should be asked to wave through. Other secrets and personal data warn,
because a human can judge whether that card number is a test value.

Detected secrets are never copied into a finding whole: findings travel in events and
webhooks, so ``detail`` carries a masked form only.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from multimail.domain.spam import EXECUTABLE_EXTENSIONS
from multimail.errors import InvalidInput
from multimail.mail.compose import attachment_filename

__all__ = [
    "BLOCKED_EXTENSIONS",
    "Finding",
    "ScanAttachment",
    "ScanInput",
    "blocking",
    "find_card_numbers",
    "find_ibans",
    "find_secrets",
    "find_ssns",
    "iban_valid",
    "luhn_valid",
    "scan",
    "sniff_executable",
]

Severity = Literal["block", "warn"]

BLOCKED_EXTENSIONS = EXECUTABLE_EXTENSIONS | frozenset(
    # Gmail's list of attachment types it refuses, beyond the spam module's.
    {"ade", "adp", "appx", "appxbundle", "cab", "chm", "diagcab", "diagcfg", "diagpack", "ex_",
     "ins", "isp", "jnlp", "lib", "mde", "mjs", "msc", "msix", "msixbundle", "mst", "nsh",
     "sct", "shb", "sys", "vb", "vxd", "wsc", "xll", "gadget", "ws"}
)  # fmt: skip
_BLOCKED_TYPES = frozenset(
    {
        "application/x-msdownload", "application/x-msdos-program", "application/x-executable",
        "application/x-elf", "application/x-sharedlib", "application/x-mach-binary",
        "application/x-dosexec", "application/vnd.microsoft.portable-executable",
        "application/x-sh", "application/x-shellscript", "application/x-csh",
        "application/java-archive", "application/x-java-archive", "application/x-msi",
        "application/x-ms-installer", "application/x-bat", "application/hta",
        "application/x-ms-shortcut", "text/x-shellscript", "text/vbscript",
    }
)  # fmt: skip
# Magic numbers of native executables: PE/DOS, ELF, Mach-O (both byte orders, fat binaries).
_MAGIC = (
    (b"MZ", "a Windows executable (MZ header)"),
    (b"\x7fELF", "a Linux executable (ELF header)"),
    (b"\xfe\xed\xfa\xce", "a macOS executable (Mach-O header)"),
    (b"\xfe\xed\xfa\xcf", "a macOS executable (Mach-O header)"),
    (b"\xce\xfa\xed\xfe", "a macOS executable (Mach-O header)"),
    (b"\xcf\xfa\xed\xfe", "a macOS executable (Mach-O header)"),
    (b"\xca\xfe\xba\xbe", "a macOS universal binary or Java class"),
    (b"#!", "a script (starts with #!)"),
)
_MAX_ZIP_ENTRIES = 10_000

_SECRET_PATTERNS: tuple[tuple[str, str, Severity, re.Pattern[str]], ...] = (
    (
        "private_key",
        "a private key (PEM block)",
        "block",
        re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    ),
    (
        "multimail_api_key",
        "a MultiMail API key",
        "block",
        re.compile(r"\bmm_(?:live|test)_[A-Za-z0-9_-]{32,}"),
    ),
    (
        "aws_access_key",
        "an AWS access key id",
        "warn",
        re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    ),
    (
        "stripe_secret_key",
        "a Stripe secret key",
        "warn",
        re.compile(r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}"),
    ),
    (
        "openai_api_key",
        "an OpenAI-style API key (sk-…)",
        "warn",
        re.compile(r"(?<![A-Za-z0-9_-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),
    ),
    (
        "github_token",
        "a GitHub token",
        "warn",
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    ),
    ("slack_token", "a Slack token", "warn", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
)

# 13-19 digits, optionally grouped by single spaces or dashes, not glued to other digits.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
# ISO 13616 registry lengths; a country outside the table is not reported (too noisy).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30,
    "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip


@dataclass(frozen=True)
class ScanAttachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class ScanInput:
    """What the scan looks at. The service passes in the suppressed subset of recipients."""

    recipients: Sequence[str]
    subject: str
    markdown: str
    attachments: Sequence[ScanAttachment] = ()
    suppressed: frozenset[str] = frozenset()
    size_bytes: int = 0
    max_recipients: int = 50
    max_message_bytes: int = 25 * 1024 * 1024


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str  # one sentence for the reviewer
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "detail": self.detail,
        }


def blocking(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "block"]


def _mask(value: str) -> str:
    compact = re.sub(r"[\s-]", "", value)
    if len(compact) <= 8:
        return "*" * len(compact)
    return f"{compact[:4]}…{compact[-4:]}"


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check every payment card number satisfies."""
    if not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_brand(digits: str) -> str | None:
    """The issuer a number's prefix and length belong to; None when no network uses it."""
    length = len(digits)
    two, four = int(digits[:2]), int(digits[:4])
    if digits[0] == "4" and length in (13, 16, 19):
        return "visa"
    if (51 <= two <= 55 or 2221 <= four <= 2720) and length == 16:
        return "mastercard"
    if two in (34, 37) and length == 15:
        return "amex"
    if (four == 6011 or two == 65 or 644 <= int(digits[:3]) <= 649) and 16 <= length <= 19:
        return "discover"
    if 3528 <= four <= 3589 and 16 <= length <= 19:
        return "jcb"
    if (two in (36, 38, 39) or 300 <= int(digits[:3]) <= 305) and 14 <= length <= 19:
        return "diners"
    if two == 62 and 16 <= length <= 19:
        return "unionpay"
    return None


def find_card_numbers(text: str) -> list[str]:
    """Payment card numbers: a known issuer prefix and length, and a valid Luhn check."""
    found = []
    for match in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", match.group())
        if _card_brand(digits) and luhn_valid(digits):
            found.append(digits)
    return found


def find_ssns(text: str) -> list[str]:
    """US Social Security numbers written AAA-GG-SSSS, outside the ranges never issued."""
    return [m.group() for m in _SSN.finditer(text)]


def iban_valid(candidate: str) -> bool:
    """ISO 13616: the registered length for the country and the mod-97 check equals 1."""
    iban = candidate.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def find_ibans(text: str) -> list[str]:
    return [m.group().replace(" ", "") for m in _IBAN.finditer(text) if iban_valid(m.group())]


def find_secrets(text: str) -> Iterator[Finding]:
    """One finding per kind of credential present (not one per occurrence)."""
    for code, what, severity, pattern in _SECRET_PATTERNS:
        matches = pattern.findall(text)
        if not matches:
            continue
        action = "it cannot be sent" if severity == "block" else "check it is meant to be sent"
        yield Finding(
            code,
            severity,
            f"The message contains {what}; {action}.",
            {"count": len(matches), "samples": sorted({_mask(m) for m in matches})[:3]},
        )


def _personal_data(text: str) -> Iterator[Finding]:
    cards = find_card_numbers(text)
    if cards:
        yield Finding(
            "card_number",
            "warn",
            "The message contains what looks like a payment card number (Luhn-valid).",
            {"count": len(cards), "samples": sorted({_mask(c) for c in cards})[:3]},
        )
    ssns = find_ssns(text)
    if ssns:
        yield Finding(
            "us_ssn",
            "warn",
            "The message contains what looks like a US Social Security number.",
            {"count": len(ssns), "samples": sorted({"***-**-" + s[-4:] for s in ssns})[:3]},
        )
    ibans = find_ibans(text)
    if ibans:
        yield Finding(
            "iban",
            "warn",
            "The message contains a bank account number (IBAN with a valid checksum).",
            {"count": len(ibans), "samples": sorted({_mask(i) for i in ibans})[:3]},
        )


def _extension(name: str) -> str:
    base = name.strip().rstrip(". ").lower().rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[1] if "." in base else ""


def sniff_executable(data: bytes) -> str | None:
    """What kind of executable the bytes start like, or None."""
    for magic, what in _MAGIC:
        if data.startswith(magic):
            return what
    return None


def _zip_members(data: bytes) -> list[str] | None:
    """Names inside a zip archive (central directory only: nothing is decompressed)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
        return None
    return [i.filename for i in infos[:_MAX_ZIP_ENTRIES]]


def _shown_name(name: str) -> str | None:
    """The filename a recipient's mail program shows (RFC 2047 encoded-words decoded, as the
    composer writes it); None when the composer would refuse it."""
    try:
        return attachment_filename(name)
    except InvalidInput:
        return None


def _attachment_findings(attachment: ScanAttachment) -> Iterator[Finding]:
    name = attachment.filename
    shown = _shown_name(name)
    if shown is None:
        yield Finding(
            "blocked_attachment",
            "block",
            f"The attachment name {name[:100]!r} cannot be written into a message (line "
            "breaks, control characters or slashes); it cannot be sent.",
            {"filename": name[:255], "reason": "filename"},
        )
        return
    # The name shown is judged, and the name given too: "=?utf-8?b?cnVuLnZicw==?=" is
    # shown as run.vbs.
    ext = _extension(shown)
    if ext not in BLOCKED_EXTENSIONS and _extension(name) in BLOCKED_EXTENSIONS:
        ext = _extension(name)
    name = shown
    ctype = attachment.content_type.split(";", 1)[0].strip().lower()
    if ext in BLOCKED_EXTENSIONS:
        yield Finding(
            "blocked_attachment",
            "block",
            f"The attachment {name!r} is an executable type (.{ext}) and cannot be sent.",
            {"filename": name, "reason": "extension", "extension": ext},
        )
        return
    if ctype in _BLOCKED_TYPES:
        yield Finding(
            "blocked_attachment",
            "block",
            f"The attachment {name!r} is declared as {ctype}, an executable type.",
            {"filename": name, "reason": "content_type", "content_type": ctype},
        )
        return
    sniffed = sniff_executable(attachment.data)
    if sniffed:
        yield Finding(
            "blocked_attachment",
            "block",
            f"The attachment {name!r} is {sniffed} whatever its name says; it cannot be sent.",
            {"filename": name, "reason": "content"},
        )
        return
    if attachment.data.startswith(b"PK\x03\x04") or ext == "zip":
        members = _zip_members(attachment.data)
        if members is None:
            return
        inside = [m for m in members if _extension(m) in BLOCKED_EXTENSIONS]
        if inside:
            yield Finding(
                "blocked_attachment",
                "block",
                f"The archive {name!r} contains executable files ({inside[0]!r}"
                f"{' and others' if len(inside) > 1 else ''}); it cannot be sent.",
                {"filename": name, "reason": "archive_member", "members": inside[:5]},
            )


def _limit_findings(draft: ScanInput) -> Iterator[Finding]:
    recipients = list(dict.fromkeys(r.lower() for r in draft.recipients))
    if len(recipients) > draft.max_recipients:
        yield Finding(
            "too_many_recipients",
            "block",
            f"The message has {len(recipients)} recipients; at most {draft.max_recipients} "
            "are allowed.",
            {"count": len(recipients), "limit": draft.max_recipients},
        )
    if draft.size_bytes > draft.max_message_bytes:
        yield Finding(
            "message_too_large",
            "block",
            f"The message is {draft.size_bytes} bytes; at most {draft.max_message_bytes} "
            "are allowed.",
            {"size_bytes": draft.size_bytes, "limit": draft.max_message_bytes},
        )
    suppressed = sorted({r for r in recipients if r in draft.suppressed})
    if suppressed and len(suppressed) == len(recipients):
        yield Finding(
            "all_recipients_suppressed",
            "block",
            "Every recipient is on the suppression list (bounced, complained or unsubscribed).",
            {"addresses": suppressed},
        )
    elif suppressed:
        yield Finding(
            "suppressed_recipients",
            "warn",
            f"{len(suppressed)} recipient(s) are on the suppression list and will not get "
            "this message.",
            {"addresses": suppressed},
        )


def scan(draft: ScanInput) -> list[Finding]:
    """Every finding for the draft, blocking ones first."""
    findings = list(_limit_findings(draft))
    for attachment in draft.attachments:
        findings.extend(_attachment_findings(attachment))
    text = f"{draft.subject}\n{draft.markdown}"
    findings.extend(find_secrets(text))
    findings.extend(_personal_data(text))
    return sorted(findings, key=lambda f: f.severity != "block")
