"""Public identity documents and message verification (SPEC §3)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from multimail.api.deps import READ, get_services
from multimail.errors import InvalidInput, MalformedRequest
from multimail.services import identity
from multimail.services.context import Actor, Services

router = APIRouter()


@router.get("/.well-known/multimail/keys")
@router.get("/.well-known/multimail-signing-key")
def public_keys(svc: Services = Depends(get_services)) -> Any:
    """Current and retired Ed25519 public keys (JWKS); no key needed."""
    return identity.public_keys_document(svc)


@router.get("/v1/identity/{address}")
def identity_document(address: str, svc: Services = Depends(get_services)) -> Any:
    """A mailbox's identity: operator, oversight mode, the keys its mail is signed with."""
    with svc.db.read() as conn:
        return identity.identity_document(conn, svc, address)


def _raw_from_json(body: bytes) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        raise MalformedRequest("the body is not valid JSON", code="malformed_json") from None
    if not isinstance(data, dict):
        raise InvalidInput('send {"raw": "<the message>"} or the message itself')
    if isinstance(data.get("raw_base64"), str):
        try:
            return base64.b64decode(data["raw_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("raw_base64 is not base64", field="raw_base64") from None
    for name in ("raw", "message", "eml"):
        if isinstance(data.get(name), str):
            return str(data[name]).encode("utf-8", "surrogateescape")
    raise InvalidInput("send the message as raw, raw_base64, or a message/rfc822 body", field="raw")


@router.post("/v1/verify")
async def verify_message(
    request: Request, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    """Check a raw message: DKIM, identity token signature, body hash, Message-ID."""
    body = await request.body()
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        body = _raw_from_json(body)
    # DNS lookups for DKIM block: keep them off the event loop.
    return await run_in_threadpool(identity.verify_raw_message, svc, body)
