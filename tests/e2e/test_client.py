"""``MultimailClient`` / ``AsyncMultimailClient`` against a live server, every method; and the
tool-named endpoints answer the same objects as the REST routes they stand for."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from multimail import (
    AsyncMultimailClient,
    AuthenticationError,
    ConflictError,
    MultimailClient,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
    cli_agent,
)
from multimail.config import Settings
from multimail.tools import catalog
from tests.e2e.agent_world import AGENT_ADDRESS, World, delivered_to, live_world

COVERED: set[str] = set()


class Recording(MultimailClient):
    """Notes which tools ran, so the test can prove every method was exercised."""

    def call_tool(self, name: str, arguments: Any = None) -> Any:
        COVERED.add(name)
        return super().call_tool(name, arguments)


def _inbound_with_attachment(world: World) -> None:
    raw = (
        "From: Bo <bo@example.com>\r\nTo: " + AGENT_ADDRESS + "\r\nSubject: Invoice\r\n"
        "Message-ID: <inv1@example.com>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
        "Content-Type: text/plain\r\n\r\nInvoice attached.\r\n--b1\r\n"
        'Content-Type: text/csv\r\nContent-Disposition: attachment; filename="inv.csv"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(b"a,b\r\n1,2\r\n").decode()
        + "\r\n--b1--\r\n"
    ).encode()
    answer = httpx.post(
        f"{world.base_url}/v1/inbound",
        content=raw,
        params={"mail_from": "bo@example.com", "rcpt_to": AGENT_ADDRESS},
        headers={
            "Authorization": f"Bearer {world.boot.admin_key}",
            "Content-Type": "message/rfc822",
        },
    )
    assert answer.status_code in (200, 201), answer.text


def test_every_client_method_against_a_live_server(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tool method reaches the server and returns its object; errors are typed."""
    COVERED.clear()
    with live_world(settings, monkeypatch) as world:
        url = world.base_url
        agent = Recording(api_key=world.boot.agent_key, base_url=url)
        reviewer = Recording(api_key=world.boot.reviewer_key, base_url=url)
        admin = Recording(api_key=world.boot.admin_key, base_url=url)

        assert agent.list_mailboxes()["mailboxes"][0]["address"] == AGENT_ADDRESS
        assert agent.get_account()["id"] == world.boot.account["id"]
        assert isinstance(agent.get_usage(), dict)

        sent = agent.send_email(
            from_=AGENT_ADDRESS, to="ana@example.com", subject="Hi", body="Hello", metadata={"k": 1}
        )
        assert sent["status"] == "pending_send_approval" and sent["metadata"] == {"k": 1}
        again = agent.send_email(to="ana@example.com", subject="Hi", body="x", idempotency_key="k1")
        assert (
            agent.send_email(to="ana@example.com", subject="Hi", body="x", idempotency_key="k1")[
                "message_id"
            ]
            == again["message_id"]
        )
        later = agent.schedule_email(
            to="cy@example.com",
            subject="Later",
            body="soon",
            send_at=(dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).isoformat(),
        )
        edited = agent.edit_scheduled_email(message_id=later["message_id"], subject="Later!")
        assert edited["subject"] == "Later!"
        assert agent.cancel_message(message_id=later["message_id"], reason="no")["status"] == (
            "cancelled"
        )
        pending = agent.list_pending(mailbox_id=AGENT_ADDRESS)
        assert sent["message_id"] in [m["message_id"] for m in pending["messages"]]
        assert pending["pending_count"] == len(pending["messages"])

        with pytest.raises(PermissionDeniedError):
            agent.decide_email(message_id=sent["message_id"], decision="approve")
        decided = reviewer.decide_email(
            email_id=sent["message_id"], action="approve", revised_body="Hello, edited"
        )
        assert decided["status"] in ("delivered", "queued")
        with pytest.raises(ConflictError):
            reviewer.decide_email(message_id=sent["message_id"], decision="reject", note="late")
        delivered_to(world.relay, "ana@example.com")
        read = agent.read_email(message_id=sent["message_id"])
        assert read["status"] == "delivered" and read["delivered_at"]
        assert "dkim_verified" in read

        _inbound_with_attachment(world)
        inbox = agent.check_inbox(filter="unread")["emails"]
        invoice = next(m for m in inbox if m["subject"] == "Invoice")
        waited = agent.wait_for_email(timeout=0.2)
        assert isinstance(waited, dict)
        file = agent.download_attachment(message_id=invoice["id"], filename="inv.csv")
        assert base64.b64decode(file["content_base64"]) == b"a,b\r\n1,2\r\n"
        tagged = agent.tag_email(message_id=invoice["id"], tags=["billing"])
        assert "billing" in str(tagged)
        reply = agent.reply_email(message_id=invoice["id"], body="Thanks, paid.")
        thread = agent.get_thread(thread_id=reply["thread_id"])
        assert thread["message_count"] == 2
        assert agent.report_spam(message_id=invoice["id"])["status"] == "spam"
        assert invoice["id"] in [m["id"] for m in agent.list_spam()["emails"]]
        assert agent.not_spam(message_id=invoice["id"])["status"] != "spam"

        contact = agent.add_contact(email="dee@example.com", name="Dee")
        assert agent.search_contacts(q="dee")["contacts"][0]["email"] == "dee@example.com"
        agent.delete_contact(contact_id=contact["id"])
        assert agent.check_suppression(address="dee@example.com")["suppressed"] is False
        with pytest.raises(NotFoundError):
            admin.remove_suppression(address="dee@example.com")
        assert agent.get_audit_log(subject_id=sent["message_id"])["entries"]
        assert agent.search_identity(address=AGENT_ADDRESS)
        verdict = agent.verify_message(raw="From: a@b\r\nSubject: x\r\n\r\nhi\r\n")
        assert verdict["verdict"] == "failed"

        assert admin.list_api_keys()["api_keys"]
        # The operator's own admin key acts directly (no approval code).
        key = admin.create_api_key(name="ci", scopes=["read"])
        assert admin.revoke_api_key(key_id=key["id"])["revoked"] is True
        with pytest.raises(NotFoundError):
            admin.revoke_api_key(key_id="key_nope")
        hook = admin.create_webhook(url="https://hooks.example.com/x", events=["message.received"])
        listed = admin.list_webhooks()["webhooks"]
        assert hook["id"] in [h["id"] for h in listed]
        admin.delete_webhook(webhook_id=hook["id"])
        with pytest.raises(NotFoundError):
            admin.delete_webhook(webhook_id="whk_nope")

        box = admin.create_mailbox(address_local_part="sales", display_name="Sales")
        box_ref = box["mailbox_id"]
        assert box["address"] == "sales@mm.test"
        admin.configure_mailbox(mailbox_id=box_ref, oversight_mode="gated_all")
        assert admin.update_mailbox(mailbox_id=box_ref, display_name="S")["display_name"] == "S"
        upgrade = admin.request_upgrade(mailbox_id=box_ref, target_mode="monitored")
        assert upgrade["status"] == "approval_required"
        with pytest.raises((PermissionDeniedError, ValidationError)):
            admin.apply_upgrade(mailbox_id=box_ref, code="00000000")
        admin.delete_mailbox(mailbox_id=box_ref)
        for name in ("configure_mailbox", "update_mailbox", "delete_mailbox"):
            with pytest.raises(NotFoundError):
                admin.call_tool(name, {"mailbox_id": "nobody@mm.test"})
        account = admin.update_account(name="Acme Ltd")
        assert account["name"] == "Acme Ltd"

        with pytest.raises(AuthenticationError):
            MultimailClient(api_key="mm_live_" + "x" * 43, base_url=url).list_mailboxes()
        with pytest.raises(ValidationError):
            agent.send_email(to="ana@example.com", body="one", text="two")
    assert set(catalog.BY_NAME) == COVERED, set(catalog.BY_NAME) - COVERED


async def test_async_client_and_environment_defaults(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async client reads MULTIMAIL_API_URL/KEY from the environment, like the guides."""
    with live_world(settings, monkeypatch) as world:
        monkeypatch.setenv("MULTIMAIL_API_URL", world.base_url + "/v1")
        monkeypatch.setenv("MULTIMAIL_API_KEY", world.boot.agent_key)
        async with AsyncMultimailClient() as client:
            sent = await client.send_email(to="ana@example.com", subject="A", text="async")
            pending = await client.list_pending()
            assert sent["message_id"] in [m["id"] for m in pending["messages"]]
            with pytest.raises(NotFoundError):
                await client.read_email(message_id="msg_missing")


def _strip_volatile(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _strip_volatile(v) for k, v in data.items() if k not in ("read_at",)}
    if isinstance(data, list):
        return [_strip_volatile(v) for v in data]
    return data


def test_tool_named_endpoints_answer_what_rest_answers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST/GET /{tool} returns the REST object plus the short fields, with the REST status."""
    with live_world(settings, monkeypatch) as world:
        http = httpx.Client(
            base_url=world.base_url, headers={"Authorization": f"Bearer {world.boot.agent_key}"}
        )
        sent = http.post(
            "/v1/mailboxes/" + AGENT_ADDRESS + "/send",
            json={"to": ["ana@example.com"], "subject": "S", "markdown": "B"},
        )
        assert sent.status_code == 202
        via_tool = http.post(
            "/send_email", json={"from": AGENT_ADDRESS, "to": "ana@example.com", "body": "B"}
        )
        assert via_tool.status_code == 202 and via_tool.json()["message_id"]

        rest_list = http.get(f"/v1/mailboxes/{AGENT_ADDRESS}/emails").json()
        for method in ("GET", "POST"):
            kwargs: dict[str, Any] = (
                {"params": {"mailbox_id": AGENT_ADDRESS}}
                if method == "GET"
                else {"json": {"mailbox_id": AGENT_ADDRESS}}
            )
            tool_list = http.request(method, "/check_inbox", **kwargs).json()
            assert tool_list["emails"] == rest_list["emails"]
        rest_boxes = http.get("/v1/mailboxes").json()
        assert http.get("/list_mailboxes").json() == rest_boxes
        assert http.post("/list_mailboxes", json={}).json() == rest_boxes
        rest_thread = http.get(
            f"/v1/mailboxes/{AGENT_ADDRESS}/threads/{sent.json()['thread_id']}"
        ).json()
        tool_thread = http.get("/get_thread", params={"thread_id": sent.json()["thread_id"]})
        assert _strip_volatile(tool_thread.json()) == _strip_volatile(rest_thread)

        bad = http.post("/send_email", json={"to": "a@b.test", "gated": False})
        assert bad.status_code == 422 and set(bad.json()) >= {"error", "code"}
        anon = httpx.post(f"{world.base_url}/list_webhooks", json={})
        assert anon.status_code == 401 and anon.json()["code"]
        http.close()


def test_cli_review_loop_edits_in_the_editor_and_approves(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`review` shows the pending draft; [e]dit opens $EDITOR and the edit is what is sent."""
    with live_world(settings, monkeypatch) as world:
        monkeypatch.setenv("MULTIMAIL_API_URL", world.base_url)
        agent = MultimailClient(api_key=world.boot.agent_key)
        agent.send_email(to="ana@example.com", subject="Draft", body="first draft")
        editor = tmp_path / "editor.sh"
        editor.write_text('#!/bin/sh\necho "Edited by the reviewer" > "$1"\n')
        editor.chmod(0o755)
        monkeypatch.setenv("EDITOR", str(editor))
        monkeypatch.setenv("MULTIMAIL_API_KEY", world.boot.reviewer_key)
        app = typer.Typer()
        cli_agent.register(app)
        shown = CliRunner().invoke(app, ["review", "--reviewer", "ops"], input="e\n")
        assert shown.exit_code == 0, shown.output
        assert "first draft" in shown.output and "delivered" in shown.output
        assert b"Edited by the reviewer" in delivered_to(world.relay, "ana@example.com").data
        monkeypatch.setenv("MULTIMAIL_API_KEY", world.boot.agent_key)
        listed = CliRunner().invoke(app, ["inbox", "--json"])
        assert json.loads(listed.output)["emails"][0]["status"] == "delivered"
