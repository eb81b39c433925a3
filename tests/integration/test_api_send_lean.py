"""The send routes answer the same through their lean handler as through FastAPI's own.

``LeanRoute`` (api/lean.py) handles a send whose body is ``application/json`` itself; the same
body sent as ``application/json; charset=utf-8`` goes through FastAPI's resolver. Both are sent
here to the real app for each send route, and what comes back must agree: refusals byte for
byte (status, error body, headers), accepted sends in their status, headers and fields, an
idempotent replay across the two paths, and the audit entries a refusal writes.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from multimail.services import accounts, keys
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries
from tests.conftest import Api
from tests.integration.test_sending import insert_inbound, make_mailbox, rows

LEAN = "application/json"
FASTAPI = "application/json; charset=utf-8"
# Headers that differ between two consecutive answers whichever handler gave them.
_MOVING = {"date", "ratelimit-remaining", "ratelimit-reset", "content-length"}
# Fields of an accepted send that name the new message or the moment it was made.
_FRESH = {
    "id",
    "message_id",
    "email_id",
    "message_id_header",
    "created_at",
    "updated_at",
    "thread_id",
    "reply_to_email_id",
}


def _post(client: httpx.Client, path: str, body: Any, content_type: str) -> httpx.Response:
    return client.post(path, content=json.dumps(body), headers={"content-type": content_type})


def _headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in _MOVING}


def _both(client: httpx.Client, path: str, body: Any) -> tuple[httpx.Response, httpx.Response]:
    return _post(client, path, body, LEAN), _post(client, path, body, FASTAPI)


def _assert_same_refusal(client: httpx.Client, path: str, body: Any, status: int) -> None:
    lean, full = _both(client, path, body)
    assert lean.status_code == full.status_code == status, (lean.text, full.text)
    assert lean.content == full.content
    assert _headers(lean) == _headers(full)


def _routes(services: Services, boot: accounts.Bootstrap) -> tuple[dict[str, Any], list[str]]:
    """A mailbox and its four send routes (the replies answer messages of their own)."""
    box = make_mailbox(services, boot, "lean")
    return box, _paths(services, boot, box)


def _paths(services: Services, boot: accounts.Bootstrap, box: dict[str, Any]) -> list[str]:
    replies = [
        f"/v1/mailboxes/{box['id']}/reply/{insert_inbound(services, boot, box)}",
        f"/v1/emails/{insert_inbound(services, boot, box)}/reply",
    ]
    return [f"/v1/mailboxes/{box['id']}/send", "/v1/send", *replies]


BODY = {"to": "customer@example.com", "subject": "Order", "markdown": "Shipped **today**."}


def test_refusals_are_identical_on_both_paths(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    box, paths = _routes(services, boot)
    operator = Actor(type="system", id=None, name="test", account_id=boot.account["id"])
    with services.db.write() as conn:
        reader = keys.create_key(
            conn, actor=operator, account_id=boot.account["id"], name="r", scopes=["read"]
        ).raw_key
    agent = api.client(boot.agent_key)
    body = BODY | {"from": box["address"]}
    for path in paths:
        _assert_same_refusal(api.client("not-a-key"), path, body, 401)
        _assert_same_refusal(api.client("mm_live_" + "x" * 40), path, body, 401)
        _assert_same_refusal(api.client(None), path, body, 401)
        _assert_same_refusal(api.client(reader), path, body, 403)
        _assert_same_refusal(agent, path, body | {"to": "not an address"}, 422)
        _assert_same_refusal(agent, path, body | {"gated": False}, 422)
        _assert_same_refusal(agent, path, body | {"subject": 5}, 422)
        _assert_same_refusal(agent, path, [body], 422)
        _assert_same_refusal(agent, path, body | {"from": "nobody@mm.test"}, 404)
    _assert_same_refusal(agent, "/v1/mailboxes/mbx_missing/send", BODY, 404)
    refused = rows(services, audit_entries, audit_entries.c.action == "request.refused")
    by_subject: dict[str, int] = {}
    for row in refused:
        by_subject[row["subject_id"]] = by_subject.get(row["subject_id"], 0) + 1
    # Each refusal the log keeps was written once per path: an even count for every route.
    assert refused and all(count % 2 == 0 for count in by_subject.values()), by_subject


@pytest.mark.parametrize("index", range(4))
def test_accepted_sends_agree_on_both_paths(
    api: Api, boot: accounts.Bootstrap, services: Services, index: int
) -> None:
    box, paths = _routes(services, boot)
    path = paths[index]
    agent = api.client(boot.agent_key)
    body = BODY | {"from": box["address"], "metadata": {"ticket": 7}}
    lean = _post(agent, path, body, LEAN)
    if "reply" in path:  # a second reply to one message is a 409; reply to another one
        path = _paths(services, boot, box)[index]
    full = _post(agent, path, body, FASTAPI)
    assert lean.status_code == full.status_code == 202, (lean.text, full.text)
    assert _headers(lean) == _headers(full)
    lean_body, full_body = lean.json(), full.json()
    assert lean_body.keys() == full_body.keys()
    assert {k: v for k, v in lean_body.items() if k not in _FRESH} == {
        k: v for k, v in full_body.items() if k not in _FRESH
    }


def test_an_idempotent_replay_crosses_paths(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    box, paths = _routes(services, boot)
    agent = api.client(boot.agent_key)
    for n, (first, second) in enumerate(((LEAN, FASTAPI), (FASTAPI, LEAN))):
        body = BODY | {"from": box["address"], "idempotency_key": f"k{n}"}
        original = _post(agent, paths[0], body, first)
        replay = _post(agent, paths[0], body, second)
        assert (original.status_code, replay.status_code) == (202, 200)
        assert replay.json() == original.json() | {"idempotent": True}
