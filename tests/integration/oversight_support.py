"""Shared set-up for the oversight tests: a relay that captures, a mailbox, pending messages.

The sending path is another module's work; these tests put messages into the states they
need by writing the rows the sending path writes (same table, same columns).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import insert, select

from multimail.config import Settings
from multimail.ids import new_id, utcnow
from multimail.services import accounts, mailboxes, threads
from multimail.services.context import Actor, Services
from multimail.smtp.outbound import RelayTransport
from multimail.store import jobs as job_store
from multimail.store.tables import api_keys, audit_entries, events, jobs, messages, webhooks
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import delivery, runner

CODE = re.compile(r"\*\*([A-Z2-9]{8})\*\*")


@pytest.fixture
def relay() -> Iterator[CapturingSMTPServer]:
    """Any delivery attempt goes to loopback, never to a real MX host."""
    with CapturingSMTPServer() as server:
        yield server


@pytest.fixture
def settings(settings: Settings, relay: CapturingSMTPServer) -> Settings:
    return settings.model_copy(update={"smtp_url": SecretStr(f"smtp://{relay.host}:{relay.port}")})


@pytest.fixture
def box(services: Services, boot: accounts.Bootstrap) -> dict[str, Any]:
    """A gated mailbox of the bootstrap account (make_mailbox's defaults)."""
    return make_mailbox(services, boot.account["id"])


@pytest.fixture
def agent_id(services: Services, boot: accounts.Bootstrap) -> str:
    """The id of the bootstrap agent key (scope ``send``)."""
    return key_id(services, "agent", boot.account["id"])


def operator(account_id: str) -> Actor:
    return Actor(type="user", id=None, name="test operator", account_id=account_id)


def key_id(services: Services, name: str, account_id: str) -> str:
    with services.db.read() as conn:
        return str(
            conn.execute(
                select(api_keys.c.id).where(
                    api_keys.c.name == name, api_keys.c.account_id == account_id
                )
            ).scalar_one()
        )


def make_mailbox(
    services: Services, account_id: str, address: str = "agent@mm.test", **fields: Any
) -> dict[str, Any]:
    with services.db.write() as conn:
        view = mailboxes.create_mailbox(
            conn,
            actor=operator(account_id),
            settings=services.settings,
            address=address,
            **fields,
        )
    return {**view, "account_id": account_id}


def make_message(
    services: Services,
    box: dict[str, Any],
    *,
    status: str = "pending_send_approval",
    direction: str = "outbound",
    subject: str = "Quarterly numbers",
    markdown: str = "Hello **Bob**, here they are.",
    created_by_key_id: str | None = None,
    thread_id: str | None = None,
    created_at: datetime | None = None,
    send_at: datetime | None = None,
    gate_timing: str = "gate_first",
    scan_findings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A message row as the sending (or inbound) path leaves it."""
    now = created_at or utcnow()
    account_id = box["account_id"]
    with services.db.write() as conn:
        if thread_id is None:
            thread_id = threads.for_outbound(
                conn, account_id=account_id, mailbox_id=box["id"], subject=subject
            )["id"]
        outbound = direction == "outbound"
        record = {
            "id": new_id("msg"),
            "account_id": account_id,
            "mailbox_id": box["id"],
            "thread_id": thread_id,
            "direction": direction,
            "status": status,
            "message_id_header": f"<{new_id('msg')}@mm.test>",
            "from_address": box["address"] if outbound else "bob@example.org",
            "to": ["bob@example.org"] if outbound else [box["address"]],
            "subject": subject,
            "markdown": markdown,
            "text": markdown,
            "html": f"<p>{markdown}</p>",
            "metadata": {"crm_case": "4711"},
            "scan_findings": scan_findings or [],
            "oversight_mode": box["oversight_mode"],
            "gate_timing": gate_timing,
            "send_at": send_at,
            "created_by_key_id": created_by_key_id,
            "created_by_key_name": "agent" if created_by_key_id else None,
            "created_at": now,
            "updated_at": now,
        }
        conn.execute(insert(messages).values(**record))
        threads.touch(conn, thread_id, now)
    return record


def message_row(services: Services, message_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        return dict(
            conn.execute(select(messages).where(messages.c.id == message_id)).mappings().one()
        )


def audit_actions(services: Services, subject_id: str) -> list[dict[str, Any]]:
    with services.db.read() as conn:
        rows = conn.execute(
            select(audit_entries)
            .where(audit_entries.c.subject_id == subject_id)
            .order_by(audit_entries.c.seq)
        ).mappings()
        return [dict(r) for r in rows]


def subscribe_everything(services: Services, account_id: str) -> str:
    """An account-wide subscription to every event, so that events are stored.

    Events nobody subscribes to are not stored (the events table is the webhooks' outbox),
    so a test that observes emission through the events table subscribes first. Its URL is
    a closed loopback port: a dispatcher, if one runs, posts nowhere beyond this machine.
    """
    now = utcnow()
    webhook_id = new_id("whk")
    with services.db.write() as conn:
        conn.execute(
            insert(webhooks).values(
                id=webhook_id,
                account_id=account_id,
                url="http://127.0.0.1:9/events",
                events=["*"],
                secret="whsec_test",
                created_at=now,
                updated_at=now,
            )
        )
    return webhook_id


def event_types(services: Services, message_id: str) -> list[str]:
    with services.db.read() as conn:
        rows = conn.execute(
            select(events.c.type).where(events.c.message_id == message_id).order_by(events.c.seq)
        )
        return [r.type for r in rows]


def job_rows(services: Services, kind: str) -> list[dict[str, Any]]:
    with services.db.read() as conn:
        rows = conn.execute(select(jobs).where(jobs.c.kind == kind).order_by(jobs.c.id))
        return [dict(r) for r in rows.mappings()]


def run_operator_mail(services: Services, job_id: str) -> None:
    """Send one queued ``system_mail`` job the way a worker does (its handler, to the relay)."""
    with services.db.read() as conn:
        payload = conn.execute(select(jobs.c.payload).where(jobs.c.id == job_id)).scalar_one()
    job = job_store.Job(job_id, delivery.SYSTEM_MAIL, dict(payload), 1, 5, utcnow())

    transport = delivery.outbound_transport(services)
    assert isinstance(transport, RelayTransport), "the tests send through the capturing relay"

    async def run() -> None:
        try:
            await runner.HANDLERS[delivery.SYSTEM_MAIL](services, job, "test-worker")  # type: ignore[misc]
        finally:
            # This loop ends here: the transport's sessions cannot serve another one.
            await transport.close()

    asyncio.run(run())


def last_code(services: Services) -> str:
    """The approval code of the newest operator email (the code is mailed, never returned)."""
    mails = [
        j for j in job_rows(services, "system_mail") if j["payload"]["kind"] == "approval_code"
    ]
    found = CODE.search(mails[-1]["payload"]["markdown"])
    assert found is not None
    return found.group(1)


def second_account(services: Services) -> accounts.Bootstrap:
    return accounts.bootstrap(services.db, account_name="Other", operator_email="ops@other.test")
