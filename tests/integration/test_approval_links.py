"""One-click links (approve / reject / unsubscribe) and operator approval codes, live."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from sqlalchemy import select, update

from multimail.domain.linktokens import make_token
from multimail.ids import utcnow
from multimail.services import accounts, approvals, notify
from multimail.services.context import Actor, Services
from multimail.store.tables import approval_codes, mailboxes, suppressions
from multimail.testing.smtp import CapturingSMTPServer
from tests.conftest import Api
from tests.integration.oversight_support import (
    audit_actions,
    box,
    job_rows,
    key_id,
    last_code,
    make_message,
    message_row,
    relay,
    settings,
)

__all__ = ["box", "relay", "settings"]  # fixtures, re-exported so pytest finds them here

LINK = re.compile(r"\((http://[^)]+/v1/approve/[^)]+)\)")


def _pending_with_links(
    services: Services, box: dict[str, Any], agent: str
) -> tuple[str, str, str]:
    msg = make_message(services, box, created_by_key_id=agent)
    with services.db.write() as conn:
        notify.notify_pending(conn, services, msg)
    # The job only names the message; the worker writes the mail (and its links) with this.
    with services.db.read() as conn:
        written = notify.approval_request_mail(conn, services, msg["id"])
    assert written is not None
    approve, reject = LINK.findall(written[1])
    return msg["id"], approve, reject


def _path(link: str) -> str:
    return "/v1/" + link.split("/v1/", 1)[1]


def test_get_shows_the_draft_and_never_decides_post_decides_once(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    relay: CapturingSMTPServer,
) -> None:
    """GET (as a link scanner would) decides nothing; the POST approves once, delivers, and
    records the reviewer as the email link; the link then answers 410, the other link 409."""
    agent = key_id(services, "agent", boot.account["id"])
    message_id, approve, reject = _pending_with_links(services, box, agent)
    anon = api.client(None)
    for _ in range(2):
        page = anon.get(_path(approve))
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "Hello **Bob**" in page.text and '<form method="post"' in page.text
        assert page.headers["cache-control"] == "no-store"
    assert message_row(services, message_id)["status"] == "pending_send_approval"
    done = anon.post(_path(approve))
    assert done.status_code == 200 and "Approved" in done.text
    stored = message_row(services, message_id)
    assert stored["decision"] == "approve"
    assert stored["reviewer"] == "email link (ops@mm.test)"
    assert stored["status"] in ("queued", "sending", "delivered")
    [received] = relay.wait_for(1, timeout=10)
    assert received.rcpt_tos == ["bob@example.org"]
    assert anon.post(_path(approve)).status_code == 410
    assert anon.get(_path(approve)).status_code == 410
    assert anon.get(_path(reject)).status_code == 409
    assert anon.post(_path(reject)).status_code == 409
    approved = [a for a in audit_actions(services, message_id) if a["action"] == "message.approved"]
    assert len(approved) == 1 and approved[0]["actor_name"] == "email link (ops@mm.test)"


def test_reject_link_rejects(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """The Reject link's POST rejects and nothing is queued."""
    agent = key_id(services, "agent", boot.account["id"])
    message_id, _approve, reject = _pending_with_links(services, box, agent)
    response = api.client(None).post(_path(reject))
    assert response.status_code == 200 and "Rejected" in response.text
    assert message_row(services, message_id)["status"] == "rejected"
    assert job_rows(services, "deliver") == []


def test_forged_expired_and_foreign_tokens_are_refused(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """A changed character → 403; an expired token → 410; an unsubscribe token on the
    approve page → 403; the message stays pending throughout."""
    agent = key_id(services, "agent", boot.account["id"])
    message_id, approve, _reject = _pending_with_links(services, box, agent)
    path = _path(approve)
    forged = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
    anon = api.client(None)
    assert anon.post(forged).status_code == 403
    secret = notify.secret_key(services)
    expired = make_token(
        secret,
        purpose="approval",
        subject_id=message_id,
        action="approve",
        expires_at=int(time.time()) - 1,
        nonce="n-expired",
    )
    assert anon.post(f"/v1/approve/{expired}").status_code == 410
    other_secret = make_token(
        b"x" * 32,
        purpose="approval",
        subject_id=message_id,
        action="approve",
        expires_at=int(time.time()) + 60,
        nonce="n2",
    )
    assert anon.post(f"/v1/approve/{other_secret}").status_code == 403
    unsubscribe = notify.unsubscribe_url(services, boot.account["id"], "bob@example.org")
    wrong_kind = unsubscribe.rsplit("/", 1)[1]
    assert anon.post(f"/v1/approve/{wrong_kind}").status_code == 403
    assert message_row(services, message_id)["status"] == "pending_send_approval"


def test_one_click_unsubscribe_suppresses_the_address(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """RFC 8058: GET shows a confirmation; the POST with List-Unsubscribe=One-Click
    suppresses (reason unsubscribe), idempotently; a forged token suppresses nothing."""
    url = notify.unsubscribe_url(services, boot.account["id"], "Bob@Example.org")
    anon = api.client(None)
    path = _path(url).replace("/v1/approve/", "/v1/unsubscribe/")
    page = anon.get(path)
    assert page.status_code == 200 and "bob@example.org" in page.text
    with services.db.read() as conn:
        assert conn.execute(select(suppressions)).first() is None
    for _ in range(2):
        done = anon.post(path, data={"List-Unsubscribe": "One-Click"})
        assert done.status_code == 200
    with services.db.read() as conn:
        rows = conn.execute(select(suppressions)).mappings().all()
    assert [(r["address"], r["reason"]) for r in rows] == [("bob@example.org", "unsubscribe")]
    assert anon.post(path[:-2] + "xx", data={"List-Unsubscribe": "One-Click"}).status_code == 403


def test_trust_ladder_code_is_mailed_single_use_and_counted(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """request-upgrade mails a code (202, masked address); a wrong code is 403; the right one
    applies the mode once (audited as approved by operator code); reuse is 403."""
    agent = api.client(boot.agent_key)
    asked = agent.post(
        f"/v1/mailboxes/{box['id']}/request-upgrade", json={"target_mode": "autonomous"}
    )
    assert asked.status_code == 202, asked.text
    body = asked.json()
    assert body["status"] == "approval_required" and body["sent_to"] == "o*s@mm.test"
    code = last_code(services)
    assert code not in asked.text
    wrong = agent.post(f"/v1/mailboxes/{box['id']}/upgrade", json={"code": "WRONGCOD"})
    assert wrong.status_code == 403 and wrong.json()["code"] == "invalid_approval_code"
    applied = agent.post(
        "/apply_upgrade", json={"mailbox_id": "agent@mm.test", "code": code.lower()}
    )
    assert applied.status_code == 200 and applied.json()["oversight_mode"] == "autonomous"
    changed = [
        a for a in audit_actions(services, box["id"]) if a["action"] == "mailbox.mode_changed"
    ]
    assert len(changed) == 1 and '"approved_by":"operator code"' in changed[0]["details"]
    reuse = agent.post(f"/v1/mailboxes/{box['id']}/upgrade", json={"code": code})
    assert reuse.status_code == 403
    tighter = agent.post(
        "/request_upgrade", json={"mailbox_id": box["id"], "target_mode": "gated_send"}
    )
    assert tighter.status_code == 422 and tighter.json()["code"] == "not_an_upgrade"


def test_codes_expire_and_die_after_five_wrong_guesses(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """An expired code is refused; after five wrong tries even the right code is refused."""
    agent = api.client(boot.agent_key)
    url = f"/v1/mailboxes/{box['id']}/request-upgrade"
    agent.post(url, json={"target_mode": "monitored"})
    code = last_code(services)
    with services.db.write() as conn:
        conn.execute(update(approval_codes).values(expires_at=utcnow()))
    expired = agent.post(f"/v1/mailboxes/{box['id']}/upgrade", json={"code": code})
    assert expired.status_code == 403 and "expired" in expired.json()["error"]
    agent.post(url, json={"target_mode": "monitored"})
    code = last_code(services)
    for _ in range(5):
        agent.post(f"/v1/mailboxes/{box['id']}/upgrade", json={"code": "AAAAAAAA"})
    late = agent.post(f"/v1/mailboxes/{box['id']}/upgrade", json={"code": code})
    assert late.status_code == 403
    with services.db.read() as conn:
        mode = conn.execute(select(mailboxes.c.oversight_mode)).scalar_one()
    assert mode == "gated_send"


def test_allowlist_add_needs_the_operator_removal_is_immediate(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    minted_admin_key: str,
) -> None:
    """Adding an allowlist entry answers 202 and mails a code; the code only fits the same
    entry; with it the entry is added; removing it needs no code. (The operator's own admin
    key adds directly.)"""
    operator = api.client(boot.admin_key)
    direct = operator.post(
        f"/v1/mailboxes/{box['id']}/allowlist", json={"pattern": "ceo@partner.example"}
    )
    assert direct.status_code == 201, direct.text
    operator.delete(
        f"/v1/mailboxes/{box['id']}/allowlist", params={"pattern": "ceo@partner.example"}
    )
    admin = api.client(minted_admin_key)
    url = f"/v1/mailboxes/{box['id']}/allowlist"
    first = admin.post(url, json={"pattern": "*@Partner.example"})
    assert first.status_code == 202 and first.json()["code"] == "approval_required"
    code = last_code(services)
    other = admin.post(url, json={"pattern": "*@evil.example", "approval_code": code})
    assert other.status_code == 403
    added = admin.post(url, json={"pattern": "*@partner.example", "approval_code": code})
    assert added.status_code == 201, added.text
    listed = admin.get(url).json()["allowlist"]
    assert [e["pattern"] for e in listed] == ["*@partner.example"]
    assert admin.delete(url, params={"pattern": "*@partner.example"}).json()["removed"] is True
    assert admin.get(url).json()["allowlist"] == []
    assert api.client(boot.agent_key).post(url, json={"pattern": "a@b.example"}).status_code == 403


def test_two_step_mailbox_and_key_creation(services: Services, boot: accounts.Bootstrap) -> None:
    """An API key creating a mailbox or key gets ApprovalRequired and a mailed code; the
    repeat with the code creates it; a looser mode asked for becomes an upgrade request;
    an operator acts directly."""
    from multimail.errors import ApprovalRequired, Forbidden

    admin = Actor(
        type="key",
        id=key_id(services, "admin", boot.account["id"]),
        name="admin",
        account_id=boot.account["id"],
        scopes=frozenset({"admin", "read"}),
    )  # type: ignore[arg-type]
    fields = {"address": "bot@mm.test", "oversight_mode": "autonomous"}
    with pytest.raises(ApprovalRequired) as asked:
        approvals.create_mailbox(services, admin, dict(fields), None)
    assert asked.value.context["sent_to"] == "o*s@mm.test"
    code = last_code(services)
    with pytest.raises(Forbidden):
        approvals.create_mailbox(services, admin, {"address": "other@mm.test"}, code)
    created = approvals.create_mailbox(services, admin, dict(fields), code)
    assert created["oversight_mode"] == "gated_send" and created["upgrade_required"] is True
    assert created["upgrade"]["target_mode"] == "autonomous"
    with pytest.raises(ApprovalRequired):
        approvals.create_api_key(services, admin, {"name": "ci", "scopes": ["read"]}, None)
    key = approvals.create_api_key(
        services, admin, {"name": "ci", "scopes": ["read"]}, last_code(services)
    )
    assert key["key"].startswith("mm_live_")
    operator = Actor(type="user", id=None, name="ops", account_id=boot.account["id"])
    direct = approvals.create_mailbox(services, operator, {"address": "ops-box@mm.test"}, None)
    assert direct["address"] == "ops-box@mm.test"
