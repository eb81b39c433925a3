"""The audit log: filtered pages, streaming export, verification and signed checkpoints."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Query
from fastapi.responses import StreamingResponse

from multimail.api.deps import ADMIN, READ, get_services
from multimail.services import audit, checkpoints
from multimail.services.context import Actor, Services

router = APIRouter(prefix="/v1/audit-log")

_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


@router.get("")
def audit_log(
    actor_id: str | None = Query(None, max_length=200, description="Only this actor (key id)."),
    action: str | None = Query(None, max_length=80),
    mailbox: str | None = Query(None, max_length=320, description="Mailbox id or address."),
    mailbox_id: str | None = Query(None, max_length=320, description="Alias of mailbox."),
    message_id: str | None = Query(None, max_length=200, description="Only this message."),
    subject_id: str | None = Query(None, max_length=200, description="Any subject's id."),
    date_after: str | None = Query(None, max_length=40, description="ISO 8601, inclusive."),
    date_before: str | None = Query(None, max_length=40, description="ISO 8601, exclusive."),
    cursor: str | None = Query(None, max_length=20),
    limit: int = Query(100, ge=1, le=1000),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        where = audit.make_filter(
            conn,
            actor,
            actor_id=actor_id,
            action=action,
            mailbox=mailbox or mailbox_id,
            subject_id=message_id or subject_id,
            date_after=date_after,
            date_before=date_before,
        )
        return audit.list_entries(conn, where, cursor=cursor, limit=limit)


@router.get("/export")
def audit_export(
    format: Literal["jsonl", "csv"] = Query("jsonl"),
    date_after: str | None = Query(None, max_length=40),
    date_before: str | None = Query(None, max_length=40),
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> StreamingResponse:
    # Validate the range before the first byte goes out; errors after that cannot be enveloped.
    where = audit.export_filter(
        account_id=actor.account_id, date_after=date_after, date_before=date_before, actor=actor
    )
    lines = audit.export_lines(audit.iter_entries(svc.db, where), format)
    return StreamingResponse(
        lines,
        media_type=_MEDIA[format],
        headers={"Content-Disposition": f'attachment; filename="audit-log.{format}"'},
    )


@router.get("/verify")
def audit_verify(actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)) -> Any:
    return checkpoints.verify_log(svc).to_dict()


@router.post("/verify")
def audit_verify_against(
    checkpoint: dict[str, Any] | list[dict[str, Any]] = Body(
        ..., description="A checkpoint exported earlier (or a list of them)."
    ),
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    external = checkpoint if isinstance(checkpoint, list) else [checkpoint]
    return checkpoints.verify_log(svc, external=external).to_dict()


@router.get("/checkpoints")
def audit_checkpoints(
    limit: int = Query(20, ge=1, le=1000),
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    return {"checkpoints": checkpoints.list_checkpoints(svc, limit=limit)}


@router.post("/checkpoints", status_code=201)
def audit_checkpoint_now(
    actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    made = checkpoints.make_checkpoint(svc, force=True)
    return {"checkpoint": made}
