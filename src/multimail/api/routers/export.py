"""``GET /v1/export``: the account's data as a downloadable archive (SPEC §5.1).

The archive's format is ``services.export``'s; this route checks the caller and the filters
before the first byte goes out (errors after that cannot be enveloped) and streams it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from multimail.api.deps import ADMIN, get_services
from multimail.services import export
from multimail.services.context import Actor, Services

router = APIRouter()


@router.get(
    "/v1/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {export.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            "description": "A ZIP: messages.jsonl, threads.jsonl, audit.jsonl, manifest.json.",
        }
    },
)
def export_account(
    date_after: str | None = Query(None, max_length=40, description="ISO 8601, inclusive."),
    date_before: str | None = Query(None, max_length=40, description="ISO 8601, exclusive."),
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> StreamingResponse:
    """The caller's account (a mailbox-limited key: its mailboxes) as a ZIP download."""
    plan = export.plan_export(actor, date_after=date_after, date_before=date_before)
    return StreamingResponse(
        export.stream_archive(svc, plan),
        media_type=export.MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{plan.filename}"'},
    )
