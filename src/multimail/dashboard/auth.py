"""Dashboard sign-in: the session cookie, CSRF checks, and the routes that render errors.

Every dashboard route runs through :class:`DashboardRoute`, which turns service errors into
HTML pages (not the API's JSON) and a missing session into a redirect to the sign-in page.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from multimail.dashboard.render import render
from multimail.errors import AuthenticationFailed, InvalidInput, MultimailError, RateLimited
from multimail.services import operators
from multimail.services.context import Actor, Services
from multimail.services.operators import OperatorSession

SESSION_COOKIE = "mm_session"
LOGIN_COOKIE = "mm_login_csrf"
PREFIX = "/dashboard"


class NotSignedIn(Exception):
    """No valid session: send the browser to the sign-in page."""


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def secure_cookies(services: Services) -> bool:
    return services.settings.base_url.startswith("https://")


def safe_next(value: str | None) -> str:
    """Only our own pages: an open redirect after sign-in would help phishing."""
    if value and value.startswith(PREFIX + "/") and not any(c in value for c in ("\\", "\n", "\r")):
        return value
    return f"{PREFIX}/queue"


def current_session(request: Request) -> OperatorSession:
    try:
        session = operators.session_for(
            services_of(request).db, request.cookies.get(SESSION_COOKIE)
        )
    except AuthenticationFailed:
        raise NotSignedIn() from None
    request.state.operator = session
    return session


def operator_actor(session: OperatorSession = Depends(current_session)) -> Actor:
    return session.actor


async def checked_form(
    request: Request, session: OperatorSession = Depends(current_session)
) -> dict[str, str]:
    """The posted form, once its CSRF token matched the session's (else 403)."""
    form = await request.form()
    submitted = form.get("csrf_token") or request.headers.get("x-csrf-token")
    operators.check_csrf(session, submitted if isinstance(submitted, str) else None)
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def checked_choices(
    request: Request, session: OperatorSession = Depends(current_session)
) -> dict[str, list[str]]:
    """Like :func:`checked_form`, keeping every value of a repeated field (checkboxes)."""
    form = await request.form()
    submitted = form.get("csrf_token") or request.headers.get("x-csrf-token")
    operators.check_csrf(session, submitted if isinstance(submitted, str) else None)
    fields: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields.setdefault(key, []).append(value)
    return fields


def set_session_cookie(response: Response, services: Services, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(operators.SESSION_LIFETIME.total_seconds()),
        path=PREFIX,
        httponly=True,
        samesite="lax",
        secure=secure_cookies(services),
    )


def set_login_cookie(response: Response, services: Services, token: str) -> None:
    """Double-submit token for the sign-in form, which has no session to bind to yet."""
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=3600,
        path=f"{PREFIX}/login",
        httponly=True,
        samesite="strict",
        secure=secure_cookies(services),
    )


def _error_page(request: Request, exc: MultimailError) -> Response:
    status = exc.status if exc.status >= 400 else 400
    response = render(
        request,
        "error.html",
        status_code=status,
        title={404: "Not found", 403: "Not allowed", 409: "Already decided or changed"}.get(
            status, "That did not work"
        ),
        message=exc.message,
        code=exc.code,
    )
    if isinstance(exc, RateLimited):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


class DashboardRoute(APIRoute):
    """Errors as HTML pages; no session → the sign-in page, then back here."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except NotSignedIn:
                target = request.url.path
                if request.method != "GET":
                    target = f"{PREFIX}/queue"
                return RedirectResponse(
                    f"{PREFIX}/login?next={quote(target, safe='/')}", status_code=303
                )
            except MultimailError as exc:
                return _error_page(request, exc)
            except RequestValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'form'}: {e.get('msg')}"
                    for e in exc.errors()
                )
                return _error_page(
                    request, InvalidInput(problems or "invalid form", code="validation_error")
                )

        return route


# --- the sign-in routes ----------------------------------------------------------------------

router = APIRouter(prefix=PREFIX, route_class=DashboardRoute, include_in_schema=False)


def _login_page(
    request: Request, *, error: str | None, email: str, next_page: str, status_code: int = 200
) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        status_code=status_code,
        error=error,
        email=email,
        next=next_page,
        csrf=token,
    )
    set_login_cookie(response, services_of(request), token)
    return response


@router.get("/login")
def login_form(request: Request) -> Response:
    return _login_page(
        request, error=None, email="", next_page=safe_next(request.query_params.get("next"))
    )


@router.post("/login")
async def login(request: Request) -> Response:
    services = services_of(request)
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    next_page = safe_next(fields.get("next"))
    email = fields.get("email", "")[:320]
    expected = request.cookies.get(LOGIN_COOKIE) or ""
    submitted = fields.get("csrf_token") or ""
    if not expected or not hmac.compare_digest(expected.encode(), submitted.encode()):
        return _login_page(
            request,
            error="The sign-in form expired. Please try again.",
            email=email,
            next_page=next_page,
            status_code=403,
        )
    client = request.client.host if request.client else "unknown"
    try:
        signed = await run_in_threadpool(
            operators.sign_in,
            services.db,
            email=email,
            password=fields.get("password", ""),
            client=client,
        )
    except RateLimited as exc:
        response = _login_page(
            request, error=exc.message, email=email, next_page=next_page, status_code=429
        )
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except AuthenticationFailed as exc:
        return _login_page(
            request, error=exc.message, email=email, next_page=next_page, status_code=401
        )
    response = RedirectResponse(next_page, status_code=303)
    set_session_cookie(response, services, signed.token)
    response.delete_cookie(LOGIN_COOKIE, path=f"{PREFIX}/login")
    return response


@router.post("/logout")
async def logout(request: Request, form: dict[str, str] = Depends(checked_form)) -> Response:
    await run_in_threadpool(
        operators.sign_out, services_of(request).db, request.cookies.get(SESSION_COOKIE)
    )
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return response
