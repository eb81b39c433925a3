"""Spam scoring: each rule fires for its reason, says why, and the threshold is sensible."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.domain.spam import (
    SPAM_THRESHOLD,
    SpamSignals,
    count_links,
    has_mismatched_link_text,
    is_executable_filename,
    score_message,
)

CLEAN = SpamSignals(
    spf="pass",
    dkim="pass",
    dmarc="pass",
    subject="Re: Tuesday meeting",
    text="Tuesday at 10 works for me. See you then.",
    sender_display_name="Ann Example",
    sender_address="ann@example.org",
)


def codes(signals: SpamSignals) -> list[str]:
    return [r.code for r in score_message(signals).reasons]


def test_clean_authenticated_mail_scores_zero() -> None:
    """A normal, fully authenticated message has no reasons and is not spam."""
    verdict = score_message(CLEAN)
    assert verdict.score == 0.0 and not verdict.is_spam and verdict.reasons == []
    assert verdict.threshold == SPAM_THRESHOLD


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"dmarc": "fail"}, "dmarc_fail"),
        ({"spf": "fail"}, "spf_fail"),
        ({"spf": "softfail"}, "spf_softfail"),
        ({"dkim": "fail"}, "dkim_fail"),
        ({"from_count": 2}, "multiple_from"),
        ({"from_count": 0}, "missing_from"),
        ({"subject": "VERIFY YOUR ACCOUNT TODAY"}, "all_caps_subject"),
        ({"text": "Please verify your account within 24 hours."}, "phishing_account_phrase"),
        ({"text": "Your password expires tonight."}, "password_expiry_phrase"),
        ({"text": "Urgent: send the wire transfer before noon."}, "urgent_payment_phrase"),
        ({"text": "Send 0.5 BTC to this wallet address immediately."}, "urgent_payment_phrase"),
        ({"text": "Congratulations, you have won the lottery!"}, "lottery_phrase"),
        ({"has_executable_attachment": True}, "executable_attachment"),
        ({"sender_display_name": "PayPal.com Security"}, "display_name_spoofing"),
        ({"sender_display_name": "billing@bank.example"}, "display_name_spoofing"),
        ({"link_count": 40}, "many_links"),
        ({"mismatched_link_text": True}, "mismatched_link_text"),
        ({"spf": "none", "dkim": "none", "dmarc": "none"}, "unauthenticated"),
    ],
)
def test_each_rule_fires_with_a_sentence(change: dict[str, object], code: str) -> None:
    """Each signal adds its own reason, with positive points and a full-sentence explanation."""
    verdict = score_message(replace(CLEAN, **change))  # type: ignore[arg-type]
    [reason] = [r for r in verdict.reasons if r.code == code]
    assert reason.points > 0
    assert reason.explanation[0].isupper() and reason.explanation.endswith(".")
    assert verdict.score == pytest.approx(sum(r.points for r in verdict.reasons))


def test_no_single_weak_signal_makes_mail_spam() -> None:
    """Caps, many links, soft SPF or no authentication alone stay below the threshold."""
    for change in (
        {"subject": "HELLO FROM THE TEAM"},
        {"link_count": 100},
        {"spf": "softfail"},
        {"spf": "none", "dkim": "none", "dmarc": "none"},
        {"dkim": "fail"},
    ):
        assert not score_message(replace(CLEAN, **change)).is_spam, change  # type: ignore[arg-type]


def test_forged_phishing_is_spam_and_explains_itself() -> None:
    """DMARC failure plus a spoofed display name and a phishing lure is clearly spam."""
    verdict = score_message(
        replace(
            CLEAN,
            dmarc="fail",
            spf="fail",
            sender_display_name="PayPal.com Support",
            sender_address="service@evil.example",
            text="Your account has been suspended. Confirm your password here.",
        )
    )
    assert verdict.is_spam and verdict.score >= SPAM_THRESHOLD
    spoof = next(r for r in verdict.reasons if r.code == "display_name_spoofing")
    assert "paypal.com" in spoof.explanation and "evil.example" in spoof.explanation


def test_two_from_headers_alone_with_dmarc_fail_is_spam() -> None:
    """The multiple-From trick combined with DMARC failure reaches the threshold."""
    assert score_message(replace(CLEAN, from_count=2, dmarc="fail")).is_spam


def test_own_domain_in_display_name_is_not_spoofing() -> None:
    """A display name that shows the sender's own (sub)domain is fine."""
    signals = replace(
        CLEAN, sender_display_name="mail.example.org notifications", sender_address="n@example.org"
    )
    assert "display_name_spoofing" not in codes(signals)


def test_payment_words_without_urgency_do_not_count() -> None:
    """Talking about bitcoin or a bank transfer is not suspicious without urgency."""
    signals = replace(CLEAN, text="Our invoice can be paid by bank transfer.")
    assert "urgent_payment_phrase" not in codes(signals)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("invoice.exe", True),
        ("INVOICE.PDF.SCR", True),
        ("macro.docm", True),
        ("setup.msi ", True),
        ("report.pdf", False),
        ("photo.jpeg", False),
        ("README", False),
    ],
)
def test_executable_filenames(name: str, expected: bool) -> None:
    """Program and script extensions are recognised, case-insensitively; documents are not."""
    assert is_executable_filename(name) is expected


def test_link_helpers_read_markdown() -> None:
    """Links are counted; a link whose text shows another site is a mismatch."""
    body = "See https://a.example/x and [docs](https://b.example/docs)."
    assert count_links(body) == 2
    assert has_mismatched_link_text("[www.paypal.com](https://evil.example/login)")
    assert has_mismatched_link_text("[https://bank.example](https://bank.example.evil.test/)")
    assert not has_mismatched_link_text("[https://acme.example/a](https://www.acme.example/b)")
    assert not has_mismatched_link_text("[click here](https://evil.example/)")


@settings(max_examples=200, deadline=1000)
@given(
    st.builds(
        SpamSignals,
        spf=st.sampled_from(["pass", "fail", "softfail", "none", "temperror", "permerror"]),
        dkim=st.sampled_from(["pass", "fail", "none", "neutral"]),
        dmarc=st.sampled_from(["pass", "fail", "none"]),
        from_count=st.integers(0, 5),
        subject=st.text(max_size=200),
        text=st.text(max_size=2000),
        has_executable_attachment=st.booleans(),
        sender_display_name=st.none() | st.text(max_size=80),
        sender_address=st.none() | st.emails(),
        link_count=st.integers(0, 500),
        mismatched_link_text=st.booleans(),
    )
)
def test_score_is_the_sum_of_its_reasons(signals: SpamSignals) -> None:
    """For any signals the score equals the sum of the reasons and decides is_spam."""
    verdict = score_message(signals)
    assert verdict.score == pytest.approx(sum(r.points for r in verdict.reasons))
    assert verdict.is_spam == (verdict.score >= SPAM_THRESHOLD)
    assert len({r.code for r in verdict.reasons}) == len(verdict.reasons)


@pytest.mark.parametrize(
    ("text", "hit"),
    [
        ("x" * 200_000, False),
        ("nothing to see here\n" * 10_000, False),
        ("today\n" + "filler " * 30_000 + "bitcoin", True),
        ("bitcoin\n" + "filler " * 30_000 + "urgently", True),
    ],
)
def test_urgent_payment_rule_is_linear_in_the_text(text: str, hit: bool) -> None:
    """Long bodies are scored at once: the rule once took 30 s of CPU on 50 KB of one letter."""
    started = time.process_time()
    found = "urgent_payment_phrase" in codes(replace(CLEAN, text=text))
    assert found is hit
    assert time.process_time() - started < 1.0
