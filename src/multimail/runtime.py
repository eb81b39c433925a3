"""Wiring: settings → database → services, and running the server processes in one loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import uvicorn

from multimail.services.context import Services
from multimail.wiring import build_services

__all__ = ["EmbeddedServer", "build_services", "components_for", "serve"]

log = logging.getLogger("multimail")


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our own loop: signals are ours, so it must not install its handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
