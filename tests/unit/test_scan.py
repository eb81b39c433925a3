"""The outbound scan step: what blocks, what warns, and the detectors behind it."""

from __future__ import annotations

import io
import random
import zipfile

from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.domain.scan import (
    Finding,
    ScanAttachment,
    ScanInput,
    blocking,
    find_card_numbers,
    find_ibans,
    find_secrets,
    find_ssns,
    iban_valid,
    luhn_valid,
    scan,
)


def _draft(**kw: object) -> ScanInput:
    base: dict[str, object] = {
        "recipients": ["a@example.com"],
        "subject": "Hi",
        "markdown": "Hello",
    }
    base.update(kw)
    return ScanInput(**base)  # type: ignore[arg-type]


def _codes(findings: list[Finding]) -> dict[str, str]:
    return {f.code: f.severity for f in findings}


def _luhn_complete(prefix_and_body: str) -> str:
    for check in "0123456789":
        if luhn_valid(prefix_and_body + check):
            return prefix_and_body + check
    raise AssertionError("unreachable: one check digit always completes a Luhn number")


def _zip(names: list[str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(name, b"data")
    return buffer.getvalue()


def test_clean_message_has_no_findings() -> None:
    """An ordinary business email passes the scan without a finding."""
    draft = _draft(markdown="Your order 12345 ships on 2024-05-01. Call 555-0100 for help.")
    assert scan(draft) == []


def test_suppressed_recipients_warn_unless_all_are_suppressed() -> None:
    """Some suppressed recipients warn (they are dropped at send time); all suppressed blocks."""
    some = scan(_draft(recipients=["a@x.com", "b@x.com"], suppressed=frozenset({"a@x.com"})))
    assert _codes(some) == {"suppressed_recipients": "warn"}
    assert some[0].detail["addresses"] == ["a@x.com"]
    every = scan(_draft(recipients=["a@x.com", "A@x.com"], suppressed=frozenset({"a@x.com"})))
    assert _codes(every) == {"all_recipients_suppressed": "block"}


def test_limits_block() -> None:
    """Too many recipients and too many bytes are blocking findings with the limit stated."""
    findings = scan(
        _draft(
            recipients=[f"r{i}@x.com" for i in range(4)],
            max_recipients=3,
            size_bytes=2000,
            max_message_bytes=1000,
        )
    )
    assert _codes(findings) == {"too_many_recipients": "block", "message_too_large": "block"}
    assert findings[0].detail["limit"] == 3


def test_executables_are_blocked_by_name_type_content_and_archive() -> None:
    """Executables block whether named, declared, sniffed by magic bytes, or zipped."""
    cases = [
        ScanAttachment("setup.exe", "application/octet-stream", b"whatever"),
        ScanAttachment("invoice.pdf.js", "application/pdf", b"%PDF"),
        ScanAttachment("run.PS1", "text/plain", b"Write-Host hi"),
        ScanAttachment("report.pdf", "application/x-msdownload", b"%PDF"),
        ScanAttachment("photo.jpg", "image/jpeg", b"MZ\x90\x00rest"),
        ScanAttachment("notes.txt", "text/plain", b"\x7fELF\x02\x01"),
        ScanAttachment("tool.txt", "text/plain", b"#!/bin/sh\nrm -rf /\n"),
        ScanAttachment("bundle.zip", "application/zip", _zip(["readme.txt", "bin/evil.vbs"])),
        ScanAttachment("innocent.dat", "application/octet-stream", _zip(["x.scr"])),
    ]
    for attachment in cases:
        findings = scan(_draft(attachments=[attachment]))
        assert _codes(findings) == {"blocked_attachment": "block"}, attachment.filename
        assert "cannot be sent" in findings[0].message or "executable" in findings[0].message


def test_ordinary_attachments_and_archives_pass() -> None:
    """Documents, images and zips of documents (and a corrupt zip) are not findings."""
    ok = [
        ScanAttachment("report.pdf", "application/pdf", b"%PDF-1.7 ..."),
        ScanAttachment("docs.zip", "application/zip", _zip(["a.pdf", "b.docx"])),
        ScanAttachment("broken.zip", "application/zip", b"PK\x03\x04garbage"),
        ScanAttachment("data.csv", "text/csv", b"a,b\n1,2\n"),
    ]
    assert scan(_draft(attachments=ok)) == []


def test_private_keys_and_our_own_keys_block_other_secrets_warn() -> None:
    """Private keys and mm_ keys block; cloud and SaaS tokens warn; secrets are masked."""
    body = "\n".join(
        [
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
            "key: mm_live_" + "A" * 40,
            "aws AKIAIOSFODNN7EXAMPLE",
            "openai sk-" + "b" * 40,
            "stripe sk_live_" + "c" * 24,
            "github ghp_" + "d" * 36,
            "slack xoxb-1234567890-abcdefghij",
        ]
    )
    findings = scan(_draft(markdown=body))
    assert _codes(findings) == {
        "private_key": "block",
        "multimail_api_key": "block",
        "aws_access_key": "warn",
        "openai_api_key": "warn",
        "stripe_secret_key": "warn",
        "github_token": "warn",
        "slack_token": "warn",
    }
    assert [f.severity for f in findings][:2] == ["block", "block"]
    rendered = repr([f.as_dict() for f in findings])
    assert "A" * 40 not in rendered and "b" * 40 not in rendered
    assert len(blocking(findings)) == 2


def test_secrets_in_the_subject_count_too() -> None:
    """The subject is scanned as well as the body."""
    findings = scan(_draft(subject="token mm_test_" + "z" * 40, markdown="see subject"))
    assert _codes(findings) == {"multimail_api_key": "block"}


def test_personal_data_warns() -> None:
    """Card numbers, SSNs and IBANs are reported as warnings for the reviewer."""
    body = "Card 4111 1111 1111 1111, SSN 123-45-6789, IBAN GB82 WEST 1234 5698 7654 32."
    findings = scan(_draft(markdown=body))
    assert _codes(findings) == {"card_number": "warn", "us_ssn": "warn", "iban": "warn"}
    assert "4111…1111" in findings[0].detail["samples"][0]


def test_known_non_secrets_are_not_reported() -> None:
    """Order numbers, invalid SSN ranges and wrong IBAN checksums are not findings."""
    body = (
        "Order 4111 1111 1111 1112 (not Luhn). SSN-like 000-12-3456 and 666-12-3456. "
        "IBAN GB82 WEST 1234 5698 7654 33. sk-short. task-id ask-questions-here."
    )
    assert scan(_draft(markdown=body)) == []


@given(
    prefix=st.sampled_from(["4", "51", "55", "2221", "34", "37", "6011", "65", "3530"]),
    data=st.data(),
    separator=st.sampled_from(["", " ", "-"]),
)
def test_luhn_valid_card_numbers_are_found(
    prefix: str, data: st.DataObject, separator: str
) -> None:
    """Any Luhn-valid number with an issuer prefix and length is found, however grouped."""
    length = 15 if prefix in ("34", "37") else 16
    body_digits = data.draw(
        st.text("0123456789", min_size=length - len(prefix) - 1, max_size=length - len(prefix) - 1)
    )
    number = _luhn_complete(prefix + body_digits)
    grouped = separator.join(number[i : i + 4] for i in range(0, len(number), 4))
    assert find_card_numbers(f"pay with {grouped} today") == [number]


@given(st.text("0123456789", min_size=16, max_size=16), st.integers(0, 15), st.integers(1, 9))
def test_a_single_mistyped_digit_is_never_a_card(digits: str, position: int, delta: int) -> None:
    """Luhn catches every single-digit change: a Luhn-valid number altered once is not found."""
    number = _luhn_complete("4" + digits[:14])
    changed = number[:position] + str((int(number[position]) + delta) % 10) + number[position + 1 :]
    assert changed not in find_card_numbers(changed)


@settings(max_examples=50)
@given(st.integers(0, 2**32))
def test_random_digit_runs_are_mostly_not_cards(seed: int) -> None:
    """Among random 16-digit numbers, well under a fifth are reported (Luhn passes 1 in 10).

    Uniform digits from a seeded generator: Hypothesis's own ``st.randoms`` may hand out
    degenerate streams (all zeros passes Luhn), which made this fail now and then."""
    rng = random.Random(seed)
    numbers = ["".join(rng.choice("0123456789") for _ in range(16)) for _ in range(200)]
    found = sum(1 for n in numbers if find_card_numbers(n))
    assert found < 40
    assert all(luhn_valid(c) for n in numbers for c in find_card_numbers(n))


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_detectors_never_crash(text: str) -> None:
    """The detectors take any text."""
    list(find_secrets(text))
    find_card_numbers(text)
    find_ssns(text)
    find_ibans(text)


@given(
    st.sampled_from(
        ["DE89370400440532013000", "GB82WEST12345698765432", "FR1420041010050500013M02606"]
    ),
    st.integers(4, 21),
    st.sampled_from("0123456789"),
)
def test_iban_checksum_detects_changes(iban: str, position: int, digit: str) -> None:
    """Valid IBANs pass; changing one character of the account part breaks the checksum."""
    assert iban_valid(iban)
    position = min(position, len(iban) - 1)
    changed = iban[:position] + digit + iban[position + 1 :]
    if changed != iban:
        assert not iban_valid(changed)
