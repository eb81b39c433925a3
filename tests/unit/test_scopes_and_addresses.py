"""Scopes with separation of duties, and address syntax."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multimail.domain.addresses import AddressError, matches_pattern, normalize_address
from multimail.domain.scopes import Scope, ScopeError, parse_scopes, satisfies


def test_send_and_oversight_together_are_refused() -> None:
    """The agent that writes a message can never approve it."""
    with pytest.raises(ScopeError, match="both 'send' and 'oversight'"):
        parse_scopes(["send", "oversight"])


@given(st.sets(st.sampled_from([s.value for s in Scope]), min_size=1))
def test_any_scope_set_without_both_send_and_oversight_is_accepted(scopes: set[str]) -> None:
    """Every other combination parses."""
    if {"send", "oversight"} <= scopes:
        with pytest.raises(ScopeError):
            parse_scopes(scopes)
    else:
        assert {s.value for s in parse_scopes(scopes)} == scopes


def test_unknown_scope_is_named_in_the_error() -> None:
    """A typo gets a sentence naming it and the allowed values."""
    with pytest.raises(ScopeError, match="'sned'"):
        parse_scopes(["sned"])


def test_admin_implies_read_only() -> None:
    """admin manages the account; it neither sends nor approves."""
    assert satisfies([Scope.ADMIN], Scope.READ)
    assert not satisfies([Scope.ADMIN], Scope.SEND)
    assert not satisfies([Scope.ADMIN], Scope.OVERSIGHT)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "plain",
        "a@",
        "@b.com",
        "a b@c.com",
        "x@-bad.com",
        "Name <a@b.com>",
        "a@b.com\r\nBcc: x@y",
        "a@b..com",
    ],
)
def test_bad_addresses_are_refused(bad: str) -> None:
    """Anything but a plain address is refused with a reason."""
    with pytest.raises(AddressError):
        normalize_address(bad)


def test_addresses_are_lower_cased_and_localhost_allowed() -> None:
    """Lookups are exact because storage is normalised."""
    assert normalize_address(" Support@Example.COM ") == "support@example.com"
    assert normalize_address("agent@localhost") == "agent@localhost"


def test_allowlist_patterns() -> None:
    """Exact addresses and *@domain."""
    assert matches_pattern("a@x.com", "*@x.com")
    assert not matches_pattern("a@y.x.com", "*@x.com")
    assert matches_pattern("A@x.com", "a@x.com")
