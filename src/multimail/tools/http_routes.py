"""Tool-named HTTP endpoints (SPEC §5.2), generated from the catalogue.

Every tool is ``POST /{tool}`` with its arguments as JSON, and read-only tools are also
``GET /{tool}?…``. Each endpoint runs the tool's plan against the REST routes of the same
application, in-process, with the caller's own credentials: the behaviour (checks, errors,
audit, rate limit) is the REST API's, and the answer adds the short field names the guides
read. The REST answer's rate-limit headers are passed on, on success and error alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.routing import Match

from multimail.api.deps import get_services, raw_api_key
from multimail.api.errors import BodyRefused, error_response
from multimail.api.limits import parse_json
from multimail.client import AsyncMultimailClient, MultimailAPIError, RateLimitError
from multimail.errors import AuthenticationFailed
from multimail.services import keys
from multimail.tools.catalog import TOOLS, Tool

_FORWARDED = ("authorization", "x-api-key")
# What the REST answer tells the caller about their key's rate limit (SPEC §12).
_PASSED_ON = (
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "RateLimit-Policy",
)
INTERNAL_BASE_URL = "http://multimail.internal"


def in_process_client(app: FastAPI, headers: Any) -> AsyncMultimailClient:
    """A client of ``app`` itself that acts with the caller's credentials."""
    forwarded = {name: headers[name] for name in _FORWARDED if name in headers}
    return AsyncMultimailClient(
        base_url=INTERNAL_BASE_URL,
        # Each caller's default mailbox is their key's; the server's environment is not theirs.
        mailbox_id="",
        headers=forwarded,
        transport=httpx.ASGITransport(app=app),
        max_retries=0,
    )


async def _arguments(request: Request) -> dict[str, Any] | JSONResponse:
    if request.method == "GET":
        args: dict[str, Any] = {}
        for key in request.query_params:
            values = request.query_params.getlist(key)
            args[key] = values if len(values) > 1 else values[0]
        return args
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = parse_json(raw)
    except BodyRefused as exc:
        return error_response(exc.status_code, str(exc.detail), exc.code)
    except (ValueError, RecursionError):
        return error_response(400, "the request body is not valid JSON", "malformed_json")
    if not isinstance(data, dict):
        return error_response(422, "send the tool's arguments as a JSON object", "invalid_body")
    return data


def _passed_on(headers: Mapping[str, str]) -> dict[str, str]:
    """The rate-limit headers of the inner REST answer (``headers`` looks names up in any
    case, as ``httpx.Headers`` does)."""
    return {name: headers[name] for name in _PASSED_ON if name in headers}


def _endpoint(tool: Tool) -> Any:
    async def run_tool(request: Request) -> JSONResponse:
        # Who is asking comes first: a missing or revoked key is a 401 whatever the arguments.
        services = get_services(request)
        try:
            await asyncio.to_thread(keys.authenticate, services.db, raw_api_key(request))
        except AuthenticationFailed as exc:
            return JSONResponse(exc.to_dict(), status_code=exc.status)
        args = await _arguments(request)
        if isinstance(args, JSONResponse):
            return args
        client = in_process_client(request.app, request.headers)
        try:
            answer = await client.answer_tool(tool.name, args)
        except MultimailAPIError as exc:
            headers = _passed_on(exc.headers)
            if isinstance(exc, RateLimitError):
                headers.setdefault("Retry-After", str(int(exc.retry_after)))
            return JSONResponse(exc.body, status_code=exc.status, headers=headers or None)
        finally:
            await client.aclose()
        return JSONResponse(
            answer.result, status_code=answer.status, headers=_passed_on(answer.headers) or None
        )

    run_tool.__name__ = f"tool_{tool.name}"
    run_tool.__doc__ = tool.description
    return run_tool


def _served(app: FastAPI, method: str, path: str) -> bool:
    """Whether a route already answers ``method path`` (asked the way Starlette routes, so
    routes inside included routers count too)."""
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)


def _body(tool: Tool, components: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of ``POST /{tool}``: the tool's input model, so generated
    clients and schemathesis see the same arguments MCP advertises."""
    schema = tool.input.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    return {"required": False, "content": {"application/json": {"schema": schema}}}


def _with_components(app: FastAPI, components: dict[str, Any]) -> None:
    """Add the input models' nested schemas to the document FastAPI generates."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            document.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def install_tool_routes(app: FastAPI) -> list[str]:
    """Add ``/{tool}`` routes for every tool; call after the hand-written routers are included.

    No router should hand-write a tool-named path (a unit test keeps it so: one definition per
    tool). Should one appear, it is left to answer (the first match wins in Starlette anyway),
    and so is a tool whose plan itself uses its tool-named path; both are returned as
    ``"METHOD /path"`` so that test can name them.
    """
    skipped: list[str] = []
    components: dict[str, Any] = {}
    for tool in TOOLS:
        path = f"/{tool.name}"
        methods = ["POST", "GET"] if tool.read_only else ["POST"]
        for method in methods:
            if _served(app, method, path) or tool.route.path == path:
                skipped.append(f"{method} {path}")
                continue
            app.add_api_route(
                path,
                _endpoint(tool),
                methods=[method],
                name=f"{tool.name}_{method.lower()}",
                summary=tool.title,
                description=tool.description,
                tags=["tools"],
                response_class=JSONResponse,
                openapi_extra={"requestBody": _body(tool, components)}
                if method == "POST"
                else None,
            )
    _with_components(app, components)
    return skipped
