"""Account, mailboxes, API keys, contacts, suppressions and domains (SPEC §5.1)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from multimail.api.deps import ADMIN, READ, get_services
from multimail.errors import InvalidInput
from multimail.services import (
    accounts,
    approvals,
    directory,
    domains,
    keys,
    mailboxes,
    operators,
)
from multimail.services.context import Actor, Services

router = APIRouter(prefix="/v1")

# The columns are 32-bit integers: larger numbers are invalid input, not a database error.
INT32_MAX = 2**31 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountUpdate(Strict):
    approval_code: str | None = Field(None, max_length=64)
    name: str | None = Field(None, max_length=200)
    oversight_email: str | None = None
    postal_address: str | None = Field(None, max_length=1000)
    daily_send_quota: int | None = Field(None, ge=0, le=INT32_MAX)


class ApprovalBody(Strict):
    """The body a DELETE may carry: only the operator's code."""

    approval_code: str | None = Field(
        None, max_length=64, description="The operator's one-time code (see approval_required)."
    )


class MailboxSettings(Strict):
    approval_code: str | None = Field(
        None, max_length=64, description="The operator's one-time code (see approval_required)."
    )
    display_name: str | None = Field(None, max_length=200)
    oversight_mode: str | None = None
    gate_timing: str | None = None
    signature: str | None = Field(None, max_length=10_000)
    auto_cc: list[str] | None = None
    auto_bcc: list[str] | None = None
    webhook_url: str | None = None
    ai_disclosure: bool | None = None
    approval_timeout_seconds: int | None = Field(None, le=INT32_MAX)
    approval_expiry_seconds: int | None = Field(None, le=INT32_MAX)
    send_cap_hour: int | None = Field(None, le=INT32_MAX)
    send_cap_day: int | None = Field(None, le=INT32_MAX)
    metadata: dict[str, Any] | None = None


class MailboxCreate(MailboxSettings):
    address: str | None = Field(None, max_length=320)
    address_local_part: str | None = Field(None, max_length=64)


class KeyCreate(Strict):
    approval_code: str | None = Field(None, max_length=64)
    name: str = Field(..., max_length=200)
    scopes: list[str]
    mode: str = "live"
    mailbox_ids: list[str] | None = None
    send_cap_hour: int | None = Field(None, ge=0, le=INT32_MAX)
    send_cap_day: int | None = Field(None, ge=0, le=INT32_MAX)


class ContactCreate(Strict):
    email: str = Field(..., max_length=320)
    name: str | None = Field(None, max_length=200)
    tags: list[str] | None = None
    notes: str | None = Field(None, max_length=5000)


class DomainCreate(Strict):
    name: str | None = Field(None, max_length=253)
    domain: str | None = Field(None, max_length=253)


def _set(model: BaseModel) -> dict[str, Any]:
    fields = model.model_dump(exclude_unset=True)
    fields.pop("approval_code", None)
    return fields


def _approval_code(query: str | None, body: ApprovalBody | None) -> str | None:
    """The code of a DELETE, given as ``?approval_code=`` (DELETE bodies are unusual) or in a
    JSON body; two different ones are refused rather than one picked."""
    given = body.approval_code if body is not None else None
    if given and query and given != query:
        raise InvalidInput(
            "two different approval codes were given (query and body); give one",
            code="conflicting_approval_codes",
            field="approval_code",
        )
    return given or query


# --- account ---------------------------------------------------------------------------------


@router.get("/account")
def get_account(actor: Actor = Depends(READ), svc: Services = Depends(get_services)) -> Any:
    with svc.db.read() as conn:
        return accounts.account_view(conn, actor.account_id or "")


@router.patch("/account")
def patch_account(
    body: AccountUpdate, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    changes = _set(body)
    return approvals.guard_oversight_email(
        svc,
        actor,
        changes,
        body.approval_code,
        lambda conn: accounts.update_account(
            conn, actor=actor, account_id=actor.account_id or "", changes=changes
        ),
    )


@router.delete("/account")
def delete_account(
    approval_code: str | None = Query(
        None, max_length=64, description="The operator's one-time code (see approval_required)."
    ),
    body: ApprovalBody | None = Body(None),
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    """Delete the account. The operator's own admin key acts at once; another admin key gets
    202 approval_required and repeats the call with the mailed code, as ``?approval_code=``
    (DELETE bodies are unusual) or in a JSON body."""
    return approvals.delete_account(svc, actor, _approval_code(approval_code, body))


# --- mailboxes -------------------------------------------------------------------------------


@router.get("/mailboxes")
def list_mailboxes(actor: Actor = Depends(READ), svc: Services = Depends(get_services)) -> Any:
    with svc.db.read() as conn:
        return {"mailboxes": mailboxes.list_mailboxes(conn, actor)}


@router.post("/mailboxes", status_code=201)
def create_mailbox(
    body: MailboxCreate, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    return approvals.create_mailbox(svc, actor, _set(body), body.approval_code)


@router.get("/mailboxes/{mailbox}")
def get_mailbox(
    mailbox: str, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.read() as conn:
        return mailboxes.mailbox_view(mailboxes.resolve(conn, actor, mailbox))


@router.patch("/mailboxes/{mailbox}")
def patch_mailbox(
    mailbox: str,
    body: MailboxSettings,
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    return approvals.update_mailbox(svc, actor, mailbox, _set(body), body.approval_code)


@router.patch("/mailboxes/{mailbox}/configure")
def configure_mailbox(
    mailbox: str,
    body: MailboxSettings,
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    return approvals.update_mailbox(svc, actor, mailbox, _set(body), body.approval_code)


@router.delete("/mailboxes/{mailbox}")
def delete_mailbox(
    mailbox: str, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return mailboxes.delete_mailbox(conn, actor=actor, ref=mailbox)


# --- API keys --------------------------------------------------------------------------------


@router.get("/api-keys")
def list_keys(
    limit: int | None = Query(None, ge=1, le=500),
    cursor: str | None = Query(None, max_length=40),
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        return keys.page_keys(conn, actor.account_id or "", limit=limit, cursor=cursor)


@router.post("/api-keys", status_code=201)
def create_key(
    body: KeyCreate, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    return approvals.create_api_key(svc, actor, _set(body), body.approval_code)


@router.delete("/api-keys/{key_id}")
def revoke_key(
    key_id: str,
    approval_code: str | None = Query(
        None, max_length=64, description="The operator's one-time code (see approval_required)."
    ),
    body: ApprovalBody | None = Body(None),
    actor: Actor = Depends(ADMIN),
    svc: Services = Depends(get_services),
) -> Any:
    """Revoke a key. A key revokes itself and the keys it created at once; any other key
    needs the operator (202 approval_required, then the same call with the mailed code, as
    for DELETE /v1/account). The operator's own admin key acts at once."""
    return approvals.revoke_api_key(svc, actor, key_id, _approval_code(approval_code, body))


# --- contacts --------------------------------------------------------------------------------


@router.get("/contacts")
def list_contacts(
    q: str | None = Query(None, max_length=320),
    tag: str | None = Query(None, max_length=200),
    limit: int | None = Query(None, ge=1, le=500),
    cursor: str | None = Query(None, max_length=40),
    offset: int = Query(0, ge=0, le=1_000_000_000),  # beyond bigint the database errs
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        return directory.search_contacts(
            conn, actor=actor, q=q, tag=tag, limit=limit, cursor=cursor, offset=offset
        )


@router.post("/contacts", status_code=201)
def create_contact(
    body: ContactCreate, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return directory.add_contact(
            conn, actor=actor, email=body.email, name=body.name, tags=body.tags, notes=body.notes
        )


@router.delete("/contacts/{contact_id}")
def delete_contact(
    contact_id: str, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return directory.delete_contact(conn, actor=actor, contact_id=contact_id)


# --- suppression -----------------------------------------------------------------------------


@router.get("/suppression")
def list_suppressions(
    address: str | None = Query(None, max_length=320),
    limit: int | None = Query(None, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=40),
    offset: int = Query(0, ge=0, le=1_000_000_000),  # beyond bigint the database errs
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    with svc.db.read() as conn:
        if address:
            return directory.check_suppression(conn, actor=actor, address=address)
        return directory.list_suppressions(
            conn, actor=actor, limit=limit, cursor=cursor, offset=offset
        )


@router.delete("/suppression/{address}")
def remove_suppression(
    address: str, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return directory.remove_suppression(conn, actor=actor, address=address)


# --- domains ---------------------------------------------------------------------------------


@router.get("/domains")
def list_domains(actor: Actor = Depends(READ), svc: Services = Depends(get_services)) -> Any:
    with svc.db.read() as conn:
        return {"domains": domains.list_domains(conn, actor=actor, settings=svc.settings)}


@router.post("/domains", status_code=201)
def create_domain(
    body: DomainCreate, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    name = body.name or body.domain
    if not name:
        raise InvalidInput("give the domain as 'name' (e.g. example.com)", code="missing_domain")
    with svc.db.write() as conn:
        return domains.create_domain(conn, actor=actor, settings=svc.settings, name=name)


@router.get("/domains/{domain_id}")
def get_domain(
    domain_id: str, actor: Actor = Depends(READ), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.read() as conn:
        return domains.domain_view(domains.get_domain(conn, actor, domain_id), svc.settings)


@router.post("/domains/{domain_id}/verify")
def verify_domain(
    domain_id: str, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.read() as conn:
        row = domains.get_domain(conn, actor, domain_id)
    # DNS is asked outside any transaction: a slow resolver must not hold a database lock.
    results = domains.check_dns(row, svc.settings)
    with svc.db.write() as conn:
        return domains.verify_domain(
            conn, actor=actor, settings=svc.settings, ref=row["id"], results=results
        )


@router.delete("/domains/{domain_id}")
def delete_domain(
    domain_id: str, actor: Actor = Depends(ADMIN), svc: Services = Depends(get_services)
) -> Any:
    with svc.db.write() as conn:
        return domains.delete_domain(conn, actor=actor, ref=domain_id)


# --- the test-mode sandbox -------------------------------------------------------------------


@router.get("/sandbox/messages")
def sandbox_messages(
    limit: int = Query(50, ge=1, le=200),
    cursor: str | None = Query(None, max_length=40),
    actor: Actor = Depends(READ),
    svc: Services = Depends(get_services),
) -> Any:
    """Messages sent with mm_test_ keys: the whole pipeline ran, nothing went to SMTP."""
    with svc.db.read() as conn:
        return operators.captured_messages(conn, actor, limit=limit, cursor=cursor)
