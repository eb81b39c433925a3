"""The HTTP application: ``create_app(services)``. Transports stay thin; services do the work."""

from __future__ import annotations

from fastapi import FastAPI

from multimail import __version__
from multimail.api import errors
from multimail.api.limits import BodySizeLimit
from multimail.api.routers import (
    admin,
    export,
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

# In the order they are included. Sends are the busiest route and Starlette tries routes in
# order, so theirs go first (no two routers answer the same request,
# tests/unit/test_routes.py, so the order changes speed only).
ROUTERS = {
    "outbound": outbound.router,
    "system": system.router,
    "admin": admin.router,
    "oversight": oversight.router,
    "inbox": inbox.router,
    "webhooks": webhooks.router,
    "links": links.router,
    "identity": identity.router,
    "export": export.router,
}


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
    for router in ROUTERS.values():
        app.include_router(router)
    # Tool-named endpoints come last: a hand-written short form with the same path wins.
    install_tool_routes(app)
    mount_mcp(app, services)
    mount_dashboard(app, services)
    app.add_middleware(BodySizeLimit, max_bytes=services.settings.max_request_bytes)
    return app
