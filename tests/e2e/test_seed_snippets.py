"""The integration guides' code (../shared/seeds/) run against a live local server.

Each snippet is copied as written, changing only the base URL, the key, and the example
addresses (to the test server's domain). The Apex and JavaScript ones are translated to the
same HTTP requests in Python. What each snippet prints or returns is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import requests

from multimail import MultimailClient
from multimail.config import Settings
from tests.e2e.agent_world import AGENT_ADDRESS, World, delivered_to, live_world


@pytest.fixture
def world(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with live_world(settings, monkeypatch) as w:
        monkeypatch.setenv("MULTIMAIL_API_URL", w.base_url)
        yield w


def test_salesforce_apex_escalation(world: World) -> None:
    """Apex CaseEscalationEmailer: POST /v1/send with from/to/text/metadata answers 202."""
    payload = {
        "from": AGENT_ADDRESS,
        "to": "customer@example.com",
        "subject": "Your case was escalated",
        "text": "A specialist is on it.",
        "oversight_mode": "gated_send",
        "metadata": {"salesforce_case_id": "500xx01", "source": "apex_escalation_trigger"},
    }
    res = httpx.post(
        f"{world.base_url}/v1/send",
        headers={"Authorization": "Bearer " + world.boot.agent_key},
        json=payload,
    )
    assert res.status_code == 202, res.text
    assert res.json()["metadata"]["salesforce_case_id"] == "500xx01"


def test_salesforce_python_agent_send_list_and_cancel(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """Closed-won agent: /v1/send → id, /v1/pending → messages, /v1/cancel/{id} → 200/409."""
    MULTIMAIL_API_KEY = world.boot.agent_key
    BASE_URL = f"{world.base_url}/v1"
    HEADERS = {"Authorization": f"Bearer {MULTIMAIL_API_KEY}", "Content-Type": "application/json"}

    def handle_opportunity_closed_won(opportunity: dict[str, Any]) -> Any:
        contact_email = opportunity["contact_email"]
        account_name = opportunity["account_name"]
        rep_name = opportunity["owner_name"]
        body = (
            f"Hi {account_name} team,\n\n"
            f"Your contract has been processed. {rep_name} will follow up within one business day "
            f"with onboarding details.\n\nThanks,\nAcme Sales Operations"
        )
        response = requests.post(
            f"{BASE_URL}/send",
            headers=HEADERS,
            json={
                "from": AGENT_ADDRESS,
                "to": contact_email,
                "subject": f"Welcome aboard, {account_name}",
                "text": body,
                "oversight_mode": "gated_send",
                "metadata": {"opportunity_id": opportunity["id"], "source": "crm_closed_won_agent"},
            },
        )
        response.raise_for_status()
        message_id = response.json()["id"]
        print(f"Queued for approval: {message_id}")
        return message_id

    def list_pending_approvals() -> Any:
        response = requests.get(f"{BASE_URL}/pending", headers=HEADERS)
        response.raise_for_status()
        return response.json()["messages"]

    def cancel_pending_email(message_id: str, reason: str) -> bool | None:
        response = requests.post(
            f"{BASE_URL}/cancel/{message_id}",
            headers={**HEADERS, "Content-Type": "application/json"},
            json={"reason": reason},
        )
        if response.status_code == 200:
            print(f"Cancelled {message_id}: {reason}")
            return True
        elif response.status_code == 409:  # noqa: RET505 - kept as the guide writes it
            print(f"Message {message_id} already delivered, cannot cancel")
            return False
        response.raise_for_status()
        return None

    opportunity = {
        "id": "006xx1",
        "contact_email": "cfo@example.com",
        "account_name": "Globex",
        "owner_name": "Rita",
    }
    message_id = handle_opportunity_closed_won(opportunity)
    assert f"Queued for approval: {message_id}" in capsys.readouterr().out
    pending = list_pending_approvals()
    assert [m["id"] for m in pending] == [message_id]
    assert pending[0]["metadata"]["opportunity_id"] == "006xx1"
    assert cancel_pending_email(message_id, "account on hold") is True
    assert f"Cancelled {message_id}: account on hold" in capsys.readouterr().out

    delivered = handle_opportunity_closed_won({**opportunity, "id": "006xx2"})
    reviewer = MultimailClient(api_key=world.boot.reviewer_key)
    reviewer.decide_email(message_id=delivered, decision="approve")
    delivered_to(world.relay, "cfo@example.com")
    assert cancel_pending_email(delivered, "too late") is False
    assert "already delivered, cannot cancel" in capsys.readouterr().out


def test_intercom_followup_review_and_mailbox(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """Intercom guide: /send_email, /list_pending, /decide_email prints delivered,
    /create_mailbox prints address and mailbox_id, and the curl/jq reads."""
    BASE_URL = world.base_url

    def send_agent_followup(
        conversation_id: str, customer_email: str, draft_body: str, key: str
    ) -> Any:
        payload = {
            "from": AGENT_ADDRESS,
            "to": customer_email,
            "subject": "Following up on your support request",
            "body": draft_body,
            "oversight_mode": "gated_send",
            "metadata": {"source": "intercom", "conversation_id": conversation_id, "agent": "fin"},
        }
        response = httpx.post(
            f"{BASE_URL}/send_email", json=payload, headers={"Authorization": f"Bearer {key}"}
        )
        response.raise_for_status()
        result = response.json()
        return result

    def get_pending_messages(key: str) -> Any:
        response = httpx.get(f"{BASE_URL}/list_pending", headers={"Authorization": f"Bearer {key}"})
        response.raise_for_status()
        return response.json()["messages"]

    def review_message(
        message_id: str,
        decision: Literal["approve", "reject"],
        reviewer: str,
        key: str,
        note: str = "",
    ) -> Any:
        response = httpx.post(
            f"{BASE_URL}/decide_email",
            json={
                "message_id": message_id,
                "decision": decision,
                "reviewer": reviewer,
                "note": note,
            },
            headers={"Authorization": f"Bearer {key}"},
        )
        response.raise_for_status()
        return response.json()

    result = send_agent_followup(
        "conv_1", "pat@example.com", "Glad we fixed it.", world.boot.agent_key
    )
    assert result["message_id"] and result["status"] == "pending_send_approval"

    pending = get_pending_messages(world.boot.reviewer_key)
    if pending:
        result = review_message(
            message_id=pending[0]["message_id"],
            decision="approve",
            reviewer="lead@mm.test",
            key=world.boot.reviewer_key,
        )
        print(result["status"])  # "delivered"
    assert capsys.readouterr().out.strip() == "delivered"
    delivered_to(world.relay, "pat@example.com")

    # JavaScript handler, same request: result.message_id is logged.
    js = send_agent_followup("conv_2", "lee@example.com", "Resolved.", world.boot.agent_key)
    assert js["message_id"].startswith("msg_")

    # curl … /list_pending | jq .pending_count  and  jq '.messages[] | {id: .message_id, …}'
    listed = httpx.get(
        f"{BASE_URL}/list_pending", headers={"Authorization": f"Bearer {world.boot.agent_key}"}
    ).json()
    assert listed["pending_count"] == 1
    assert [{"id": m["message_id"], "to": m["to"]} for m in listed["messages"]] == [
        {"id": js["message_id"], "to": ["lee@example.com"]}
    ]

    # curl -G --data-urlencode message_id=… /read_email | jq '{status, delivered_at, …}'
    read = httpx.get(
        f"{BASE_URL}/read_email",
        params={"message_id": result["id"]},
        headers={"Authorization": f"Bearer {world.boot.agent_key}"},
    ).json()
    view = {
        "status": read["status"],
        "delivered_at": read["delivered_at"],
        "approved_by": read["decision"]["reviewer"],
        "dkim": read["dkim_verified"],
    }
    assert view["status"] == "delivered" and view["delivered_at"]
    assert view["approved_by"] == "lead@mm.test" and view["dkim"] in (True, False)

    def provision_bot_mailbox(alias: str, display_name: str) -> Any:
        response = httpx.post(
            f"{BASE_URL}/create_mailbox",
            json={
                "address": f"{alias}@mm.test",
                "display_name": display_name,
                "oversight_mode": "gated_send",
            },
            headers={"Authorization": f"Bearer {world.boot.admin_key}"},
        )
        response.raise_for_status()
        return response.json()

    mailbox = provision_bot_mailbox(alias="intercom-bot", display_name="Support Bot")
    # The operator's own admin key (printed on first start) creates mailboxes directly.
    print(mailbox["address"])
    print(mailbox["mailbox_id"])
    out = capsys.readouterr().out.split()
    assert out[0] == "intercom-bot@mm.test" and out[1].startswith("mbx_")


def test_auto_reply_agent_with_the_python_client(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Auto-reply guide: get_thread → reply_email (gated) → review loop via input() →
    tag_email on delivery; MultimailClient(api_key=...) with no base_url (env)."""
    raw = (
        "From: Alex <alex@example.com>\r\nTo: " + AGENT_ADDRESS + "\r\nSubject: Cancel?\r\n"
        "Message-ID: <a1@example.com>\r\n\r\nHow do I cancel my subscription?\r\n"
    ).encode()
    httpx.post(
        f"{world.base_url}/v1/inbound",
        content=raw,
        params={"mail_from": "alex@example.com", "rcpt_to": AGENT_ADDRESS},
        headers={
            "Authorization": f"Bearer {world.boot.admin_key}",
            "Content-Type": "message/rfc822",
        },
    ).raise_for_status()

    client = MultimailClient(api_key=world.boot.agent_key)
    incoming = client.check_inbox(mailbox_id=AGENT_ADDRESS, filter="unread")["emails"][0]
    payload = {
        "message_id": incoming["message_id"],
        "thread_id": incoming["thread_id"],
        "body_text": incoming["body_text"],
    }

    def draft_reply(thread: dict[str, Any], incoming: dict[str, Any]) -> str:
        history = []
        for msg in thread["messages"]:
            role = "assistant" if msg["direction"] == "outbound" else "user"
            history.append({"role": role, "content": msg["body_text"]})
        assert history[-1]["content"].strip() == incoming["body_text"].strip()
        return "You can cancel from Settings > Billing > Cancel Plan."

    thread = client.get_thread(thread_id=payload["thread_id"])
    draft = draft_reply(thread=thread, incoming=payload)
    queued = client.reply_email(
        message_id=payload["message_id"], body=draft, oversight_mode="gated_send"
    )
    assert queued["status"] == "pending_send_approval"

    review_client = MultimailClient(api_key=world.boot.reviewer_key)

    def process_review_queue(mailbox_id: str) -> None:
        pending = review_client.list_pending(mailbox_id=mailbox_id)
        for item in pending["messages"]:
            print(f"From: {item['from']}")
            print(f"Subject: {item['subject']}")
            print(f"Draft reply:\n{item['draft_body']}\n")
            action = input("[a]pprove / [e]dit / [r]eject: ").strip().lower()
            if action == "a":
                review_client.decide_email(message_id=item["message_id"], decision="approve")
            elif action == "e":
                revised = input("Enter revised reply: ")
                review_client.decide_email(
                    message_id=item["message_id"], decision="approve", revised_body=revised
                )
            elif action == "r":
                note = input("Rejection note for agent: ")
                review_client.decide_email(
                    message_id=item["message_id"], decision="reject", rejection_note=note
                )

    answers = iter(["e", "You can cancel under Settings > Billing. Thanks, Alex!"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(answers))
    process_review_queue(mailbox_id=AGENT_ADDRESS)
    shown = capsys.readouterr().out
    assert f"From: {AGENT_ADDRESS}" in shown and "Subject: Re: Cancel?" in shown
    assert "Settings > Billing > Cancel Plan" in shown
    sent = delivered_to(world.relay, "alex@example.com")
    assert b"Thanks, Alex!" in sent.data

    # The delivery webhook handler: tag the original message resolved.
    delivery_payload = {"event": "message.delivered", "original_message_id": payload["message_id"]}
    if delivery_payload.get("event") == "message.delivered":
        client.tag_email(
            message_id=delivery_payload["original_message_id"], tags=["auto-replied", "resolved"]
        )
    tags = client.read_email(message_id=payload["message_id"])["tags"]
    assert {"auto-replied", "resolved"} <= set(tags)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    "script",
    [
        "salesforce_escalation.py",
        "make_scenario.py",
        "auto_reply_agent.py",
        "intercom_followup.py",
        "zendesk_reply.py",
    ],
)
def test_examples_run_against_a_local_server(world: World, script: str) -> None:
    """Each examples/ script reproduces its guide's flow with only env settings."""
    raw = (
        "From: Alex <alex@example.com>\r\nTo: " + AGENT_ADDRESS + "\r\nSubject: Hello\r\n"
        "Message-ID: <ex1@example.com>\r\n\r\nA question.\r\n"
    ).encode()
    httpx.post(
        f"{world.base_url}/v1/inbound",
        content=raw,
        params={"mail_from": "alex@example.com", "rcpt_to": AGENT_ADDRESS},
        headers={
            "Authorization": f"Bearer {world.boot.admin_key}",
            "Content-Type": "message/rfc822",
        },
    ).raise_for_status()
    env = {
        **os.environ,
        "MULTIMAIL_API_URL": world.base_url,
        "MULTIMAIL_API_KEY": world.boot.agent_key,
        "MULTIMAIL_REVIEWER_KEY": ""
        if script == "auto_reply_agent.py"
        else world.boot.reviewer_key,
        "MULTIMAIL_FROM": AGENT_ADDRESS,
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = {
        "salesforce_escalation.py": "cancelled",
        "make_scenario.py": "decision:",
        "auto_reply_agent.py": "queued reply",
        "intercom_followup.py": "approved_by:",
        "zendesk_reply.py": "in thread zd-4711",
    }[script]
    assert expected in done.stdout, done.stdout
