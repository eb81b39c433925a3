"""Signed checkpoints of the audit log's head (SPEC §7).

The hash chain proves that no entry was changed, removed or inserted *between* two
entries; it cannot tell that the newest entries were cut off, or that the database was
restored from an older backup. A checkpoint can: it is the head (``seq``, ``hash``) signed
with the server's Ed25519 identity key, stored in ``audit_checkpoints`` and, for the
strongest guarantee, copied somewhere the database's owner cannot reach
(``multimail audit checkpoint --output FILE``). ``audit.verify`` holds the log against every
checkpoint it is given.

The worker calls :func:`make_checkpoint` every few minutes and once on shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select

from multimail.ids import isoformat, new_id, parse_datetime, utcnow
from multimail.services import audit
from multimail.services.context import Services
from multimail.services.identity import keyring
from multimail.store.tables import audit_checkpoints, audit_entries

__all__ = [
    "DEFAULT_INTERVAL_SECONDS",
    "checkpoint_loop",
    "latest_checkpoint",
    "list_checkpoints",
    "make_checkpoint",
    "verify_log",
]

DEFAULT_INTERVAL_SECONDS = 300
log = logging.getLogger("multimail.checkpoints")


def _signed_now() -> tuple[str, datetime]:
    # Millisecond precision, so the text that was signed is exactly what the stored
    # timestamp reads back as on both databases.
    text = isoformat(utcnow())
    assert text is not None
    return text, parse_datetime(text)


def make_checkpoint(services: Services, *, force: bool = False) -> dict[str, Any] | None:
    """Sign the current head and store it; returns the checkpoint document.

    Nothing is written when the log is empty, or when the head was already checkpointed
    (unless ``force``), so calling this on a timer costs one query while nothing happens.
    """
    ring = keyring(services)
    key = ring.current
    with services.db.write() as conn:
        head = conn.execute(
            select(audit_entries.c.seq, audit_entries.c.hash)
            .order_by(audit_entries.c.seq.desc())
            .limit(1)
        ).first()
        if head is None:
            return None
        last = conn.execute(
            select(audit_checkpoints.c.seq, audit_checkpoints.c.key_id)
            .order_by(audit_checkpoints.c.seq.desc(), audit_checkpoints.c.signed_at.desc())
            .limit(1)
        ).first()
        if not force and last is not None and (last.seq, last.key_id) == (head.seq, key.kid):
            return None
        signed_text, signed_at = _signed_now()
        payload = audit.checkpoint_signing_input(int(head.seq), head.hash, signed_text, key.kid)
        signature = base64.urlsafe_b64encode(key.private_key.sign(payload)).rstrip(b"=")
        row = {
            "id": new_id("ckp"),
            "seq": int(head.seq),
            "hash": head.hash,
            "key_id": key.kid,
            "signature": signature.decode("ascii"),
            "signed_at": signed_at,
        }
        conn.execute(insert(audit_checkpoints).values(**row))
    document = audit.checkpoint_document(row)
    document["issuer"] = services.settings.base_url
    return document


def list_checkpoints(services: Services, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest checkpoints first."""
    with services.db.read() as conn:
        rows = conn.execute(
            select(audit_checkpoints)
            .order_by(audit_checkpoints.c.seq.desc(), audit_checkpoints.c.signed_at.desc())
            .limit(max(1, min(limit, 1000)))
        ).mappings()
        return [audit.checkpoint_document(r) | {"issuer": services.settings.base_url} for r in rows]


def latest_checkpoint(services: Services) -> dict[str, Any] | None:
    found = list_checkpoints(services, limit=1)
    return found[0] if found else None


def verify_log(
    services: Services, *, external: list[dict[str, Any]] | None = None
) -> audit.AuditVerification:
    """The full verification: the chain, stored checkpoints and any exported ones."""
    keys = keyring(services, reload=True).verification_keys()
    return audit.verify(services.db, keys=keys, external_checkpoints=external or ())


async def checkpoint_loop(
    services: Services, stop: asyncio.Event, *, interval: float | None = None
) -> None:
    """Checkpoint the head every ``interval`` seconds and once more when ``stop`` is set.

    ``interval`` defaults to the setting ``audit_checkpoint_seconds``. The worker role runs
    it (``runtime.components_for``); several workers at once only sign the same head twice.
    """
    every = interval or float(services.settings.audit_checkpoint_seconds)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        try:
            await asyncio.to_thread(make_checkpoint, services)
        except Exception:  # a failed tick must not end the loop; the next one retries
            log.exception("audit checkpoint failed")
