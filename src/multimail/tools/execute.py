"""How a tool call becomes REST requests, written once for every transport.

``plan(tool, arguments)`` is a generator: it yields the REST requests to make
(:class:`RestCall`) and receives their answers (:class:`RestResponse`), then returns the
tool's result. A synchronous driver (``MultimailClient``), an asynchronous one
(``AsyncMultimailClient``, which the MCP server and the tool-named routes use) and tests all
drive the same plan, so the four surfaces cannot drift apart.
"""

from __future__ import annotations

import base64
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError as PydanticValidationError

from multimail.errors import InvalidInput, MultimailError
from multimail.tools.catalog import Tool
from multimail.tools.inputs import MAX_WAIT_SECONDS, ToolInput


@dataclass(frozen=True)
class RestCall:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    raw: bool = False  # the answer is bytes (an attachment), not JSON
    # A 404 is an answer, not an error. No plan asks for it since the message tools went
    # account-wide; it stays because the clients' drivers (multimail.client) still read it.
    probe: bool = False
    # A long poll: the server may hold the answer this many seconds before it answers, so the
    # drivers allow that much more than their usual timeout to read it.
    wait: float | None = None


@dataclass(frozen=True)
class RestResponse:
    status: int
    data: Any = None
    content: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


Plan = Generator[RestCall, RestResponse, Any]


def parse_arguments(tool: Tool, arguments: Mapping[str, Any] | None) -> ToolInput:
    """Validate arguments against the tool's model; InvalidInput names each problem."""
    try:
        return tool.input.model_validate(dict(arguments or {}))
    except PydanticValidationError as exc:
        for error in exc.errors():
            # A validator that raised our own error (with its stable code) is answered as is.
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, MultimailError):
                raise cause from None
        details = [
            {"field": ".".join(str(p) for p in e["loc"]) or None, "problem": e["msg"]}
            for e in exc.errors()
        ]
        first = details[0]
        where = f"'{first['field']}'" if first["field"] else tool.name
        raise InvalidInput(
            f"{where}: {first['problem']}", code="validation_error", details=details
        ) from None


def _seg(value: str) -> str:
    return quote(str(value), safe="@")


def _fill(template: str, values: Mapping[str, Any]) -> str:
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", _seg(value))
    return out


def _one_mailbox(default: str | None) -> Generator[RestCall, RestResponse, str]:
    if default:
        return default
    answer = yield RestCall("GET", "/v1/mailboxes")
    found: list[str] = [m["id"] for m in (answer.data or {}).get("mailboxes", [])]
    if len(found) != 1:
        raise InvalidInput(
            f"this key sees {len(found)} mailboxes: say which one with 'mailbox_id' "
            "(its id or address) or 'from'",
            code="mailbox_required",
        )
    return found[0]


def plan(tool: Tool, arguments: Mapping[str, Any] | None, *, default_mailbox: str | None) -> Plan:
    """Yield the REST requests for one tool call and return its result."""
    args = parse_arguments(tool, arguments).merged()
    route = tool.route
    for name in route.drop:
        args.pop(name, None)
    values: dict[str, Any] = {k: args.pop(k) for k in route.path_args if k in args}
    if "{mailbox}" in route.path:
        given = args.pop("mailbox_id", None)
        if given:
            values["mailbox"] = given
        else:
            values["mailbox"] = yield from _one_mailbox(default_mailbox)
    elif route.default_mailbox_query and "mailbox_id" not in args and default_mailbox:
        args["mailbox_id"] = default_mailbox
    path = _fill(route.path, values)
    params = {k: args.pop(k) for k in route.query if k in args}
    params.update(route.const)
    body = args if route.method in ("POST", "PUT", "PATCH") else None
    if body is None and args:
        params.update(args)
    if route.body_key and body is not None:
        body = body.get(route.body_key)
    wait = None
    if route.long_poll:
        # Not given, the server's default applies, which is never beyond the longest wait.
        held = params.get(route.long_poll)
        wait = MAX_WAIT_SECONDS if held is None else float(held)
    answer = yield RestCall(route.method, path, params or None, body, raw=route.raw, wait=wait)
    result = answer.data
    if route.raw:
        result = {
            "filename": values.get("filename"),
            "content_type": answer.headers.get("content-type", "application/octet-stream"),
            "size_bytes": len(answer.content),
            "content_base64": base64.b64encode(answer.content).decode("ascii"),
        }
    return tool.shape(result) if tool.shape else result
