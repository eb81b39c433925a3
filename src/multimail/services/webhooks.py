"""Webhook subscriptions, their delivery log, and one safe signed POST.

Subscriptions are account-wide or per mailbox; the secret is shown once (at creation and at
rotation). A rotation keeps the previous secret signing beside the new one for an overlap
window, so receivers can switch without dropping a request.

:func:`post_signed` is the only way MultiMail makes a webhook request (the dispatcher and
``POST /v1/webhooks/test`` both use it): the URL is checked again, the name is resolved and
every address checked, and the connection goes to a checked address (never a second lookup,
which DNS rebinding could answer differently). Redirects are not followed and the response
is read up to a cap.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Connection, and_, delete, func, insert, select, update

from multimail.domain.netguard import Resolver, check_webhook_url, resolve_and_check
from multimail.domain.scopes import Scope
from multimail.errors import Conflict, Forbidden, InvalidInput, MultimailError, NotFound
from multimail.ids import aware, id_cursor, isoformat, new_id, utcnow
from multimail.services import audit, events, mailboxes
from multimail.services.common import clamp_limit, jsonable
from multimail.services.context import Actor, Services
from multimail.store.tables import webhook_attempts, webhook_deliveries, webhooks
from multimail.webhook_signature import generate_secret, sign_payload

ROTATION_OVERLAP = timedelta(hours=24)
RESPONSE_CAP = 64 * 1024
EXCERPT_CHARS = 1024
TIMEOUT_S = 10.0
DELIVERY_STATUSES = ("pending", "delivered", "failed")
USER_AGENT = "MultiMail-Webhooks/1"


# --- subscriptions ----------------------------------------------------------------------------


def webhook_view(row: Any) -> dict[str, Any]:
    """A subscription as the API shows it: never a secret."""
    data = jsonable(row, drop=("secret", "previous_secret", "account_id"))
    data["webhook_id"] = data["id"]
    data["endpoint"] = data["url"]
    data["rotating"] = data.get("previous_secret_expires_at") is not None
    return data


def _get_row(conn: Connection, actor: Actor, webhook_id: str) -> dict[str, Any]:
    row = (
        conn.execute(
            select(webhooks).where(
                webhooks.c.id == webhook_id, webhooks.c.account_id == actor.account_id
            )
        )
        .mappings()
        .first()
    )
    if row is None or (
        actor.mailbox_ids is not None and row["mailbox_id"] not in actor.mailbox_ids
    ):
        raise NotFound(f"webhook {webhook_id!r} not found", code="webhook_not_found")
    return dict(row)


def _check_url(services: Services, url: str) -> str:
    settings = services.settings
    check_webhook_url(
        url, allow_http=settings.allow_http_webhooks, allow_private=settings.allow_private_webhooks
    )
    return url


def create_webhook(
    conn: Connection,
    services: Services,
    actor: Actor,
    url: str,
    events_: list[str] | str | None,
    mailbox_ref: str | None,
    description: str | None,
) -> dict[str, Any]:
    """Subscribe ``url``; the response carries ``secret``, shown this once."""
    actor.require(Scope.ADMIN)
    _check_url(services, url)
    names = events.validate_names(events_)
    mailbox_id = mailboxes.resolve(conn, actor, mailbox_ref)["id"] if mailbox_ref else None
    if mailbox_id is None and actor.mailbox_ids is not None:
        raise Forbidden(
            "this key is limited to some mailboxes: give the webhook a mailbox_id",
            code="mailbox_required",
        )
    secret = generate_secret()
    now = utcnow()
    record: dict[str, Any] = {
        "id": new_id("whk"),
        "account_id": actor.account_id,
        "mailbox_id": mailbox_id,
        "url": url,
        "events": names,
        "secret": secret,
        "previous_secret": None,
        "previous_secret_expires_at": None,
        "enabled": True,
        "disabled_reason": None,
        "description": description,
        "source": "api",
        "failing_since": None,
        "created_at": now,
        "updated_at": now,
    }
    conn.execute(insert(webhooks).values(**record))
    audit.append(
        conn,
        actor=actor,
        action="webhook.created",
        subject_type="webhook",
        subject_id=record["id"],
        mailbox_id=mailbox_id,
        details={"url": url, "events": names, "source": "api"},
    )
    return webhook_view(record) | {
        "secret": secret,
        "warning": "store this secret now: it is shown only once",
    }


def list_webhooks(conn: Connection, actor: Actor) -> list[dict[str, Any]]:
    """The account's subscriptions, the mailbox ones brought in step with their mailboxes."""
    boxes = mailboxes.list_mailboxes(conn, actor)
    for box in boxes:
        if box.get("webhook_url"):
            events.sync_mailbox_subscription(conn, box["id"])
    rows = conn.execute(
        select(webhooks).where(webhooks.c.account_id == actor.account_id).order_by(webhooks.c.id)
    ).mappings()
    return [
        webhook_view(r)
        for r in rows
        if actor.mailbox_ids is None or r["mailbox_id"] in actor.mailbox_ids
    ]


def get_webhook(conn: Connection, actor: Actor, webhook_id: str) -> dict[str, Any]:
    return webhook_view(_get_row(conn, actor, webhook_id))


def delete_webhook(conn: Connection, actor: Actor, webhook_id: str) -> dict[str, Any]:
    actor.require(Scope.ADMIN)
    row = _get_row(conn, actor, webhook_id)
    if row["source"] == "mailbox":
        raise Conflict(
            "this webhook is the mailbox's webhook_url: clear it with PATCH "
            f'/v1/mailboxes/{row["mailbox_id"]} {{"webhook_url": null}}',
            code="webhook_owned_by_mailbox",
        )
    conn.execute(delete(webhooks).where(webhooks.c.id == row["id"]))
    audit.append(
        conn,
        actor=actor,
        action="webhook.deleted",
        subject_type="webhook",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        details={"url": row["url"]},
    )
    return {"id": row["id"], "webhook_id": row["id"], "deleted": True}


def rotate_secret(
    conn: Connection, actor: Actor, webhook_id: str, *, overlap: timedelta = ROTATION_OVERLAP
) -> dict[str, Any]:
    """A new secret, returned once; the current one keeps signing for ``overlap``."""
    actor.require(Scope.ADMIN)
    row = _get_row(conn, actor, webhook_id)
    secret = generate_secret()
    now = utcnow()
    changes = {
        "secret": secret,
        "previous_secret": row["secret"],
        "previous_secret_expires_at": now + overlap,
        "updated_at": now,
    }
    conn.execute(update(webhooks).where(webhooks.c.id == row["id"]).values(**changes))
    audit.append(
        conn,
        actor=actor,
        action="webhook.secret_rotated",
        subject_type="webhook",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        details={"previous_secret_expires_at": isoformat(now + overlap)},
    )
    return webhook_view({**row, **changes}) | {
        "secret": secret,
        "warning": "store this secret now: it is shown only once",
    }


def enable_webhook(conn: Connection, actor: Actor, webhook_id: str) -> dict[str, Any]:
    """Switch a disabled subscription back on; its pending deliveries resume."""
    actor.require(Scope.ADMIN)
    row = _get_row(conn, actor, webhook_id)
    changes = {
        "enabled": True,
        "disabled_reason": None,
        "failing_since": None,
        "updated_at": utcnow(),
    }
    conn.execute(update(webhooks).where(webhooks.c.id == row["id"]).values(**changes))
    events.nudge_after_commit(conn)
    audit.append(
        conn,
        actor=actor,
        action="webhook.enabled",
        subject_type="webhook",
        subject_id=row["id"],
        mailbox_id=row["mailbox_id"],
        details={"was_disabled_because": row["disabled_reason"]},
    )
    return webhook_view({**row, **changes})


def signing_secrets(row: Any, now: datetime) -> list[str]:
    """The secrets that sign now: the current one, then the previous one inside its window."""
    found = [str(row["secret"])]
    expires = row["previous_secret_expires_at"]
    if row["previous_secret"] and expires is not None and aware(expires) > now:
        found.append(str(row["previous_secret"]))
    return found


# --- deliveries -------------------------------------------------------------------------------


def _attempts_for(conn: Connection, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if not ids:
        return out
    rows = conn.execute(
        select(webhook_attempts)
        .where(webhook_attempts.c.delivery_id.in_(ids))
        .order_by(webhook_attempts.c.id)
    ).mappings()
    for r in rows:
        item = jsonable(dict(r), drop=("id",))
        out[item.pop("delivery_id")].append(item)
    return out


def delivery_view(row: Any, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    data = jsonable(row, drop=("locked_by", "locked_until"))
    data["delivery_id"] = data["id"]
    data["event"] = data["event_name"]
    data["attempt_count"] = data.pop("attempts")
    data["attempts"] = attempts
    data["response_status"] = data["last_status_code"]
    return data


def list_deliveries(
    conn: Connection,
    actor: Actor,
    *,
    webhook_id: str | None = None,
    status: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Deliveries newest first with their attempt logs; ``next_cursor`` pages on."""
    if status is not None and status not in DELIVERY_STATUSES:
        raise InvalidInput(
            f"status must be one of {', '.join(DELIVERY_STATUSES)}", code="invalid_status"
        )
    size = clamp_limit(limit)
    cursor = id_cursor(cursor, "dlv")
    query = (
        select(webhook_deliveries)
        .join(webhooks, webhooks.c.id == webhook_deliveries.c.webhook_id)
        .where(webhooks.c.account_id == actor.account_id)
        .order_by(webhook_deliveries.c.id.desc())
        .limit(size + 1)
    )
    if webhook_id is not None:
        query = query.where(
            webhook_deliveries.c.webhook_id == _get_row(conn, actor, webhook_id)["id"]
        )
    if actor.mailbox_ids is not None:
        query = query.where(webhooks.c.mailbox_id.in_(actor.mailbox_ids))
    if status is not None:
        query = query.where(webhook_deliveries.c.status == status)
    if cursor:
        query = query.where(webhook_deliveries.c.id < cursor)
    rows = list(conn.execute(query).mappings())
    more = len(rows) > size
    rows = rows[:size]
    logs = _attempts_for(conn, [r["id"] for r in rows])
    return {
        "deliveries": [delivery_view(r, logs[r["id"]]) for r in rows],
        "next_cursor": rows[-1]["id"] if more and rows else None,
    }


def redeliver(conn: Connection, actor: Actor, webhook_id: str, delivery_id: str) -> dict[str, Any]:
    """Queue the event again for this subscription as a new delivery with a fresh 3-day window.

    The earlier delivery keeps its history; the new one carries the same ``webhook-id`` (the
    event id), so a receiver that did get the first copy can drop this one.
    """
    actor.require(Scope.ADMIN)
    hook = _get_row(conn, actor, webhook_id)
    old = (
        conn.execute(
            select(webhook_deliveries).where(
                webhook_deliveries.c.id == delivery_id,
                webhook_deliveries.c.webhook_id == hook["id"],
            )
        )
        .mappings()
        .first()
    )
    if old is None:
        raise NotFound(f"delivery {delivery_id!r} not found", code="delivery_not_found")
    now = utcnow()
    record = {
        "id": new_id("dlv"),
        "webhook_id": hook["id"],
        "event_id": old["event_id"],
        "event_name": old["event_name"],
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }
    conn.execute(insert(webhook_deliveries).values(**record))
    record.update(last_status_code=None, last_error=None, delivered_at=None)
    audit.append(
        conn,
        actor=actor,
        action="webhook.redelivered",
        subject_type="webhook",
        subject_id=hook["id"],
        mailbox_id=hook["mailbox_id"],
        details={
            "delivery_id": delivery_id,
            "new_delivery_id": record["id"],
            "event_id": old["event_id"],
        },
    )
    if not hook["enabled"]:
        record["warning"] = "the webhook is disabled: enable it for this delivery to be sent"
    events.nudge_after_commit(conn)
    return delivery_view(record, []) | {"redelivery_of": delivery_id}


def delivery_counts(conn: Connection, webhook_id: str) -> dict[str, int]:
    rows = conn.execute(
        select(webhook_deliveries.c.status, func.count())
        .where(webhook_deliveries.c.webhook_id == webhook_id)
        .group_by(webhook_deliveries.c.status)
    ).all()
    return {str(status): int(count) for status, count in rows}


# --- one signed request -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one POST did: ``delivered`` means a 2xx answer."""

    status_code: int | None
    latency_ms: int
    response_excerpt: str | None
    error: str | None
    address: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class ClientPool:
    """httpx clients kept per host name, so a pooled connection (and the TLS session it
    verified for that name) is only ever reused for the same name."""

    def __init__(self, max_hosts: int = 256, max_connections: int = 8) -> None:
        self._clients: OrderedDict[str, httpx.AsyncClient] = OrderedDict()
        self._max_hosts = max_hosts
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )

    async def client(self, host: str) -> httpx.AsyncClient:
        found = self._clients.pop(host, None)
        if found is None:
            found = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,  # an HTTP(S)_PROXY variable must not reroute checked requests
                timeout=httpx.Timeout(TIMEOUT_S),
                limits=self._limits,
            )
        self._clients[host] = found
        while len(self._clients) > self._max_hosts:
            _, oldest = self._clients.popitem(last=False)
            await oldest.aclose()
        return found

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _pinned_url(scheme: str, address: str, port: int, path: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}{path}"


async def _read_capped(response: httpx.Response, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= cap:
            break
    return b"".join(chunks)[:cap]


async def post_signed(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_http: bool,
    allow_private: bool,
    pool: ClientPool,
    resolver: Resolver | None = None,
    response_cap: int = RESPONSE_CAP,
) -> AttemptResult:
    """POST ``body`` to ``url`` once, safely; failures are reported, never raised."""
    started = time.perf_counter()

    def result(
        status: int | None, excerpt: str | None, error: str | None, address: str | None = None
    ) -> AttemptResult:
        latency = int((time.perf_counter() - started) * 1000)
        return AttemptResult(status, latency, excerpt, error, address)

    try:
        target = check_webhook_url(url, allow_http=allow_http, allow_private=allow_private)
        if target.is_ip_literal:
            addresses = [target.host]
        else:
            addresses = await resolve_and_check(
                target.host, target.port, allow_private=allow_private, resolver=resolver
            )
    except MultimailError as exc:
        return result(None, None, f"{exc.code}: {exc.message}")
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    if ":" in target.host and target.port == default_port:
        host_header = f"[{target.host}]"
    elif ":" in target.host:
        host_header = f"[{target.host}]:{target.port}"
    request_headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Host": host_header,
        **headers,
    }
    extensions: dict[str, Any] = {}
    if target.scheme == "https" and not target.is_ip_literal:
        extensions["sni_hostname"] = target.host
    client = await pool.client(target.host)
    last_error = "no address to connect to"
    for address in addresses:
        try:
            request = client.build_request(
                "POST",
                _pinned_url(target.scheme, address, target.port, target.path),
                content=body,
                headers=request_headers,
                extensions=extensions,
            )
            response = await client.send(request, stream=True)
            try:
                data = await _read_capped(response, response_cap)
            finally:
                await response.aclose()
        except httpx.ConnectError as exc:
            last_error = f"connect to {address} failed: {exc or type(exc).__name__}"
            continue
        except httpx.TimeoutException as exc:
            return result(None, None, f"timeout: {type(exc).__name__}", address)
        except httpx.HTTPError as exc:
            return result(None, None, f"{type(exc).__name__}: {exc}", address)
        excerpt = data[:EXCERPT_CHARS].decode("utf-8", "replace")
        error = None
        if 300 <= response.status_code < 400:
            error = f"redirect to {response.headers.get('location', '?')!r} not followed"
        return result(response.status_code, excerpt, error, address)
    return result(None, None, last_error)


def encode_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str).encode()


async def send_test(
    services: Services,
    actor: Actor,
    *,
    url: str | None = None,
    secret: str | None = None,
    webhook_id: str | None = None,
    pool: ClientPool | None = None,
    resolver: Resolver | None = None,
) -> dict[str, Any]:
    """Send a signed ``webhook.test`` event now and report what the endpoint answered.

    The secret is the named subscription's (or that of the account's subscription with this
    URL), else ``secret``, else a throwaway one returned in the report.
    """
    actor.require(Scope.ADMIN)
    now = utcnow()
    secrets: list[str] = []
    with services.db.read() as conn:
        if webhook_id:
            row = _get_row(conn, actor, webhook_id)
            url = url or row["url"]
            secrets = signing_secrets(row, now)
        elif url and not secret:
            match = (
                conn.execute(
                    select(webhooks)
                    .where(and_(webhooks.c.account_id == actor.account_id, webhooks.c.url == url))
                    .order_by(webhooks.c.id)
                )
                .mappings()
                .first()
            )
            if match is not None:
                secrets = signing_secrets(match, now)
    if not url:
        raise InvalidInput("give the endpoint to test as 'endpoint' or 'url'", code="missing_url")
    _check_url(services, url)
    throwaway = None
    if secret:
        secrets = [secret]
    elif not secrets:
        throwaway = generate_secret()
        secrets = [throwaway]
    event_id = new_id("evt")
    payload = events.payload_for(
        event_id=event_id,
        event_type="webhook.test",
        created_at=isoformat(now) or "",
        mailbox_id=None,
        message=None,
        extra={"test": True},
    )
    body = encode_body(payload)
    signature = sign_payload(body, secrets=secrets, msg_id=event_id, timestamp=int(time.time()))
    own_pool = pool is None
    use = pool or ClientPool(max_hosts=1)
    try:
        outcome = await post_signed(
            url,
            body,
            signature,
            allow_http=services.settings.allow_http_webhooks,
            allow_private=services.settings.allow_private_webhooks,
            pool=use,
            resolver=resolver,
        )
    finally:
        if own_pool:
            await use.aclose()
    report: dict[str, Any] = {
        "delivered": outcome.delivered,
        "status_code": outcome.status_code,
        "latency_ms": outcome.latency_ms,
        "response_excerpt": outcome.response_excerpt,
        "error": outcome.error,
        "event_id": event_id,
        "signature_headers": signature,
        "payload": payload,
    }
    if throwaway:
        report["secret"] = throwaway
    return report
