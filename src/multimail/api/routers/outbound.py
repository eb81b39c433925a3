"""Sending, replying, cancelling and rescheduling (SPEC §5.1, §5.2): thin over services.sending.

Cancel takes any key and lets the service decide: agents (send) and reviewers (oversight) may.

The canonical routes name the mailbox in the path; the short forms (``/v1/send``) and the
tool-named routes (``/send_email`` …) take ``from`` or ``mailbox_id`` instead. A new message
answers 202; an idempotent replay answers 200 with the original response.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from multimail.api.deps import SEND, authenticated, get_services
from multimail.errors import InvalidInput
from multimail.services import sending
from multimail.services.context import Actor, Services
from multimail.services.sending import ScheduleEdit, SendRequest, SendResult

router = APIRouter()


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=2000)
    note: str | None = Field(None, max_length=2000)


class ToolReply(SendRequest):
    """``reply_email``: the message answered is ``message_id`` (or ``email_id``)."""

    message_id: str | None = None
    email_id: str | None = None


class ToolEdit(ScheduleEdit):
    message_id: str | None = None
    email_id: str | None = None
    from_: str | None = Field(None, alias="from")
    mailbox_id: str | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ToolCancel(CancelBody):
    message_id: str | None = None
    email_id: str | None = None
    from_: str | None = Field(None, alias="from")
    mailbox_id: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _answer(result: SendResult, response: Response) -> dict[str, Any]:
    response.status_code = 202 if result.created else 200
    return result.response


def _target(message_id: str | None, email_id: str | None) -> str:
    ref = message_id or email_id
    if not ref:
        raise InvalidInput("give the 'message_id' of the message", code="message_id_required")
    return ref


def _strip(model: BaseModel, cls: type[BaseModel], *names: str) -> Any:
    """The same request without the routing fields the tool-named forms add."""
    data = model.model_dump(by_alias=True, exclude_unset=True, exclude=set(names))
    return cls.model_validate(data)


# --- canonical REST --------------------------------------------------------------------------


@router.post("/v1/mailboxes/{mailbox}/send", status_code=202)
def send_from_mailbox(
    mailbox: str,
    body: SendRequest,
    response: Response,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(get_services),
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
    svc: Services = Depends(get_services),
) -> Any:
    result = sending.reply(svc, actor, mailbox_ref=mailbox, email_id=email_id, request=body)
    return _answer(result, response)


@router.post("/v1/mailboxes/{mailbox}/emails/{email_id}/cancel")
def cancel_in_mailbox(
    mailbox: str,
    email_id: str,
    body: CancelBody | None = Body(None),
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(get_services),
) -> Any:
    reason = (body.reason or body.note) if body else None
    return sending.cancel(svc, actor, email_id, reason, mailbox_ref=mailbox)


@router.patch("/v1/mailboxes/{mailbox}/emails/{email_id}/schedule")
def edit_schedule(
    mailbox: str,
    email_id: str,
    body: ScheduleEdit,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(get_services),
) -> Any:
    return sending.edit_scheduled(svc, actor, email_id, body, mailbox_ref=mailbox)


# --- short forms -----------------------------------------------------------------------------


@router.post("/v1/send", status_code=202)
def short_send(
    body: SendRequest,
    response: Response,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(get_services),
) -> Any:
    return _answer(sending.send(svc, actor, mailbox_ref=None, request=body), response)


@router.post("/v1/cancel/{email_id}")
def short_cancel(
    email_id: str,
    body: CancelBody | None = Body(None),
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(get_services),
) -> Any:
    reason = (body.reason or body.note) if body else None
    return sending.cancel(svc, actor, email_id, reason)


# --- tool-named routes (the MCP tools' names) -----------------------------------------------


@router.post("/send_email", status_code=202)
def send_email(
    body: SendRequest,
    response: Response,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(get_services),
) -> Any:
    return _answer(sending.send(svc, actor, mailbox_ref=None, request=body), response)


@router.post("/schedule_email", status_code=202)
def schedule_email(
    body: SendRequest,
    response: Response,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(get_services),
) -> Any:
    if not body.send_at:
        raise InvalidInput("schedule_email needs 'send_at' (ISO 8601)", code="send_at_required")
    return _answer(sending.send(svc, actor, mailbox_ref=None, request=body), response)


@router.post("/reply_email", status_code=202)
def reply_email(
    body: ToolReply,
    response: Response,
    actor: Actor = Depends(SEND),
    svc: Services = Depends(get_services),
) -> Any:
    target = _target(body.message_id, body.email_id)
    request = _strip(body, SendRequest, "message_id", "email_id")
    result = sending.reply(svc, actor, mailbox_ref=None, email_id=target, request=request)
    return _answer(result, response)


@router.post("/edit_scheduled_email")
def edit_scheduled_email(
    body: ToolEdit, actor: Actor = Depends(SEND), svc: Services = Depends(get_services)
) -> Any:
    target = _target(body.message_id, body.email_id)
    changes = _strip(body, ScheduleEdit, "message_id", "email_id", "from_", "mailbox_id")
    mailbox = body.from_ or body.mailbox_id
    return sending.edit_scheduled(svc, actor, target, changes, mailbox_ref=mailbox)


@router.post("/cancel_message")
def cancel_message(
    body: ToolCancel, actor: Actor = Depends(authenticated), svc: Services = Depends(get_services)
) -> Any:
    target = _target(body.message_id, body.email_id)
    mailbox = body.from_ or body.mailbox_id
    return sending.cancel(svc, actor, target, body.reason or body.note, mailbox_ref=mailbox)
