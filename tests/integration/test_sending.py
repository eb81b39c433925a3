"""The send path over the real API: checks and their codes, the gate, idempotency, replies,
scheduling, cancel and schedule edits — on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import threading
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, update

from multimail.errors import InvalidInput
from multimail.ids import aware, isoformat, new_id, utcnow
from multimail.services import accounts, domains, keys, mailboxes, sending
from multimail.services import messages as message_views
from multimail.services.context import Actor, Services
from multimail.store.tables import (
    audit_entries,
    events,
    idempotency_keys,
    jobs,
    mailbox_allowlist,
    messages,
    suppressions,
    threads,
)
from tests.conftest import Api
from tests.integration.oversight_support import subscribe_everything


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code and isinstance(body["error"], str) and body["error"], body
    return body


LATER = isoformat(utcnow() + timedelta(days=2))


def _operator(boot: accounts.Bootstrap) -> Actor:
    return Actor(type="system", id=None, name="test-operator", account_id=boot.account["id"])


def make_mailbox(
    services: Services,
    boot: accounts.Bootstrap,
    local: str,
    mode: str = "gated_send",
    **fields: Any,
) -> dict[str, Any]:
    """A mailbox created the way the operator would (any mode)."""
    with services.db.write() as conn:
        return mailboxes.create_mailbox(
            conn,
            actor=_operator(boot),
            settings=services.settings,
            address=f"{local}@mm.test",
            oversight_mode=mode,
            **fields,
        )


def rows(services: Services, table: Any, *where: Any) -> list[dict[str, Any]]:
    with services.db.read() as conn:
        return [dict(r) for r in conn.execute(select(table).where(*where)).mappings()]


def message_row(services: Services, message_id: str) -> dict[str, Any]:
    return rows(services, messages, messages.c.id == message_id)[0]


def audit_actions(services: Services, message_id: str) -> list[str]:
    found = rows(services, audit_entries, audit_entries.c.subject_id == message_id)
    return [r["action"] for r in sorted(found, key=lambda r: r["seq"])]


def jobs_for(services: Services, message_id: str) -> list[dict[str, Any]]:
    return [j for j in rows(services, jobs) if j["payload"].get("message_id") == message_id]


def send(client: httpx.Client, mailbox: str, **body: Any) -> httpx.Response:
    body.setdefault("to", "customer@example.com")
    body.setdefault("subject", "Hello")
    body.setdefault("markdown", "Hi there")
    return client.post(f"/v1/mailboxes/{mailbox}/send", json=body)


def insert_inbound(services: Services, boot: accounts.Bootstrap, mailbox: dict[str, Any]) -> str:
    """An inbound message as the inbound pipeline would store it (that pipeline is elsewhere)."""
    now = utcnow()
    thread_id = new_id("thr")
    message_id = new_id("msg")
    with services.db.write() as conn:
        conn.execute(
            insert(threads).values(
                id=thread_id,
                account_id=boot.account["id"],
                mailbox_id=mailbox["id"],
                subject="Where is my order?",
                normalized_subject="where is my order?",
                message_count=1,
                created_at=now,
                last_activity_at=now,
            )
        )
        conn.execute(
            insert(messages).values(
                id=message_id,
                account_id=boot.account["id"],
                mailbox_id=mailbox["id"],
                thread_id=thread_id,
                direction="inbound",
                status="unread",
                message_id_header="<orig-2@customer.example>",
                references=["<orig-1@customer.example>"],
                from_address="Customer@Example.com",
                to=[mailbox["address"]],
                subject="Where is my order?",
                markdown="Help",
                created_at=now,
                updated_at=now,
            )
        )
    return message_id


# --- the gate --------------------------------------------------------------------------------


def test_gated_send_waits_for_approval_with_audit_and_event(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """gated_send: 202 pending_send_approval, oversight.pending emitted, no delivery job (the
    one job is the operator's approval request)."""
    subscribe_everything(services, boot.account["id"])
    box = make_mailbox(services, boot, "support")
    agent = api.client(boot.agent_key)
    response = send(agent, box["id"], metadata={"salesforce_case_id": "500X"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "pending_send_approval"
    assert body["id"] == body["message_id"] == body["email_id"]
    assert body["mailbox_id"] == box["id"] and body["thread_id"].startswith("thr_")
    assert body["idempotent"] is False and body["test"] is False
    assert body["metadata"] == {"salesforce_case_id": "500X"}
    row = message_row(services, body["id"])
    assert row["oversight_mode"] == "gated_send" and row["created_by_key_name"] == "agent"
    assert row["message_id_header"] == f"<{body['id'].removeprefix('msg_')}@mm.test>"
    assert row["html"] and "Hi there" in row["html"]
    with services.db.read() as conn:
        stored = message_views.full_view(conn, row)
    assert stored["metadata"] == {"salesforce_case_id": "500X"}
    assert audit_actions(services, body["id"]) == [
        "message.created",
        "message.scanned",
        "message.held_for_approval",
    ]
    assert [e["type"] for e in rows(services, events, events.c.message_id == body["id"])] == [
        "oversight.pending"
    ]
    assert [j["kind"] for j in jobs_for(services, body["id"])] == ["system_mail"]


@pytest.mark.parametrize(
    ("markdown", "stored_text", "body_text"),
    [
        ("Hi there,\n\nthanks.", None, "Hi there,\n\nthanks."),  # the text part is the markdown
        ("Hi there\r\nthanks.\n", "Hi there\nthanks.", "Hi there\nthanks."),  # normalised
    ],
)
def test_the_text_part_is_stored_only_when_it_is_not_the_markdown(
    api: Api,
    boot: accounts.Bootstrap,
    services: Services,
    markdown: str,
    stored_text: str | None,
    body_text: str,
) -> None:
    """The row keeps the body once when the text part is the markdown itself; every reader
    still sees the text part (the view falls back to the markdown)."""
    box = make_mailbox(services, boot, "texts", "autonomous")
    agent = api.client(boot.agent_key)
    body = send(agent, box["id"], markdown=markdown).json()
    row = message_row(services, body["id"])
    assert row["markdown"] == markdown and row["text"] == stored_text
    shown = agent.get(f"/v1/emails/{body['id']}").json()
    assert shown["body_text"] == body_text and shown["body"]["text"] == body_text


def test_caller_can_tighten_but_never_loosen_the_mode(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Stricter-mode rule: autonomous on gated_send still waits; gated_send on autonomous waits."""
    gated = make_mailbox(services, boot, "gated")
    free = make_mailbox(services, boot, "free", "autonomous")
    agent = api.client(boot.agent_key)
    loosen = send(agent, gated["address"], oversight_mode="autonomous").json()
    assert loosen["status"] == "pending_send_approval" and loosen["oversight_mode"] == "gated_send"
    tighten = send(agent, free["id"], oversight_mode="gated_send").json()
    assert tighten["status"] == "pending_send_approval"
    assert_envelope(send(agent, free["id"], oversight_mode="yolo"), 422, "invalid_oversight_mode")


@pytest.mark.parametrize("mode", ["monitored", "autonomous"])
def test_ungated_modes_queue_with_a_delivery_job(
    api: Api, boot: accounts.Bootstrap, services: Services, mode: str
) -> None:
    """monitored / autonomous: queued at once, with exactly one deliver job in the same commit."""
    box = make_mailbox(services, boot, "bot", mode)
    body = send(api.client(boot.agent_key), box["id"]).json()
    assert body["status"] == "queued"
    found = jobs_for(services, body["id"])
    assert [(j["kind"], j["dedupe_key"]) for j in found] == [("deliver", f"deliver:{body['id']}")]
    assert audit_actions(services, body["id"])[-1] == "message.queued"


def test_allowlisted_recipients_skip_the_gated_send_queue_only(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """gated_send mail to allowlisted recipients only is queued; gated_all always waits."""
    box = make_mailbox(services, boot, "allow")
    strict = make_mailbox(services, boot, "strict", "gated_all")
    with services.db.write() as conn:
        for mbx in (box, strict):
            conn.execute(
                insert(mailbox_allowlist).values(
                    id=new_id("alw"),
                    mailbox_id=mbx["id"],
                    pattern="*@partner.example",
                    added_by="operator",
                    created_at=utcnow(),
                )
            )
    agent = api.client(boot.agent_key)
    assert send(agent, box["id"], to="a@partner.example").json()["status"] == "queued"
    mixed = send(agent, box["id"], to=["a@partner.example", "b@other.example"]).json()
    assert mixed["status"] == "pending_send_approval"
    assert send(agent, strict["id"], to="a@partner.example").json()["status"] == (
        "pending_send_approval"
    )


def test_read_only_mailbox_refuses_and_says_how_to_upgrade(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """read_only: 403 mailbox_read_only naming request-upgrade; nothing is created."""
    box = make_mailbox(services, boot, "quiet", "read_only")
    body = assert_envelope(send(api.client(boot.agent_key), box["id"]), 403, "mailbox_read_only")
    assert f"/v1/mailboxes/{box['id']}/request-upgrade" in body["error"]
    assert rows(services, messages) == []


def test_send_needs_the_send_scope(api: Api, boot: accounts.Bootstrap, services: Services) -> None:
    """A reviewer (oversight) key cannot send."""
    box = make_mailbox(services, boot, "scoped")
    assert_envelope(send(api.client(boot.reviewer_key), box["id"]), 403, "insufficient_scope")


# --- input checks ----------------------------------------------------------------------------


def test_each_bad_input_has_its_code_and_creates_nothing(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Bad addresses, limits, bodies, attachments, times and metadata: 4xx with a stable code."""
    box = make_mailbox(services, boot, "checks")
    agent = api.client(boot.agent_key)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"to": "not an address"}, 422, "invalid_address"),
        ({"cc": ["ok@example.com", "bad@"]}, 422, "invalid_address"),
        ({"to": [f"r{i}@example.com" for i in range(51)]}, 422, "too_many_recipients"),
        ({"to": []}, 422, "missing_recipient"),
        ({"subject": "s" * 999}, 422, "subject_too_long"),
        ({"markdown": "m" * 262_145}, 422, "body_too_long"),
        ({"attachments": [{"name": "a.pdf", "content_base64": "***"}]}, 422, "invalid_base64"),
        ({"attachments": [{"content_base64": "aGk="}]}, 422, "invalid_attachment"),
        ({"send_at": "next tuesday"}, 422, "invalid_send_at"),
        ({"send_at": "2001-01-01T00:00:00Z"}, 422, "send_at_in_past"),
        ({"send_at": isoformat(utcnow() + timedelta(days=400))}, 422, "send_at_too_far"),
        ({"gate_timing": "whenever"}, 422, "invalid_gate_timing"),
        ({"metadata": {"blob": "x" * 17_000}}, 422, "metadata_too_large"),
        ({"thread_id": "bad thread id!"}, 422, "invalid_thread_id"),
        ({"from": "someone-else@mm.test"}, 404, "mailbox_not_found"),
    ]
    for extra, status, code in cases:
        assert_envelope(send(agent, box["id"], **extra), status, code)
    assert_envelope(send(agent, "nobody@mm.test"), 404, "mailbox_not_found")
    assert rows(services, messages) == []


def test_bypass_fields_are_refused_audited_and_create_nothing(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """APP-2: status/gated/approved in a send are 422 unknown_fields, audited, nothing created."""
    box = make_mailbox(services, boot, "bypass")
    agent = api.client(boot.agent_key)
    for extra in (
        {"status": "approved"},
        {"gated": False},
        {"approved": True},
        {"decision": "approve"},
    ):
        body = assert_envelope(send(agent, box["id"], **extra), 422, "unknown_fields")
        assert body["fields"] == list(extra)
    assert rows(services, messages) == [] and rows(services, jobs) == []
    attempts = rows(services, audit_entries, audit_entries.c.action == "message.bypass_attempt")
    assert len(attempts) == 4 and attempts[0]["actor_name"] == "agent"


def test_body_aliases_html_and_attachments(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """text/body/html are accepted for the body (html becomes markdown); attachments are stored."""
    box = make_mailbox(services, boot, "alias")
    agent = api.client(boot.agent_key)
    text = agent.post(
        f"/v1/mailboxes/{box['id']}/send", json={"to": "a@x.example", "text": "plain"}
    )
    assert message_row(services, text.json()["id"])["markdown"] == "plain"
    html = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={
            "to": "a@x.example",
            "subject": "h",
            "html": "<p>Hello <b>world</b></p>",
            "attachments": [
                {
                    "filename": "r.pdf",
                    "content_base64": base64.b64encode(b"%PDF").decode(),
                    "content_type": "application/pdf",
                }
            ],
        },
    )
    row = message_row(services, html.json()["id"])
    assert row["markdown"] == "Hello **world**"
    with services.db.read() as conn:
        view = message_views.full_view(conn, row)
    assert [(a["filename"], a["size_bytes"]) for a in view["attachments"]] == [("r.pdf", 4)]


def test_message_size_limit_is_413(boot: accounts.Bootstrap, services: Services, api: Api) -> None:
    """A message over max_message_bytes answers 413 message_too_large."""
    box = make_mailbox(services, boot, "big")
    blob = base64.b64encode(b"x" * (26 * 1024 * 1024)).decode()
    response = send(
        api.client(boot.agent_key),
        box["id"],
        attachments=[{"name": "big.bin", "content_base64": blob}],
    )
    assert_envelope(response, 413, "message_too_large")


# --- scan ------------------------------------------------------------------------------------


def test_scan_findings_are_stored_and_blocking_ones_fail_the_send(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Warnings reach the reviewer; executables or all-suppressed recipients: send_failed."""
    box = make_mailbox(services, boot, "scan", "autonomous")
    agent = api.client(boot.agent_key)
    warned = send(agent, box["id"], markdown="card 4111 1111 1111 1111").json()
    assert warned["status"] == "queued"
    assert [f["code"] for f in warned["scan_findings"]] == ["card_number"]
    exe = base64.b64encode(b"MZ\x90\x00").decode()
    blocked = send(agent, box["id"], attachments=[{"name": "a.pdf", "content_base64": exe}])
    assert blocked.status_code == 202
    body = blocked.json()
    assert body["status"] == "send_failed" and "a.pdf" in body["last_error"]
    assert body["scan_findings"][0]["severity"] == "block"
    assert jobs_for(services, body["id"]) == []
    assert audit_actions(services, body["id"])[-1] == "message.scan_blocked"
    with services.db.write() as conn:
        conn.execute(
            insert(suppressions).values(
                id=new_id("sup"),
                account_id=boot.account["id"],
                address="gone@example.com",
                reason="hard_bounce",
                created_at=utcnow(),
            )
        )
    all_gone = send(agent, box["id"], to="gone@example.com").json()
    assert all_gone["status"] == "send_failed"
    some_gone = send(agent, box["id"], to=["gone@example.com", "here@example.com"]).json()
    assert some_gone["status"] == "queued"
    assert some_gone["scan_findings"][0]["code"] == "suppressed_recipients"


# --- domains and test keys -------------------------------------------------------------------


def test_live_keys_need_a_verified_domain_test_keys_do_not(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """A mailbox on an unverified domain: live key 403 domain_not_verified, test key captured."""
    with services.db.write() as conn:
        domains.create_domain(
            conn, actor=_operator(boot), settings=services.settings, name="acme.example"
        )
        box = mailboxes.create_mailbox(
            conn, actor=_operator(boot), settings=services.settings, address="hi@acme.example"
        )
    assert_envelope(send(api.client(boot.agent_key), box["id"]), 403, "domain_not_verified")
    admin = api.client(boot.admin_key)
    test_key = admin.post(
        "/v1/api-keys", json={"name": "sandbox", "scopes": ["send", "read"], "mode": "test"}
    ).json()["key"]
    body = send(api.client(test_key), box["id"]).json()
    assert body["test"] is True and body["status"] == "pending_send_approval"
    assert body["message_id_header"].endswith("@acme.example>")


# --- idempotency -----------------------------------------------------------------------------


def test_idempotency_replay_reuse_and_expiry(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Same key+body → 200 original; different body → 422; an expired key can be used again."""
    box = make_mailbox(services, boot, "idem")
    agent = api.client(boot.agent_key)
    first = send(agent, box["id"], idempotency_key="k-1")
    assert first.status_code == 202
    again = send(agent, box["id"], idempotency_key="k-1")
    assert again.status_code == 200
    assert again.json() == first.json() | {"idempotent": True}
    assert_envelope(
        send(agent, box["id"], idempotency_key="k-1", subject="Other"),
        422,
        "idempotency_key_reused",
    )
    short = agent.post(
        "/v1/send",
        json={
            "from": box["address"],
            "to": "customer@example.com",
            "subject": "Hello",
            "markdown": "Hi there",
            "idempotency_key": "k-1",
        },
    )
    assert short.status_code == 200 and short.json()["id"] == first.json()["id"]
    assert len(rows(services, messages)) == 1
    with services.db.write() as conn:
        conn.execute(update(idempotency_keys).values(expires_at=utcnow() - timedelta(seconds=1)))
    reused = send(agent, box["id"], idempotency_key="k-1", subject="New day")
    assert reused.status_code == 202 and reused.json()["id"] != first.json()["id"]


def test_twenty_concurrent_duplicates_make_one_message_and_one_job(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """API-4: 20 simultaneous requests with one idempotency_key → one message, one job."""
    box = make_mailbox(services, boot, "race", "autonomous")
    barrier = threading.Barrier(20)
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(
            base_url=api.base_url, timeout=60, headers={"Authorization": f"Bearer {boot.agent_key}"}
        ) as client:
            barrier.wait()
            response = send(client, box["id"], idempotency_key="same")
        with lock:
            results.append(response)

    threads_ = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    assert sorted(r.status_code for r in results) == [200] * 19 + [202]
    assert len({r.json()["id"] for r in results}) == 1
    assert len(rows(services, messages)) == 1
    assert len([j for j in rows(services, jobs) if j["kind"] == "deliver"]) == 1


# --- caps ------------------------------------------------------------------------------------


def test_mailbox_key_and_account_caps_answer_429(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Per-mailbox and per-key caps → 429 send_cap_exceeded; daily quota → daily_quota_exceeded."""
    capped = make_mailbox(services, boot, "capped", send_cap_hour=2)
    agent = api.client(boot.agent_key)
    assert send(agent, capped["id"]).status_code == 202
    assert send(agent, capped["id"]).status_code == 202
    over = send(agent, capped["id"])
    body = assert_envelope(over, 429, "send_cap_exceeded")
    assert 3500 <= int(over.headers["Retry-After"]) <= 3600 and body["cap"] == 2

    admin = api.client(boot.admin_key)
    key = admin.post(
        "/v1/api-keys", json={"name": "one-a-day", "scopes": ["send", "read"], "send_cap_day": 1}
    ).json()["key"]
    other = make_mailbox(services, boot, "other")
    limited = api.client(key)
    assert send(limited, other["id"]).status_code == 202
    assert_envelope(send(limited, other["id"]), 429, "send_cap_exceeded")
    assert send(agent, other["id"]).status_code == 202, "the cap is the key's, not the mailbox's"

    assert admin.patch("/v1/account", json={"daily_send_quota": 4}).status_code == 200
    over_quota = send(agent, other["id"])
    assert_envelope(over_quota, 429, "daily_quota_exceeded")
    assert int(over_quota.headers["Retry-After"]) <= 86400


# --- replies and threads ---------------------------------------------------------------------


def test_reply_threads_and_duplicate_reply_is_409(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Replies carry In-Reply-To/References, join the thread, default to/subject; repeat → 409."""
    box = make_mailbox(services, boot, "help")
    original = insert_inbound(services, boot, box)
    agent = api.client(boot.agent_key)
    response = agent.post(f"/v1/mailboxes/{box['id']}/reply/{original}", json={"markdown": "On it"})
    assert response.status_code == 202, response.text
    body = response.json()
    row = message_row(services, body["id"])
    assert row["in_reply_to"] == "<orig-2@customer.example>"
    assert row["references"] == ["<orig-1@customer.example>", "<orig-2@customer.example>"]
    assert row["to"] == ["customer@example.com"] and row["subject"] == "Re: Where is my order?"
    assert row["thread_id"] == message_row(services, original)["thread_id"]
    assert row["reply_to_email_id"] == original
    repeat = agent.post(f"/v1/mailboxes/{box['id']}/reply/{original}", json={"markdown": "On it"})
    assert_envelope(repeat, 409, "duplicate_reply")
    fresh = agent.post(
        "/reply_email", json={"message_id": original, "body": "More", "idempotency_key": "r2"}
    )
    assert fresh.status_code == 202 and fresh.json()["thread_id"] == body["thread_id"]


def test_caller_thread_id_round_trips_and_groups(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """thread_id zd-4711 is returned as given and groups sends and replies into one thread."""
    box = make_mailbox(services, boot, "zendesk")
    agent = api.client(boot.agent_key)
    first = agent.post(
        "/send_email",
        json={
            "from": box["address"],
            "to": "c@example.com",
            "subject": "Ticket",
            "body": "Hi",
            "thread_id": "zd-4711",
        },
    )
    assert first.status_code == 202 and first.json()["thread_id"] == "zd-4711"
    second = send(agent, box["id"], thread_id="zd-4711", subject="Other subject").json()
    follow = agent.post(
        "/reply_email", json={"message_id": first.json()["id"], "body": "More"}
    ).json()
    assert second["thread_id"] == follow["thread_id"] == "zd-4711"
    thread_ids = {
        message_row(services, m)["thread_id"]
        for m in (first.json()["id"], second["id"], follow["id"])
    }
    assert len(thread_ids) == 1
    assert rows(services, threads, threads.c.external_id == "zd-4711")[0]["message_count"] == 3


def test_short_forms_choose_the_mailbox(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """/send_email uses 'from'; with one mailbox it may be left out; with two it is 422."""
    one = make_mailbox(services, boot, "one")
    agent = api.client(boot.agent_key)
    plain = {"to": "c@example.com", "subject": "s", "text": "t"}
    assert agent.post("/send_email", json=plain).json()["mailbox_id"] == one["id"]
    two = make_mailbox(services, boot, "two")
    assert_envelope(agent.post("/send_email", json=plain), 422, "mailbox_required")
    assert (
        agent.post("/v1/send", json=plain | {"from": two["address"]}).json()["mailbox_id"]
        == two["id"]
    )
    mismatch = agent.post(f"/v1/mailboxes/{one['id']}/send", json=plain | {"from": two["address"]})
    assert_envelope(mismatch, 422, "from_mismatch")
    assert_envelope(
        agent.post("/schedule_email", json=plain | {"from": one["address"]}),
        422,
        "send_at_required",
    )


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_rules(api: Api, boot: accounts.Bootstrap, services: Services) -> None:
    """Pending → cancelled (event, audit); again → 200; queued → 409 not_cancellable."""
    subscribe_everything(services, boot.account["id"])
    box = make_mailbox(services, boot, "cancel")
    agent = api.client(boot.agent_key)
    pending = send(agent, box["id"]).json()["id"]
    done = agent.post(f"/v1/mailboxes/{box['id']}/emails/{pending}/cancel", json={"reason": "typo"})
    assert done.status_code == 200 and done.json()["status"] == "cancelled"
    again = agent.post(f"/v1/cancel/{pending}")
    assert again.status_code == 200 and again.json()["already_cancelled"] is True
    assert audit_actions(services, pending).count("message.cancelled") == 1
    cancelled_events = rows(services, events, events.c.type == "message.cancelled")
    assert len(cancelled_events) == 1 and cancelled_events[0]["payload"]["reason"] == "typo"

    reviewer_cancel = send(agent, box["id"], subject="x").json()["id"]
    assert (
        api.client(boot.reviewer_key)
        .post("/cancel_message", json={"message_id": reviewer_cancel})
        .json()["status"]
        == "cancelled"
    )

    free = make_mailbox(services, boot, "fast", "autonomous")
    queued = send(agent, free["id"]).json()["id"]
    body = assert_envelope(agent.post(f"/v1/cancel/{queued}"), 409, "not_cancellable")
    assert body["status"] == "queued" and "queued" in body["error"]
    assert_envelope(agent.post("/v1/cancel/msg_doesnotexist"), 404, "message_not_found")


# --- scheduling ------------------------------------------------------------------------------


def _make_due(services: Services, message_id: str) -> None:
    with services.db.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == message_id)
            .values(send_at=utcnow() - timedelta(seconds=5))
        )


def test_scheduling_and_release_for_both_timings(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """gate_first asks now; schedule_first waits then asks; ungated waits, then queues."""
    subscribe_everything(services, boot.account["id"])
    box = make_mailbox(services, boot, "sched")
    free = make_mailbox(services, boot, "later", "autonomous")
    agent = api.client(boot.agent_key)
    gate_first = send(agent, box["id"], send_at=LATER).json()
    assert gate_first["status"] == "pending_send_approval" and gate_first["send_at"] == LATER
    schedule_first = send(agent, box["id"], send_at=LATER, gate_timing="schedule_first").json()
    assert schedule_first["status"] == "scheduled"
    [job] = jobs_for(services, schedule_first["id"])
    assert job["kind"] == "release_scheduled" and isoformat(aware(job["run_at"])) == LATER
    assert sending.release_scheduled(services, schedule_first["id"]) is None, "not yet due"
    _make_due(services, schedule_first["id"])
    assert sending.release_scheduled(services, schedule_first["id"]) == "pending_send_approval"
    assert sending.release_scheduled(services, schedule_first["id"]) is None
    assert [
        e["type"] for e in rows(services, events, events.c.message_id == schedule_first["id"])
    ] == ["oversight.pending"]

    ungated = send(agent, free["id"], send_at=LATER).json()
    assert ungated["status"] == "scheduled"
    _make_due(services, ungated["id"])
    assert sending.release_scheduled(services, ungated["id"]) == "queued"
    assert {j["kind"] for j in jobs_for(services, ungated["id"])} == {
        "release_scheduled",
        "deliver",
    }

    approved = send(agent, box["id"], send_at=LATER, subject="approved first").json()["id"]
    with services.db.write() as conn:  # what the reviewer's approve does to a future send_at
        conn.execute(
            update(messages)
            .where(messages.c.id == approved)
            .values(status="scheduled", decision="approve", reviewer="rita")
        )
    _make_due(services, approved)
    assert sending.release_scheduled(services, approved) == "queued"

    cancelled = send(agent, free["id"], send_at=LATER, subject="never").json()["id"]
    assert agent.post(f"/v1/cancel/{cancelled}").json()["status"] == "cancelled"
    _make_due(services, cancelled)
    assert sending.release_scheduled(services, cancelled) is None
    assert message_row(services, cancelled)["status"] == "cancelled"


def test_schedule_edits(api: Api, boot: accounts.Bootstrap, services: Services) -> None:
    """Time edits move the release job; content edits re-scan and void an approval; 409 after."""
    box = make_mailbox(services, boot, "edits")
    agent = api.client(boot.agent_key)
    msg = send(agent, box["id"], send_at=LATER, gate_timing="schedule_first").json()["id"]
    path = f"/v1/mailboxes/{box['id']}/emails/{msg}/schedule"
    sooner = isoformat(utcnow() + timedelta(hours=3))
    moved = agent.patch(path, json={"send_at": sooner})
    assert moved.status_code == 200 and moved.json()["send_at"] == sooner
    assert [isoformat(aware(j["run_at"])) for j in jobs_for(services, msg)] == [sooner]

    edited = agent.patch(
        path, json={"markdown": "card 4111 1111 1111 1111", "subject": "New"}
    ).json()
    assert edited["status"] == "scheduled" and edited["subject"] == "New"
    assert [f["code"] for f in edited["scan_findings"]] == ["card_number"]
    assert sorted(edited["changed"]) == ["markdown", "subject"]
    assert "message.schedule_edited" in audit_actions(services, msg)

    blocked = agent.patch(path, json={"markdown": "mm_live_" + "k" * 40})
    assert_envelope(blocked, 422, "scan_blocked")
    assert message_row(services, msg)["markdown"] == "card 4111 1111 1111 1111"
    assert_envelope(agent.patch(path, json={"status": "queued"}), 422, "unknown_fields")

    with services.db.write() as conn:  # approved first, waiting for send_at
        conn.execute(
            update(messages)
            .where(messages.c.id == msg)
            .values(decision="approve", reviewer="rita", decided_at=utcnow())
        )
    back = agent.post("/edit_scheduled_email", json={"message_id": msg, "body": "Revised"}).json()
    assert back["status"] == "pending_send_approval"
    assert message_row(services, msg)["decision"] is None

    free = make_mailbox(services, boot, "gone", "autonomous")
    queued = send(agent, free["id"]).json()["id"]
    late = agent.patch(
        f"/v1/mailboxes/{free['id']}/emails/{queued}/schedule", json={"subject": "x"}
    )
    assert_envelope(late, 409, "already_approved")


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metadata_is_refused_by_the_service_and_nothing_is_stored(
    services: Services, boot: accounts.Bootstrap, number: float
) -> None:
    """Every transport (MCP, CLI, the Python client, HTTP) reaches sending.send; NaN or an
    infinity in metadata is not JSON, and stored it broke every later read of the message."""
    box = make_mailbox(services, boot, "nanmeta", "autonomous")
    agent = keys.authenticate(services.db, boot.agent_key)
    request = sending.SendRequest.model_validate(
        {"to": "a@example.com", "subject": "s", "markdown": "b", "metadata": {"x": [number]}}
    )
    with pytest.raises(InvalidInput) as refused:
        sending.send(services, agent, mailbox_ref=box["id"], request=request)
    assert refused.value.code == "invalid_metadata"
    with services.db.read() as conn:
        assert conn.execute(select(messages.c.id)).first() is None
