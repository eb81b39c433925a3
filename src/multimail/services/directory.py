"""Contacts (the address book) and the suppression list."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from multimail.domain.addresses import AddressError, normalize_address
from multimail.errors import Conflict, InvalidInput, NotFound
from multimail.ids import new_id, utcnow
from multimail.services import audit
from multimail.services.common import jsonable, oldest_first_page
from multimail.services.context import Actor
from multimail.store.db import contains_folded
from multimail.store.tables import contacts, suppressions

SUPPRESSION_REASONS = ("hard_bounce", "complaint", "unsubscribe", "manual")


def _address(value: Any, field: str = "email") -> str:
    try:
        return normalize_address(value)
    except AddressError as exc:
        raise InvalidInput(f"{field}: {exc}", code="invalid_address") from None


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidInput("tags must be a list of strings", code="invalid_field")
    return sorted({t.strip() for t in value if t.strip()})


def contact_view(row: Any) -> dict[str, Any]:
    return jsonable(row, drop=("account_id",))


def add_contact(
    conn: Connection,
    *,
    actor: Actor,
    email: str,
    name: str | None = None,
    tags: Any = None,
    notes: str | None = None,
) -> dict[str, Any]:
    now = utcnow()
    record: dict[str, Any] = {
        "id": new_id("con"),
        "account_id": actor.account_id,
        "name": (name or "").strip() or None,
        "email": _address(email),
        "tags": _tags(tags),
        "notes": notes,
        "created_at": now,
        "updated_at": now,
    }
    try:
        with conn.begin_nested():
            conn.execute(insert(contacts).values(**record))
    except IntegrityError:
        raise Conflict(
            f"a contact with the address {record['email']} already exists", code="contact_exists"
        ) from None
    audit.append(
        conn,
        actor=actor,
        action="contact.created",
        subject_type="contact",
        subject_id=record["id"],
        details={"email": record["email"]},
    )
    return contact_view(record)


def search_contacts(
    conn: Connection,
    *,
    actor: Actor,
    q: str | None = None,
    tag: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    """``{"contacts", "next_cursor"}``, oldest first: ``cursor`` is the last id of the previous
    page (``offset`` still skips rows after it). The tag is matched on the rows read, so a page
    can come out short; ``next_cursor`` then still continues after the last row read."""
    query = select(contacts).where(contacts.c.account_id == actor.account_id)
    if q:
        query = query.where(
            or_(contains_folded(contacts.c.email, q), contains_folded(contacts.c.name, q))
        )
    page, following = oldest_first_page(
        conn,
        query,
        contacts.c.id,
        prefix="con",
        cursor=cursor,
        limit=limit,
        maximum=500,
        offset=offset,
    )
    found = [contact_view(r) for r in page]
    if tag:
        found = [r for r in found if tag in r["tags"]]
    return {"contacts": found, "next_cursor": following}


def delete_contact(conn: Connection, *, actor: Actor, contact_id: str) -> dict[str, Any]:
    row = (
        conn.execute(
            select(contacts).where(
                contacts.c.id == contact_id, contacts.c.account_id == actor.account_id
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no contact {contact_id!r}", code="contact_not_found")
    conn.execute(delete(contacts).where(contacts.c.id == contact_id))
    audit.append(
        conn,
        actor=actor,
        action="contact.deleted",
        subject_type="contact",
        subject_id=contact_id,
        details={"email": row["email"]},
    )
    return {"id": contact_id, "deleted": True}


def suppression_view(row: Any) -> dict[str, Any]:
    return jsonable(row, drop=("account_id",))


def suppress(
    conn: Connection,
    *,
    actor: Actor,
    account_id: str,
    address: str,
    reason: str,
    source_message_id: str | None = None,
    details: str | None = None,
) -> dict[str, Any]:
    """Add (or keep) an address on the list; idempotent."""
    if reason not in SUPPRESSION_REASONS:
        raise InvalidInput(
            f"reason must be one of {', '.join(SUPPRESSION_REASONS)}", code="invalid_reason"
        )
    address = _address(address, "address")
    existing = (
        conn.execute(
            select(suppressions).where(
                suppressions.c.account_id == account_id, suppressions.c.address == address
            )
        )
        .mappings()
        .first()
    )
    if existing is not None:
        return suppression_view(existing)
    record: dict[str, Any] = {
        "id": new_id("sup"),
        "account_id": account_id,
        "address": address,
        "reason": reason,
        "source_message_id": source_message_id,
        "details": details,
        "created_at": utcnow(),
    }
    conn.execute(insert(suppressions).values(**record))
    audit.append(
        conn,
        actor=actor,
        account_id=account_id,
        action="suppression.added",
        subject_type="suppression",
        subject_id=address,
        details={"reason": reason, "source_message_id": source_message_id},
    )
    return suppression_view(record)


def list_suppressions(
    conn: Connection,
    *,
    actor: Actor,
    limit: int | None = None,
    cursor: str | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    """``{"suppressions", "next_cursor"}``, oldest first; ``cursor`` is the last id shown."""
    page, following = oldest_first_page(
        conn,
        select(suppressions).where(suppressions.c.account_id == actor.account_id),
        suppressions.c.id,
        prefix="sup",
        cursor=cursor,
        limit=limit,
        maximum=1000,
        offset=offset,
    )
    return {"suppressions": [suppression_view(r) for r in page], "next_cursor": following}


def check_suppression(conn: Connection, *, actor: Actor, address: str) -> dict[str, Any]:
    normalized = _address(address, "address")
    row = (
        conn.execute(
            select(suppressions).where(
                suppressions.c.account_id == actor.account_id, suppressions.c.address == normalized
            )
        )
        .mappings()
        .first()
    )
    return {
        "address": normalized,
        "suppressed": row is not None,
        "suppression": suppression_view(row) if row else None,
    }


def suppressed_among(conn: Connection, account_id: str, addresses: list[str]) -> set[str]:
    if not addresses:
        return set()
    rows = conn.execute(
        select(suppressions.c.address).where(
            suppressions.c.account_id == account_id,
            suppressions.c.address.in_([a.lower() for a in addresses]),
        )
    )
    return {r.address for r in rows}


def remove_suppression(conn: Connection, *, actor: Actor, address: str) -> dict[str, Any]:
    normalized = _address(address, "address")
    row = (
        conn.execute(
            select(suppressions).where(
                suppressions.c.account_id == actor.account_id, suppressions.c.address == normalized
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"{normalized} is not on the suppression list", code="not_suppressed")
    conn.execute(delete(suppressions).where(suppressions.c.id == row["id"]))
    audit.append(
        conn,
        actor=actor,
        action="suppression.removed",
        subject_type="suppression",
        subject_id=normalized,
        details={"previous_reason": row["reason"]},
    )
    return {"address": normalized, "removed": True}


def touch_contact(conn: Connection, contact_id: str) -> None:
    conn.execute(update(contacts).where(contacts.c.id == contact_id).values(updated_at=utcnow()))
