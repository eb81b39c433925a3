"""The dashboard over plain HTTP: sign-in, sessions, CSRF, isolation between accounts.

A real server on loopback with a capturing SMTP relay; httpx plays the browser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from multimail.api import app as app_module
from multimail.config import Settings
from multimail.dashboard import mount_dashboard
from multimail.runtime import build_services
from multimail.services import accounts, mailboxes, operators
from multimail.services.context import SYSTEM, Actor, Services
from multimail.store.tables import accounts as accounts_table
from multimail.store.tables import audit_entries, dashboard_sessions, messages
from multimail.store.tables import mailboxes as mailboxes_table
from multimail.store.tables import webhooks as webhooks_table
from multimail.testing import server as server_module
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers.signing import default_dkim_record
from tests.integration import relay_support
from tests.integration.relay_support import relayed_services

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _dashboard_in_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app as ``multimail serve`` builds it: API plus dashboard (idempotent mount)."""

    def create_app(services: Services) -> Any:
        app = app_module.create_app(services)
        mount_dashboard(app, services)
        return app

    monkeypatch.setattr(server_module, "create_app", create_app)


relay = relay_support.relay


@pytest.fixture
def svc(settings: Settings, relay: CapturingSMTPServer) -> Iterator[Services]:
    with relayed_services(settings, relay) as services:
        yield services


class Tenant:
    """An account with an operator (known password), a gated mailbox and an agent key."""

    def __init__(self, services: Services, name: str, email: str) -> None:
        boot = accounts.bootstrap(services.db, account_name=name, operator_email=f"boot-{email}")
        self.account_id: str = boot.account["id"]
        self.agent_key = boot.agent_key
        self.email = email
        operators.create_operator(
            services.db, account_id=self.account_id, email=email, password=PASSWORD
        )
        actor = Actor(type="system", id=None, name="test", account_id=self.account_id)
        with services.db.write() as conn:
            self.mailbox = mailboxes.create_mailbox(
                conn,
                actor=actor,
                settings=services.settings,
                address=f"agent-{name.lower()}@mm.test",
            )


@pytest.fixture
def live(svc: Services) -> Iterator[LiveServer]:
    with LiveServer(svc) as server:
        yield server


@pytest.fixture
def acme(svc: Services) -> Tenant:
    return Tenant(svc, "Acme", "ops@acme.test")


def _browser(live: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=live.base_url, timeout=30, follow_redirects=False)


def _form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def sign_in(client: httpx.Client, email: str, password: str = PASSWORD) -> httpx.Response:
    page = client.get("/dashboard/login")
    return client.post(
        "/dashboard/login",
        data={"email": email, "password": password, "csrf_token": _form_token(page.text)},
    )


def signed_in(live: LiveServer, tenant: Tenant) -> tuple[httpx.Client, str]:
    """A client with a session, and the session's CSRF token (read off a page)."""
    client = _browser(live)
    assert sign_in(client, tenant.email).status_code == 303
    return client, _form_token(client.get("/dashboard/queue").text)


def send_gated(live: LiveServer, tenant: Tenant, subject: str = "Quote for Jane") -> str:
    with httpx.Client(base_url=live.base_url, timeout=30) as agent:
        response = agent.post(
            f"/v1/mailboxes/{tenant.mailbox['id']}/send",
            headers={"Authorization": f"Bearer {tenant.agent_key}"},
            json={"to": ["jane@example.com"], "subject": subject, "markdown": "Hello **Jane**"},
        )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending_send_approval"
    return str(response.json()["id"])


def _status(services: Services, message_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        row = conn.execute(select(messages).where(messages.c.id == message_id)).mappings().one()
    return dict(row)


def _actions(services: Services, action: str) -> list[dict[str, Any]]:
    with services.db.read() as conn:
        rows = conn.execute(
            select(audit_entries).where(audit_entries.c.action == action)
        ).mappings()
        return [dict(r) | {"details": json.loads(r["details"])} for r in rows]


# --- sign-in and sessions --------------------------------------------------------------------


def test_session_cookie_is_httponly_lax_and_scoped(live: LiveServer, acme: Tenant) -> None:
    """Sign-in sets an HttpOnly, SameSite=Lax cookie for /dashboard; not Secure over http."""
    with _browser(live) as client:
        response = sign_in(client, acme.email)
        assert response.status_code == 303
        assert response.headers["location"] == "/dashboard/queue"
        cookie = next(
            c for c in response.headers.get_list("set-cookie") if c.startswith("mm_session=")
        )
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags
    assert "samesite=lax" in flags
    assert "path=/dashboard" in flags
    assert "secure" not in flags


def test_session_cookie_is_secure_behind_https(
    settings: Settings, relay: CapturingSMTPServer
) -> None:
    """With an https public URL the session cookie carries Secure."""
    services = build_services(settings.model_copy(update={"public_url": "https://mm.example"}))
    try:
        tenant = Tenant(services, "Acme", "ops@acme.test")
        with LiveServer(services) as server, _browser(server) as client:
            page = client.get("/dashboard/login")
            assert "secure" in page.headers["set-cookie"].lower()
            # httpx keeps Secure cookies off plain http, as a browser would: send it by hand.
            response = client.post(
                "/dashboard/login",
                data={
                    "email": tenant.email,
                    "password": PASSWORD,
                    "csrf_token": _form_token(page.text),
                },
                headers={"Cookie": page.headers["set-cookie"].split(";")[0]},
            )
        cookie = next(
            c for c in response.headers.get_list("set-cookie") if c.startswith("mm_session=")
        )
        assert "secure" in [p.strip().lower() for p in cookie.split(";")]
    finally:
        services.db.dispose()


def test_session_token_is_stored_only_as_a_hash(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """The database never holds the cookie value, only its SHA-256."""
    with _browser(live) as client:
        sign_in(client, acme.email)
        token = client.cookies["mm_session"]
    with svc.db.read() as conn:
        stored = [r.token_hash for r in conn.execute(select(dashboard_sessions.c.token_hash))]
    assert token not in stored
    assert len(stored) == 1 and len(stored[0]) == 64


def test_wrong_password_is_refused_and_audited(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """A wrong password gets 401 and no session; the attempt is in the audit log."""
    with _browser(live) as client:
        response = sign_in(client, acme.email, "not the password")
        assert response.status_code == 401
        assert "do not match" in response.text
        assert "mm_session" not in client.cookies
        assert client.get("/dashboard/queue").status_code == 303
    failures = _actions(svc, "operator.sign_in_failed")
    assert [f["details"]["reason"] for f in failures] == ["wrong_password"]
    assert failures[0]["account_id"] == acme.account_id


def test_successful_sign_in_is_audited_with_the_operator(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """``operator.signed_in`` names the operator by email."""
    with _browser(live) as client:
        sign_in(client, acme.email)
    entries = _actions(svc, "operator.signed_in")
    assert len(entries) == 1
    assert entries[0]["actor_type"] == "user"
    assert entries[0]["actor_name"] == acme.email


def test_sign_in_attempts_are_rate_limited(live: LiveServer, acme: Tenant, svc: Services) -> None:
    """After 5 attempts in 15 minutes the 6th is refused with 429, even with the password."""
    with _browser(live) as client:
        for _ in range(operators.ATTEMPTS_PER_WINDOW):
            assert sign_in(client, acme.email, "guess").status_code == 401
        refused = sign_in(client, acme.email)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert "mm_session" not in client.cookies
    reasons = [f["details"]["reason"] for f in _actions(svc, "operator.sign_in_failed")]
    assert reasons.count("rate_limited") == 1


def test_sign_in_form_without_its_token_is_refused(live: LiveServer, acme: Tenant) -> None:
    """The sign-in form is CSRF-protected too (double-submit cookie)."""
    with _browser(live) as client:
        response = client.post("/dashboard/login", data={"email": acme.email, "password": PASSWORD})
        assert response.status_code == 403
        assert "mm_session" not in client.cookies


def test_logout_ends_the_session(live: LiveServer, acme: Tenant, svc: Services) -> None:
    """After signing out the old cookie opens nothing."""
    client, token = signed_in(live, acme)
    with closing(client):
        old = client.cookies["mm_session"]
        response = client.post("/dashboard/logout", data={"csrf_token": token})
        assert response.status_code == 303
    with _browser(live) as replay:
        replay.cookies.set("mm_session", old, path="/dashboard")
        assert replay.get("/dashboard/queue").status_code == 303
    assert len(_actions(svc, "operator.signed_out")) == 1


def test_next_parameter_cannot_redirect_off_site(live: LiveServer, acme: Tenant) -> None:
    """Only dashboard paths are followed after sign-in (no open redirect)."""
    with _browser(live) as client:
        page = client.get("/dashboard/login", params={"next": "https://evil.example/"})
        response = client.post(
            "/dashboard/login",
            data={
                "email": acme.email,
                "password": PASSWORD,
                "csrf_token": _form_token(page.text),
                "next": "//evil.example/x",
            },
        )
    assert response.headers["location"] == "/dashboard/queue"


# --- CSRF and isolation ----------------------------------------------------------------------


def test_post_without_csrf_token_is_refused(live: LiveServer, acme: Tenant, svc: Services) -> None:
    """A decision posted without (or with a wrong) CSRF token is 403 and changes nothing."""
    message_id = send_gated(live, acme)
    client, _token = signed_in(live, acme)
    with closing(client):
        missing = client.post(f"/dashboard/messages/{message_id}/approve", data={})
        wrong = client.post(
            f"/dashboard/messages/{message_id}/approve", data={"csrf_token": "forged"}
        )
    assert missing.status_code == 403 and wrong.status_code == 403
    assert "CSRF" in missing.text
    assert _status(svc, message_id)["status"] == "pending_send_approval"


def test_other_accounts_operator_sees_404(live: LiveServer, acme: Tenant, svc: Services) -> None:
    """A second account's operator can neither see nor decide the first's messages."""
    message_id = send_gated(live, acme, subject="Acme secret")
    globex = Tenant(svc, "Globex", "ops@globex.test")
    client, token = signed_in(live, globex)
    with closing(client):
        assert client.get(f"/dashboard/messages/{message_id}").status_code == 404
        decided = client.post(
            f"/dashboard/messages/{message_id}/approve", data={"csrf_token": token}
        )
        assert decided.status_code == 404
        assert "Acme secret" not in client.get("/dashboard/queue").text
        assert "Acme secret" not in client.get("/dashboard/messages").text
    assert _status(svc, message_id)["status"] == "pending_send_approval"


def test_session_of_one_operator_cannot_use_anothers_csrf_token(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """CSRF tokens are per session: a token from another session is refused."""
    message_id = send_gated(live, acme)
    first, first_token = signed_in(live, acme)
    second, _second_token = signed_in(live, acme)
    with closing(first), closing(second):
        response = second.post(
            f"/dashboard/messages/{message_id}/approve", data={"csrf_token": first_token}
        )
    assert response.status_code == 403


# --- decisions and pages ---------------------------------------------------------------------


def test_approve_records_the_operator_and_delivers(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """Approving in the dashboard names the signed-in operator as reviewer; the mail goes."""
    message_id = send_gated(live, acme)
    client, token = signed_in(live, acme)
    with closing(client):
        response = client.post(
            f"/dashboard/messages/{message_id}/approve", data={"csrf_token": token}
        )
        assert response.status_code == 303
        page = client.get(response.headers["location"])
    row = _status(svc, message_id)
    assert row["decision"] == "approve"
    assert row["reviewer"] == acme.email
    assert "approve by ops@acme.test" in page.text
    received = relay.wait_for(1, timeout=10)
    assert "Hello" in received[0].as_email().get_body(("plain",)).get_content()  # type: ignore[union-attr]


def test_reject_requires_a_note_and_the_agent_reads_it(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """A rejection without a note is refused; with one, the agent reads it via the API."""
    message_id = send_gated(live, acme)
    client, token = signed_in(live, acme)
    with closing(client):
        empty = client.post(
            f"/dashboard/messages/{message_id}/reject", data={"csrf_token": token, "note": " "}
        )
        assert empty.status_code == 422
        done = client.post(
            f"/dashboard/messages/{message_id}/reject",
            data={"csrf_token": token, "note": "Too pushy; offer a call instead."},
        )
        assert done.status_code == 303
    with httpx.Client(base_url=live.base_url, timeout=30) as agent:
        seen = agent.get(
            f"/v1/mailboxes/{acme.mailbox['id']}/emails/{message_id}",
            headers={"Authorization": f"Bearer {acme.agent_key}"},
        ).json()
    assert seen["status"] == "rejected"
    assert seen["rejection_note"] == "Too pushy; offer a call instead."


def test_second_decision_shows_a_conflict_page(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """Deciding twice answers 409 with an explanation; the first decision stands."""
    message_id = send_gated(live, acme)
    client, token = signed_in(live, acme)
    with closing(client):
        client.post(
            f"/dashboard/messages/{message_id}/reject", data={"csrf_token": token, "note": "no"}
        )
        again = client.post(f"/dashboard/messages/{message_id}/approve", data={"csrf_token": token})
    assert again.status_code == 409
    assert "already decided" in again.text
    assert _status(svc, message_id)["status"] == "rejected"


def test_every_page_renders_for_an_operator(live: LiveServer, acme: Tenant) -> None:
    """Each page answers 200 with its heading, and carries the security headers."""
    message_id = send_gated(live, acme)
    client, _token = signed_in(live, acme)
    pages = {
        "/dashboard/queue": "Pending approval",
        f"/dashboard/messages/{message_id}": "Status timeline",
        "/dashboard/messages": "Messages",
        "/dashboard/mailboxes": "Mailboxes",
        "/dashboard/keys": "API keys",
        "/dashboard/webhooks": "Webhooks",
        "/dashboard/domains": "Domains",
        "/dashboard/audit": "Audit log",
        "/dashboard/sandbox": "Sandbox",
        "/dashboard/usage": "Usage",
    }
    with closing(client):
        for path, heading in pages.items():
            response = client.get(path)
            assert response.status_code == 200, (path, response.text[:500])
            assert heading in response.text, path
            assert "default-src 'self'" in response.headers["content-security-policy"]
        queue = client.get("/dashboard/queue").text
        assert "<title>(1) Pending" in queue
        assert "Hello <strong>Jane</strong>" in queue


def test_pages_need_a_session(live: LiveServer) -> None:
    """Without a session every page redirects to sign-in, remembering where it was."""
    with _browser(live) as client:
        response = client.get("/dashboard/audit")
        assert response.status_code == 303
        assert response.headers["location"] == "/dashboard/login?next=/dashboard/audit"
        assert client.get("/dashboard/events").status_code == 303


def test_loosening_a_mode_asks_for_confirmation(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """Tightening applies at once; loosening first shows a confirmation page."""
    client, token = signed_in(live, acme)
    box = acme.mailbox["id"]
    with closing(client):
        tighter = client.post(
            f"/dashboard/mailboxes/{box}/mode",
            data={"csrf_token": token, "oversight_mode": "gated_all"},
        )
        assert tighter.status_code == 303
        looser = client.post(
            f"/dashboard/mailboxes/{box}/mode",
            data={"csrf_token": token, "oversight_mode": "autonomous"},
        )
        assert looser.status_code == 200 and "Loosen the gate" in looser.text
        with svc.db.read() as conn:
            assert mailboxes.resolve(conn, SYSTEM_OF(acme), box)["oversight_mode"] == "gated_all"
        confirmed = client.post(
            f"/dashboard/mailboxes/{box}/mode",
            data={"csrf_token": token, "oversight_mode": "autonomous", "confirm": "yes"},
        )
        assert confirmed.status_code == 303
    with svc.db.read() as conn:
        assert mailboxes.resolve(conn, SYSTEM_OF(acme), box)["oversight_mode"] == "autonomous"
    changes = _actions(svc, "mailbox.mode_changed")
    assert [c["actor_name"] for c in changes] == [acme.email, acme.email]


def test_created_api_key_is_shown_once(live: LiveServer, acme: Tenant) -> None:
    """A key created in the dashboard is on that page only, then works against the API."""
    client, token = signed_in(live, acme)
    with closing(client):
        created = client.post(
            "/dashboard/keys",
            data={"csrf_token": token, "name": "reader", "scope_read": "on", "mode": "live"},
        )
        assert created.status_code == 200
        key = re.search(r'id="new-key">(mm_live_[^<]+)<', created.text)
        assert key
        assert key.group(1) not in client.get("/dashboard/keys").text
    with httpx.Client(base_url=live.base_url, timeout=30) as api:
        response = api.get("/v1/mailboxes", headers={"Authorization": f"Bearer {key.group(1)}"})
    assert response.status_code == 200


def test_event_stream_reports_the_pending_count(live: LiveServer, acme: Tenant) -> None:
    """``/dashboard/events`` is an SSE stream whose first event carries the queue count."""
    message_id = send_gated(live, acme)
    client, _token = signed_in(live, acme)
    with closing(client), client.stream("GET", "/dashboard/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        data = next(line for line in lines if line.startswith("data:"))
    state = json.loads(data.removeprefix("data:").strip())
    # "changed" (the drafts' latest edit) lets the page redraw a card edited in place.
    assert (state["count"], state["newest"]) == (1, message_id) and "changed" in state


def SYSTEM_OF(tenant: Tenant) -> Actor:
    return Actor(type="system", id=None, name=SYSTEM.name, account_id=tenant.account_id)


# --- the controls added for operators: mailbox settings, kill switches, allowlist, webhooks,
# --- batch decisions, the default domain's DKIM record, the sandbox ---------------------------


def _row(services: Services, table: Any, row_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        found = conn.execute(select(table).where(table.c.id == row_id)).mappings().one()
    return dict(found)


def test_mailbox_settings_form_changes_only_what_differs(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """Every setting is editable; the audit entry names the operator and lists only the fields
    that changed; posting the same values again changes nothing and audits nothing."""
    client, token = signed_in(live, acme)
    box = acme.mailbox["id"]
    form = {
        "csrf_token": token,
        "display_name": "Acme Support",
        "signature": "-- \r\nAcme Support\r\nacme.example",
        "auto_cc": "Boss@Example.com, ",
        "auto_bcc": "archive@example.com",
        "gate_timing": "schedule_first",
        "approval_timeout_hours": "2",
        "approval_expiry_hours": "48.5",
        "send_cap_hour": "10",
        "send_cap_day": "",
        "webhook_url": "https://hooks.example.test/acme",
        "ai_disclosure": "off",
    }
    with closing(client):
        page = client.get(f"/dashboard/mailboxes/{box}")
        assert page.status_code == 200 and 'action="/dashboard/mailboxes/' in page.text
        saved = client.post(f"/dashboard/mailboxes/{box}/settings", data=form)
        assert saved.status_code == 303
        assert "Settings saved" in client.get(saved.headers["location"]).text
        again = client.post(f"/dashboard/mailboxes/{box}/settings", data=form)
        assert again.headers["location"].endswith("?ok=unchanged")
    row = _row(svc, mailboxes_table, box)
    assert row["display_name"] == "Acme Support"
    assert row["signature"] == "-- \nAcme Support\nacme.example"
    assert row["auto_cc"] == ["boss@example.com"] and row["auto_bcc"] == ["archive@example.com"]
    assert row["gate_timing"] == "schedule_first"
    assert (row["approval_timeout_seconds"], row["approval_expiry_seconds"]) == (7200, 174600)
    assert (row["send_cap_hour"], row["send_cap_day"]) == (10, None)
    assert row["webhook_url"] == "https://hooks.example.test/acme"
    assert row["ai_disclosure"] is False
    updates = _actions(svc, "mailbox.updated")
    assert len(updates) == 1
    assert updates[0]["actor_name"] == acme.email
    assert "send_cap_day" not in updates[0]["details"]["changes"]


def test_mailbox_settings_form_refuses_bad_values(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """A cap that is not a number, or an address that is not one, is a 422 and saves nothing."""
    client, token = signed_in(live, acme)
    box = acme.mailbox["id"]
    with closing(client):
        cap = client.post(
            f"/dashboard/mailboxes/{box}/settings",
            data={"csrf_token": token, "send_cap_day": "lots", "display_name": "X"},
        )
        cc = client.post(
            f"/dashboard/mailboxes/{box}/settings",
            data={"csrf_token": token, "auto_cc": "not an address", "display_name": "X"},
        )
    assert cap.status_code == 422 and "whole number" in cap.text
    assert cc.status_code == 422
    assert _row(svc, mailboxes_table, box)["display_name"] is None
    assert _actions(svc, "mailbox.updated") == []


def test_kill_switches_pause_and_resume_the_mailbox_and_the_account(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """The mailbox and the account switch each way, audited with the operator as actor."""
    client, token = signed_in(live, acme)
    box = acme.mailbox["id"]
    with closing(client):
        paused = client.post(
            f"/dashboard/mailboxes/{box}/pause",
            data={"csrf_token": token, "paused": "yes", "back": "mailbox"},
        )
        assert paused.headers["location"] == f"/dashboard/mailboxes/{box}?ok=paused"
        assert "Resume sending" in client.get(paused.headers["location"]).text
        assert _row(svc, mailboxes_table, box)["paused"] is True
        client.post(f"/dashboard/mailboxes/{box}/pause", data={"csrf_token": token})
        assert _row(svc, mailboxes_table, box)["paused"] is False

        stopped = client.post(
            "/dashboard/account/pause", data={"csrf_token": token, "paused": "yes"}
        )
        assert stopped.status_code == 303
        assert "All sending is paused" in client.get(stopped.headers["location"]).text
        assert _row(svc, accounts_table, acme.account_id)["paused"] is True
        client.post("/dashboard/account/pause", data={"csrf_token": token, "paused": "no"})
        assert _row(svc, accounts_table, acme.account_id)["paused"] is False
    for action in ("mailbox.paused", "mailbox.resumed", "account.paused", "account.resumed"):
        entries = _actions(svc, action)
        assert [e["actor_name"] for e in entries] == [acme.email], action


def test_operator_adds_and_removes_allowlist_entries_directly(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """The operator adds without an approval code (audited under their name) and removes."""
    client, token = signed_in(live, acme)
    box = acme.mailbox["id"]
    with closing(client):
        added = client.post(
            f"/dashboard/mailboxes/{box}/allowlist",
            data={"csrf_token": token, "pattern": "*@Partner.example"},
        )
        assert added.status_code == 303
        page = client.get(f"/dashboard/mailboxes/{box}").text
        assert "*@partner.example" in page
        entry = re.search(r"/allowlist/(alw_[A-Za-z0-9_]+)/remove", page)
        assert entry
        twice = client.post(
            f"/dashboard/mailboxes/{box}/allowlist",
            data={"csrf_token": token, "pattern": "*@partner.example"},
        )
        assert twice.status_code == 409
        removed = client.post(
            f"/dashboard/mailboxes/{box}/allowlist/{entry.group(1)}/remove",
            data={"csrf_token": token},
        )
        assert removed.status_code == 303
        assert "*@partner.example" not in client.get(f"/dashboard/mailboxes/{box}").text
    assert [e["actor_name"] for e in _actions(svc, "allowlist.added")] == [acme.email]
    assert [e["actor_name"] for e in _actions(svc, "allowlist.removed")] == [acme.email]
    assert _actions(svc, "approval_code.issued") == []


def _create_webhook(client: httpx.Client, token: str) -> tuple[str, str]:
    created = client.post(
        "/dashboard/webhooks",
        data={"csrf_token": token, "url": "https://hooks.example.test/in", "events": "*"},
    )
    assert created.status_code == 200, created.text
    secret = re.search(r'id="new-secret">(whsec_[^<]+)<', created.text)
    hook = re.search(r'href="/dashboard/webhooks/(whk_[^"]+)"', created.text)
    assert secret and hook
    return hook.group(1), secret.group(1)


def test_webhook_secret_rotation_enable_and_delete(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """Create shows the secret once; rotate shows a new one once and keeps the old one signing
    for a while; a disabled webhook is enabled again; delete removes it; all audited."""
    client, token = signed_in(live, acme)
    with closing(client):
        hook, first = _create_webhook(client, token)
        assert first not in client.get("/dashboard/webhooks").text
        rotated = client.post(f"/dashboard/webhooks/{hook}/rotate", data={"csrf_token": token})
        assert rotated.status_code == 200
        second = re.search(r'id="new-secret">(whsec_[^<]+)<', rotated.text)
        assert second and second.group(1) != first
        assert second.group(1) not in client.get(f"/dashboard/webhooks/{hook}").text
        row = _row(svc, webhooks_table, hook)
        assert (row["secret"], row["previous_secret"]) == (second.group(1), first)

        with svc.db.write() as conn:
            conn.execute(
                update(webhooks_table)
                .where(webhooks_table.c.id == hook)
                .values(enabled=False, disabled_reason="the endpoint answered 410 Gone")
            )
        page = client.get(f"/dashboard/webhooks/{hook}").text
        assert "410 Gone" in page and 'data-action="enable"' in page
        enabled = client.post(f"/dashboard/webhooks/{hook}/enable", data={"csrf_token": token})
        assert enabled.status_code == 303
        assert _row(svc, webhooks_table, hook)["enabled"] is True

        deleted = client.post(f"/dashboard/webhooks/{hook}/delete", data={"csrf_token": token})
        assert deleted.headers["location"] == "/dashboard/webhooks?ok=deleted"
        assert client.get(f"/dashboard/webhooks/{hook}").status_code == 404
    for action in (
        "webhook.created",
        "webhook.secret_rotated",
        "webhook.enabled",
        "webhook.deleted",
    ):
        assert [e["actor_name"] for e in _actions(svc, action)] == [acme.email], action


def test_batch_decisions_on_the_queue(
    live: LiveServer, acme: Tenant, svc: Services, relay: CapturingSMTPServer
) -> None:
    """Ticked drafts are approved or rejected together; a reject needs a note; another
    account's message in the batch is reported as not found and left alone."""
    globex = Tenant(svc, "Globex", "ops@globex.test")
    first, second, third = (send_gated(live, acme, subject=f"Draft {n}") for n in range(3))
    foreign = send_gated(live, globex, subject="Globex draft")
    client, token = signed_in(live, acme)
    with closing(client):
        queue = client.get("/dashboard/queue").text
        assert 'form="batch"' in queue and 'action="/dashboard/queue/batch"' in queue
        assert f'action="/dashboard/messages/{first}/cancel"' in queue
        approved = client.post(
            "/dashboard/queue/batch",
            data={"csrf_token": token, "op": "approve", "ids": [first, second, foreign]},
        )
        assert approved.status_code == 200
        assert "Approved 2 of 3" in approved.text
        assert "not found" in approved.text
        no_note = client.post(
            "/dashboard/queue/batch", data={"csrf_token": token, "op": "reject", "ids": [third]}
        )
        assert no_note.status_code == 422
        rejected = client.post(
            "/dashboard/queue/batch",
            data={"csrf_token": token, "op": "reject", "ids": [third], "note": "Not now."},
        )
        assert "Rejected 1 of 1" in rejected.text
    assert _status(svc, first)["reviewer"] == acme.email
    assert _status(svc, third)["status"] == "rejected"
    assert _status(svc, third)["decision_note"] == "Not now."
    assert _status(svc, foreign)["status"] == "pending_send_approval"
    relay.wait_for(2, timeout=10)


def test_domains_page_shows_the_default_domains_dkim_record(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """The server's own domain is listed with the DKIM TXT record to publish."""
    name, value = default_dkim_record(svc)
    client, _token = signed_in(live, acme)
    with closing(client):
        page = client.get("/dashboard/domains").text
    assert f'id="default-dkim-name">{name}<' in page
    assert f'id="default-dkim-value">{value}<' in page
    assert name.endswith("._domainkey.mm.test") and "p=" in value


def test_sandbox_lists_messages_sent_with_a_test_key(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """A message sent with a test key (made in the dashboard) is in the sandbox; live ones
    are not."""
    live_id = send_gated(live, acme, subject="Live draft")
    client, token = signed_in(live, acme)
    with closing(client):
        created = client.post(
            "/dashboard/keys",
            data={"csrf_token": token, "name": "tester", "scope_send": "on", "mode": "test"},
        )
        key = re.search(r'id="new-key">(mm_test_[^<]+)<', created.text)
        assert key
        with httpx.Client(base_url=live.base_url, timeout=30) as agent:
            sent = agent.post(
                f"/v1/mailboxes/{acme.mailbox['id']}/send",
                headers={"Authorization": f"Bearer {key.group(1)}"},
                json={"to": ["jane@example.com"], "subject": "Sandbox draft", "markdown": "Hi"},
            )
        assert sent.status_code in (200, 201, 202), sent.text
        page = client.get("/dashboard/sandbox").text
    assert f"/dashboard/messages/{sent.json()['id']}" in page and "Sandbox draft" in page
    assert live_id not in page and "Live draft" not in page


def test_new_forms_refuse_csrf_less_posts_and_other_accounts(
    live: LiveServer, acme: Tenant, svc: Services
) -> None:
    """Each new form is 403 without its CSRF token, and 404 for another account's operator;
    neither changes anything."""
    box = acme.mailbox["id"]
    message_id = send_gated(live, acme)
    owner, owner_token = signed_in(live, acme)
    with closing(owner):
        hook, _secret = _create_webhook(owner, owner_token)
        owner.post(
            f"/dashboard/mailboxes/{box}/allowlist",
            data={"csrf_token": owner_token, "pattern": "kept@example.com"},
        )
        entry = re.search(
            r"/allowlist/(alw_[A-Za-z0-9_]+)/remove", owner.get(f"/dashboard/mailboxes/{box}").text
        )
        assert entry
        forms = {
            f"/dashboard/mailboxes/{box}/settings": {"display_name": "Hijacked"},
            f"/dashboard/mailboxes/{box}/pause": {"paused": "yes"},
            f"/dashboard/mailboxes/{box}/allowlist": {"pattern": "evil@example.com"},
            f"/dashboard/mailboxes/{box}/allowlist/{entry.group(1)}/remove": {},
            f"/dashboard/webhooks/{hook}/rotate": {},
            f"/dashboard/webhooks/{hook}/enable": {},
            f"/dashboard/webhooks/{hook}/delete": {},
        }
        for path, data in forms.items():
            assert owner.post(path, data=data).status_code == 403, path
        assert owner.post("/dashboard/account/pause", data={"paused": "yes"}).status_code == 403
        batch = {"op": "approve", "ids": [message_id]}
        assert owner.post("/dashboard/queue/batch", data=batch).status_code == 403
        assert owner.get(f"/dashboard/mailboxes/{box}").status_code == 200
    before = (_row(svc, mailboxes_table, box), _row(svc, webhooks_table, hook))

    globex = Tenant(svc, "Globex", "ops@globex.test")
    other, other_token = signed_in(live, globex)
    with closing(other):
        assert other.get(f"/dashboard/mailboxes/{box}").status_code == 404
        for path, data in forms.items():
            response = other.post(path, data={"csrf_token": other_token, **data})
            assert response.status_code == 404, path
        other.post("/dashboard/account/pause", data={"csrf_token": other_token, "paused": "yes"})
        other.post("/dashboard/queue/batch", data={"csrf_token": other_token, **batch})
    assert (_row(svc, mailboxes_table, box), _row(svc, webhooks_table, hook)) == before
    assert _row(svc, accounts_table, acme.account_id)["paused"] is False
    assert _row(svc, accounts_table, globex.account_id)["paused"] is True
    assert _status(svc, message_id)["status"] == "pending_send_approval"
    assert len(_actions(svc, "allowlist.added")) == 1
