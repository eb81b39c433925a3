"""The send routes admit their caller (key, rate-limit token, scope) inside the send itself.

``POST …/send`` and the reply routes authenticate the key and spend its token in the send's
own transaction (on SQLite shared with concurrent sends), not in a dependency of their own.
What callers see must not change: revocation holds on the very next send, a refused or
invalid send still spends its token, a 429 still carries Retry-After and the RateLimit-*
headers, and refusals come in the same order (key, token, scope, body, fields, content).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func, insert, select, update

from multimail.config import Settings
from multimail.ids import new_id, utcnow
from multimail.runtime import build_services
from multimail.services import accounts, audit, directory, keys, sending
from multimail.services.context import Actor, Services
from multimail.store.tables import (
    audit_entries,
    events,
    idempotency_keys,
    mailbox_allowlist,
    messages,
    webhook_deliveries,
)
from multimail.store.tables import mailboxes as mailbox_rows
from multimail.store.tables import webhooks as webhook_rows
from multimail.testing.server import LiveServer
from tests.integration.concurrency_support import run_at_once
from tests.integration.test_sending import make_mailbox

BODY = {"to": "customer@example.com", "subject": "Order", "markdown": "Shipped."}


def _mailbox(services: Services, boot: accounts.Bootstrap, mode: str = "autonomous") -> str:
    return str(make_mailbox(services, boot, mode.replace("_", "-"), mode)["id"])


def _key(services: Services, boot: accounts.Bootstrap, scopes: list[str]) -> keys.CreatedKey:
    operator = Actor(type="system", id=None, name="test", account_id=boot.account["id"])
    with services.db.write() as conn:
        return keys.create_key(
            conn, actor=operator, account_id=boot.account["id"], name="k", scopes=scopes
        )


@pytest.fixture
def tight(settings: Settings) -> Iterator[Services]:
    """Services whose keys get a bucket of 3 requests, refilled at one a minute."""
    svc = build_services(
        settings.model_copy(update={"rate_limit_per_minute": 1, "rate_limit_burst": 3})
    )
    yield svc
    svc.db.dispose()


def _client(server: LiveServer, key: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=30)


def _post_together(
    server: LiveServer, requests: list[tuple[str, str, dict[str, Any]]]
) -> list[int]:
    """POST every (key, path, body) at once, each from a client of its own; the status codes
    in the order given."""
    codes: list[int] = [0] * len(requests)

    def post(index: int, start: threading.Barrier) -> None:
        key, path, body = requests[index]
        with _client(server, key) as client:
            start.wait()
            codes[index] = client.post(path, json=body).status_code

    run_at_once(len(requests), post)
    return codes


def test_revoked_key_is_refused_by_the_very_next_send(
    services: Services, boot: accounts.Bootstrap, live: LiveServer
) -> None:
    box = _mailbox(services, boot)
    created = _key(services, boot, ["send"])
    with _client(live, created.raw_key) as agent:
        assert agent.post(f"/v1/mailboxes/{box}/send", json=BODY).status_code == 202
        operator = Actor(type="system", id=None, name="test", account_id=boot.account["id"])
        with services.db.write() as conn:
            keys.revoke_key(
                conn, actor=operator, account_id=boot.account["id"], key_id=created.record["id"]
            )
        for path in (f"/v1/mailboxes/{box}/send", "/v1/send"):
            refused = agent.post(path, json=BODY | {"from": "autonomous@mm.test"})
            assert refused.status_code == 401, refused.text
            assert refused.json()["code"] == "api_key_revoked"
        long_body = BODY | {"markdown": "x" * (sending.PREADMIT_MAX_CHARS + 1)}
        refused = agent.post(f"/v1/mailboxes/{box}/send", json=long_body)
        assert refused.status_code == 401 and refused.json()["code"] == "api_key_revoked"
    with services.db.read() as conn:
        sent = conn.execute(select(func.count()).select_from(messages)).scalar_one()
    assert sent == 1


def test_refused_and_invalid_sends_spend_their_token_and_429_says_when(
    tight: Services, boot: accounts.Bootstrap
) -> None:
    """A send refused by the service (no recipient), one refused by validation and one with
    unknown fields each spend a token; the fourth request gets 429 with Retry-After."""
    box = _mailbox(tight, boot)
    with LiveServer(tight) as server, _client(server, boot.agent_key) as agent:
        path = f"/v1/mailboxes/{box}/send"
        no_recipient = agent.post(path, json={"subject": "s"})
        assert no_recipient.status_code == 422
        assert no_recipient.json()["code"] == "missing_recipient"
        invalid = agent.post(path, json={"to": 5})
        assert invalid.status_code == 422 and invalid.json()["code"] == "validation_error"
        bypass = agent.post(path, json=BODY | {"status": "approved"})
        assert bypass.status_code == 422 and bypass.json()["code"] == "unknown_fields"
        limited = agent.post(path, json=BODY)
        assert limited.status_code == 429, limited.text
        assert limited.json()["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.headers["RateLimit-Limit"] == "3"
        assert limited.headers["RateLimit-Remaining"] == "0"
        assert limited.headers["RateLimit-Policy"] == "3;w=60"
    with tight.db.read() as conn:
        attempts = conn.execute(
            select(func.count())
            .select_from(audit_entries)
            .where(audit_entries.c.action == "message.bypass_attempt")
        ).scalar_one()
        sent = conn.execute(select(func.count()).select_from(messages)).scalar_one()
    assert attempts == 1 and sent == 0


def test_accepted_send_carries_the_rate_limit_headers(
    tight: Services, boot: accounts.Bootstrap
) -> None:
    box = _mailbox(tight, boot)
    with LiveServer(tight) as server, _client(server, boot.agent_key) as agent:
        first = agent.post(f"/v1/mailboxes/{box}/send", json=BODY)
        second = agent.post(f"/v1/mailboxes/{box}/send", json=BODY | {"subject": "Again"})
    assert first.status_code == second.status_code == 202
    assert first.headers["RateLimit-Remaining"] == "2"
    assert second.headers["RateLimit-Remaining"] == "1"
    assert first.json()["status"] == "queued" and first.json()["idempotent"] is False


def test_wrong_scope_is_refused_after_the_key_and_before_the_body(
    services: Services, boot: accounts.Bootstrap, live: LiveServer
) -> None:
    """Refusal order: a bad key (whatever the body), then the scope, then the body."""
    box = _mailbox(services, boot)
    reader = _key(services, boot, ["read"])
    path = f"/v1/mailboxes/{box}/send"
    unknown = httpx.post(
        live.base_url + path, json={"to": 5}, headers={"X-API-Key": "mm_live_" + "a" * 43}
    )
    assert unknown.status_code == 401 and unknown.json()["code"] == "invalid_api_key"
    empty = httpx.post(
        live.base_url + path, headers={"X-API-Key": "mm_live_" + "a" * 43}, content=b""
    )
    assert empty.status_code == 401
    with _client(live, reader.raw_key) as client:
        refused = client.post(path, json={"to": 5})
        assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope"
    with _client(live, boot.agent_key) as agent:
        missing = agent.post(path, content=b"", headers={"content-type": "application/json"})
        assert missing.status_code == 422 and missing.json()["code"] == "validation_error"


def test_memory_rate_limits_work_on_the_send_path(
    settings: Settings, boot: accounts.Bootstrap
) -> None:
    memory = settings.model_copy(
        update={"rate_limit_backend": "memory", "rate_limit_per_minute": 1, "rate_limit_burst": 2}
    )
    svc = build_services(memory)
    try:
        box = _mailbox(svc, boot)
        with LiveServer(svc) as server, _client(server, boot.agent_key) as agent:
            codes = [agent.post(f"/v1/mailboxes/{box}/send", json=BODY).status_code]
            codes.append(agent.post(f"/v1/mailboxes/{box}/send", json={"subject": "s"}).status_code)
            limited = agent.post(f"/v1/mailboxes/{box}/send", json=BODY)
            codes.append(limited.status_code)
        assert codes == [202, 422, 429]
        assert int(limited.headers["Retry-After"]) >= 1
    finally:
        svc.db.dispose()


def test_one_send_is_one_transaction_with_its_admission(
    services: Services, boot: accounts.Bootstrap, live: LiveServer
) -> None:
    """The key lookup, the token and the message commit together (SQLite: one commit;
    PostgreSQL keeps the token's short transaction of its own: two)."""
    box = _mailbox(services, boot)
    commits: list[int] = []

    def committed(*_: Any) -> None:
        commits.append(1)

    # A short body is prepared on the event loop, a longer one in a thread: both admit
    # the caller in the send's own transaction.
    medium = BODY | {"markdown": "Shipped. " * (sending.PREPARE_ON_LOOP_MAX_CHARS // 9 + 1)}
    with _client(live, boot.agent_key) as agent:
        agent.post(f"/v1/mailboxes/{box}/send", json=BODY).raise_for_status()  # warm
        for body in (BODY, medium):
            commits.clear()
            event.listen(services.db.engine, "commit", committed)
            try:
                agent.post(f"/v1/mailboxes/{box}/send", json=body).raise_for_status()
            finally:
                event.remove(services.db.engine, "commit", committed)
            assert len(commits) == (1 if services.db.is_sqlite else 2)


def test_concurrent_sends_with_a_revoked_key_among_them(
    services: Services, boot: accounts.Bootstrap, live: LiveServer
) -> None:
    """Sends that share a commit: the revoked key's are refused, the others all stand, and
    the audit chain verifies."""
    box = _mailbox(services, boot)
    revoked = _key(services, boot, ["send"])
    operator = Actor(type="system", id=None, name="test", account_id=boot.account["id"])
    with services.db.write() as conn:
        keys.revoke_key(
            conn, actor=operator, account_id=boot.account["id"], key_id=revoked.record["id"]
        )
    senders = 12
    requests = [
        (
            revoked.raw_key if i % 3 == 0 else boot.agent_key,
            f"/v1/mailboxes/{box}/send",
            BODY | {"subject": f"Order {i}"},
        )
        for i in range(senders)
    ]
    codes = _post_together(live, requests)
    assert codes == [401 if i % 3 == 0 else 202 for i in range(senders)]
    with services.db.read() as conn:
        subjects = set(conn.execute(select(messages.c.subject)).scalars())
    assert subjects == {f"Order {i}" for i in range(senders) if i % 3}
    assert audit.verify(services.db).ok


# --- what the send reads with its mailbox (allowlist, webhooks) ------------------------------


def _allow(services: Services, mailbox_id: str, pattern: str) -> None:
    with services.db.write() as conn:
        conn.execute(
            insert(mailbox_allowlist).values(
                id=new_id("alw"),
                mailbox_id=mailbox_id,
                pattern=pattern,
                added_by="operator",
                created_at=utcnow(),
            )
        )


def test_every_allowlist_pattern_read_with_the_mailbox_counts(
    services: Services, boot: accounts.Bootstrap, live: LiveServer
) -> None:
    """The allowlist comes back in the mailbox's own query; each pattern still counts."""
    box = _mailbox(services, boot, "gated_send")
    _allow(services, box, "*@partner.example")
    _allow(services, box, "boss@other.example")
    with _client(live, boot.agent_key) as agent:

        def status(to: list[str]) -> str:
            response = agent.post(f"/v1/mailboxes/{box}/send", json=BODY | {"to": to})
            assert response.status_code == 202, response.text
            return str(response.json()["status"])

        assert status(["a@partner.example", "boss@other.example"]) == "queued"
        assert status(["boss@other.example"]) == "queued"
        assert status(["a@partner.example", "intern@other.example"]) == "pending_send_approval"


def _webhook(services: Services, boot: accounts.Bootstrap, mailbox_id: str | None) -> str:
    webhook_id = new_id("whk")
    now = utcnow()
    with services.db.write() as conn:
        conn.execute(
            insert(webhook_rows).values(
                id=webhook_id,
                account_id=boot.account["id"],
                mailbox_id=mailbox_id,
                url="https://hooks.example/in",
                events=["*"],
                secret="s" * 32,
                enabled=True,
                source="api",
                created_at=now,
                updated_at=now,
            )
        )
    return webhook_id


def _receivers(services: Services, email_id: str) -> set[str]:
    with services.db.read() as conn:
        event_ids = select(events.c.id).where(events.c.message_id == email_id)
        found = conn.execute(
            select(webhook_deliveries.c.webhook_id).where(
                webhook_deliveries.c.event_id.in_(event_ids)
            )
        ).scalars()
        return set(found)


def test_pending_event_reaches_exactly_the_matching_subscriptions(
    services: Services, boot: accounts.Bootstrap, live: LiveServer
) -> None:
    """A held send's oversight.pending event: nobody without subscriptions or with only
    another mailbox's; then the mailbox's own webhook, the account-wide one too, then the
    subscription behind a webhook_url set on the mailbox since the last send."""
    box = _mailbox(services, boot, "gated_send")
    other = _mailbox(services, boot, "gated_all")
    with _client(live, boot.agent_key) as agent:

        def held() -> str:
            response = agent.post(f"/v1/mailboxes/{box}/send", json=BODY)
            assert response.json()["status"] == "pending_send_approval", response.text
            return str(response.json()["id"])

        first = held()
        with services.db.read() as conn:
            stored = conn.execute(
                select(func.count()).select_from(events).where(events.c.message_id == first)
            ).scalar_one()
        # Nobody subscribes yet: the event is not stored at all (the events table is the
        # webhooks' outbox; the audit log is the history).
        assert stored == 0 and _receivers(services, first) == set()
        _webhook(services, boot, other)
        assert _receivers(services, held()) == set()
        mine = _webhook(services, boot, box)
        assert _receivers(services, held()) == {mine}
        everywhere = _webhook(services, boot, None)
        assert _receivers(services, held()) == {everywhere, mine}
        with services.db.write() as conn:
            conn.execute(
                update(mailbox_rows)
                .where(mailbox_rows.c.id == box)
                .values(webhook_url="https://hooks.example/box")
            )
        third = held()
    with services.db.read() as conn:
        implicit = conn.execute(
            select(webhook_rows.c.id).where(
                webhook_rows.c.mailbox_id == box, webhook_rows.c.source == "mailbox"
            )
        ).scalar_one()
    assert _receivers(services, third) == {everywhere, mine, implicit}


def test_concurrent_refusals_keep_their_tokens_and_leave_no_key(
    settings: Settings, boot: accounts.Bootstrap
) -> None:
    """Sends sharing commits through the API, half claiming an idempotency key and then
    refused (read_only mailbox): each refused caller gets its 403 and leaves no key behind,
    the others are stored, and every one of them spent exactly one token."""
    senders = 10
    svc = build_services(
        settings.model_copy(update={"rate_limit_per_minute": 1, "rate_limit_burst": senders + 1})
    )
    try:
        open_box = _mailbox(svc, boot, "autonomous")
        closed_box = _mailbox(svc, boot, "read_only")
        requests = [
            (
                boot.agent_key,
                f"/v1/mailboxes/{closed_box if i % 2 else open_box}/send",
                BODY | {"subject": f"N {i}", "idempotency_key": f"k{i}"},
            )
            for i in range(senders)
        ]
        with LiveServer(svc) as server:
            codes = _post_together(server, requests)
            with _client(server, boot.agent_key) as agent:
                last = agent.post(f"/v1/mailboxes/{open_box}/send", json=BODY)
                over = agent.post(f"/v1/mailboxes/{open_box}/send", json=BODY)
        assert codes == [403 if i % 2 else 202 for i in range(senders)]
        assert last.status_code == 202 and last.headers["RateLimit-Remaining"] == "0"
        assert over.status_code == 429
        with svc.db.read() as conn:
            kept = set(conn.execute(select(idempotency_keys.c.key)).scalars())
            stored = conn.execute(select(func.count()).select_from(messages)).scalar_one()
        assert kept == {f"k{i}" for i in range(0, senders, 2)}
        assert stored == senders // 2 + 1
        assert audit.verify(svc.db).ok
    finally:
        svc.db.dispose()


def _suppress(services: Services, account_id: str, address: str) -> None:
    operator = Actor(type="system", id=None, name="test", account_id=account_id)
    with services.db.write() as conn:
        directory.suppress(
            conn, actor=operator, account_id=account_id, address=address, reason="hard_bounce"
        )


def test_suppressions_read_with_the_mailbox_match_what_the_scan_needs(
    services: Services, boot: accounts.Bootstrap, live: LiveServer
) -> None:
    """The request's recipients are checked against suppressions in the mailbox's query;
    addresses known only later (auto_cc) and long recipient lists are still checked, and
    another account's suppressions never count."""
    box = _mailbox(services, boot)
    _suppress(services, boot.account["id"], "gone@example.com")
    _suppress(services, boot.account["id"], "audit@example.com")
    operator = Actor(type="system", id=None, name="test", account_id=boot.account["id"])
    with services.db.write() as conn:
        other = accounts.create_account(conn, actor=operator, name="Other")
    _suppress(services, other["id"], "here@example.com")
    with _client(live, boot.agent_key) as agent:

        def findings(**fields: Any) -> tuple[str, list[str]]:
            response = agent.post(f"/v1/mailboxes/{box}/send", json=BODY | fields)
            assert response.status_code == 202, response.text
            body = response.json()
            return body["status"], [f["code"] for f in body["scan_findings"]]

        assert findings(to="Gone@Example.com") == ("send_failed", ["all_recipients_suppressed"])
        assert findings(to=["gone@example.com", "here@example.com"]) == (
            "queued",
            ["suppressed_recipients"],
        )
        many = [f"r{i}@example.com" for i in range(9)] + ["gone@example.com"]
        assert findings(to=many) == ("queued", ["suppressed_recipients"])
        assert findings(to="here@example.com") == ("queued", [])
        with services.db.write() as conn:
            conn.execute(
                update(mailbox_rows)
                .where(mailbox_rows.c.id == box)
                .values(auto_cc=["audit@example.com"])
            )
        assert findings(to="here@example.com") == ("queued", ["suppressed_recipients"])
