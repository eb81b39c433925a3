"""Request dependencies: the services, the authenticated actor, scope checks, rate limits."""

from __future__ import annotations

import threading
from collections.abc import Callable

from fastapi import Request, Response

from multimail.api.ratelimit import DatabaseBuckets, Limiter, make_limiter
from multimail.domain.scopes import Scope
from multimail.errors import RateLimited
from multimail.services import keys
from multimail.services.context import Actor, Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def services_of(request: Request) -> Services:
    """``get_services`` as an async dependency: FastAPI runs a sync dependency in the
    threadpool (a thread hop per request) and this one needs none."""
    return get_services(request)


def raw_api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key")


_limiter_lock = threading.Lock()


def request_limiter(request: Request) -> Limiter:
    """The app's per-key limiter, built once from the settings on first use (the backend
    decides whether buckets are shared by every process on the database)."""
    state = request.app.state
    limiter: Limiter | None = getattr(state, "request_limiter", None)
    if limiter is not None:
        return limiter
    with _limiter_lock:
        built: Limiter | None = getattr(state, "request_limiter", None)
        if built is not None:
            return built
        services = get_services(request)
        settings = services.settings
        limiter = make_limiter(
            services.db,
            backend=settings.rate_limit_backend,
            per_minute=settings.rate_limit_per_minute,
            burst=settings.rate_limit_burst,
        )
        state.request_limiter = limiter
        return limiter


def authenticated(request: Request, response: Response) -> Actor:
    services = get_services(request)
    limiter = request_limiter(request)
    if isinstance(limiter, DatabaseBuckets):
        # The key lookup (revocation included) and the bucket in one transaction.
        with limiter.transaction() as conn:
            actor = keys.authenticate_in(conn, raw_api_key(request))
            decision = limiter.take_in(conn, actor.id or "")
    else:
        actor = keys.authenticate(services.db, raw_api_key(request))
        decision = limiter.take(actor.id or "")
    if not decision.allowed:
        exc = RateLimited(
            f"too many requests for this API key; retry after {decision.retry_after} s",
            retry_after=decision.retry_after,
        )
        exc.headers = decision.headers()  # type: ignore[attr-defined]
        raise exc
    for name, value in decision.headers().items():
        response.headers[name] = value
    request.state.actor = actor
    return actor


def require(scope: Scope) -> Callable[[Request, Response], Actor]:
    def dependency(request: Request, response: Response) -> Actor:
        actor = authenticated(request, response)
        actor.require(scope)
        return actor

    dependency.__name__ = f"require_{scope.value}"
    return dependency


READ = require(Scope.READ)
SEND = require(Scope.SEND)
OVERSIGHT = require(Scope.OVERSIGHT)
ADMIN = require(Scope.ADMIN)
