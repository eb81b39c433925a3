"""API key scopes and the separation-of-duties rule."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Scope(StrEnum):
    READ = "read"
    SEND = "send"
    OVERSIGHT = "oversight"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)


class ScopeError(ValueError):
    """A requested set of scopes is not allowed; the message says what to change."""


def parse_scopes(values: Iterable[str]) -> frozenset[Scope]:
    scopes: set[Scope] = set()
    for value in values:
        try:
            scopes.add(Scope(value))
        except ValueError:
            allowed = ", ".join(s.value for s in Scope)
            raise ScopeError(f"unknown scope {value!r}; use any of: {allowed}") from None
    if not scopes:
        raise ScopeError("a key needs at least one scope (read, send, oversight or admin)")
    if Scope.SEND in scopes and Scope.OVERSIGHT in scopes:
        # The agent that writes a message must never be the one that approves it.
        raise ScopeError(
            "a key cannot have both 'send' and 'oversight': the agent that writes a message "
            "must never approve it; create two keys instead"
        )
    return frozenset(scopes)


def satisfies(held: Iterable[Scope | str], needed: Scope) -> bool:
    """Each scope stands alone, except that ``admin`` implies ``read``.

    ``admin`` deliberately does not imply ``send`` or ``oversight``: an operator's admin key
    manages the account, it neither writes agent mail nor approves it.
    """
    held_set = {Scope(s) for s in held}
    return needed in held_set or (needed is Scope.READ and Scope.ADMIN in held_set)
