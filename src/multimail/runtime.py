"""Wiring: settings → database → services, and running the server processes in one loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from multimail.config import Settings
from multimail.services.context import Services
from multimail.store import migrate
from multimail.store.db import Database

log = logging.getLogger("multimail")


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our own loop: signals are ours, so it must not install its handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _secret_file(data_dir: Path) -> bytes:
    path = data_dir / "secret.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def build_services(settings: Settings, *, run_migrations: bool = True) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url)
    if run_migrations:
        migrate.upgrade(db)
    services = Services(db=db, settings=settings)
    secret = settings.secret_key.get_secret_value().encode() if settings.secret_key else None
    services.extras["secret_key"] = secret or _secret_file(settings.data_dir)
    return services


async def serve(services: Services, *, role: str = "all") -> None:
    """Run the parts of MultiMail this role asks for until SIGINT/SIGTERM."""
    from multimail.api.app import create_app

    settings = services.settings
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    tasks: list[asyncio.Task[object]] = []
    server: EmbeddedServer | None = None
    if role in ("all", "api"):
        config = uvicorn.Config(
            create_app(services),
            host=settings.http_host,
            port=settings.http_port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="on",
        )
        server = EmbeddedServer(config)
        tasks.append(asyncio.create_task(server.serve()))
    await stop.wait()
    if server is not None:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    services.db.dispose()
