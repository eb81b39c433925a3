"""Bounces (DSN), complaints (ARF) and unsubscribe replies are recognised and explained."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multimail.mail.parse import parse_message
from multimail.mail.reports import (
    UNSUBSCRIBE_PHRASES,
    find_unsubscribe_phrase,
    is_unsubscribe_request,
    parse_arf,
    parse_dsn,
)


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


POSTFIX_DSN = crlf("""From: MAILER-DAEMON@mail.acme.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: bounces@acme.example
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="ABC123.1735725600/mail.acme.example"
Message-Id: <20250101100000.ABC123@mail.acme.example>

This is a MIME-encapsulated message.

--ABC123.1735725600/mail.acme.example
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mail.acme.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<nobody@example.org>: host mx.example.org[192.0.2.1] said: 550 5.1.1
    <nobody@example.org>: Recipient address rejected: User unknown (in reply to
    RCPT TO command)

--ABC123.1735725600/mail.acme.example
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mail.acme.example
X-Postfix-Queue-ID: ABC123
X-Postfix-Sender: rfc822; support@acme.example
Arrival-Date: Wed,  1 Jan 2025 10:00:00 +0000 (UTC)

Final-Recipient: rfc822; nobody@example.org
Original-Recipient: rfc822;nobody@example.org
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.org>: Recipient address
    rejected: User unknown

Final-Recipient: rfc822; slow@example.net
Action: delayed
Status: 4.4.1
Diagnostic-Code: X-Postfix; connect to mx.example.net[192.0.2.9]:25: Connection
    timed out

--ABC123.1735725600/mail.acme.example
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <support@acme.example>
From: Support <support@acme.example>
To: nobody@example.org, slow@example.net
Subject: hello
Message-ID: <msg_01JABCDEF@acme.example>

--ABC123.1735725600/mail.acme.example--
""")

EXCHANGE_DSN = crlf("""From: postmaster@outlook.example
To: support@acme.example
Subject: Undeliverable: quarterly numbers
MIME-Version: 1.0
Content-Type: multipart/report; report-type="Delivery-Status";
 boundary="b_ex"
X-MS-Exchange-Message-Is-Ndr:

--b_ex
Content-Type: text/html; charset="us-ascii"

<p>Your message to <b>gone@contoso.example</b> couldn't be delivered.</p>
--b_ex
Content-Type: message/delivery-status

Reporting-MTA: dns;AM0PR01MB1234.eurprd01.prod.outlook.example
Received-From-MTA: dns;mail.acme.example
Arrival-Date: Thu, 2 Jan 2025 09:00:00 +0000

Original-Recipient: rfc822;gone@contoso.example
Final-Recipient: rfc822;gone@contoso.example
Action: failed
Status: 5.1.10
Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found

--b_ex
Content-Type: message/rfc822

From: support@acme.example
To: gone@contoso.example
Subject: quarterly numbers
Message-ID: <msg_01JEXCHANGE@acme.example>
Content-Type: text/plain

numbers attached
--b_ex--
""")

GMAIL_DELAY_DSN = crlf("""From: Mail Delivery Subsystem <mailer-daemon@googlemail.example>
To: support@acme.example
Subject: Delivery Status Notification (Delay)
X-Failed-Recipients: later@example.com
MIME-Version: 1.0
Content-Type: multipart/report; boundary="000g"; report-type=delivery-status

--000g
Content-Type: text/plain; charset="UTF-8"

There was a temporary problem delivering your message to later@example.com.
--000g
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.example
Original-Envelope-Id: msg_01JGMAIL+40acme.example

Final-Recipient: rfc822; later@example.com
Action: delayed
Status: 4.4.3
Diagnostic-Code: smtp; The recipient server did not accept our requests
Will-Retry-Until: Fri, 03 Jan 2025 10:00:00 -0800 (PST)

--000g--
""")

PLAIN_BOUNCE = crlf("""From: MAILER-DAEMON@old-mta.example
To: support@acme.example
Subject: failure notice

Hi. This is the qmail-send program at old-mta.example.
I'm afraid I wasn't able to deliver your message to the following addresses.

<bob@example.org>:
192.0.2.7 does not like recipient.
Remote host said: 550 5.1.1 No such user

--- Below this line is a copy of the message.

From: support@acme.example
To: bob@example.org
Message-ID: <msg_01JPLAIN@acme.example>
Subject: hello

hello bob
""")

ARF = crlf("""From: <abusedesk@example.com>
Date: Thu, 8 Mar 2005 17:40:36 EDT
Subject: FW: Earn money
To: <abuse@acme.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
     boundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"
Content-Transfer-Encoding: 7bit

This is an email abuse report for an email message received from IP
192.0.2.1 on Thu, 8 Mar 2005 14:00:00 EDT.
--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <bounces@acme.example>
Original-Rcpt-To: <user@example.com>
Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT
Reporting-MTA: dns; mail.example.com
Source-IP: 192.0.2.1
Reported-Domain: acme.example

--part1_13d.2e68ed54_boundary
Content-Type: message/rfc822
Content-Disposition: inline

From: Support <support@acme.example>
To: <user@example.com>
Subject: Earn money
MIME-Version: 1.0
Content-type: text/plain
Message-ID: msg_01JARF@acme.example
Date: Thu, 02 Sep 2004 12:31:03 -0500

Spam Spam Spam
--part1_13d.2e68ed54_boundary--
""")


# --------------------------------------------------------------------------- DSN


def test_postfix_dsn_gives_original_message_and_each_recipient() -> None:
    """A Postfix bounce yields the original Message-ID and per-recipient action/status."""
    report = parse_dsn(POSTFIX_DSN)
    assert report is not None and report.standard
    assert report.original_message_id == "<msg_01JABCDEF@acme.example>"
    assert report.reporting_mta == "mail.acme.example"
    hard, soft = report.recipients
    assert (hard.final_recipient, hard.action, hard.status) == (
        "nobody@example.org",
        "failed",
        "5.1.1",
    )
    assert hard.diagnostic_code is not None and "User unknown" in hard.diagnostic_code
    assert hard.bounce_type == "hard"
    assert (soft.final_recipient, soft.action, soft.status) == (
        "slow@example.net",
        "delayed",
        "4.4.1",
    )
    assert soft.bounce_type == "soft"
    assert report.bounce_type == "hard"
    assert report.failed_recipients == ["nobody@example.org"]


def test_exchange_dsn_reads_the_attached_original() -> None:
    """An Exchange-style NDR with a message/rfc822 original and a quoted report-type parses."""
    report = parse_dsn(EXCHANGE_DSN)
    assert report is not None
    assert report.original_message_id == "<msg_01JEXCHANGE@acme.example>"
    [recipient] = report.recipients
    assert recipient.final_recipient == "gone@contoso.example"
    assert recipient.status == "5.1.10"
    assert report.bounce_type == "hard"


def test_gmail_delay_is_soft_and_falls_back_to_the_envelope_id() -> None:
    """A delay DSN is a soft bounce; without original headers the ENVID (xtext) is used."""
    report = parse_dsn(GMAIL_DELAY_DSN)
    assert report is not None
    assert report.original_envelope_id == "msg_01JGMAIL@acme.example"
    assert report.original_message_id == "<msg_01JGMAIL@acme.example>"
    assert report.bounce_type == "soft"
    assert report.failed_recipients == []


def test_success_notification_is_not_a_bounce() -> None:
    """A DSN whose action is "delivered" parses but has no bounce type."""
    delivered = POSTFIX_DSN.replace(b"Action: failed", b"Action: delivered").replace(
        b"Status: 5.1.1\r\n", b"Status: 2.0.0\r\n"
    )
    delivered = delivered.replace(b"Action: delayed", b"Action: relayed").replace(
        b"Status: 4.4.1", b"Status: 2.0.0"
    )
    report = parse_dsn(delivered)
    assert report is not None
    assert report.bounce_type is None
    assert {r.action for r in report.recipients} == {"delivered", "relayed"}


def test_plain_text_mailer_daemon_bounce_is_recognised_with_its_message_id() -> None:
    """A non-standard qmail-style bounce counts when the original Message-ID is present."""
    report = parse_dsn(PLAIN_BOUNCE)
    assert report is not None and not report.standard
    assert report.original_message_id == "<msg_01JPLAIN@acme.example>"
    [recipient] = report.recipients
    assert recipient.final_recipient == "bob@example.org"
    assert recipient.status == "5.1.1"
    assert report.bounce_type == "hard"


def test_plain_bounce_without_original_message_id_is_ignored() -> None:
    """A bounce we cannot tie to a sent message must not be acted on."""
    assert (
        parse_dsn(PLAIN_BOUNCE.replace(b"Message-ID: <msg_01JPLAIN@acme.example>\r\n", b"")) is None
    )


def test_ordinary_mail_and_complaints_are_not_bounces() -> None:
    """A normal message, or one merely titled like a bounce from a person, is not a DSN."""
    assert parse_dsn(b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n") is None
    impostor = PLAIN_BOUNCE.replace(b"MAILER-DAEMON@old-mta.example", b"alice@example.com")
    assert parse_dsn(impostor) is None
    assert parse_dsn(ARF) is None


# --------------------------------------------------------------------------- ARF


def test_arf_complaint_identifies_message_and_complainant() -> None:
    """An RFC 5965 report gives the feedback type, original Message-ID and complainant."""
    report = parse_arf(ARF)
    assert report is not None
    assert report.feedback_type == "abuse"
    assert report.original_message_id == "<msg_01JARF@acme.example>"
    assert report.original_mail_from == "bounces@acme.example"
    assert report.original_rcpt_to == ["user@example.com"]
    assert report.original_from == "support@acme.example"
    assert report.complainant == "user@example.com"
    assert report.source_ip == "192.0.2.1"
    assert report.reported_domain == "acme.example"


def test_dsn_is_not_a_complaint() -> None:
    """parse_arf answers None for bounces and ordinary mail."""
    assert parse_arf(POSTFIX_DSN) is None
    assert parse_arf(b"From: a@example.com\r\n\r\nhi\r\n") is None


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([POSTFIX_DSN, EXCHANGE_DSN, GMAIL_DELAY_DSN, PLAIN_BOUNCE, ARF]),
    st.integers(0, 4000),
    st.binary(max_size=30),
)
def test_report_parsers_never_raise_on_damaged_reports(base: bytes, at: int, junk: bytes) -> None:
    """Truncated or corrupted reports give a report or None, never an exception."""
    for raw in (base[:at], base[:at] + junk + base[at:]):
        parse_dsn(raw)
        parse_arf(raw)


# --------------------------------------------------------------------------- unsubscribe


def reply(subject: str, body: str) -> bytes:
    return f"From: user@example.com\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


@pytest.mark.parametrize(
    ("subject", "body", "phrase"),
    [
        ("Unsubscribe", "", "unsubscribe"),
        ("Re: your offer", "Please remove me from this list.", "remove me"),
        ("Re: hi", "Stop emailing me!", "stop emailing"),
        ("Re: hi", "Hello,\nI want to opt out.\nThanks", "opt out"),
        ("Re: hi", "Please take me off your list", "take me off"),
        ("Re: hi", "Don\u2019t email me again", "don't email"),
        ("Re: hi", "STOP", "stop"),
    ],
)
def test_unsubscribe_phrases_are_recognised(subject: str, body: str, phrase: str) -> None:
    """Each listed phrase in the subject or first written lines is an unsubscribe request."""
    parsed = parse_message(reply(subject, body))
    assert is_unsubscribe_request(parsed)
    assert find_unsubscribe_phrase(parsed) == phrase


def test_quoted_unsubscribe_text_is_ignored() -> None:
    """Our own footer quoted back ("> unsubscribe here") does not count."""
    body = (
        "Thanks, Tuesday works.\n\nOn Mon, Agent <a@acme.example> wrote:\n"
        "> See you then.\n> To unsubscribe, click here."
    )
    assert not is_unsubscribe_request(parse_message(reply("Re: meeting", body)))


def test_ordinary_words_do_not_trigger_unsubscribe() -> None:
    """Words that merely contain a phrase ("stopgap", "removement") and "stop" in a sentence
    do not count."""
    body = "The stopgap fix works. We should stop the build at noon."
    assert not is_unsubscribe_request(parse_message(reply("Re: deploy", body)))


def test_phrase_list_is_small_and_lowercase() -> None:
    """The list is short enough to explain to an operator."""
    assert len(UNSUBSCRIBE_PHRASES) <= 20
    assert all(p == p.lower() for p in UNSUBSCRIBE_PHRASES)
