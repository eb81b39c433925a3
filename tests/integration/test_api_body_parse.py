"""How the send routes parse a JSON body (``api/limits.py``'s ``parse_json`` and the NUL guard,
``api/lean.py``), on the real app, through both handlers: ``application/json`` takes the lean
handler, ``application/json; charset=utf-8`` FastAPI's.
"""

from __future__ import annotations

from typing import Any

import fastapi.routing
import httpx
import pytest

from multimail.services import accounts
from multimail.services.context import Services
from multimail.store.tables import messages
from tests.conftest import Api
from tests.integration.test_api_send_lean import BODY, _routes
from tests.integration.test_sending import rows

LEAN = "application/json"
FASTAPI = "application/json; charset=utf-8"


def _post(api: Api, key: str | None, path: str, raw: bytes, content_type: str) -> httpx.Response:
    return api.client(key).post(path, content=raw, headers={"content-type": content_type})


@pytest.mark.parametrize(
    "literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"1" + b"0" * 400 + b".0"]
)
def test_a_non_finite_number_is_a_400_before_the_key_and_writes_nothing(
    api: Api, boot: accounts.Bootstrap, services: Services, literal: bytes
) -> None:
    """Python's json reads NaN, Infinity and numbers past a float's range (as inf); JSON has
    none of them. Refused where the body is parsed, like malformed JSON: before the key."""
    _box, paths = _routes(services, boot)
    before = rows(services, messages)
    prefix = b'{"to": "customer@example.com", "subject": "Order", "markdown": "m", "metadata": '
    raw = prefix + b'{"score": [1, ' + literal + b"]}}"
    for path in paths:
        for key in (boot.agent_key, None):
            lean = _post(api, key, path, raw, LEAN)
            full = _post(api, key, path, raw, FASTAPI)
            assert lean.status_code == 400, lean.text
            assert lean.json()["code"] == "non_finite_number"
            assert literal.decode()[:20] in lean.json()["error"]
            assert (lean.status_code, lean.content) == (full.status_code, full.content)
    assert rows(services, messages) == before


def test_a_finite_float_in_metadata_is_kept(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    _box, paths = _routes(services, boot)
    raw = (
        b'{"to": "customer@example.com", "subject": "Order", "markdown": "m", '
        b'"metadata": {"score": 1.5e300, "small": -2.5e-300}}'
    )
    for content_type in (LEAN, FASTAPI):
        answer = _post(api, boot.agent_key, paths[0], raw, content_type)
        assert answer.status_code == 202, answer.text
        assert answer.json()["metadata"] == {"score": 1.5e300, "small": -2.5e-300}


@pytest.mark.parametrize("content_type", [LEAN, FASTAPI])
def test_a_nul_under_deep_nesting_is_refused(
    api: Api, boot: accounts.Bootstrap, services: Services, content_type: str
) -> None:
    """Nesting the parser accepts (800 levels) with a NUL after it: the guard walked the
    parsed body recursively and overflowed the stack (a 500 before any key was checked)."""
    _box, paths = _routes(services, boot)
    raw = b'{"x": ' + b"[" * 800 + b"]" * 800 + b', "markdown": "a\\u0000b"}'
    answer = _post(api, None, paths[0], raw, content_type)
    assert (answer.status_code, answer.json()["code"]) == (422, "nul_character")


@pytest.fixture
def resolver_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The requests (by content type) FastAPI's parameter resolver ran for."""
    calls: list[str] = []
    solve = fastapi.routing.solve_dependencies

    async def counting(**kwargs: Any) -> Any:
        calls.append(kwargs["request"].headers.get("content-type"))
        return await solve(**kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return calls


def test_the_lean_handler_answers_valid_and_invalid_sends_itself(
    api: Api, boot: accounts.Bootstrap, services: Services, resolver_calls: list[str]
) -> None:
    """An invalid body used to be handed to FastAPI's handler after the lean handler had
    parsed and validated it; now the lean handler refuses it itself, after the key, as
    FastAPI does. Other content types still take FastAPI's resolver."""
    box, paths = _routes(services, boot)
    body = BODY | {"from": box["address"]}
    agent = api.client(boot.agent_key)
    for path in paths:
        invalid = agent.post(path, json=body | {"subject": 5})
        assert (invalid.status_code, invalid.json()["code"]) == (422, "validation_error")
        anonymous = api.client(None).post(path, json=body | {"subject": 5})
        assert anonymous.status_code == 401
    valid = agent.post(paths[0], json=body)
    assert valid.status_code == 202, valid.text
    assert resolver_calls == []
    typed = _post(
        api, boot.agent_key, paths[0], httpx.Request("POST", "/", json=body).read(), FASTAPI
    )
    assert typed.status_code == 202, typed.text
    assert resolver_calls == [FASTAPI]


@pytest.mark.parametrize("literal", [b"NaN", b"1e999"])
def test_the_tool_route_refuses_a_non_finite_number_too(
    api: Api, boot: accounts.Bootstrap, services: Services, literal: bytes
) -> None:
    """POST /send_email (the tool-named route) parsed with json.loads and answered 500."""
    _routes(services, boot)
    before = rows(services, messages)
    raw = b'{"to": "customer@example.com", "subject": "s", "markdown": "m", "metadata": {"x": '
    answer = _post(api, boot.agent_key, "/send_email", raw + literal + b"}}", LEAN)
    assert (answer.status_code, answer.json()["code"]) == (400, "non_finite_number")
    assert rows(services, messages) == before
