"""The HTTP foundation against a live server: auth, scopes, envelopes, isolation, limits, audit."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts, audit
from multimail.services.context import Services
from multimail.store.tables import api_keys, audit_entries
from multimail.testing.server import LiveServer
from tests.conftest import Api


def assert_envelope(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert isinstance(body.get("code"), str) and body["code"]
    if code:
        assert body["code"] == code, body
    return body


def test_health_and_openapi_need_no_key(api: Api) -> None:
    """Liveness, readiness and the OpenAPI document are public."""
    anon = api.client(None)
    assert anon.get("/health").json() == {"status": "ok"}
    assert anon.get("/readyz").status_code == 200
    spec = anon.get("/openapi.json").json()
    assert "/v1/mailboxes" in spec["paths"]


def test_every_failure_uses_the_error_envelope(api: Api, boot: accounts.Bootstrap) -> None:
    """Unknown routes, bad methods, bad JSON and bad fields all answer {error, code}."""
    admin = api.client(boot.admin_key)
    assert_envelope(admin.get("/v1/nothing-here"), 404, "not_found")
    assert_envelope(admin.put("/v1/mailboxes"), 405, "method_not_allowed")
    bad_json = admin.post(
        "/v1/contacts", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_envelope(bad_json, 400, "malformed_json")
    wrong_type = admin.post("/v1/contacts", json={"email": 42})
    body = assert_envelope(wrong_type, 422, "validation_error")
    assert "email" in body["error"]
    unknown = admin.post("/v1/mailboxes", json={"address": "a@mm.test", "oversight": "x"})
    assert_envelope(unknown, 422, "validation_error")


def test_missing_bad_and_revoked_keys_are_refused(api: Api, boot: accounts.Bootstrap) -> None:
    """401 without a key, with a wrong key, and on the very next request after revocation."""
    assert_envelope(api.client(None).get("/v1/mailboxes"), 401, "missing_api_key")
    assert_envelope(api.client("mm_live_" + "x" * 43).get("/v1/mailboxes"), 401, "invalid_api_key")
    assert_envelope(api.client("Basic abc").get("/v1/mailboxes"), 401)
    admin = api.client(boot.admin_key)
    created = admin.post("/v1/api-keys", json={"name": "temp", "scopes": ["read"]}).json()
    temp = api.client(created["key"])
    assert temp.get("/v1/mailboxes").status_code == 200
    assert admin.delete(f"/v1/api-keys/{created['id']}").json()["revoked"] is True
    assert_envelope(temp.get("/v1/mailboxes"), 401, "api_key_revoked")
    via_header = httpx.get(f"{api.base_url}/v1/mailboxes", headers={"X-API-Key": boot.agent_key})
    assert via_header.status_code == 200


def test_keys_are_shown_once_and_stored_only_as_hashes(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """The raw key appears in the create response only; the database has its SHA-256."""
    admin = api.client(boot.admin_key)
    created = admin.post("/v1/api-keys", json={"name": "ci", "scopes": ["send", "read"]}).json()
    raw = created["key"]
    assert raw.startswith("mm_live_") and len(raw) >= len("mm_live_") + 32
    listed = admin.get("/v1/api-keys").json()["api_keys"]
    assert all(raw not in str(k) for k in listed)
    assert all("key_hash" not in k for k in listed)
    with services.db.read() as conn:
        rows = conn.execute(select(api_keys)).mappings().all()
    dump = repr([dict(r) for r in rows])
    for secret in (raw, boot.admin_key, boot.agent_key, boot.reviewer_key):
        assert secret not in dump
    test_key = admin.post(
        "/v1/api-keys", json={"name": "sandbox", "scopes": ["send"], "mode": "test"}
    ).json()
    assert test_key["key"].startswith("mm_test_") and test_key["test"] is True


def test_send_plus_oversight_key_is_refused_with_a_reason(
    api: Api, boot: accounts.Bootstrap
) -> None:
    """Separation of duties: one key can never both write and approve."""
    admin = api.client(boot.admin_key)
    body = assert_envelope(
        admin.post("/v1/api-keys", json={"name": "bad", "scopes": ["send", "oversight"]}),
        422,
        "separation_of_duties",
    )
    assert "send" in body["error"] and "oversight" in body["error"]
    assert_envelope(
        admin.post("/v1/api-keys", json={"name": "bad", "scopes": ["superuser"]}),
        422,
        "invalid_scope",
    )
    assert len(admin.get("/v1/api-keys").json()["api_keys"]) == 3


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("post", "/v1/mailboxes", {"address": "x@mm.test"}),
        ("post", "/v1/api-keys", {"name": "n", "scopes": ["read"]}),
        ("get", "/v1/api-keys", None),
        ("post", "/v1/domains", {"name": "example.org"}),
        ("patch", "/v1/account", {"name": "x"}),
        ("get", "/v1/audit-log/verify", None),
    ],
)
def test_admin_routes_refuse_agent_and_reviewer_keys(
    api: Api, boot: accounts.Bootstrap, method: str, path: str, payload: Any
) -> None:
    """Each admin route answers 403 insufficient_scope to send- and oversight-scoped keys."""
    for key in (boot.agent_key, boot.reviewer_key):
        client = api.client(key)
        response = client.request(method.upper(), path, json=payload)
        body = assert_envelope(response, 403, "insufficient_scope")
        assert "admin" in body["error"]


def test_mailbox_lifecycle_by_id_and_by_address(api: Api, boot: accounts.Bootstrap) -> None:
    """Create, list, get (id or address), update, configure, delete."""
    admin = api.client(boot.admin_key)
    created = admin.post(
        "/v1/mailboxes",
        json={
            "address": "Support@MM.test",
            "display_name": "Support",
            "oversight_mode": "gated_all",
        },
    )
    assert created.status_code == 201, created.text
    box = created.json()
    assert box["id"] == box["mailbox_id"] and box["id"].startswith("mbx_")
    assert box["address"] == "support@mm.test" and box["oversight_mode"] == "gated_all"
    assert admin.get("/v1/mailboxes").json()["mailboxes"][0]["id"] == box["id"]
    assert admin.get("/v1/mailboxes/support@mm.test").json()["id"] == box["id"]
    assert api.client(boot.agent_key).get(f"/v1/mailboxes/{box['id']}").status_code == 200
    patched = admin.patch(f"/v1/mailboxes/{box['id']}", json={"display_name": "Help"}).json()
    assert patched["display_name"] == "Help"
    configured = admin.patch(
        "/v1/mailboxes/support@mm.test/configure",
        json={"auto_bcc": ["Archive@mm.test"], "gate_timing": "schedule_first"},
    ).json()
    assert configured["auto_bcc"] == ["archive@mm.test"]
    assert configured["gate_timing"] == "schedule_first"
    local = admin.post("/v1/mailboxes", json={"address_local_part": "billing"}).json()
    assert local["address"] == "billing@mm.test"
    assert admin.delete(f"/v1/mailboxes/{box['id']}").json()["deleted"] is True
    assert_envelope(admin.get(f"/v1/mailboxes/{box['id']}"), 404, "mailbox_not_found")
    again = admin.post("/v1/mailboxes", json={"address": "support@mm.test"})
    assert again.status_code == 201, "a deleted mailbox's address can be reused"


def test_mailbox_bad_input_leaves_nothing_behind(api: Api, boot: accounts.Bootstrap) -> None:
    """Bad address, foreign domain, duplicate, bad mode: 4xx with a code, nothing created."""
    admin = api.client(boot.admin_key)
    assert_envelope(
        admin.post("/v1/mailboxes", json={"address": "not an address"}), 422, "invalid_address"
    )
    body = assert_envelope(
        admin.post("/v1/mailboxes", json={"address": "ceo@bank.example"}), 422, "domain_not_owned"
    )
    assert "POST /v1/domains" in body["error"]
    assert_envelope(
        admin.post("/v1/mailboxes", json={"address": "a@mm.test", "oversight_mode": "yolo"}),
        422,
        "invalid_oversight_mode",
    )
    assert_envelope(admin.post("/v1/mailboxes", json={}), 422, "missing_address")
    assert admin.post("/v1/mailboxes", json={"address": "dup@mm.test"}).status_code == 201
    assert_envelope(
        admin.post("/v1/mailboxes", json={"address": "DUP@mm.test"}), 409, "address_taken"
    )
    assert [m["address"] for m in admin.get("/v1/mailboxes").json()["mailboxes"]] == ["dup@mm.test"]


def _mailed_code(services: Services) -> str:
    """The newest approval code mailed to the operator (read from the queued system mail)."""
    import re

    from multimail.store.tables import jobs

    with services.db.read() as conn:
        payloads = [
            r.payload
            for r in conn.execute(
                select(jobs.c.payload).where(jobs.c.kind == "system_mail").order_by(jobs.c.id)
            )
        ]
    codes = [
        m.group(1)
        for p in payloads
        for m in [re.search(r"\*\*([A-Z0-9]{6,})\*\*", p["markdown"])]
        if m
    ]
    assert codes, payloads
    return codes[-1]


def test_the_operators_own_admin_key_acts_directly(api: Api, boot: accounts.Bootstrap) -> None:
    """The admin key printed on first start is the operator's: mailboxes at any mode, no code."""
    admin = api.client(boot.admin_key)
    box = admin.post(
        "/v1/mailboxes", json={"address": "ops-bot@mm.test", "oversight_mode": "autonomous"}
    )
    assert box.status_code == 201 and box.json()["oversight_mode"] == "autonomous"
    loosened = admin.patch(
        "/v1/mailboxes/ops-bot@mm.test", json={"oversight_mode": "read_only"}
    ).json()
    assert loosened["oversight_mode"] == "read_only"
    assert (
        admin.patch("/v1/mailboxes/ops-bot@mm.test", json={"oversight_mode": "monitored"}).json()[
            "oversight_mode"
        ]
        == "monitored"
    )


def test_api_minted_admin_keys_need_the_operators_code_and_cannot_loosen(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """An admin key minted through the API gets 202 approval_required, completes with the
    mailed code; creation clamps loose modes; tightening is immediate, loosening is not."""
    minted = (
        api.client(boot.admin_key)
        .post("/v1/api-keys", json={"name": "integration", "scopes": ["admin", "read"]})
        .json()
    )
    assert minted["operator_credential"] is False
    admin = api.client(minted["key"])
    request = {"address": "bot@mm.test", "oversight_mode": "autonomous"}
    first = admin.post("/v1/mailboxes", json=request)
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "approval_required"
    assert first.json()["code"] == "approval_required"
    assert admin.get("/v1/mailboxes").json()["mailboxes"] == []
    code = _mailed_code(services)
    wrong = admin.post("/v1/mailboxes", json=request | {"approval_code": "WRONG000"})
    assert_envelope(wrong, 403, "invalid_approval_code")
    done = admin.post("/v1/mailboxes", json=request | {"approval_code": code})
    assert done.status_code == 201, done.text
    box = done.json()
    assert box["oversight_mode"] == "gated_send"
    assert box["requested_oversight_mode"] == "autonomous"
    tightened = admin.patch(f"/v1/mailboxes/{box['id']}", json={"oversight_mode": "read_only"})
    assert tightened.json()["oversight_mode"] == "read_only"
    body = assert_envelope(
        admin.patch(f"/v1/mailboxes/{box['id']}", json={"oversight_mode": "monitored"}),
        403,
        "upgrade_requires_approval",
    )
    assert "request-upgrade" in body["error"]
    reused = admin.post("/v1/mailboxes", json=request | {"approval_code": code})
    assert reused.status_code == 403


def test_contacts_and_suppressions(api: Api, boot: accounts.Bootstrap, services: Services) -> None:
    """Contacts: create, search, delete; suppressions: list, check, delete."""
    agent = api.client(boot.agent_key)
    contact = agent.post(
        "/v1/contacts", json={"email": "Jane@Customer.example", "name": "Jane Doe", "tags": ["vip"]}
    )
    assert contact.status_code == 201
    assert_envelope(
        agent.post("/v1/contacts", json={"email": "jane@customer.example"}), 409, "contact_exists"
    )
    assert_envelope(agent.post("/v1/contacts", json={"email": "nope"}), 422, "invalid_address")
    found = agent.get("/v1/contacts", params={"q": "jane"}).json()["contacts"]
    assert [c["email"] for c in found] == ["jane@customer.example"]
    assert agent.get("/v1/contacts", params={"q": "zzz"}).json()["contacts"] == []
    from multimail.services import directory
    from multimail.services.context import SYSTEM

    with services.db.write() as conn:
        directory.suppress(
            conn,
            actor=SYSTEM,
            account_id=boot.account["id"],
            address="gone@customer.example",
            reason="hard_bounce",
        )
    listed = agent.get("/v1/suppression").json()["suppressions"]
    assert [s["address"] for s in listed] == ["gone@customer.example"]
    check = agent.get("/v1/suppression", params={"address": "gone@customer.example"}).json()
    assert check["suppressed"] is True
    assert_envelope(agent.delete("/v1/suppression/gone@customer.example"), 403)
    admin = api.client(boot.admin_key)
    assert admin.delete("/v1/suppression/gone@customer.example").json()["removed"] is True
    assert agent.get("/v1/suppression").json()["suppressions"] == []
    assert agent.delete(f"/v1/contacts/{contact.json()['id']}").json()["deleted"] is True


def _second_account(services: Services) -> accounts.Bootstrap:
    return accounts.bootstrap(services.db, account_name="Other", operator_email="ops@other.test")


def test_another_accounts_objects_are_not_found(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Account B's keys get 404 (never 403) on every object of account A, and change nothing."""
    a_admin = api.client(boot.admin_key)
    box = a_admin.post("/v1/mailboxes", json={"address": "a-box@mm.test"}).json()
    contact = a_admin.post("/v1/contacts", json={"email": "c@x.example"}).json()
    key = a_admin.post("/v1/api-keys", json={"name": "k", "scopes": ["read"]}).json()
    domain = a_admin.post("/v1/domains", json={"name": "a-corp.example"}).json()
    other = _second_account(services)
    for raw in (other.admin_key, other.agent_key):
        b = api.client(raw)
        for method, path in [
            ("GET", f"/v1/mailboxes/{box['id']}"),
            ("GET", "/v1/mailboxes/a-box@mm.test"),
            ("PATCH", f"/v1/mailboxes/{box['id']}"),
            ("PATCH", f"/v1/mailboxes/{box['id']}/configure"),
            ("DELETE", f"/v1/mailboxes/{box['id']}"),
            ("DELETE", f"/v1/contacts/{contact['id']}"),
            ("DELETE", f"/v1/api-keys/{key['id']}"),
            ("GET", f"/v1/domains/{domain['id']}"),
            ("POST", f"/v1/domains/{domain['id']}/verify"),
            ("DELETE", f"/v1/domains/{domain['id']}"),
        ]:
            payload = {"display_name": "stolen"} if method == "PATCH" else None
            response = b.request(method, path, json=payload)
            if response.status_code == 403:
                assert response.json()["code"] == "insufficient_scope"
                continue
            assert_envelope(response, 404)
        assert b.get("/v1/mailboxes").json()["mailboxes"] == []
        assert b.get("/v1/contacts").json()["contacts"] == []
    assert a_admin.get(f"/v1/mailboxes/{box['id']}").json()["display_name"] is None
    assert a_admin.get("/v1/contacts").json()["contacts"][0]["id"] == contact["id"]


def test_every_state_change_writes_an_audit_entry_and_the_chain_verifies(
    api: Api, boot: accounts.Bootstrap
) -> None:
    """Creates, updates and deletes each append one chained entry."""
    admin = api.client(boot.admin_key)
    before = admin.get("/v1/audit-log", params={"limit": 1000}).json()["entries"]
    box = admin.post("/v1/mailboxes", json={"address": "audit@mm.test"}).json()
    admin.patch(f"/v1/mailboxes/{box['id']}", json={"display_name": "Audited"})
    admin.post("/v1/contacts", json={"email": "who@x.example"})
    admin.patch("/v1/account", json={"postal_address": "1 Main St"})
    after = admin.get("/v1/audit-log", params={"limit": 1000}).json()["entries"]
    actions = [e["action"] for e in after[: len(after) - len(before)]]
    assert actions == ["account.updated", "contact.created", "mailbox.updated", "mailbox.created"]
    newest = after[0]
    assert newest["actor_type"] == "key" and newest["actor_name"] == "admin"
    verdict = admin.get("/v1/audit-log/verify").json()
    assert verdict["intact"] is True and verdict["entries_checked"] >= len(after)
    page = admin.get("/v1/audit-log", params={"limit": 2}).json()
    assert len(page["entries"]) == 2 and page["next_cursor"]
    page2 = admin.get("/v1/audit-log", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert page2["entries"][0]["seq"] < page["entries"][-1]["seq"]


def test_audit_rows_cannot_be_updated_and_tampering_is_located(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """The database refuses UPDATE; with the trigger dropped, verify names the changed entry."""
    admin = api.client(boot.admin_key)
    admin.post("/v1/contacts", json={"email": "t@x.example"})
    target = 3
    with pytest.raises(Exception, match="append-only"), services.db.write() as conn:
        conn.execute(audit_entries.update().where(audit_entries.c.seq == target).values(action="x"))
    with services.db.write() as conn:
        if services.db.dialect == "postgresql":
            conn.execute(
                text("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only")
            )
        else:
            conn.execute(text("DROP TRIGGER audit_entries_no_update"))
        conn.execute(
            audit_entries.update()
            .where(audit_entries.c.seq == target)
            .values(actor_name="someone else")
        )
    verdict = admin.get("/v1/audit-log/verify").json()
    assert verdict["intact"] is False
    assert verdict["first_broken_seq"] == target
    assert audit.verify(services.db).first_break.seq == target  # type: ignore[union-attr]


def test_rate_limit_answers_429_with_headers(settings: Settings, boot: accounts.Bootstrap) -> None:
    """Past the bucket, 429 with Retry-After and RateLimit-* headers; other keys unaffected."""
    tight = settings.model_copy(update={"rate_limit_per_minute": 60, "rate_limit_burst": 5})
    svc = build_services(tight)
    with LiveServer(svc) as server:
        client = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {boot.agent_key}"}
        )
        codes = [client.get("/v1/mailboxes") for _ in range(8)]
        ok = [r for r in codes if r.status_code == 200]
        limited = [r for r in codes if r.status_code == 429]
        assert len(ok) == 5 and limited
        assert ok[0].headers["RateLimit-Limit"] == "5"
        blocked = limited[0]
        assert int(blocked.headers["Retry-After"]) >= 1
        assert blocked.headers["RateLimit-Remaining"] == "0"
        assert_envelope(blocked, 429, "rate_limited")
        other = httpx.get(
            f"{server.base_url}/v1/mailboxes",
            headers={"Authorization": f"Bearer {boot.reviewer_key}"},
        )
        assert other.status_code == 200
        client.close()
    svc.db.dispose()


def test_oversized_requests_are_refused_before_reading(
    settings: Settings, boot: accounts.Bootstrap
) -> None:
    """A body over the limit gets 413 payload_too_large and creates nothing."""
    small = settings.model_copy(update={"max_request_bytes": 2048})
    svc = build_services(small)
    with LiveServer(svc) as server:
        headers = {"Authorization": f"Bearer {boot.agent_key}"}
        big = {"email": "big@x.example", "notes": "x" * 5000}
        response = httpx.post(f"{server.base_url}/v1/contacts", json=big, headers=headers)
        assert_envelope(response, 413, "payload_too_large")

        def chunks() -> Any:
            for _ in range(10):
                yield b" " * 1024

        streamed = httpx.post(
            f"{server.base_url}/v1/contacts",
            content=chunks(),
            headers=headers | {"content-type": "application/json"},
        )
        assert_envelope(streamed, 413, "payload_too_large")
        listed = httpx.get(f"{server.base_url}/v1/contacts", headers=headers).json()
        assert listed["contacts"] == []
    svc.db.dispose()


def test_account_endpoints(api: Api, boot: accounts.Bootstrap) -> None:
    """GET shows status and quota; PATCH validates; only admin can change."""
    agent = api.client(boot.agent_key)
    account = agent.get("/v1/account").json()
    assert account["id"] == boot.account["id"] and account["sending_enabled"] is True
    assert "quota" in account
    admin = api.client(boot.admin_key)
    assert_envelope(
        admin.patch("/v1/account", json={"oversight_email": "nope"}), 422, "invalid_address"
    )
    assert (
        admin.patch("/v1/account", json={"oversight_email": "Boss@x.example"}).json()[
            "oversight_email"
        ]
        == "boss@x.example"
    )


def test_nul_characters_are_a_clear_422_and_store_nothing(
    api: Api, boot: accounts.Bootstrap
) -> None:
    """PostgreSQL text cannot hold NUL: a %00 in a query (schemathesis found GET /v1/emails
    answering 500 on PostgreSQL) or a \\u0000 in a JSON body is refused up front on both
    databases, while the same six characters as plain text are accepted."""
    agent = api.client(boot.agent_key)
    assert_envelope(agent.get("/v1/emails", params={"status": "un\x00read"}), 422, "nul_character")
    assert_envelope(agent.get("/v1/emails?q=%00"), 422, "nul_character")
    assert_envelope(
        agent.post("/v1/contacts", json={"email": "nul@x.example", "name": "a\x00b"}),
        422,
        "nul_character",
    )
    assert agent.get("/v1/contacts").json()["contacts"] == []
    literal = agent.post("/v1/contacts", json={"email": "lit@x.example", "name": "a\\u0000b"})
    assert literal.status_code in (200, 201), literal.text
    form = httpx.post(
        f"{api.base_url}/v1/contacts",
        content=b"email=f%00@x.example",
        headers={
            "Authorization": f"Bearer {boot.agent_key}",
            "content-type": "application/x-www-form-urlencoded",
        },
    )
    assert_envelope(form, 422, "nul_character")
