"""``LeanRoute`` (api/lean.py) takes a well-formed JSON request past FastAPI's resolver and
leaves every other request, and every route outside its shape, to FastAPI's own handler.

The apps here are small on purpose: each test pins one rule of when the lean handler may run.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel

from multimail.api import lean
from multimail.api.lean import LeanRoute
from multimail.api.limits import BODY_SCOPE_KEY, BodySizeLimit


class Note(BaseModel):
    text: str


async def caller(request: Request) -> str:
    return request.headers.get("x-caller", "nobody")


def _router() -> APIRouter:
    router = APIRouter(route_class=LeanRoute)

    @router.post("/boxes/{box}/notes")
    async def add_note(
        box: str, request: Request, note: Note, who: str = Depends(caller)
    ) -> JSONResponse:
        return JSONResponse({"box": box, "text": note.text, "who": who, "path": request.url.path})

    @router.post("/tagged")
    async def tagged(request: Request, note: Note, tag: str = Query("none")) -> JSONResponse:
        return JSONResponse({"text": note.text, "tag": tag})

    @router.post("/form")
    async def form(request: Request, note: Annotated[Note, Form()]) -> JSONResponse:
        return JSONResponse({"text": note.text})

    return router


def _app(*, limit: bool = True, **include: Any) -> FastAPI:
    app = FastAPI()
    app.include_router(_router(), **include)
    if limit:
        app.add_middleware(BodySizeLimit, max_bytes=10_000)
    return app


def _asgi_post(
    path: str, scope_body: bytes, content_type: bytes, **include: Any
) -> tuple[int, Any]:
    """POST with ``scope_body`` only in the scope and an empty body on the wire, to an app
    without ``BodySizeLimit`` (which would put the wire's body in the scope): the lean handler
    reads the body from the scope, FastAPI's handler reads the wire."""
    app = _app(limit=False, **include)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", content_type), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        BODY_SCOPE_KEY: scope_body,
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def test_the_lean_handler_takes_a_json_request_whole() -> None:
    app = _app()
    with TestClient(app) as client:
        response = client.post(
            "/boxes/b1/notes", json={"text": "hi"}, headers={"x-caller": "agent"}
        )
    assert response.status_code == 200
    assert response.json() == {"box": "b1", "text": "hi", "who": "agent", "path": "/boxes/b1/notes"}
    # Only the lean handler reads the body from the scope: it answers although the wire is empty.
    status, body = _asgi_post("/boxes/b1/notes", b'{"text": "scope"}', b"application/json")
    assert (status, body["text"]) == (200, "scope")


def test_other_content_types_and_bad_bodies_take_fastapis_path() -> None:
    app = _app()
    # FastAPI's handler reads the (empty) wire, so the scope's body is not seen: 422.
    status, body = _asgi_post(
        "/boxes/b1/notes", b'{"text": "scope"}', b"application/json; charset=utf-8"
    )
    assert status == 422 and body["detail"][0]["type"] == "missing"
    with TestClient(app) as client:
        typed = client.post(
            "/boxes/b1/notes",
            content=b'{"text": "hi"}',
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert typed.status_code == 200 and typed.json()["text"] == "hi"
        malformed = client.post(
            "/boxes/b1/notes", content=b"{", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 422 and malformed.json()["detail"][0]["type"] == (
            "json_invalid"
        )
        invalid = client.post("/boxes/b1/notes", json={"text": 5})
        assert invalid.status_code == 422
        assert invalid.json()["detail"][0]["loc"] == ["body", "text"]


def test_a_router_level_dependency_still_runs() -> None:
    async def refuse(request: Request) -> None:
        raise HTTPException(status_code=418, detail="router dependency ran")

    status, body = _asgi_post(
        "/boxes/b1/notes", b'{"text": "scope"}', b"application/json", dependencies=[Depends(refuse)]
    )
    assert (status, body) == (418, {"detail": "router dependency ran"})


def test_dependency_overrides_are_honoured() -> None:
    app = _app()

    async def someone(request: Request) -> str:
        return "override"

    app.dependency_overrides[caller] = someone
    with TestClient(app) as client:
        response = client.post("/boxes/b1/notes", json={"text": "hi"})
    assert response.json()["who"] == "override"


@pytest.mark.parametrize("query", ["", "?tag=urgent"])
def test_a_route_with_a_query_parameter_keeps_fastapis_handler(query: str) -> None:
    app = _app()
    with TestClient(app) as client:
        response = client.post(f"/tagged{query}", json={"text": "hi"})
    assert response.json() == {"text": "hi", "tag": "urgent" if query else "none"}
    # Not lean: the scope's body is not read.
    status, _ = _asgi_post("/tagged", b'{"text": "scope"}', b"application/json")
    assert status == 422


def test_a_form_body_keeps_fastapis_handler() -> None:
    """A form model is a single body field too, but FastAPI reads it as a form, never as
    JSON: the lean handler answered a JSON body that FastAPI refuses."""
    status, _ = _asgi_post("/form", b'{"text": "scope"}', b"application/json")
    assert status == 422


def test_an_unknown_dependant_field_keeps_fastapis_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field FastAPI adds to ``Dependant`` may stand for work the lean handler does not do
    (as ``concurrency`` did): until it is known here, no route is lean."""
    status, _ = _asgi_post("/boxes/b1/notes", b'{"text": "scope"}', b"application/json")
    assert status == 200
    monkeypatch.setattr(lean, "_KNOWN_DEPENDANT_FIELDS", lean._KNOWN_DEPENDANT_FIELDS - {"scope"})
    status, _ = _asgi_post("/boxes/b1/notes", b'{"text": "scope"}', b"application/json")
    assert status == 422


def test_a_validation_error_is_raised_as_fastapi_raises_it() -> None:
    """The lean handler validates the body itself (after the dependencies): the refusal is
    FastAPI's, to the byte."""
    with TestClient(_app()) as client:
        answers = [
            client.post(
                "/boxes/b1/notes", content=b'{"text": 5}', headers={"content-type": content_type}
            )
            for content_type in ("application/json", "application/json; charset=utf-8")
        ]
    assert answers[0].status_code == 422
    assert answers[0].content == answers[1].content
