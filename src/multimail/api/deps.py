"""Request dependencies: the services, the authenticated actor, scope checks, rate limits."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import Request, Response
from sqlalchemy import Connection

from multimail.api.ratelimit import DatabaseBuckets, Decision, Limiter, make_limiter
from multimail.domain.scopes import Scope
from multimail.errors import RateLimited
from multimail.services import keys
from multimail.services.context import Actor, Services

T = TypeVar("T")


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


def _refuse_or_admit(request: Request, actor: Actor, decision: Decision) -> Actor:
    if not decision.allowed:
        exc = RateLimited(
            f"too many requests for this API key; retry after {decision.retry_after} s",
            retry_after=decision.retry_after,
        )
        exc.headers = decision.headers()  # type: ignore[attr-defined]
        raise exc
    request.state.actor = actor
    return actor


def _admit_alone(request: Request, raw_key: str | None) -> tuple[Actor, Decision]:
    """The caller's key and one rate-limit token, in a transaction of their own."""
    limiter = request_limiter(request)
    if isinstance(limiter, DatabaseBuckets):
        # The key lookup (revocation included) and the bucket in one transaction.
        with limiter.transaction() as conn:
            actor = keys.authenticate_in(conn, raw_key)
            decision = limiter.take_in(conn, actor.id or "")
    else:
        actor = keys.authenticate(get_services(request).db, raw_key)
        decision = limiter.take(actor.id or "")
    return _refuse_or_admit(request, actor, decision), decision


def authenticated(request: Request, response: Response) -> Actor:
    actor, decision = _admit_alone(request, raw_api_key(request))
    for name, value in decision.headers().items():
        response.headers[name] = value
    return actor


class RequestGate:
    """``sending.Gate`` for one request: its key and its rate-limit token, taken by the
    service in the send's own transaction (one transaction and one thread hop per send
    instead of a dependency's and then the endpoint's). Refusals are those of
    :func:`authenticated`; the granted token's headers wait in :attr:`headers`."""

    def __init__(self, request: Request, raw_key: str | None) -> None:
        self._request = request
        self._raw_key = raw_key
        self.headers: dict[str, str] = {}

    def admit(self, conn: Connection) -> Actor:
        limiter = request_limiter(self._request)
        actor = keys.authenticate_in(conn, self._raw_key)
        if isinstance(limiter, DatabaseBuckets):
            decision = limiter.take_in(conn, actor.id or "")
        else:
            decision = limiter.take(actor.id or "")
        _refuse_or_admit(self._request, actor, decision)
        self.headers = decision.headers()
        return actor

    def admit_alone(self) -> Actor:
        actor, decision = _admit_alone(self._request, self._raw_key)
        self.headers = decision.headers()
        return actor


def require(scope: Scope) -> Callable[[Request, Response], Actor]:
    def dependency(request: Request, response: Response) -> Actor:
        actor = authenticated(request, response)
        actor.require(scope)
        return actor

    dependency.__name__ = f"require_{scope.value}"
    return dependency


def admitted_later(scope: Scope) -> Callable[[Request], Awaitable[str | None]]:
    """The key of a route whose service admits the caller itself (``RequestGate``).

    Async, so it costs no thread hop; a missing or malformed key is refused here at once,
    as :func:`require` would. Named like :func:`require`'s dependency: the route needs
    ``scope`` (the service checks it right after admitting the key)."""

    async def dependency(request: Request) -> str | None:
        raw_key = raw_api_key(request)
        keys.check_format(raw_key)
        return raw_key

    dependency.__name__ = f"require_{scope.value}"
    return dependency


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _worker_pool() -> ThreadPoolExecutor:
    # Built per process: a pool inherited through fork has no live threads behind it.
    global _pool, _pool_pid
    pid = os.getpid()
    with _pool_lock:
        if _pool is None or _pool_pid != pid:
            _pool = ThreadPoolExecutor(max_workers=40, thread_name_prefix="multimail-request")
            _pool_pid = pid
        return _pool


async def in_thread(function: Callable[[], T]) -> T:
    """Run ``function`` in a worker thread: one plain executor hand-off, without the
    per-call cancel scopes and task lookups of anyio's ``to_thread`` (measured ~12% of a
    send's CPU for a dependency and an endpoint). Context variables go along, as with
    FastAPI's own hop."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    return await loop.run_in_executor(_worker_pool(), context.run, function)


READ = require(Scope.READ)
SEND = require(Scope.SEND)
OVERSIGHT = require(Scope.OVERSIGHT)
ADMIN = require(Scope.ADMIN)
