"""The agent's inbox (SPEC §5.1), plus ``POST /v1/inbound``.

Each message route exists twice: under ``/v1/mailboxes/{mailbox}/…`` and account-wide under
``/v1/emails/{email_id}/…`` (``?mailbox_id=`` optional), which the tools use so an agent never
has to know which mailbox holds a message. The tool-named forms (``/read_email`` …) are
generated from the tool catalogue (``multimail.tools.http_routes``), not written here.

Thin: each route parses its input and calls one function of ``services.inbox`` or
``services.inbound``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import string
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from multimail.api.deps import ADMIN, READ, get_services
from multimail.errors import MalformedRequest
from multimail.services import inbound, inbox
from multimail.services.context import Actor, Services

router = APIRouter()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InboundJSON(Strict):
    raw_base64: str
    mail_from: str | None = None
    rcpt_to: list[str] | str | None = None
    peer_ip: str | None = None
    helo: str | None = None


def _filters(
    status: str | None = None,
    sender: str | None = None,
    subject_contains: str | None = None,
    date_after: str | None = None,
    date_before: str | None = None,
    direction: str | None = None,
    has_attachments: bool | None = None,
    since_id: str | None = None,
    cursor: str | None = None,
    offset: int = Query(0, ge=0, le=1_000_000_000),  # beyond bigint the database errs
    limit: int | None = Query(None, ge=1, le=200),
) -> inbox.EmailFilters:
    return inbox.EmailFilters(
        status=status,
        sender=sender,
        subject_contains=subject_contains,
        date_after=date_after,
        date_before=date_before,
        direction=direction,
        has_attachments=has_attachments,
        since_id=since_id,
        cursor=cursor,
        offset=offset,
        limit=limit,
    )


_ASCII_NAME_SAFE = frozenset(string.ascii_letters + string.digits + "._-")
_HEADER_SAFE = re.compile(r"[ -~]+")


def _attachment_response(item: inbox.Attachment) -> Response:
    # RFC 6266 / 5987: the UTF-8 form cannot inject header syntax, the ASCII one is a fallback
    # for old clients (str.isalnum would let 报 through, and a header must be Latin-1).
    ascii_name = "".join(c if c in _ASCII_NAME_SAFE else "_" for c in item.filename)
    disposition = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(item.filename)}"
    # Set as a header, not media_type: the framework would add charset=utf-8 to text/*, and
    # the bytes are in the charset the sender declared (kept in content_type) or unknown.
    content_type = item.content_type
    if not _HEADER_SAFE.fullmatch(content_type):
        content_type = "application/octet-stream"
    return Response(
        content=item.data,
        headers={
            "Content-Type": content_type,
            "Content-Disposition": disposition,
            "X-Content-Type-Options": "nosniff",
        },
    )


# --- inbound hand-over -------------------------------------------------------------------------


@router.post("/v1/inbound", status_code=201)
async def post_inbound(
    request: Request, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params = request.query_params
    if content_type == "application/json":
        try:
            data = InboundJSON.model_validate_json(body)
            raw = base64.b64decode(data.raw_base64, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise MalformedRequest(
                'send {"raw_base64", "mail_from", "rcpt_to"} or a message/rfc822 body',
                code="invalid_inbound_body",
            ) from exc
        rcpt = [data.rcpt_to] if isinstance(data.rcpt_to, str) else data.rcpt_to
        mail_from, peer, helo = data.mail_from, data.peer_ip, data.helo
    else:
        raw = body
        rcpt = params.getlist("rcpt_to") or None
        mail_from, peer, helo = params.get("mail_from"), params.get("peer_ip"), params.get("helo")
    return await asyncio.to_thread(
        inbound.accept_raw,
        svc,
        actor,
        raw,
        mail_from=mail_from,
        rcpt_to=rcpt,
        peer_ip=peer,
        helo=helo,
    )


# --- REST inbox -------------------------------------------------------------------------------


@router.get("/v1/mailboxes/{mailbox}/emails")
def list_emails(
    mailbox: str,
    filters: inbox.EmailFilters = Depends(_filters),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        return inbox.list_emails(conn, actor, mailbox=mailbox, filters=filters)


@router.get("/v1/mailboxes/{mailbox}/emails/wait")
async def wait_in_mailbox(
    mailbox: str,
    wait_s: float = Query(30.0, alias="timeout", ge=0, le=inbox.MAX_WAIT_SECONDS),
    since_id: str | None = None,
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    return await inbox.wait_for_email(
        svc, actor, mailbox=mailbox, timeout_s=wait_s, since_id=since_id
    )


@router.get("/v1/mailboxes/{mailbox}/emails/{email_id}")
def read_email(
    mailbox: str, email_id: str, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return inbox.read_email(conn, actor, email_id, mailbox=mailbox)


@router.get("/v1/mailboxes/{mailbox}/emails/{email_id}/tags")
def get_tags(
    mailbox: str, email_id: str, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.read() as conn:
        return inbox.get_tags(conn, actor, email_id, mailbox=mailbox)


@router.put("/v1/mailboxes/{mailbox}/emails/{email_id}/tags")
def put_tags(
    mailbox: str,
    email_id: str,
    tags: dict[str, Any] | list[str],
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.write() as conn:
        return inbox.set_tags(conn, actor, email_id, tags, mailbox=mailbox)


@router.delete("/v1/mailboxes/{mailbox}/emails/{email_id}/tags/{key}")
def delete_tag(
    mailbox: str,
    email_id: str,
    key: str,
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.write() as conn:
        return inbox.delete_tag(conn, actor, email_id, key, mailbox=mailbox)


@router.get("/v1/mailboxes/{mailbox}/emails/{email_id}/attachments/{filename}")
def get_attachment(
    mailbox: str,
    email_id: str,
    filename: str,
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Response:
    with svc.db.read() as conn:
        item = inbox.download_attachment(conn, actor, email_id, filename, mailbox=mailbox)
    return _attachment_response(item)


@router.get("/v1/mailboxes/{mailbox}/threads/{thread_id:path}")
def get_thread(
    mailbox: str,
    thread_id: str,
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        return inbox.get_thread(conn, actor, thread_id, mailbox=mailbox)


@router.get("/v1/emails")
def list_account_emails(
    mailbox_id: str | None = None,
    filters: inbox.EmailFilters = Depends(_filters),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        return inbox.list_emails(conn, actor, mailbox=mailbox_id, filters=filters)


@router.get("/v1/emails/wait")
async def wait_in_account(
    mailbox_id: str | None = Query(None, max_length=320),
    wait_s: float = Query(30.0, alias="timeout", ge=0, le=inbox.MAX_WAIT_SECONDS),
    since_id: str | None = None,
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    return await inbox.wait_for_email(
        svc, actor, mailbox=mailbox_id, timeout_s=wait_s, since_id=since_id
    )


@router.get("/v1/emails/{email_id}")
def read_account_email(
    email_id: str,
    mailbox_id: str | None = Query(None, max_length=320),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    """The full message with ``dkim_verified`` and ``reviewer`` (marks unread as read)."""
    return inbox.read_email_verified(svc, actor, email_id, mailbox=mailbox_id)


@router.put("/v1/emails/{email_id}/tags")
def put_account_tags(
    email_id: str,
    tags: dict[str, Any] | list[str],
    mailbox_id: str | None = Query(None, max_length=320),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.write() as conn:
        return inbox.set_tags(conn, actor, email_id, tags, mailbox=mailbox_id)


@router.get("/v1/emails/{email_id}/attachments/{filename}")
def get_account_attachment(
    email_id: str,
    filename: str,
    mailbox_id: str | None = Query(None, max_length=320),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Response:
    with svc.db.read() as conn:
        item = inbox.download_attachment(conn, actor, email_id, filename, mailbox=mailbox_id)
    return _attachment_response(item)


@router.get("/v1/threads/{thread_id:path}")
def get_account_thread(
    thread_id: str,
    mailbox_id: str | None = Query(None, max_length=320),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        return inbox.get_thread(conn, actor, thread_id, mailbox=mailbox_id)


@router.post("/v1/emails/{email_id}/report-spam")
def report_spam(
    email_id: str, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return inbox.report_spam(conn, actor, email_id)


@router.post("/v1/emails/{email_id}/not-spam")
def not_spam(
    email_id: str, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return inbox.mark_not_spam(conn, actor, email_id)


@router.get("/v1/usage")
def get_usage(
    period: str = "summary", actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.read() as conn:
        return inbox.usage(conn, actor, svc, period=period)
