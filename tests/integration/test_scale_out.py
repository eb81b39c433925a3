"""Scale-out: two `multimail serve --role api` and two `--role worker` processes on one
PostgreSQL database deliver every message exactly once and keep one linear audit chain."""

from __future__ import annotations

import email
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from multimail.services import accounts, mailboxes
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries, messages
from multimail.testing.smtp import CapturingSMTPServer
from tests.conftest import BACKEND
from tests.integration.test_rate_limit_processes import free_port

pytestmark = pytest.mark.skipif(
    BACKEND != "postgres",
    reason="several processes sharing one database is the PostgreSQL deployment; "
    "SQLite serves one host (its single-process paths run in the rest of the suite)",
)

M = 500


@contextmanager
def serve(tmp_path: Path, db_url: str, relay_port: int, role: str) -> Iterator[str]:
    """``multimail serve --role <role>``; yields its base URL (API roles); SIGTERM at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIMAIL_")}
    env.update(
        MULTIMAIL_DATA_DIR=str(tmp_path / "data"),
        MULTIMAIL_DATABASE_URL=db_url,
        MULTIMAIL_DOMAIN="mm.test",
        MULTIMAIL_HTTP_PORT=str(port),
        MULTIMAIL_SMTP_URL=f"smtp://127.0.0.1:{relay_port}",
        MULTIMAIL_RATE_LIMIT_PER_MINUTE="1000000",
        MULTIMAIL_RATE_LIMIT_BURST="1000000",
    )
    log = (tmp_path / f"{role}-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "multimail", "serve", "--role", role],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while role == "api":
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "the API process exited during start-up"
            assert time.monotonic() < deadline, "the API process did not start in 30 s"
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_two_api_and_two_worker_processes_deliver_each_message_once(
    services: Services, boot: accounts.Bootstrap, tmp_path: Path, db_url: str
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
        apis = [stack.enter_context(serve(tmp_path, db_url, relay.port, "api")) for _ in "ab"]
        for _ in "ab":
            stack.enter_context(serve(tmp_path, db_url, relay.port, "worker"))
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
