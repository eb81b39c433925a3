"""Services whose outbound mail goes to a capturing SMTP relay on loopback.

A test module takes the fixture as ``relay = relay_support.relay`` (the way modules here
share fixtures) and builds its own services fixture with :func:`relayed_services`, naming
only the settings it changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

import pytest
from aiosmtpd.controller import Controller
from pydantic import SecretStr

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services.context import Services
from multimail.testing.processes import free_port
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import composer


@pytest.fixture
def relay() -> Iterator[CapturingSMTPServer]:
    """A capturing SMTP server on loopback: any delivery attempt goes here, never to an MX."""
    with CapturingSMTPServer() as server:
        yield server


class HeldReceiver(Protocol):
    """An aiosmtpd handler that holds some replies until :meth:`release`."""

    port: int

    def release(self) -> None: ...


Held = TypeVar("Held", bound=HeldReceiver)


@contextlib.contextmanager
def serving(handler: Held) -> Iterator[Held]:
    """``handler`` answering on a loopback port (set as ``handler.port``); on the way out it
    lets every held reply go, so the server's stop does not wait for them."""
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    handler.port = controller.port
    try:
        yield handler
    finally:
        handler.release()
        controller.stop()


@contextlib.contextmanager
def relayed_services(
    settings: Settings, relay: CapturingSMTPServer, **changes: Any
) -> Iterator[Services]:
    """Services built from ``settings`` with ``changes`` that hand every message to ``relay``.

    The test database is a copy of a migrated template, so no migration runs. On the way
    out the compose pool is closed before the database goes: children a test started
    (``compose_processes``) must not outlive it.
    """
    update = {"smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}"), **changes}
    services = build_services(settings.model_copy(update=update), run_migrations=False)
    try:
        yield services
    finally:
        pool = composer.compose_pool(services)
        if pool is not None:
            pool.close()
        services.db.dispose()
