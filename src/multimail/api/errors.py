"""The one place that turns errors into HTTP: ``{"error": sentence, "code": snake_code, ...}``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from multimail.errors import MultimailError, RateLimited
from multimail.services import audit
from multimail.services.context import Actor

log = logging.getLogger("multimail.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


class BodyRefused(StarletteHTTPException):
    """A body refused while it is parsed (``api/limits.py``), answered with its own ``code``.

    An ``HTTPException`` because FastAPI's handler passes those on from its body reading; any
    other exception there becomes a generic 400 ("There was an error parsing the body")."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status, message)
        self.code = code


def error_response(
    status: int, message: str, code: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "code": code}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _describe_validation(
    errors: list[dict[str, Any]],
) -> tuple[int, str, str, list[dict[str, Any]]]:
    details = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        details.append({"field": ".".join(loc) or None, "problem": err.get("msg", "invalid")})
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON", "malformed_json", details
    first = details[0] if details else {"field": None, "problem": "invalid input"}
    where = f"'{first['field']}'" if first["field"] else "the request"
    message = f"{where}: {first['problem']}"
    if len(details) > 1:
        message += f" (and {len(details) - 1} more problem(s), see 'details')"
    return 422, message, "validation_error", details


# A refused attempt to change something (another account's object, a missing scope, a decision
# already taken, a bypass field) is itself evidence: it goes in the audit log (APP-2).
_AUDITED_REFUSALS = frozenset({403, 404, 409})


async def _audit_refusal(request: Request, exc: MultimailError) -> None:
    actor = getattr(request.state, "actor", None)
    if not isinstance(actor, Actor) or exc.code == "unknown_fields":
        return  # anonymous callers are not recorded; unknown_fields is audited by its service
    services = request.app.state.services

    def record() -> None:
        with services.db.write() as conn:
            audit.append(
                conn,
                actor=actor,
                action="request.refused",
                subject_type="request",
                subject_id=f"{request.method} {request.url.path}"[:200],
                details={"status": exc.status, "code": exc.code, "error": exc.message[:300]},
            )

    try:
        await asyncio.to_thread(record)
    except Exception:  # the refusal must still be answered if the log write fails
        log.exception("could not audit a refused request")


def install(app: FastAPI) -> None:
    @app.exception_handler(MultimailError)
    async def _multimail_error(request: Request, exc: MultimailError) -> JSONResponse:
        if exc.status in _AUDITED_REFUSALS and request.method not in ("GET", "HEAD", "OPTIONS"):
            await _audit_refusal(request, exc)
        headers: dict[str, str] = {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(exc.retry_after)
        headers.update(getattr(exc, "headers", None) or {})
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, code, details = _describe_validation(list(exc.errors()))
        return error_response(status, message, code, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyRefused):
            return error_response(exc.status_code, str(exc.detail), exc.code)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, code, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(
            500,
            "an internal error occurred; nothing was changed by this request. Retry, and if it "
            "persists report it with the time of the request",
            "internal_error",
        )
