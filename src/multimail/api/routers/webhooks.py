"""Webhook subscriptions, their deliveries, and the test send (SPEC §6). Admin scope."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from multimail.api.deps import ADMIN, get_services
from multimail.errors import InvalidInput
from multimail.services import approvals, webhooks
from multimail.services.context import Actor, Services

router = APIRouter(prefix="/v1")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookCreate(Strict):
    approval_code: str | None = Field(None, max_length=64)
    url: str | None = Field(None, max_length=2048)
    endpoint: str | None = Field(None, max_length=2048)
    events: list[str] | str | None = None
    mailbox_id: str | None = Field(None, max_length=320)
    description: str | None = Field(None, max_length=500)


class WebhookTest(Strict):
    url: str | None = Field(None, max_length=2048)
    endpoint: str | None = Field(None, max_length=2048)
    secret: str | None = Field(None, max_length=200)
    webhook_id: str | None = Field(None, max_length=40)


@router.post("/webhooks", status_code=201)
def create_webhook(
    body: WebhookCreate, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    url = body.url or body.endpoint
    if not url:
        raise InvalidInput("give the endpoint as 'url' or 'endpoint'", code="missing_url")
    params = body.model_dump(exclude={"approval_code"}, exclude_none=True)
    return approvals.with_operator_approval(
        svc,
        actor,
        purpose="webhook_create",
        params=params,
        code=body.approval_code,
        summary=f"create a webhook to {url} for {body.events or 'all events'}",
        action=lambda conn: webhooks.create_webhook(
            conn, svc, actor, url, body.events, body.mailbox_id, body.description
        ),
    )


@router.get("/webhooks")
def list_webhooks(actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)) -> Any:
    # A write transaction: listing brings mailbox webhook_url subscriptions into step.
    with svc.db.write() as conn:
        return {"webhooks": webhooks.list_webhooks(conn, actor)}


@router.post("/webhooks/test")
async def test_webhook(
    body: WebhookTest, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    return await webhooks.send_test(
        svc, actor, url=body.endpoint or body.url, secret=body.secret, webhook_id=body.webhook_id
    )


@router.get("/webhooks/{webhook_id}")
def get_webhook(
    webhook_id: str, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.read() as conn:
        return webhooks.get_webhook(conn, actor, webhook_id)


@router.delete("/webhooks/{webhook_id}")
def delete_webhook(
    webhook_id: str, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return webhooks.delete_webhook(conn, actor, webhook_id)


@router.post("/webhooks/{webhook_id}/rotate-secret")
def rotate_secret(
    webhook_id: str, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return webhooks.rotate_secret(conn, actor, webhook_id)


@router.post("/webhooks/{webhook_id}/enable")
def enable_webhook(
    webhook_id: str, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return webhooks.enable_webhook(conn, actor, webhook_id)


@router.get("/webhooks/{webhook_id}/deliveries")
def webhook_deliveries(
    webhook_id: str,
    status: str | None = Query(None, max_length=20),
    limit: int | None = Query(None, ge=1, le=200),
    cursor: str | None = Query(None, max_length=40),
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        return webhooks.list_deliveries(
            conn, actor, webhook_id=webhook_id, status=status, limit=limit, cursor=cursor
        )


@router.post("/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", status_code=202)
def redeliver(
    webhook_id: str,
    delivery_id: str,
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.write() as conn:
        return webhooks.redeliver(conn, actor, webhook_id, delivery_id)


@router.get("/webhook-deliveries")
def all_deliveries(
    status: str | None = Query(None, max_length=20),
    webhook_id: str | None = Query(None, max_length=40),
    limit: int | None = Query(None, ge=1, le=200),
    cursor: str | None = Query(None, max_length=40),
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        return webhooks.list_deliveries(
            conn, actor, webhook_id=webhook_id, status=status, limit=limit, cursor=cursor
        )
