"""The seed guides' Flask webhook handlers, copied with only URLs and secrets changed, run under a
real werkzeug server and receive real events from the dispatcher (Salesforce guide 000, auto-reply
guide 002)."""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask, jsonify, request
from sqlalchemy import insert, select
from werkzeug.serving import BaseWSGIServer, make_server

from multimail import MultimailClient
from multimail.config import Settings
from multimail.ids import new_id, utcnow
from multimail.runtime import build_services
from multimail.services import accounts, messages, webhooks
from multimail.services.context import Services
from multimail.store.tables import message_tags, threads
from multimail.store.tables import messages as messages_table
from multimail.store.tables import webhooks as webhooks_table
from multimail.testing.server import LiveServer
from multimail.workers.webhooks import run_dispatcher
from tests.integration.webhook_helpers import emit, make_mailbox, make_message, operator


class Served:
    """A WSGI app on a free loopback port in a thread, stopped at the end of the test."""

    def __init__(self, app: Flask) -> None:
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dev(settings: Settings) -> Iterator[tuple[Services, LiveServer, accounts.Bootstrap]]:
    svc = build_services(
        settings.model_copy(update={"allow_private_webhooks": True, "allow_http_webhooks": True})
    )
    boot = accounts.bootstrap(svc.db, account_name="Acme", operator_email="ops@mm.test")

    async def dispatcher(services: Services, stop: Any) -> None:
        await run_dispatcher(services, stop, poll_interval=0.05)

    with LiveServer(svc, components=[dispatcher]) as server:
        yield svc, server, boot
    svc.db.dispose()


def wait_for(check: Any, within: float = 10.0) -> Any:
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def salesforce_app(sf_instance_url: str) -> Flask:
    """Guide 000's handler, verbatim but for SF_INSTANCE_URL."""
    app = Flask(__name__)
    SF_INSTANCE_URL = sf_instance_url
    SF_ACCESS_TOKEN = "your_sf_access_token"

    @app.route("/webhooks/multimail", methods=["POST"])
    def multimail_webhook() -> Any:
        event = request.json
        event_type = event.get("type")
        message = event.get("message", {})
        metadata = message.get("metadata", {})
        case_id = metadata.get("salesforce_case_id")
        if not case_id:
            return jsonify({"ok": True})
        if event_type == "message.approved":
            status_note = "Escalation email approved and sent by MultiMail agent."
        elif event_type == "message.rejected":
            status_note = "Escalation email rejected in MultiMail approval queue."
        else:
            return jsonify({"ok": True})
        sf_response = requests.patch(
            f"{SF_INSTANCE_URL}/services/data/v58.0/sobjects/Case/{case_id}",
            headers={
                "Authorization": f"Bearer {SF_ACCESS_TOKEN}",
                "Content-Type": "application/json",
            },
            json={"Description": status_note},
            timeout=10,
        )
        sf_response.raise_for_status()
        return jsonify({"ok": True})

    return app


def test_salesforce_guide_handler_updates_the_case_from_metadata(
    dev: tuple[Services, LiveServer, accounts.Bootstrap],
) -> None:
    """Subscribed to message.approved / message.rejected / email.received as the guide says, the
    handler reads type and message.metadata.salesforce_case_id and patches the right Case."""
    svc, _server, boot = dev
    acct = operator(boot.account["id"])
    patches: list[tuple[str, Any]] = []
    salesforce = Flask("salesforce")

    @salesforce.route("/services/data/v58.0/sobjects/Case/<case_id>", methods=["PATCH"])
    def patch_case(case_id: str) -> Any:
        patches.append((case_id, request.json))
        return "", 204

    box = make_mailbox(svc, acct, "escalations@mm.test")
    approved = make_message(
        svc, acct.account_id or "", box, metadata={"salesforce_case_id": "500A1", "source": "apex"}
    )
    rejected = make_message(
        svc, acct.account_id or "", box, metadata={"salesforce_case_id": "500B2"}
    )
    unrelated = make_message(svc, acct.account_id or "", box)
    with Served(salesforce) as sf, Served(salesforce_app(sf.url)) as handler:
        with svc.db.write() as conn:
            webhooks.create_webhook(
                conn,
                svc,
                acct,
                handler.url + "/webhooks/multimail",
                ["message.approved", "message.rejected", "email.received"],
                None,
                None,
            )
        emit(svc, acct.account_id or "", "oversight.approved", approved)
        emit(svc, acct.account_id or "", "oversight.rejected", rejected)
        emit(svc, acct.account_id or "", "oversight.approved", unrelated)
        wait_for(lambda: len(patches) == 2)
    assert sorted(patches) == [
        ("500A1", {"Description": "Escalation email approved and sent by MultiMail agent."}),
        ("500B2", {"Description": "Escalation email rejected in MultiMail approval queue."}),
    ]


def autoreply_app(client: MultimailClient, secret: bytes, seen: list[dict[str, Any]]) -> Flask:
    """Guide 002's two handlers, verbatim but for the client's URL/key and the secret; the
    guide's LLM call is replaced by a function reading the same fields."""
    app = Flask(__name__)
    WEBHOOK_SECRET = secret

    def draft_reply(thread: dict[str, Any], incoming: dict[str, Any]) -> str:
        history = [m["body_text"] for m in thread["messages"]]
        seen.append({"history": history, "incoming": incoming["body_text"]})
        return f"Thanks for writing about: {incoming['body_text'][:40]}"

    @app.route("/webhooks/inbound", methods=["POST"])
    def handle_inbound() -> Any:
        sig = request.headers.get("X-MultiMail-Signature", "")
        expected = hmac.new(WEBHOOK_SECRET, request.data, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sig, expected):
            return jsonify({"error": "invalid signature"}), 401
        payload = request.json
        message_id = payload["message_id"]
        thread_id = payload["thread_id"]
        thread = client.get_thread(thread_id=thread_id)
        draft = draft_reply(thread=thread, incoming=payload)
        client.reply_email(message_id=message_id, body=draft, oversight_mode="gated_send")
        return jsonify({"status": "queued"}), 200

    @app.route("/webhooks/delivery", methods=["POST"])
    def handle_delivery() -> Any:
        payload = request.json
        if payload.get("event") == "message.delivered":
            client.tag_email(
                message_id=payload["original_message_id"], tags=["auto-replied", "resolved"]
            )
        return jsonify({"ok": True}), 200

    return app


def _inbound(svc: Services, account_id: str, box: dict[str, Any]) -> dict[str, Any]:
    now = utcnow()
    thread_id = new_id("thr")
    with svc.db.write() as conn:
        conn.execute(
            insert(threads).values(
                id=thread_id,
                account_id=account_id,
                mailbox_id=box["id"],
                subject="Cancel plan",
                normalized_subject="cancel plan",
                message_count=1,
                created_at=now,
                last_activity_at=now,
            )
        )
    return make_message(
        svc,
        account_id,
        box,
        direction="inbound",
        status="unread",
        thread_id=thread_id,
        from_address="alex@example.com",
        to=[box["address"]],
        subject="Cancel plan",
        markdown="How do I cancel my subscription?",
        message_id_header="<q1@example.com>",
    )


def test_autoreply_guide_handlers_verify_reply_and_tag(
    dev: tuple[Services, LiveServer, accounts.Bootstrap],
) -> None:
    """The inbound handler verifies X-MultiMail-Signature with the pasted secret's bytes, reads
    message_id, thread_id and body_text, and queues a gated reply through the real client; the
    delivery handler tags original_message_id. A wrong secret gets 401 and does nothing."""
    svc, server, boot = dev
    acct = operator(boot.account["id"])
    box = make_mailbox(svc, acct, "support@mm.test")
    seen: list[dict[str, Any]] = []
    with MultimailClient(api_key=boot.agent_key, base_url=server.base_url) as client:
        with svc.db.write() as conn:
            hook = webhooks.create_webhook(
                conn, svc, acct, "http://placeholder.invalid/", ["email.received"], box["id"], None
            )
        app = autoreply_app(client, hook["secret"].encode(), seen)
        with Served(app) as handler:
            with svc.db.write() as conn:
                conn.execute(
                    webhooks_table.update()
                    .where(webhooks_table.c.id == hook["id"])
                    .values(url=handler.url + "/webhooks/inbound")
                )
                delivery = webhooks.create_webhook(
                    conn,
                    svc,
                    acct,
                    handler.url + "/webhooks/delivery",
                    ["message.delivered"],
                    None,
                    None,
                )
            incoming = _inbound(svc, acct.account_id or "", box)
            emit(svc, acct.account_id or "", "message.received", incoming)
            reply = wait_for(lambda: _reply_to(svc, incoming["id"]))
            assert seen[0]["incoming"] == "How do I cancel my subscription?"
            assert seen[0]["history"] == ["How do I cancel my subscription?"]
            assert reply["status"] == "pending_send_approval"
            assert reply["markdown"].startswith("Thanks for writing about: How do I cancel")
            emit(svc, acct.account_id or "", "message.delivered", reply)
            tags = wait_for(lambda: _tags(svc, incoming["id"]))
            forged = requests.post(
                handler.url + "/webhooks/inbound",
                json={"message_id": "x"},
                headers={"X-MultiMail-Signature": "0" * 64},
                timeout=10,
            )
    assert set(tags) >= {"auto-replied", "resolved"}
    assert forged.status_code == 401
    assert delivery["events"] == ["message.delivered"]


def _reply_to(svc: Services, message_id: str) -> dict[str, Any] | None:
    with svc.db.read() as conn:
        row = (
            conn.execute(
                select(messages_table).where(messages_table.c.reply_to_email_id == message_id)
            )
            .mappings()
            .first()
        )
        return messages.full_view(conn, dict(row)) if row else None


def _tags(svc: Services, message_id: str) -> list[str]:
    with svc.db.read() as conn:
        rows = conn.execute(
            select(message_tags.c.key).where(message_tags.c.message_id == message_id)
        )
        return [r.key for r in rows]
