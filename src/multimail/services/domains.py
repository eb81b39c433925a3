"""Sending domains: DKIM keys generated on creation, DNS records to publish, verification.

Verification asks real DNS (dnspython) through the configured resolver, so tests point it at
a DNS server they run on loopback. A domain is verified when its ownership TXT record and its
DKIM key are published; SPF, DMARC and MX are checked and reported as recommendations.

Each check says what DNS showed in ``status`` and, unless the record is fine, a ``message``
saying what to publish; ``ok`` means the record does its job (true for ok and warning):

- ``ok``: published and right;
- ``warning``: works for this server's mail but weakens the domain (SPF ``+all`` / ``?all``);
- ``missing``: no such record (no such name, no record of the type);
- ``wrong``: a record that is not ours (another value, an MX naming another host);
- ``broken``: receivers cannot use it at all (two SPF records: RFC 7208 §4.5 permerror);
- ``unknown``: DNS did not answer (a timeout, SERVFAIL); proves nothing either way.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection
from typing import Any

import dns.exception
import dns.resolver
from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from multimail.config import Settings
from multimail.domain.addresses import AddressError, normalize_domain
from multimail.errors import Conflict, InvalidInput, NotFound
from multimail.ids import new_id, utcnow
from multimail.mail.dkim import dns_txt_value, generate_rsa_keypair
from multimail.services import audit
from multimail.services import mailboxes as mailbox_service
from multimail.services.common import jsonable
from multimail.services.context import Actor, Services
from multimail.store.tables import domains, mailboxes

VERIFICATION_PREFIX = "multimail-verification="

_LOOKUP_FAILED = "DNS lookup failed"


def make_sync_resolver(address: str | None, *, lifetime: float = 5.0) -> dns.resolver.Resolver:
    """``host:port`` → a resolver asking only that server; None → the system's resolver."""
    if not address:
        resolver = dns.resolver.Resolver()
    else:
        host, _, port = address.rpartition(":")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host or address]
        resolver.port = int(port) if host else 53
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


def dns_records(row: Any, settings: Settings) -> list[dict[str, Any]]:
    name = row["name"]
    mail_host = settings.domain
    return [
        {
            "purpose": "verification",
            "type": "TXT",
            "name": f"_multimail.{name}",
            "value": f"{VERIFICATION_PREFIX}{row['verification_token']}",
            "required": True,
        },
        {
            "purpose": "dkim",
            "type": "TXT",
            "name": f"{row['dkim_selector']}._domainkey.{name}",
            "value": dns_txt_value(row["dkim_public_key"]),
            "required": True,
        },
        {
            "purpose": "spf",
            "type": "TXT",
            "name": name,
            # The server's own domain's SPF lists every host that sends for it (docs/deploy.md);
            # including it keeps one list. "mx a:<domain>" named the server's mail domain as
            # a host, which it is not in a deployment with separate SMTP nodes.
            "value": f"v=spf1 include:{mail_host} ~all",
            "required": False,
        },
        {
            "purpose": "dmarc",
            "type": "TXT",
            "name": f"_dmarc.{name}",
            "value": f"v=DMARC1; p=quarantine; adkim=s; aspf=r; rua=mailto:dmarc@{name}",
            "required": False,
        },
        {
            "purpose": "mx",
            "type": "MX",
            "name": name,
            "value": f"10 {mail_host}.",
            "required": False,
        },
    ]


def domain_view(row: Any, settings: Settings) -> dict[str, Any]:
    data = jsonable(row, drop=("dkim_private_key", "account_id"))
    data["domain"] = data["name"]
    data["verified"] = data["status"] == "verified"
    data["dns_records"] = dns_records(row, settings)
    return data


def create_domain(
    conn: Connection, *, actor: Actor, settings: Settings, name: str
) -> dict[str, Any]:
    try:
        name = normalize_domain(name)
    except AddressError as exc:
        raise InvalidInput(str(exc), code="invalid_domain") from None
    if name == settings.domain.lower():
        raise InvalidInput(
            f"{name} is the server's own domain; it needs no registration", code="invalid_domain"
        )
    claimed = conn.execute(
        select(domains.c.id).where(
            domains.c.name == name,
            domains.c.status == "verified",
            domains.c.account_id != actor.account_id,
        )
    ).first()
    if claimed:
        # Same message as a duplicate in this account: do not reveal who holds it.
        raise Conflict(f"the domain {name} is already registered", code="domain_exists")
    keypair = generate_rsa_keypair(2048)
    now = utcnow()
    record: dict[str, Any] = {
        "id": new_id("dom"),
        "account_id": actor.account_id,
        "name": name,
        "verification_token": secrets.token_hex(16),
        "dkim_selector": "mm" + now.strftime("%Y%m"),
        "dkim_private_key": keypair.private_pem.decode("ascii"),
        "dkim_public_key": keypair.public_der_b64,
        "status": "pending",
        "check_results": None,
        "verified_at": None,
        "last_checked_at": None,
        "created_at": now,
    }
    try:
        with conn.begin_nested():
            conn.execute(insert(domains).values(**record))
    except IntegrityError:
        raise Conflict(f"the domain {name} is already registered", code="domain_exists") from None
    audit.append(
        conn,
        actor=actor,
        action="domain.created",
        subject_type="domain",
        subject_id=record["id"],
        details={"name": name, "dkim_selector": record["dkim_selector"]},
    )
    return domain_view(record, settings)


def get_domain(conn: Connection, actor: Actor, ref: str) -> dict[str, Any]:
    query = select(domains).where(domains.c.account_id == actor.account_id)
    query = query.where(domains.c.id == ref if ref.startswith("dom_") else domains.c.name == ref)
    row = conn.execute(query).mappings().first()
    if row is None:
        raise NotFound(f"domain {ref!r} not found", code="domain_not_found")
    return dict(row)


def list_domains(conn: Connection, *, actor: Actor, settings: Settings) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(domains).where(domains.c.account_id == actor.account_id).order_by(domains.c.id)
    ).mappings()
    return [domain_view(r, settings) for r in rows]


def _lookup(
    resolver: dns.resolver.Resolver, name: str, rtype: str
) -> tuple[dns.resolver.Answer | None, str | None]:
    try:
        return resolver.resolve(name, rtype), None
    except dns.resolver.NXDOMAIN:
        return None, "no such name (NXDOMAIN)"
    except dns.resolver.NoAnswer:
        return None, f"no {rtype} record"
    except dns.exception.DNSException as exc:
        return None, f"{_LOOKUP_FAILED}: {exc.__class__.__name__}"


def _txt_values(resolver: dns.resolver.Resolver, name: str) -> tuple[list[str], str | None]:
    answer, error = _lookup(resolver, name, "TXT")
    if answer is None:
        return [], error
    values = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]  # type: ignore[attr-defined]
    return values, None


def _host(name: str) -> str:
    """A host name as DNS compares it: case-insensitive, the root's trailing dot dropped."""
    return name.strip().rstrip(".").lower()


def _normalise_dkim(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        if key:
            tags[key.strip()] = "".join(val.split())
    return tags


def check_dns(
    row: Any,
    settings: Settings,
    *,
    only: Collection[str] | None = None,
    lifetime: float = 5.0,
) -> dict[str, Any]:
    """Ask DNS for every record (or the purposes ``only`` names); no database access, so it
    runs outside a transaction. ``lifetime``: seconds each lookup may take.

    Each result: ``ok``, ``status`` (the module's docstring), ``found`` (what DNS holds), ``error``
    when the lookup gave nothing, ``message`` unless the record is fine; MX adds
    ``expected``, the host the domain's MX must name."""
    resolver = make_sync_resolver(settings.dns_resolver, lifetime=lifetime)
    results: dict[str, Any] = {}
    for record in dns_records(row, settings):
        purpose = record["purpose"]
        if only is not None and purpose not in only:
            continue
        if record["type"] == "MX":
            results[purpose] = _check_mx(resolver, record)
            continue
        values, error = _txt_values(resolver, record["name"])
        if not values:
            results[purpose] = _absent(record, str(error))
        elif purpose == "spf":
            results[purpose] = _check_spf(record, values, _host(settings.domain))
        else:
            results[purpose] = _check_txt(record, values)
    return results


def _absent(record: dict[str, Any], error: str) -> dict[str, Any]:
    """The lookup gave no record: gone (missing) or DNS did not answer (unknown)."""
    name, kind = record["name"], record["type"]
    if error.startswith(_LOOKUP_FAILED):
        return {
            "ok": False,
            "status": "unknown",
            "found": [],
            "error": error,
            "message": f"DNS did not answer for the {kind} record of {name} ({error}); "
            "this proves nothing either way: check again later",
        }
    return {
        "ok": False,
        "status": "missing",
        "found": [],
        "error": error,
        "message": f"{name} has no {_label(record)} record ({error}): {_publish(record)}",
    }


def _publish(record: dict[str, Any]) -> str:
    # Verification and DKIM values are long and one-off: dns_records (and the dashboard row)
    # show them; the short recommended ones are worth spelling out.
    if record["required"]:
        return f"publish the {record['type']} record listed in dns_records for {record['name']}"
    return f"publish {record['type']} {record['name']} with the value {record['value']}"


def _label(record: dict[str, Any]) -> str:
    purpose = str(record["purpose"])
    return purpose if purpose == "verification" else purpose.upper()


def _check_txt(record: dict[str, Any], values: list[str]) -> dict[str, Any]:
    purpose = record["purpose"]
    if purpose == "verification":
        ok = record["value"] in values
    elif purpose == "dkim":
        wanted = _normalise_dkim(record["value"]).get("p")
        ok = any(_normalise_dkim(v).get("p") == wanted for v in values)
    else:
        ok = any(v.replace(" ", "").upper().startswith("V=DMARC1") for v in values)
    if ok:
        return {"ok": True, "status": "ok", "found": values}
    return {
        "ok": False,
        "status": "wrong",
        "found": values,
        "message": f"the TXT record of {record['name']} is not the {_label(record)} record "
        f"asked for: {_publish(record)}",
    }


def _check_mx(resolver: dns.resolver.Resolver, record: dict[str, Any]) -> dict[str, Any]:
    """Mail reaches this server only when an MX of the domain names it; any other host
    (another provider, a null MX) takes the domain's mail instead."""
    name = record["name"]
    expected = _host(record["value"].split()[-1])
    answer, error = _lookup(resolver, name, "MX")
    if answer is None:
        return _absent(record, str(error)) | {"expected": expected}
    hosts = [str(r.exchange).rstrip(".") for r in answer]  # type: ignore[attr-defined]
    if expected in (_host(h) for h in hosts):
        return {"ok": True, "status": "ok", "found": hosts, "expected": expected}
    # RFC 7505: an MX naming the root (".") says the domain accepts no mail at all.
    shown = ", ".join(h or ". (a null MX: the domain accepts no mail)" for h in hosts)
    return {
        "ok": False,
        "status": "wrong",
        "found": hosts,
        "expected": expected,
        "message": f"the MX record of {name} points at {shown}, not at {expected}: mail sent "
        f"to {name} goes there instead of this server. To receive it here, " + _publish(record),
    }


def _is_spf(value: str) -> bool:
    # RFC 7208 §4.5: the version is exactly "v=spf1", then a space or the end ("v=spf10" is not).
    terms = value.split()
    return bool(terms) and terms[0].lower() == "v=spf1"


def _qualified(term: str) -> tuple[str, str]:
    """An SPF term as (qualifier, mechanism); no qualifier means "+" (RFC 7208 §4.6.2)."""
    if term[0] in "+-~?":
        return term[0], term[1:].lower()
    return "+", term.lower()


def _check_spf(record: dict[str, Any], values: list[str], mail_host: str) -> dict[str, Any]:
    """Present is not enough: a "v=spf1 -all" would refuse every message we send."""
    name = record["name"]
    records = [v for v in values if _is_spf(v)]
    if not records:
        return {
            "ok": False,
            "status": "missing",
            "found": values,
            "message": f"{name} has no SPF record (a TXT record starting v=spf1): "
            + _publish(record),
        }
    if len(records) > 1:
        # RFC 7208 §4.5: more than one SPF record is a permerror, so every receiver treats
        # the domain as having no usable SPF, whatever each record says.
        return {
            "ok": False,
            "status": "broken",
            "found": values,
            "message": f"{name} has {len(records)} SPF records; receivers reject that as a "
            "permanent error (RFC 7208 §4.5) and SPF fails for all its mail. Merge them "
            f"into one TXT record that includes include:{mail_host}",
        }
    included, all_qualifier, redirect = False, None, False
    for term in records[0].split()[1:]:
        qualifier, mechanism = _qualified(term)
        if mechanism == "all":
            all_qualifier = qualifier
            break  # RFC 7208 §5.1: terms after "all" are never evaluated
        kind, _, target = mechanism.partition(":")
        if kind == "include" and qualifier == "+" and _host(target) == mail_host:
            included = True
        redirect = redirect or mechanism.startswith("redirect=")
    if not included:
        return {
            "ok": False,
            "status": "wrong",
            "found": values,
            "message": f"the SPF record of {name} does not authorise this server, so receivers "
            f"fail or doubt the mail it sends for {name}: add include:{mail_host} before "
            f"its all, as in: {record['value']}",
        }
    result: dict[str, Any] = {"ok": True, "status": "ok", "found": values}
    if all_qualifier == "+":
        warning = "ends in +all, which passes mail from every host"
    elif all_qualifier == "?" or (all_qualifier is None and not redirect):
        # RFC 7208 §4.7: no "all" and no redirect ends as "?all" would: neutral.
        warning = "ends neutral (?all), which says nothing about mail from other hosts"
    else:
        return result
    return result | {
        "status": "warning",
        "message": f"the SPF record of {name} {warning}, so SPF does not help receivers "
        f"refuse mail forged as {name}: end it with ~all or -all",
    }


def verify_domain(
    conn: Connection, *, actor: Actor, settings: Settings, ref: str, results: dict[str, Any]
) -> dict[str, Any]:
    row = get_domain(conn, actor, ref)
    verified = results["verification"]["ok"] and results["dkim"]["ok"]
    if verified and mailbox_service.verified_elsewhere(conn, row["account_id"], row["name"]):
        # Both tokens can sit in DNS at once; the first account to prove the domain holds it.
        raise Conflict(f"the domain {row['name']} is already registered", code="domain_exists")
    now = utcnow()
    values: dict[str, Any] = {
        "check_results": results,
        "last_checked_at": now,
        # A domain whose records disappeared stops being verified: its mail would fail DKIM.
        "status": "verified" if verified else "pending",
    }
    if verified and row["verified_at"] is None:
        values["verified_at"] = now
    conn.execute(update(domains).where(domains.c.id == row["id"]).values(**values))
    if verified:
        mailbox_service.retire_squatters(conn, row)
    audit.append(
        conn,
        actor=actor,
        action="domain.verified" if verified else "domain.verification_failed",
        subject_type="domain",
        subject_id=row["id"],
        details={"name": row["name"], "checks": {k: v["ok"] for k, v in results.items()}},
    )
    fresh = conn.execute(select(domains).where(domains.c.id == row["id"])).mappings().one()
    view = domain_view(fresh, settings)
    view["checks"] = results
    missing = [k for k in ("verification", "dkim") if not results[k]["ok"]]
    if missing:
        view["message"] = (
            "not verified yet: publish the "
            + " and ".join(missing)
            + " record(s) listed in dns_records, then call verify again"
        )
    return view


# What verification requires (verify_domain); the recommended records are only reported.
_REQUIRED = ("verification", "dkim")


def recheck_verified(services: Services, *, lifetime: float = 5.0) -> list[str]:
    """Check every verified domain's required records again; the ids of those that lost them.

    A domain stays verified only while DNS shows it: once its DKIM record is gone, mail
    signed with the key fails DKIM (and DMARC) at every receiver. A record that is gone or
    different (no such name, no record, another value) sends the domain back to pending,
    audited as ``domain.verification_lost``, so its mailboxes stop sending until it is
    published and verified again. A lookup that failed (a timeout, SERVFAIL) proves nothing
    and changes nothing. DNS is asked outside any transaction.
    """
    with services.db.read() as conn:
        verified = [
            dict(r)
            for r in conn.execute(
                select(domains).where(domains.c.status == "verified").order_by(domains.c.id)
            ).mappings()
        ]
    lost: list[str] = []
    for row in verified:
        results = check_dns(row, services.settings, only=_REQUIRED, lifetime=lifetime)
        failing = [k for k in _REQUIRED if not results[k]["ok"]]
        if any(str(results[k].get("error", "")).startswith(_LOOKUP_FAILED) for k in failing):
            continue
        now = utcnow()
        with services.db.write() as conn:
            still = domains.c.id == row["id"], domains.c.status == "verified"
            # The recommended records keep what the last full check (verify) found.
            checked = {**(row["check_results"] or {}), **results}
            values: dict[str, Any] = {"check_results": checked, "last_checked_at": now}
            if failing:
                values["status"] = "pending"
            if not conn.execute(update(domains).where(*still).values(**values)).rowcount:
                continue  # deleted or re-verified meanwhile
            if failing:
                audit.append(
                    conn,
                    actor=Actor(
                        type="system", id="domains", name="domains", account_id=row["account_id"]
                    ),
                    action="domain.verification_lost",
                    subject_type="domain",
                    subject_id=row["id"],
                    details={"name": row["name"], "missing": failing},
                )
                lost.append(str(row["id"]))
    return lost


def delete_domain(conn: Connection, *, actor: Actor, ref: str) -> dict[str, Any]:
    row = get_domain(conn, actor, ref)
    in_use = conn.execute(
        select(mailboxes.c.id).where(
            mailboxes.c.domain_id == row["id"], mailboxes.c.deleted_at.is_(None)
        )
    ).first()
    if in_use:
        raise Conflict(
            f"mailboxes still use {row['name']}; delete them first", code="domain_in_use"
        )
    conn.execute(update(mailboxes).where(mailboxes.c.domain_id == row["id"]).values(domain_id=None))
    conn.execute(delete(domains).where(domains.c.id == row["id"]))
    audit.append(
        conn,
        actor=actor,
        action="domain.deleted",
        subject_type="domain",
        subject_id=row["id"],
        details={"name": row["name"]},
    )
    return {"id": row["id"], "deleted": True}
