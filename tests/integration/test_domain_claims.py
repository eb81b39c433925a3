"""A domain belongs to the account that proves it in DNS: a pending claim by another account
gives no addresses on it (session 8 review; see test_review_s8_identity for the first case)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from multimail.services import accounts
from multimail.services.context import Services
from multimail.store.tables import audit_entries, mailboxes
from multimail.testing.dns import LocalDNSServer
from tests.conftest import Api
from tests.integration.test_review_s8_identity import client, dns_server, server, svc

__all__ = ["client", "dns_server", "server", "svc"]  # fixtures, re-exported so pytest finds them


def _publish(dns: LocalDNSServer, domain: dict[str, Any]) -> None:
    for record in domain["dns_records"]:
        dns.add_record(record["name"], record["type"], record["value"])


def test_a_squatters_mailboxes_are_retired_when_the_owner_verifies(
    client: Api, svc: Services, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """Mallory registers acme.example first and makes ceo@ on the pending claim; Acme proves
    the domain: Mallory's mailbox is deleted (audited in Mallory's account) and Acme can
    create ceo@acme.example. Mallory, with both tokens in DNS, cannot verify it too."""
    mallory = accounts.bootstrap(svc.db, account_name="Mallory", operator_email="m@mm.test")
    attacker = client.client(mallory.admin_key)
    owner = client.client(boot.admin_key)
    claim = attacker.post("/v1/domains", json={"name": "acme.example"}).json()
    squat = attacker.post("/v1/mailboxes", json={"address": "ceo@acme.example"})
    assert squat.status_code == 201, squat.text
    domain = owner.post("/v1/domains", json={"name": "acme.example"}).json()
    _publish(dns_server, domain)
    assert owner.post(f"/v1/domains/{domain['id']}/verify").json()["verified"] is True

    with svc.db.read() as conn:
        retired = conn.execute(
            select(mailboxes.c.deleted_at).where(mailboxes.c.id == squat.json()["id"])
        ).scalar_one()
        entry = conn.execute(
            select(audit_entries.c.account_id, audit_entries.c.details).where(
                audit_entries.c.action == "mailbox.deleted",
                audit_entries.c.subject_id == squat.json()["id"],
            )
        ).one()
    assert retired is not None, "the squatter's mailbox on the verified domain is still live"
    assert entry.account_id == mallory.account["id"], entry
    created = owner.post("/v1/mailboxes", json={"address": "ceo@acme.example"})
    assert created.status_code == 201, created.text

    _publish(dns_server, claim)  # the domain's DNS now holds Mallory's token as well
    second = attacker.post(f"/v1/domains/{claim['id']}/verify")
    assert (second.status_code, second.json()["code"]) == (409, "domain_exists"), second.text
