"""Review S8: the account-level REST surface, limits and the error contract (SPEC §5, §12)."""

from __future__ import annotations

from typing import Any

import httpx

from multimail.services import accounts
from tests.conftest import Api


def _box(admin: httpx.Client, local: str) -> dict[str, Any]:
    made = admin.post("/v1/mailboxes", json={"address_local_part": local})
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    return body


def _send(client: httpx.Client, box: dict[str, Any], subject: str = "Hello") -> httpx.Response:
    return client.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": "customer@example.com", "subject": subject, "markdown": "Hi there"},
    )


def test_export_returns_the_accounts_archive(api: Api, boot: accounts.Bootstrap) -> None:
    """GET /v1/export gives the account's messages, threads and audit as a download."""
    admin = api.client(boot.admin_key)
    box = _box(admin, "sales")
    sent = _send(api.client(boot.agent_key), box)
    assert sent.status_code == 202, sent.text
    exported = admin.get("/v1/export")
    assert exported.status_code == 200, (
        "SPEC §5.1 promises GET /v1/export (the account's data as a downloadable archive: "
        f"messages, threads, audit); got {exported.status_code} {exported.text[:200]}"
    )
    assert sent.json()["id"] in exported.text, "the export must hold the account's messages"


def test_keys_of_a_deleted_account_are_refused(api: Api, boot: accounts.Bootstrap) -> None:
    """After the operator deletes the account, its keys stop on the very next request."""
    admin = api.client(boot.admin_key)
    agent = api.client(boot.agent_key)
    box = _box(admin, "sales")
    deleted = admin.delete("/v1/account")
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted", deleted.text
    # 401 account_deleted, as on every other route (not 404): what stopped working is the key.
    gone = admin.get("/v1/account")
    assert (gone.status_code, gone.json()["code"]) == (401, "account_deleted"), gone.text
    assert "deleted" in gone.json()["error"]

    listed = agent.get("/v1/mailboxes")
    sent = _send(agent, box, "after deletion")
    assert (listed.status_code, sent.status_code) == (401, 401), (
        "a deleted account's keys must be refused like revoked keys (401), not keep reading "
        "its mail and queueing sends that will never be delivered; got "
        f"GET /v1/mailboxes {listed.status_code}, send {sent.status_code} {sent.text[:160]}"
    )


def test_api_minted_admin_key_cannot_delete_the_account_alone(
    api: Api, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """Deleting the account is at least as sensitive as creating a key: it needs the operator
    (202 approval_required, or a refusal), and the account stays active meanwhile."""
    response = api.client(minted_admin_key).delete("/v1/account")
    still = api.client(boot.admin_key).get("/v1/account")
    assert response.status_code != 200 and still.status_code == 200, (
        "an admin key minted through the API (not the operator's own credential) must not "
        "close the account without the operator's approval code; got "
        f"DELETE {response.status_code} {response.text[:160]}, then GET /v1/account "
        f"{still.status_code}"
    )


def test_contacts_paginate_with_a_cursor(api: Api, boot: accounts.Bootstrap) -> None:
    """limit=2 over three contacts gives a next_cursor, and that cursor gives the third."""
    admin = api.client(boot.admin_key)
    for i in range(3):
        made = admin.post("/v1/contacts", json={"email": f"c{i}@example.com"})
        assert made.status_code == 201, made.text
    first = admin.get("/v1/contacts", params={"limit": 2}).json()
    assert len(first["contacts"]) == 2
    cursor = first.get("next_cursor")
    assert cursor, f"a full page of contacts must carry a next_cursor; got keys {sorted(first)}"
    rest = admin.get("/v1/contacts", params={"limit": 2, "cursor": cursor}).json()
    seen = {c["email"] for c in first["contacts"]} | {c["email"] for c in rest["contacts"]}
    assert len(rest["contacts"]) == 1 and len(seen) == 3, rest


def test_account_quota_view_matches_the_enforced_quota(api: Api, boot: accounts.Bootstrap) -> None:
    """Test-mode sends do not use the daily quota, so they must not lower remaining_today."""
    admin = api.client(boot.admin_key)
    box = _box(admin, "sales")
    made = admin.post(
        "/v1/api-keys", json={"name": "sandbox", "scopes": ["send", "read"], "mode": "test"}
    )
    assert made.status_code == 201, made.text
    sandbox = api.client(made.json()["key"])
    assert admin.patch("/v1/account", json={"daily_send_quota": 1}).status_code == 200
    assert _send(sandbox, box, "sandbox").status_code == 202

    quota = admin.get("/v1/account").json()["quota"]
    live = _send(api.client(boot.agent_key), box, "live")
    assert live.status_code == 202, live.text  # the enforced quota ignores test mail
    assert quota["remaining_today"] == 1, (
        "the quota view must agree with the quota enforced at send time (test mail is not "
        f"counted): the live send was accepted but GET /v1/account said {quota}"
    )


def test_a_garbage_cursor_is_a_clear_4xx(api: Api, boot: accounts.Bootstrap) -> None:
    """A cursor we never issued is bad input (SPEC §12: a clear error), not the end of the list."""
    admin = api.client(boot.admin_key)
    box = _box(admin, "sales")
    agent = api.client(boot.agent_key)
    assert _send(agent, box).status_code == 202
    listed = agent.get(f"/v1/mailboxes/{box['id']}/emails")
    assert listed.status_code == 200 and listed.json()["emails"], listed.text
    garbage = agent.get(f"/v1/mailboxes/{box['id']}/emails", params={"cursor": "not-a-cursor"})
    body = garbage.json()
    assert garbage.status_code in (400, 422) and body.get("code"), (
        "a cursor that no list ever issued must be refused with a clear code, not answered "
        "as a page (here the list restarts from the newest); got "
        f"{garbage.status_code} {garbage.text[:200]}"
    )
