"""Who is acting, and the handles every service needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from multimail.domain.scopes import Scope, satisfies
from multimail.errors import Forbidden

if TYPE_CHECKING:
    from multimail.config import Settings
    from multimail.store.db import Database


@dataclass(frozen=True)
class Actor:
    """The caller of a service: an API key, a signed-in operator, or the system itself."""

    type: str  # key | user | system
    id: str | None
    name: str | None
    account_id: str | None
    scopes: frozenset[Scope] = frozenset()
    test_mode: bool = False
    mailbox_ids: frozenset[str] | None = None  # a key restricted to some mailboxes
    # An admin key the operator minted (printed on first start, or made in the CLI or the
    # dashboard) is the operator's own credential; keys minted through the API are not.
    operator_credential: bool = False

    def require(self, scope: Scope) -> None:
        """Scopes are checked here too, not only at the HTTP edge (defence in depth)."""
        if self.type == "system":
            return
        if self.type == "user":
            return  # a signed-in operator may do everything in their account
        if not satisfies(self.scopes, scope):
            raise Forbidden(
                f"this API key lacks the '{scope.value}' scope needed here; "
                f"use a key with '{scope.value}' (this key has: "
                f"{', '.join(sorted(s.value for s in self.scopes)) or 'none'})",
                code="insufficient_scope",
                required_scope=scope.value,
            )

    @property
    def label(self) -> str:
        return self.name or self.id or self.type

    @property
    def is_operator(self) -> bool:
        """The operator acts directly: no approval code, and may loosen a mailbox's mode."""
        return self.type in ("user", "system") or self.operator_credential


SYSTEM = Actor(type="system", id=None, name="system", account_id=None)


@dataclass
class Services:
    """The service layer's dependencies; transports build one and pass it to every call."""

    db: Database
    settings: Settings
    extras: dict[str, object] = field(default_factory=dict)
