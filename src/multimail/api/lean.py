"""``LeanRoute``: a FastAPI route that handles its common request without FastAPI's resolver.

FastAPI's request handler reads the body through the ASGI stream, parses the content type with
``email.message``, builds a sub-response and resolves every parameter in
``solve_dependencies``. For the send routes that was ~0.15 ms of the event loop per send
(``bench/profile_send.py``, the ``multimail-live`` thread), a quarter of the loop's work.

A ``LeanRoute`` is still a plain ``APIRoute`` to FastAPI (the OpenAPI document, the route
table, exception handling, ``request_response``'s exit stacks). Its handler does FastAPI's
steps itself when a request is one it can take whole:

- the body is JSON (``content-type: application/json`` exactly) that ``BodySizeLimit`` has
  already read (``BODY_SCOPE_KEY``), parses, and validates to a model with no errors;
- no dependency overrides are set and FastAPI's telemetry is off for the request.

Every other request (no body, another content type, malformed JSON, an invalid body) goes to
FastAPI's own handler, so refusals take exactly the path they always took. The route's shape
is checked when the handler is built; a route outside it (a query or header parameter, a
dependency that takes more than the request, a body-size limit of its own, a router-level
dependency) always uses FastAPI's handler.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from typing import Any

import fastapi.routing
from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.telemetry import get_telemetry_data
from pydantic import BaseModel

from multimail.api.limits import BODY_SCOPE_KEY

__all__ = ["LeanRoute"]

_Handler = Callable[[Request], Coroutine[Any, Any, Response]]

# FastAPI builds an included route's handler with the inclusion's effective route (its
# router-level dependencies included) in this context variable. Without it the inclusion's
# dependencies cannot be seen, so no lean handler is built.
_EFFECTIVE: ContextVar[Any] | None = getattr(fastapi.routing, "_effective_route_context_var", None)


def _takes_only_request(dependency: Dependant) -> bool:
    return (
        dependency.request_param_name is not None
        and not dependency.dependencies
        and not (
            dependency.path_params
            or dependency.query_params
            or dependency.header_params
            or dependency.cookie_params
            or dependency.body_params
        )
        and dependency.response_param_name is None
        and dependency.background_tasks_param_name is None
        and dependency.security_scopes_param_name is None
        and dependency.http_connection_param_name is None
        and dependency.websocket_param_name is None
    )


def _lean_shape(route: Any) -> bool:
    """Whether ``route`` (the route or its effective inclusion) has only what the lean
    handler resolves: ``str`` path parameters, the request, one JSON body and async
    dependencies of the request alone."""
    dependant: Dependant = route.dependant
    body = route.body_field
    return (
        body is not None
        and len(dependant.body_params) == 1
        and not route._embed_body_fields
        and getattr(route, "max_body_size", None) is None
        and dependant.request_param_name is not None
        and inspect.iscoroutinefunction(dependant.call)
        and all(field.field_info.annotation is str for field in dependant.path_params)
        and not (dependant.query_params or dependant.header_params or dependant.cookie_params)
        and dependant.response_param_name is None
        and dependant.background_tasks_param_name is None
        and dependant.security_scopes_param_name is None
        and dependant.http_connection_param_name is None
        and all(
            d.name is not None and inspect.iscoroutinefunction(d.call) and _takes_only_request(d)
            for d in dependant.dependencies
        )
    )


class LeanRoute(APIRoute):
    """An ``APIRoute`` whose handler skips FastAPI's resolver for a well-formed JSON request
    (see the module docstring)."""

    def get_route_handler(self) -> _Handler:
        full = super().get_route_handler()
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
                return await full(request)
            try:
                data = json.loads(raw)
            except ValueError:
                return await full(request)
            body, errors = body_field.validate(data, {}, loc=("body",))
            if errors or not isinstance(body, BaseModel):
                return await full(request)
            # In FastAPI's order: sub-dependencies, then path parameters and the body.
            values: dict[str, Any] = {}
            for name, call, request_param in dependencies:
                values[name] = await call(**{request_param: request})
            params = request.path_params
            for name, alias in path_names:
                values[name] = params[alias]
            values[request_name] = request
            values[body_name] = body
            response = await endpoint(**values)
            if not isinstance(response, Response):
                raise TypeError("a LeanRoute endpoint returns its Response itself")
            return response

        return handler
