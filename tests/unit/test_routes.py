"""The routers never claim the same request, so the order ``create_app`` includes them in
cannot change which handler answers (and a new route cannot silently shadow another)."""

from __future__ import annotations

import re

from starlette.routing import BaseRoute, Match

from multimail.api.app import ROUTERS


def _routes() -> list[tuple[str, BaseRoute]]:
    return [
        (name, route)
        for name, router in ROUTERS.items()
        for route in router.routes
        if getattr(route, "methods", None)
    ]


def test_no_request_is_claimed_by_two_routers() -> None:
    routes = _routes()
    assert len(routes) > 50
    shared = []
    for name, route in routes:
        # A literal path stands for itself; a parameter for any one segment.
        sample = re.sub(r"\{[^}]+\}", "x1", getattr(route, "path", ""))
        for method in getattr(route, "methods", set()):
            scope = {"type": "http", "method": method, "path": sample, "root_path": ""}
            scope["headers"] = []
            owners = {n for n, other in routes if other.matches(scope)[0] is Match.FULL}
            if owners != {name}:
                shared.append((method, sample, sorted(owners)))
    assert shared == []
