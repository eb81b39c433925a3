"""The operator's other pages: API keys, webhooks, domains, audit, sandbox, usage.

Mailboxes have their own module (``mailbox_pages``).

An operator signed in here acts directly: the approval-code step that API keys go through
for sensitive admin actions is for keys, not for the person the codes are mailed to.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from multimail.dashboard.auth import PREFIX, DashboardRoute, checked_form, operator_actor
from multimail.dashboard.auth import services_of as _svc
from multimail.dashboard.render import render
from multimail.services import (
    approvals,
    audit,
    checkpoints,
    domains,
    inbox,
    keys,
    mailboxes,
    operators,
    webhooks,
)
from multimail.services.context import Actor, Services
from multimail.workers.signing import default_dkim_record

router = APIRouter(prefix=PREFIX, route_class=DashboardRoute, include_in_schema=False)

SCOPES = ["read", "send", "oversight", "admin"]


def _to(path: str, **query: str) -> RedirectResponse:
    suffix = "&".join(f"{k}={v}" for k, v in query.items())
    return RedirectResponse(f"{PREFIX}{path}{'?' + suffix if suffix else ''}", status_code=303)


# --- API keys --------------------------------------------------------------------------------


@router.get("/keys")
def key_list(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    svc = _svc(request)
    with svc.db.read() as conn:
        found = keys.list_keys(conn, str(actor.account_id))
    return render(request, "keys.html", nav="keys", keys=found, scopes=SCOPES, created=None)


@router.post("/keys")
def key_create(
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    """The new key is shown on this response only; it is stored as a hash."""
    svc = _svc(request)
    fields = {
        "name": form.get("name", "").strip(),
        "scopes": [s for s in SCOPES if form.get(f"scope_{s}") == "on"],
        "mode": form.get("mode") or "live",
    }
    created = approvals.create_api_key(svc, actor, fields, None)
    with svc.db.read() as conn:
        found = keys.list_keys(conn, str(actor.account_id))
    response = render(request, "keys.html", nav="keys", keys=found, scopes=SCOPES, created=created)
    return response


@router.post("/keys/{key_id}/revoke")
def key_revoke(
    key_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    with _svc(request).db.write() as conn:
        keys.revoke_key(conn, actor=actor, account_id=str(actor.account_id), key_id=key_id)
    return _to("/keys")


# --- webhooks --------------------------------------------------------------------------------

WEBHOOK_NOTICES = {
    "enabled": "Enabled again: its waiting deliveries resume.",
    "deleted": "Deleted: nothing more is sent to that endpoint.",
}


def _webhook_list(
    request: Request, actor: Actor, *, created: dict[str, Any] | None = None
) -> Response:
    svc = _svc(request)
    # A write transaction: listing brings mailbox webhook_url subscriptions into step.
    with svc.db.write() as conn:
        hooks = webhooks.list_webhooks(conn, actor)
        recent = webhooks.list_deliveries(conn, actor, limit=20)["deliveries"]
    return render(
        request,
        "webhooks.html",
        nav="webhooks",
        webhooks=hooks,
        deliveries=recent,
        created=created,
        notice=WEBHOOK_NOTICES.get(request.query_params.get("ok", "")),
    )


def _webhook_page(
    request: Request, actor: Actor, webhook_id: str, *, rotated: dict[str, Any] | None = None
) -> Response:
    svc = _svc(request)
    with svc.db.read() as conn:
        hook = webhooks.get_webhook(conn, actor, webhook_id)
        found = webhooks.list_deliveries(
            conn,
            actor,
            webhook_id=webhook_id,
            status=request.query_params.get("status") or None,
            cursor=request.query_params.get("cursor") or None,
        )
    return render(
        request,
        "webhook.html",
        nav="webhooks",
        webhook=hook,
        deliveries=found["deliveries"],
        next_cursor=found["next_cursor"],
        rotated=rotated,
        notice=WEBHOOK_NOTICES.get(request.query_params.get("ok", "")),
    )


@router.get("/webhooks")
def webhook_list(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    return _webhook_list(request, actor)


@router.post("/webhooks")
def webhook_create(
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    """The signing secret is on this response only."""
    svc = _svc(request)
    names = [n.strip() for n in form.get("events", "").split(",") if n.strip()] or None
    with svc.db.write() as conn:
        created = webhooks.create_webhook(
            conn,
            svc,
            actor,
            form.get("url", "").strip(),
            names,
            form.get("mailbox", "").strip() or None,
            form.get("description", "").strip() or None,
        )
    return _webhook_list(request, actor, created=created)


@router.get("/webhooks/{webhook_id}")
def webhook_page(
    webhook_id: str, request: Request, actor: Actor = Depends(operator_actor)
) -> Response:
    return _webhook_page(request, actor, webhook_id)


@router.post("/webhooks/{webhook_id}/rotate")
def webhook_rotate(
    webhook_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    """The new secret is shown on this response only; the old one signs for a while longer."""
    with _svc(request).db.write() as conn:
        rotated = webhooks.rotate_secret(conn, actor, webhook_id)
    return _webhook_page(request, actor, rotated["id"], rotated=rotated)


@router.post("/webhooks/{webhook_id}/enable")
def webhook_enable(
    webhook_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    with _svc(request).db.write() as conn:
        enabled = webhooks.enable_webhook(conn, actor, webhook_id)
    return _to(f"/webhooks/{enabled['id']}", ok="enabled")


@router.post("/webhooks/{webhook_id}/delete")
def webhook_delete(
    webhook_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    with _svc(request).db.write() as conn:
        webhooks.delete_webhook(conn, actor, webhook_id)
    return _to("/webhooks", ok="deleted")


@router.post("/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver")
def webhook_redeliver(
    webhook_id: str,
    delivery_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    with _svc(request).db.write() as conn:
        webhooks.redeliver(conn, actor, webhook_id, delivery_id)
    return _to(f"/webhooks/{webhook_id}")


# --- domains ---------------------------------------------------------------------------------


def _default_domain(services: Services) -> dict[str, str]:
    """The DKIM record that lets receivers verify mail sent from the server's own domain."""
    name, value = default_dkim_record(services)
    return {"name": services.settings.domain, "dkim_name": name, "dkim_value": value}


def _domains_page(
    request: Request, actor: Actor, *, checked: dict[str, Any] | None = None
) -> Response:
    svc = _svc(request)
    with svc.db.read() as conn:
        found = domains.list_domains(conn, actor=actor, settings=svc.settings)
    return render(
        request,
        "domains.html",
        nav="domains",
        domains=found,
        server_domain=svc.settings.domain,
        default_domain=_default_domain(svc),
        checked=checked,
    )


@router.get("/domains")
def domain_list(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    return _domains_page(request, actor)


@router.post("/domains")
def domain_create(
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    svc = _svc(request)
    with svc.db.write() as conn:
        domains.create_domain(conn, actor=actor, settings=svc.settings, name=form.get("name", ""))
    return _to("/domains")


@router.post("/domains/{domain_id}/verify")
def domain_verify(
    domain_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    svc = _svc(request)
    with svc.db.read() as conn:
        row = domains.get_domain(conn, actor, domain_id)
    # DNS is asked outside any transaction: a slow resolver must not hold a database lock.
    results = domains.check_dns(row, svc.settings)
    with svc.db.write() as conn:
        checked = domains.verify_domain(
            conn, actor=actor, settings=svc.settings, ref=row["id"], results=results
        )
    return _domains_page(request, actor, checked=checked)


# --- audit -----------------------------------------------------------------------------------

AUDIT_FILTERS = ("action", "actor_id", "mailbox", "subject_id", "date_after", "date_before")


@router.get("/audit")
def audit_log(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    svc = _svc(request)
    chosen = {k: request.query_params.get(k, "").strip() for k in AUDIT_FILTERS}
    with svc.db.read() as conn:
        where = audit.make_filter(conn, actor, **{k: v or None for k, v in chosen.items()})
        page = audit.list_entries(
            conn, where, cursor=request.query_params.get("cursor") or None, limit=100
        )
    return render(
        request,
        "audit.html",
        nav="audit",
        entries=page["entries"],
        next_cursor=page["next_cursor"],
        chosen=chosen,
        verification=None,
    )


@router.post("/audit/verify")
def audit_verify(
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    svc = _svc(request)
    result = checkpoints.verify_log(svc).to_dict()
    with svc.db.read() as conn:
        page = audit.list_entries(conn, audit.make_filter(conn, actor), limit=100)
    return render(
        request,
        "audit.html",
        nav="audit",
        entries=page["entries"],
        next_cursor=page["next_cursor"],
        chosen=dict.fromkeys(AUDIT_FILTERS, ""),
        verification=result,
    )


# --- sandbox and usage -----------------------------------------------------------------------


@router.get("/sandbox")
def sandbox(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    svc = _svc(request)
    with svc.db.read() as conn:
        found = operators.captured_messages(
            conn, actor, cursor=request.query_params.get("cursor") or None
        )
    return render(
        request,
        "sandbox.html",
        nav="sandbox",
        emails=found["messages"],
        next_cursor=found["next_cursor"],
        base_url=svc.settings.base_url,
    )


@router.get("/usage")
def usage(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    svc = _svc(request)
    with svc.db.read() as conn:
        figures = inbox.usage(conn, actor, svc, period="daily")
        boxes = mailboxes.list_mailboxes(conn, actor)
    return render(request, "usage.html", nav="usage", usage=figures, mailbox_count=len(boxes))
