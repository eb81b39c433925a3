"""Review of ``LeanRoute`` (``api/lean.py``, commit 0aeea92) as a route class: routes that pass
its shape check (``_lean_shape``) but whose FastAPI handler does something the lean handler
does not. The send routes have none of these today; the next route made lean could.

Each app pairs ``LeanRoute`` with ``BodySizeLimit`` as ``create_app`` does. A request sent as
``application/json`` takes the lean handler, the same request as
``application/json; charset=utf-8`` takes FastAPI's: the two must answer alike.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import httpx
from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from multimail.api.lean import LeanRoute
from multimail.api.limits import BodySizeLimit

LEAN = "application/json"
FASTAPI = "application/json; charset=utf-8"


class Note(BaseModel):
    text: str


def _app(router: APIRouter) -> FastAPI:
    app = FastAPI()
    app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=10_000)
    return app


async def _post_both(
    app: FastAPI, path: str, concurrent: int = 1
) -> dict[str, list[httpx.Response]]:
    answers: dict[str, list[httpx.Response]] = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for content_type in (LEAN, FASTAPI):
            answers[content_type] = list(
                await asyncio.gather(
                    *(
                        client.post(
                            path, content=b'{"text": "hi"}', headers={"content-type": content_type}
                        )
                        for _ in range(concurrent)
                    )
                )
            )
    return answers


def test_path_parameter_constraints_are_checked() -> None:
    """The lean handler passed path parameters through unvalidated: a constrained one keeps
    FastAPI's handler."""
    router = APIRouter(route_class=LeanRoute)

    @router.post("/boxes/{box}/notes")
    async def add_note(
        box: Annotated[str, Path(max_length=3, pattern="^[a-z]+$")], request: Request, note: Note
    ) -> JSONResponse:
        return JSONResponse({"box": box})

    answers = asyncio.run(_post_both(_app(router), "/boxes/NOT-SHORT/notes"))
    assert answers[FASTAPI][0].status_code == 422
    assert answers[LEAN][0].status_code == 422, answers[LEAN][0].text


def test_a_dependency_named_twice_runs_once() -> None:
    """FastAPI runs a dependency named twice once per request (its cache); the lean handler ran
    it twice. Such a route keeps FastAPI's handler."""
    calls: list[str] = []

    async def who(request: Request) -> str:
        calls.append(request.headers["content-type"])
        return "agent"

    router = APIRouter(route_class=LeanRoute)

    @router.post("/notes")
    async def add_note(
        request: Request, note: Note, a: str = Depends(who), b: str = Depends(who)
    ) -> JSONResponse:
        return JSONResponse({"a": a, "b": b})

    answers = asyncio.run(_post_both(_app(router), "/notes"))
    assert [r.status_code for r in answers[LEAN] + answers[FASTAPI]] == [200, 200]
    assert calls.count(FASTAPI) == 1
    assert calls.count(LEAN) == 1, calls


def test_a_dependency_concurrency_limit_holds() -> None:
    """``Depends(..., max_concurrency=N)`` was ignored on the lean path; such a route keeps
    FastAPI's handler."""
    inside: dict[str, int] = {LEAN: 0, FASTAPI: 0}
    most: dict[str, int] = {LEAN: 0, FASTAPI: 0}

    async def gate(request: Request) -> None:
        kind = request.headers["content-type"]
        inside[kind] += 1
        most[kind] = max(most[kind], inside[kind])
        await asyncio.sleep(0.02)  # long enough for the other requests to arrive
        inside[kind] -= 1

    router = APIRouter(route_class=LeanRoute)

    @router.post("/notes")
    async def add_note(
        request: Request, note: Note, _: None = Depends(gate, max_concurrency=1)
    ) -> JSONResponse:
        return JSONResponse({"text": note.text})

    answers = asyncio.run(_post_both(_app(router), "/notes", concurrent=4))
    assert all(r.status_code == 200 for kind in answers.values() for r in kind)
    assert most[FASTAPI] == 1
    assert most[LEAN] == 1, most
