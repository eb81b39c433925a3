"""The HTTP application: ``create_app(services)``. Transports stay thin; services do the work."""

from __future__ import annotations

from fastapi import FastAPI

from multimail import __version__
from multimail.api import errors
from multimail.api.limits import BodySizeLimit
from multimail.api.routers import (
    admin,
    identity,
    inbox,
    links,
    outbound,
    oversight,
    system,
    webhooks,
)
from multimail.dashboard import mount_dashboard
from multimail.mcp.server import mount_mcp
from multimail.services.context import Services
from multimail.tools.http_routes import install_tool_routes


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        title="MultiMail",
        version=__version__,
        description=(
            "Email for AI agents with graduated human oversight. Authenticate with "
            "`Authorization: Bearer mm_live_…` or `X-API-Key`. Errors are "
            '`{"error": sentence, "code": snake_code}`.'
        ),
    )
    app.state.services = services
    errors.install(app)
    # Sends are the busiest route: Starlette tries routes in order, so theirs go first (no
    # two routers answer the same request, tests/unit/test_routes.py, so order is free).
    app.include_router(outbound.router)
    app.include_router(system.router)
    app.include_router(admin.router)
    app.include_router(oversight.router)
    app.include_router(inbox.router)
    app.include_router(webhooks.router)
    app.include_router(links.router)
    app.include_router(identity.router)
    # Tool-named endpoints come last: a hand-written short form with the same path wins.
    install_tool_routes(app)
    mount_mcp(app, services)
    mount_dashboard(app, services)
    app.add_middleware(BodySizeLimit, max_bytes=services.settings.max_request_bytes)
    return app
