"""API-1: account B's keys on every route, aimed at account A's objects.

The matrix is generated from the application's route table: every authenticated route must
have a case below, so a route added later without one fails the test. Each case either
names A's objects (path, query or body) — then B's answer must be exactly what a made-up id
of the same kind gets (404, or 403 for a key lacking the scope; never 2xx, never a 409 that
tells the object exists) — or acts on the caller's own account, and then the answer must not
mention anything of A's. Afterwards, A's rows are unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Literal
from urllib.parse import unquote

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select
from starlette.routing import BaseRoute

from multimail.api.app import create_app
from multimail.config import Settings
from multimail.ids import new_id
from multimail.runtime import build_services
from multimail.services import accounts, directory
from multimail.services.context import SYSTEM, Services
from multimail.store.tables import metadata, webhook_deliveries
from multimail.testing.server import LiveServer

# Their own tests cover these: they take no API key (or a dashboard session).
PUBLIC_PREFIXES = (
    "/health",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/docs",
    "/redoc",
    "/.well-known/",
    "/v1/identity/",
    "/v1/approve/",
    "/v1/unsubscribe/",
    "/mcp",
    "/dashboard",
)

# Rows that belong to no account: B's requests spend B's rate-limit tokens, and an admin may
# ask for a signed checkpoint of the server's one audit chain (its head, not A's entries).
SHARED_TABLES = frozenset({"rate_limit_buckets", "audit_checkpoints"})

SECRET_SUBJECT = "A-ONLY-SUBJECT-7f3c"

Kind = Literal["object", "filter", "own"]


@dataclass(frozen=True)
class Case:
    """How to aim a route at A's objects. ``@name`` strings are replaced by A's object (or by
    a made-up one of the same kind). ``filter`` routes list the caller's own objects narrowed
    by A's id: the answer must equal the one for a made-up id (an empty list). ``own`` routes
    act on the caller's account only."""

    kind: Kind
    path: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    body: Any = None


def obj(
    path: dict[str, str] | None = None, query: dict[str, str] | None = None, body: Any = None
) -> Case:
    return Case("object", path or {}, query or {}, body)


def filt(query: dict[str, str] | None = None, body: Any = None) -> Case:
    return Case("filter", {}, query or {}, body)


def own(query: dict[str, str] | None = None, body: Any = None) -> Case:
    return Case("own", {}, query or {}, body)


MBX = {"mailbox": "@mbx"}
MSG = {"email_id": "@msg"}
MBX_MSG = {"mailbox": "@mbx", "email_id": "@msg"}
SEND = {"to": ["someone@example.org"], "subject": "hi", "markdown": "hello"}
RAW = "From: x@example.org\r\nTo: @addr\r\nSubject: s\r\n\r\nbody\r\n"

CASES: dict[tuple[str, str], Case] = {
    # account-wide reads and writes of the caller's own account
    ("GET", "/v1/account"): own(),
    ("PATCH", "/v1/account"): own(body={"name": "B renamed"}),
    ("GET", "/v1/usage"): own(),
    ("GET", "/v1/audit-log"): filt(query={"subject_id": "@msg"}),
    ("GET", "/v1/audit-log/export"): own(),
    ("GET", "/v1/export"): own(),
    ("GET", "/v1/audit-log/verify"): own(),
    ("POST", "/v1/audit-log/verify"): own(),
    ("GET", "/v1/audit-log/checkpoints"): own(),
    ("POST", "/v1/audit-log/checkpoints"): own(),
    ("GET", "/v1/sandbox/messages"): own(),
    ("POST", "/v1/verify"): own(body={"raw": RAW.replace("@addr", "x@example.org")}),
    # mailboxes
    ("GET", "/v1/mailboxes"): own(),
    ("POST", "/v1/mailboxes"): own(body={"address_local_part": "b-own", "display_name": "B"}),
    ("GET", "/v1/mailboxes/{mailbox}"): obj(MBX),
    ("PATCH", "/v1/mailboxes/{mailbox}"): obj(MBX, body={"display_name": "stolen"}),
    ("PATCH", "/v1/mailboxes/{mailbox}/configure"): obj(MBX, body={"oversight_mode": "read_only"}),
    ("DELETE", "/v1/mailboxes/{mailbox}"): obj(MBX),
    ("POST", "/v1/mailboxes/{mailbox}/request-upgrade"): obj(
        MBX, body={"target_mode": "autonomous"}
    ),
    ("POST", "/v1/mailboxes/{mailbox}/upgrade"): obj(MBX, body={"code": "123456"}),
    ("GET", "/v1/mailboxes/{mailbox}/allowlist"): obj(MBX),
    ("POST", "/v1/mailboxes/{mailbox}/allowlist"): obj(MBX, body={"pattern": "*@evil.test"}),
    ("DELETE", "/v1/mailboxes/{mailbox}/allowlist"): obj(MBX, query={"pattern": "*@partner.test"}),
    ("DELETE", "/v1/mailboxes/{mailbox}/allowlist/{entry}"): obj(
        {"mailbox": "@mbx", "entry": "@alw"}
    ),
    # keys, contacts, suppressions, domains
    ("GET", "/v1/api-keys"): own(),
    ("POST", "/v1/api-keys"): obj(
        body={"name": "sneaky", "scopes": ["send", "read"], "mailbox_ids": ["@mbx"]}
    ),
    ("DELETE", "/v1/api-keys/{key_id}"): obj({"key_id": "@key"}),
    ("GET", "/v1/contacts"): own(query={"q": "contact-a"}),
    ("POST", "/v1/contacts"): own(body={"email": "b-contact@example.org"}),
    ("DELETE", "/v1/contacts/{contact_id}"): obj({"contact_id": "@con"}),
    ("GET", "/v1/suppression"): own(query={"address": "@sup"}),
    ("DELETE", "/v1/suppression/{address}"): obj({"address": "@sup"}),
    ("GET", "/v1/domains"): own(),
    ("POST", "/v1/domains"): own(body={"domain": "b-own.example"}),
    ("GET", "/v1/domains/{domain_id}"): obj({"domain_id": "@dom"}),
    ("POST", "/v1/domains/{domain_id}/verify"): obj({"domain_id": "@dom"}),
    ("DELETE", "/v1/domains/{domain_id}"): obj({"domain_id": "@dom"}),
    # sending
    ("POST", "/v1/mailboxes/{mailbox}/send"): obj(MBX, body=SEND),
    ("POST", "/v1/mailboxes/{mailbox}/reply/{email_id}"): obj(
        {"mailbox": "@mbx", "email_id": "@inb"}, body={"markdown": "re"}
    ),
    ("POST", "/v1/mailboxes/{mailbox}/emails/{email_id}/cancel"): obj(MBX_MSG),
    ("PATCH", "/v1/mailboxes/{mailbox}/emails/{email_id}/schedule"): obj(
        MBX_MSG, body={"subject": "changed"}
    ),
    ("POST", "/v1/send"): obj(body={**SEND, "from": "@addr"}),
    ("POST", "/v1/cancel/{email_id}"): obj(MSG),
    ("POST", "/v1/emails/{email_id}/reply"): obj({"email_id": "@inb"}, body={"markdown": "re"}),
    ("PATCH", "/v1/emails/{email_id}/schedule"): obj(MSG, body={"subject": "changed"}),
    ("POST", "/v1/inbound"): obj(
        body={
            "raw_base64": base64.b64encode(RAW.encode()).decode(),
            "rcpt_to": ["@addr"],
        }
    ),
    # oversight
    ("GET", "/v1/oversight/pending"): obj(query={"mailbox_id": "@mbx"}),
    ("GET", "/v1/pending"): obj(query={"mailbox_id": "@mbx"}),
    ("POST", "/v1/oversight/decide"): obj(body={"email_id": "@msg", "action": "approve"}),
    ("POST", "/v1/oversight/pause"): obj(body={"mailbox_id": "@mbx"}),
    ("POST", "/v1/oversight/resume"): obj(body={"mailbox_id": "@mbx"}),
    # reading
    ("GET", "/v1/mailboxes/{mailbox}/emails"): obj(MBX),
    ("GET", "/v1/mailboxes/{mailbox}/emails/wait"): obj(MBX, query={"timeout": "0"}),
    ("GET", "/v1/mailboxes/{mailbox}/emails/{email_id}"): obj(MBX_MSG),
    ("GET", "/v1/mailboxes/{mailbox}/emails/{email_id}/tags"): obj(MBX_MSG),
    ("PUT", "/v1/mailboxes/{mailbox}/emails/{email_id}/tags"): obj(MBX_MSG, body={"x": "y"}),
    ("DELETE", "/v1/mailboxes/{mailbox}/emails/{email_id}/tags/{key}"): obj(
        {**MBX_MSG, "key": "case"}
    ),
    ("GET", "/v1/mailboxes/{mailbox}/emails/{email_id}/attachments/{filename}"): obj(
        {**MBX_MSG, "filename": "secret.txt"}
    ),
    ("GET", "/v1/mailboxes/{mailbox}/threads/{thread_id}"): obj(
        {"mailbox": "@mbx", "thread_id": "@thr"}
    ),
    ("GET", "/v1/emails"): obj(query={"mailbox_id": "@mbx"}),
    ("GET", "/v1/emails/wait"): obj(query={"mailbox_id": "@mbx", "timeout": "0"}),
    ("GET", "/v1/emails/{email_id}"): obj(MSG),
    ("PUT", "/v1/emails/{email_id}/tags"): obj(MSG, body={"x": "y"}),
    ("GET", "/v1/emails/{email_id}/attachments/{filename}"): obj(
        {"email_id": "@msg", "filename": "secret.txt"}
    ),
    ("GET", "/v1/threads/{thread_id}"): obj({"thread_id": "@thr"}),
    ("POST", "/v1/emails/{email_id}/report-spam"): obj({"email_id": "@inb"}),
    ("POST", "/v1/emails/{email_id}/not-spam"): obj({"email_id": "@inb"}),
    # webhooks
    ("GET", "/v1/webhooks"): own(),
    ("POST", "/v1/webhooks"): obj(
        body={"url": "https://hooks.example.org/x", "mailbox_id": "@mbx"}
    ),
    ("POST", "/v1/webhooks/test"): obj(body={"webhook_id": "@whk"}),
    ("GET", "/v1/webhooks/{webhook_id}"): obj({"webhook_id": "@whk"}),
    ("DELETE", "/v1/webhooks/{webhook_id}"): obj({"webhook_id": "@whk"}),
    ("POST", "/v1/webhooks/{webhook_id}/rotate-secret"): obj({"webhook_id": "@whk"}),
    ("POST", "/v1/webhooks/{webhook_id}/enable"): obj({"webhook_id": "@whk"}),
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): obj({"webhook_id": "@whk"}),
    ("POST", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"): obj(
        {"webhook_id": "@whk", "delivery_id": "@dlv"}
    ),
    ("GET", "/v1/webhook-deliveries"): obj(query={"webhook_id": "@whk"}),
    # tool-named routes (SPEC §5.2): arguments as JSON (POST) or query (GET)
    ("GET", "/list_mailboxes"): own(),
    ("POST", "/list_mailboxes"): own(body={}),
    ("POST", "/create_mailbox"): own(body={"address_local_part": "b-tool"}),
    ("POST", "/configure_mailbox"): obj(body={"mailbox_id": "@mbx", "display_name": "x"}),
    ("POST", "/update_mailbox"): obj(body={"mailbox_id": "@mbx", "display_name": "x"}),
    ("POST", "/delete_mailbox"): obj(body={"mailbox_id": "@mbx"}),
    ("POST", "/request_upgrade"): obj(body={"mailbox_id": "@mbx", "target_mode": "autonomous"}),
    ("POST", "/apply_upgrade"): obj(body={"mailbox_id": "@mbx", "code": "123456"}),
    ("POST", "/send_email"): obj(body={**SEND, "mailbox_id": "@mbx"}),
    ("POST", "/schedule_email"): obj(
        body={**SEND, "from": "@addr", "send_at": "2099-01-01T00:00:00Z"}
    ),
    ("POST", "/reply_email"): obj(body={"message_id": "@inb", "body": "re"}),
    ("POST", "/edit_scheduled_email"): obj(body={"message_id": "@msg", "subject": "x"}),
    ("POST", "/cancel_message"): obj(body={"message_id": "@msg"}),
    ("GET", "/check_inbox"): obj(query={"mailbox_id": "@mbx"}),
    ("POST", "/check_inbox"): obj(body={"mailbox_id": "@mbx"}),
    ("GET", "/read_email"): obj(query={"message_id": "@msg"}),
    ("POST", "/read_email"): obj(body={"message_id": "@inb"}),
    ("GET", "/get_thread"): obj(query={"thread_id": "@thr"}),
    ("POST", "/get_thread"): obj(body={"thread_id": "@thr"}),
    ("GET", "/download_attachment"): obj(query={"message_id": "@msg", "filename": "secret.txt"}),
    ("POST", "/download_attachment"): obj(body={"message_id": "@msg", "filename": "secret.txt"}),
    ("POST", "/tag_email"): obj(body={"message_id": "@msg", "tags": ["stolen"]}),
    ("GET", "/wait_for_email"): obj(query={"mailbox_id": "@mbx", "timeout": "0"}),
    ("POST", "/wait_for_email"): obj(body={"mailbox_id": "@mbx", "timeout": 0}),
    ("GET", "/list_pending"): obj(query={"mailbox_id": "@mbx"}),
    ("POST", "/list_pending"): obj(body={"mailbox_id": "@mbx"}),
    ("POST", "/decide_email"): obj(body={"message_id": "@msg", "decision": "approve"}),
    ("GET", "/get_account"): own(),
    ("POST", "/get_account"): own(body={}),
    ("POST", "/update_account"): own(body={"name": "B again"}),
    ("GET", "/get_usage"): own(),
    ("POST", "/get_usage"): own(body={}),
    ("POST", "/report_spam"): obj(body={"message_id": "@inb"}),
    ("POST", "/not_spam"): obj(body={"message_id": "@inb"}),
    ("GET", "/list_spam"): obj(query={"mailbox_id": "@mbx"}),
    ("POST", "/list_spam"): obj(body={"mailbox_id": "@mbx"}),
    ("POST", "/add_contact"): own(body={"email": "b2@example.org"}),
    ("GET", "/search_contacts"): own(query={"q": "contact-a"}),
    ("POST", "/search_contacts"): own(body={"q": "contact-a"}),
    ("POST", "/delete_contact"): obj(body={"contact_id": "@con"}),
    ("GET", "/check_suppression"): own(query={"address": "@sup"}),
    ("POST", "/check_suppression"): own(body={"address": "@sup"}),
    ("POST", "/remove_suppression"): obj(body={"address": "@sup"}),
    ("GET", "/list_api_keys"): own(),
    ("POST", "/list_api_keys"): own(body={}),
    ("POST", "/create_api_key"): obj(
        body={"name": "t", "scopes": ["read"], "mailbox_ids": ["@mbx"]}
    ),
    ("POST", "/revoke_api_key"): obj(body={"key_id": "@key"}),
    ("GET", "/get_audit_log"): filt(query={"subject_id": "@msg"}),
    ("POST", "/get_audit_log"): filt(body={"mailbox_id": "@mbx"}),
    ("POST", "/create_webhook"): obj(
        body={
            "url": "https://hooks.example.org/y",
            "mailbox_id": "@mbx",
            "events": ["message.received"],
        }
    ),
    ("GET", "/list_webhooks"): own(),
    ("POST", "/list_webhooks"): own(body={}),
    ("POST", "/delete_webhook"): obj(body={"webhook_id": "@whk"}),
    ("GET", "/search_identity"): own(query={"address": "nobody@mm.test"}),
    ("POST", "/search_identity"): own(body={"address": "nobody@mm.test"}),
    ("POST", "/verify_message"): own(body={"raw": RAW.replace("@addr", "x@example.org")}),
    ("GET", "/verify_message"): own(query={"raw": RAW.replace("@addr", "x@example.org")}),
    # last: the caller's own account goes away (or asks for the operator's code)
    ("DELETE", "/v1/account"): own(),
}


def _walk(routes: list[BaseRoute]) -> Iterator[APIRoute]:
    # FastAPI keeps included routers nested; the public route table is their union.
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            yield from _walk(original.routes)
        elif isinstance(route, APIRoute):
            yield route


def route_table(app: Any) -> set[tuple[str, str]]:
    table = set()
    for route in _walk(app.routes):
        if route.path.startswith(PUBLIC_PREFIXES):
            continue
        for method in (route.methods or set()) - {"HEAD", "OPTIONS"}:
            # path_format: a thread id may hold "/" ({thread_id:path}); the case is the same.
            table.add((method, route.path_format))
    return table


@dataclass
class World:
    live: LiveServer
    services: Services
    a: accounts.Bootstrap
    b: accounts.Bootstrap
    real: dict[str, str]
    ghost: dict[str, str]


def _raw_inbound(to: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Customer <customer@example.org>"
    message["To"] = to
    message["Subject"] = f"{SECRET_SUBJECT} inbound"
    message["Message-ID"] = "<inbound-a@example.org>"
    message.set_content("A question only A may read.")
    return message.as_bytes()


@pytest.fixture
def world(settings: Settings) -> Iterator[World]:
    svc = build_services(
        settings.model_copy(update={"allow_private_webhooks": True, "allow_http_webhooks": True})
    )
    a = accounts.bootstrap(svc.db, account_name="A corp", operator_email="ops@a.test")
    b = accounts.bootstrap(svc.db, account_name="B corp", operator_email="ops@b.test")
    with LiveServer(svc) as live:
        admin = httpx.Client(
            base_url=live.base_url, headers={"Authorization": f"Bearer {a.admin_key}"}, timeout=30
        )
        agent = httpx.Client(
            base_url=live.base_url, headers={"Authorization": f"Bearer {a.agent_key}"}, timeout=30
        )
        with admin, agent:
            real = _make_objects(svc, a, admin, agent)
        yield World(live, svc, a, b, real, _ghosts(real))
    svc.db.dispose()


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code < 300, (response.request.url, response.text)
    body: dict[str, Any] = response.json()
    return body


def _make_objects(
    svc: Services, a: accounts.Bootstrap, admin: httpx.Client, agent: httpx.Client
) -> dict[str, str]:
    """Every kind of object account A owns, made through the API as A's users would."""
    box = _ok(admin.post("/v1/mailboxes", json={"address": "a-desk@mm.test", "display_name": "A"}))
    hook = _ok(
        admin.post(
            "/v1/webhooks",
            json={"url": "http://127.0.0.1:9/a-hook", "events": ["message.received"]},
        )
    )
    sent = _ok(
        agent.post(
            f"/v1/mailboxes/{box['id']}/send",
            json={
                "to": ["partner@example.org"],
                "subject": f"{SECRET_SUBJECT} outbound",
                "markdown": "Draft only A may see.",
                "attachments": [
                    {
                        "filename": "secret.txt",
                        "content_base64": base64.b64encode(b"A's secret").decode(),
                        "content_type": "text/plain",
                    }
                ],
            },
        )
    )
    _ok(admin.put(f"/v1/emails/{sent['id']}/tags", json={"case": "A-42"}))
    inbound = _ok(
        admin.post(
            "/v1/inbound",
            content=_raw_inbound("a-desk@mm.test"),
            headers={"content-type": "message/rfc822"},
        )
    )
    contact = _ok(admin.post("/v1/contacts", json={"email": "contact-a@example.org"}))
    key = _ok(admin.post("/v1/api-keys", json={"name": "a-extra", "scopes": ["read"]}))
    domain = _ok(admin.post("/v1/domains", json={"domain": "a-corp.example"}))
    entry = _ok(
        admin.post(f"/v1/mailboxes/{box['id']}/allowlist", json={"pattern": "*@partner.test"})
    )
    with svc.db.write() as conn:
        directory.suppress(
            conn,
            actor=SYSTEM,
            account_id=a.account["id"],
            address="blocked-a@example.org",
            reason="manual",
        )
    with svc.db.read() as conn:
        delivery = conn.execute(
            select(webhook_deliveries.c.id).where(webhook_deliveries.c.webhook_id == hook["id"])
        ).scalar_one()
    return {
        "mbx": box["id"],
        "addr": box["address"],
        "msg": sent["id"],
        "thr": sent["thread_id"],
        "inb": inbound["message_ids"][0],
        "con": contact["id"],
        "key": key["id"],
        "whk": hook["id"],
        "dlv": delivery,
        "dom": domain["id"],
        "alw": entry["id"],
        "sup": "blocked-a@example.org",
    }


def _ghosts(real: dict[str, str]) -> dict[str, str]:
    """Ids of the same kind that exist nowhere: B's answer on A's must equal its answer here."""
    ghost = {name: new_id(value.split("_", 1)[0]) for name, value in real.items() if "_" in value}
    ghost.update(addr="ghost-desk@mm.test", sup="blocked-ghost@example.org")
    ghost["thr"] = new_id("thr")
    return ghost


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name in sorted(ids, key=len, reverse=True):
            value = value.replace(f"@{name}", ids[name])
        return value
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def _call(
    client: httpx.Client, method: str, path: str, case: Case, ids: dict[str, str]
) -> httpx.Response:
    url = path.format(**_fill(case.path, ids))
    kwargs: dict[str, Any] = {"params": _fill(case.query, ids)}
    if case.body is not None:
        kwargs["json"] = _fill(case.body, ids)
    return client.request(method, url, **kwargs)


def snapshot(svc: Services, skip_account: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row not belonging to account B (whose own requests may add to its rows)."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    with svc.db.read() as conn:
        for table in metadata.sorted_tables:
            if table.name in SHARED_TABLES:
                continue
            query = select(table)
            if table.name == "accounts":
                query = query.where(table.c.id != skip_account)
            elif "account_id" in table.c:
                query = query.where(
                    (table.c.account_id != skip_account) | table.c.account_id.is_(None)
                )
            found = conn.execute(query).all()
            rows[table.name] = sorted((tuple(r) for r in found), key=repr)
    return rows


def _code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:  # not JSON, or not even text (GET /v1/export answers a ZIP)
        return None
    return body.get("code") if isinstance(body, dict) else None


def test_every_route_has_a_bola_case(services: Services) -> None:
    """Each authenticated route of the app has a case in the matrix; a new route without one
    fails here until someone says how account B's keys must fail on account A's objects."""
    routes = route_table(create_app(services))
    missing = sorted(routes - set(CASES))
    assert not missing, f"new route without a BOLA case: {missing}"
    stale = sorted(set(CASES) - routes)
    assert not stale, f"BOLA cases for routes that no longer exist: {stale}"


def test_account_b_cannot_touch_account_a(world: World) -> None:
    """B's admin, agent and reviewer keys on every route with A's ids: the same answer as for
    an id that exists nowhere (404, or 403 for a missing scope), never a success or a 409;
    B's own-account routes never mention A's objects; and A's rows are unchanged."""
    before = snapshot(world.services, world.b.account["id"])
    secrets = [SECRET_SUBJECT, *(v for k, v in world.real.items() if k != "addr")]
    failures: list[str] = []
    for key_name in ("admin_key", "agent_key", "reviewer_key"):
        key = getattr(world.b, key_name)
        client = httpx.Client(
            base_url=world.live.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        with client:
            for (method, path), case in CASES.items():
                where = f"{key_name} {method} {path}"
                on_a = _call(client, method, path, case, world.real)
                # Echoing an id the caller sent reveals nothing; anything else of A's does.
                asked = unquote(str(on_a.request.url)) + on_a.request.content.decode()
                leaked = [s for s in secrets if s in on_a.text and s not in asked]
                if on_a.status_code >= 500:
                    failures.append(f"{where}: {on_a.status_code} {on_a.text[:200]}")
                if leaked:
                    failures.append(f"{where}: answer mentions A's {leaked}")
                if case.kind == "own":
                    continue
                on_ghost = _call(client, method, path, case, world.ghost)
                if case.kind == "filter":
                    if (on_a.status_code, on_a.json()) != (on_ghost.status_code, on_ghost.json()):
                        failures.append(f"{where}: {on_a.text[:200]} vs {on_ghost.text[:200]}")
                elif on_a.status_code < 300 or on_a.status_code == 409:
                    failures.append(f"{where}: {on_a.status_code} {on_a.text[:200]}")
                elif (on_a.status_code, _code(on_a)) != (on_ghost.status_code, _code(on_ghost)):
                    failures.append(
                        f"{where}: A's object answers {on_a.status_code} {_code(on_a)}, "
                        f"an absent one {on_ghost.status_code} {_code(on_ghost)}"
                    )
    assert not failures, "\n".join(failures)
    after = snapshot(world.services, world.b.account["id"])
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"B's requests changed rows outside account B: {changed}"
