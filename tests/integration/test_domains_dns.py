"""Sending domains: DKIM keys and DNS records on creation, verification through real DNS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts, domains
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_entries
from multimail.store.tables import domains as dom_table
from multimail.testing.dns import LocalDNSServer
from multimail.testing.server import LiveServer
from tests.conftest import Api


@pytest.fixture
def dns_server() -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        yield server


@pytest.fixture
def dns_api(settings: Settings, dns_server: LocalDNSServer) -> Iterator[Api]:
    svc = build_services(settings.model_copy(update={"dns_resolver": dns_server.address}))
    with LiveServer(svc) as server:
        helper = Api(server.base_url)
        yield helper
        helper.close()
    svc.db.dispose()


def test_domain_creation_returns_every_record_to_publish(
    dns_api: Api, boot: accounts.Bootstrap
) -> None:
    """Verification TXT, DKIM TXT (RSA-2048), SPF, DMARC and MX, and no private key."""
    admin = dns_api.client(boot.admin_key)
    created = admin.post("/v1/domains", json={"name": "Acme.Example"})
    assert created.status_code == 201, created.text
    domain = created.json()
    assert domain["name"] == "acme.example" and domain["status"] == "pending"
    assert "dkim_private_key" not in domain
    purposes = {r["purpose"]: r for r in domain["dns_records"]}
    assert set(purposes) == {"verification", "dkim", "spf", "dmarc", "mx"}
    dkim_value = purposes["dkim"]["value"]
    assert dkim_value.startswith("v=DKIM1; k=rsa; p=")
    import base64

    from cryptography.hazmat.primitives.serialization import load_der_public_key

    key = load_der_public_key(base64.b64decode(dkim_value.split("p=", 1)[1]))
    assert key.key_size == 2048  # type: ignore[union-attr]
    assert purposes["dkim"]["name"].endswith("._domainkey.acme.example")
    listed = admin.get("/v1/domains").json()["domains"]
    assert [d["id"] for d in listed] == [domain["id"]]
    dup = admin.post("/v1/domains", json={"name": "acme.example"})
    assert dup.status_code == 409 and dup.json()["code"] == "domain_exists"
    bad = admin.post("/v1/domains", json={"name": "not a domain"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_domain"


def test_verify_queries_dns_and_reports_each_record(
    dns_api: Api, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """Unpublished → pending with a sentence; published → verified; records removed → pending."""
    admin = dns_api.client(boot.admin_key)
    domain = admin.post("/v1/domains", json={"name": "acme.example"}).json()
    first = admin.post(f"/v1/domains/{domain['id']}/verify").json()
    assert first["status"] == "pending" and first["verified"] is False
    assert "publish" in first["message"]
    assert first["checks"]["verification"]["ok"] is False

    for record in domain["dns_records"]:
        dns_server.add_record(record["name"], record["type"], record["value"])
    second = admin.post(f"/v1/domains/{domain['id']}/verify").json()
    assert second["status"] == "verified" and second["verified"] is True
    assert all(check["ok"] for check in second["checks"].values()), second["checks"]
    assert second["verified_at"]

    # A mailbox can now live on the domain.
    box = admin.post("/v1/mailboxes", json={"address": "sales@acme.example"})
    assert box.status_code == 201 and box.json()["domain_id"] == domain["id"]

    dns_server.clear()
    third = admin.post(f"/v1/domains/{domain['id']}/verify").json()
    assert third["status"] == "pending"
    log = admin.get("/v1/audit-log", params={"action": "domain.verified"}).json()["entries"]
    assert len(log) == 1


def test_dkim_record_split_over_several_strings_still_verifies(
    dns_api: Api, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """A 2048-bit key is longer than one TXT string; the checker joins the strings."""
    admin = dns_api.client(boot.admin_key)
    domain = admin.post("/v1/domains", json={"name": "split.example"}).json()
    records = {r["purpose"]: r for r in domain["dns_records"]}
    assert len(records["dkim"]["value"]) > 255
    for purpose in ("verification", "dkim"):
        dns_server.add_record(records[purpose]["name"], "TXT", records[purpose]["value"])
    result = admin.post(f"/v1/domains/{domain['id']}/verify").json()
    assert result["verified"] is True
    assert result["checks"]["spf"]["ok"] is False  # recommended records are reported, not required


def test_domain_in_use_cannot_be_deleted(dns_api: Api, boot: accounts.Bootstrap) -> None:
    """Deleting a domain with live mailboxes is a 409; without them it goes."""
    admin = dns_api.client(boot.admin_key)
    domain = admin.post("/v1/domains", json={"name": "busy.example"}).json()
    box = admin.post("/v1/mailboxes", json={"address": "a@busy.example"}).json()
    conflict = admin.delete(f"/v1/domains/{domain['id']}")
    assert conflict.status_code == 409 and conflict.json()["code"] == "domain_in_use"
    admin.delete(f"/v1/mailboxes/{box['id']}")
    assert admin.delete(f"/v1/domains/{domain['id']}").json()["deleted"] is True


def test_a_verified_domain_whose_dkim_record_is_gone_goes_back_to_pending(
    settings: Settings, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """The worker's periodic re-check (``recheck_verified``): a record that is gone sends the
    domain back to pending (audited; its mailboxes stop sending mail receivers would fail),
    one still published keeps it verified, and a lookup that fails changes nothing."""
    svc = build_services(settings.model_copy(update={"dns_resolver": dns_server.address}))
    actor = Actor(type="key", id="key_admin", name="admin", account_id=boot.account["id"])
    try:
        with svc.db.write() as conn:
            made = domains.create_domain(conn, actor=actor, settings=svc.settings, name="a.example")
            kept = domains.create_domain(conn, actor=actor, settings=svc.settings, name="b.example")
        for domain in (made, kept):
            for record in domain["dns_records"]:
                dns_server.add_record(record["name"], record["type"], record["value"])
            row = _row(svc, domain["id"])
            results = domains.check_dns(row, svc.settings)
            with svc.db.write() as conn:
                domains.verify_domain(
                    conn, actor=actor, settings=svc.settings, ref=domain["id"], results=results
                )
        dkim = next(r for r in made["dns_records"] if r["purpose"] == "dkim")
        dns_server.remove_records(dkim["name"], "TXT")

        assert domains.recheck_verified(svc) == [made["id"]]
        assert (_row(svc, made["id"])["status"], _row(svc, kept["id"])["status"]) == (
            "pending",
            "verified",
        )
        with svc.db.read() as conn:
            lost = conn.execute(
                select(audit_entries.c.details).where(
                    audit_entries.c.action == "domain.verification_lost"
                )
            ).scalar_one()
        assert json.loads(lost) == {"name": "a.example", "missing": ["dkim"]}

        dns_server.stop()  # nobody answers: proves nothing about b.example's records
        assert domains.recheck_verified(svc, lifetime=0.5) == []
        assert _row(svc, kept["id"])["status"] == "verified"
    finally:
        svc.db.dispose()


def _row(svc: Services, domain_id: str) -> dict[str, Any]:
    with svc.db.read() as conn:
        return dict(
            conn.execute(select(dom_table).where(dom_table.c.id == domain_id)).mappings().one()
        )
