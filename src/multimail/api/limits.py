"""Request limits enforced before the app sees a request: body size (before the body is read
into memory), NUL characters, which no field of ours can hold (PostgreSQL text refuses
them, SMTP forbids them) and which must be a clear 422, not a database error, and unpaired
UTF-16 surrogates in a JSON body (``json.loads`` reads the escape ``"\\ud83d"`` as one), which
no UTF-8 text can hold: stored, they fail the response and every later reading (422
``invalid_text``).

Also the JSON parse the send routes share (:func:`parse_json`): ``json.loads`` refusing the
non-finite numbers it would otherwise accept."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multimail.api.errors import BodyRefused

# Where BodySizeLimit leaves the whole body it read, for a route that would rather not read it
# again through the ASGI receive channel (the send routes, ``routers/outbound.py``).
BODY_SCOPE_KEY = "multimail.body"

_NUL_ERROR = "the request contains a NUL character (\\u0000 or %00); remove it and try again"

# What a lone surrogate looks like before the parse: the escape (a pair is two of them), or
# its UTF-8-style bytes, which json.loads decodes with "surrogatepass". Bodies without any
# (nearly all) are not parsed here.
_SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE_TEXT_HINT = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
    if b"x-www-form-urlencoded" in content_type:
        if b"%00" in body:
            return 422, {"error": _NUL_ERROR, "code": "nul_character"}
        return None
    if content_type.startswith(b"multipart/"):
        return None
    # Any other body may be read as JSON: FastAPI reads application/json, */*+json and a
    # body with no type at all, the tool routes (POST /send_email ...) a body of any type.
    # A body that is not JSON passes: its route refuses it or reads it otherwise.
    return _json_refusal(body)


def _json_refusal(body: bytes) -> tuple[int, dict[str, Any]] | None:
    """The refusal of a JSON body holding a NUL or an unpaired surrogate, else None. Only
    bodies with the text of either pay for a parse."""
    # json.loads also reads UTF-16 and UTF-32 (guessing from the first bytes), where the
    # escape's bytes differ from its UTF-8 (ASCII) form: look in the text json.loads reads.
    # Such a body has a NUL byte or a UTF-16/32 byte order mark in its first four bytes.
    head = body[:4]
    text: bytes | str = body
    if b"\x00" not in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
        nul = b"\\u0000" in body
        # Two substring scans (memchr-fast) spare the pattern's scan of a large body.
        surrogate = (b"\\u" in body or b"\xed" in body) and bool(_SURROGATE_HINT.search(body))
    else:
        encoding = json.detect_encoding(head)
        try:
            text = body.decode(encoding, "surrogatepass")
        except UnicodeDecodeError:
            return None  # not JSON json.loads can read: the route's parser answers 400
        nul = "\\u0000" in text
        surrogate = _SURROGATE_TEXT_HINT.search(text) is not None
    if not (nul or surrogate):
        return None
    # The escapes can also be text (a backslash, then "u0000"): parse to be sure.
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None  # not JSON we can read: the route's parser answers 400
    if nul and _has_nul(value):
        return 422, {"error": _NUL_ERROR, "code": "nul_character"}
    found = _lone_surrogate(value) if surrogate else None
    if found is None:
        return None
    char, where = found
    return 422, {
        "error": f"the request body contains an unpaired UTF-16 surrogate (\\u{ord(char):04x}) "
        f"{where}: send valid Unicode (text cut in the middle of an emoji or another "
        "character written as a surrogate pair, for example, must be cut before or after it)",
        "code": "invalid_text",
    }


def _child_path(path: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _lone_surrogate(value: Any) -> tuple[str, str] | None:
    """The first unpaired surrogate in a parsed body (in a string or a key, at any depth)
    and where it is ("at metadata.note", "in a key of metadata"); None if there is none."""
    # Iterative, as _has_nul; children pushed in reverse so the first in the text is found.
    pending: list[tuple[Any, str]] = [(value, "")]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return found.group(), f"at {path or 'the top level'}"
        elif isinstance(item, dict):
            for key in item:
                found = _SURROGATE.search(key)
                if found:
                    return found.group(), f"in a key of {path or 'the top-level object'}"
            pending.extend((item[k], _child_path(path, k)) for k in reversed(list(item)))
        elif isinstance(item, list):
            pending.extend((item[i], f"{path}[{i}]") for i in reversed(range(len(item))))
    return None


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
