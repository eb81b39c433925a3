"""The running stack the inbound end-to-end modules share: the API, the inbound SMTP server
and workers in one LiveServer, and what those tests do with it (send over SMTP, wait for the
processed messages, build a delivery report)."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import insert, select

from multimail.config import Settings
from multimail.ids import new_id, utcnow
from multimail.runtime import build_services
from multimail.services import accounts, mailboxes, threads
from multimail.services.context import Actor, Services
from multimail.store.tables import mailboxes as mailboxes_table
from multimail.store.tables import messages
from multimail.testing.server import Component, LiveServer


@contextmanager
def running(
    settings: Settings, components: Sequence[Component], **changes: Any
) -> Iterator[tuple[Services, LiveServer, int]]:
    """Services on ``settings`` (with ``changes``) and a LiveServer running ``components``
    too; yields them and the inbound SMTP port once the SMTP server listens."""
    services = build_services(
        settings.model_copy(update={"smtp_port": 0, **changes}), run_migrations=False
    )
    try:
        with LiveServer(services, components=components) as live:
            deadline = time.monotonic() + 10
            while "smtp_port" not in services.extras and time.monotonic() < deadline:
                time.sleep(0.01)
            yield services, live, int(services.extras["smtp_port"])  # type: ignore[call-overload]
    finally:
        services.db.dispose()


@dataclass
class InboundStack:
    services: Services
    live: LiveServer
    smtp_port: int
    boot: accounts.Bootstrap

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.live.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def make_mailbox(self, address: str, mode: str = "gated_send") -> dict[str, Any]:
        actor = Actor(type="system", id=None, name="test", account_id=self.boot.account["id"])
        with self.services.db.write() as conn:
            return mailboxes.create_mailbox(
                conn,
                actor=actor,
                settings=self.services.settings,
                address=address,
                oversight_mode=mode,
            )

    def smtp_in(self, mail_from: str, rcpt: str, raw: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp_port) as client:
            client.sendmail(mail_from, [rcpt], raw)

    def inbound(self, count: int = 1, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until ``count`` inbound messages are processed; return them oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            with self.services.db.read() as conn:
                rows = [
                    dict(r)
                    for r in conn.execute(
                        select(messages)
                        .where(messages.c.direction == "inbound")
                        .order_by(messages.c.created_at, messages.c.id)
                    ).mappings()
                ]
            if len(rows) >= count or time.monotonic() > deadline:
                assert len(rows) >= count, f"only {len(rows)} of {count} inbound messages"
                return rows
            time.sleep(0.05)


def dsn(
    original: str, recipient: str, *, to: str, number: int = 1, auto_submitted: bool = False
) -> bytes:
    """A relay's delivery report (RFC 3464): ``recipient`` of the message whose Message-ID
    header is ``original`` failed for good (5.1.1); sent to our mailbox ``to``."""
    return (
        f"From: MAILER-DAEMON@relay.example\r\nTo: {to}\r\nSubject: Undelivered\r\n"
        f"Message-ID: <dsn-{number}@relay.example>\r\nMIME-Version: 1.0\r\n"
        + ("Auto-Submitted: auto-replied\r\n" if auto_submitted else "")
        + 'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nThe mail could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; relay.example\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: {to}\r\nTo: {recipient}\r\nMessage-ID: {original}\r\n"
        "--B--\r\n"
    ).encode()


def outbound_message(
    svc: Services,
    mailbox: dict[str, Any],
    header_id: str,
    to: str | list[str],
    *,
    status: str = "delivered",
    subject: str = "Offer",
) -> str:
    """An outbound message as the sending pipeline leaves it (``status``), in its own thread."""
    now = utcnow()
    with svc.db.write() as conn:
        account_id = conn.execute(
            select(mailboxes_table.c.account_id).where(mailboxes_table.c.id == mailbox["id"])
        ).scalar_one()
        thread = threads.for_outbound(
            conn, account_id=account_id, mailbox_id=mailbox["id"], subject=subject
        )
        threads.touch(conn, thread["id"])
        message_id = new_id("msg")
        conn.execute(
            insert(messages).values(
                id=message_id,
                account_id=account_id,
                mailbox_id=mailbox["id"],
                thread_id=thread["id"],
                direction="outbound",
                status=status,
                message_id_header=header_id,
                from_address=mailbox["address"],
                to=[to] if isinstance(to, str) else to,
                subject=subject,
                markdown="Our offer.",
                oversight_mode="gated_send",
                created_at=now,
                updated_at=now,
                delivered_at=now if status == "delivered" else None,
            )
        )
    return message_id
