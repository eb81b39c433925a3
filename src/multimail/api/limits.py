"""Request limits enforced before the app sees a request: body size (before the body is read
into memory) and NUL characters, which no field of ours can hold (PostgreSQL text refuses
them, SMTP forbids them) and which must be a clear 422, not a database error."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Where BodySizeLimit leaves the whole body it read, for a route that would rather not read it
# again through the ASGI receive channel (the send routes, ``routers/outbound.py``).
BODY_SCOPE_KEY = "multimail.body"

_NUL_ERROR = "the request contains a NUL character (\\u0000 or %00); remove it and try again"


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _nul_in_request(scope: Scope, body: bytes) -> bool:
    if "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b""):
        return True
    content_type = b""
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            content_type = value.lower()
    if b"json" in content_type and b"\\u0000" in body:
        # The escape can also be text (a backslash, then "u0000"): parse to be sure. Only
        # bodies that contain it pay for the parse.
        try:
            return _has_nul(json.loads(body))
        except ValueError:
            return False  # malformed JSON: the route's own parser answers 400
    return b"x-www-form-urlencoded" in content_type and b"%00" in body


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
        if _nul_in_request(scope, body):
            await _answer(send, 422, {"error": _NUL_ERROR, "code": "nul_character"})
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
