"""Review S8: events and webhooks (SPEC §6), defects pinned over a live server.

Each test began as a reviewer's strict xfail naming a defect (session 8), fixed the same
session.
"""

from __future__ import annotations

import base64
import json
import time

from multimail.services import accounts
from multimail.services.context import Services
from multimail.testing.server import LiveServer
from tests.conftest import Api
from tests.integration.send_support import customer_mail
from tests.integration.test_webhook_dispatch import move_due
from tests.integration.test_webhooks import client, dev, wait_for
from tests.integration.webhook_helpers import Reply, emit, make_message, receiving

Dev = tuple[Services, LiveServer, accounts.Bootstrap]

__all__ = ["dev"]  # a fixture, re-exported so pytest finds it here


def test_mailbox_webhook_url_follows_the_same_target_rules_as_post_webhooks(
    api: Api, boot: accounts.Bootstrap
) -> None:
    """SPEC §6: endpoints must be https unless the operator allows http, and private/loopback
    targets are refused unless allowed; docs/webhooks.md: refused "when the webhook is saved".
    A mailbox's webhook_url is a subscription to all its events, so setting it must refuse
    what POST /v1/webhooks refuses (and never store a URL carrying a password, which
    GET /v1/webhooks and the audit log would then show)."""
    admin = api.client(boot.admin_key)
    box = admin.post("/v1/mailboxes", json={"address": "hooked@mm.test"})
    assert box.status_code == 201, box.text
    bad_urls = [
        "http://hooks.example.com/multimail",  # http without MULTIMAIL_ALLOW_HTTP_WEBHOOKS
        "https://127.0.0.1/hook",  # loopback literal
        "https://[::ffff:127.0.0.1]/hook",  # loopback wrapped in IPv6
        "https://169.254.169.254/latest/meta-data/",  # cloud metadata
        "https://user:hunter2@hooks.example.com/hook",  # credentials in the URL
    ]
    for url in bad_urls:  # the same URLs are refused by POST /v1/webhooks
        assert admin.post("/v1/webhooks", json={"url": url}).status_code == 422, url
    accepted = {}
    for url in bad_urls:
        got = admin.patch(f"/v1/mailboxes/{box.json()['id']}", json={"webhook_url": url})
        if got.status_code != 422:
            accepted[url] = got.status_code
    created = admin.post(
        "/v1/mailboxes", json={"address": "born@mm.test", "webhook_url": "https://127.0.0.1/h"}
    )
    if created.status_code != 422:
        accepted["POST /v1/mailboxes https://127.0.0.1/h"] = created.status_code
    listed = [h["url"] for h in admin.get("/v1/webhooks").json()["webhooks"]]
    assert not accepted, (
        f"mailbox webhook_url accepted targets that POST /v1/webhooks refuses: {accepted}; "
        f"now subscribed: {listed}"
    )


def test_clearing_a_mailbox_webhook_url_stops_its_pending_deliveries(dev: Dev) -> None:
    """docs/webhooks.md: "clearing it disables the subscription". An operator who clears a
    mailbox's webhook_url (say the endpoint was decommissioned or compromised) expects no
    further POSTs to it: the retries already queued must stop, and GET /v1/webhooks must show
    the subscription disabled."""
    svc, server, boot = dev
    admin = client(server, boot.admin_key)
    with receiving(lambda _n, _r: Reply(status=503)) as rx:
        box = admin.post("/v1/mailboxes", json={"address": "in@mm.test", "webhook_url": rx.url})
        assert box.status_code == 201, box.text
        msg = make_message(
            svc,
            boot.account["id"],
            box.json(),
            direction="inbound",
            status="unread",
            from_address="customer@example.com",
        )
        emit(svc, boot.account["id"], "message.received", msg)
        wait_for(lambda: len(rx.received) == 1)  # first attempt failed: a retry is queued
        wait_for(  # the failed attempt is recorded: a retry is queued
            lambda: [
                d
                for d in admin.get("/v1/webhook-deliveries").json()["deliveries"]
                if d["attempts"] and d["status"] == "pending"
            ]
        )
        cleared = admin.patch(f"/v1/mailboxes/{box.json()['id']}", json={"webhook_url": None})
        assert cleared.status_code == 200, cleared.text
        move_due(svc)
        time.sleep(1.5)
        posts_after_clearing = len(rx.received) - 1
        hooks = admin.get("/v1/webhooks").json()["webhooks"]
    still_enabled = [h["url"] for h in hooks if h["enabled"]]
    assert posts_after_clearing == 0 and not still_enabled, (
        f"after webhook_url was cleared the old endpoint got {posts_after_clearing} more "
        f"POST(s) and these subscriptions are still enabled: {still_enabled}"
    )


def test_inbound_held_for_release_announces_oversight_pending(dev: Dev) -> None:
    """SPEC §2: gated_all holds inbound mail until a reviewer releases it; SPEC §6 names
    oversight.pending (alias email.pending_approval, which the Zendesk guide registers "to
    power your approval flow"). A held message waits for a reviewer exactly as a held send
    does, so the webhook-driven approval flow must be told about it; releasing it later fires
    oversight.approved then message.received."""
    _svc, server, boot = dev
    admin = client(server, boot.admin_key)
    with receiving() as rx:
        hook = admin.post(
            "/v1/webhooks", json={"url": rx.url, "events": ["email.pending_approval"]}
        )
        assert hook.status_code == 201, hook.text
        box = admin.post(
            "/v1/mailboxes", json={"address": "held@mm.test", "oversight_mode": "gated_all"}
        )
        assert box.status_code == 201 and box.json()["oversight_mode"] == "gated_all", box.text
        raw = customer_mail("held@mm.test")
        handed = admin.post(
            "/v1/inbound",
            json={"raw_base64": base64.b64encode(raw).decode(), "rcpt_to": ["held@mm.test"]},
        )
        assert handed.status_code == 201, handed.text
        held_id = handed.json()["message_ids"][0]
        pending = client(server, boot.reviewer_key).get("/v1/oversight/pending").json()
        assert held_id in [p["id"] for p in pending["pending"]], pending  # it is held for review
        time.sleep(1.5)
    announced = [json.loads(r.body) for r in rx.received]
    assert [(b["type"], b["message_id"]) for b in announced] == [
        ("email.pending_approval", held_id)
    ], f"a held inbound message reached the reviewer queue but subscribers got: {announced}"
