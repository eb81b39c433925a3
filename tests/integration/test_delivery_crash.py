"""DUR-3: a delivery worker killed with SIGKILL at each point of a delivery loses nothing, and
sends a second copy only when killed between the relay's 250 and our commit — then with the
same Message-ID.

Each case runs a real worker process against the test database, freezes it at a point
(``MULTIMAIL_TEST_CRASH_POINT``, or a receiving server that holds the SMTP session at MAIL or
after DATA), kills it with SIGKILL, starts a fresh worker and checks what the receiver got.
"""

from __future__ import annotations

import asyncio
import email
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session
from pydantic import SecretStr

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services.context import Services
from multimail.testing.processes import free_port
from tests.integration.test_delivery import World

ROOT = Path(__file__).resolve().parents[2]


class HoldingHandler:
    """Accepts mail like a normal MTA, but can hold a session at MAIL or after DATA.

    A session held after DATA is answered 451 and not stored: a receiver that had not
    committed the message when its client vanished.
    """

    def __init__(self) -> None:
        self.hold_at: str | None = None
        self.holding = threading.Event()
        self._released = threading.Event()
        self.received: list[bytes] = []

    def release(self) -> None:
        self.hold_at = None
        self._released.set()

    async def _hold(self) -> None:
        self.holding.set()
        await asyncio.to_thread(self._released.wait, 60)

    async def handle_MAIL(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.hold_at == "mail":
            await self._hold()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if self.hold_at == "data":
            await self._hold()
            return "451 not stored"
        self.received.append(bytes(envelope.original_content or b""))
        return "250 OK: queued"


@pytest.fixture
def receiver() -> Iterator[tuple[HoldingHandler, int]]:
    handler = HoldingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    handler.release()
    controller.stop()


@pytest.fixture
def svc(settings: Settings, receiver: tuple[HoldingHandler, int]) -> Iterator[Services]:
    services = build_services(
        settings.model_copy(update={"smtp_url": SecretStr(f"smtp://127.0.0.1:{receiver[1]}")})
    )
    yield services
    services.db.dispose()


class Worker:
    """One worker process; ``kill`` is SIGKILL, no cleanup of any kind."""

    def __init__(self, services: Services, log: Path, crash_point: str | None) -> None:
        settings = services.settings
        env = {
            **os.environ,
            "MULTIMAIL_DATABASE_URL": settings.effective_database_url,
            "MULTIMAIL_DATA_DIR": str(settings.data_dir),
            "MULTIMAIL_DOMAIN": settings.domain,
            "MULTIMAIL_SMTP_URL": settings.smtp_url.get_secret_value() if settings.smtp_url else "",
            "MULTIMAIL_SECRET_KEY": (services.extras["secret_key"]).decode(),  # type: ignore[attr-defined]
            "WORKER_LEASE_S": "1",
        }
        env.pop("MULTIMAIL_TEST_CRASH_POINT", None)
        if crash_point:
            env["MULTIMAIL_TEST_CRASH_POINT"] = crash_point
        self.log = log
        self._handle = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.delivery_worker_proc"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._handle,
        )

    def wait_for_line(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker never printed {text!r}:\n{self.log.read_text()}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._handle.close()


def wait_until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


CASES = [
    # (where the first worker dies, how it is made to stop there, copies the receiver gets)
    ("before_connect", "env", 1),
    ("after_mail", "mail", 1),
    ("after_data_sent", "data", 1),
    ("after_smtp_250", "env", 2),
    ("after_commit", "env", 1),
]


@pytest.mark.parametrize(("point", "how", "copies"), CASES, ids=[c[0] for c in CASES])
def test_killed_worker_loses_nothing_and_duplicates_only_after_250(
    svc: Services,
    receiver: tuple[HoldingHandler, int],
    tmp_path: Path,
    point: str,
    how: str,
    copies: int,
) -> None:
    """Kill -9 at each point, restart: the message ends delivered; the receiver has one
    copy, or two identical ones (same Message-ID) when killed between the 250 and commit."""
    handler, _port = receiver
    world = World(svc)
    message_id = world.message()
    if how in ("mail", "data"):
        handler.hold_at = how
    first = Worker(svc, tmp_path / "first.log", point if how == "env" else None)
    try:
        if how == "env":
            first.wait_for_line(f"CRASH_POINT {point}")
        else:
            assert handler.holding.wait(20), first.log.read_text()
    finally:
        first.kill()
    handler.release()
    assert world.row(message_id)["status"] in ("sending", "delivered")

    second = Worker(svc, tmp_path / "second.log", None)
    try:
        wait_until(lambda: world.row(message_id)["status"] == "delivered")
        time.sleep(0.3)
    finally:
        second.kill()
    assert len(handler.received) == copies
    ids = {email.message_from_bytes(raw)["Message-ID"] for raw in handler.received}
    assert ids == {world.row(message_id)["message_id_header"]}
    assert len(set(handler.received)) == 1  # a retry re-sends the stored bytes exactly
