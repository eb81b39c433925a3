"""Mailboxes in the dashboard: list, create, settings, oversight mode, kill switches, allowlist.

An operator signed in here acts directly (no approval code): the services record them as the
actor of every change. The views only turn form strings into the values the services take.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from multimail.dashboard.auth import PREFIX, DashboardRoute, checked_form, operator_actor
from multimail.dashboard.auth import services_of as _svc
from multimail.dashboard.render import render
from multimail.domain.addresses import AddressError, normalize_address
from multimail.domain.oversight import GateTiming, OversightMode, is_loosening
from multimail.errors import InvalidInput
from multimail.services import accounts, approvals, mailboxes, oversight
from multimail.services.context import Actor

router = APIRouter(prefix=PREFIX, route_class=DashboardRoute, include_in_schema=False)

MODES = [m.value for m in OversightMode]
GATE_TIMINGS = [t.value for t in GateTiming]
MODE_HELP = {
    "read_only": "cannot send at all",
    "gated_all": "every outbound message and every inbound message waits for a person",
    "gated_send": "every outbound message waits for a person",
    "monitored": "sends at once; the operator gets a copy",
    "autonomous": "sends at once; recorded only",
}
NOTICES = {
    "saved": "Settings saved.",
    "unchanged": "Nothing changed.",
    "paused": "Paused: nothing from this mailbox is handed to the mail server until resumed.",
    "resumed": "Resumed: messages that waited are on their way.",
    "account_paused": "All sending is paused for the account until you resume it.",
    "account_resumed": "Sending is resumed for the account.",
    "allowed": "Added to the allowlist: mail only to allowlisted recipients skips approval.",
    "removed": "Removed from the allowlist.",
}
_LIST_SPLIT = re.compile(r"[,\s;]+")


def _to(path: str, outcome: str | None = None) -> RedirectResponse:
    suffix = f"?ok={outcome}" if outcome else ""
    return RedirectResponse(f"{PREFIX}{path}{suffix}", status_code=303)


def _notice(request: Request) -> str | None:
    return NOTICES.get(request.query_params.get("ok", ""))


# --- turning the settings form into changes ----------------------------------------------------


def _hours(value: str, field: str) -> int:
    try:
        hours = float(value)
    except ValueError:
        raise InvalidInput(f"{field}: give a number of hours", code="invalid_field") from None
    if not 0 < hours < 24 * 366:
        raise InvalidInput(f"{field}: between one minute and a year", code="invalid_field")
    return round(hours * 3600)


def _cap(value: str, field: str) -> int | None:
    if not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(
            f"{field}: a whole number, or empty for no cap", code="invalid_field"
        ) from None


def _addresses(value: str) -> list[str]:
    """Normalised so an untouched field compares equal to what is stored; a bad address is
    passed on as typed, for the service to refuse with its own message."""
    found = []
    for part in _LIST_SPLIT.split(value):
        if part:
            try:
                found.append(normalize_address(part))
            except AddressError:
                found.append(part)
    return found


def _text(value: str) -> str | None:
    text = value.replace("\r\n", "\n").strip()
    return text or None


def settings_changes(form: Mapping[str, str], current: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the form changes, as the service takes them (only fields that differ,
    so the audit entry lists what the operator actually changed)."""
    wanted: dict[str, Any] = {}
    for field in ("display_name", "signature", "webhook_url"):
        if field in form:
            wanted[field] = _text(form[field])
    for field in ("auto_cc", "auto_bcc"):
        if field in form:
            wanted[field] = _addresses(form[field])
    if "gate_timing" in form:
        wanted["gate_timing"] = form["gate_timing"]
    if "ai_disclosure" in form:
        wanted["ai_disclosure"] = form["ai_disclosure"] == "on"
    for field, name in (
        ("approval_timeout_seconds", "approval_timeout_hours"),
        ("approval_expiry_seconds", "approval_expiry_hours"),
    ):
        if name in form:
            wanted[field] = _hours(form[name], name.replace("_", " "))
    for field in ("send_cap_hour", "send_cap_day"):
        if field in form:
            wanted[field] = _cap(form[field], field.replace("_", " "))
    return {k: v for k, v in wanted.items() if v != current.get(k)}


# --- pages -----------------------------------------------------------------------------------


@router.get("/mailboxes")
def mailbox_list(request: Request, actor: Actor = Depends(operator_actor)) -> Response:
    svc = _svc(request)
    with svc.db.read() as conn:
        boxes = mailboxes.list_mailboxes(conn, actor)
        account = accounts.get_account(conn, str(actor.account_id))
    return render(
        request,
        "mailboxes.html",
        nav="mailboxes",
        mailboxes=boxes,
        account_paused=bool(account["paused"]),
        modes=MODES,
        mode_help=MODE_HELP,
        domain=svc.settings.domain,
        changed=request.query_params.get("changed"),
        notice=_notice(request),
    )


@router.get("/mailboxes/{mailbox_id}")
def mailbox_page(
    mailbox_id: str, request: Request, actor: Actor = Depends(operator_actor)
) -> Response:
    svc = _svc(request)
    with svc.db.read() as conn:
        box = mailboxes.mailbox_view(mailboxes.resolve(conn, actor, mailbox_id))
        account = accounts.get_account(conn, str(actor.account_id))
    allowed = approvals.list_allowlist(svc, actor, box["id"])["allowlist"]
    return render(
        request,
        "mailbox.html",
        nav="mailboxes",
        mailbox=box,
        allowlist=allowed,
        account_paused=bool(account["paused"]),
        modes=MODES,
        mode_help=MODE_HELP,
        gate_timings=GATE_TIMINGS,
        notice=_notice(request),
    )


@router.post("/mailboxes")
def mailbox_create(
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    fields: dict[str, Any] = {
        "address": form.get("address", "").strip() or None,
        "display_name": form.get("display_name", "").strip() or None,
        "oversight_mode": form.get("oversight_mode") or None,
    }
    if not fields["address"]:
        raise InvalidInput("give the mailbox an address", code="missing_address")
    if fields["address"] and "@" not in fields["address"]:
        fields["address_local_part"] = fields.pop("address")
    created = approvals.create_mailbox(_svc(request), actor, fields, None)
    return RedirectResponse(f"{PREFIX}/mailboxes?changed={created['id']}", status_code=303)


@router.post("/mailboxes/{mailbox_id}/settings")
def mailbox_settings(
    mailbox_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    svc = _svc(request)
    with svc.db.read() as conn:
        box = mailboxes.resolve(conn, actor, mailbox_id)
    changes = settings_changes(form, box)
    if not changes:
        return _to(f"/mailboxes/{box['id']}", "unchanged")
    approvals.update_mailbox(svc, actor, box["id"], changes, None)
    return _to(f"/mailboxes/{box['id']}", "saved")


@router.post("/mailboxes/{mailbox_id}/mode")
def mailbox_mode(
    mailbox_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    """Tightening applies at once; loosening shows a confirmation page first."""
    svc = _svc(request)
    wanted = form.get("oversight_mode", "")
    with svc.db.read() as conn:
        box = mailboxes.resolve(conn, actor, mailbox_id)
    if wanted not in MODES:
        raise InvalidInput(f"unknown oversight mode {wanted!r}", code="invalid_oversight_mode")
    loosening = is_loosening(OversightMode(box["oversight_mode"]), OversightMode(wanted))
    if loosening and form.get("confirm") != "yes":
        return render(
            request,
            "confirm_mode.html",
            nav="mailboxes",
            mailbox=mailboxes.mailbox_view(box),
            wanted=wanted,
            mode_help=MODE_HELP,
        )
    with svc.db.write() as conn:
        mailboxes.update_mailbox(
            conn, actor=actor, ref=box["id"], changes={"oversight_mode": wanted}
        )
    return RedirectResponse(f"{PREFIX}/mailboxes?changed={box['id']}", status_code=303)


@router.post("/mailboxes/{mailbox_id}/pause")
def mailbox_pause(
    mailbox_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    """The per-mailbox kill switch; ``paused=yes`` pauses, anything else resumes."""
    svc = _svc(request)
    pausing = form.get("paused") == "yes"
    done = (oversight.pause if pausing else oversight.resume)(svc, actor, mailbox_id)
    outcome = "paused" if pausing else "resumed"
    if form.get("back") == "mailbox":
        return _to(f"/mailboxes/{done['mailbox_id']}", outcome)
    return RedirectResponse(
        f"{PREFIX}/mailboxes?changed={done['mailbox_id']}&ok={outcome}", status_code=303
    )


@router.post("/account/pause")
def account_pause(
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    """The account-wide kill switch: every mailbox stops handing mail to SMTP."""
    pausing = form.get("paused") == "yes"
    (oversight.pause if pausing else oversight.resume)(_svc(request), actor, None)
    return _to("/mailboxes", "account_paused" if pausing else "account_resumed")


# --- the recipient allowlist -----------------------------------------------------------------


@router.post("/mailboxes/{mailbox_id}/allowlist")
def allowlist_add(
    mailbox_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    entry = approvals.add_allowlist(_svc(request), actor, mailbox_id, form.get("pattern", ""), None)
    return _to(f"/mailboxes/{entry['mailbox_id']}", "allowed")


@router.post("/mailboxes/{mailbox_id}/allowlist/{entry_id}/remove")
def allowlist_remove(
    mailbox_id: str,
    entry_id: str,
    request: Request,
    actor: Actor = Depends(operator_actor),
    form: dict[str, str] = Depends(checked_form),
) -> Response:
    """``entry_id`` is the entry's id (what the page links) or its pattern."""
    removed = approvals.remove_allowlist(_svc(request), actor, mailbox_id, entry_id)
    return _to(f"/mailboxes/{removed['mailbox_id']}", "removed")
