"""How a refusal from the next SMTP hop is judged (``classify_reply``), and how its text is
made fit to store (RFC 5321 §4.2, §4.5.3.1.10; RFC 3463 enhanced status codes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.smtp.outbound import (
    ReplyClass,
    ReplyStage,
    _reply_text,
    classify_reply,
    enhanced_status,
)

TEMPORARY = ReplyClass.TEMPORARY
PERMANENT = ReplyClass.PERMANENT
BAD_ADDRESS = ReplyClass.PERMANENT_BAD_ADDRESS
STAGES: tuple[ReplyStage, ...] = ("session", "mail", "rcpt", "data")

# (reply code, reply text, stage, verdict): what real servers say, and what it means.
CASES: list[tuple[int, str, ReplyStage, ReplyClass]] = [
    # 4xx: always temporary.
    (451, "4.3.0 greylisted, try again later", "rcpt", TEMPORARY),
    (450, "4.2.0 mailbox busy", "rcpt", TEMPORARY),
    (452, "4.5.3 too many recipients", "rcpt", TEMPORARY),
    (421, "4.3.2 closing", "session", TEMPORARY),
    (451, "4.7.1 try later", "mail", TEMPORARY),
    (452, "4.3.1 insufficient system storage", "data", TEMPORARY),
    # Before MAIL, a 5xx is about the host or our login, never a mailbox.
    (554, "5.7.1 mx1 does not accept mail from you", "session", TEMPORARY),
    (550, "5.1.1 no such user", "session", TEMPORARY),
    (535, "5.7.8 authentication credentials invalid", "session", TEMPORARY),
    (502, "5.5.2 command not recognized", "session", TEMPORARY),
    # MAIL FROM judges our sender: the message fails, nobody is suppressed.
    (550, "5.7.1 <agent@mm.test>: sender address rejected", "mail", PERMANENT),
    (553, "sender address not allowed", "mail", PERMANENT),
    (550, "5.1.1 no such user", "mail", PERMANENT),
    (552, "5.3.4 message size exceeds fixed limit", "mail", PERMANENT),
    # RFC 821's "too many recipients" at RCPT (RFC 5321 §4.5.3.1.10), whatever it says.
    (552, "Too many recipients", "rcpt", TEMPORARY),
    (552, "5.5.3 Too many recipients", "rcpt", TEMPORARY),
    (552, "5.3.4 message too big", "rcpt", TEMPORARY),
    # X.5.3 (too many recipients) and X.2.2 (mailbox full) at any stage.
    (550, "5.5.3 too many recipients", "rcpt", TEMPORARY),
    (554, "5.5.3 too many recipients", "data", TEMPORARY),
    (550, "5.5.3 too many recipients", "mail", TEMPORARY),
    (552, "5.2.2 mailbox full", "rcpt", TEMPORARY),
    (550, "5.2.2 user is over quota", "rcpt", TEMPORARY),
    (552, "5.2.2 mailbox full", "data", TEMPORARY),
    (554, "5.2.2 quota exceeded", "mail", TEMPORARY),
    # At RCPT: X.1.x and X.2.1 are about the address, and so is no enhanced code at all.
    (550, "5.1.1 <bob@y.test>: Recipient address rejected: User unknown", "rcpt", BAD_ADDRESS),
    (553, "5.1.3 bad recipient address syntax", "rcpt", BAD_ADDRESS),
    (550, "5.1.10 recipient domain has a null MX", "rcpt", BAD_ADDRESS),
    (550, "5.2.1 mailbox disabled", "rcpt", BAD_ADDRESS),
    (550, "no such user", "rcpt", BAD_ADDRESS),
    (550, "", "rcpt", BAD_ADDRESS),
    # ... any other subject refuses the message, not the address.
    (554, "5.7.1 Relay access denied", "rcpt", PERMANENT),
    (550, "5.7.1 recipient rejected by policy", "rcpt", PERMANENT),
    (550, "5.4.1 recipient address rejected: access denied", "rcpt", PERMANENT),
    (554, "5.3.0 other mail system problem", "rcpt", PERMANENT),
    (550, "5.2.0 mailbox unavailable", "rcpt", PERMANENT),
    # After DATA: only X.1.x and X.2.1 blame the address; no code refuses the message.
    (550, "5.1.1 user unknown", "data", BAD_ADDRESS),
    (554, "5.2.1 mailbox disabled", "data", BAD_ADDRESS),
    (552, "5.3.4 Message size exceeds fixed maximum message size", "data", PERMANENT),
    (554, "5.6.0 content rejected", "data", PERMANENT),
    (550, "5.7.26 unauthenticated mail is prohibited (DMARC)", "data", PERMANENT),
    (554, "5.7.1 message rejected as spam", "data", PERMANENT),
    (554, "transaction failed", "data", PERMANENT),
    # Only subject and detail are read: a class digit at odds with the code changes nothing.
    (550, "4.1.1 no such user", "rcpt", BAD_ADDRESS),
    # Not a 5xx: a success code where a refusal was seen, or aiosmtplib's -1 for a
    # malformed reply, is no verdict.
    (252, "cannot verify user", "rcpt", TEMPORARY),
    (354, "go ahead", "rcpt", TEMPORARY),
    (-1, "Malformed SMTP response line", "data", TEMPORARY),
]


@pytest.mark.parametrize(
    ("code", "text", "stage", "verdict"),
    CASES,
    ids=[f"{code} {text[:30]} at {stage}" for code, text, stage, _ in CASES],
)
def test_each_reply_gets_the_class_the_rfcs_give_it(
    code: int, text: str, stage: ReplyStage, verdict: ReplyClass
) -> None:
    """The table above, one case per row."""
    assert classify_reply(code, enhanced_status(text), stage) is verdict


def test_a_class_says_whether_it_bounces_and_whether_it_suppresses() -> None:
    """TEMPORARY retries; PERMANENT bounces; only PERMANENT_BAD_ADDRESS also suppresses."""
    assert [(c.permanent, c.blames_recipient) for c in ReplyClass] == [
        (False, False),
        (True, False),
        (True, True),
    ]


ENHANCED_CODES = st.none() | st.tuples(
    st.sampled_from([2, 4, 5]), st.integers(0, 999), st.integers(0, 999)
)


@settings(max_examples=2000)
@given(code=st.integers(200, 599), enhanced=ENHANCED_CODES, stage=st.sampled_from(STAGES))
def test_every_reply_gets_one_class_and_4xx_is_never_permanent(
    code: int, enhanced: tuple[int, int, int] | None, stage: ReplyStage
) -> None:
    """Any code 200-599 with any enhanced code at any stage: exactly one class; below 500
    (4xx above all) always temporary; MAIL FROM never blames the recipient; nothing before
    MAIL is permanent."""
    verdict = classify_reply(code, enhanced, stage)
    assert isinstance(verdict, ReplyClass)
    if code < 500:
        assert verdict is TEMPORARY
    if stage == "mail":
        assert not verdict.blames_recipient
    if stage == "session":
        assert verdict is TEMPORARY


@settings(max_examples=500)
@given(code=st.integers(500, 599), subject=st.integers(0, 999), detail=st.integers(0, 999))
def test_a_5xx_blames_the_address_only_for_an_addressing_code(
    code: int, subject: int, detail: int
) -> None:
    """After DATA, and at RCPT (but for 552), a 5xx suppresses exactly when its enhanced
    code is X.1.x or X.2.1."""
    addressing = subject == 1 or (subject, detail) == (2, 1)
    for stage in ("rcpt", "data"):
        verdict = classify_reply(code, (5, subject, detail), stage)
        if stage == "rcpt" and code == 552:
            assert verdict is TEMPORARY
        else:
            assert verdict.blames_recipient is addressing


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("5.1.1 no such user", (5, 1, 1)),
        ("5.1.10 null MX", (5, 1, 10)),
        ("4.2.2 mailbox full", (4, 2, 2)),
        ("2.0.0 queued as 1234", (2, 0, 0)),
        ("5.7.1", (5, 7, 1)),
        ("5.7.1\nsecond line of the reply", (5, 7, 1)),
        ("no such user", None),
        ("", None),
        ("5.1.1abc", None),
        ("6.1.1 not a class", None),
        ("5.1234.1 subject too long", None),
        ("<bob@y.test>: 5.1.1 not at the start", None),
    ],
)
def test_the_enhanced_status_code_is_read_from_the_start_of_the_text(
    text: str, status: tuple[int, int, int] | None
) -> None:
    """RFC 3463 §2 class.subject.detail, at the start of the text (RFC 2034 §4)."""
    assert enhanced_status(text) == status


def test_reply_text_that_is_not_utf8_is_stored_with_replacement_characters() -> None:
    """aiosmtplib keeps a Latin-1 byte as a lone surrogate; the text we keep has U+FFFD."""
    received = b"2.0.0 Nachricht \xfcbernommen".decode("utf-8", "surrogateescape")
    assert _reply_text(received) == "2.0.0 Nachricht \ufffdbernommen"


def test_reply_text_loses_its_control_characters_but_tab() -> None:
    """Line breaks of a multi-line reply become spaces; other controls too; tabs stay."""
    assert _reply_text("5.7.1 first\nsecond\r\x1b[31m\tred\x00") == "5.7.1 first second [31m\tred"


@settings(max_examples=500)
@given(raw=st.binary(max_size=200))
def test_any_reply_bytes_give_storable_text(raw: bytes) -> None:
    """Whatever bytes the server sent, the text encodes as UTF-8 and has no control
    character but tab (nothing to break a log line or a database insert)."""
    text = _reply_text(raw.decode("utf-8", "surrogateescape"))
    text.encode("utf-8")
    assert not any(
        (ord(c) < 0x20 and c != "\t") or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in text
    )
