"""Operator approval codes: the trust ladder, the two-step admin actions, the allowlist.

Loosening needs the human operator. An API key asking for something loose gets
``202 approval_required`` and a one-time code goes to the account's ``oversight_email``;
the same call repeated with that code completes it. A code is 8 characters, stored only as
its SHA-256, bound to a purpose and to the exact request it was issued for, valid for one
hour, used once, and dead after five wrong guesses. Operators (dashboard, CLI) act
directly. Tightening never waits.

A wrong code is recorded (its attempt counted) in a transaction that commits before the
error is raised; a right code is spent in the same transaction as the action it approves,
so an action that fails leaves its code unused. Guesses at the same codes take turns (the
candidate codes are locked while one is judged), so guesses made at once count as they
would one after another: never a sixth chance.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from multimail.domain.addresses import AddressError, normalize_address, normalize_domain
from multimail.domain.oversight import OversightMode, is_loosening, parse_mode
from multimail.domain.scopes import Scope
from multimail.errors import ApprovalRequired, Conflict, Forbidden, InvalidInput, NotFound
from multimail.ids import aware, isoformat, new_id, utcnow
from multimail.services import accounts, audit, keys, mailboxes, notify
from multimail.services.context import Actor, Services
from multimail.store.tables import accounts as account_table
from multimail.store.tables import approval_codes, mailbox_allowlist
from multimail.store.tables import mailboxes as mailbox_table

T = TypeVar("T")

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud, typed by hand
CODE_LENGTH = 8
CODE_TTL = timedelta(hours=1)
MAX_ATTEMPTS = 5
MODE_UPGRADE = "mode_upgrade"

PURPOSES = {
    MODE_UPGRADE: "change a mailbox's oversight mode",
    "mailbox_create": "create a mailbox",
    "api_key_create": "create an API key",
    "api_key_revoke": "revoke an API key",
    "webhook_create": "create a webhook",
    "mailbox_copies": "change a mailbox's auto_cc / auto_bcc",
    "mailbox_settings": "change mailbox settings that loosen its oversight",
    "oversight_email": "change the account's oversight email",
    "account_settings": "change account settings that loosen its oversight",
    "allowlist_add": "add a recipient to a mailbox's allowlist",
    "account_delete": "delete the whole account",
}


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode("ascii", "replace")).hexdigest()


def _normalise_code(code: str) -> str:
    return "".join(c for c in code.upper() if c.isalnum())


def _canonical(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


# --- issuing and checking codes --------------------------------------------------------------


def issue_code(
    conn: Connection,
    services: Services,
    actor: Actor,
    *,
    purpose: str,
    subject_id: str | None,
    params: Mapping[str, Any],
    summary: str,
) -> dict[str, Any]:
    """Store a new code (hashed) and mail it to the operator; returns the 202 body."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown approval purpose {purpose!r}")
    account_id = str(actor.account_id)
    to = notify.oversight_address(conn, account_id)
    if not to:
        raise Conflict(
            "this needs the operator's approval, but the account has no oversight_email to "
            "send the code to; an operator must set it first",
            code="no_oversight_email",
        )
    code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    now = utcnow()
    expires = now + CODE_TTL
    conn.execute(
        insert(approval_codes).values(
            id=new_id("apc"),
            account_id=account_id,
            purpose=purpose,
            subject_id=subject_id,
            code_hash=_hash(code),
            params=json.loads(_canonical(params)),
            attempts=0,
            expires_at=expires,
            used_at=None,
            created_at=now,
        )
    )
    markdown = "\n".join(
        [
            f"**{actor.label}** asks to {PURPOSES[purpose]}:",
            "",
            notify.fenced(summary),
            "",
            f"If you agree, give them this one-time approval code: **{code}**",
            "",
            f"It works once, for this exact request, until {isoformat(expires)}. "
            "If you did not expect this request, do nothing: without the code nothing changes.",
        ]
    )
    notify.enqueue_operator_mail(
        conn,
        services,
        account_id,
        f"[MultiMail] Approval code: {PURPOSES[purpose]}",
        markdown,
        "approval_code",
    )
    audit.append(
        conn,
        actor=actor,
        action="approval_code.issued",
        subject_type="approval_code",
        subject_id=subject_id,
        details={"purpose": purpose, "params": json.loads(_canonical(params))},
    )
    return {
        "status": "approval_required",
        "purpose": purpose,
        "sent_to": notify.mask_address(to),
        "expires_at": isoformat(expires),
    }


@dataclass(frozen=True)
class _Check:
    row: dict[str, Any] | None
    problem: str | None


def _check(
    conn: Connection,
    actor: Actor,
    *,
    purpose: str,
    subject_id: str | None,
    params: Mapping[str, Any] | None,
    code: str,
    now: datetime,
) -> _Check:
    query = select(approval_codes).where(
        approval_codes.c.account_id == actor.account_id, approval_codes.c.purpose == purpose
    )
    if subject_id is not None:
        query = query.where(approval_codes.c.subject_id == subject_id)
    # Locked (PostgreSQL; SQLite's write transaction already runs alone): a guess judged on
    # attempts another guess is about to raise could spend a code past its fifth wrong guess.
    query = query.order_by(approval_codes.c.id.desc()).limit(50).with_for_update()
    rows = conn.execute(query).mappings().all()
    offered = _hash(_normalise_code(code))
    match = None
    for row in rows:
        # Every candidate is compared, in constant time, whether or not one matched already.
        if hmac.compare_digest(row["code_hash"], offered) and match is None:
            match = dict(row)
    open_ids = [r["id"] for r in rows if r["used_at"] is None and aware(r["expires_at"]) > now]
    problem = None
    if match is None:
        problem = "that approval code is not valid"
    elif match["used_at"] is not None:
        problem = "that approval code was already used"
    elif aware(match["expires_at"]) <= now:
        problem = "that approval code has expired; ask for a new one"
    elif match["attempts"] >= MAX_ATTEMPTS:
        problem = "too many wrong codes were tried; ask for a new one"
    elif params is not None and _canonical(match["params"] or {}) != _canonical(params):
        problem = "that approval code was issued for a different request"
    if problem is not None:
        if open_ids:
            conn.execute(
                update(approval_codes)
                .where(approval_codes.c.id.in_(open_ids))
                .values(attempts=approval_codes.c.attempts + 1)
            )
        return _Check(None, problem)
    assert match is not None
    spent = conn.execute(
        update(approval_codes)
        .where(approval_codes.c.id == match["id"], approval_codes.c.used_at.is_(None))
        .values(used_at=now)
    )
    if spent.rowcount != 1:
        return _Check(None, "that approval code was already used")
    return _Check(match, None)


def _refuse(problem: str) -> Forbidden:
    return Forbidden(problem, code="invalid_approval_code")


@dataclass(frozen=True)
class Gate:
    """What an API key needs the operator's code for: one purpose, bound to ``params`` (the
    whole set of gated changes in the request), shown to the operator as ``summary``."""

    purpose: str
    params: Mapping[str, Any]
    summary: str
    subject_id: str | None = None


def with_operator_gate(
    services: Services,
    actor: Actor,
    *,
    code: str | None,
    gate: Callable[[Connection], Gate | None],
    action: Callable[[Connection], T],
) -> T:
    """Run ``action`` in one transaction if what ``gate`` asks for was approved.

    ``gate`` runs first in that same transaction (so it can lock and read what it judges) and
    answers what needs the operator, or ``None`` when nothing does. Operators act directly. An
    API key without a code gets :class:`ApprovalRequired` (202) after a code was mailed; with a
    valid code for exactly the gate's purpose, subject and params the code is spent in the
    action's own transaction; a wrong code is counted and refused (403).
    """
    with services.db.write() as conn:
        needed = None if actor.is_operator else gate(conn)
        if needed is None:
            return action(conn)
        if not code:
            body = issue_code(
                conn,
                services,
                actor,
                purpose=needed.purpose,
                subject_id=needed.subject_id,
                params=needed.params,
                summary=needed.summary,
            )
            problem = None
        else:
            checked = _check(
                conn,
                actor,
                purpose=needed.purpose,
                subject_id=needed.subject_id,
                params=needed.params,
                code=code,
                now=utcnow(),
            )
            if checked.problem is None:
                audit.append(
                    conn,
                    actor=actor,
                    action="approval_code.used",
                    subject_type="approval_code",
                    subject_id=needed.subject_id,
                    details={"purpose": needed.purpose, "approved_by": "operator code"},
                )
                return action(conn)
            problem = checked.problem
    # Committed: the mailed code, or the wrong guess counted.
    if problem is not None:
        raise _refuse(problem)
    raise ApprovalRequired(
        f"this needs the operator's approval: a one-time code was sent to "
        f'{body["sent_to"]}; repeat the same request with "approval_code" set to it',
        **body,
    )


def with_operator_approval(
    services: Services,
    actor: Actor,
    *,
    purpose: str,
    params: Mapping[str, Any],
    code: str | None,
    summary: str,
    action: Callable[[Connection], T],
    subject_id: str | None = None,
) -> T:
    """Run ``action`` if the operator approved it: an action that always needs the code
    (see :func:`with_operator_gate`)."""
    needed = Gate(purpose, params, summary, subject_id)
    return with_operator_gate(services, actor, code=code, gate=lambda conn: needed, action=action)


# --- the trust ladder ------------------------------------------------------------------------


def _target_mode(value: str | None) -> OversightMode:
    try:
        return parse_mode(str(value or ""))
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid_oversight_mode") from None


def request_upgrade(
    services: Services, actor: Actor, mailbox_ref: str, target_mode: str | None
) -> dict[str, Any]:
    """Ask the operator to loosen a mailbox's mode: mails a code, answers 202."""
    actor.require(Scope.READ)
    target = _target_mode(target_mode)
    with services.db.write() as conn:
        box = mailboxes.resolve(conn, actor, mailbox_ref)
        body = request_upgrade_in(conn, services, actor, box, target)
    return body


def request_upgrade_in(
    conn: Connection,
    services: Services,
    actor: Actor,
    box: Mapping[str, Any],
    target: OversightMode,
) -> dict[str, Any]:
    """The upgrade request inside the caller's transaction (mailbox creation uses it too)."""
    current = OversightMode(box["oversight_mode"])
    if not is_loosening(current, target):
        raise InvalidInput(
            f"{target.value} is not looser than the current {current.value}; tightening "
            f"needs no code: PATCH /v1/mailboxes/{box['id']} with the new oversight_mode",
            code="not_an_upgrade",
        )
    body = issue_code(
        conn,
        services,
        actor,
        purpose=MODE_UPGRADE,
        subject_id=box["id"],
        # The mode it starts from too: the operator approves this step, not any way back to
        # the target after a tightening they make meanwhile.
        params={"target_mode": target.value, "from_mode": current.value},
        summary=f"mailbox {box['address']}: oversight mode {current.value} -> {target.value}",
    )
    audit.append(
        conn,
        actor=actor,
        action="mailbox.upgrade_requested",
        subject_type="mailbox",
        subject_id=box["id"],
        mailbox_id=box["id"],
        oversight_mode=current.value,
        details={"from": current.value, "to": target.value},
    )
    return {
        **body,
        "code": "approval_required",
        "mailbox_id": box["id"],
        "current_mode": current.value,
        "target_mode": target.value,
        "message": (
            f"a one-time code was sent to {body['sent_to']}; call "
            f"POST /v1/mailboxes/{box['id']}/upgrade with it to apply {target.value}"
        ),
    }


def apply_upgrade(
    services: Services, actor: Actor, mailbox_ref: str, code: str | None
) -> dict[str, Any]:
    """Apply the mode a valid upgrade code was issued for."""
    actor.require(Scope.READ)
    if not code:
        raise InvalidInput("give the approval 'code' the operator received", code="missing_code")
    with services.db.write() as conn:
        box = mailboxes.resolve(conn, actor, mailbox_ref, for_update=True)
        checked = _check(
            conn,
            actor,
            purpose=MODE_UPGRADE,
            subject_id=box["id"],
            params=None,
            code=code,
            now=utcnow(),
        )
        if checked.row is not None:
            target = OversightMode(checked.row["params"]["target_mode"])
            start = checked.row["params"].get("from_mode")  # absent in codes issued before
            if start is not None and start != box["oversight_mode"]:
                # Raising rolls the code's use back: it stays unspent, and useless unless the
                # mailbox is back in the mode the operator approved leaving.
                raise Forbidden(
                    f"this code approved leaving {start}, but the mailbox is now "
                    f"{box['oversight_mode']}: request a new upgrade",
                    code="mode_changed_since_request",
                )
            now = utcnow()
            conn.execute(
                update(mailbox_table)
                .where(mailbox_table.c.id == box["id"])
                .values(oversight_mode=target.value, updated_at=now)
            )
            audit.append(
                conn,
                actor=actor,
                action="mailbox.mode_changed",
                subject_type="mailbox",
                subject_id=box["id"],
                mailbox_id=box["id"],
                oversight_mode=target.value,
                details={
                    "changes": {"oversight_mode": {"from": box["oversight_mode"], "to": target}},
                    "approved_by": "operator code",
                },
            )
            fresh = conn.execute(select(mailbox_table).where(mailbox_table.c.id == box["id"]))
            return mailboxes.mailbox_view(fresh.mappings().one())
    raise _refuse(str(checked.problem))


# --- two-step admin actions ------------------------------------------------------------------


def create_mailbox(
    services: Services, actor: Actor, fields: dict[str, Any], approval_code: str | None
) -> dict[str, Any]:
    """Create a mailbox; an API key needs the operator's code. A looser mode than
    ``gated_send`` is clamped and becomes an upgrade request."""
    actor.require(Scope.ADMIN)
    params = {k: v for k, v in fields.items() if v is not None}
    address = params.get("address") or params.get("address_local_part") or "?"
    needed = Gate(
        "mailbox_create", params, f"create mailbox {address} with {_canonical(params)}", None
    )

    def gate(conn: Connection) -> Gate:
        # Before the code's audit entry (mailboxes.lock_addresses): an address that cannot be
        # had (invalid, a domain not owned, an oversight_email) is refused before a code is
        # mailed for it.
        mailboxes.claim_address(
            conn,
            services.settings,
            str(actor.account_id),
            fields.get("address"),
            fields.get("address_local_part"),
        )
        return needed

    def create(conn: Connection) -> dict[str, Any]:
        args = dict(fields)
        view = mailboxes.create_mailbox(
            conn,
            actor=actor,
            settings=services.settings,
            address=args.pop("address", None),
            address_local_part=args.pop("address_local_part", None),
            **args,
        )
        if view.get("upgrade_required"):
            box = conn.execute(select(mailbox_table).where(mailbox_table.c.id == view["id"]))
            view["upgrade"] = request_upgrade_in(
                conn,
                services,
                actor,
                dict(box.mappings().one()),
                OversightMode(view["requested_oversight_mode"]),
            )
        return view

    return with_operator_gate(services, actor, code=approval_code, gate=gate, action=create)


def _shown(field: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "no limit" if field.startswith(("send_cap_", "daily_send_quota")) else "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _changes_summary(title: str, gated: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [title]
    lines += [
        f"  {field}: {_shown(field, c['from'])} -> {_shown(field, c['to'])}"
        for field, c in gated.items()
    ]
    return "\n".join(lines)


COPIES = frozenset({"auto_cc", "auto_bcc"})


def update_mailbox(
    services: Services,
    actor: Actor,
    mailbox_ref: str,
    changes: dict[str, Any],
    approval_code: str | None,
) -> dict[str, Any]:
    """Mailbox settings. For an API key, the changes that loosen the operator's hold (see
    :func:`mailboxes.loosening_changes`: auto_cc / auto_bcc, a new webhook_url, a raised or
    removed send cap, ai_disclosure turned off) need the operator's code, one code for all of
    them together; the rest, tightening included, applies at once. Judged on the locked row,
    in the update's own transaction."""
    actor.require(Scope.ADMIN)

    def gate(conn: Connection) -> Gate | None:
        box = mailboxes.resolve(conn, actor, mailbox_ref, for_update=True)
        gated = mailboxes.loosening_changes(box, changes, actor, settings=services.settings)
        if not gated:
            return None
        # The code is bound to what the caller asked for, as asked (the operator sees it).
        params = {k: changes[k] for k in gated}
        summary = _changes_summary(f"mailbox {box['address']}:", gated)
        # Copies alone keep the purpose and params codes were issued with before the other
        # fields were gated, so such a code still approves exactly the change it named.
        purpose = "mailbox_copies" if set(gated) <= COPIES else "mailbox_settings"
        return Gate(purpose, params, summary, box["id"])

    return with_operator_gate(
        services,
        actor,
        code=approval_code,
        gate=gate,
        action=lambda conn: mailboxes.update_mailbox(
            conn, actor=actor, ref=mailbox_ref, changes=changes, settings=services.settings
        ),
    )


def guard_oversight_email(
    services: Services,
    actor: Actor,
    changes: Mapping[str, Any],
    approval_code: str | None,
    action: Callable[[Connection], T],
) -> T:
    """PATCH /v1/account by an API key: changing where codes go needs a code sent to where
    they go now, and raising or removing the daily send quota needs the operator too
    (lowering it, or setting one where there was none, applies at once). Both in one request
    need one code for both. A new oversight_email is validated (and locked against mailbox
    creation, see :func:`accounts.check_oversight_email`) before any code is mailed."""

    def gate(conn: Connection) -> Gate | None:
        gated: dict[str, dict[str, Any]] = {}
        if "oversight_email" in changes:
            accounts.check_oversight_email(conn, changes["oversight_email"])
        query = select(account_table).where(account_table.c.id == actor.account_id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        account = conn.execute(query).mappings().first()
        current = dict(account) if account is not None else {}
        if "oversight_email" in changes:
            gated["oversight_email"] = {
                "from": current.get("oversight_email"),
                "to": changes["oversight_email"],
            }
        if "daily_send_quota" in changes:
            quota = changes["daily_send_quota"]
            if quota is not None and (
                not isinstance(quota, int) or isinstance(quota, bool) or quota < 0
            ):
                raise InvalidInput(
                    "daily_send_quota must be a non-negative whole number or null",
                    code="invalid_field",
                    field="daily_send_quota",
                )
            if mailboxes.cap_loosened(current.get("daily_send_quota"), quota):
                gated["daily_send_quota"] = {"from": current.get("daily_send_quota"), "to": quota}
        if not gated:
            return None
        if set(gated) == {"oversight_email"}:
            # As before the quota was gated: codes issued then still fit this change.
            return Gate(
                "oversight_email",
                {"oversight_email": changes["oversight_email"]},
                f"oversight_email -> {changes['oversight_email']}",
                actor.account_id,
            )
        return Gate(
            "account_settings",
            {k: changes[k] for k in gated},
            _changes_summary("the account:", gated),
            actor.account_id,
        )

    return with_operator_gate(services, actor, code=approval_code, gate=gate, action=action)


def delete_account(services: Services, actor: Actor, approval_code: str | None) -> dict[str, Any]:
    """DELETE /v1/account: the operator (their own admin key, the dashboard, the CLI) deletes
    at once; any other admin key needs the operator's one-time code, as creating a key does.
    Deleting is the most sensitive admin action: it stops every key and locks the operator
    out of the dashboard, so an agent's admin key must never do it alone."""
    actor.require(Scope.ADMIN)
    account_id = str(actor.account_id)
    return with_operator_approval(
        services,
        actor,
        purpose="account_delete",
        params={"account_id": account_id},
        code=approval_code,
        summary=(
            f"delete account {account_id}: every API key stops working, nothing more is "
            "sent or delivered, and operators can no longer sign in"
        ),
        action=lambda conn: accounts.deactivate_account(conn, actor=actor, account_id=account_id),
        subject_id=account_id,
    )


# --- the recipient allowlist -----------------------------------------------------------------


def _pattern(value: str) -> str:
    text = (value or "").strip()
    try:
        if text.startswith("*@"):
            return "*@" + normalize_domain(text[2:])
        return normalize_address(text)
    except AddressError as exc:
        raise InvalidInput(
            f"an allowlist entry is an address or *@domain: {exc}", code="invalid_pattern"
        ) from None


def _entry_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "mailbox_id": row["mailbox_id"],
        "pattern": row["pattern"],
        "added_by": row["added_by"],
        "created_at": isoformat(row["created_at"]),
    }


def list_allowlist(services: Services, actor: Actor, mailbox_ref: str) -> dict[str, Any]:
    actor.require(Scope.READ)
    with services.db.read() as conn:
        box = mailboxes.resolve(conn, actor, mailbox_ref)
        rows = conn.execute(
            select(mailbox_allowlist)
            .where(mailbox_allowlist.c.mailbox_id == box["id"])
            .order_by(mailbox_allowlist.c.pattern)
        ).mappings()
        return {"mailbox_id": box["id"], "allowlist": [_entry_view(dict(r)) for r in rows]}


def add_allowlist(
    services: Services, actor: Actor, mailbox_ref: str, pattern: str, approval_code: str | None
) -> dict[str, Any]:
    """Allowlisted recipients skip the gate, so adding one is a loosening: operator only."""
    actor.require(Scope.ADMIN)
    clean = _pattern(pattern)
    with services.db.read() as conn:
        box = mailboxes.resolve(conn, actor, mailbox_ref)

    def add(conn: Connection) -> dict[str, Any]:
        record = {
            "id": new_id("alw"),
            "mailbox_id": box["id"],
            "pattern": clean,
            "added_by": actor.label,
            "created_at": utcnow(),
        }
        try:
            with conn.begin_nested():
                conn.execute(insert(mailbox_allowlist).values(**record))
        except IntegrityError:
            raise Conflict(f"{clean} is already on the allowlist", code="already_allowed") from None
        audit.append(
            conn,
            actor=actor,
            action="allowlist.added",
            subject_type="mailbox",
            subject_id=box["id"],
            mailbox_id=box["id"],
            oversight_mode=box["oversight_mode"],
            details={"pattern": clean},
        )
        return _entry_view(record)

    return with_operator_approval(
        services,
        actor,
        purpose="allowlist_add",
        subject_id=box["id"],
        params={"pattern": clean},
        code=approval_code,
        summary=f"mailbox {box['address']}: let mail to {clean} skip approval",
        action=add,
    )


def remove_allowlist(
    services: Services, actor: Actor, mailbox_ref: str, entry: str
) -> dict[str, Any]:
    """Removing tightens the gate, so it is immediate. ``entry`` is an id or the pattern."""
    actor.require(Scope.ADMIN)
    with services.db.write() as conn:
        box = mailboxes.resolve(conn, actor, mailbox_ref)
        where = mailbox_allowlist.c.mailbox_id == box["id"]
        if entry.startswith("alw_"):
            match = mailbox_allowlist.c.id == entry
        else:
            match = mailbox_allowlist.c.pattern == _pattern(entry)
        found = conn.execute(select(mailbox_allowlist).where(where, match)).mappings().first()
        if found is None:
            raise NotFound(f"{entry} is not on this mailbox's allowlist", code="not_allowlisted")
        row = dict(found)
        conn.execute(delete(mailbox_allowlist).where(mailbox_allowlist.c.id == row["id"]))
        audit.append(
            conn,
            actor=actor,
            action="allowlist.removed",
            subject_type="mailbox",
            subject_id=box["id"],
            mailbox_id=box["id"],
            oversight_mode=box["oversight_mode"],
            details={"pattern": row["pattern"]},
        )
    return {**_entry_view(row), "removed": True}


def revoke_api_key(
    services: Services, actor: Actor, key_id: str, approval_code: str | None
) -> dict[str, Any]:
    """Revoke a key of the actor's account.

    A key may revoke itself and the keys it created at once; any other key (the operator's
    own among them) only with the operator's code, else an agent's admin key could lock the
    operator out. Operators act directly; revoking a key already revoked changes nothing and
    needs nothing."""
    actor.require(Scope.ADMIN)
    account_id = str(actor.account_id)

    def gate(conn: Connection) -> Gate | None:
        row = keys.key_row(conn, account_id, key_id)
        if row["revoked_at"] is not None or keys.revocable_without_code(conn, actor, row):
            return None
        whose = "; it is the operator's own admin key" if row["operator_credential"] else ""
        return Gate(
            "api_key_revoke",
            {"key_id": row["id"]},
            f"revoke API key {row['name']} ({row['prefix']}…, {row['id']}, scopes "
            f"{', '.join(sorted(row['scopes'] or [])) or 'none'}){whose}",
            subject_id=row["id"],
        )

    return with_operator_gate(
        services,
        actor,
        code=approval_code,
        gate=gate,
        action=lambda conn: keys.revoke_key(
            conn, actor=actor, account_id=account_id, key_id=key_id
        ),
    )


def create_api_key(
    services: Services, actor: Actor, fields: dict[str, Any], approval_code: str | None
) -> dict[str, Any]:
    """A new API key (shown once); an API key asking for one needs the operator's code."""
    actor.require(Scope.ADMIN)
    params = {k: v for k, v in fields.items() if v is not None}

    def create(conn: Connection) -> dict[str, Any]:
        boxes = fields.get("mailbox_ids")
        if boxes:
            boxes = [mailboxes.resolve(conn, actor, ref)["id"] for ref in boxes]
        created = keys.create_key(
            conn,
            actor=actor,
            account_id=str(actor.account_id),
            name=fields.get("name") or "",
            scopes=fields.get("scopes") or [],
            mode=fields.get("mode") or "live",
            mailbox_ids=boxes,
            send_cap_hour=fields.get("send_cap_hour"),
            send_cap_day=fields.get("send_cap_day"),
        )
        return created.record | {
            "key": created.raw_key,
            "api_key": created.raw_key,
            "warning": "store this key now: it is shown only once",
        }

    return with_operator_approval(
        services,
        actor,
        purpose="api_key_create",
        params=params,
        code=approval_code,
        summary=f"create API key {_canonical(params)}",
        action=create,
    )
