"""Operators signing in to the dashboard: passwords, sessions, CSRF tokens, attempt limits.

* Passwords are argon2 hashes (``accounts.check_password``); an unknown email still pays for
  one hash check, so response time does not tell which emails exist.
* A session token is 256 random bits handed to the browser once; the table keeps only its
  SHA-256 (like API keys: full entropy, so a fast hash is enough). Each session has its own
  CSRF token, compared in constant time on every form post.
* Attempts are limited per email + client address with a token bucket in
  ``rate_limit_buckets`` (shared by every process): each attempt takes a token, a success
  refills the bucket. Every attempt is audited (``operator.signed_in`` /
  ``operator.sign_in_failed``), including the refused ones, in a transaction of its own so a
  failed sign-in is recorded even though the caller gets an error.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from multimail.domain.addresses import AddressError, normalize_address
from multimail.errors import AuthenticationFailed, Forbidden, RateLimited
from multimail.ids import aware, id_cursor, isoformat, utcnow
from multimail.services import accounts, audit
from multimail.services import messages as message_views
from multimail.services.common import jsonable
from multimail.services.context import SYSTEM, Actor
from multimail.store.db import Database
from multimail.store.tables import accounts as accounts_table
from multimail.store.tables import (
    dashboard_sessions,
    operator_users,
    rate_limit_buckets,
)
from multimail.store.tables import delivery_attempts as attempts_table
from multimail.store.tables import messages as messages_table

SESSION_LIFETIME = timedelta(hours=12)
ATTEMPTS_PER_WINDOW = 5
ATTEMPT_WINDOW_SECONDS = 15 * 60
_REFILL_PER_SECOND = ATTEMPTS_PER_WINDOW / ATTEMPT_WINDOW_SECONDS
# Verified against when the email is unknown, so both paths cost one argon2 check.
_DUMMY_HASH = accounts._hasher.hash(secrets.token_hex(16))


@dataclass(frozen=True)
class OperatorSession:
    """A signed-in operator as the dashboard sees them on each request."""

    user_id: str
    account_id: str
    email: str
    name: str
    csrf_token: str
    expires_at: datetime

    @property
    def actor(self) -> Actor:
        """Decisions name the person: the operator's email is the reviewer identity."""
        return Actor(type="user", id=self.user_id, name=self.email, account_id=self.account_id)


@dataclass(frozen=True)
class SignedIn:
    token: str  # the raw cookie value; never stored
    session: OperatorSession


def _hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def _bucket_name(email: str, client: str) -> str:
    digest = hashlib.sha256(f"{email}\0{client}".encode()).hexdigest()
    return f"signin:{digest}"


def _take_attempt(conn: Connection, bucket: str, now: float) -> int:
    """Take one token; 0 when allowed, else the seconds until the next attempt is allowed."""
    fresh = {"bucket": bucket, "tokens": float(ATTEMPTS_PER_WINDOW), "updated_at": now}
    if conn.dialect.name == "postgresql":
        conn.execute(pg_insert(rate_limit_buckets).values(**fresh).on_conflict_do_nothing())
        query = select(rate_limit_buckets).where(rate_limit_buckets.c.bucket == bucket)
        row = conn.execute(query.with_for_update()).mappings().one()
    else:
        conn.execute(sqlite_insert(rate_limit_buckets).values(**fresh).on_conflict_do_nothing())
        query = select(rate_limit_buckets).where(rate_limit_buckets.c.bucket == bucket)
        row = conn.execute(query).mappings().one()
    elapsed = max(0.0, now - float(row["updated_at"]))
    tokens = min(float(ATTEMPTS_PER_WINDOW), float(row["tokens"]) + elapsed * _REFILL_PER_SECOND)
    if tokens < 1.0:
        conn.execute(
            update(rate_limit_buckets)
            .where(rate_limit_buckets.c.bucket == bucket)
            .values(tokens=tokens, updated_at=now)
        )
        return max(1, math.ceil((1.0 - tokens) / _REFILL_PER_SECOND))
    conn.execute(
        update(rate_limit_buckets)
        .where(rate_limit_buckets.c.bucket == bucket)
        .values(tokens=tokens - 1.0, updated_at=now)
    )
    return 0


def _audit_failure(
    conn: Connection, *, email: str, client: str, reason: str, user: dict[str, Any] | None
) -> None:
    audit.append(
        conn,
        actor=Actor(type="user", id=user["id"] if user else None, name=email, account_id=None),
        account_id=user["account_id"] if user else None,
        action="operator.sign_in_failed",
        subject_type="operator",
        subject_id=user["id"] if user else None,
        details={"email": email, "client": client, "reason": reason},
    )


def _find_user(conn: Connection, email: str) -> dict[str, Any] | None:
    row = (
        conn.execute(
            select(operator_users, accounts_table.c.status.label("account_status"))
            .join(accounts_table, accounts_table.c.id == operator_users.c.account_id)
            .where(operator_users.c.email == email)
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


def sign_in(db: Database, *, email: str, password: str, client: str) -> SignedIn:
    """Check the password and open a session, or raise (the attempt is audited either way).

    Raises RateLimited (429, ``sign_in_rate_limited``) after too many attempts for this email
    from this client, AuthenticationFailed (401, ``invalid_credentials``) otherwise.
    """
    raw_email = (email or "").strip()[:320]
    try:
        email = normalize_address(raw_email)
    except AddressError:
        email = raw_email.lower()
    client = (client or "unknown")[:100]
    started = utcnow()
    with db.write() as conn:
        user = _find_user(conn, email)
        wait = _take_attempt(conn, _bucket_name(email, client), started.timestamp())
        if wait:
            _audit_failure(conn, email=email, client=client, reason="rate_limited", user=user)
    if wait:
        raise RateLimited(
            f"too many sign-in attempts for {email}; try again in {math.ceil(wait / 60)} min",
            retry_after=wait,
            code="sign_in_rate_limited",
        )
    password_ok = accounts.check_password(
        user["password_hash"] if user else _DUMMY_HASH, password or ""
    )
    usable = user is not None and not user["disabled"] and user["account_status"] != "deleted"
    with db.write() as conn:
        if user is None or not password_ok or not usable:
            reason = "unknown_email" if user is None else "wrong_password"
            if user is not None and password_ok:
                reason = "operator_disabled"
            _audit_failure(conn, email=email, client=client, reason=reason, user=user)
            failed = True
        else:
            signed = _open_session(conn, user, client, started)
            failed = False
    if failed:
        raise AuthenticationFailed(
            "that email and password do not match an operator", code="invalid_credentials"
        )
    return signed


def _open_session(conn: Connection, user: dict[str, Any], client: str, now: datetime) -> SignedIn:
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    expires = now + SESSION_LIFETIME
    conn.execute(
        delete(dashboard_sessions).where(
            dashboard_sessions.c.user_id == user["id"], dashboard_sessions.c.expires_at < now
        )
    )
    conn.execute(
        insert(dashboard_sessions).values(
            token_hash=_hash_token(token),
            user_id=user["id"],
            csrf_token=csrf,
            created_at=now,
            expires_at=expires,
        )
    )
    conn.execute(
        update(operator_users).where(operator_users.c.id == user["id"]).values(last_sign_in_at=now)
    )
    conn.execute(
        delete(rate_limit_buckets).where(
            rate_limit_buckets.c.bucket == _bucket_name(user["email"], client)
        )
    )
    session = OperatorSession(
        user_id=user["id"],
        account_id=user["account_id"],
        email=user["email"],
        name=user["name"],
        csrf_token=csrf,
        expires_at=expires,
    )
    audit.append(
        conn,
        actor=session.actor,
        action="operator.signed_in",
        subject_type="operator",
        subject_id=user["id"],
        details={"client": client, "session_expires_at": isoformat(expires)},
    )
    return SignedIn(token=token, session=session)


def session_for(db: Database, token: str | None) -> OperatorSession:
    """The live session behind a cookie value, or AuthenticationFailed."""
    if not token:
        raise AuthenticationFailed("sign in to use the dashboard", code="not_signed_in")
    query = (
        select(
            dashboard_sessions.c.csrf_token,
            dashboard_sessions.c.expires_at,
            operator_users.c.id,
            operator_users.c.account_id,
            operator_users.c.email,
            operator_users.c.name,
            operator_users.c.disabled,
            accounts_table.c.status,
        )
        .join(operator_users, operator_users.c.id == dashboard_sessions.c.user_id)
        .join(accounts_table, accounts_table.c.id == operator_users.c.account_id)
        .where(dashboard_sessions.c.token_hash == _hash_token(token))
    )
    with db.read() as conn:
        row = conn.execute(query).mappings().first()
    if row is None or aware(row["expires_at"]) <= utcnow():
        raise AuthenticationFailed("your session has ended; sign in again", code="session_expired")
    if row["disabled"] or row["status"] == "deleted":
        raise AuthenticationFailed("this operator can no longer sign in", code="operator_disabled")
    return OperatorSession(
        user_id=row["id"],
        account_id=row["account_id"],
        email=row["email"],
        name=row["name"],
        csrf_token=row["csrf_token"],
        expires_at=aware(row["expires_at"]),
    )


def check_csrf(session: OperatorSession, submitted: str | None) -> None:
    """Every state-changing form carries the session's token; anything else is refused."""
    if not submitted or not hmac.compare_digest(
        submitted.encode("utf-8"), session.csrf_token.encode("utf-8")
    ):
        raise Forbidden(
            "this form is missing its security token (CSRF); reload the page and try again",
            code="csrf_failed",
        )


def sign_out(db: Database, token: str | None) -> None:
    """End the session behind this cookie value (a no-op for an unknown one)."""
    if not token:
        return
    with db.write() as conn:
        row = (
            conn.execute(
                select(dashboard_sessions.c.user_id, operator_users.c.account_id)
                .join(operator_users, operator_users.c.id == dashboard_sessions.c.user_id)
                .where(dashboard_sessions.c.token_hash == _hash_token(token))
            )
            .mappings()
            .first()
        )
        if row is None:
            return
        conn.execute(
            delete(dashboard_sessions).where(dashboard_sessions.c.token_hash == _hash_token(token))
        )
        audit.append(
            conn,
            actor=Actor(type="user", id=row["user_id"], name=None, account_id=row["account_id"]),
            action="operator.signed_out",
            subject_type="operator",
            subject_id=row["user_id"],
        )


def create_operator(
    db: Database,
    *,
    account_id: str,
    email: str,
    name: str = "Operator",
    password: str | None = None,
    actor: Actor = SYSTEM,
) -> tuple[dict[str, Any], str]:
    """A new operator for an account (``multimail user create``); returns it and its password.

    Without ``password`` a random one is generated, to be shown once to whoever ran the command.
    """
    password = password or secrets.token_urlsafe(12)
    with db.write() as conn:
        accounts.get_account(conn, account_id)
        record = accounts.create_operator(
            conn, actor=actor, account_id=account_id, email=email, name=name, password=password
        )
    return record, password


# --- what the console reads that no other service lists ---------------------------------------


def delivery_attempts(conn: Connection, actor: Actor, message_id: str) -> list[dict[str, Any]]:
    """Each SMTP hand-off of one of the operator's messages, oldest first."""
    query = (
        select(attempts_table)
        .join(messages_table, messages_table.c.id == attempts_table.c.message_id)
        .where(
            messages_table.c.account_id == actor.account_id,
            attempts_table.c.message_id == message_id,
        )
        .order_by(attempts_table.c.id)
    )
    return [jsonable(dict(r)) for r in conn.execute(query).mappings()]


def captured_messages(
    conn: Connection, actor: Actor, *, limit: int = 100, cursor: str | None = None
) -> dict[str, Any]:
    """The sandbox: messages sent with test keys, captured instead of handed to SMTP."""
    query = select(messages_table).where(
        messages_table.c.account_id == actor.account_id, messages_table.c.test.is_(True)
    )
    cursor = id_cursor(cursor, "msg")
    if cursor:
        query = query.where(messages_table.c.id < cursor)
    rows: list[Mapping[str, Any]] = [
        dict(r)
        for r in conn.execute(query.order_by(messages_table.c.id.desc()).limit(limit + 1))
        .mappings()
        .all()
    ]
    page = rows[:limit]
    return {
        "messages": message_views.views(conn, page),
        "next_cursor": page[-1]["id"] if len(rows) > limit and page else None,
    }
