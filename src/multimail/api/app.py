"""The HTTP application: ``create_app(services)``. Transports stay thin; services do the work."""

from __future__ import annotations

from fastapi import FastAPI

from multimail import __version__
from multimail.api import errors
from multimail.api.limits import BodySizeLimit
from multimail.api.ratelimit import TokenBucketLimiter
from multimail.api.routers import admin, inbox, links, outbound, oversight, system, webhooks
from multimail.services.context import Services


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
    app.state.limiter = TokenBucketLimiter(
        services.settings.rate_limit_per_minute, services.settings.rate_limit_burst
    )
    errors.install(app)
    app.include_router(system.router)
    app.include_router(admin.router)
    app.include_router(outbound.router)
    app.include_router(oversight.router)
    app.include_router(inbox.router)
    app.include_router(webhooks.router)
    app.include_router(links.router)
    app.add_middleware(BodySizeLimit, max_bytes=services.settings.max_request_bytes)
    return app
