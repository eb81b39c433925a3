"""The non-delivery report we write (``build_dsn``) is RFC 3464 that our parser and the
email package read back, and nothing the original's sender wrote can shape its headers."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.mail.reports import (
    build_dsn,
    header_section,
    is_bounce_sender,
    parse_dsn,
)

ARRIVAL = datetime(2024, 1, 2, 10, 0, tzinfo=UTC)
DATE = datetime(2024, 1, 2, 10, 0, 5, tzinfo=UTC)
ORIGINAL = (
    "Return-Path: <alice@sender.test>\r\n"
    "From: Alice <alice@sender.test>\r\n"
    "To: gone@mm.test\r\n"
    "Subject: Numbers\r\n"
    "Message-ID: <orig-1@sender.test>\r\n"
)
TOP_FIELDS = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
]


def dsn(**changes: Any) -> bytes:
    arguments: dict[str, Any] = {
        "reporting_domain": "mm.test",
        "to": "alice@sender.test",
        "recipients": ["gone@mm.test"],
        "arrival_date": ARRIVAL,
        "original_headers": ORIGINAL,
        "report_id": "inb_01hq",
        "date": DATE,
        **changes,
    }
    return build_dsn(**arguments)


def read(raw: bytes) -> EmailMessage:
    parsed = BytesParser(policy=default_policy).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    return parsed


def returned_headers(raw: bytes) -> str:
    *_, part = read(raw).iter_parts()
    assert part.get_content_type() == "text/rfc822-headers"
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.decode("utf-8")


def field_blocks(part: Message) -> list[Message]:
    """The field blocks of a message/delivery-status part, as the email package reads them."""
    payload = part.get_payload()
    assert isinstance(payload, list)
    return [block for block in payload if isinstance(block, Message)]


def test_the_report_reads_back_through_parse_dsn() -> None:
    """Our own bounce parser finds a standard report: every recipient failed for good with
    5.1.1 and the diagnostic, the reporting MTA, and the original's Message-ID."""
    report = parse_dsn(dsn(recipients=["gone@mm.test", "Old@MM.test"]))
    assert report is not None and report.standard
    assert report.original_message_id == "<orig-1@sender.test>"
    assert report.reporting_mta == "mm.test"
    assert [(r.final_recipient, r.action, r.status) for r in report.recipients] == [
        ("gone@mm.test", "failed", "5.1.1"),
        ("old@mm.test", "failed", "5.1.1"),
    ]
    assert {r.diagnostic_code for r in report.recipients} == {
        "smtp; 550 5.1.1 mailbox no longer exists"
    }
    assert report.bounce_type == "hard"


def test_the_report_is_rfc_3464_to_the_email_package() -> None:
    """multipart/report; report-type=delivery-status with the text, the delivery-status
    fields (per message, then per recipient) and the returned header, no parse defects."""
    parsed = read(dsn())
    assert [name for name, _ in parsed.items()] == TOP_FIELDS
    assert parsed["From"] == "Mail Delivery System <MAILER-DAEMON@mm.test>"
    assert parsed["To"] == "alice@sender.test"
    assert parsed["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["Message-ID"] == "<inb_01hq.dsn@mm.test>"
    assert parsed["Date"].datetime == DATE
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    text, status, headers = parsed.iter_parts()
    assert text.get_content_type() == "text/plain"
    words = text.get_content()
    assert "<gone@mm.test>" in words and "no longer exists" in words
    assert "no further attempt" in words
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = field_blocks(status)
    assert per_message["Reporting-MTA"] == "dns; mm.test"
    assert per_message["Arrival-Date"] == "Tue, 02 Jan 2024 10:00:00 +0000"
    assert dict(per_recipient.items()) == {
        "Final-Recipient": "rfc822; gone@mm.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Diagnostic-Code": "smtp; 550 5.1.1 mailbox no longer exists",
    }
    assert headers.get_content_type() == "text/rfc822-headers"
    assert returned_headers(dsn()) == ORIGINAL
    assert not any(part.defects for part in parsed.walk())


def test_the_same_report_is_the_same_bytes() -> None:
    """A retry writes the very same message (Message-ID from the report id, boundary from the
    content), so a receiver can recognise the second copy."""
    assert dsn() == dsn()
    assert dsn(report_id="inb_other") != dsn()


def test_the_report_is_seven_bit_with_short_lines_whatever_the_original_held() -> None:
    """An original header in UTF-8, or with a line too long for SMTP, is returned
    quoted-printable: the report stays 7-bit with lines within RFC 5322's limit, and the
    header decodes back as it was."""
    original = "Subject: Grüße aus Köln\r\nX-Long: " + "y" * 2000 + "\r\n"
    raw = dsn(original_headers=original)
    assert raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert returned_headers(raw) == original
    assert parse_dsn(raw) is not None


@pytest.mark.parametrize(
    "injected",
    [
        "Subject: hi\rBcc: victim@example.test\r\n",
        "Subject: hi\nBcc: victim@example.test\r\n",
        "Subject: hi\r\n\r\nBcc: victim@example.test\r\n",
        "Subject: hi\r\n\r\n\r\nContent-Type: text/html\r\n",
        "Subject: =?utf-8?q?hi=0D=0ABcc:_victim@example.test?=\r\n",
    ],
)
def test_the_original_header_text_cannot_add_a_field_to_the_report(injected: str) -> None:
    """Bare CR, bare LF, blank lines and encoded line breaks in the sender's header text
    stay inside the returned-header part, with CRLF line ends and no blank line that could
    end that header early; the report's own fields are exactly ours."""
    raw = dsn(original_headers=injected)
    parsed = read(raw)
    assert [name for name, _ in parsed.items()] == TOP_FIELDS
    assert parsed["Bcc"] is None
    assert [p.get_content_type() for p in parsed.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    returned = returned_headers(raw)
    assert "\r\n\r\n" not in returned
    assert re.search(r"\r(?!\n)|(?<!\r)\n", returned) is None
    assert "Subject: hi" in returned or "Subject: =?utf-8?q?hi" in returned


def test_a_line_that_looks_like_the_boundary_does_not_end_the_part() -> None:
    """The boundary is chosen so that no line of the returned text is one: a header line the
    sender shaped as a MIME delimiter stays text."""
    first = read(dsn())
    boundary = first.get_boundary()
    assert boundary is not None
    raw = dsn(original_headers=f"X-Trick: a\r\n--{boundary}\r\nContent-Type: text/html\r\n")
    parsed = read(raw)
    assert parsed.get_boundary() != boundary
    assert len(list(parsed.iter_parts())) == 3
    assert f"--{boundary}" in returned_headers(raw)


@pytest.mark.parametrize(
    "changes",
    [
        {"to": "alice@sender.test\r\nBcc: victim@example.test"},
        {"to": "Alice <alice@sender.test>"},
        {"to": ""},
        {"recipients": ["gone@mm.test\r\nX: y"]},
        {"recipients": []},
        {"reporting_domain": "mm.test\r\nX-Evil: 1"},
        {"report_id": "inb_1>\r\nBcc: x"},
    ],
)
def test_what_cannot_be_written_safely_is_refused(changes: dict[str, Any]) -> None:
    """An address, domain or id that is not plain would become a header or a field line:
    refused (ValueError), never written."""
    with pytest.raises(ValueError):
        dsn(**changes)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=300))
def test_any_header_text_keeps_the_report_whole(text: str) -> None:
    """Whatever the returned header holds, the report keeps its fields and parts, parses as a
    DSN naming the failed recipient, and is 7-bit."""
    raw = dsn(original_headers=text)
    assert raw.isascii()
    parsed = read(raw)
    assert [name for name, _ in parsed.items()] == TOP_FIELDS
    assert len(list(parsed.iter_parts())) == 3
    report = parse_dsn(raw)
    assert report is not None
    assert [r.final_recipient for r in report.recipients] == ["gone@mm.test"]


def test_header_section_stops_at_the_body_and_keeps_whole_fields() -> None:
    """Only the header section is returned; cut to the limit at a field's end (a folded
    field with its continuation lines, or not at all); NUL and undecodable bytes become
    U+FFFD."""
    raw = b"From: a@sender.test\r\nSubject: one\r\n two\r\nX-Null: a\x00b\xff\r\n\r\nThe body.\r\n"
    assert header_section(raw, 10_000) == (
        "From: a@sender.test\r\nSubject: one\r\n two\r\nX-Null: a\ufffdb\ufffd\r\n"
    )
    assert header_section(raw, len(b"From: a@sender.test\r\nSubject: one\r\n")) == (
        "From: a@sender.test\r\n"
    )
    assert header_section(b"Subject: no body at all\r\n", 100) == "Subject: no body at all\r\n"


@pytest.mark.parametrize(
    ("address", "daemon"),
    [
        ("MAILER-DAEMON@relay.example", True),
        ("mailer-daemon@relay.example", True),
        ("postmaster@relay.example", True),
        ("mail-daemon@relay.example", True),
        ("alice@relay.example", False),
        ("not-mailer-daemon@relay.example", False),
    ],
)
def test_mail_system_senders_are_recognised(address: str, daemon: bool) -> None:
    """The senders a report must never go to are the mail systems' own."""
    assert is_bounce_sender(address) is daemon
