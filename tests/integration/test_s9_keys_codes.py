"""Review S9: who may revoke which API key, and approval codes under concurrent guesses.

An API key minted through the API (an agent's) may revoke itself and the keys it created at
once; revoking any other key, the operator's own among them, takes the operator's mailed
approval code (SPEC §2's two-step flow). Guesses at a code made at the same moment count as
they would one after another: after five wrong ones the right code is refused too.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from multimail.client import MultimailClient
from multimail.services import accounts, keys
from multimail.services.context import Services
from multimail.store.tables import api_keys, approval_codes, audit_entries
from tests.conftest import BACKEND, Api
from tests.integration.concurrency_support import run_at_once
from tests.integration.oversight_support import job_rows, last_code

WRONG = ["WRONG" + c * 3 for c in "ABCDEFGHJK"]  # ten well-formed codes, none ever issued
REQUEST = {"name": "raced", "scopes": ["read"]}


def _key_id(services: Services, raw_key: str) -> str:
    key_id = keys.authenticate(services.db, raw_key).id
    assert key_id is not None
    return key_id


def _codes_mailed(services: Services) -> list[dict[str, Any]]:
    return [j for j in job_rows(services, "system_mail") if j["payload"]["kind"] == "approval_code"]


def _asks(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    assert (body["status"], body["code"]) == ("approval_required", "approval_required"), body
    return body


def _revoked(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["revoked"] is True, response.text


def _is_revoked(services: Services, key_id: str) -> bool:
    with services.db.read() as conn:
        query = select(api_keys.c.revoked_at).where(api_keys.c.id == key_id)
        return conn.execute(query).scalar_one() is not None


def _actions_by(services: Services, actor_id: str, subject_id: str) -> list[str]:
    with services.db.read() as conn:
        query = (
            select(audit_entries.c.action)
            .where(audit_entries.c.actor_id == actor_id, audit_entries.c.subject_id == subject_id)
            .order_by(audit_entries.c.seq)
        )
        return list(conn.execute(query).scalars())


def _mint_through_the_api(api: Api, services: Services, key: str, name: str) -> dict[str, Any]:
    """A key made by ``key`` itself, through the two-step flow an agent's admin key goes by."""
    client = api.client(key)
    request = {"name": name, "scopes": ["read"]}
    _asks(client.post("/v1/api-keys", json=request))
    made = client.post("/v1/api-keys", json=request | {"approval_code": last_code(services)})
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    return body


# --- revoking keys ---------------------------------------------------------------------------


def test_an_agents_admin_key_needs_the_operators_code_to_revoke_the_operators_key(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """The first DELETE mails a code to oversight_email and changes nothing; a wrong code and
    a code issued for another key are refused; the mailed code revokes it, audited like the
    other gated actions."""
    agent_admin = api.client(minted_admin_key)
    agent_admin_id = _key_id(services, minted_admin_key)
    operator_key = _key_id(services, boot.admin_key)
    reviewer_key = _key_id(services, boot.reviewer_key)

    asked = _asks(agent_admin.delete(f"/v1/api-keys/{operator_key}"))
    assert asked["purpose"] == "api_key_revoke" and asked["sent_to"], asked
    mailed = _codes_mailed(services)
    assert len(mailed) == 1 and mailed[0]["payload"]["to"] == [boot.operator_email], mailed
    assert "operator's own admin key" in mailed[0]["payload"]["markdown"]
    code = last_code(services)
    assert api.client(boot.admin_key).get("/v1/mailboxes").status_code == 200

    wrong = agent_admin.delete(f"/v1/api-keys/{operator_key}", params={"approval_code": "WRONG000"})
    assert wrong.status_code == 403 and wrong.json()["code"] == "invalid_approval_code", wrong.text
    elsewhere = agent_admin.delete(f"/v1/api-keys/{reviewer_key}", params={"approval_code": code})
    assert elsewhere.status_code == 403, elsewhere.text
    assert elsewhere.json()["code"] == "invalid_approval_code"
    assert not _is_revoked(services, reviewer_key) and not _is_revoked(services, operator_key)

    _revoked(
        agent_admin.request("DELETE", f"/v1/api-keys/{operator_key}", json={"approval_code": code})
    )
    refused = api.client(boot.admin_key).get("/v1/mailboxes")
    assert (refused.status_code, refused.json()["code"]) == (401, "api_key_revoked")
    assert _actions_by(services, agent_admin_id, operator_key) == [
        "approval_code.issued",
        "approval_code.used",
        "api_key.revoked",
    ]


def test_the_revoke_tool_route_is_gated_too(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """POST /revoke_api_key lands on the same REST route: the agent's key gets the approval
    requirement there as well, the operator's key keeps working, and the tool takes the
    mailed code to finish (its input must accept approval_code, or the agent is stuck)."""
    operator_key = _key_id(services, boot.admin_key)
    tool = api.client(minted_admin_key)
    _asks(tool.post("/revoke_api_key", json={"key_id": operator_key}))
    assert api.client(boot.admin_key).get("/v1/mailboxes").status_code == 200
    done = tool.post(
        "/revoke_api_key", json={"key_id": operator_key, "approval_code": last_code(services)}
    )
    _revoked(done)
    assert _is_revoked(services, operator_key)


def test_the_python_client_passes_the_code_through(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """MultimailClient.revoke_api_key(approval_code=...) finishes the two-step revoke."""
    reviewer_key = _key_id(services, boot.reviewer_key)
    with MultimailClient(api_key=minted_admin_key, base_url=api.base_url) as client:
        first = client.revoke_api_key(key_id=reviewer_key)
        assert first["status"] == "approval_required", first
        done = client.revoke_api_key(key_id=reviewer_key, approval_code=last_code(services))
    assert done["revoked"] is True, done
    assert _is_revoked(services, reviewer_key)


def test_a_key_revokes_itself_and_the_keys_it_created_at_once(
    api: Api, services: Services, minted_admin_key: str
) -> None:
    """No code and no mail for a key the caller made, nor for the caller itself; afterwards
    the caller's next request is refused."""
    made = _mint_through_the_api(api, services, minted_admin_key, "helper")
    mailed = len(_codes_mailed(services))
    agent_admin = api.client(minted_admin_key)

    _revoked(agent_admin.delete(f"/v1/api-keys/{made['id']}"))
    assert api.client(made["key"]).get("/v1/mailboxes").status_code == 401
    _revoked(agent_admin.delete(f"/v1/api-keys/{_key_id(services, minted_admin_key)}"))
    refused = agent_admin.get("/v1/mailboxes")
    assert (refused.status_code, refused.json()["code"]) == (401, "api_key_revoked")
    assert len(_codes_mailed(services)) == mailed, "revoking one's own keys mails no code"


def test_sharing_a_creators_name_does_not_make_its_keys_yours(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """api_keys.created_by holds a display name: a key named like the operator's key does
    not get to revoke, without the code, the keys the operator's key created."""
    operator = api.client(boot.admin_key)
    operators_made = operator.post("/v1/api-keys", json={"name": "ci", "scopes": ["read"]}).json()
    namesake = operator.post("/v1/api-keys", json={"name": "admin", "scopes": ["admin"]}).json()
    assert namesake["operator_credential"] is False  # minted through the API
    assert operators_made["created_by"] == namesake["name"], operators_made

    _asks(api.client(namesake["key"]).delete(f"/v1/api-keys/{operators_made['id']}"))
    assert not _is_revoked(services, operators_made["id"])


def test_the_operators_key_revokes_any_key_at_once(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """Operators are not gated: their own admin key revokes the agent's key with no code."""
    _revoked(
        api.client(boot.admin_key).delete(f"/v1/api-keys/{_key_id(services, minted_admin_key)}")
    )
    assert _codes_mailed(services) == []


# --- concurrent guesses at one code -----------------------------------------------------------


def _attempts(services: Services) -> int:
    """The wrong guesses counted against the newest code."""
    with services.db.read() as conn:
        query = select(approval_codes.c.attempts).order_by(approval_codes.c.id.desc()).limit(1)
        return int(conn.execute(query).scalar_one())


def _made(services: Services, name: str) -> int:
    with services.db.read() as conn:
        return len(conn.execute(select(api_keys.c.id).where(api_keys.c.name == name)).all())


def _lock_waiters(services: Services) -> int:
    """Requests waiting on a row lock of approval_codes (their statement names the table)."""
    with services.db.read() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%approval_codes%'"
                )
            ).scalar_one()
        )


def _until_waiting(services: Services, count: int) -> None:
    deadline = time.monotonic() + 30
    while _lock_waiters(services) < count:
        assert time.monotonic() < deadline, f"{count} requests never queued on the code's row"
        time.sleep(0.02)


def _judged_in_turn(
    services: Services, name: str, wrong: list[httpx.Response], right: httpx.Response
) -> None:
    """Whatever order the guesses were judged in, as if one after another: the right code
    was spent only while fewer than five wrong guesses were counted (the ones judged after
    it count nothing, the code being gone), or else refused with every guess counted."""
    attempts = _attempts(services)
    assert [answer.status_code for answer in wrong] == [403] * len(wrong)
    if right.status_code == 201:
        assert attempts < 5, f"the code was spent after {attempts} wrong guesses were counted"
        assert _made(services, name) == 1
    else:
        assert right.status_code == 403, right.text
        assert right.json()["error"].startswith("too many wrong codes"), right.text
        assert attempts == len(wrong) + 1 and _made(services, name) == 0


@pytest.mark.skipif(BACKEND != "postgres", reason="row locks and their waiters are PostgreSQL's")
def test_the_right_code_read_before_five_wrong_guesses_is_not_spent_after_them(
    api: Api, services: Services, minted_admin_key: str
) -> None:
    """The race forced: while a transaction holds the code's row, five wrong guesses start
    and wait on it, then the right code does. Unlocked, the right code read the code unspent
    with no wrong guess counted and spent it after all five were; locked, each guess reads
    the code only when its turn comes."""
    _asks(api.client(minted_admin_key).post("/v1/api-keys", json=REQUEST))
    code = last_code(services)
    answers: dict[str, httpx.Response] = {}

    def guess(name: str, value: str) -> threading.Thread:
        client = api.client(minted_admin_key)

        def run() -> None:
            answers[name] = client.post("/v1/api-keys", json=REQUEST | {"approval_code": value})

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    with services.db.engine.connect() as holder, holder.begin():
        holder.execute(select(approval_codes.c.id).with_for_update()).all()
        threads = [guess(f"wrong{i}", WRONG[i]) for i in range(5)]
        _until_waiting(services, 5)
        threads.append(guess("right", code))
        _until_waiting(services, 6)
    for thread in threads:
        thread.join(60)

    wrong = [answers[f"wrong{i}"] for i in range(5)]
    _judged_in_turn(services, REQUEST["name"], wrong, answers["right"])


def _guess_at_once(
    api: Api, services: Services, key: str, request: dict[str, Any]
) -> list[httpx.Response]:
    """A fresh code for ``request``, then eight wrong guesses and the right code sent
    together; their answers, the right code's last."""
    _asks(api.client(key).post("/v1/api-keys", json=request))
    guesses = [*WRONG[:8], last_code(services)]
    clients = [api.client(key) for _ in guesses]
    answers: dict[int, httpx.Response] = {}

    def run(index: int, start: threading.Barrier) -> None:
        body = request | {"approval_code": guesses[index]}
        start.wait()
        answers[index] = clients[index].post("/v1/api-keys", json=body)

    run_at_once(len(guesses), run)
    return [answers[i] for i in range(len(guesses))]


def test_guesses_made_at_once_never_give_a_sixth_chance(
    api: Api, services: Services, minted_admin_key: str
) -> None:
    """Eight wrong guesses and the right code sent together, three rounds: the guesses are
    judged as if one after another, whatever order the database takes them in."""
    for round_ in range(3):
        # A request of its own each round: the code of one round approves nothing in another.
        request = {"name": f"raced-{round_}", "scopes": ["read"]}
        *wrong, right = _guess_at_once(api, services, minted_admin_key, request)
        _judged_in_turn(services, request["name"], wrong, right)
