"""Jinja2 rendering for the dashboard: autoescaped templates, a few display filters.

Message bodies reach templates only through :func:`safe_body`, which re-renders markdown or
re-sanitises stored HTML, so nothing an outsider wrote is ever marked safe unchecked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from multimail.ids import parse_datetime
from multimail.mail.htmlmd import sanitize_html
from multimail.mail.markdown import render_markdown

TEMPLATES = Path(__file__).parent / "templates"

# Colour families for status badges; anything unlisted is shown neutral.
_TONES = {
    "pending_send_approval": "wait",
    "pending_inbound_approval": "wait",
    "pending_scan": "wait",
    "scheduled": "info",
    "queued": "info",
    "sending": "info",
    "deferred": "wait",
    "delivered": "good",
    "unread": "info",
    "read": "muted",
    "rejected": "bad",
    "cancelled": "muted",
    "bounced": "bad",
    "send_failed": "bad",
    "expired": "muted",
    "spam": "bad",
    "verified": "good",
    "pending": "wait",
    "failed": "bad",
    "revoked": "muted",
    "active": "good",
    "disabled": "bad",
    "paused": "bad",
}


def when(value: Any) -> str:
    """ISO 8601 (or datetime) as ``2026-11-21 05:21 UTC``; blank for nothing."""
    if not value:
        return ""
    try:
        moment = parse_datetime(value) if isinstance(value, str) else value
        return str(moment.strftime("%Y-%m-%d %H:%M UTC"))
    except (ValueError, AttributeError):
        return str(value)


def tone(status: Any) -> str:
    return _TONES.get(str(status), "muted")


def safe_body(message: dict[str, Any]) -> Markup:
    """The message body as HTML that is safe to show inline."""
    markdown = message.get("markdown") or ""
    if message.get("direction") == "outbound" or not message.get("html"):
        return Markup(render_markdown(markdown).html)
    return Markup(sanitize_html(str(message["html"])))


def preview(markdown: str) -> Markup:
    return Markup(render_markdown(markdown).html)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"], default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["tone"] = tone
    env.globals["safe_body"] = safe_body
    env.globals["preview"] = preview
    return env


ENV = _environment()

# Pages never load anything from elsewhere: remote images in mail (trackers) are blocked too.
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def render(
    request: Request, template: str, *, status_code: int = 200, **context: Any
) -> HTMLResponse:
    context.setdefault("session", getattr(request.state, "operator", None))
    context.setdefault("nav", "")
    context.setdefault("notice", None)
    context.setdefault("pending_count", None)
    body = ENV.get_template(template).render(request=request, **context)
    return HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)
