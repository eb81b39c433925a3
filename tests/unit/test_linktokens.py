"""One-click link tokens: signed, expiring, purpose-bound, tamper-evident."""

from __future__ import annotations

import string
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.domain.linktokens import (
    InvalidLinkToken,
    LinkToken,
    make_token,
    new_nonce,
    read_token,
)
from multimail.errors import AuthenticationFailed, InvalidInput

SECRET = b"k" * 32
OTHER_SECRET = b"j" * 32
NOW = 1_700_000_000

fields = st.text(min_size=1, max_size=40)


def _token(**overrides: object) -> str:
    args: dict[str, object] = {
        "purpose": "approval",
        "subject_id": "msg_01HZX",
        "action": "approve",
        "expires_at": NOW + 3600,
        "nonce": "n0nce",
    }
    args.update(overrides)
    return make_token(SECRET, **args)  # type: ignore[arg-type]


def _reason(secret: bytes, token: str, *, purpose: str = "approval", now: int = NOW) -> str:
    with pytest.raises(InvalidLinkToken) as caught:
        read_token(secret, token, purpose=purpose, now=now)
    assert isinstance(caught.value, AuthenticationFailed)
    return caught.value.reason


@settings(max_examples=100, deadline=None)
@given(purpose=fields, subject=fields, action=fields, nonce=fields, ttl=st.integers(1, 10**8))
def test_round_trip_returns_what_was_signed(
    purpose: str, subject: str, action: str, nonce: str, ttl: int
) -> None:
    """A token made now reads back with exactly the purpose, subject, action, expiry, nonce."""
    token = make_token(
        SECRET,
        purpose=purpose,
        subject_id=subject,
        action=action,
        expires_at=NOW + ttl,
        nonce=nonce,
    )
    assert quote(token, safe="") == token, "tokens must be URL-safe without escaping"
    assert read_token(SECRET, token, purpose=purpose, now=NOW) == LinkToken(
        purpose=purpose, subject_id=subject, action=action, expires_at=NOW + ttl, nonce=nonce
    )


@settings(max_examples=300, deadline=None)
@given(
    position=st.integers(min_value=0),
    replacement=st.characters(codec="utf-8"),
)
def test_any_character_changed_reads_as_forged(position: int, replacement: str) -> None:
    """Replacing any one character of a token with any other makes it ``forged``."""
    token = _token()
    index = position % len(token)
    if token[index] == replacement:
        replacement = "A" if replacement != "A" else "B"
    tampered = token[:index] + replacement + token[index + 1 :]
    assert _reason(SECRET, tampered) == "forged"


@settings(max_examples=100, deadline=None)
@given(position=st.integers(min_value=0), extra=st.sampled_from(string.ascii_letters + "-_."))
def test_inserted_or_deleted_characters_never_pass(position: int, extra: str) -> None:
    """Inserting or deleting a character is refused, as forged (or malformed if no dot is left)."""
    token = _token()
    index = position % len(token)
    for tampered in (token[:index] + extra + token[index:], token[:index] + token[index + 1 :]):
        assert _reason(SECRET, tampered) in {"forged", "malformed"}


def test_token_from_another_secret_is_forged() -> None:
    """A token signed with a different secret is refused as forged."""
    assert _reason(OTHER_SECRET, _token()) == "forged"


def test_expired_token_is_refused_at_and_after_expiry() -> None:
    """A token is valid until its expiry instant and refused from that instant on."""
    token = _token(expires_at=NOW + 10)
    assert read_token(SECRET, token, purpose="approval", now=NOW + 9).action == "approve"
    assert _reason(SECRET, token, now=NOW + 10) == "expired"
    assert _reason(SECRET, token, now=NOW + 10_000) == "expired"


def test_token_for_another_purpose_is_refused() -> None:
    """An unsubscribe token cannot be used as an approval token, and vice versa."""
    token = _token(purpose="unsubscribe", action="unsubscribe")
    assert _reason(SECRET, token, purpose="approval") == "wrong_purpose"


def test_wrong_purpose_is_reported_before_expiry() -> None:
    """A stale token of another purpose is reported as the wrong purpose."""
    token = _token(purpose="unsubscribe", expires_at=NOW - 1)
    assert _reason(SECRET, token, purpose="approval") == "wrong_purpose"


@pytest.mark.parametrize("garbage", ["", "nodot", "x" * 5000])
def test_garbage_is_malformed(garbage: str) -> None:
    """Text that cannot be a token is ``malformed``."""
    assert _reason(SECRET, garbage) == "malformed"


def test_short_secret_is_refused() -> None:
    """A secret shorter than 32 bytes cannot make or read tokens."""
    with pytest.raises(InvalidInput):
        make_token(b"short", purpose="p", subject_id="s", action="a", expires_at=1, nonce="n")
    with pytest.raises(InvalidInput):
        read_token(b"short", _token(), purpose="approval", now=NOW)


@pytest.mark.parametrize("empty", ["purpose", "subject_id", "action", "nonce"])
def test_empty_fields_are_refused(empty: str) -> None:
    """Every field of a token must be present and non-empty."""
    with pytest.raises(InvalidInput):
        _token(**{empty: ""})


def test_nonces_are_distinct_and_url_safe() -> None:
    """new_nonce gives a fresh URL-safe value each time."""
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(quote(n, safe="") == n for n in nonces)


def test_approve_and_reject_tokens_differ_for_the_same_message() -> None:
    """The action is bound into the token: an Approve link cannot be turned into Reject."""
    approve = read_token(SECRET, _token(action="approve"), purpose="approval", now=NOW)
    reject = read_token(SECRET, _token(action="reject"), purpose="approval", now=NOW)
    assert (approve.action, reject.action) == ("approve", "reject")
