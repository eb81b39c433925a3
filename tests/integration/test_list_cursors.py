"""Keyset cursors on every list (SPEC §5): each list issues ``next_cursor``, takes it back as
``cursor``, and refuses a cursor it never issued with 422 ``invalid_cursor``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from multimail.errors import InvalidInput
from multimail.ids import id_cursor, is_id, new_id, seq_cursor
from multimail.services import accounts, directory
from multimail.services.context import SYSTEM, Services
from tests.conftest import Api


def _walk(client: httpx.Client, path: str, key: str, **params: Any) -> list[list[str]]:
    """Every page's ids, following next_cursor until it runs out."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        response = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([item["id"] for item in body[key]])
        cursor = body["next_cursor"]
        if not cursor:
            return pages
        assert cursor == pages[-1][-1], "the cursor is the last id of the page"


# --- the helper ------------------------------------------------------------------------------


def test_ids_and_cursors_have_one_shape() -> None:
    made = new_id("msg")
    assert is_id(made, "msg") and id_cursor(made, "msg") == made
    assert not is_id(made, "con"), "an id of another kind is not this list's cursor"
    assert id_cursor(None, "msg") is None and id_cursor("", "msg") is None
    for bad in (
        "not-a-cursor",
        "msg_",
        made.upper(),
        made + "0",
        made[:-1],
        "msg_" + "i" * 26,  # not Crockford
        "msg_8" + "0" * 25,  # beyond 128 bits
        made.replace("msg_", "msg-"),
    ):
        with pytest.raises(InvalidInput) as caught:
            id_cursor(bad, "msg")
        assert caught.value.code == "invalid_cursor"
    assert seq_cursor("42") == 42 and seq_cursor(None) is None
    for bad in ("-1", "4.2", "²", "١٢", "99999999999999999999", " 42"):
        with pytest.raises(InvalidInput):
            seq_cursor(bad)


# --- paging ----------------------------------------------------------------------------------


def test_contacts_walk_by_cursor_and_offset_still_works(api: Api, boot: accounts.Bootstrap) -> None:
    admin = api.client(boot.admin_key)
    made = [
        admin.post("/v1/contacts", json={"email": f"c{i}@example.com", "tags": ["t"]}).json()["id"]
        for i in range(5)
    ]
    assert _walk(admin, "/v1/contacts", "contacts", limit=2) == [made[:2], made[2:4], made[4:]]
    # a filter keeps to the rows it matches, cursor or not
    assert _walk(admin, "/v1/contacts", "contacts", limit=2, q="c3") == [[made[3]]]
    assert _walk(admin, "/v1/contacts", "contacts", limit=2, tag="t")[1] == made[2:4]
    by_offset = admin.get("/v1/contacts", params={"limit": 2, "offset": 3}).json()
    assert [c["id"] for c in by_offset["contacts"]] == made[3:5]
    assert by_offset["next_cursor"] is None
    # the tool takes the cursor through to the same route
    tool = admin.post("/search_contacts", json={"limit": 2, "cursor": made[1]})
    assert tool.status_code == 200, tool.text
    assert [c["id"] for c in tool.json()["contacts"]] == made[2:4]


def test_suppressions_walk_by_cursor(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    account_id = boot.account["id"]
    with services.db.write() as conn:
        made = [
            directory.suppress(
                conn,
                actor=SYSTEM,
                account_id=account_id,
                address=f"s{i}@example.com",
                reason="manual",
            )["id"]
            for i in range(3)
        ]
    admin = api.client(boot.admin_key)
    assert _walk(admin, "/v1/suppression", "suppressions", limit=2) == [made[:2], made[2:]]
    one = admin.get("/v1/suppression", params={"limit": 1, "offset": 1}).json()
    assert [s["id"] for s in one["suppressions"]] == [made[1]] and one["next_cursor"] == made[1]


def test_api_keys_walk_by_cursor(api: Api, boot: accounts.Bootstrap) -> None:
    admin = api.client(boot.admin_key)
    for name in ("one", "two"):
        made = admin.post("/v1/api-keys", json={"name": name, "scopes": ["read"]})
        assert made.status_code == 201, made.text
    everything = admin.get("/v1/api-keys").json()
    assert everything["next_cursor"] is None
    ids = [k["id"] for k in everything["api_keys"]]
    assert len(ids) >= 5 and ids == sorted(ids)
    pages = _walk(admin, "/v1/api-keys", "api_keys", limit=2)
    assert [i for page in pages for i in page] == ids and all(len(p) <= 2 for p in pages)
    tool = admin.post("/list_api_keys", json={"limit": 1, "cursor": ids[0]})
    assert tool.status_code == 200, tool.text
    assert [k["id"] for k in tool.json()["api_keys"]] == [ids[1]]


# --- refusing cursors nobody issued ----------------------------------------------------------


def test_every_list_refuses_a_cursor_it_never_issued(api: Api, boot: accounts.Bootstrap) -> None:
    admin = api.client(boot.admin_key)
    box = admin.post("/v1/mailboxes", json={"address_local_part": "cursors"}).json()
    contact = admin.post("/v1/contacts", json={"email": "someone@example.com"}).json()["id"]
    lists = [
        (api.client(boot.agent_key), f"/v1/mailboxes/{box['id']}/emails"),
        (api.client(boot.agent_key), "/v1/emails"),
        (api.client(boot.reviewer_key), "/v1/pending"),
        (api.client(boot.reviewer_key), "/v1/oversight/pending"),
        (admin, "/v1/webhook-deliveries"),
        (admin, "/v1/contacts"),
        (admin, "/v1/suppression"),
        (admin, "/v1/api-keys"),
        (admin, "/v1/audit-log"),
    ]
    for client, path in lists:
        # garbage, a well-formed id of another kind (for the audit log, whose cursors are
        # numbers, a number's other spelling), and text that sorts past every id
        other = {"/v1/contacts": new_id("msg"), "/v1/audit-log": "1e5"}.get(path, contact)
        for cursor in ("not-a-cursor", other, "~"):
            response = client.get(path, params={"cursor": cursor})
            assert response.status_code == 422, (path, cursor, response.text)
            body = response.json()
            assert body["code"] == "invalid_cursor", (path, body)
            assert body["error"] == "cursor must be the next_cursor of a previous page"
    # audit cursors are sequence numbers: a number past BIGINT or a non-ASCII digit is no 500
    for cursor in ("99999999999999999999", "²"):
        response = admin.get("/v1/audit-log", params={"cursor": cursor})
        assert (response.status_code, response.json()["code"]) == (422, "invalid_cursor")
