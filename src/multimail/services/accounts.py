"""Accounts (tenants), operator users, and the first-start bootstrap."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from sqlalchemy import Connection, func, insert, select, update

from multimail.domain.addresses import AddressError, normalize_address
from multimail.errors import Conflict, InvalidInput, NotFound
from multimail.ids import new_id, utcnow
from multimail.services import audit, keys, sending
from multimail.services import mailboxes as mailbox_service
from multimail.services.common import jsonable
from multimail.services.context import SYSTEM, Actor
from multimail.store.db import Database
from multimail.store.tables import accounts, mailboxes, operator_users

_hasher = PasswordHasher()

UPDATABLE_ACCOUNT_FIELDS = ("name", "oversight_email", "postal_address", "daily_send_quota")


def check_oversight_email(conn: Connection, value: Any) -> Any:
    """``oversight_email`` as it will be stored, or 422.

    It must be an address the composer writes as given (see
    :func:`mailboxes.setting_address`: approval requests and codes are mailed there), and not
    a mailbox hosted by this server, in any account: whoever holds a key that reads that
    mailbox would read the approval-request mails (one-click Approve links), the trust-ladder
    codes and the approval codes, and so approve their own requests. Takes
    :func:`mailboxes.lock_addresses` (before any audit append of the caller's transaction),
    so a mailbox created at the same moment cannot take the address either. Empty or null
    (no oversight address) is given back as it came.
    """
    if not value:
        return value
    address = mailbox_service.setting_address(value, "oversight_email")
    mailbox_service.lock_addresses(conn)
    if mailbox_service.hosted_here(conn, address):
        raise InvalidInput(
            f"oversight_email cannot be {address}: that is a mailbox on this MultiMail server, "
            "and an agent that can read it would read the approval requests (with their "
            "one-click Approve links) and the approval codes meant for the operator. Use an "
            "address the operator reads outside MultiMail (their own mail provider)",
            code="oversight_email_hosted_here",
            field="oversight_email",
        )
    return address


def create_account(
    conn: Connection,
    *,
    actor: Actor,
    name: str,
    oversight_email: str | None = None,
    postal_address: str | None = None,
) -> dict[str, Any]:
    now = utcnow()
    oversight_email = check_oversight_email(conn, oversight_email)
    record: dict[str, Any] = {
        "id": new_id("acct"),
        "name": name.strip() or "MultiMail",
        "oversight_email": oversight_email,
        "postal_address": postal_address,
        "plan": "self_hosted",
        "daily_send_quota": None,
        "sending_enabled": True,
        "paused": False,
        "status": "active",
        "created_at": now,
        "updated_at": now,
        "deleted_at": None,
    }
    conn.execute(insert(accounts).values(**record))
    audit.append(
        conn,
        actor=actor,
        account_id=record["id"],
        action="account.created",
        subject_type="account",
        subject_id=record["id"],
        details={"name": record["name"]},
    )
    return record


def get_account(conn: Connection, account_id: str) -> dict[str, Any]:
    row = conn.execute(select(accounts).where(accounts.c.id == account_id)).mappings().first()
    if row is None or row["status"] == "deleted":
        raise NotFound("account not found", code="account_not_found")
    return dict(row)


def account_view(conn: Connection, account_id: str) -> dict[str, Any]:
    row = get_account(conn, account_id)
    data = jsonable(row)
    data["mailbox_count"] = conn.execute(
        select(func.count())
        .select_from(mailboxes)
        .where(mailboxes.c.account_id == account_id, mailboxes.c.deleted_at.is_(None))
    ).scalar_one()
    sent_today = sending.sent_today_for_quota(conn, account_id, utcnow())
    data["quota"] = {
        "daily_send_quota": row["daily_send_quota"],
        "sent_today": sent_today,
        "remaining_today": (
            None
            if row["daily_send_quota"] is None
            else max(0, row["daily_send_quota"] - sent_today)
        ),
    }
    data["sending_enabled"] = bool(row["sending_enabled"]) and not bool(row["paused"])
    return data


def update_account(
    conn: Connection, *, actor: Actor, account_id: str, changes: dict[str, Any]
) -> dict[str, Any]:
    unknown = set(changes) - set(UPDATABLE_ACCOUNT_FIELDS)
    if unknown:
        raise InvalidInput(
            f"these account fields cannot be changed here: {', '.join(sorted(unknown))}",
            code="unknown_fields",
        )
    cleared = sorted(k for k, v in changes.items() if v is None and not accounts.c[k].nullable)
    if cleared:
        raise InvalidInput(
            f"these account fields cannot be cleared: {', '.join(cleared)}",
            code="required_fields",
        )
    current = get_account(conn, account_id)
    values = dict(changes)
    if "oversight_email" in values:
        values["oversight_email"] = check_oversight_email(conn, values["oversight_email"])
    if not values:
        return account_view(conn, account_id)
    values["updated_at"] = utcnow()
    conn.execute(update(accounts).where(accounts.c.id == account_id).values(**values))
    audit.append(
        conn,
        actor=actor,
        account_id=account_id,
        action="account.updated",
        subject_type="account",
        subject_id=account_id,
        details={
            "changes": {k: {"from": current.get(k), "to": v} for k, v in changes.items()},
        },
    )
    return account_view(conn, account_id)


def deactivate_account(conn: Connection, *, actor: Actor, account_id: str) -> dict[str, Any]:
    """``DELETE /v1/account`` stops the account; messages and the audit log are kept.

    In one transaction: the account is marked deleted (its operators can no longer sign in,
    nothing more is delivered) and every key still in use is revoked. Authentication refuses
    a deleted account's keys anyway (401 ``account_deleted``); revoking them too keeps the
    stored keys telling the truth. Who may call it is the caller's business: an API key that
    is not the operator's own needs the operator's approval code (see
    :func:`approvals.delete_account`)."""
    get_account(conn, account_id)
    now = utcnow()
    conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id)
        .values(status="deleted", sending_enabled=False, deleted_at=now, updated_at=now)
    )
    revoked = keys.revoke_all(conn, account_id, now)
    audit.append(
        conn,
        actor=actor,
        account_id=account_id,
        action="account.deactivated",
        subject_type="account",
        subject_id=account_id,
        details={"api_keys_revoked": revoked},
    )
    return {"id": account_id, "status": "deleted", "deleted": True}


def create_operator(
    conn: Connection, *, actor: Actor, account_id: str, email: str, name: str, password: str
) -> dict[str, Any]:
    try:
        email = normalize_address(email)
    except AddressError as exc:
        raise InvalidInput(str(exc), code="invalid_address") from None
    if len(password) < 10:
        raise InvalidInput("a password needs at least 10 characters", code="weak_password")
    exists = conn.execute(
        select(operator_users.c.id).where(operator_users.c.email == email)
    ).first()
    if exists:
        raise Conflict(f"an operator {email} already exists", code="operator_exists")
    record: dict[str, Any] = {
        "id": new_id("usr"),
        "account_id": account_id,
        "email": email,
        "name": name,
        "password_hash": _hasher.hash(password),
        "role": "owner",
        "disabled": False,
        "created_at": utcnow(),
        "last_sign_in_at": None,
    }
    conn.execute(insert(operator_users).values(**record))
    audit.append(
        conn,
        actor=actor,
        account_id=account_id,
        action="operator.created",
        subject_type="operator",
        subject_id=record["id"],
        details={"email": email},
    )
    return jsonable(record, drop=("password_hash",))


def check_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except VerificationError:
        return False


@dataclass(frozen=True)
class Bootstrap:
    account: dict[str, Any]
    operator_email: str
    operator_password: str
    admin_key: str
    agent_key: str
    reviewer_key: str


def has_accounts(db: Database) -> bool:
    with db.read() as conn:
        return conn.execute(select(accounts.c.id).limit(1)).first() is not None


def bootstrap(
    db: Database,
    *,
    account_name: str = "MultiMail",
    operator_email: str = "admin@localhost",
    oversight_email: str | None = None,
) -> Bootstrap:
    """First start: one account, its first operator, and the three keys of SPEC §11."""
    password = secrets.token_urlsafe(12)
    with db.write() as conn:
        account = create_account(
            conn,
            actor=SYSTEM,
            name=account_name,
            oversight_email=oversight_email or operator_email,
        )
        create_operator(
            conn,
            actor=SYSTEM,
            account_id=account["id"],
            email=operator_email,
            name="Operator",
            password=password,
        )
        system = Actor(type="system", id=None, name="bootstrap", account_id=account["id"])
        admin = keys.create_key(
            conn, actor=system, account_id=account["id"], name="admin", scopes=["admin", "read"]
        )
        agent = keys.create_key(
            conn, actor=system, account_id=account["id"], name="agent", scopes=["send", "read"]
        )
        reviewer = keys.create_key(
            conn,
            actor=system,
            account_id=account["id"],
            name="reviewer",
            scopes=["oversight", "read"],
        )
    return Bootstrap(
        account=account,
        operator_email=operator_email,
        operator_password=password,
        admin_key=admin.raw_key,
        agent_key=agent.raw_key,
        reviewer_key=reviewer.raw_key,
    )
