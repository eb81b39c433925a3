"""Shared pieces of the webhook tests: a real loopback receiver and message/event helpers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import insert, select
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as StandardVerificationError

from multimail.domain.scopes import Scope
from multimail.ids import new_id, utcnow
from multimail.services import events, mailboxes, messages
from multimail.services.context import Actor, Services
from multimail.store.tables import messages as messages_table
from multimail.store.tables import webhook_deliveries
from multimail.webhook_signature import (
    WebhookVerificationError,
    verify_multimail_signature,
    verify_webhook,
)
from multimail.workers.webhooks import run_dispatcher


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    ours_ok: bool | None = None
    standard_ok: bool | None = None
    hmac_ok: bool | None = None


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"ok":true}'
    headers: dict[str, str] = field(default_factory=dict)
    hold: threading.Event | None = None


Responder = Callable[[int, Received], Reply]


class Receiver:
    """A threaded HTTP server on 127.0.0.1 that records every POST and checks its signatures
    with our verifier and with the independent ``standardwebhooks`` package."""

    def __init__(self, responder: Responder | None = None, secrets: list[str] | None = None):
        self.responder: Responder = responder or (lambda _n, _r: Reply())
        self.secrets = list(secrets or [])
        self.received: list[Received] = []
        self.holding = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                item = Received(self.path, dict(self.headers.items()), body, time.monotonic())
                receiver._verify(item)
                with receiver._lock:
                    index = len(receiver.received)
                    receiver.received.append(item)
                reply = receiver.responder(index, item)
                if reply.hold is not None:
                    receiver.holding.set()
                    reply.hold.wait(30)
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    return  # the client went away (size cap, or a killed dispatcher)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _verify(self, item: Received) -> None:
        if not self.secrets:
            return
        item.ours_ok = item.standard_ok = item.hmac_ok = False
        for secret in self.secrets:
            try:
                verify_webhook(item.body, item.headers, secret)
                item.ours_ok = True
            except WebhookVerificationError:
                pass
            try:
                Webhook(secret).verify(item.body, item.headers)
                item.standard_ok = True
            except StandardVerificationError:
                pass
            signature = item.headers.get("X-MultiMail-Signature", "")
            item.hmac_ok = item.hmac_ok or verify_multimail_signature(item.body, signature, secret)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def operator(account_id: str) -> Actor:
    return Actor(
        type="user", id="usr_test", name="ops", account_id=account_id, scopes=frozenset(Scope)
    )


def make_mailbox(svc: Services, actor: Actor, address: str, **fields: Any) -> dict[str, Any]:
    with svc.db.write() as conn:
        return mailboxes.create_mailbox(
            conn, actor=actor, settings=svc.settings, address=address, **fields
        )


def make_message(
    svc: Services, account_id: str, mailbox: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """A stored outbound message (the sending pipeline is another issue's work)."""
    now = utcnow()
    record: dict[str, Any] = {
        "id": new_id("msg"),
        "account_id": account_id,
        "mailbox_id": mailbox["id"],
        "direction": "outbound",
        "status": "pending_send_approval",
        "from_address": mailbox["address"],
        "to": ["customer@example.com"],
        "subject": "Your case",
        "markdown": "Hello from the agent",
        "created_at": now,
        "updated_at": now,
    }
    record.update(fields)
    with svc.db.write() as conn:
        conn.execute(insert(messages_table).values(**record))
        row = (
            conn.execute(select(messages_table).where(messages_table.c.id == record["id"]))
            .mappings()
            .one()
        )
        return messages.full_view(conn, dict(row))


def emit(
    svc: Services,
    account_id: str,
    event_type: str,
    message: dict[str, Any] | None = None,
    mailbox_id: str | None = None,
) -> str:
    with svc.db.write() as conn:
        return events.emit(
            conn,
            account_id=account_id,
            event_type=event_type,
            message=message,
            mailbox_id=mailbox_id,
        )


def deliveries(svc: Services) -> list[dict[str, Any]]:
    with svc.db.read() as conn:
        rows = conn.execute(select(webhook_deliveries).order_by(webhook_deliveries.c.id))
        return [dict(r) for r in rows.mappings()]


async def wait_until(check: Callable[[], Any], within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def dispatching(svc: Services, **options: Any) -> AsyncIterator[None]:
    """A real dispatcher in this event loop, stopped at the end of the block."""
    stop = asyncio.Event()
    options.setdefault("poll_interval", 0.05)
    task = asyncio.create_task(run_dispatcher(svc, stop, **options))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@contextlib.contextmanager
def receiving(
    responder: Responder | None = None, secrets: list[str] | None = None
) -> Iterator[Receiver]:
    with Receiver(responder, secrets) as receiver:
        yield receiver
