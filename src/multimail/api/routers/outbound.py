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

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from multimail.api.deps import (
    SEND,
    RequestGate,
    admitted_later,
    authenticated,
    get_services,
    in_thread,
    services_of,
)
from multimail.api.lean import LeanRoute
from multimail.domain.scopes import Scope
from multimail.services import sending
from multimail.services.context import Actor, Services
from multimail.services.sending import ScheduleEdit, SendRequest, SendResult

router = APIRouter()


class CancelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=2000)
    note: str | None = Field(None, max_length=2000)


class _InvalidBody:
    """A send body that failed validation, kept so the refusal can wait for the key."""

    def __init__(self, errors: list[Any]) -> None:
        self.errors = errors


def _keep_errors(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError as exc:
        return _InvalidBody(exc.errors(include_url=False))


# The send body as FastAPI documents it (the same schema, required), but a body that fails
# validation, or none at all, reaches the endpoint: the caller is admitted (key, rate-limit
# token, scope) first and then refused with the 422 FastAPI would have given, as before.
SendBody = Annotated[SendRequest, WrapValidator(_keep_errors), Body()]
_SEND_OPENAPI: dict[str, Any] = {"requestBody": {"required": True}}
_NO_BODY: Any = None  # the default that lets a request without a body reach the endpoint

SEND_KEY = admitted_later(Scope.SEND)


def _validated(body: SendRequest | None) -> SendRequest:
    if body is None:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    if isinstance(body, _InvalidBody):
        errors = [{**error, "loc": ("body", *error["loc"])} for error in body.errors]
        raise RequestValidationError(errors)
    return body


async def _send(
    request: Request,
    raw_key: str | None,
    body: SendRequest | None,
    *,
    mailbox_ref: str | None,
    email_id: str | None = None,
) -> Response:
    """The send authenticates its caller, spends their token and writes the message in one
    transaction: on SQLite, for a small body, shared with concurrent sends and without a
    thread hop of its own; otherwise in one hop (``sending.send_admitting``)."""
    svc = get_services(request)
    gate = RequestGate(request, raw_key)
    if isinstance(body, SendRequest) and sending.admits_in_shared_commit(svc, body):
        # SQLite and a small body: prepared here, written by the database's writer thread.
        result = await sending.send_in_shared_commit(
            svc, gate, mailbox_ref=mailbox_ref, request=body, email_id=email_id
        )
        return JSONResponse(
            result.response, status_code=202 if result.created else 200, headers=gate.headers
        )

    def run() -> SendResult:
        if body is None or isinstance(body, _InvalidBody):
            gate.admit_alone().require(Scope.SEND)
            _validated(body)
        assert body is not None
        if email_id is None:
            return sending.send_admitting(svc, gate, mailbox_ref=mailbox_ref, request=body)
        return sending.reply_admitting(
            svc, gate, mailbox_ref=mailbox_ref, email_id=email_id, request=body
        )

    result = await in_thread(run)
    # The body FastAPI would have rendered (the response is JSON-native already).
    return JSONResponse(
        result.response, status_code=202 if result.created else 200, headers=gate.headers
    )


_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


def _send_route(path: str) -> Callable[[_Endpoint], _Endpoint]:
    """``router.post`` for a send route, as a ``LeanRoute``: the busiest routes skip FastAPI's
    parameter resolver for a well-formed JSON body (``api/lean.py``)."""

    def register(endpoint: _Endpoint) -> _Endpoint:
        router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            status_code=202,
            openapi_extra=_SEND_OPENAPI,
            route_class_override=LeanRoute,
        )
        return endpoint

    return register


# --- canonical REST --------------------------------------------------------------------------


@_send_route("/v1/mailboxes/{mailbox}/send")
async def send_from_mailbox(
    mailbox: str,
    request: Request,
    body: SendBody = _NO_BODY,
    raw_key: str | None = Depends(SEND_KEY),
) -> Any:
    return await _send(request, raw_key, body, mailbox_ref=mailbox)


@_send_route("/v1/mailboxes/{mailbox}/reply/{email_id}")
async def reply_from_mailbox(
    mailbox: str,
    email_id: str,
    request: Request,
    body: SendBody = _NO_BODY,
    raw_key: str | None = Depends(SEND_KEY),
) -> Any:
    return await _send(request, raw_key, body, mailbox_ref=mailbox, email_id=email_id)


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


@_send_route("/v1/send")
async def short_send(
    request: Request,
    body: SendBody = _NO_BODY,
    raw_key: str | None = Depends(SEND_KEY),
) -> Any:
    return await _send(request, raw_key, body, mailbox_ref=None)


@router.post("/v1/cancel/{email_id}")
def short_cancel(
    email_id: str,
    body: CancelBody | None = Body(None),
    actor: Actor = Depends(authenticated),
    svc: Services = Depends(services_of),
) -> Any:
    reason = (body.reason or body.note) if body else None
    return sending.cancel(svc, actor, email_id, reason)


@_send_route("/v1/emails/{email_id}/reply")
async def account_reply(
    email_id: str,
    request: Request,
    body: SendBody = _NO_BODY,
    raw_key: str | None = Depends(SEND_KEY),
) -> Any:
    return await _send(request, raw_key, body, mailbox_ref=None, email_id=email_id)


@router.patch("/v1/emails/{email_id}/schedule")
def account_edit_schedule(
    email_id: str,
    body: ScheduleEdit,
    mailbox_id: str | None = Query(None, max_length=320),
    actor: Actor = Depends(SEND),
    svc: Services = Depends(services_of),
) -> Any:
    return sending.edit_scheduled(svc, actor, email_id, body, mailbox_ref=mailbox_id)
