"""The pages behind one-click links: Approve / Reject in approval emails, and List-Unsubscribe.

A GET only shows a confirmation page (mail scanners and link previewers fetch links); the
POST acts. Failures are HTML pages too, with a 4xx status: 403 for a forged token, 410 for
an expired or already used one, 409 when the message was decided some other way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from multimail.api.deps import get_services
from multimail.domain.linktokens import InvalidLinkToken
from multimail.domain.oversight import DECIDABLE, Status
from multimail.errors import MultimailError
from multimail.services import notify, oversight
from multimail.services.context import Services

router = APIRouter(include_in_schema=True)

_TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).resolve().parent.parent / "templates"),
    autoescape=select_autoescape(["html"]),
)
# Pages that carry a live token must not be cached or leak it to other sites.
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_TOKEN_PROBLEMS = {
    "expired": (410, "This link has expired."),
    "forged": (403, "This link is not valid."),
    "malformed": (403, "This link is not valid."),
    "wrong_purpose": (403, "This link is not valid here."),
}


def _page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _TEMPLATES.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def _error_page(exc: MultimailError) -> HTMLResponse:
    if isinstance(exc, InvalidLinkToken):
        status, message = _TOKEN_PROBLEMS.get(exc.reason, (403, "This link is not valid."))
    elif isinstance(exc, oversight.LinkAlreadyUsed):
        status, message = 410, "This link was already used; each link works once."
    else:
        status, message = exc.status if exc.status >= 400 else 400, exc.message
    return _page(
        "result.html", status, title="Link not usable", ok=False, message=message, detail=None
    )


@router.get("/v1/approve/{token}", response_class=HTMLResponse)
def approval_page(token: str, svc: Services = Depends(get_services)) -> HTMLResponse:
    try:
        request = oversight.read_approval_link(svc, token)
    except MultimailError as exc:
        return _error_page(exc)
    pending = Status(request.message["status"]) in DECIDABLE and not request.expired
    title = "Approve this message?" if request.action == "approve" else "Reject this message?"
    return _page(
        "approve_confirm.html",
        200 if pending else 409,
        title=title,
        request=request,
        pending=pending,
    )


@router.post("/v1/approve/{token}", response_class=HTMLResponse)
def approval_decide(token: str, svc: Services = Depends(get_services)) -> HTMLResponse:
    try:
        outcome = oversight.decide_by_link(svc, token)
    except MultimailError as exc:
        return _error_page(exc)
    messages = {
        "approved_and_sent": "Approved. The message was sent.",
        "approved": "Approved. The message is on its way.",
        "rejected": "Rejected. The message will not be sent.",
    }
    return _page(
        "result.html",
        title="Decision recorded",
        ok=True,
        message=messages[outcome["result"]],
        detail=f"Message {outcome['id']} is now {outcome['status']}.",
    )


@router.get("/v1/unsubscribe/{token}", response_class=HTMLResponse)
def unsubscribe_page(token: str, svc: Services = Depends(get_services)) -> HTMLResponse:
    try:
        _account, address = notify.read_unsubscribe_token(svc, token)
    except MultimailError as exc:
        return _error_page(exc)
    return _page("unsubscribe_confirm.html", title="Unsubscribe", address=address)


@router.post("/v1/unsubscribe/{token}", response_class=HTMLResponse)
def unsubscribe(token: str, svc: Services = Depends(get_services)) -> HTMLResponse:
    """RFC 8058 one-click: the mail client POSTs ``List-Unsubscribe=One-Click`` here."""
    try:
        done = notify.unsubscribe(svc, token)
    except MultimailError as exc:
        return _error_page(exc)
    return _page(
        "result.html",
        title="Unsubscribed",
        ok=True,
        message=f"{done['address']} will not receive mail from this sender again.",
        detail=None,
    )
