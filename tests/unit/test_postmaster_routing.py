"""The postmaster setting fails at startup when it cannot work, and the forward a human reads
shows the sender's words only inside fences, cut to a bounded size."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from multimail.config import Settings, load_settings
from multimail.mail.parse import ParsedMessage, parse_message
from multimail.services.notify import POSTMASTER_TEXT_CHARS, postmaster_forward_mail

_FENCE = re.compile(r"^(`{3,})text\n(.*?)\n\1$", re.MULTILINE | re.DOTALL)


def _parsed(subject: str, body: str) -> ParsedMessage:
    raw = (
        "From: Alice <alice@sender.test>\r\nTo: postmaster@mm.test\r\n"
        f"Subject: {subject}\r\nMessage-ID: <m1@sender.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + body.replace("\n", "\r\n")
    )
    return parse_message(raw.encode())


def _forward(parsed: ParsedMessage) -> tuple[str, str]:
    return postmaster_forward_mail(
        postmasters=["postmaster@mm.test"],
        inbound_id="inb_01test",
        mail_from="alice@sender.test",
        parsed=parsed,
        authentication="mm.test; spf=pass smtp.mailfrom=sender.test; dkim=none; dmarc=none",
        spam_score=1.5,
        spam_threshold=5.0,
        reader="the server's postmaster",
    )


def _outside_fences(markdown: str) -> str:
    return _FENCE.sub("", markdown)


def test_a_bad_postmaster_address_fails_at_startup_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MULTIMAIL_POSTMASTER_EMAIL is checked like every address we store: a value that is no
    address stops the settings from loading, and the error names the variable."""
    monkeypatch.setenv("MULTIMAIL_POSTMASTER_EMAIL", "Postmaster <pm@example.org>")
    with pytest.raises(ValidationError, match="MULTIMAIL_POSTMASTER_EMAIL"):
        load_settings()


def test_the_postmaster_address_is_normalised_and_blank_means_unset() -> None:
    """The address is stored as every address is (lower case, IDNA domain); an empty value
    (an env file line without a value) leaves it unset."""
    assert Settings(postmaster_email=" Host@Exämple.ORG ").postmaster_email == (
        "host@xn--exmple-cua.org"
    )
    assert Settings(postmaster_email="  ").postmaster_email is None
    assert Settings().postmaster_email is None


def test_postmaster_of_the_server_itself_is_refused_as_a_destination() -> None:
    """Forwarding to postmaster@<server domain> would bring each forward back as new
    postmaster mail, so that value fails at startup."""
    with pytest.raises(ValidationError, match="would come back"):
        Settings(domain="Mail.Example.org", postmaster_email="PostMaster@mail.example.org")
    assert Settings(domain="mail.example.org", postmaster_email="postmaster@other.example")


def test_the_forward_subject_is_collapsed_and_trimmed() -> None:
    """Whitespace in the sender's subject is collapsed and the subject cut at 200 characters,
    as the other operator mail does."""
    subject, _ = _forward(_parsed("Broken\t  MX   " + "x" * 300, "Hi"))
    assert subject.startswith("[MultiMail] Mail to postmaster@mm.test: Broken MX xxx")
    assert len(subject) == 200


def test_long_text_is_cut_at_twenty_thousand_characters_with_a_note() -> None:
    """The forward carries at most 20,000 characters of the text and says it was cut and
    where the whole message is; a shorter text is whole and carries no note."""
    body = "a" * (POSTMASTER_TEXT_CHARS - 10) + "0123456789TAIL"
    _, markdown = _forward(_parsed("Long", body))
    fences = [content for _, content in _FENCE.findall(markdown)]
    text = fences[-1]
    assert len(text) == POSTMASTER_TEXT_CHARS and text.endswith("0123456789")
    assert "TAIL" not in markdown
    assert "cut at 20,000" in markdown and "inbound message inb_01test" in markdown
    _, short = _forward(_parsed("Short", "Just this."))
    assert "Just this." in short and "cut at" not in short


def test_nothing_the_sender_wrote_is_outside_a_fence() -> None:
    """Backtick runs (and characters drawn like backticks) in the body and headers cannot
    close a fence early: with every fenced block taken away, none of the sender's text is
    left over."""
    body = "```\n[Approve](http://evil.example/a)\n`````\n\u02cb\u02cb\u02cb\u02cb\u02cb\u02cb\nSIGNED-BY-MULTIMAIL"
    parsed = _parsed("```SUBJECT-MARK", body)
    _, markdown = _forward(parsed)
    outside = _outside_fences(markdown)
    for mark in ("evil.example", "SIGNED-BY-MULTIMAIL", "SUBJECT-MARK", "alice@sender.test"):
        assert mark in markdown and mark not in outside, mark
