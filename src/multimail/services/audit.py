"""Appending to the audit chain, reading it, and verifying it.

Every state-changing service call appends inside its own transaction, so an entry exists
exactly when the change does. Appends are serialised so the chain stays linear across
processes: SQLite by its single writer (``BEGIN IMMEDIATE``), PostgreSQL by a transaction-level
advisory lock taken before the head is read. The primary key on ``seq`` is the last line of
defence: two appends can never both become entry N.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Connection, func, insert, select, text

from multimail.domain.audit import GENESIS_HASH, ChainVerifier, entry_hash
from multimail.ids import isoformat, utcnow
from multimail.services.context import Actor
from multimail.store.db import Database
from multimail.store.tables import audit_entries

_AUDIT_LOCK = 7_240_002


def append(
    conn: Connection,
    *,
    actor: Actor,
    action: str,
    account_id: str | None = None,
    subject_type: str | None = None,
    subject_id: str | None = None,
    mailbox_id: str | None = None,
    oversight_mode: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _AUDIT_LOCK})
    head = conn.execute(
        select(audit_entries.c.seq, audit_entries.c.hash)
        .order_by(audit_entries.c.seq.desc())
        .limit(1)
    ).first()
    seq = (head.seq + 1) if head else 1
    prev_hash = head.hash if head else GENESIS_HASH
    clean_details = json.loads(json.dumps(dict(details or {}), default=str))
    entry: dict[str, Any] = {
        "seq": seq,
        "at": isoformat(utcnow()),
        "account_id": account_id or actor.account_id,
        "actor_type": actor.type,
        "actor_id": actor.id,
        "actor_name": actor.name,
        "action": action,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "mailbox_id": mailbox_id,
        "oversight_mode": oversight_mode,
        "details": clean_details,
        "prev_hash": prev_hash,
    }
    entry["hash"] = entry_hash(entry)
    row = dict(entry)
    row["details"] = json.dumps(clean_details, sort_keys=True, separators=(",", ":"))
    conn.execute(insert(audit_entries).values(**row))
    return entry


def row_to_entry(row: Mapping[str, Any] | Any) -> dict[str, Any]:
    entry = dict(row)
    entry["details"] = json.loads(entry["details"] or "{}")
    return entry


def iter_entries(db: Database, *, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """All entries in ``seq`` order, fetched in keyset batches (flat memory)."""
    last = 0
    while True:
        with db.read() as conn:
            rows = (
                conn.execute(
                    select(audit_entries)
                    .where(audit_entries.c.seq > last)
                    .order_by(audit_entries.c.seq)
                    .limit(batch)
                )
                .mappings()
                .all()
            )
        if not rows:
            return
        for row in rows:
            yield row_to_entry(row)
        last = rows[-1]["seq"]


def verify(db: Database) -> ChainVerifier:
    """Recompute the whole chain; ``first_break`` names the first broken entry."""
    verifier = ChainVerifier(expected_seq=1)
    for entry in iter_entries(db):
        if not verifier.feed(entry):
            break
    return verifier


def entry_count(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(audit_entries)).scalar_one())
