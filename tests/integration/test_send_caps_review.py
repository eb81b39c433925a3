"""Send caps, the daily quota and scheduled release, after the oversight-controls review.

- test sends (mm_test_ keys) have caps of their own: they neither use up the live caps nor
  escape the 429 in the sandbox;
- on PostgreSQL a key's caps and the account's daily quota hold under concurrent sends to
  different mailboxes (the key and account rows are locked before counting);
- a scheduled message is released under the stricter of the mode it was sent under and the
  mailbox's mode now, and that mode is recorded on the message and in the audit entry.

Live server and real services (fixtures from ``oversight_support``); nothing is mocked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from multimail.ids import utcnow
from multimail.services import accounts, keys, sending
from multimail.services.context import Services
from multimail.store.tables import mailboxes as mailbox_table
from tests.conftest import BACKEND, Api
from tests.integration.oversight_support import (
    audit_actions,
    job_rows,
    make_mailbox,
    make_message,
    message_row,
    operator,
    relay,
    settings,
)

__all__ = ["relay", "settings"]  # fixtures, re-exported so pytest finds them here

postgres_only = pytest.mark.skipif(
    BACKEND != "postgres", reason="SQLite serialises writers; the race is PostgreSQL's"
)


def _send(client: httpx.Client, mailbox_id: str, n: int = 0, **extra: Any) -> httpx.Response:
    return client.post(
        f"/v1/mailboxes/{mailbox_id}/send",
        json={"to": "bob@example.org", "subject": f"hello {n}", "markdown": "Hi Bob.", **extra},
    )


def _sender(
    client: httpx.Client, mailbox_id: str, n: int, **extra: Any
) -> Callable[[], httpx.Response]:
    return lambda: _send(client, mailbox_id, n, **extra)


def _new_key(services: Services, boot: accounts.Bootstrap, **fields: Any) -> str:
    with services.db.write() as conn:
        return keys.create_key(
            conn,
            actor=operator(boot.account["id"]),
            account_id=boot.account["id"],
            name=fields.pop("name", "capped agent"),
            scopes=["send", "read"],
            **fields,
        ).raw_key


def _concurrently(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Run every call at once (after a barrier); their responses, in no particular order."""
    start = threading.Barrier(len(calls))
    responses: list[httpx.Response] = []
    errors: list[BaseException] = []

    def one(call: Callable[[], httpx.Response]) -> None:
        start.wait()
        try:
            responses.append(call())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(responses) == len(calls)
    return responses


# --- test sends have caps of their own -------------------------------------------------------


def test_sandbox_and_live_sends_each_meet_their_own_mailbox_cap(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    capped = make_mailbox(services, boot.account["id"], "capped@mm.test", send_cap_hour=2)
    live = api.client(boot.agent_key)
    sandbox = api.client(_new_key(services, boot, name="sandbox", mode="test"))
    for n in range(2):
        assert _send(live, capped["id"], n).status_code == 202
    refused = _send(live, capped["id"], 2)
    assert refused.status_code == 429 and refused.json()["code"] == "send_cap_exceeded"
    # The live cap is used up; the sandbox still has its own two, then meets its 429.
    for n in range(2):
        assert _send(sandbox, capped["id"], n).status_code == 202
    refused = _send(sandbox, capped["id"], 2)
    assert refused.status_code == 429, refused.text
    assert refused.json()["code"] == "send_cap_exceeded"
    assert "test mode" in refused.json()["error"]


def test_a_test_keys_own_cap_still_applies(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    box = make_mailbox(services, boot.account["id"], "sandbox@mm.test")
    sandbox = api.client(_new_key(services, boot, mode="test", send_cap_hour=1))
    assert _send(sandbox, box["id"]).status_code == 202
    refused = _send(sandbox, box["id"], 1)
    assert refused.status_code == 429 and refused.json()["code"] == "send_cap_exceeded"


# --- caps and quota under concurrent sends (PostgreSQL) --------------------------------------


@postgres_only
def test_daily_quota_holds_under_concurrent_sends_to_different_mailboxes(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """The quota is the account's: sends to ten mailboxes at once get at most 3 accepted."""
    with services.db.write() as conn:
        accounts.update_account(
            conn,
            actor=operator(boot.account["id"]),
            account_id=boot.account["id"],
            changes={"daily_send_quota": 3},
        )
    boxes = [make_mailbox(services, boot.account["id"], f"quota{i}@mm.test") for i in range(10)]
    responses = _concurrently(
        [_sender(api.client(boot.agent_key), b["id"], i) for i, b in enumerate(boxes)]
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(202) == 3, codes
    assert set(codes) == {202, 429}, [r.text for r in responses if r.status_code != 202]
    refused = [r.json()["code"] for r in responses if r.status_code == 429]
    assert set(refused) == {"daily_quota_exceeded"}


@postgres_only
def test_key_cap_and_quota_together_under_concurrent_sends_with_shared_idempotency_keys(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """Both locks (key, then account) and idempotency claims of one key across mailboxes:
    every send is answered (no deadlock, no 5xx), and neither limit is passed."""
    with services.db.write() as conn:
        accounts.update_account(
            conn,
            actor=operator(boot.account["id"]),
            account_id=boot.account["id"],
            changes={"daily_send_quota": 4},
        )
    capped_key = _new_key(services, boot, send_cap_hour=3)
    boxes = [make_mailbox(services, boot.account["id"], f"both{i}@mm.test") for i in range(12)]
    # Half the capped key's sends share one idempotency key (different mailboxes, so different
    # requests: one may win it, the others are refused as a reused key).
    calls = [
        _sender(api.client(capped_key), b["id"], i, idempotency_key="same" if i % 2 else None)
        for i, b in enumerate(boxes[:6])
    ] + [_sender(api.client(boot.agent_key), b["id"], 100 + i) for i, b in enumerate(boxes[6:])]
    responses = _concurrently(calls)
    assert all(r.status_code < 500 for r in responses), [r.text for r in responses]
    accepted = [r for r in responses if r.status_code == 202]
    assert len(accepted) <= 4, [r.text for r in responses]
    by_capped_key = [
        r for r in accepted if r.request.headers["Authorization"] == f"Bearer {capped_key}"
    ]
    assert len(by_capped_key) <= 3
    codes = {r.json()["code"] for r in responses if r.status_code != 202}
    assert codes <= {"daily_quota_exceeded", "send_cap_exceeded", "idempotency_key_reused"}


# --- scheduled release under the mailbox's mode now -------------------------------------------


def _scheduled(services: Services, box: dict[str, Any]) -> dict[str, Any]:
    return make_message(services, box, status="scheduled", send_at=utcnow() - timedelta(seconds=5))


def _set_mode(services: Services, mailbox_id: str, mode: str) -> None:
    """The mailbox's mode as an operator's PATCH (or approved upgrade) leaves it."""
    with services.db.write() as conn:
        conn.execute(
            update(mailbox_table)
            .where(mailbox_table.c.id == mailbox_id)
            .values(oversight_mode=mode)
        )


def test_release_under_a_mailbox_tightened_to_read_only_waits_for_approval(
    services: Services, boot: accounts.Bootstrap
) -> None:
    box = make_mailbox(services, boot.account["id"], "free@mm.test", oversight_mode="autonomous")
    msg = _scheduled(services, box)
    _set_mode(services, box["id"], "read_only")
    assert sending.release_scheduled(services, msg["id"]) == "pending_send_approval"
    stored = message_row(services, msg["id"])
    assert stored["status"] == "pending_send_approval"
    assert stored["oversight_mode"] == "read_only"
    assert job_rows(services, "deliver") == []
    entry = audit_actions(services, msg["id"])[-1]
    assert entry["action"] == "message.held_for_approval"
    assert entry["oversight_mode"] == "read_only"
    details = json.loads(entry["details"])
    assert details["sent_under_mode"] == "autonomous"
    assert details["mailbox_mode"] == "read_only"


def test_release_after_loosening_keeps_the_mode_the_message_was_sent_under(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """Loosening the mailbox later does not loosen a message written under a tighter gate."""
    box = make_mailbox(services, boot.account["id"], "gated@mm.test", oversight_mode="gated_send")
    msg = _scheduled(services, box)
    _set_mode(services, box["id"], "autonomous")
    assert sending.release_scheduled(services, msg["id"]) == "pending_send_approval"
    assert message_row(services, msg["id"])["oversight_mode"] == "gated_send"
    entry = audit_actions(services, msg["id"])[-1]
    assert entry["oversight_mode"] == "gated_send"
    assert "sent_under_mode" not in json.loads(entry["details"])


def test_release_tightened_to_monitored_still_queues(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """monitored is tighter than autonomous but not a gate: the message goes, under it."""
    box = make_mailbox(services, boot.account["id"], "free@mm.test", oversight_mode="autonomous")
    msg = _scheduled(services, box)
    _set_mode(services, box["id"], "monitored")
    assert sending.release_scheduled(services, msg["id"]) == "queued"
    assert message_row(services, msg["id"])["oversight_mode"] == "monitored"
    assert [j["payload"]["message_id"] for j in job_rows(services, "deliver")] == [msg["id"]]
    assert audit_actions(services, msg["id"])[-1]["oversight_mode"] == "monitored"
