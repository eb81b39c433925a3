"""``LeanRoute``: a FastAPI route that handles its common request without FastAPI's resolver.

FastAPI's request handler reads the body through the ASGI stream, parses the content type with
``email.message``, builds a sub-response and resolves every parameter in
``solve_dependencies``. For the send routes that was ~0.15 ms of the event loop per send
(``bench/profile_send.py``, the ``multimail-live`` thread), a quarter of the loop's work.

A ``LeanRoute`` is still a plain ``APIRoute`` to FastAPI (the OpenAPI document, the route
table, exception handling, ``request_response``'s exit stacks). Its handler does FastAPI's
steps itself, in FastAPI's order, when a request is one it can take whole:

- the body is JSON (``content-type: application/json`` exactly) that ``BodySizeLimit`` has
  already read (``BODY_SCOPE_KEY``);
- no dependency overrides are set and FastAPI's telemetry is off for the request.

Then the body is parsed (:func:`~multimail.api.limits.parse_json`), the dependencies run, and
the body is validated; a validation error is raised as FastAPI raises it. A body that does
not parse goes to FastAPI's own handler with the parse's outcome, so it is answered as it
always was without being parsed twice; so does every other request (no body, another content
type), whose body FastAPI parses with the same ``parse_json``. The route's shape is checked
when the handler is built; a route outside it (a query or header parameter, a constrained path
parameter, a dependency that takes more than the request or is named twice, a concurrency
limit, a body-size limit of its own, a field of FastAPI's ``Dependant`` this module does not
know) always uses FastAPI's handler.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from typing import Any

import fastapi.routing
from fastapi import Request, Response, params
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.telemetry import get_telemetry_data

from multimail.api.limits import BODY_SCOPE_KEY, parse_json

__all__ = ["LeanRoute"]

_Handler = Callable[[Request], Coroutine[Any, Any, Response]]

# FastAPI builds an included route's handler with the inclusion's effective route (its
# router-level dependencies included) in this context variable. Without it the inclusion's
# dependencies cannot be seen, so no lean handler is built.
_EFFECTIVE: ContextVar[Any] | None = getattr(fastapi.routing, "_effective_route_context_var", None)

# The fields of FastAPI's Dependant that _lean_shape checks. A field FastAPI adds later (as
# 0.165 added ``concurrency``) may mean work the lean handler does not do: such a route keeps
# FastAPI's handler until the field is looked at here.
_KNOWN_DEPENDANT_FIELDS = frozenset(
    {
        "path_params",
        "query_params",
        "header_params",
        "cookie_params",
        "body_params",
        "dependencies",
        "name",
        "call",
        "request_param_name",
        "websocket_param_name",
        "http_connection_param_name",
        "response_param_name",
        "background_tasks_param_name",
        "security_scopes_param_name",
        "own_oauth_scopes",
        "parent_oauth_scopes",
        "use_cache",
        "path",
        "scope",
        "concurrency",
    }
)


def _plain(dependant: Dependant) -> bool:
    """Nothing but the request, path parameters and a body: no other parameter, no
    concurrency limit, no OAuth scopes."""
    return (
        not (dependant.query_params or dependant.header_params or dependant.cookie_params)
        and dependant.response_param_name is None
        and dependant.background_tasks_param_name is None
        and dependant.security_scopes_param_name is None
        and dependant.http_connection_param_name is None
        and dependant.websocket_param_name is None
        and not dependant.own_oauth_scopes
        and dependant.concurrency is None
        and inspect.iscoroutinefunction(dependant.call)
    )


def _takes_only_request(dependency: Dependant) -> bool:
    return (
        _plain(dependency)
        and dependency.name is not None
        and dependency.request_param_name is not None
        and not dependency.dependencies
        and not (dependency.path_params or dependency.body_params)
    )


def _lean_shape(route: Any) -> bool:
    """Whether ``route`` (the route or its effective inclusion) has only what the lean
    handler resolves: unconstrained ``str`` path parameters, the request, one JSON body and
    async dependencies of the request alone, each named once."""
    dependant: Dependant = route.dependant
    body = route.body_field
    calls = [sub.call for sub in dependant.dependencies]
    return (
        {field.name for field in dataclasses.fields(Dependant)} <= _KNOWN_DEPENDANT_FIELDS
        and body is not None
        and type(body.field_info) is params.Body
        and len(dependant.body_params) == 1
        and not route._embed_body_fields
        and getattr(route, "max_body_size", None) is None
        and dependant.request_param_name is not None
        and _plain(dependant)
        # A constraint (``Path(max_length=...)``) is validation FastAPI does and this does not.
        and all(
            field.field_info.annotation is str and not field.field_info.metadata
            for field in dependant.path_params
        )
        and all(_takes_only_request(sub) for sub in dependant.dependencies)
        # FastAPI runs a dependency named twice once (its cache); this would run it twice.
        and len({id(call) for call in calls}) == len(calls)
    )


class _ParsedOnce(Request):
    """The request FastAPI's handler is given: ``json()`` parses with :func:`parse_json`
    (non-finite numbers refused, as on the lean path), and a parse the lean handler already
    tried is not tried again: its outcome is raised."""

    failure: Exception | None = None

    async def json(self) -> Any:
        if self.failure is not None:
            raise self.failure
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


def _for_fastapi(request: Request) -> _ParsedOnce:
    return _ParsedOnce(request.scope, request.receive, request._send)


class LeanRoute(APIRoute):
    """An ``APIRoute`` whose handler skips FastAPI's resolver for a well-formed JSON request
    (see the module docstring)."""

    def get_route_handler(self) -> _Handler:
        fastapis = super().get_route_handler()

        async def full(request: Request) -> Response:
            return await fastapis(_for_fastapi(request))

        if _EFFECTIVE is None:
            return full
        effective = _EFFECTIVE.get()
        route: Any = effective if getattr(effective, "original_route", None) is self else self
        if not _lean_shape(route):
            return full
        dependant: Dependant = route.dependant
        endpoint, request_name = dependant.call, dependant.request_param_name
        assert endpoint is not None and request_name is not None  # as _lean_shape checked
        body_field = route.body_field
        body_name = dependant.body_params[0].name
        path_names = [(field.name, field.alias) for field in dependant.path_params]
        dependencies: list[tuple[str, Callable[..., Awaitable[Any]], str]] = []
        for sub in dependant.dependencies:
            assert sub.name is not None and sub.call is not None and sub.request_param_name
            dependencies.append((sub.name, sub.call, sub.request_param_name))
        overrides_provider = route.dependency_overrides_provider

        async def handler(request: Request) -> Response:
            scope = request.scope
            raw = scope.get(BODY_SCOPE_KEY)
            if (
                not raw
                or request.headers.get("content-type") != "application/json"
                or getattr(overrides_provider, "dependency_overrides", None)
                or get_telemetry_data() is not None
            ):
                return await fastapis(_for_fastapi(request))
            try:
                data = parse_json(raw)
            except Exception as exc:
                # FastAPI's handler answers it (a 400, before any dependency) from this outcome,
                # as from its own parse: malformed JSON, a body nested past the recursion
                # limit, a non-finite number (BodyRefused, which FastAPI passes on).
                unparsed = _for_fastapi(request)
                unparsed._body = raw
                unparsed.failure = exc
                return await fastapis(unparsed)
            # In FastAPI's order: sub-dependencies, path parameters, then the body's
            # validation (so a caller without a key is refused before the body is looked at).
            values: dict[str, Any] = {}
            for name, call, request_param in dependencies:
                values[name] = await call(**{request_param: request})
            path_params = request.path_params
            for name, alias in path_names:
                values[name] = path_params[alias]
            body, errors = body_field.validate(data, {}, loc=("body",))
            if errors:
                raise RequestValidationError(errors, body=data)
            values[request_name] = request
            values[body_name] = body
            response = await endpoint(**values)
            if not isinstance(response, Response):
                raise TypeError("a LeanRoute endpoint returns its Response itself")
            return response

        return handler
