"""The webhook API over a live server: subscriptions, secrets, deliveries, redelivery, test."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from multimail.config import Settings
from multimail.ids import parse_datetime, utcnow
from multimail.runtime import build_services
from multimail.services import accounts
from multimail.services.context import Services
from multimail.store.tables import audit_entries
from multimail.testing.server import LiveServer
from multimail.workers.webhooks import run_dispatcher
from tests.conftest import Api
from tests.integration.webhook_helpers import (
    Receiver,
    Reply,
    emit,
    make_message,
    receiving,
)


@pytest.fixture
def dev(settings: Settings) -> Iterator[tuple[Services, LiveServer, accounts.Bootstrap]]:
    """A live server allowing loopback http webhooks, with the dispatcher running beside it."""
    svc = build_services(
        settings.model_copy(update={"allow_private_webhooks": True, "allow_http_webhooks": True})
    )
    boot = accounts.bootstrap(svc.db, account_name="Acme", operator_email="ops@mm.test")

    async def dispatcher(services: Services, stop: Any) -> None:
        await run_dispatcher(services, stop, poll_interval=0.05)

    with LiveServer(svc, components=[dispatcher]) as server:
        yield svc, server, boot
    svc.db.dispose()


def client(server: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def wait_for(check: Any, within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_create_shows_the_secret_once_and_lists_without_it(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """POST answers 201 with a whsec_ secret; GET list and GET one never show a secret; each
    change is audited; DELETE removes it."""
    admin = api.client(boot.admin_key)
    mbx = admin.post("/v1/mailboxes", json={"address": "agent@mm.test"}).json()
    created = admin.post(
        "/v1/webhooks",
        json={
            "endpoint": "https://hooks.example.com/mm",
            "events": ["message.approved", "email.received"],
            "mailbox_id": "agent@mm.test",
            "description": "crm",
        },
    )
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["secret"].startswith("whsec_") and hook["id"].startswith("whk_")
    assert hook["events"] == ["message.approved", "email.received"]
    assert hook["mailbox_id"] == mbx["id"] and hook["url"] == hook["endpoint"]
    listed = admin.get("/v1/webhooks").json()["webhooks"]
    one = admin.get(f"/v1/webhooks/{hook['id']}").json()
    assert [h["id"] for h in listed] == [hook["id"]]
    for shown in (listed[0], one):
        assert "secret" not in shown and "previous_secret" not in shown
        assert hook["secret"] not in json.dumps(shown)
    assert admin.delete(f"/v1/webhooks/{hook['id']}").json()["deleted"] is True
    assert admin.get(f"/v1/webhooks/{hook['id']}").status_code == 404
    with services.db.read() as conn:
        actions = [r.action for r in conn.execute(select(audit_entries.c.action))]
    assert actions.count("webhook.created") == 1 and actions.count("webhook.deleted") == 1


def test_bad_subscriptions_are_refused_with_clear_errors(
    api: Api, boot: accounts.Bootstrap
) -> None:
    """Unknown event names (422 naming the allowed ones), http without the operator's
    permission, internal targets, a missing URL, and non-admin keys are refused."""
    admin = api.client(boot.admin_key)
    unknown = admin.post(
        "/v1/webhooks", json={"url": "https://h.example.com/", "events": ["message.exploded"]}
    )
    assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_event"
    assert "message.received" in unknown.json()["error"] and "*" in unknown.json()["allowed"]
    http = admin.post("/v1/webhooks", json={"url": "http://h.example.com/"})
    assert http.status_code == 422 and http.json()["code"] == "webhook_url_insecure"
    for target in (
        "https://169.254.169.254/latest",
        "https://10.0.0.5/",
        "https://127.0.0.1:9/",
        "https://localhost/",
        "https://[fe80::1]/",
        "https://[::ffff:127.0.0.1]/",
    ):
        refused = admin.post("/v1/webhooks", json={"url": target})
        assert refused.status_code == 422, target
        assert refused.json()["code"] == "webhook_target_forbidden", target
    missing = admin.post("/v1/webhooks", json={"events": ["*"]})
    assert missing.status_code == 422 and missing.json()["code"] == "missing_url"
    agent = api.client(boot.agent_key)
    assert agent.post("/v1/webhooks", json={"url": "https://h.example.com/"}).status_code == 403
    assert agent.get("/v1/webhooks").status_code == 403
    assert admin.get("/v1/webhooks").json()["webhooks"] == []


def test_other_accounts_webhooks_are_not_found(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Account B's admin key gets 404 on account A's webhook and its deliveries, and no side
    effect happens."""
    other = accounts.bootstrap(services.db, account_name="Other", operator_email="o@mm.test")
    mine = api.client(boot.admin_key).post("/v1/webhooks", json={"url": "https://h.example.com/"})
    hook_id = mine.json()["id"]
    theirs = api.client(other.admin_key)
    assert theirs.get(f"/v1/webhooks/{hook_id}").status_code == 404
    assert theirs.delete(f"/v1/webhooks/{hook_id}").status_code == 404
    assert theirs.post(f"/v1/webhooks/{hook_id}/rotate-secret").status_code == 404
    assert theirs.get(f"/v1/webhooks/{hook_id}/deliveries").status_code == 404
    assert theirs.get("/v1/webhooks").json()["webhooks"] == []
    assert api.client(boot.admin_key).get(f"/v1/webhooks/{hook_id}").status_code == 200


def test_rotate_returns_a_new_secret_with_a_24h_overlap_and_enable_clears_disabling(
    api: Api, boot: accounts.Bootstrap
) -> None:
    """rotate-secret answers the new secret once and the overlap's end; enable switches on."""
    admin = api.client(boot.admin_key)
    hook = admin.post("/v1/webhooks", json={"url": "https://h.example.com/"}).json()
    rotated = admin.post(f"/v1/webhooks/{hook['id']}/rotate-secret").json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != hook["secret"]
    ends = parse_datetime(rotated["previous_secret_expires_at"])
    assert abs((ends - utcnow()) - timedelta(hours=24)) < timedelta(minutes=1)
    assert rotated["rotating"] is True
    enabled = admin.post(f"/v1/webhooks/{hook['id']}/enable").json()
    assert enabled["enabled"] is True and enabled["disabled_reason"] is None


def test_deliveries_are_listed_with_attempts_and_can_be_redelivered(
    dev: tuple[Services, LiveServer, accounts.Bootstrap],
) -> None:
    """GET /v1/webhook-deliveries and /v1/webhooks/{id}/deliveries show status, attempts and
    the last response status; redeliver sends the event again with the same webhook-id."""
    svc, server, boot = dev
    admin = client(server, boot.admin_key)
    with receiving(lambda n, _r: Reply(status=500 if n == 0 else 200)) as rx:
        hook = admin.post("/v1/webhooks", json={"url": rx.url}).json()
        emit(svc, boot.account["id"], "message.received")
        wait_for(lambda: rx.received)
        pending = wait_for(
            lambda: admin.get("/v1/webhook-deliveries", params={"status": "pending"}).json()[
                "deliveries"
            ]
        )
        first = wait_for(
            lambda: (
                admin.get("/v1/webhook-deliveries").json()["deliveries"][0]
                if admin.get("/v1/webhook-deliveries").json()["deliveries"][0]["attempts"]
                else None
            )
        )
        assert pending[0]["webhook_id"] == hook["id"]
        assert first["response_status"] == 500 and first["attempt_count"] == 1
        assert first["attempts"][0]["status_code"] == 500
        assert first["event"] == "message.received"
        again = admin.post(f"/v1/webhooks/{hook['id']}/deliveries/{first['id']}/redeliver")
        assert again.status_code == 202 and again.json()["redelivery_of"] == first["id"]
        wait_for(lambda: len(rx.received) == 2)
        listed = admin.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["deliveries"]
        # The receiver has the POST before the dispatcher commits "delivered": wait for it.
        delivered = wait_for(
            lambda: admin.get("/v1/webhook-deliveries", params={"status": "delivered"}).json()[
                "deliveries"
            ]
        )
    assert rx.received[0].headers["webhook-id"] == rx.received[1].headers["webhook-id"]
    assert len(listed) == 2 and [d["id"] for d in delivered] == [again.json()["id"]]
    bad = admin.get("/v1/webhook-deliveries", params={"status": "lost"})
    assert bad.status_code == 422


def test_test_endpoint_sends_a_signed_webhook_test_and_reports(
    dev: tuple[Services, LiveServer, accounts.Bootstrap],
) -> None:
    """POST /v1/webhooks/test posts a signed webhook.test now and reports status, latency,
    excerpt and the signature headers; it uses the subscription's secret when the URL has one."""
    _svc, server, boot = dev
    admin = client(server, boot.admin_key)
    with receiving(lambda _n, _r: Reply(body=b"thanks")) as rx:
        report = admin.post("/v1/webhooks/test", json={"endpoint": rx.url}).json()
        assert report["delivered"] is True and report["status_code"] == 200
        assert report["response_excerpt"] == "thanks" and report["latency_ms"] >= 0
        assert set(report["signature_headers"]) >= {"webhook-id", "X-MultiMail-Signature"}
        rx.secrets = [report["secret"]]
        rx._verify(rx.received[0])
        assert rx.received[0].ours_ok and rx.received[0].standard_ok
        assert json.loads(rx.received[0].body)["type"] == "webhook.test"
        hook = admin.post("/v1/webhooks", json={"url": rx.url}).json()
        rx.secrets = [hook["secret"]]
        by_url = admin.post("/v1/webhooks/test", json={"url": rx.url}).json()
        by_id = admin.post("/v1/webhooks/test", json={"webhook_id": hook["id"]}).json()
        assert "secret" not in by_url and by_id["delivered"]
    assert all(r.ours_ok and r.standard_ok and r.hmac_ok for r in rx.received[1:])
    down = Receiver()
    down.server.server_close()  # a port nobody listens on any more
    gone = admin.post("/v1/webhooks/test", json={"endpoint": down.url}).json()
    assert gone["delivered"] is False and gone["error"]


def test_test_endpoint_follows_the_ssrf_rules(api: Api, boot: accounts.Bootstrap) -> None:
    """Without the operator's permission the test send refuses loopback and http targets."""
    admin = api.client(boot.admin_key)
    refused = admin.post("/v1/webhooks/test", json={"endpoint": "https://127.0.0.1:1/"})
    assert refused.status_code == 422 and refused.json()["code"] == "webhook_target_forbidden"
    insecure = admin.post("/v1/webhooks/test", json={"endpoint": "http://h.example.com/"})
    assert insecure.status_code == 422


def test_mailbox_webhook_url_is_listed_protected_and_its_secret_revealed_by_rotation(
    dev: tuple[Services, LiveServer, accounts.Bootstrap],
) -> None:
    """A mailbox's webhook_url appears as a source=mailbox subscription; deleting it directly is
    a 409; rotate-secret reveals a secret that verifies the mailbox's events."""
    svc, server, boot = dev
    admin = client(server, boot.admin_key)
    with receiving() as rx:
        box = admin.post(
            "/v1/mailboxes", json={"address": "in@mm.test", "webhook_url": rx.url}
        ).json()
        hooks = admin.get("/v1/webhooks").json()["webhooks"]
        assert [(h["source"], h["mailbox_id"], h["url"]) for h in hooks] == [
            ("mailbox", box["id"], rx.url)
        ]
        conflict = admin.delete(f"/v1/webhooks/{hooks[0]['id']}")
        assert conflict.status_code == 409
        secret = admin.post(f"/v1/webhooks/{hooks[0]['id']}/rotate-secret").json()["secret"]
        rx.secrets = [secret]
        msg = make_message(
            svc,
            boot.account["id"],
            box,
            direction="inbound",
            status="unread",
            from_address="customer@example.com",
        )
        emit(svc, boot.account["id"], "message.received", msg)
        wait_for(lambda: rx.received)
    got = rx.received[0]
    assert got.ours_ok and got.standard_ok and got.hmac_ok
    assert json.loads(got.body)["sender"] == "customer@example.com"
