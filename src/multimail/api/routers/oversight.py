"""Oversight routes: the pending queue, decisions, the kill switch, the trust ladder and the
recipient allowlist (SPEC §2, §5.1, §5.2). Each route calls one service function.

The tool-named forms (``/list_pending``, ``/decide_email`` …) are generated from the tool
catalogue and land on these routes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from multimail.api.deps import READ, authenticated, get_services
from multimail.errors import InvalidInput
from multimail.services import approvals, oversight
from multimail.services.context import Actor, Services

router = APIRouter()


class Strict(BaseModel):
    # Unknown fields are refused: `status: "approved"` or `gated: false` must never slip by.
    model_config = ConfigDict(extra="forbid")


class Decision(Strict):
    email_id: str | None = Field(None, max_length=200)
    message_id: str | None = Field(None, max_length=200)
    id: str | None = Field(None, max_length=200)
    email_ids: list[str] | None = Field(None, max_length=oversight.MAX_BATCH)
    action: str | None = Field(None, max_length=20)
    decision: str | None = Field(None, max_length=20)
    reason: str | None = Field(None, max_length=5000)
    note: str | None = Field(None, max_length=5000)
    rejection_note: str | None = Field(None, max_length=5000)
    reviewer: str | None = Field(None, max_length=200)
    revised_subject: str | None = None
    revised_body: str | None = None
    revised_markdown: str | None = None
    # The pending queue's digest of the draft the reviewer read: an approval covers that draft.
    draft_digest: str | None = Field(None, max_length=100)
    draft_digests: dict[str, str] | None = Field(None, max_length=oversight.MAX_BATCH)


class KillSwitch(Strict):
    mailbox_id: str | None = Field(None, max_length=320)


class UpgradeRequest(Strict):
    target_mode: str | None = Field(None, max_length=20)
    oversight_mode: str | None = Field(None, max_length=20)
    mode: str | None = Field(None, max_length=20)


class UpgradeApply(Strict):
    code: str | None = Field(None, max_length=40)
    approval_code: str | None = Field(None, max_length=40)


class AllowlistAdd(Strict):
    pattern: str | None = Field(None, max_length=320)
    address: str | None = Field(None, max_length=320)
    approval_code: str | None = Field(None, max_length=40)


def _pending(
    svc: Services, actor: Actor, mailbox_id: str | None, limit: int | None, cursor: str | None
) -> Any:
    return oversight.list_pending(svc, actor, mailbox_ref=mailbox_id, limit=limit, cursor=cursor)


@router.get("/v1/oversight/pending")
def pending(
    mailbox_id: str | None = Query(None, max_length=320),
    limit: int | None = Query(None, ge=1, le=200),
    cursor: str | None = Query(None, max_length=60),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    return _pending(svc, actor, mailbox_id, limit, cursor)


@router.get("/v1/pending")
def pending_short(
    mailbox_id: str | None = Query(None, max_length=320),
    limit: int | None = Query(None, ge=1, le=200),
    cursor: str | None = Query(None, max_length=60),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    return _pending(svc, actor, mailbox_id, limit, cursor)


def _decide(svc: Services, actor: Actor, body: Decision) -> Any:
    action = body.action or body.decision or ""
    fields: dict[str, Any] = {
        "note": body.reason or body.note or body.rejection_note,
        "reviewer": body.reviewer,
        "revised_subject": body.revised_subject,
        "revised_markdown": body.revised_markdown
        if body.revised_markdown is not None
        else body.revised_body,
    }
    if body.email_ids is not None:
        if body.draft_digest is not None:
            raise InvalidInput(
                "with email_ids, give each message's digest in draft_digests "
                '({"<email_id>": "<draft_digest>"}); nothing was decided',
                code="invalid_draft_digest",
            )
        return oversight.decide_many(
            svc,
            actor,
            email_ids=body.email_ids,
            action=action,
            draft_digests=body.draft_digests,
            **fields,
        )
    if body.draft_digests is not None:
        raise InvalidInput(
            "draft_digests goes with email_ids; for one message give draft_digest",
            code="invalid_draft_digest",
        )
    email_id = body.email_id or body.message_id or body.id
    if not email_id:
        raise InvalidInput(
            "give the message as 'email_id' or 'message_id'", code="missing_email_id"
        )
    return oversight.decide(
        svc, actor, email_id=email_id, action=action, draft_digest=body.draft_digest, **fields
    )


@router.post("/v1/oversight/decide")
def decide(
    body: Decision, actor: Actor = Depends(authenticated), svc: Services = Depends(get_services)
) -> Any:
    return _decide(svc, actor, body)


@router.post("/v1/oversight/pause")
def pause(
    body: KillSwitch | None = None,
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(get_services),
) -> Any:
    return oversight.pause(svc, actor, body.mailbox_id if body else None)


@router.post("/v1/oversight/resume")
def resume(
    body: KillSwitch | None = None,
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(get_services),
) -> Any:
    return oversight.resume(svc, actor, body.mailbox_id if body else None)


def _mode(body: UpgradeRequest) -> str | None:
    return body.target_mode or body.oversight_mode or body.mode


@router.post("/v1/mailboxes/{mailbox}/request-upgrade", status_code=202)
def request_upgrade(
    mailbox: str,
    body: UpgradeRequest,
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    return approvals.request_upgrade(svc, actor, mailbox, _mode(body))


@router.post("/v1/mailboxes/{mailbox}/upgrade")
def apply_upgrade(
    mailbox: str,
    body: UpgradeApply,
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    return approvals.apply_upgrade(svc, actor, mailbox, body.code or body.approval_code)


@router.get("/v1/mailboxes/{mailbox}/allowlist")
def list_allowlist(
    mailbox: str, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    return approvals.list_allowlist(svc, actor, mailbox)


@router.post("/v1/mailboxes/{mailbox}/allowlist", status_code=201)
def add_allowlist(
    mailbox: str,
    body: AllowlistAdd,
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(get_services),
) -> Any:
    pattern = body.pattern or body.address or ""
    return approvals.add_allowlist(svc, actor, mailbox, pattern, body.approval_code)


@router.delete("/v1/mailboxes/{mailbox}/allowlist")
def remove_allowlist_by_query(
    mailbox: str,
    pattern: str = Query(..., max_length=320),
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(get_services),
) -> Any:
    return approvals.remove_allowlist(svc, actor, mailbox, pattern)


@router.delete("/v1/mailboxes/{mailbox}/allowlist/{entry}")
def remove_allowlist(
    mailbox: str,
    entry: str,
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(get_services),
) -> Any:
    return approvals.remove_allowlist(svc, actor, mailbox, entry)
