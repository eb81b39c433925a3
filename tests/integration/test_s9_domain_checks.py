"""A sending domain's DNS checks say whether each record does its job, not just that it exists.

The MX must name this server (any of the domain's MX records will do), SPF must be one record
that includes this server, and each check reports a ``status`` with a sentence saying what to
fix. Real DNS on loopback (the fixtures of ``test_domains_dns``); the API and the dashboard
show what the check found.
"""

from __future__ import annotations

import html
import re
from contextlib import closing
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from multimail.config import Settings
from multimail.services import accounts, domains
from multimail.services.context import Actor, Services
from multimail.store.tables import domains as dom_table
from multimail.testing.dns import LocalDNSServer
from multimail.testing.server import LiveServer
from tests.conftest import Api
from tests.integration.test_dashboard_http import (
    Tenant,
    _dashboard_in_app,
    acme,
    live,
    relay,
    signed_in,
    svc,
)
from tests.integration.test_domains_dns import dns_api, dns_server

__all__ = ["_dashboard_in_app", "acme", "dns_api", "dns_server", "live", "relay", "svc"]

# The server's own mail domain in the test settings: what the MX must name, what SPF includes.
MAIL_HOST = "mm.test"


@pytest.fixture
def settings(settings: Settings, dns_server: LocalDNSServer) -> Settings:
    """Every server these tests start (API or dashboard) asks the loopback DNS server."""
    return settings.model_copy(update={"dns_resolver": dns_server.address})


def _records(domain: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["purpose"]: r for r in domain["dns_records"]}


def _publish(dns_server: LocalDNSServer, domain: dict[str, Any], *purposes: str) -> None:
    records = _records(domain)
    for purpose in purposes:
        record = records[purpose]
        dns_server.add_record(record["name"], record["type"], record["value"])


def _verify(admin: httpx.Client, domain: dict[str, Any]) -> dict[str, Any]:
    response = admin.post(f"/v1/domains/{domain['id']}/verify")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_an_mx_naming_another_host_is_reported_with_what_to_publish(
    dns_api: Api, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """An MX at another provider takes the domain's mail elsewhere: the check says so, names
    the host found and the record to publish, and the API's domain view keeps it. MX stays a
    recommendation: the domain is verified all the same. A null MX (RFC 7505) is named."""
    admin = dns_api.client(boot.admin_key)
    domain = admin.post("/v1/domains", json={"name": "acme.example"}).json()
    _publish(dns_server, domain, "verification", "dkim", "spf", "dmarc")
    dns_server.add_record("acme.example", "MX", "10 mx.other-provider.example.")

    result = _verify(admin, domain)
    assert result["verified"] is True
    mx = result["checks"]["mx"]
    assert mx["ok"] is False  # the defect: any MX at all passed
    assert mx["status"] == "wrong"
    assert mx["found"] == ["mx.other-provider.example"] and mx["expected"] == MAIL_HOST
    assert "points at mx.other-provider.example" in mx["message"]
    assert f"publish MX acme.example with the value 10 {MAIL_HOST}." in mx["message"]
    assert all(result["checks"][p]["status"] == "ok" for p in ("verification", "dkim", "spf"))

    shown = admin.get(f"/v1/domains/{domain['id']}").json()["check_results"]["mx"]
    assert (shown["status"], shown["message"]) == ("wrong", mx["message"])

    dns_server.remove_records("acme.example", "MX")
    dns_server.add_record("acme.example", "MX", "0 .")
    null = _verify(admin, domain)["checks"]["mx"]
    assert (null["ok"], null["status"]) == (False, "wrong")
    assert "a null MX: the domain accepts no mail" in null["message"]


def test_any_mx_naming_this_server_is_fine_whatever_its_case(
    dns_api: Api, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """A backup MX elsewhere is fine when one of the MX records names this server; host names
    compare case-insensitively and without the root's trailing dot."""
    admin = dns_api.client(boot.admin_key)
    domain = admin.post("/v1/domains", json={"name": "mixed.example"}).json()
    _publish(dns_server, domain, "verification", "dkim")
    dns_server.add_record("mixed.example", "MX", "10 mx.other-provider.example.")
    dns_server.add_record("mixed.example", "MX", f"20 {MAIL_HOST.upper()}.")

    mx = _verify(admin, domain)["checks"]["mx"]
    assert (mx["ok"], mx["status"], mx["expected"]) == (True, "ok", MAIL_HOST)
    assert sorted(h.lower() for h in mx["found"]) == ["mm.test", "mx.other-provider.example"]
    assert "message" not in mx


def test_no_mx_is_missing_and_an_unanswered_lookup_is_unknown(
    dns_api: Api, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """No such name and no MX record are "missing", with the record to publish; a lookup DNS
    cannot answer is "unknown" and does not cost a verified domain its verification."""
    admin = dns_api.client(boot.admin_key)
    domain = admin.post("/v1/domains", json={"name": "quiet.example"}).json()
    _publish(dns_server, domain, "verification", "dkim")

    nxdomain = _verify(admin, domain)["checks"]["mx"]
    assert (nxdomain["ok"], nxdomain["status"]) == (False, "missing")
    assert nxdomain["error"] == "no such name (NXDOMAIN)"
    assert f"publish MX quiet.example with the value 10 {MAIL_HOST}." in nxdomain["message"]

    _publish(dns_server, domain, "spf")  # the name exists now, with no MX
    no_answer = _verify(admin, domain)["checks"]["mx"]
    assert (no_answer["status"], no_answer["error"]) == ("missing", "no MX record")

    _publish(dns_server, domain, "mx")
    assert _verify(admin, domain)["checks"]["mx"]["status"] == "ok"

    # A CNAME loop at the domain's own name: every lookup there fails (SERVFAIL-like), while
    # the verification and DKIM names below it still answer.
    dns_server.remove_records("quiet.example")
    dns_server.add_record("quiet.example", "CNAME", "loop.quiet.example.")
    dns_server.add_record("loop.quiet.example", "CNAME", "quiet.example.")
    result = _verify(admin, domain)
    assert result["verified"] is True and result["status"] == "verified"
    for purpose in ("mx", "spf"):
        check = result["checks"][purpose]
        assert (check["ok"], check["status"]) == (False, "unknown"), check
        assert check["error"].startswith("DNS lookup failed")
        assert "DNS did not answer" in check["message"]


def test_two_spf_records_are_broken(
    dns_api: Api, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """Two v=spf1 records are a permerror (RFC 7208 §4.5): SPF fails for all the domain's mail
    even though one of them includes this server, so the check says to merge them."""
    admin = dns_api.client(boot.admin_key)
    domain = admin.post("/v1/domains", json={"name": "twice.example"}).json()
    _publish(dns_server, domain, "verification", "dkim", "spf")
    dns_server.add_record("twice.example", "TXT", "v=spf1 include:_spf.other.example ~all")
    dns_server.add_record("twice.example", "TXT", "google-site-verification=abc")

    spf = _verify(admin, domain)["checks"]["spf"]
    assert spf["ok"] is False  # the defect: the include in one of them passed
    assert spf["status"] == "broken"
    assert len(spf["found"]) == 3
    assert "2 SPF records" in spf["message"] and "RFC 7208" in spf["message"]
    assert f"include:{MAIL_HOST}" in spf["message"]


@pytest.mark.parametrize(
    ("value", "ok", "status", "said"),
    [
        (f"v=spf1 include:{MAIL_HOST} ~all", True, "ok", None),
        (f"v=spf1 include:{MAIL_HOST.upper()}. -all", True, "ok", None),
        (f"v=spf1 include:{MAIL_HOST} +all", True, "warning", "+all"),
        (f"v=spf1 include:{MAIL_HOST} all", True, "warning", "+all"),
        (f"v=spf1 include:{MAIL_HOST} ?all", True, "warning", "?all"),
        (f"v=spf1 include:{MAIL_HOST}", True, "warning", "?all"),
        (f"v=spf1 include:{MAIL_HOST}.evil.example ~all", False, "wrong", "include:mm.test"),
        (f"v=spf1 -all include:{MAIL_HOST}", False, "wrong", "before its all"),
        (f"v=spf1 -include:{MAIL_HOST} ~all", False, "wrong", "does not authorise"),
        (f"v=spf10 include:{MAIL_HOST} ~all", False, "missing", "no SPF record"),
    ],
)
def test_spf_must_let_this_server_pass_and_not_pass_everyone(
    dns_api: Api,
    boot: accounts.Bootstrap,
    dns_server: LocalDNSServer,
    value: str,
    ok: bool,
    status: str,
    said: str | None,
) -> None:
    """The include counts only as a whole term naming this server, qualified to pass, before
    the all (RFC 7208 §5.1); +all (or a bare all) passes every host and ?all (or no all)
    leaves forgeries neutral, so those still work for us but are warnings."""
    admin = dns_api.client(boot.admin_key)
    domain = admin.post("/v1/domains", json={"name": "spf.example"}).json()
    _publish(dns_server, domain, "verification", "dkim")
    dns_server.add_record("spf.example", "TXT", value)

    spf = _verify(admin, domain)["checks"]["spf"]
    assert (spf["ok"], spf["found"]) == (ok, [value])
    assert spf["status"] == status
    if said is None:
        assert "message" not in spf
    else:
        assert said in spf["message"], spf["message"]


def test_domains_page_shows_each_checks_state_and_what_to_fix(
    live: LiveServer, acme: Tenant, svc: Services, dns_server: LocalDNSServer
) -> None:
    """After Verify, the dashboard shows each record's state with its sentence: an MX that
    points elsewhere, a broken SPF, a warning; results stored before checks had a state still
    show as verified / failed."""
    actor = Actor(type="system", id=None, name="test", account_id=acme.account_id)
    with svc.db.write() as conn:
        domain = domains.create_domain(
            conn, actor=actor, settings=svc.settings, name="shop.example"
        )
    _publish(dns_server, domain, "verification", "dkim", "spf")
    dns_server.add_record("shop.example", "TXT", f"v=spf1 include:{MAIL_HOST} +all")
    dns_server.add_record("shop.example", "MX", "10 mx.other-provider.example.")
    dmarc = _records(domain)["dmarc"]
    dns_server.add_record(dmarc["name"], "TXT", "v=DMARC1; p=none")

    client, token = signed_in(live, acme)
    with closing(client):
        page = client.post(
            f"/dashboard/domains/{domain['id']}/verify", data={"csrf_token": token}
        ).text
        states = _check_cells(page)
        assert states["mx"][0] == "wrong" and "points elsewhere" in states["mx"][1]
        assert "points at mx.other-provider.example" in states["mx"][1]
        assert f"10 {MAIL_HOST}." in states["mx"][1]
        assert states["spf"][0] == "broken" and "Merge them" in states["spf"][1]
        assert (states["verification"][0], states["dmarc"][0]) == ("ok", "ok")

        dns_server.remove_records("shop.example", "TXT")
        dns_server.add_record("shop.example", "TXT", f"v=spf1 include:{MAIL_HOST} +all")
        page = client.post(
            f"/dashboard/domains/{domain['id']}/verify", data={"csrf_token": token}
        ).text
        spf = _check_cells(page)["spf"]
        assert spf[0] == "warning" and "+all" in spf[1]

        with svc.db.write() as conn:
            conn.execute(
                update(dom_table)
                .where(dom_table.c.id == domain["id"])
                .values(check_results={"mx": {"ok": True, "found": [MAIL_HOST]}})
            )
        page = client.get("/dashboard/domains").text
    row = _check_row(page, "mx")
    assert "data-check" not in row and ">verified</span>" in row


def _check_row(page: str, purpose: str) -> str:
    # From the domain's card on: the server's own domain's card above has a dkim row too.
    _, title, card = page.partition('<h2 class="card-title">shop.example</h2>')
    assert title, "the page has no card for shop.example"
    found = re.search(rf"<tr>\s*<td>{purpose}\b.*?</tr>", card, re.S)
    assert found, f"the page has no {purpose} row"
    return found.group(0)


def _check_cells(page: str) -> dict[str, tuple[str, str]]:
    """Each record's check on the domains page: (its state, the cell's text)."""
    cells: dict[str, tuple[str, str]] = {}
    for purpose in ("verification", "dkim", "spf", "dmarc", "mx"):
        row = _check_row(page, purpose)
        state = re.search(r'data-check="([a-z]+)"', row)
        assert state, f"the {purpose} row shows no check state"
        last_cell = row.rsplit("<td>", 1)[1]
        text = html.unescape(re.sub(r"<[^>]+>", " ", last_cell))
        cells[purpose] = (state.group(1), " ".join(text.split()))
    return cells
