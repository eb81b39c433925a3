"""Scale-out: two `multimail serve --role api` and two `--role worker` processes on one
PostgreSQL database deliver every message exactly once and keep one linear audit chain."""

from __future__ import annotations

import email
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from multimail.config import Settings
from multimail.services import accounts, mailboxes
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries, messages
from multimail.testing.processes import ServeProcess
from multimail.testing.smtp import CapturingSMTPServer
from tests.conftest import BACKEND

pytestmark = pytest.mark.skipif(
    BACKEND != "postgres",
    reason="several processes sharing one database is the PostgreSQL deployment; "
    "SQLite serves one host (its single-process paths run in the rest of the suite)",
)

M = 500


def serve(stack: ExitStack, settings: Settings, role: str) -> str:
    """``multimail serve --role <role>`` until the test ends; its base URL once it answers."""
    proc = stack.enter_context(ServeProcess(settings, role, settings.data_dir.parent))
    proc.wait_ready(30)
    return proc.base_url if proc.http_port is not None else ""


def test_two_api_and_two_worker_processes_deliver_each_message_once(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """500 messages sent through two API processes (half from an autonomous mailbox, half
    gated and approved through either API) reach the relay exactly once each, and the audit
    chain the four processes wrote together is linear and verifies."""
    operator = Actor(type="system", id=None, name="test", account_id=boot.account["id"])
    with services.db.write() as conn:
        boxes = {
            mode: mailboxes.create_mailbox(
                conn,
                actor=operator,
                settings=services.settings,
                address=f"{mode.replace('_', '-')}@mm.test",
                oversight_mode=mode,
            )["id"]
            for mode in ("autonomous", "gated_send")
        }
    with CapturingSMTPServer() as relay, ExitStack() as stack:
        processes = services.settings.model_copy(
            update={
                "smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}"),
                "rate_limit_per_minute": 1_000_000,
                "rate_limit_burst": 1_000_000,
            }
        )
        apis = [serve(stack, processes, "api") for _ in "ab"]
        for _ in "ab":
            serve(stack, processes, "worker")
        agents = [httpx.Client(base_url=b, headers=_auth(boot.agent_key), timeout=30) for b in apis]
        reviewers = [
            httpx.Client(base_url=b, headers=_auth(boot.reviewer_key), timeout=30) for b in apis
        ]

        def send(n: int) -> str:
            box = boxes["autonomous" if n % 2 else "gated_send"]
            body = {"to": [f"r{n}@example.test"], "subject": f"No. {n}", "markdown": f"Text {n}."}
            sent = agents[n % 2].post(f"/v1/mailboxes/{box}/send", json=body)
            assert sent.status_code in (200, 202), sent.text
            return str(sent.json()["id"])

        def approve(pair: tuple[int, str]) -> None:
            n, message_id = pair
            decided = reviewers[n % 2].post(
                "/v1/oversight/decide", json={"email_id": message_id, "action": "approve"}
            )
            assert decided.status_code == 200, decided.text

        with ThreadPoolExecutor(32) as pool:
            ids = list(pool.map(send, range(M)))
            gated = [(n, i) for n, i in enumerate(ids) if n % 2 == 0]
            list(pool.map(approve, gated))
        deadline = time.monotonic() + 60
        while _statuses(services) != {"delivered": M} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _statuses(services) == {"delivered": M}
        time.sleep(0.5)
        verify = httpx.get(
            f"{apis[0]}/v1/audit-log/verify", headers=_auth(boot.admin_key), timeout=60
        )
        for client in agents + reviewers:
            client.close()
    assert verify.status_code == 200 and verify.json()["intact"] is True, verify.text
    headers = _headers(services)
    copies = Counter(
        headers[h]
        for c in relay.messages
        if (h := email.message_from_bytes(c.data)["Message-ID"]) in headers
    )
    assert copies == Counter(dict.fromkeys(ids, 1))
    with services.db.read() as conn:
        seqs = [r.seq for r in conn.execute(select(audit_entries.c.seq).order_by("seq"))]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the audit chain has gaps or forks"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _statuses(services: Services) -> dict[str, int]:
    with services.db.read() as conn:
        rows = conn.execute(select(messages.c.status).where(messages.c.direction == "outbound"))
        return dict(Counter(r.status for r in rows))


def _headers(services: Services) -> dict[str, str]:
    with services.db.read() as conn:
        rows = conn.execute(select(messages.c.id, messages.c.message_id_header))
        return {r.message_id_header: r.id for r in rows}
