"""What the benches that drive the application share, defined once: services with an
account and its mailboxes, ``multimail serve`` processes, a component in a thread of its own,
a bare SMTP sink, and what a relay received.

Only what the application needs is imported: not the test HTTP server nor the test relay
(annotations only), so a bench's load-generator process does not pay for them.
"""

from __future__ import annotations

import asyncio
import email
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiosmtpd.controller import Controller
from pydantic import SecretStr
from sqlalchemy import func, select

from multimail.config import Settings
from multimail.runtime import Component, build_services
from multimail.services import accounts, keys, mailboxes
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries, messages
from multimail.testing.processes import ServeProcess, free_port

if TYPE_CHECKING:
    from multimail.testing.smtp import CapturingSMTPServer

DOMAIN = "bench.test"
# The request rate limit is not what any bench measures.
UNLIMITED = 100_000_000

__all__ = [
    "DOMAIN",
    "CountingSink",
    "Desk",
    "ServeProcess",
    "audit_seqs",
    "changed_bytes",
    "counting_sink",
    "free_port",
    "in_thread",
    "make_desk",
    "make_services",
    "message_headers",
    "relay_copies",
    "serve",
    "statuses",
]


# --------------------------------------------------------------------------- services


def make_services(
    data_dir: Path, database_url: str | None, relay_port: int | None = None, **extra: Any
) -> Services:
    """Services on that database (migrated), mail domain ``bench.test`` unless ``extra``
    says otherwise, delivering to the relay on ``relay_port`` when there is one."""
    values: dict[str, Any] = {
        "domain": DOMAIN,
        "rate_limit_per_minute": UNLIMITED,
        "rate_limit_burst": UNLIMITED,
    }
    if relay_port is not None:
        values["smtp_url"] = SecretStr(f"smtp://127.0.0.1:{relay_port}")
    values.update(extra)
    return build_services(Settings(data_dir=data_dir, database_url=database_url, **values))


@dataclass
class Desk:
    """One account with one mailbox per oversight mode, and its agent's and reviewer's keys."""

    services: Services
    boot: accounts.Bootstrap
    agent: Actor
    reviewer: Actor
    operator: Actor
    boxes: dict[str, dict[str, Any]]


def make_desk(services: Services, modes: Iterable[str], address: str = "{mode}@{domain}") -> Desk:
    """Bootstrap the account and make its mailboxes; ``address`` is formatted with the mode
    (``gated-send``) and the services' domain."""
    domain = services.settings.domain
    boot = accounts.bootstrap(services.db, account_name="Bench", operator_email=f"o@{domain}")
    agent = keys.authenticate(services.db, boot.agent_key)
    reviewer = keys.authenticate(services.db, boot.reviewer_key)
    operator = Actor(type="system", id=None, name="bench", account_id=boot.account["id"])
    boxes: dict[str, dict[str, Any]] = {}
    with services.db.write() as conn:
        for mode in modes:
            boxes[mode] = mailboxes.create_mailbox(
                conn,
                actor=operator,
                settings=services.settings,
                address=address.format(mode=mode.replace("_", "-"), domain=domain),
                display_name="Agent",
                oversight_mode=mode,
            )
    return Desk(services, boot, agent, reviewer, operator, boxes)


def serve(services: Services, role: str, log: Path, **extra: str | int | None) -> ServeProcess:
    """``multimail serve --role <role>`` on the bench's settings (database, relay, domain)."""
    return ServeProcess(services.settings, role, log, log_level="warning", **extra)


@contextmanager
def in_thread(services: Services, component: Component) -> Iterator[threading.Thread]:
    """Run ``component`` on its own event loop in a thread of this process until the block
    ends; the thread is yielded."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(component(services, stop))

    thread = threading.Thread(target=run, name=getattr(component, "__name__", "component"))
    thread.daemon = True
    thread.start()
    try:
        yield thread
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


# --------------------------------------------------------------------------- SMTP sink


class CountingSink:
    """An aiosmtpd handler that answers 250 to every message, keeps nothing and counts."""

    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        return "250 OK"


@contextmanager
def counting_sink() -> Iterator[tuple[int, CountingSink]]:
    """A bare aiosmtpd on a free loopback port, on its own loop in a thread of this process;
    yields ``(port, sink)``."""
    sink = CountingSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, sink
    finally:
        controller.stop()


# --------------------------------------------------------------------------- what arrived


def message_headers(services: Services) -> dict[str, str]:
    """``{RFC Message-ID: our message id}`` for every outbound message."""
    with services.db.read() as conn:
        rows = conn.execute(
            select(messages.c.id, messages.c.message_id_header).where(
                messages.c.direction == "outbound"
            )
        )
        return {r.message_id_header: r.id for r in rows}


def relay_copies(relay: CapturingSMTPServer, headers: dict[str, str]) -> tuple[Counter[str], int]:
    """Copies of each of our messages at the relay, and how many arrivals were not ours.

    The operator's approval requests go through the same relay; they are the system's mail
    (``...system@<domain>`` Message-IDs) and are not counted.
    """
    copies: Counter[str] = Counter()
    strangers = 0
    for captured in relay.messages:
        header = email.message_from_bytes(captured.data)["Message-ID"] or ""
        if header.endswith(f".system@{DOMAIN}>"):
            continue
        if header in headers:
            copies[headers[header]] += 1
        else:
            strangers += 1
    return copies, strangers


def changed_bytes(relay: CapturingSMTPServer) -> int:
    """Messages that arrived twice with different bytes (a resend must reuse stored bytes)."""
    versions: dict[str, set[bytes]] = {}
    for captured in relay.messages:
        header = email.message_from_bytes(captured.data)["Message-ID"] or ""
        if not header.endswith(f".system@{DOMAIN}>"):
            versions.setdefault(header, set()).add(captured.data)
    return sum(1 for v in versions.values() if len(v) > 1)


def statuses(services: Services) -> Counter[str]:
    """Outbound messages per status."""
    with services.db.read() as conn:
        rows = conn.execute(
            select(messages.c.status, func.count())
            .where(messages.c.direction == "outbound")
            .group_by(messages.c.status)
        )
        return Counter({r[0]: int(r[1]) for r in rows})


def audit_seqs(services: Services) -> dict[str, dict[str, list[int]]]:
    """``{message id: {action: [seq, ...]}}``."""
    found: dict[str, dict[str, list[int]]] = {}
    with services.db.read() as conn:
        rows = conn.execute(
            select(audit_entries.c.subject_id, audit_entries.c.action, audit_entries.c.seq)
        )
        for r in rows:
            found.setdefault(str(r.subject_id), {}).setdefault(r.action, []).append(r.seq)
    return found
