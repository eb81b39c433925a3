"""One send stack for the send-path tests: the real API and workers over loopback, a
capturing SMTP relay as the smarthost, and helpers to make mailboxes, hand in a customer's
mail (POST /v1/inbound) and wait for a message's final status.

``stack`` is a fixture: a test module imports it and re-exports it (``__all__``) so pytest
finds it there.
"""

from __future__ import annotations

import base64
import email
import email.policy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts, mailboxes
from multimail.services.context import Actor, Services
from multimail.store.tables import messages
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers.runner import run_workers

FINAL = ("delivered", "send_failed", "bounced", "rejected", "cancelled", "expired")


@dataclass
class Stack:
    services: Services
    live: LiveServer
    relay: CapturingSMTPServer
    boot: accounts.Bootstrap

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.live.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def mailbox(self, local: str, mode: str, **fields: Any) -> dict[str, Any]:
        actor = Actor(type="system", id=None, name="operator", account_id=self.boot.account["id"])
        with self.services.db.write() as conn:
            return mailboxes.create_mailbox(
                conn,
                actor=actor,
                settings=self.services.settings,
                address=f"{local}@mm.test",
                oversight_mode=mode,
                **fields,
            )

    def row(self, message_id: str) -> dict[str, Any]:
        with self.services.db.read() as conn:
            found = conn.execute(select(messages).where(messages.c.id == message_id))
            return dict(found.mappings().one())

    def count(self, table: Any) -> int:
        with self.services.db.read() as conn:
            return len(conn.execute(select(table)).all())

    def settled(self, message_id: str, within: float = 15.0) -> dict[str, Any]:
        """The message once it reached a final status (delivered, send_failed, ...)."""
        deadline = time.monotonic() + within
        while True:
            row = self.row(message_id)
            if row["status"] in FINAL or time.monotonic() > deadline:
                return row
            time.sleep(0.05)

    def inbound(self, raw: bytes, to: str) -> str:
        """A customer's message handed over as the operator's MTA would (POST /v1/inbound)."""
        got = self.client(self.boot.admin_key).post(
            "/v1/inbound",
            json={"raw_base64": base64.b64encode(raw).decode(), "rcpt_to": [to]},
        )
        assert got.status_code == 201, got.text
        return str(got.json()["message_ids"][0])


@pytest.fixture
def stack(settings: Settings, boot: accounts.Bootstrap) -> Iterator[Stack]:
    with CapturingSMTPServer() as relay:
        svc = build_services(
            settings.model_copy(
                update={
                    "smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}"),
                    "compose_processes": 0,
                }
            ),
            run_migrations=False,
        )
        try:
            with LiveServer(svc, components=[run_workers]) as server:
                yield Stack(svc, server, relay, boot)
        finally:
            svc.db.dispose()


def send_body(**fields: Any) -> dict[str, Any]:
    return {"to": "customer@example.com", "subject": "Hello", "markdown": "Hi there"} | fields


def customer_mail(to: str, *headers: str, message_id: str = "<q1@customer.example>") -> bytes:
    lines = [
        "From: Customer <customer@example.com>",
        f"To: {to}",
        "Subject: Where is my order?",
        f"Message-ID: {message_id}",
        "Date: Mon, 01 Jan 2024 10:00:00 +0000",
        *headers,
        "Content-Type: text/plain; charset=utf-8",
        "",
        "Hello, where is my order?",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def attachment_names(captured: list[Any]) -> list[str]:
    names = []
    for got in captured:
        parsed = email.message_from_bytes(got.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        names += [part.get_filename() or "" for part in parsed.iter_attachments()]
    return names
