"""Health, readiness and the audit log."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select, text

from multimail.api.deps import ADMIN, READ, get_services
from multimail.errors import InvalidInput
from multimail.services import audit
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries

router = APIRouter()


@router.get("/health")
@router.get("/healthz", include_in_schema=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def ready(request: Request, svc: Services = Depends(get_services)) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with svc.db.read() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # readiness reports any failure instead of raising
        checks["database"] = f"unavailable: {exc.__class__.__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
    )


@router.get("/v1/audit-log")
def audit_log(
    actor_id: str | None = Query(None, max_length=200),
    action: str | None = Query(None, max_length=80),
    mailbox_id: str | None = Query(None, max_length=40),
    subject_id: str | None = Query(None, max_length=200),
    cursor: str | None = Query(None, max_length=20),
    limit: int = Query(100, ge=1, le=1000),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    query = select(audit_entries).where(audit_entries.c.account_id == actor.account_id)
    if actor_id:
        query = query.where(audit_entries.c.actor_id == actor_id)
    if action:
        query = query.where(audit_entries.c.action == action)
    if mailbox_id:
        query = query.where(audit_entries.c.mailbox_id == mailbox_id)
    if subject_id:
        query = query.where(audit_entries.c.subject_id == subject_id)
    if cursor:
        if not cursor.isdigit():
            raise InvalidInput(
                "cursor must be the next_cursor of a previous page", code="invalid_cursor"
            )
        query = query.where(audit_entries.c.seq < int(cursor))
    query = query.order_by(audit_entries.c.seq.desc()).limit(limit + 1)
    with svc.db.read() as conn:
        rows = conn.execute(query).mappings().all()
    entries = [audit.row_to_entry(r) for r in rows[:limit]]
    next_cursor = str(entries[-1]["seq"]) if len(rows) > limit else None
    return {"entries": entries, "next_cursor": next_cursor}


@router.get("/v1/audit-log/verify")
def audit_verify(actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)) -> Any:
    result = audit.verify(svc.db)
    body: dict[str, Any] = {
        "intact": result.ok,
        "ok": result.ok,
        "entries_checked": result.checked,
        "head": {"seq": result.last_seq, "hash": result.last_hash},
    }
    if result.first_break is not None:
        body["first_broken_seq"] = result.first_break.seq
        body["break"] = {
            "seq": result.first_break.seq,
            "kind": result.first_break.kind,
            "explanation": result.first_break.explanation,
        }
    return body
