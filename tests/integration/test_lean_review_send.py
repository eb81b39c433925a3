"""Review of the send routes' lean handler (``api/lean.py``, commit 0aeea92): where a request
the lean handler takes answers differently from FastAPI's own handler, on the real app.

Each request goes both ways: ``application/json`` (the lean handler) and
``application/json; charset=utf-8`` (FastAPI's handler, which the send routes used before).
Each test pins a divergence found in the review (fixed since).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

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

# Deeper than the JSON decoder's recursion limit (1,000 frames): ``json.loads`` raises
# RecursionError, not a ValueError. 10 kB, far inside the body-size limit.
_DEEP = b"[" * 5000 + b"]" * 5000


def _fresh_post(
    api: Api, key: str | None, path: str, raw: bytes, content_type: str
) -> httpx.Response:
    # A client per request: after a 500 the server drops the connection, and a pooled one
    # would turn the next request into a ReadError instead of an answer to compare.
    return api.client(key).post(path, content=raw, headers={"content-type": content_type})


@pytest.mark.parametrize("who", ["agent", "anonymous"])
def test_a_deeply_nested_body_answers_as_fastapi_does(
    api: Api, boot: accounts.Bootstrap, services: Services, who: str
) -> None:
    """The lean handler caught only ValueError from json.loads: RecursionError was a 500 where
    FastAPI answers 400."""
    box, paths = _routes(services, boot)
    before = rows(services, messages)  # the messages the replies answer
    key = boot.agent_key if who == "agent" else None
    inside = json.dumps(BODY | {"from": box["address"]}).encode()[:-1] + b', "metadata": '
    for path in paths:
        for raw in (_DEEP, inside + b'{"x": ' + _DEEP + b"}}"):
            lean = _fresh_post(api, key, path, raw, LEAN)
            full = _fresh_post(api, key, path, raw, FASTAPI)
            assert full.status_code == 400, full.text
            assert (lean.status_code, lean.content) == (full.status_code, full.content)
    assert rows(services, messages) == before


@pytest.fixture
def body_parses(monkeypatch: pytest.MonkeyPatch) -> Callable[[bytes], int]:
    """How many times the server (in this process) parsed exactly these bytes as JSON."""
    seen: list[bytes] = []
    loads = json.loads

    def counting(s: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(s, bytes | bytearray):
            seen.append(bytes(s))
        return loads(s, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    return lambda raw: sum(1 for parsed in seen if parsed == raw)


@pytest.mark.parametrize("key", ["none", "malformed"])
def test_an_invalid_body_is_parsed_once_before_the_key_is_checked(
    api: Api,
    boot: accounts.Bootstrap,
    services: Services,
    body_parses: Callable[[bytes], int],
    key: str,
) -> None:
    """The lean handler parsed and validated an invalid body, then FastAPI's handler parsed it
    again, all before the key was looked at."""
    box, paths = _routes(services, boot)
    raw_key = None if key == "none" else "not-a-key"
    for n, path in enumerate(paths):
        # Distinct bytes per request, so each count is that request's alone.
        raw = json.dumps(BODY | {"from": box["address"], "subject": n}).encode()
        full = _fresh_post(api, raw_key, path, raw, FASTAPI)
        assert full.status_code == 401 and body_parses(raw) == 1, full.text
        lean = _fresh_post(api, raw_key, path, raw + b" ", LEAN)
        assert (lean.status_code, lean.content) == (full.status_code, full.content)
        assert body_parses(raw + b" ") == 1
