"""The operator dashboard at ``/dashboard``: server-rendered pages over the same services.

``mount_dashboard(app, services)`` adds its routes and its static files (served from the
package: the pages work with no internet connection).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from multimail.dashboard import auth, mailbox_pages, pages, views
from multimail.services.context import Services

__all__ = ["mount_dashboard"]


def mount_dashboard(app: FastAPI, services: Services) -> None:
    """Serve the dashboard from ``app``; ``services`` must be the app's own."""
    if getattr(app.state, "dashboard_mounted", False):
        return
    app.state.services = getattr(app.state, "services", None) or services
    app.include_router(auth.router)
    app.include_router(views.router)
    app.include_router(mailbox_pages.router)
    app.include_router(pages.router)
    app.mount(
        f"{auth.PREFIX}/static",
        StaticFiles(directory=views.STATIC, check_dir=True),
        name="dashboard-static",
    )
    app.state.dashboard_mounted = True
