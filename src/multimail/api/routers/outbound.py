"""Sending, replying, cancelling and rescheduling (SPEC §5.1, §5.2): thin over services.sending.

Cancel takes any key and lets the service decide: agents (send) and reviewers (oversight) may.

The canonical routes name the mailbox in the path; the short forms (``/v1/send``,
``/v1/cancel/{id}``) and the account-wide message routes (``/v1/emails/{id}/reply`` …, which the
tools use) take ``from`` or ``mailbox_id`` instead, a reply defaulting to the mailbox of the
message answered. The tool-named routes (``/send_email`` …) are generated from the tool
catalogue. A new message answers 202; an idempotent replay answers 200 with the original
response.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from multimail.api.deps import SEND, authenticated, services_of
from multimail.services import sending
from multimail.services.context import Actor, Services
from multimail.services.sending import ScheduleEdit, SendRequest, SendResult

router = APIRouter()


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=2000)
    note: str | None = Field(None, max_length=2000)


def _answer(result: SendResult, response: Response) -> dict[str, Any]:
    response.status_code = 202 if result.created else 200
    return result.response


# --- canonical REST --------------------------------------------------------------------------


@router.post("/v1/mailboxes/{mailbox}/send", status_code=202)
def send_from_mailbox(
    mailbox: str,
    body: SendRequest,
    response: Response,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(services_of),
) -> Any:
    result = sending.send(svc, actor, mailbox_ref=mailbox, request=body)
    return _answer(result, response)


@router.post("/v1/mailboxes/{mailbox}/reply/{email_id}", status_code=202)
def reply_from_mailbox(
    mailbox: str,
    email_id: str,
    body: SendRequest,
    response: Response,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(services_of),
) -> Any:
    result = sending.reply(svc, actor, mailbox_ref=mailbox, email_id=email_id, request=body)
    return _answer(result, response)


@router.post("/v1/mailboxes/{mailbox}/emails/{email_id}/cancel")
def cancel_in_mailbox(
    mailbox: str,
    email_id: str,
    body: CancelBody | None = Body(None),
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(services_of),
) -> Any:
    reason = (body.reason or body.note) if body else None
    return sending.cancel(svc, actor, email_id, reason, mailbox_ref=mailbox)


@router.patch("/v1/mailboxes/{mailbox}/emails/{email_id}/schedule")
def edit_schedule(
    mailbox: str,
    email_id: str,
    body: ScheduleEdit,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(services_of),
) -> Any:
    return sending.edit_scheduled(svc, actor, email_id, body, mailbox_ref=mailbox)


# --- short forms -----------------------------------------------------------------------------


@router.post("/v1/send", status_code=202)
def short_send(
    body: SendRequest,
    response: Response,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(services_of),
) -> Any:
    return _answer(sending.send(svc, actor, mailbox_ref=None, request=body), response)


@router.post("/v1/cancel/{email_id}")
def short_cancel(
    email_id: str,
    body: CancelBody | None = Body(None),
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(services_of),
) -> Any:
    reason = (body.reason or body.note) if body else None
    return sending.cancel(svc, actor, email_id, reason)


@router.post("/v1/emails/{email_id}/reply", status_code=202)
def account_reply(
    email_id: str,
    body: SendRequest,
    response: Response,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(services_of),
) -> Any:
    result = sending.reply(svc, actor, mailbox_ref=None, email_id=email_id, request=body)
    return _answer(result, response)


@router.patch("/v1/emails/{email_id}/schedule")
def account_edit_schedule(
    email_id: str,
    body: ScheduleEdit,
    mailbox_id: str | None = Query(None, max_length=320),
    actor: Actor = Depends(SEND),
    svc: Services = Depends(services_of),
) -> Any:
    return sending.edit_scheduled(svc, actor, email_id, body, mailbox_ref=mailbox_id)
