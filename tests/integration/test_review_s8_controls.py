"""Review (SPEC §2): oversight controls beyond the gate itself — trust ladder, codes,
kill switch, monitored copies. Each test began as a reviewer's strict xfail
naming a defect (session 8), fixed the same session."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from multimail.ids import utcnow
from multimail.services import accounts
from multimail.services.context import Services
from multimail.store.tables import delivery_attempts, mailboxes, messages
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import delivery
from tests.conftest import Api
from tests.integration.oversight_support import (
    box,
    job_rows,
    last_code,
    make_mailbox,
    make_message,
    message_row,
    relay,
    settings,
)

__all__ = ["box", "relay", "settings"]  # fixtures, re-exported so pytest finds them here


def test_an_upgrade_code_issued_before_a_tightening_cannot_undo_it(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    agent = api.client(boot.agent_key)
    asked = agent.post(
        f"/v1/mailboxes/{box['id']}/request-upgrade", json={"target_mode": "monitored"}
    )
    assert asked.status_code == 202, asked.text
    code = last_code(services)
    # The operator was mailed "gated_send -> monitored". Before handing the code over, an
    # incident: the operator clamps the mailbox down to read_only (immediate).
    operator = api.client(boot.admin_key)
    clamped = operator.patch(f"/v1/mailboxes/{box['id']}", json={"oversight_mode": "read_only"})
    assert clamped.status_code == 200, clamped.text
    assert clamped.json()["oversight_mode"] == "read_only"
    # The agent (which saw or guessed nothing new) replays the earlier code.
    applied = agent.post(f"/v1/mailboxes/{box['id']}/upgrade", json={"code": code})
    with services.db.read() as conn:
        mode = conn.execute(
            select(mailboxes.c.oversight_mode).where(mailboxes.c.id == box["id"])
        ).scalar_one()
    assert applied.status_code == 403 and mode == "read_only", (
        "a code approving 'gated_send -> monitored' must not lift a later read_only clamp "
        f"to monitored (the operator never approved read_only -> monitored); got "
        f"{applied.status_code} and mode {mode!r}"
    )


def test_monitored_copy_is_sent_for_a_message_that_reached_a_recipient(
    services: Services,
    boot: accounts.Bootstrap,
    relay: CapturingSMTPServer,
) -> None:
    mbx = make_mailbox(services, boot.account["id"], "watched@mm.test", oversight_mode="monitored")
    msg = make_message(services, mbx, status="queued")
    with services.db.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == msg["id"])
            .values(to=["bob@example.org", "carol@example.org"])
        )
    relay.fail_with(451, "greylisted", stage="rcpt", only_for=["carol@example.org"])
    first = asyncio.run(delivery.deliver(services, msg["id"], "w1"))
    assert first == "deferred"
    assert relay.wait_for(1)[0].rcpt_tos == ["bob@example.org"], "bob has the message"
    # Carol's server keeps answering 4xx until the 3-day retry window is over.
    with services.db.write() as conn:
        conn.execute(
            update(delivery_attempts)
            .where(delivery_attempts.c.message_id == msg["id"])
            .values(started_at=utcnow() - timedelta(days=4))
        )
    last = asyncio.run(delivery.deliver(services, msg["id"], "w1"))
    assert last == "send_failed", message_row(services, msg["id"])["status"]
    copies = [
        j for j in job_rows(services, "system_mail") if j["payload"]["kind"] == "monitored_copy"
    ]
    assert len(copies) == 1, (
        "the message went out to bob@example.org from a monitored mailbox, so the oversight "
        f"address must get exactly one copy; it got {len(copies)}"
    )
