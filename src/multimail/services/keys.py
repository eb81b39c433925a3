"""API keys: created shown once, stored only as a SHA-256 hash, revoked at once.

A key is ``mm_live_`` or ``mm_test_`` followed by 43 url-safe random characters (256 bits).
A fast hash is right here (unlike passwords): the key has full entropy, so it cannot be
guessed from its hash, and lookups by hash stay one index probe per request.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from multimail.domain.scopes import Scope, ScopeError, parse_scopes
from multimail.errors import AuthenticationFailed, InvalidInput, NotFound
from multimail.ids import aware, new_id, utcnow
from multimail.services import audit
from multimail.services.common import jsonable, oldest_first_page
from multimail.services.context import Actor
from multimail.store import fast
from multimail.store.db import Database
from multimail.store.tables import accounts, api_keys, audit_entries

KEY_PREFIXES = {"live": "mm_live_", "test": "mm_test_"}
# The 401 code for a key whose account was deleted (DELETE /v1/account).
ACCOUNT_DELETED = "account_deleted"
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def _generate(mode: str) -> str:
    return KEY_PREFIXES[mode] + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class CreatedKey:
    raw_key: str
    record: dict[str, Any]


def key_public(row: Any) -> dict[str, Any]:
    data = jsonable(row._mapping if hasattr(row, "_mapping") else row, drop=("key_hash",))
    data["scopes"] = sorted(data.get("scopes") or [])
    data["test"] = data.get("mode") == "test"
    data["revoked"] = data.get("revoked_at") is not None
    data["operator_credential"] = bool(data.get("operator_credential"))
    return data


def create_key(
    conn: Connection,
    *,
    actor: Actor,
    account_id: str,
    name: str,
    scopes: Iterable[str],
    mode: str = "live",
    mailbox_ids: list[str] | None = None,
    send_cap_hour: int | None = None,
    send_cap_day: int | None = None,
) -> CreatedKey:
    try:
        parsed = parse_scopes(scopes)
    except ScopeError as exc:
        code = "separation_of_duties" if "both" in str(exc) else "invalid_scope"
        raise InvalidInput(str(exc), code=code) from None
    if mode not in KEY_PREFIXES:
        raise InvalidInput("mode must be 'live' or 'test'", code="invalid_key_mode")
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise InvalidInput("give the key a name of 1 to 200 characters", code="invalid_name")
    raw = _generate(mode)
    now = utcnow()
    record: dict[str, Any] = {
        "id": new_id("key"),
        "account_id": account_id,
        "name": name,
        "prefix": raw[:12],
        "key_hash": hash_key(raw),
        "scopes": sorted(s.value for s in parsed),
        "mode": mode,
        "mailbox_ids": mailbox_ids,
        "send_cap_hour": send_cap_hour,
        "send_cap_day": send_cap_day,
        "created_by": actor.label,
        # Only keys minted by the operator in person (first start, CLI, dashboard) act as the
        # operator; a key minted through the API never does, whoever asked for it.
        "operator_credential": actor.type in ("user", "system") and Scope.ADMIN in parsed,
        "created_at": now,
        "last_used_at": None,
        "revoked_at": None,
    }
    conn.execute(insert(api_keys).values(**record))
    audit.append(
        conn,
        actor=actor,
        account_id=account_id,
        action="api_key.created",
        subject_type="api_key",
        subject_id=record["id"],
        details={"name": name, "scopes": record["scopes"], "mode": mode},
    )
    return CreatedKey(raw_key=raw, record=key_public(record))


def list_keys(conn: Connection, account_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(api_keys).where(api_keys.c.account_id == account_id).order_by(api_keys.c.id)
    ).mappings()
    return [key_public(r) for r in rows]


def page_keys(
    conn: Connection, account_id: str, *, limit: int | None = None, cursor: str | None = None
) -> dict[str, Any]:
    """``{"api_keys", "next_cursor"}``, oldest first: revoked keys stay listed, so the list
    only grows; ``cursor`` is the last id of the previous page."""
    page, following = oldest_first_page(
        conn,
        select(api_keys).where(api_keys.c.account_id == account_id),
        api_keys.c.id,
        prefix="key",
        cursor=cursor,
        limit=limit,
        maximum=500,
    )
    return {"api_keys": [key_public(r) for r in page], "next_cursor": following}


def key_row(conn: Connection, account_id: str, key_id: str) -> dict[str, Any]:
    """The account's key ``key_id`` (hash included), or NotFound."""
    row = (
        conn.execute(
            select(api_keys).where(api_keys.c.id == key_id, api_keys.c.account_id == account_id)
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no API key {key_id!r} in this account", code="api_key_not_found")
    return dict(row)


def creator_key_id(conn: Connection, account_id: str, key_id: str) -> str | None:
    """The id of the API key that created ``key_id``, or ``None`` when an operator or the
    system did.

    Read from the key's ``api_key.created`` audit entry: ``api_keys.created_by`` holds only
    the creator's display name, which any key can share, while the audit log records the
    creator's id and is append-only."""
    return conn.execute(
        select(audit_entries.c.actor_id)
        .where(
            audit_entries.c.subject_id == key_id,
            audit_entries.c.action == "api_key.created",
            audit_entries.c.account_id == account_id,
            audit_entries.c.actor_type == "key",
        )
        .limit(1)
    ).scalar_one_or_none()


def revocable_without_code(conn: Connection, actor: Actor, row: dict[str, Any]) -> bool:
    """Whether ``actor`` may revoke the key ``row`` without the operator's approval code: an
    operator always; an API key only itself and the keys it created (what it could already
    use), never another key such as the operator's own."""
    if actor.is_operator or row["id"] == actor.id:
        return True
    return actor.id is not None and creator_key_id(conn, row["account_id"], row["id"]) == actor.id


def revoke_key(conn: Connection, *, actor: Actor, account_id: str, key_id: str) -> dict[str, Any]:
    """Revoke at once, without asking who may: the caller decided (operators act directly;
    an API key goes through ``approvals.revoke_api_key``)."""
    row = key_row(conn, account_id, key_id)
    if row["revoked_at"] is None:
        conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=utcnow()))
        audit.append(
            conn,
            actor=actor,
            account_id=account_id,
            action="api_key.revoked",
            subject_type="api_key",
            subject_id=key_id,
            details={"name": row["name"]},
        )
    fresh = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().one()
    return key_public(fresh)


def revoke_all(conn: Connection, account_id: str, at: datetime) -> int:
    """Revoke every key of the account still in use (the account is being deleted); how many.
    The caller records why in the audit log."""
    result = conn.execute(
        update(api_keys)
        .where(api_keys.c.account_id == account_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=at)
    )
    return int(result.rowcount or 0)


# Built once: this runs on every request, and building the statement costs more than running it.
# The account's status comes in the same statement (a primary-key probe joined to the key's),
# so a deleted account's keys are refused at no extra query.
_BY_HASH = fast.Compiled(
    select(
        api_keys.c.id,
        api_keys.c.account_id,
        api_keys.c.name,
        api_keys.c.scopes,
        api_keys.c.mode,
        api_keys.c.mailbox_ids,
        api_keys.c.operator_credential,
        api_keys.c.last_used_at,
        api_keys.c.revoked_at,
        accounts.c.status.label("account_status"),
    )
    .select_from(api_keys.join(accounts, accounts.c.id == api_keys.c.account_id))
    .where(api_keys.c.key_hash == bindparam("key_hash"))
)


def check_format(raw_key: str | None) -> str:
    """The key as given, or AuthenticationFailed when it is missing or not one of ours
    (decided without the database)."""
    if not raw_key:
        raise AuthenticationFailed(
            "missing API key: send 'Authorization: Bearer mm_live_…' or 'X-API-Key: …'",
            code="missing_api_key",
        )
    if not raw_key.startswith(tuple(KEY_PREFIXES.values())):
        raise AuthenticationFailed(
            "that is not a MultiMail API key (they start with mm_live_ or mm_test_)",
            code="invalid_api_key",
        )
    return raw_key


def _actor(row: Any) -> Actor:
    if row is None:
        raise AuthenticationFailed("invalid API key", code="invalid_api_key")
    if row["account_status"] == "deleted":
        # Before revocation: deleting the account revokes its keys too, and this says why.
        raise AuthenticationFailed(
            "this API key's account has been deleted: none of its keys work any more",
            code=ACCOUNT_DELETED,
        )
    if row["revoked_at"] is not None:
        raise AuthenticationFailed("this API key has been revoked", code="api_key_revoked")
    return Actor(
        type="key",
        id=row["id"],
        name=row["name"],
        account_id=row["account_id"],
        scopes=frozenset(Scope(s) for s in row["scopes"]),
        test_mode=row["mode"] == "test",
        mailbox_ids=frozenset(row["mailbox_ids"]) if row["mailbox_ids"] else None,
        operator_credential=bool(row["operator_credential"]),
    )


_TOUCH = fast.Compiled(
    update(api_keys)
    .where(api_keys.c.id == bindparam("key_id"))
    .values(last_used_at=bindparam("used_at"))
)


def _last_used_due(row: Any, now: datetime) -> bool:
    # Throttled so a busy key does not turn every request into one more write.
    last = row["last_used_at"]
    return last is None or (now - aware(last)) > _LAST_USED_RESOLUTION


def authenticate(db: Database, raw_key: str | None) -> Actor:
    """The key's actor, or AuthenticationFailed. Revocation and the account's deletion are
    read on every request."""
    raw_key = check_format(raw_key)
    with db.read() as conn:
        row = _BY_HASH.first(conn, {"key_hash": hash_key(raw_key)})
    actor = _actor(row)
    now = utcnow()
    if _last_used_due(row, now):
        with db.write() as conn:
            _TOUCH.execute(conn, {"key_id": actor.id, "used_at": now})
    return actor


def authenticate_in(conn: Connection, raw_key: str | None) -> Actor:
    """:func:`authenticate` inside the caller's write transaction (the request's rate-limit
    transaction: one transaction per request instead of two). Revocation and the account's
    deletion are read here, on every request, as in :func:`authenticate`."""
    raw_key = check_format(raw_key)
    row = _BY_HASH.first(conn, {"key_hash": hash_key(raw_key)})
    actor = _actor(row)
    now = utcnow()
    if _last_used_due(row, now):
        _TOUCH.execute(conn, {"key_id": actor.id, "used_at": now})
    return actor
