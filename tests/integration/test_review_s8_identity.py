"""Review (S8): sending domains, DKIM and the signed identity proof (SPEC §3, §5.1).

Each test began as a reviewer's strict xfail naming a defect (session 8), fixed the same
session.
"""

from __future__ import annotations

from multimail.mail.dkim import dns_txt_value, generate_rsa_keypair, sign_message
from multimail.services import accounts
from multimail.services.authresults import check_spf, make_resolver
from multimail.services.context import Services
from multimail.testing.dns import LocalDNSServer
from tests.conftest import Api
from tests.integration.test_identity import (
    boot,
    checks,
    client,
    dns_server,
    resign,
    sent_bytes,
    server,
    stored_message,
    svc,
)

__all__ = ["boot", "client", "dns_server", "server", "svc"]  # fixtures, re-exported


def _strip_dkim(raw: bytes) -> bytes:
    head, _, body = raw.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"dkim-signature:")
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def test_verified_domain_cannot_host_another_accounts_mailboxes(
    client: Api, svc: Services, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """Acme proves acme.example through DNS; Mallory, who merely registered the name first
    (never able to publish its records), must not get addresses on it."""
    mallory = accounts.bootstrap(svc.db, account_name="Mallory", operator_email="m@mm.test")
    attacker = client.client(mallory.admin_key)
    owner = client.client(boot.admin_key)
    squat = attacker.post("/v1/domains", json={"name": "acme.example"})
    assert squat.status_code == 201, squat.text  # pending: allowed, nobody has proven it yet

    domain = owner.post("/v1/domains", json={"name": "acme.example"}).json()
    for record in domain["dns_records"]:
        dns_server.add_record(record["name"], record["type"], record["value"])
    verified = owner.post(f"/v1/domains/{domain['id']}/verify").json()
    assert verified["verified"] is True, verified

    taken = attacker.post("/v1/mailboxes", json={"address": "ceo@acme.example"})
    assert taken.status_code in (403, 409, 422), (
        "a mailbox on acme.example, verified by another account, was created for an account "
        f"that never proved the domain: {taken.status_code} {taken.text}; inbound mail to "
        "ceo@acme.example would now go to that account and the real owner cannot claim it"
    )


def test_verify_requires_dkim_aligned_with_the_from_domain(
    client: Api, svc: Services, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    genuine = sent_bytes(svc, stored_message(svc, boot))
    tampered = _strip_dkim(genuine).replace(
        b"Subject: Your refund", b"Subject: Your refund is DENIED - call +1 555 0100"
    )
    stranger = generate_rsa_keypair(2048)
    dns_server.add_record("evil._domainkey.evil.example", "TXT", dns_txt_value(stranger))
    forged = sign_message(
        tampered, domain="evil.example", selector="evil", private_pem=stranger.private_pem
    )
    report = client.client(boot.agent_key).post("/v1/verify", content=forged).json()
    assert report["verdict"] == "failed", (
        "a message whose only DKIM signature is d=evil.example (From is @mm.test) and whose "
        f"Subject was changed after sending was reported verified: {checks(report)}"
    )
    assert checks(report)["dkim"][0] is False, checks(report)


def test_identity_body_hash_covers_the_html_part(
    client: Api, svc: Services, boot: accounts.Bootstrap
) -> None:
    genuine = sent_bytes(svc, stored_message(svc, boot))
    assert b"<p>Your refund is on its way.</p>" in genuine
    edited = genuine.replace(
        b"<p>Your refund is on its way.</p>",
        b"<p>Your refund was denied. Pay the fee at https://pay.evil.example</p>",
    )
    report = client.client(boot.agent_key).post("/v1/verify", content=resign(svc, edited)).json()
    assert report["verdict"] == "failed", (
        "the HTML body was rewritten after sending yet the identity proof says "
        f"verified: {checks(report)}"
    )
    assert checks(report)["body_hash"][0] is False, checks(report)


def test_published_spf_record_authorises_the_servers_smtp_hosts(
    client: Api, svc: Services, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """docs/deploy.md: the server's domain has MX → mx1 (the SMTP nodes, with A records) and
    its own SPF ``v=spf1 mx …``. A sending domain that publishes exactly the records POST
    /v1/domains lists must let those SMTP nodes pass SPF."""
    server_domain = svc.settings.domain
    dns_server.add_record(server_domain, "MX", f"10 mx1.{server_domain}.")
    dns_server.add_record(f"mx1.{server_domain}", "A", "127.0.0.1")
    dns_server.add_record(server_domain, "TXT", f"v=spf1 mx a:{server_domain} ~all")
    admin = client.client(boot.admin_key)
    domain = admin.post("/v1/domains", json={"name": "acme.example"}).json()
    for record in domain["dns_records"]:
        dns_server.add_record(record["name"], record["type"], record["value"])
    # The server's own domain passes from its SMTP node: the layout itself is sound.
    resolver = make_resolver(svc.settings.dns_resolver)
    own = check_spf(
        resolver, peer_ip="127.0.0.1", mail_from=f"a@{server_domain}", helo=f"mx1.{server_domain}"
    )
    assert own.result == "pass", own
    custom = check_spf(
        resolver, peer_ip="127.0.0.1", mail_from="sales@acme.example", helo=f"mx1.{server_domain}"
    )
    records = {r["purpose"]: r["value"] for r in domain["dns_records"]}
    assert custom.result == "pass", (
        f"mail from acme.example sent by the server's SMTP node gets SPF {custom.result!r} with "
        f"the listed SPF record {records['spf']!r} (MX {records['mx']!r}); it should pass, e.g. "
        f"with include:{server_domain}"
    )
