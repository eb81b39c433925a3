"""Wiring: settings → database → services, and running the server processes in one loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from multimail.config import Settings
from multimail.services import identity
from multimail.services.context import Services
from multimail.store import keystore, migrate
from multimail.store.db import Database
from multimail.workers import signing

log = logging.getLogger("multimail")


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our own loop: signals are ours, so it must not install its handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _shared_secret(db: Database, data_dir: Path) -> bytes:
    """The approval-link secret, shared by every node through the database. An install from
    before it moved there keeps the one in its data dir, so links already mailed still work."""

    def make() -> str:
        legacy = data_dir / "secret.key"
        return legacy.read_text().strip() if legacy.exists() else secrets.token_hex(32)

    return keystore.create_once(db, "link-secret", make).encode()


def build_services(settings: Settings, *, run_migrations: bool = True) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url)
    if run_migrations:
        migrate.upgrade(db)
    services = Services(db=db, settings=settings)
    secret = settings.secret_key.get_secret_value().encode() if settings.secret_key else None
    services.extras["secret_key"] = secret or _shared_secret(db, settings.data_dir)
    # The identity and default DKIM keys too, now: created by whichever request first needed
    # them, they would be a write on a request's behalf that no account owns.
    identity.keyring(services)
    signing.ensure_default_key(services)
    return services


Component = Callable[[Services, asyncio.Event], Coroutine[Any, Any, None]]


def components_for(role: str) -> list[tuple[str, Component]]:
    """What each role runs; ``all`` is everything in one process."""
    from multimail.services import checkpoints
    from multimail.workers import inbound as inbound_worker
    from multimail.workers import runner, webhooks

    parts: list[tuple[str, Component]] = []
    if role in ("all", "smtp"):
        parts.append(("smtp", inbound_worker.run_smtp))
    if role in ("all", "worker"):
        parts.append(("jobs", runner.run_workers))
        parts.append(("inbound", inbound_worker.run_inbound_worker))
        parts.append(("webhooks", webhooks.run_dispatcher))
        parts.append(("audit checkpoints", checkpoints.checkpoint_loop))
    return parts


async def serve(services: Services, *, role: str = "all") -> None:
    """Run the parts of MultiMail this role asks for until SIGINT/SIGTERM."""
    from multimail.api.app import create_app

    settings = services.settings
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    tasks: list[asyncio.Task[None]] = []
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
    for name, component in components_for(role):
        log.info("starting %s", name)
        tasks.append(asyncio.create_task(component(services, stop), name=name))
    # A component that dies on its own (a port in use, say) stops the whole process rather
    # than leaving a server that looks alive but does not work.
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stopper and t.exception() is not None]
    stop.set()
    if server is not None:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    services.db.dispose()
    for task in failed:
        raise RuntimeError(f"{task.get_name()} stopped unexpectedly") from task.exception()
