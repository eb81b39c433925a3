"""Issue 6: every state-changing call leaves an audit entry (SPEC §7), and nothing else does.

The cases are driven by the application's route table, like the BOLA and scopes matrices:
every route with a state-changing method (REST, tool-named, approval and unsubscribe links,
the dashboard's forms) must have a case below, so a route added later without one fails.
Each case is a VALID call by the rightful owner (the operator's admin key, the agent key for
sends, the reviewer key for decisions, the operator's dashboard session, an anonymous
one-click link) and names the actions it must append, with the actor and subject; message
actions must carry the mailbox's oversight mode. Calls that change nothing (reads, reads
over POST, refused requests) must append nothing but ``request.refused``. Mail arriving by
SMTP and delivery by the workers are audited as the system. At the end the chain verifies.
"""

from __future__ import annotations

import base64
import json
import re
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from typing import Any, Literal

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from multimail.api.app import create_app
from multimail.config import Settings
from multimail.ids import isoformat, utcnow
from multimail.runtime import build_services
from multimail.services import accounts, directory, notify
from multimail.services.context import SYSTEM, Services
from multimail.store.tables import audit_entries, mailboxes, operator_users
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers.inbound import run_inbound_worker, run_smtp
from multimail.workers.runner import run_workers
from tests.integration.oversight_support import key_id, last_code, message_row
from tests.integration.test_bola_matrix import CASES as BOLA_CASES
from tests.integration.test_bola_matrix import _walk

Who = Literal["admin", "agent", "reviewer", "operator", "anonymous"]
STATE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READ_ONLY: frozenset[str] = frozenset()

# State-changing methods that are not ours to walk here, each with the reason.
NOT_WALKED = {
    # MCP's streamable HTTP endpoint runs the same catalogue as the tool-named routes below.
    ("POST", "/mcp"),
    ("DELETE", "/mcp"),
}


@dataclass(frozen=True)
class Call:
    """One valid call. ``@name`` strings are replaced by the ids made during setup (or saved
    by an earlier case). ``expect`` is the set of actions of which at least one must appear,
    by ``actor`` (default: the caller) about ``subject``; empty means nothing may appear."""

    who: Who
    path: str
    expect: frozenset[str]
    body: Any = None
    form: dict[str, str] | None = None
    query: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    subject: str | None = None
    actor: Who | Literal["system", "link"] | None = None
    save: str | None = None


def does(*actions: str) -> frozenset[str]:
    return frozenset(actions)


SEND = {"to": ["partner@example.org"], "subject": "Numbers", "markdown": "Here they are."}
WIDE = ["*@partner.test"]

CASES: dict[tuple[str, str], Call] = {
    # --- dashboard: sign in first, sign out last (see the runner) -----------------------
    ("POST", "/dashboard/login"): Call(
        "anonymous", "/dashboard/login", does("operator.signed_in"), actor="operator"
    ),
    # --- account ------------------------------------------------------------------------
    ("PATCH", "/v1/account"): Call(
        "admin", "/v1/account", does("account.updated"), body={"name": "Acme Ltd"}, subject="@acc"
    ),
    ("POST", "/update_account"): Call(
        "admin", "/update_account", does("account.updated"), body={"name": "Acme"}, subject="@acc"
    ),
    # --- mailboxes ----------------------------------------------------------------------
    ("POST", "/v1/mailboxes"): Call(
        "admin",
        "/v1/mailboxes",
        does("mailbox.created"),
        body={"address": "made-rest@mm.test"},
        save="made_rest",
        subject="@made_rest",
    ),
    ("POST", "/create_mailbox"): Call(
        "admin",
        "/create_mailbox",
        does("mailbox.created"),
        body={"address_local_part": "made-tool"},
        save="made_tool",
        subject="@made_tool",
    ),
    ("PATCH", "/v1/mailboxes/{mailbox}"): Call(
        "admin",
        "/v1/mailboxes/@spare",
        does("mailbox.updated"),
        body={"display_name": "Spare desk"},
        subject="@spare",
    ),
    ("PATCH", "/v1/mailboxes/{mailbox}/configure"): Call(
        "admin",
        "/v1/mailboxes/@spare/configure",
        does("mailbox.updated", "mailbox.mode_changed"),
        body={"oversight_mode": "read_only"},
        subject="@spare",
    ),
    ("POST", "/configure_mailbox"): Call(
        "admin",
        "/configure_mailbox",
        does("mailbox.updated", "mailbox.mode_changed"),
        body={"mailbox_id": "@spare", "oversight_mode": "gated_all"},
        subject="@spare",
    ),
    ("POST", "/update_mailbox"): Call(
        "admin",
        "/update_mailbox",
        does("mailbox.updated"),
        body={"mailbox_id": "@spare", "display_name": "Spare again"},
        subject="@spare",
    ),
    ("DELETE", "/v1/mailboxes/{mailbox}"): Call(
        "admin", "/v1/mailboxes/@made_rest", does("mailbox.deleted"), subject="@made_rest"
    ),
    ("POST", "/delete_mailbox"): Call(
        "admin",
        "/delete_mailbox",
        does("mailbox.deleted"),
        body={"mailbox_id": "@made_tool"},
        subject="@made_tool",
    ),
    ("POST", "/v1/mailboxes/{mailbox}/request-upgrade"): Call(
        "agent",
        "/v1/mailboxes/@ladder/request-upgrade",
        does("mailbox.upgrade_requested", "approval_code.issued"),
        body={"target_mode": "monitored"},
    ),
    ("POST", "/v1/mailboxes/{mailbox}/upgrade"): Call(
        "agent",
        "/v1/mailboxes/@ladder/upgrade",
        does("mailbox.mode_changed"),
        body={"code": "@code"},
        subject="@ladder",
    ),
    ("POST", "/request_upgrade"): Call(
        "agent",
        "/request_upgrade",
        does("mailbox.upgrade_requested", "approval_code.issued"),
        body={"mailbox_id": "@ladder", "target_mode": "autonomous"},
    ),
    ("POST", "/apply_upgrade"): Call(
        "agent",
        "/apply_upgrade",
        does("mailbox.mode_changed"),
        body={"mailbox_id": "@ladder", "code": "@code"},
        subject="@ladder",
    ),
    ("POST", "/v1/mailboxes/{mailbox}/allowlist"): Call(
        "admin",
        "/v1/mailboxes/@spare/allowlist",
        does("allowlist.added"),
        body={"pattern": "*@partner.test"},
        save="alw",
    ),
    ("DELETE", "/v1/mailboxes/{mailbox}/allowlist/{entry}"): Call(
        "admin", "/v1/mailboxes/@spare/allowlist/@alw", does("allowlist.removed")
    ),
    ("DELETE", "/v1/mailboxes/{mailbox}/allowlist"): Call(
        "admin",
        "/v1/mailboxes/@spare/allowlist",
        does("allowlist.removed"),
        query={"pattern": "*@second.test"},
    ),
    ("POST", "/v1/oversight/pause"): Call(
        "reviewer",
        "/v1/oversight/pause",
        does("mailbox.paused"),
        body={"mailbox_id": "@spare"},
        subject="@spare",
    ),
    ("POST", "/v1/oversight/resume"): Call(
        "reviewer",
        "/v1/oversight/resume",
        does("mailbox.resumed"),
        body={"mailbox_id": "@spare"},
        subject="@spare",
    ),
    # --- keys, contacts, suppressions, domains ------------------------------------------
    ("POST", "/v1/api-keys"): Call(
        "admin",
        "/v1/api-keys",
        does("api_key.created"),
        body={"name": "ci", "scopes": ["read"]},
        save="key_rest",
        subject="@key_rest",
    ),
    ("DELETE", "/v1/api-keys/{key_id}"): Call(
        "admin", "/v1/api-keys/@key_rest", does("api_key.revoked"), subject="@key_rest"
    ),
    ("POST", "/create_api_key"): Call(
        "admin",
        "/create_api_key",
        does("api_key.created"),
        body={"name": "cron", "scopes": ["read"]},
        save="key_tool",
        subject="@key_tool",
    ),
    ("POST", "/revoke_api_key"): Call(
        "admin",
        "/revoke_api_key",
        does("api_key.revoked"),
        body={"key_id": "@key_tool"},
        subject="@key_tool",
    ),
    ("POST", "/v1/contacts"): Call(
        "admin",
        "/v1/contacts",
        does("contact.created"),
        body={"email": "jane@example.org"},
        save="con_rest",
        subject="@con_rest",
    ),
    ("DELETE", "/v1/contacts/{contact_id}"): Call(
        "admin", "/v1/contacts/@con_rest", does("contact.deleted"), subject="@con_rest"
    ),
    ("POST", "/add_contact"): Call(
        "agent",
        "/add_contact",
        does("contact.created"),
        body={"email": "joe@example.org"},
        save="con_tool",
        subject="@con_tool",
    ),
    ("POST", "/delete_contact"): Call(
        "admin",
        "/delete_contact",
        does("contact.deleted"),
        body={"contact_id": "@con_tool"},
        subject="@con_tool",
    ),
    ("DELETE", "/v1/suppression/{address}"): Call(
        "admin", "/v1/suppression/blocked-1@example.org", does("suppression.removed")
    ),
    ("POST", "/remove_suppression"): Call(
        "admin",
        "/remove_suppression",
        does("suppression.removed"),
        body={"address": "blocked-2@example.org"},
    ),
    ("POST", "/v1/domains"): Call(
        "admin",
        "/v1/domains",
        does("domain.created"),
        body={"domain": "acme.example"},
        save="dom",
        subject="@dom",
    ),
    ("POST", "/v1/domains/{domain_id}/verify"): Call(
        "admin",
        "/v1/domains/@dom/verify",
        does("domain.verified", "domain.verification_failed"),
        subject="@dom",
    ),
    ("DELETE", "/v1/domains/{domain_id}"): Call(
        "admin", "/v1/domains/@dom", does("domain.deleted"), subject="@dom"
    ),
    # --- webhooks -----------------------------------------------------------------------
    ("POST", "/v1/webhooks"): Call(
        "admin",
        "/v1/webhooks",
        does("webhook.created"),
        body={"url": "http://127.0.0.1:9/rest", "events": ["message.received"]},
        save="whk_rest",
        subject="@whk_rest",
    ),
    ("POST", "/v1/webhooks/{webhook_id}/rotate-secret"): Call(
        "admin",
        "/v1/webhooks/@whk_rest/rotate-secret",
        does("webhook.secret_rotated"),
        subject="@whk_rest",
    ),
    ("POST", "/v1/webhooks/{webhook_id}/enable"): Call(
        "admin", "/v1/webhooks/@whk_rest/enable", does("webhook.enabled"), subject="@whk_rest"
    ),
    ("POST", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"): Call(
        "admin",
        "/v1/webhooks/@whk/deliveries/@dlv/redeliver",
        does("webhook.redelivered"),
        subject="@whk",
    ),
    ("DELETE", "/v1/webhooks/{webhook_id}"): Call(
        "admin", "/v1/webhooks/@whk_rest", does("webhook.deleted"), subject="@whk_rest"
    ),
    ("POST", "/create_webhook"): Call(
        "admin",
        "/create_webhook",
        does("webhook.created"),
        body={"url": "http://127.0.0.1:9/tool", "events": ["message.received"]},
        save="whk_tool",
        subject="@whk_tool",
    ),
    ("POST", "/delete_webhook"): Call(
        "admin",
        "/delete_webhook",
        does("webhook.deleted"),
        body={"webhook_id": "@whk_tool"},
        subject="@whk_tool",
    ),
    # --- sending (the agent) and cancelling ---------------------------------------------
    ("POST", "/v1/mailboxes/{mailbox}/send"): Call(
        "agent",
        "/v1/mailboxes/@mbx/send",
        does("message.created"),
        body=SEND,
        save="sent_rest",
        subject="@sent_rest",
    ),
    ("POST", "/v1/send"): Call(
        "agent",
        "/v1/send",
        does("message.created"),
        body={**SEND, "from": "@addr"},
        save="sent_short",
        subject="@sent_short",
    ),
    ("POST", "/send_email"): Call(
        "agent",
        "/send_email",
        does("message.created"),
        body={**SEND, "mailbox_id": "@mbx"},
        save="sent_tool",
        subject="@sent_tool",
    ),
    ("POST", "/schedule_email"): Call(
        "agent",
        "/schedule_email",
        does("message.created"),
        body={**SEND, "from": "@addr", "send_at": "@later_at"},
        save="later",
        subject="@later",
    ),
    ("PATCH", "/v1/mailboxes/{mailbox}/emails/{email_id}/schedule"): Call(
        "agent",
        "/v1/mailboxes/@mbx/emails/@later/schedule",
        does("message.schedule_edited"),
        body={"subject": "Numbers (v2)"},
        subject="@later",
    ),
    ("PATCH", "/v1/emails/{email_id}/schedule"): Call(
        "agent",
        "/v1/emails/@later/schedule",
        does("message.schedule_edited"),
        body={"subject": "Numbers (v3)"},
        subject="@later",
    ),
    ("POST", "/edit_scheduled_email"): Call(
        "agent",
        "/edit_scheduled_email",
        does("message.schedule_edited"),
        body={"message_id": "@later", "subject": "Numbers (v4)"},
        subject="@later",
    ),
    ("POST", "/v1/mailboxes/{mailbox}/reply/{email_id}"): Call(
        "agent",
        "/v1/mailboxes/@mbx/reply/@inb1",
        does("message.created"),
        body={"markdown": "Thanks!"},
    ),
    ("POST", "/v1/emails/{email_id}/reply"): Call(
        "agent", "/v1/emails/@inb2/reply", does("message.created"), body={"markdown": "Thanks!"}
    ),
    ("POST", "/reply_email"): Call(
        "agent",
        "/reply_email",
        does("message.created"),
        body={"message_id": "@inb3", "body": "Thanks!"},
    ),
    ("POST", "/v1/mailboxes/{mailbox}/emails/{email_id}/cancel"): Call(
        "agent",
        "/v1/mailboxes/@mbx/emails/@sent_rest/cancel",
        does("message.cancelled"),
        subject="@sent_rest",
    ),
    ("POST", "/v1/cancel/{email_id}"): Call(
        "agent", "/v1/cancel/@sent_short", does("message.cancelled"), subject="@sent_short"
    ),
    ("POST", "/cancel_message"): Call(
        "agent",
        "/cancel_message",
        does("message.cancelled"),
        body={"message_id": "@later"},
        subject="@later",
    ),
    # --- decisions (the reviewer, the operator's session, a one-click link) -------------
    ("POST", "/v1/oversight/decide"): Call(
        "reviewer",
        "/v1/oversight/decide",
        does("message.approved"),
        body={"email_id": "@p1", "action": "approve"},
        subject="@p1",
    ),
    ("POST", "/decide_email"): Call(
        "reviewer",
        "/decide_email",
        does("message.rejected"),
        body={"message_id": "@p2", "decision": "reject", "note": "not now"},
        subject="@p2",
    ),
    ("POST", "/v1/approve/{token}"): Call(
        "anonymous", "@approve_link", does("message.approved"), subject="@p3", actor="link"
    ),
    ("POST", "/v1/unsubscribe/{token}"): Call(
        "anonymous",
        "@unsubscribe_link",
        does("suppression.added"),
        form={"List-Unsubscribe": "One-Click"},
        actor="system",
    ),
    ("POST", "/dashboard/messages/{message_id}/approve"): Call(
        "operator",
        "/dashboard/messages/@p4/approve",
        does("message.approved"),
        form={},
        subject="@p4",
    ),
    ("POST", "/dashboard/messages/{message_id}/edit"): Call(
        "operator",
        "/dashboard/messages/@p5/edit",
        does("message.approved"),
        form={"op": "approve", "markdown": "Here they are, edited."},
        subject="@p5",
    ),
    ("POST", "/dashboard/messages/{message_id}/reject"): Call(
        "operator",
        "/dashboard/messages/@p6/reject",
        does("message.rejected"),
        form={"note": "Too pushy."},
        subject="@p6",
    ),
    ("POST", "/dashboard/messages/{message_id}/cancel"): Call(
        "operator",
        "/dashboard/messages/@p7/cancel",
        does("message.cancelled"),
        form={},
        subject="@p7",
    ),
    # --- inbound, tags, spam ------------------------------------------------------------
    ("POST", "/v1/inbound"): Call(
        "admin",
        "/v1/inbound",
        does("inbound.accepted"),
        content=b"@raw",
    ),
    ("PUT", "/v1/mailboxes/{mailbox}/emails/{email_id}/tags"): Call(
        "agent",
        "/v1/mailboxes/@mbx/emails/@inb4/tags",
        does("message.tagged"),
        body={"case": "42"},
        subject="@inb4",
    ),
    ("DELETE", "/v1/mailboxes/{mailbox}/emails/{email_id}/tags/{key}"): Call(
        "agent",
        "/v1/mailboxes/@mbx/emails/@inb4/tags/case",
        does("message.untagged"),
        subject="@inb4",
    ),
    ("PUT", "/v1/emails/{email_id}/tags"): Call(
        "agent",
        "/v1/emails/@inb4/tags",
        does("message.tagged"),
        body={"vip": True},
        subject="@inb4",
    ),
    ("POST", "/tag_email"): Call(
        "agent",
        "/tag_email",
        does("message.tagged"),
        body={"message_id": "@inb4", "tags": ["follow-up"]},
        subject="@inb4",
    ),
    ("POST", "/v1/emails/{email_id}/report-spam"): Call(
        "agent", "/v1/emails/@inb5/report-spam", does("message.reported_spam"), subject="@inb5"
    ),
    ("POST", "/v1/emails/{email_id}/not-spam"): Call(
        "agent", "/v1/emails/@inb5/not-spam", does("message.not_spam"), subject="@inb5"
    ),
    ("POST", "/report_spam"): Call(
        "agent",
        "/report_spam",
        does("message.reported_spam"),
        body={"message_id": "@inb6"},
        subject="@inb6",
    ),
    ("POST", "/not_spam"): Call(
        "agent",
        "/not_spam",
        does("message.not_spam"),
        body={"message_id": "@inb6"},
        subject="@inb6",
    ),
    ("POST", "/read_email"): Call(
        "agent",
        "/read_email",
        does("message.read"),
        body={"message_id": "@inb7"},
        subject="@inb7",
    ),
    # --- dashboard forms ----------------------------------------------------------------
    ("POST", "/dashboard/mailboxes"): Call(
        "operator",
        "/dashboard/mailboxes",
        does("mailbox.created"),
        form={"address": "made-dash@mm.test", "oversight_mode": "gated_send"},
    ),
    ("POST", "/dashboard/mailboxes/{mailbox_id}/mode"): Call(
        "operator",
        "/dashboard/mailboxes/@spare/mode",
        does("mailbox.updated", "mailbox.mode_changed"),
        form={"oversight_mode": "monitored", "confirm": "yes"},
        subject="@spare",
    ),
    ("POST", "/dashboard/mailboxes/{mailbox_id}/pause"): Call(
        "operator",
        "/dashboard/mailboxes/@spare/pause",
        does("mailbox.paused"),
        form={"paused": "yes"},
        subject="@spare",
    ),
    ("POST", "/dashboard/keys"): Call(
        "operator",
        "/dashboard/keys",
        does("api_key.created"),
        form={"name": "dash", "scope_read": "on"},
    ),
    ("POST", "/dashboard/keys/{key_id}/revoke"): Call(
        "operator", "/dashboard/keys/@key/revoke", does("api_key.revoked"), form={}, subject="@key"
    ),
    ("POST", "/dashboard/webhooks"): Call(
        "operator",
        "/dashboard/webhooks",
        does("webhook.created"),
        form={"url": "http://127.0.0.1:9/dash", "events": "message.received"},
    ),
    ("POST", "/dashboard/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"): Call(
        "operator",
        "/dashboard/webhooks/@whk/deliveries/@dlv/redeliver",
        does("webhook.redelivered"),
        form={},
        subject="@whk",
    ),
    ("POST", "/dashboard/mailboxes/{mailbox_id}/settings"): Call(
        "operator",
        "/dashboard/mailboxes/@spare/settings",
        does("mailbox.updated"),
        form={"display_name": "Spare desk", "signature": "-- \nThe desk"},
        subject="@spare",
    ),
    ("POST", "/dashboard/mailboxes/{mailbox_id}/allowlist"): Call(
        "operator",
        "/dashboard/mailboxes/@spare/allowlist",
        does("allowlist.added"),
        form={"pattern": "dash@partner.test"},
        subject="@spare",
    ),
    ("POST", "/dashboard/mailboxes/{mailbox_id}/allowlist/{entry_id}/remove"): Call(
        "operator",
        "/dashboard/mailboxes/@spare/allowlist/dash@partner.test/remove",
        does("allowlist.removed"),
        form={},
        subject="@spare",
    ),
    # Resuming (not pausing) the account: a paused account would hold the delivery below.
    ("POST", "/dashboard/account/pause"): Call(
        "operator", "/dashboard/account/pause", does("account.resumed"), form={"paused": "no"}
    ),
    ("POST", "/dashboard/queue/batch"): Call(
        "operator",
        "/dashboard/queue/batch",
        does("message.rejected"),
        form={"op": "reject", "ids": "@p9", "note": "Not in a batch."},
        subject="@p9",
    ),
    ("POST", "/dashboard/webhooks/{webhook_id}/rotate"): Call(
        "operator",
        "/dashboard/webhooks/@whk_dash/rotate",
        does("webhook.secret_rotated"),
        form={},
        subject="@whk_dash",
    ),
    ("POST", "/dashboard/webhooks/{webhook_id}/enable"): Call(
        "operator",
        "/dashboard/webhooks/@whk_dash/enable",
        does("webhook.enabled"),
        form={},
        subject="@whk_dash",
    ),
    ("POST", "/dashboard/webhooks/{webhook_id}/delete"): Call(
        "operator",
        "/dashboard/webhooks/@whk_dash/delete",
        does("webhook.deleted"),
        form={},
        subject="@whk_dash",
    ),
    ("POST", "/dashboard/domains"): Call(
        "operator",
        "/dashboard/domains",
        does("domain.created"),
        form={"name": "dash.example"},
    ),
    ("POST", "/dashboard/domains/{domain_id}/verify"): Call(
        "operator",
        "/dashboard/domains/@dom2/verify",
        does("domain.verified", "domain.verification_failed"),
        form={},
        subject="@dom2",
    ),
    # --- calls that change nothing: reads over POST, verification, a test ping ----------
    ("POST", "/dashboard/audit/verify"): Call(
        "operator", "/dashboard/audit/verify", READ_ONLY, form={}
    ),
    ("POST", "/v1/audit-log/verify"): Call(
        "admin", "/v1/audit-log/verify", READ_ONLY, body={"checkpoint": []}
    ),
    ("POST", "/v1/verify"): Call("admin", "/v1/verify", READ_ONLY, body={"raw": "@plain"}),
    ("POST", "/verify_message"): Call(
        "agent", "/verify_message", READ_ONLY, body={"raw": "@plain"}
    ),
    ("POST", "/v1/webhooks/test"): Call(
        "admin", "/v1/webhooks/test", READ_ONLY, body={"url": "http://127.0.0.1:9/ping"}
    ),
    ("POST", "/list_mailboxes"): Call("agent", "/list_mailboxes", READ_ONLY, body={}),
    ("POST", "/check_inbox"): Call("agent", "/check_inbox", READ_ONLY, body={"mailbox_id": "@mbx"}),
    ("POST", "/get_thread"): Call("agent", "/get_thread", READ_ONLY, body={"thread_id": "@thr"}),
    ("POST", "/download_attachment"): Call(
        "agent",
        "/download_attachment",
        READ_ONLY,
        body={"message_id": "@p8", "filename": "numbers.txt"},
    ),
    ("POST", "/wait_for_email"): Call(
        "agent", "/wait_for_email", READ_ONLY, body={"mailbox_id": "@mbx", "timeout": 0}
    ),
    ("POST", "/list_pending"): Call(
        "reviewer", "/list_pending", READ_ONLY, body={"mailbox_id": "@mbx"}
    ),
    ("POST", "/get_account"): Call("admin", "/get_account", READ_ONLY, body={}),
    ("POST", "/get_usage"): Call("admin", "/get_usage", READ_ONLY, body={}),
    ("POST", "/list_spam"): Call("agent", "/list_spam", READ_ONLY, body={"mailbox_id": "@mbx"}),
    ("POST", "/search_contacts"): Call("agent", "/search_contacts", READ_ONLY, body={"q": "j"}),
    ("POST", "/check_suppression"): Call(
        "agent", "/check_suppression", READ_ONLY, body={"address": "x@example.org"}
    ),
    ("POST", "/list_api_keys"): Call("admin", "/list_api_keys", READ_ONLY, body={}),
    ("POST", "/get_audit_log"): Call("admin", "/get_audit_log", READ_ONLY, body={}),
    ("POST", "/list_webhooks"): Call("admin", "/list_webhooks", READ_ONLY, body={}),
    ("POST", "/search_identity"): Call(
        "agent", "/search_identity", READ_ONLY, body={"address": "@addr"}
    ),
    # A signed checkpoint is the chain's own proof of its head, not an entry in it.
    ("POST", "/v1/audit-log/checkpoints"): Call("admin", "/v1/audit-log/checkpoints", READ_ONLY),
    # --- last: sign out, then the account goes away -------------------------------------
    ("POST", "/dashboard/logout"): Call(
        "operator", "/dashboard/logout", does("operator.signed_out"), form={}
    ),
    ("DELETE", "/v1/account"): Call(
        "admin", "/v1/account", does("account.deactivated"), subject="@acc"
    ),
}

# Run after the sweeps below, in this order: the session ends, then the account goes away.
LAST = (("POST", "/dashboard/logout"), ("DELETE", "/v1/account"))

# An approval link's holder is a person (the address it was mailed to), not a session: a
# user with no id, named after the link.
ACTOR_TYPE = {"admin": "key", "agent": "key", "reviewer": "key", "operator": "user", "link": "user"}


def state_routes(app: Any) -> set[tuple[str, str]]:
    table = set()
    for route in _walk(app.routes):
        for method in (route.methods or set()) & STATE_METHODS:
            table.add((method, route.path))
    return table - NOT_WALKED


def test_every_state_changing_route_has_an_audit_case(services: Services) -> None:
    """Each POST/PUT/PATCH/DELETE route of the app has a case here; a new route without one
    fails until someone says which audit entry it writes (or why it writes none)."""
    routes = state_routes(create_app(services))
    missing = sorted(routes - set(CASES))
    assert not missing, f"state-changing route without an audit case: {missing}"
    stale = sorted(set(CASES) - routes)
    assert not stale, f"audit cases for routes that no longer exist: {stale}"


# --- the walk -------------------------------------------------------------------------


class Walk:
    """A live server with workers, inbound SMTP and a capturing relay; clients for each
    rightful owner; and the ids the cases refer to."""

    def __init__(self, services: Services, server: LiveServer, boot: accounts.Bootstrap):
        self.services = services
        self.server = server
        self.boot = boot
        account_id = boot.account["id"]
        self.clients = {
            who: self.client_for(getattr(boot, f"{who}_key"))
            for who in ("admin", "agent", "reviewer")
        }
        self.browser = httpx.Client(base_url=server.base_url, timeout=30)
        self.anonymous = httpx.Client(base_url=server.base_url, timeout=30)
        self.actor_ids: dict[str, str | None] = {
            who: key_id(services, who, account_id) for who in self.clients
        }
        self.actor_ids["link"] = None
        self.csrf = ""
        self.ids: dict[str, str] = {"acc": account_id}

    def client_for(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def close(self) -> None:
        for client in (*self.clients.values(), self.browser, self.anonymous):
            client.close()

    def ok(self, response: httpx.Response) -> dict[str, Any]:
        assert response.status_code < 300, (response.request.url, response.text)
        body: dict[str, Any] = response.json()
        return body

    def head(self) -> int:
        with self.services.db.read() as conn:
            found = conn.execute(select(audit_entries.c.seq).order_by(audit_entries.c.seq.desc()))
            return int(found.scalars().first() or 0)

    def entries_after(self, seq: int) -> list[dict[str, Any]]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(audit_entries).where(audit_entries.c.seq > seq).order_by(audit_entries.c.seq)
            ).mappings()
            return [dict(r) | {"details": json.loads(r["details"] or "{}")} for r in rows]

    def mode_of(self, mailbox_id: str) -> str:
        with self.services.db.read() as conn:
            return str(
                conn.execute(
                    select(mailboxes.c.oversight_mode).where(mailboxes.c.id == mailbox_id)
                ).scalar_one()
            )

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            for name in sorted(self.ids, key=len, reverse=True):
                value = value.replace(f"@{name}", self.ids[name])
            return value
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        return value

    def sign_in(self) -> httpx.Response:
        page = self.browser.get("/dashboard/login")
        response = self.browser.post(
            "/dashboard/login",
            data={
                "email": self.boot.operator_email,
                "password": self.boot.operator_password,
                "csrf_token": _csrf(page.text),
            },
        )
        self.csrf = _csrf(self.browser.get("/dashboard/queue").text)
        with self.services.db.read() as conn:
            self.actor_ids["operator"] = conn.execute(
                select(operator_users.c.id).where(
                    operator_users.c.email == self.boot.operator_email
                )
            ).scalar_one()
        return response

    def call(self, key: tuple[str, str], case: Call) -> httpx.Response:
        if key == ("POST", "/dashboard/login"):
            return self.sign_in()
        method, path = key[0], self.fill(case.path)
        kwargs: dict[str, Any] = {"params": self.fill(case.query)}
        if case.body is not None:
            kwargs["json"] = self.fill(case.body)
        if case.content is not None:
            kwargs["content"] = self.fill(case.content.decode()).encode()
            kwargs["headers"] = {"content-type": "message/rfc822"}
        if case.form is not None:
            kwargs["data"] = self.fill(case.form)
        if case.who == "operator":
            kwargs["data"] = {**kwargs.get("data", {}), "csrf_token": self.csrf}
            return self.browser.request(method, path, **kwargs)
        if case.who == "anonymous":
            return self.anonymous.request(method, path, **kwargs)
        return self.clients[case.who].request(method, path, **kwargs)

    def check(self, key: tuple[str, str], case: Call) -> list[str]:
        """Run one case; return what is wrong with its audit entries (empty when right)."""
        before = self.head()
        response = self.call(key, case)
        where = f"{key[0]} {key[1]}"
        if response.status_code >= 400:
            return [f"{where}: {response.status_code} {response.text[:300]}"]
        if case.save:
            self.ids[case.save] = _saved_id(response)
        if "approval_code.issued" in case.expect:
            self.ids["code"] = last_code(self.services)
        new = self.entries_after(before)
        problems = [f"{where}: {p}" for p in self.mode_problems(new)]
        if not case.expect:
            # Workers append as the system at any time; a read must add nothing of its own.
            ours = [e["action"] for e in new if e["actor_type"] != "system"]
            return problems + (
                [f"{where}: a call that changes nothing wrote {ours}"] if ours else []
            )
        who = case.actor or case.who
        matching = [
            e
            for e in new
            if e["action"] in case.expect
            and e["actor_type"] == ACTOR_TYPE.get(who, "system")
            and (who == "system" or e["actor_id"] == self.actor_ids[who])
            and e["account_id"] == self.ids["acc"]
        ]
        if not matching:
            seen = [(e["action"], e["actor_type"], e["actor_name"]) for e in new]
            return [*problems, f"{where}: no {sorted(case.expect)} by {who}; saw {seen}"]
        if case.subject and not any(e["subject_id"] == self.fill(case.subject) for e in matching):
            subjects = [(e["subject_type"], e["subject_id"]) for e in matching]
            problems.append(f"{where}: subject {self.fill(case.subject)} not in {subjects}")
        return problems

    def mode_problems(self, new: list[dict[str, Any]]) -> list[str]:
        """A message's entries carry the oversight mode of its mailbox (stable in this walk:
        the messages all live in the desk mailbox, whose mode no case changes)."""
        wrong = []
        for entry in new:
            if entry["subject_type"] != "message" or entry["action"] == "request.refused":
                continue
            box = entry["mailbox_id"]
            if box is None or entry["oversight_mode"] != self.mode_of(box):
                wrong.append(f"{entry['action']} has mode {entry['oversight_mode']} (box {box})")
        return wrong


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def _saved_id(response: httpx.Response) -> str:
    body = response.json()
    for name in ("id", "key_id", "message_id"):
        if isinstance(body.get(name), str):
            return str(body[name])
    for value in body.values():
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            return str(value["id"])
    raise AssertionError(f"no id in {body}")


def _raw(to: str, subject: str) -> str:
    message = EmailMessage()
    message["From"] = "Customer <customer@example.org>"
    message["To"] = to
    message["Subject"] = subject
    message.set_content("A question for the desk.")
    return message.as_string()


@pytest.fixture
def walk(
    settings: Settings, boot: accounts.Bootstrap, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Walk]:
    with CapturingSMTPServer() as relay:
        svc = build_services(
            settings.model_copy(
                update={
                    "smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}"),
                    "smtp_port": 0,
                    "allow_private_webhooks": True,
                    "allow_http_webhooks": True,
                }
            ),
            run_migrations=False,
        )
        components = [run_workers, run_smtp, run_inbound_worker]
        with LiveServer(svc, components=components) as server:
            walk = Walk(svc, server, boot)
            try:
                setup(walk)
                yield walk
            finally:
                walk.close()
        svc.db.dispose()


def setup(walk: Walk) -> None:
    """The objects the cases act on, made as their owners would (the entries this writes
    come before every case's own head)."""
    admin, agent = walk.clients["admin"], walk.clients["agent"]
    ids = walk.ids
    desk = walk.ok(
        admin.post(
            "/v1/mailboxes", json={"address": "desk@mm.test", "oversight_mode": "gated_send"}
        )
    )
    ids.update(mbx=desk["id"], addr=desk["address"])
    ids["later_at"] = str(isoformat(utcnow() + timedelta(days=30)))
    hook = walk.ok(
        admin.post(
            "/v1/webhooks", json={"url": "http://127.0.0.1:9/a", "events": ["message.received"]}
        )
    )
    ids["whk"] = hook["id"]
    ids["whk_dash"] = walk.ok(
        admin.post(
            "/v1/webhooks", json={"url": "http://127.0.0.1:9/dash", "events": ["message.received"]}
        )
    )["id"]
    for name in ("spare", "ladder"):
        box = walk.ok(
            admin.post(
                "/v1/mailboxes",
                json={"address": f"{name}@mm.test", "oversight_mode": "gated_send"},
            )
        )
        ids[name] = box["id"]
    walk.ok(
        admin.post(f"/v1/mailboxes/{ids['spare']}/allowlist", json={"pattern": "*@second.test"})
    )
    attachment = {"filename": "numbers.txt", "content_base64": "MTIz", "content_type": "text/plain"}
    for n in range(1, 10):
        sent = walk.ok(
            agent.post(
                f"/v1/mailboxes/{ids['mbx']}/send",
                json={**SEND, "subject": f"Pending {n}", "attachments": [attachment]},
            )
        )
        assert sent["status"] == "pending_send_approval", sent
        ids[f"p{n}"] = sent["id"]
    ids["thr"] = sent["thread_id"]
    for n in range(1, 8):
        got = walk.ok(
            admin.post(
                "/v1/inbound",
                json={
                    "raw_base64": _b64(_raw("desk@mm.test", f"Question {n}")),
                    "rcpt_to": ["desk@mm.test"],
                },
            )
        )
        ids[f"inb{n}"] = got["message_ids"][0]
    ids["raw"] = _raw("desk@mm.test", "Question by REST").replace("\n", "\r\n")
    ids["plain"] = _raw("someone@example.org", "Verify me")
    ids["key"] = walk.ok(admin.post("/v1/api-keys", json={"name": "old", "scopes": ["read"]}))["id"]
    ids["con"] = walk.ok(admin.post("/v1/contacts", json={"email": "keep@example.org"}))["id"]
    ids["dom2"] = walk.ok(admin.post("/v1/domains", json={"domain": "second.example"}))["id"]
    deliveries = walk.ok(admin.get(f"/v1/webhooks/{hook['id']}/deliveries"))
    ids["dlv"] = next(iter(deliveries.values()))[0]["id"]
    with walk.services.db.write() as conn:
        for n in (1, 2):
            directory.suppress(
                conn,
                actor=SYSTEM,
                account_id=ids["acc"],
                address=f"blocked-{n}@example.org",
                reason="manual",
            )
    approve = notify.approval_link(walk.services, message_row(walk.services, ids["p3"]), "approve")
    ids["approve_link"] = "/v1/approve/" + approve.rsplit("/v1/approve/", 1)[1]
    unsubscribe = notify.unsubscribe_url(walk.services, ids["acc"], "bob@example.org")
    ids["unsubscribe_link"] = "/v1/unsubscribe/" + unsubscribe.rsplit("/", 1)[1]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def wait_for_entry(walk: Walk, after: int, action: str, subject_id: str | None) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for entry in walk.entries_after(after):
            if entry["action"] == action and subject_id in (None, entry["subject_id"]):
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no {action} for {subject_id} within 20 s")


def test_every_state_change_is_audited_and_nothing_else_is(walk: Walk) -> None:
    """Every state-changing route, called validly by its rightful owner, appends an entry
    with that actor, the action and the subject (message entries with the mailbox's mode);
    SMTP arrival and delivery are audited as the system; reads and refusals append nothing
    but ``request.refused``; the chain then verifies."""
    start = walk.head()
    problems: list[str] = []
    for key, case in CASES.items():
        if key not in LAST:
            problems += walk.check(key, case)

    # Mail arriving over SMTP is received by the system, with the desk's mode.
    before = walk.head()
    port = int(walk.services.extras["smtp_port"])  # type: ignore[call-overload]
    with smtplib.SMTP("127.0.0.1", port) as smtp:
        smtp.sendmail("customer@example.org", ["desk@mm.test"], _raw("desk@mm.test", "By SMTP"))
    received = wait_for_entry(walk, before, "message.received", None)
    assert received["actor_type"] == "system" and received["mailbox_id"] == walk.ids["mbx"]
    # The message approved by the reviewer is delivered, and the system says so.
    delivered = wait_for_entry(walk, start, "message.delivered", walk.ids["p1"])
    assert delivered["actor_type"] == "system", delivered

    problems += reads_write_nothing(walk)
    problems += refusals_write_only_refusals(walk)
    for key in LAST:
        problems += walk.check(key, CASES[key])
    problems += walk.mode_problems(walk.entries_after(start))
    assert not problems, "\n".join(problems)

    # The account is gone; another account's operator verifies the one chain.
    other = accounts.bootstrap(walk.services.db, account_name="Other", operator_email="o@x.test")
    with walk.client_for(other.admin_key) as client:
        verdict = walk.ok(client.get("/v1/audit-log/verify"))
    assert verdict["ok"] is True, verdict


def reads_write_nothing(walk: Walk) -> list[str]:
    """Every GET route of the API (the BOLA matrix's cases, aimed at this account's own
    objects), the dashboard's pages and an approval link's preview append nothing (but the
    ``AUDITED_READS``)."""
    admin, agent = walk.clients["admin"], walk.clients["agent"]
    agent.get(f"/v1/emails/{walk.ids['inb1']}")  # marking it read is a change; done here
    ids = dict(walk.ids, msg=walk.ids["p8"], inb=walk.ids["inb1"], alw="alw_none")
    ids["sup"] = "blocked-1@example.org"
    before = walk.head()
    statuses: list[str] = []
    for (method, path), case in BOLA_CASES.items():
        if method != "GET":
            continue
        url = path.format(**{k: _fill_ids(v, ids) for k, v in case.path.items()})
        query = {k: _fill_ids(v, ids) for k, v in case.query.items()}
        for client in (admin, agent):
            response = client.get(url, params=query)
            if response.status_code >= 500:
                statuses.append(f"GET {path}: {response.status_code}")
    for page in ("queue", "messages", "mailboxes", "keys", "webhooks", "domains", "audit"):
        walk.browser.get(f"/dashboard/{page}")
    walk.anonymous.get(walk.ids["approve_link"].replace(walk.ids["p3"], walk.ids["p8"]))
    approve = notify.approval_link(
        walk.services, message_row(walk.services, walk.ids["p8"]), "approve"
    )
    walk.anonymous.get("/v1/approve/" + approve.rsplit("/v1/approve/", 1)[1])
    wrote = [
        (e["action"], e["subject_id"])
        for e in walk.entries_after(before)
        if e["actor_type"] != "system" and e["action"] not in ("request.refused", *AUDITED_READS)
    ]
    return statuses + ([f"reads wrote {wrote}"] if wrote else [])


# Reads the log records on purpose: who took a copy of the whole account (GET /v1/export).
AUDITED_READS = ("account.exported",)


def _fill_ids(value: str, ids: dict[str, str]) -> str:
    for name in sorted(ids, key=len, reverse=True):
        value = value.replace(f"@{name}", ids[name])
    return value


def refusals_write_only_refusals(walk: Walk) -> list[str]:
    """A refused call (missing scope, absent object, decision already made, bad input)
    changes nothing and appends nothing but ``request.refused``."""
    admin, agent, reviewer = (walk.clients[w] for w in ("admin", "agent", "reviewer"))
    before = walk.head()
    refused = [
        agent.post("/v1/mailboxes", json={"address": "sneaky@mm.test"}),
        agent.delete(f"/v1/api-keys/{walk.ids['key']}"),
        reviewer.post(
            "/v1/oversight/decide", json={"email_id": "msg_nowhere", "action": "approve"}
        ),
        reviewer.post(
            "/v1/oversight/decide", json={"email_id": walk.ids["p2"], "action": "approve"}
        ),
        agent.post(f"/v1/mailboxes/{walk.ids['mbx']}/send", json={"to": [], "subject": "x"}),
        admin.delete("/v1/contacts/con_nowhere"),
    ]
    problems = [
        f"{r.request.method} {r.request.url.path}: {r.status_code}"
        for r in refused
        if not 400 <= r.status_code < 500
    ]
    wrote = [
        e["action"]
        for e in walk.entries_after(before)
        if e["actor_type"] != "system" and e["action"] != "request.refused"
    ]
    return problems + ([f"refused calls wrote {wrote}"] if wrote else [])
