"""A live MultiMail HTTP server on a free loopback port, for tests (ours and our users')."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any

import uvicorn

from multimail.api.app import create_app
from multimail.runtime import EmbeddedServer
from multimail.services.context import Services

Component = Callable[[Services, asyncio.Event], Coroutine[Any, Any, None]]


class LiveServer:
    """Runs the real app under uvicorn in a background thread; ``base_url`` is where it is.

    ``components`` are further coroutines run in the same event loop until the server stops
    (workers, the SMTP server, the webhook dispatcher): each gets the services and a stop event.
    """

    def __init__(
        self, services: Services, host: str = "127.0.0.1", components: Sequence[Component] = ()
    ) -> None:
        self.services = services
        self.components = list(components)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.host = host
        self.port = 0
        self._server: EmbeddedServer | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LiveServer:
        config = uvicorn.Config(
            create_app(self.services),
            host=self.host,
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self._server = EmbeddedServer(config)
        self._thread = threading.Thread(target=self._run, name="multimail-live", daemon=True)
        self._thread.start()
        if not self._started.wait(20):
            raise RuntimeError("the live server did not start within 20 s")
        return self

    def _run(self) -> None:
        assert self._server is not None
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        assert self._server is not None
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        task = asyncio.create_task(self._server.serve())
        extra = [asyncio.ensure_future(c(self.services, self._stop)) for c in self.components]
        while not self._server.started and not task.done():  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.01)
        if self._server.servers:
            self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self._started.set()
        await task
        self._stop.set()
        await asyncio.gather(*extra, return_exceptions=True)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
