"""Request limits enforced before the app sees a request: body size (before the body is read
into memory) and NUL characters, which no field of ours can hold (PostgreSQL text refuses
them, SMTP forbids them) and which must be a clear 422, not a database error.

Also the JSON parse the send routes share (:func:`parse_json`): ``json.loads`` refusing the
non-finite numbers it would otherwise accept."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multimail.api.errors import BodyRefused

# Where BodySizeLimit leaves the whole body it read, for a route that would rather not read it
# again through the ASGI receive channel (the send routes, ``routers/outbound.py``).
BODY_SCOPE_KEY = "multimail.body"

_NUL_ERROR = "the request contains a NUL character (\\u0000 or %00); remove it and try again"


def _refuse_constant(name: str) -> Any:
    raise BodyRefused(
        400,
        f"the body holds {name}, which is not a JSON number (nor is any infinite number); send "
        "it as a string or null",
        "non_finite_number",
    )


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise BodyRefused(
            400,
            f"the body holds the number {shown}, which is too large for a 64-bit float; send it "
            "as a string",
            "non_finite_number",
        )
    return number


def parse_json(raw: bytes) -> Any:
    """``json.loads(raw)`` (what Starlette's ``Request.json()`` does), but NaN, Infinity and
    numbers beyond a float's range (``1e999``) are refused with :class:`BodyRefused` (400,
    ``non_finite_number``): Python reads them, but they are not JSON, so a message holding
    one could be stored and then fail every later reading of it (the 202 itself included).
    Any other failure is ``json.loads``'s own exception."""
    return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)


def _has_nul(value: Any) -> bool:
    # Iterative: a body nested as deep as the parser allows must not overflow the stack here.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _content_type(scope: Scope) -> bytes:
    # The first header, as Starlette's ``Headers.get`` (and so every route) reads it.
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return bytes(value).lower()
    return b""


def _refusal(scope: Scope, body: bytes) -> tuple[int, dict[str, Any]] | None:
    if "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b""):
        return 422, {"error": _NUL_ERROR, "code": "nul_character"}
    content_type = _content_type(scope)
    if b"json" in content_type:
        if _json_has_nul(body):
            return 422, {"error": _NUL_ERROR, "code": "nul_character"}
    elif b"x-www-form-urlencoded" in content_type and b"%00" in body:
        return 422, {"error": _NUL_ERROR, "code": "nul_character"}
    return None


def _json_has_nul(body: bytes) -> bool:
    """Whether a JSON body holds a NUL: JSON can only write one as the escape ``\\u0000``
    (the parser refuses a raw one). Only bodies with that text pay for a parse."""
    # json.loads also reads UTF-16 and UTF-32 (guessing from the first bytes), where the
    # escape's bytes differ from its UTF-8 (ASCII) form: look in the text json.loads reads.
    # Such a body has a NUL byte or a UTF-16/32 byte order mark in its first four bytes.
    head = body[:4]
    text: bytes | str = body
    if b"\x00" not in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
        if b"\\u0000" not in body:
            return False
    else:
        encoding = json.detect_encoding(head)
        try:
            text = body.decode(encoding, "surrogatepass")
        except UnicodeDecodeError:
            return False  # not JSON json.loads can read: the route's parser answers 400
        if "\\u0000" not in text:
            return False
    # The escape can also be text (a backslash, then "u0000"): parse to be sure.
    try:
        return _has_nul(json.loads(text))
    except (ValueError, RecursionError):
        return False  # not JSON we can read: the route's parser answers 400


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
        # Read the whole body here, counting, so an oversized chunked upload is refused with
        # 413 before the app (whose body parser would turn any error into a 400) sees it.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            body = message.get("body", b"")
            received += len(body)
            if received > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        refusal = _refusal(scope, body)
        if refusal is not None:
            await _answer(send, *refusal)
            return
        scope[BODY_SCOPE_KEY] = body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        await _answer(
            send,
            413,
            {
                "error": f"the request body is larger than {self.max_bytes} bytes",
                "code": "payload_too_large",
                "max_bytes": self.max_bytes,
            },
        )


async def _answer(send: Send, status: int, document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
