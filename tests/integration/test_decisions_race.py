"""APP-3: concurrent decisions on one message — exactly one wins, one audit entry records it.

The suite runs a few rounds; ``MULTIMAIL_RACE_ROUNDS=1000`` runs the full RELIABILITY.md
figure (marked slow).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import httpx
import pytest

from multimail.services import accounts
from multimail.services.context import Services
from tests.conftest import Api
from tests.integration.oversight_support import (
    audit_actions,
    job_rows,
    key_id,
    make_mailbox,
    make_message,
    message_row,
    relay,
    settings,
)

__all__ = ["relay", "settings"]  # fixtures, re-exported so pytest finds them here

CONCURRENCY = 50
ROUNDS = int(os.environ.get("MULTIMAIL_RACE_ROUNDS", "5"))
DECISIONS = ("message.approved", "message.rejected")


def _race(base_url: str, key: str, message_id: str) -> list[httpx.Response]:
    barrier = Barrier(CONCURRENCY)

    def one(i: int) -> httpx.Response:
        action = "approve" if i % 2 else "reject"
        with httpx.Client(
            base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {key}"}
        ) as client:
            barrier.wait()
            return client.post(
                "/v1/oversight/decide", json={"email_id": message_id, "action": action}
            )

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, range(CONCURRENCY)))


@pytest.mark.parametrize(
    "rounds", [pytest.param(ROUNDS, marks=[pytest.mark.slow] if ROUNDS > 50 else [])]
)
def test_concurrent_decisions_have_one_winner_and_one_audit_entry(
    api: Api, services: Services, boot: accounts.Bootstrap, rounds: int
) -> None:
    """50 reviewers deciding one message at once: one 200, the rest 409 already_decided; the
    final state is the winner's; one decision audit entry; at most one deliver job."""
    box = make_mailbox(services, boot.account["id"])
    agent = key_id(services, "agent", boot.account["id"])
    for _ in range(rounds):
        msg = make_message(services, box, created_by_key_id=agent)
        responses = _race(api.base_url, boot.reviewer_key, msg["id"])
        winners = [r for r in responses if r.status_code == 200]
        assert len(winners) == 1, [r.status_code for r in responses]
        losers: list[dict[str, Any]] = [r.json() for r in responses if r.status_code != 200]
        assert all(body["code"] == "already_decided" for body in losers)
        won = winners[0].json()
        stored = message_row(services, msg["id"])
        assert stored["decision"] == won["decision"]["action"]
        expected = "rejected" if stored["decision"] == "reject" else None
        if expected:
            assert stored["status"] == "rejected"
        decided = [a for a in audit_actions(services, msg["id"]) if a["action"] in DECISIONS]
        assert len(decided) == 1
        deliveries = [
            j for j in job_rows(services, "deliver") if j["payload"]["message_id"] == msg["id"]
        ]
        assert len(deliveries) == (1 if stored["decision"] == "approve" else 0)
