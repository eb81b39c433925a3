"""Review of the send routes' body handling (commit 0aeea92, ``BodySizeLimit`` and the lean
handler): defects found on both handlers alike, before the lean handler and after it.

``BodySizeLimit`` refuses a NUL character with a 422 (``nul_character``) because PostgreSQL
text refuses it and SMTP forbids it; SPEC §12 says bad input gets a clear error and never
leaves a half-written or duplicate message. Each case is sent to the lean handler
(``application/json``) and to FastAPI's (``application/json; charset=utf-8``).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from multimail.services import accounts
from multimail.services.context import Services
from multimail.store.tables import messages
from tests.conftest import Api
from tests.integration.test_sending import make_mailbox, rows

HANDLERS = pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8"]
)
_NUL_REFUSAL = {
    "error": "the request contains a NUL character (\\u0000 or %00); remove it and try again",
    "code": "nul_character",
}
_WITH_NUL = {"to": "customer@example.com", "subject": "Order", "markdown": "Ship\u0000ped"}


def _post(
    api: Api, key: str | None, path: str, raw: bytes, headers: list[tuple[str, str]]
) -> httpx.Response:
    # A client per request: after a 500 the server drops the connection.
    return api.client(key).post(path, content=raw, headers=httpx.Headers(headers))


def _send_path(services: Services, boot: accounts.Bootstrap) -> str:
    box = make_mailbox(services, boot, "guards", mode="autonomous")
    return f"/v1/mailboxes/{box['id']}/send"


@HANDLERS
def test_a_nul_in_a_plain_utf8_body_is_refused(
    api: Api, boot: accounts.Bootstrap, services: Services, content_type: str
) -> None:
    """The guard as it works today: the baseline the cases below depart from."""
    path = _send_path(services, boot)
    raw = json.dumps(_WITH_NUL).encode()
    answer = _post(api, boot.agent_key, path, raw, [("content-type", content_type)])
    assert (answer.status_code, answer.json()) == (422, _NUL_REFUSAL)
    assert rows(services, messages) == []


@HANDLERS
def test_a_nul_behind_a_second_content_type_header_is_refused(
    api: Api, boot: accounts.Bootstrap, services: Services, content_type: str
) -> None:
    """The guard read the last Content-Type header, the routes the first: with 'application/json'
    then 'text/plain' the NUL was stored (SQLite: 202, PostgreSQL: 500)."""
    path = _send_path(services, boot)
    raw = json.dumps(_WITH_NUL).encode()
    headers = [("content-type", content_type), ("content-type", "text/plain")]
    answer = _post(api, boot.agent_key, path, raw, headers)
    assert (answer.status_code, answer.json()) == (422, _NUL_REFUSAL)
    assert rows(services, messages) == []


@HANDLERS
@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_nul_in_a_utf16_or_utf32_body_is_refused(
    api: Api, boot: accounts.Bootstrap, services: Services, content_type: str, encoding: str
) -> None:
    """json.loads also reads UTF-16 and UTF-32, where the escape's ASCII bytes never appear: the
    guard looks in the text json.loads reads."""
    path = _send_path(services, boot)
    raw = json.dumps(_WITH_NUL).encode(encoding)
    answer = _post(api, boot.agent_key, path, raw, [("content-type", content_type)])
    assert (answer.status_code, answer.json()) == (422, _NUL_REFUSAL)
    assert rows(services, messages) == []


@HANDLERS
def test_a_deeply_nested_body_naming_a_nul_is_a_client_error(
    api: Api, boot: accounts.Bootstrap, services: Services, content_type: str
) -> None:
    """The guard's parse raised RecursionError (it caught ValueError only): a 500 for anyone."""
    path = _send_path(services, boot)
    raw = b'{"markdown": "\\u0000", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    answer = _post(api, None, path, raw, [("content-type", content_type)])
    assert answer.status_code in (400, 422), answer.text


@HANDLERS
@pytest.mark.parametrize("literal", ["NaN", "1e999"])
def test_a_non_finite_number_is_refused_and_writes_nothing(
    api: Api, boot: accounts.Bootstrap, services: Services, content_type: str, literal: str
) -> None:
    """json.loads reads NaN and 1e999 (inf); stored, the response then failed (a 500 after the
    write on SQLite, so a retry sent twice)."""
    path = _send_path(services, boot)
    body: dict[str, Any] = {"to": "customer@example.com", "subject": "Order", "markdown": "m"}
    raw = json.dumps(body).encode()[:-1] + b', "metadata": {"score": ' + literal.encode() + b"}}"
    answer = _post(api, boot.agent_key, path, raw, [("content-type", content_type)])
    assert answer.status_code in (400, 422), answer.text
    assert rows(services, messages) == []
