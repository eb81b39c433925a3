"""A live MultiMail for the agent-interface tests: the full app (REST + tool-named routes +
``/mcp``), the job workers, and a capturing SMTP relay that receives what is delivered."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from multimail.api.app import create_app
from multimail.config import Settings
from multimail.mcp.server import mount_mcp
from multimail.runtime import build_services
from multimail.services import accounts, mailboxes
from multimail.services.context import Actor, Services
from multimail.testing import server as server_module
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturedMessage, CapturingSMTPServer
from multimail.tools.http_routes import install_tool_routes
from multimail.workers.runner import run_workers

AGENT_ADDRESS = "agent@mm.test"


def full_app(services: Services) -> FastAPI:
    """create_app plus the agent interfaces, unless the lead's create_app already adds them."""
    app = create_app(services)
    install_tool_routes(app)
    if not any(getattr(r, "path", None) == "/mcp" for r in app.router.routes):
        mount_mcp(app, services)
    return app


@dataclass
class World:
    services: Services
    server: LiveServer
    relay: CapturingSMTPServer
    boot: accounts.Bootstrap
    mailbox: dict[str, Any]

    @property
    def base_url(self) -> str:
        return self.server.base_url


@contextmanager
def live_world(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, *, mode: str = "gated_send"
) -> Iterator[World]:
    with CapturingSMTPServer() as relay:
        services = build_services(
            settings.model_copy(update={"smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}")})
        )
        boot = accounts.bootstrap(services.db, account_name="Acme", operator_email="ops@mm.test")
        operator = Actor(type="system", id=None, name="test", account_id=boot.account["id"])
        with services.db.write() as conn:
            mailbox = mailboxes.create_mailbox(
                conn,
                actor=operator,
                settings=services.settings,
                address=AGENT_ADDRESS,
                display_name="Support Agent",
                oversight_mode=mode,
            )
        monkeypatch.setattr(server_module, "create_app", full_app)

        async def workers(svc: Services, stop: Any) -> None:
            await run_workers(svc, stop, worker_id="e2e", poll_interval=0.05, grace=5)

        try:
            with LiveServer(services, components=[workers]) as server:
                yield World(services, server, relay, boot, mailbox)
        finally:
            services.db.dispose()


def delivered_to(
    relay: CapturingSMTPServer, address: str, timeout: float = 15.0
) -> CapturedMessage:
    """The first message the relay received for ``address`` (operator notices also pass by)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in relay.messages:
            if address in message.rcpt_tos:
                return message
        time.sleep(0.05)
    raise TimeoutError(f"nothing was delivered to {address} within {timeout} s")
