"""Mailboxes: an address an agent owns, with its oversight settings.

Anywhere a mailbox is named, its id (``mbx_…``) or its address works. Another account's
mailbox is "not found", never "forbidden": existence is not leaked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from multimail.config import Settings
from multimail.domain.addresses import AddressError, domain_of, normalize_address
from multimail.domain.headertext import HeaderTextError, has_line_break
from multimail.domain.netguard import check_webhook_url
from multimail.domain.oversight import (
    DEFAULT_MODE,
    GateTiming,
    OversightMode,
    is_loosening,
    parse_mode,
    stricter,
)
from multimail.errors import Conflict, Forbidden, InvalidInput, NotFound
from multimail.ids import new_id, utcnow
from multimail.mail.compose import plain_address
from multimail.services import audit, events
from multimail.services.common import jsonable
from multimail.services.context import Actor
from multimail.store.tables import accounts, domains, mailboxes

SETTABLE = {
    "display_name",
    "oversight_mode",
    "gate_timing",
    "signature",
    "auto_cc",
    "auto_bcc",
    "webhook_url",
    "ai_disclosure",
    "approval_timeout_seconds",
    "approval_expiry_seconds",
    "send_cap_hour",
    "send_cap_day",
    "metadata",
}


def mailbox_view(row: Any) -> dict[str, Any]:
    data = jsonable(row)
    data["mailbox_id"] = data["id"]
    data.pop("deleted_at", None)
    data.pop("account_id", None)
    return data


def resolve(
    conn: Connection, actor: Actor, ref: str, *, for_update: bool = False
) -> dict[str, Any]:
    """The caller's mailbox named by id or address; NotFound for anything else."""
    if not ref:
        raise NotFound("mailbox not found", code="mailbox_not_found")
    query = select(mailboxes).where(
        mailboxes.c.account_id == actor.account_id, mailboxes.c.deleted_at.is_(None)
    )
    if ref.startswith("mbx_"):
        query = query.where(mailboxes.c.id == ref)
    else:
        try:
            query = query.where(mailboxes.c.address == normalize_address(ref))
        except AddressError:
            raise NotFound(f"mailbox {ref!r} not found", code="mailbox_not_found") from None
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).mappings().first()
    if row is None or (actor.mailbox_ids is not None and row["id"] not in actor.mailbox_ids):
        raise NotFound(f"mailbox {ref!r} not found", code="mailbox_not_found")
    return dict(row)


def setting_address(value: Any, field: str) -> str:
    """An address saved in a setting (``auto_cc`` / ``auto_bcc``, ``oversight_email``), checked
    as a recipient of a send is (:func:`compose.plain_address`), now and not at every later
    send."""
    return plain_address(value, field)


# Mailbox addresses and accounts' oversight_email must never meet (see refuse_oversight_address
# and accounts.check_oversight_email). On PostgreSQL both sides take this transaction-level
# advisory lock before they look, so a mailbox created and an oversight_email set at the same
# moment cannot both pass. Take it before the transaction's first audit append: audit takes its
# own lock then and holds it to commit, so the other order could deadlock.
_ADDRESS_LOCK = 7_240_003


def lock_addresses(conn: Connection) -> None:
    """Serialise mailbox creation against oversight_email changes (PostgreSQL; SQLite's single
    writer already does)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADDRESS_LOCK})


def hosted_here(conn: Connection, address: str) -> bool:
    """Whether ``address`` (normalised) is a live mailbox on this server, in any account."""
    query = select(mailboxes.c.id).where(
        mailboxes.c.address == address, mailboxes.c.deleted_at.is_(None)
    )
    return conn.execute(query.limit(1)).first() is not None


def refuse_oversight_address(conn: Connection, address: str) -> None:
    """A new mailbox may not take an address that is some account's oversight_email: whoever
    holds a key to that mailbox would read the approval-request mails (one-click Approve
    links) and the approval codes meant for the operator. 409 ``address_is_oversight_email``:
    the address is well formed, it conflicts with how it is already used; the account(s) it
    belongs to are not named. Caller holds :func:`lock_addresses`."""
    query = select(accounts.c.id).where(func.lower(accounts.c.oversight_email) == address)
    if conn.execute(query.limit(1)).first() is not None:
        raise Conflict(
            f"{address} cannot be a mailbox: it is where an operator receives approval "
            "requests and approval codes (an account's oversight_email), and a mailbox's "
            "agents could read them and approve their own requests; pick another address",
            code="address_is_oversight_email",
        )


def _address_list(values: Any, field: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [v for v in (p.strip() for p in values.split(",")) if v]
    if not isinstance(values, list):
        raise InvalidInput(f"{field} must be a list of addresses", code="invalid_field")
    return [setting_address(value, field) for value in values]


def _webhook_url(value: Any, settings: Settings | None) -> str:
    """A mailbox's webhook_url, checked as ``POST /v1/webhooks`` checks its URL (same function,
    same settings, same codes): the URL is an implicit subscription to all the mailbox's
    events, so it must not be a way around the https and SSRF rules (SPEC §6)."""
    if settings is None:
        # Fail closed and loudly: which targets are allowed is the operator's setting, and a
        # caller that cannot say what it is must not save a URL unchecked.
        raise TypeError("setting a mailbox's webhook_url needs the server settings to check it")
    if not isinstance(value, str):
        raise InvalidInput(
            "webhook_url must be an https:// URL or null",
            code="webhook_url_invalid",
            field="webhook_url",
        )
    try:
        check_webhook_url(
            value,
            allow_http=settings.allow_http_webhooks,
            allow_private=settings.allow_private_webhooks,
        )
    except InvalidInput as exc:
        raise InvalidInput(
            f"webhook_url refused: {exc.message}; give a public https:// URL with no user name "
            "or password in it (http and private or loopback targets only where the operator "
            "allows them), or null for none",
            code=exc.code,
            field="webhook_url",
            **exc.context,
        ) from None
    return value


def _validate_settings(values: dict[str, Any], settings: Settings | None) -> dict[str, Any]:
    clean = dict(values)
    if "oversight_mode" in clean and clean["oversight_mode"] is not None:
        try:
            clean["oversight_mode"] = parse_mode(str(clean["oversight_mode"])).value
        except ValueError as exc:
            raise InvalidInput(str(exc), code="invalid_oversight_mode") from None
    if "gate_timing" in clean and clean["gate_timing"] is not None:
        try:
            clean["gate_timing"] = GateTiming(clean["gate_timing"]).value
        except ValueError:
            raise InvalidInput(
                "gate_timing must be 'gate_first' or 'schedule_first'", code="invalid_gate_timing"
            ) from None
    for field in ("auto_cc", "auto_bcc"):
        if field in clean:
            clean[field] = _address_list(clean[field], field)
    if "ai_disclosure" in clean and not isinstance(clean["ai_disclosure"], bool):
        raise InvalidInput(
            "ai_disclosure must be true or false", code="invalid_field", field="ai_disclosure"
        )
    if clean.get("display_name") is not None:
        clean["display_name"] = _display_name(clean["display_name"])
    if clean.get("signature") is not None and not isinstance(clean["signature"], str):
        raise InvalidInput(
            "signature must be text or null", code="invalid_field", field="signature"
        )
    for field in ("approval_timeout_seconds", "approval_expiry_seconds"):
        if field in clean and (not isinstance(clean[field], int) or clean[field] < 60):
            raise InvalidInput(
                f"{field} must be a whole number of seconds, at least 60", code="invalid_field"
            )
    for field in ("send_cap_hour", "send_cap_day"):
        if clean.get(field) is not None and (not isinstance(clean[field], int) or clean[field] < 0):
            raise InvalidInput(
                f"{field} must be a non-negative whole number or null", code="invalid_field"
            )
    if clean.get("webhook_url") is not None:
        clean["webhook_url"] = _webhook_url(clean["webhook_url"], settings)
    return clean


def _display_name(value: Any) -> str:
    """The From name as the composer will take it: one line (no break of any kind, itself or
    in an encoded-word: the composer refuses those, so every send would fail), <= 200 chars."""
    if not isinstance(value, str) or len(value) > 200:
        raise InvalidInput(
            "display_name must be one line of text of at most 200 characters",
            code="invalid_field",
            field="display_name",
        )
    try:
        broken = has_line_break(value)
    except HeaderTextError:
        broken = True
    if broken:
        raise InvalidInput(
            "display_name must be one line: it may not hold a line break (CR, LF, VT, FF, "
            "NEL, U+2028, U+2029, NUL or a file/group/record separator), written out or "
            "inside an =?...?= encoded-word",
            code="invalid_field",
            field="display_name",
        )
    return value


def _check_domain(
    conn: Connection, settings: Settings, account_id: str, address: str
) -> str | None:
    """The domain row the address lives on; the server's own domain needs none."""
    domain = domain_of(address)
    if domain == settings.domain.lower():
        return None
    row = conn.execute(
        select(domains.c.id, domains.c.status).where(
            domains.c.account_id == account_id, domains.c.name == domain
        )
    ).first()
    if row is None:
        raise InvalidInput(
            f"this account does not own the domain {domain!r}: add it with POST /v1/domains "
            f"first, or use an address on {settings.domain!r}",
            code="domain_not_owned",
        )
    if row.status != "verified" and verified_elsewhere(conn, account_id, domain):
        # A pending claim is only a claim: once another account proved the domain in DNS,
        # an address here would take its mail (inbound routes by address).
        raise InvalidInput(
            f"this account has not verified {domain!r} and another account has: publish the "
            "records and verify it, or use another domain",
            code="domain_not_owned",
        )
    return str(row.id)


def verified_elsewhere(conn: Connection, account_id: str, domain: str) -> bool:
    """Whether an account other than ``account_id`` has verified ``domain``."""
    return (
        conn.execute(
            select(domains.c.id).where(
                domains.c.name == domain,
                domains.c.status == "verified",
                domains.c.account_id != account_id,
            )
        ).first()
        is not None
    )


def retire_squatters(conn: Connection, domain_row: Mapping[str, Any]) -> list[str]:
    """Delete other accounts' mailboxes on ``domain_row``'s name, now that its account has
    verified it: they were made on a pending claim the other account never proved, and their
    addresses belong to the domain's owner (they can neither send nor, kept, be re-created
    by the owner). Each deletion is audited in that mailbox's own account."""
    squatting = conn.execute(
        select(mailboxes)
        .join(domains, domains.c.id == mailboxes.c.domain_id)
        .where(
            domains.c.name == domain_row["name"],
            domains.c.account_id != domain_row["account_id"],
            mailboxes.c.deleted_at.is_(None),
        )
        .order_by(mailboxes.c.id)
    ).mappings()
    retired: list[str] = []
    for box in list(squatting):
        system = Actor(type="system", id="domains", name="domains", account_id=box["account_id"])
        now = utcnow()
        conn.execute(
            update(mailboxes)
            .where(mailboxes.c.id == box["id"])
            .values(deleted_at=now, updated_at=now)
        )
        audit.append(
            conn,
            actor=system,
            action="mailbox.deleted",
            subject_type="mailbox",
            subject_id=box["id"],
            mailbox_id=box["id"],
            oversight_mode=box["oversight_mode"],
            details={
                "address": box["address"],
                "reason": "another account verified the domain this mailbox was on",
            },
        )
        events.sync_mailbox_subscription(conn, box["id"], actor=system)
        retired.append(str(box["id"]))
    return retired


def claim_address(
    conn: Connection,
    settings: Settings,
    account_id: str,
    address: str | None,
    address_local_part: str | None,
) -> tuple[str, str | None]:
    """The address a new mailbox asks for, normalised, and its domain row: 422 when it is
    missing or invalid or the account does not own its domain, 409 when it is an account's
    oversight_email. Takes :func:`lock_addresses` (so call it before any audit append)."""
    address = _new_address(settings, address, address_local_part)
    domain_id = _check_domain(conn, settings, account_id, address)
    lock_addresses(conn)
    refuse_oversight_address(conn, address)
    return address, domain_id


def _new_address(settings: Settings, address: str | None, address_local_part: str | None) -> str:
    if not address and address_local_part:
        address = f"{address_local_part}@{settings.domain}"
    if not address:
        raise InvalidInput(
            "give the mailbox an 'address' (name@domain) or an 'address_local_part'",
            code="missing_address",
        )
    try:
        return normalize_address(address)
    except AddressError as exc:
        raise InvalidInput(str(exc), code="invalid_address") from None


def create_mailbox(
    conn: Connection,
    *,
    actor: Actor,
    settings: Settings,
    address: str | None = None,
    address_local_part: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    unknown = set(fields) - SETTABLE
    if unknown:
        raise InvalidInput(
            f"unknown mailbox fields: {', '.join(sorted(unknown))}", code="unknown_fields"
        )
    assert actor.account_id is not None
    _new_address(settings, address, address_local_part)  # a missing address is said first
    clean = _validate_settings(fields, settings)
    address, domain_id = claim_address(
        conn, settings, actor.account_id, address, address_local_part
    )
    requested = OversightMode(clean.get("oversight_mode") or DEFAULT_MODE.value)
    mode = requested
    upgrade_requested = None
    if not actor.is_operator and is_loosening(DEFAULT_MODE, requested):
        # An agent cannot create itself a looser gate than the default; the operator decides.
        mode = stricter(requested, DEFAULT_MODE)
        upgrade_requested = requested.value
    now = utcnow()
    record: dict[str, Any] = {
        "id": new_id("mbx"),
        "account_id": actor.account_id,
        "domain_id": domain_id,
        "address": address,
        "display_name": clean.get("display_name"),
        "oversight_mode": mode.value,
        "gate_timing": clean.get("gate_timing") or GateTiming.GATE_FIRST.value,
        "signature": clean.get("signature"),
        "auto_cc": clean.get("auto_cc", []),
        "auto_bcc": clean.get("auto_bcc", []),
        "webhook_url": clean.get("webhook_url"),
        "ai_disclosure": bool(clean.get("ai_disclosure", True)),
        "paused": False,
        "approval_timeout_seconds": clean.get("approval_timeout_seconds", 86400),
        "approval_expiry_seconds": clean.get("approval_expiry_seconds", 259200),
        "send_cap_hour": clean.get("send_cap_hour"),
        "send_cap_day": clean.get("send_cap_day"),
        "metadata": clean.get("metadata"),
        "created_at": now,
        "updated_at": now,
        "deleted_at": None,
    }
    try:
        with conn.begin_nested():
            conn.execute(insert(mailboxes).values(**record))
    except IntegrityError:
        raise Conflict(f"the address {address} is already taken", code="address_taken") from None
    audit.append(
        conn,
        actor=actor,
        action="mailbox.created",
        subject_type="mailbox",
        subject_id=record["id"],
        mailbox_id=record["id"],
        oversight_mode=mode.value,
        details={"address": address, "requested_mode": requested.value},
    )
    view = mailbox_view(record)
    if upgrade_requested:
        view["requested_oversight_mode"] = upgrade_requested
        view["upgrade_required"] = True
    return view


def list_mailboxes(conn: Connection, actor: Actor) -> list[dict[str, Any]]:
    query = (
        select(mailboxes)
        .where(mailboxes.c.account_id == actor.account_id, mailboxes.c.deleted_at.is_(None))
        .order_by(mailboxes.c.id)
    )
    rows = conn.execute(query).mappings()
    return [
        mailbox_view(r) for r in rows if actor.mailbox_ids is None or r["id"] in actor.mailbox_ids
    ]


def cap_loosened(current: int | None, wanted: int | None) -> bool:
    """A send cap (or quota) is loosened when it is removed or raised; ``None`` is no cap.
    Lowering it, or setting one where there was none, tightens."""
    if wanted is None:
        return current is not None
    return current is not None and wanted > current


def loosening_changes(
    row: Mapping[str, Any],
    changes: Mapping[str, Any],
    actor: Actor,
    *,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """The changes an API key needs the operator's approval_code for (SPEC §2: loosening the
    operator's hold on the mailbox), as ``{field: {"from": now, "to": wanted}}``; everything
    else, tightening included, applies at once.

    ``auto_cc`` / ``auto_bcc``: whenever given (adding a copy can leak mail, removing one can
    drop the operator's own copy; gated as given, as before the other fields were).
    ``webhook_url``: a new or different URL (it subscribes to all of the mailbox's events,
    like creating a webhook); clearing it does not. ``send_cap_*``: a raised or removed cap.
    ``ai_disclosure``: turning it off (recipients stop being told an AI wrote the message;
    SPEC: on by default); turning it on does not.
    A loosening ``oversight_mode`` has its own flow and is refused here (403) as in
    :func:`update_mailbox`. Everything is validated first, so an invalid or refused request
    gets its error before any code is mailed. ``approval_timeout_seconds`` and
    ``approval_expiry_seconds`` need no code: they decide when the operator is reminded and
    when a pending draft dies unsent, never whether a message passes the gate.
    ``settings`` (the server's) is needed whenever a ``webhook_url`` is given.
    """
    unknown = set(changes) - SETTABLE
    if unknown:
        raise InvalidInput(
            f"unknown mailbox fields: {', '.join(sorted(unknown))}", code="unknown_fields"
        )
    clean = _validate_settings(dict(changes), settings)
    check_mode_change(row, clean, actor)
    gated: dict[str, Any] = {}
    for field in ("auto_cc", "auto_bcc"):
        if field in clean:
            gated[field] = clean[field]
    if clean.get("webhook_url") is not None and clean["webhook_url"] != row.get("webhook_url"):
        gated["webhook_url"] = clean["webhook_url"]
    for field in ("send_cap_hour", "send_cap_day"):
        if field in clean and cap_loosened(row.get(field), clean[field]):
            gated[field] = clean[field]
    if clean.get("ai_disclosure") is False and row.get("ai_disclosure"):
        gated["ai_disclosure"] = False
    return {k: {"from": row.get(k), "to": v} for k, v in gated.items()}


def check_mode_change(row: Mapping[str, Any], clean: Mapping[str, Any], actor: Actor) -> None:
    """Tightening the mode is immediate; loosening it is the trust ladder's (request-upgrade)."""
    if "oversight_mode" in clean and clean["oversight_mode"] is not None:
        new_mode = OversightMode(clean["oversight_mode"])
        if is_loosening(OversightMode(row["oversight_mode"]), new_mode) and not actor.is_operator:
            raise Forbidden(
                f"loosening this mailbox from {row['oversight_mode']} to {new_mode.value} needs "
                f"the operator: call POST /v1/mailboxes/{row['id']}/request-upgrade, then "
                "/upgrade with the code mailed to the oversight address",
                code="upgrade_requires_approval",
            )


def update_mailbox(
    conn: Connection,
    *,
    actor: Actor,
    ref: str,
    changes: dict[str, Any],
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Apply ``changes``; ``settings`` (the server's) is needed whenever a ``webhook_url`` is
    given. A changed or cleared webhook_url brings the mailbox's subscription in step in this
    transaction (:func:`events.sync_mailbox_subscription`)."""
    unknown = set(changes) - SETTABLE
    if unknown:
        raise InvalidInput(
            f"unknown mailbox fields: {', '.join(sorted(unknown))}", code="unknown_fields"
        )
    row = resolve(conn, actor, ref, for_update=True)
    clean = _validate_settings(changes, settings)
    check_mode_change(row, clean, actor)
    if not clean:
        return mailbox_view(row)
    clean["updated_at"] = utcnow()
    conn.execute(update(mailboxes).where(mailboxes.c.id == row["id"]).values(**clean))
    diff = {k: {"from": row.get(k), "to": v} for k, v in clean.items() if k != "updated_at"}
    new_row = conn.execute(select(mailboxes).where(mailboxes.c.id == row["id"])).mappings().one()
    action = "mailbox.mode_changed" if "oversight_mode" in changes else "mailbox.updated"
    audit.append(
        conn,
        actor=actor,
        action=action,
        subject_type="mailbox",
        subject_id=row["id"],
        mailbox_id=row["id"],
        oversight_mode=new_row["oversight_mode"],
        details={"changes": diff},
    )
    if "webhook_url" in clean:
        # Now, not at the mailbox's next event: until then the dispatcher would keep retrying
        # queued deliveries at the old URL (and GET /v1/webhooks would show it enabled).
        events.sync_mailbox_subscription(conn, row["id"], actor=actor)
    return mailbox_view(new_row)


def delete_mailbox(conn: Connection, *, actor: Actor, ref: str) -> dict[str, Any]:
    """Retire the address; its messages and audit trail stay for the record."""
    row = resolve(conn, actor, ref, for_update=True)
    now = utcnow()
    conn.execute(
        update(mailboxes).where(mailboxes.c.id == row["id"]).values(deleted_at=now, updated_at=now)
    )
    audit.append(
        conn,
        actor=actor,
        action="mailbox.deleted",
        subject_type="mailbox",
        subject_id=row["id"],
        mailbox_id=row["id"],
        oversight_mode=row["oversight_mode"],
        details={"address": row["address"]},
    )
    # A deleted mailbox has no events: its webhook_url subscription would otherwise stay
    # enabled, with its queued retries going on, as nothing would ever sync it again.
    events.sync_mailbox_subscription(conn, row["id"], actor=actor)
    return {"id": row["id"], "mailbox_id": row["id"], "address": row["address"], "deleted": True}


def count_mailboxes(conn: Connection, account_id: str) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(mailboxes)
            .where(mailboxes.c.account_id == account_id, mailboxes.c.deleted_at.is_(None))
        ).scalar_one()
    )
