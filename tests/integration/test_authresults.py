"""SPF, DKIM and DMARC against a real DNS server on loopback, through the configured resolver."""

from __future__ import annotations

from collections.abc import Iterator

import dkim
import pytest

from multimail.mail.dkim import DkimKeyPair, dns_txt_value, generate_rsa_keypair
from multimail.services.authresults import (
    AuthResult,
    AuthResults,
    authenticate,
    check_spf,
    make_resolver,
)
from multimail.testing.dns import LocalDNSServer

KEY: DkimKeyPair = generate_rsa_keypair(2048)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        server.add_record("sender.test", "TXT", "v=spf1 ip4:127.0.0.1 include:other.test -all")
        server.add_record("other.test", "TXT", "v=spf1 ip4:192.0.2.7 ~all")
        server.add_record("soft.test", "TXT", "v=spf1 ip4:192.0.2.1 ~all")
        server.add_record("mxonly.test", "TXT", "v=spf1 mx -all")
        server.add_record("mxonly.test", "MX", "10 mail.mxonly.test.")
        server.add_record("mail.mxonly.test", "A", "127.0.0.1")
        server.add_record("sel._domainkey.sender.test", "TXT", dns_txt_value(KEY))
        server.add_record("sel._domainkey.mail.sender.test", "TXT", dns_txt_value(KEY))
        server.add_record("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject")
        server.add_record("strict.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        server.add_record("_dmarc.strict.test", "TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")
        server.add_record("sel._domainkey.sub.strict.test", "TXT", dns_txt_value(KEY))
        yield server


def _message(from_header: str = "Alice <alice@sender.test>", extra: str = "") -> bytes:
    return (
        f"From: {from_header}\r\n{extra}To: bot@mm.test\r\nSubject: hello\r\n"
        "Message-ID: <m1@sender.test>\r\n\r\nHello there.\r\n"
    ).encode()


def _sign(raw: bytes, domain: str = "sender.test") -> bytes:
    signature: bytes = dkim.sign(
        raw, b"sel", domain.encode(), KEY.private_pem, include_headers=[b"from", b"subject"]
    )
    return signature + raw


@pytest.mark.parametrize(
    ("ip", "mail_from", "expected"),
    [
        ("127.0.0.1", "a@sender.test", "pass"),
        ("192.0.2.7", "a@sender.test", "pass"),  # through include:
        ("192.0.2.7", "a@soft.test", "softfail"),
        ("192.0.2.99", "a@sender.test", "fail"),
        ("127.0.0.1", "a@mxonly.test", "pass"),
        ("192.0.2.99", "a@mxonly.test", "fail"),
        ("127.0.0.1", "a@nothing.test", "none"),
    ],
)
def test_spf_evaluates_mechanisms_through_the_configured_resolver(
    dns_server: LocalDNSServer, ip: str, mail_from: str, expected: str
) -> None:
    """ip4, include and mx mechanisms are resolved by our DNS server, not the system's."""
    resolver = make_resolver(dns_server.address)
    result = check_spf(resolver, peer_ip=ip, mail_from=mail_from, helo="client.test")
    assert result.result == expected
    assert result.domain == mail_from.partition("@")[2]


def test_bounce_sender_is_checked_by_helo_and_no_address_means_none(
    dns_server: LocalDNSServer,
) -> None:
    """The null sender uses postmaster@HELO (RFC 7208 §2.4); no client IP yields none."""
    resolver = make_resolver(dns_server.address)
    helo = check_spf(resolver, peer_ip="127.0.0.1", mail_from="", helo="sender.test")
    assert helo.result == "pass"
    assert check_spf(resolver, peer_ip=None, mail_from="a@sender.test", helo="x").result == "none"


def test_signed_aligned_message_passes_all_three(dns_server: LocalDNSServer) -> None:
    """A signature by the From domain and an SPF pass give dkim=pass and dmarc=pass."""
    raw = _sign(_message())
    results = authenticate(
        raw,
        resolver=make_resolver(dns_server.address),
        peer_ip="127.0.0.1",
        mail_from="bounce@sender.test",
        helo="client.test",
        from_address="alice@sender.test",
        from_count=1,
    )
    assert (results.spf.result, results.dkim.result, results.dmarc.result) == ("pass",) * 3
    assert results.dkim.domain == "sender.test"


def test_tampering_fails_dkim_and_dmarc_without_spf(dns_server: LocalDNSServer) -> None:
    """An altered body breaks the signature; without SPF from the domain DMARC fails."""
    raw = _sign(_message()).replace(b"Hello there.", b"Pay me now.")
    results = authenticate(
        raw,
        resolver=make_resolver(dns_server.address),
        peer_ip="192.0.2.99",
        mail_from="x@sender.test",
        helo="client.test",
        from_address="alice@sender.test",
        from_count=1,
    )
    assert results.dkim.result == "fail"
    assert results.spf.result == "fail"
    assert results.dmarc.result == "fail"


def test_two_from_headers_never_pass_dmarc(dns_server: LocalDNSServer) -> None:
    """AUTH-1: with two From fields DMARC fails even when SPF and DKIM pass."""
    raw = _sign(_message(extra="From: Boss <ceo@victim.test>\r\n"))
    results = authenticate(
        raw,
        resolver=make_resolver(dns_server.address),
        peer_ip="127.0.0.1",
        mail_from="a@sender.test",
        helo="client.test",
        from_address="alice@sender.test",
        from_count=2,
    )
    assert results.spf.result == "pass"
    assert results.dmarc.result != "pass"


def test_relaxed_alignment_accepts_a_subdomain_and_strict_does_not(
    dns_server: LocalDNSServer,
) -> None:
    """d=mail.sender.test aligns with sender.test under adkim=r; strict.test demands exact."""
    resolver = make_resolver(dns_server.address)
    relaxed = authenticate(
        _sign(_message(), "mail.sender.test"),
        resolver=resolver,
        peer_ip="192.0.2.99",
        mail_from="x@elsewhere.test",
        helo="h",
        from_address="alice@sender.test",
        from_count=1,
    )
    assert relaxed.dkim.result == "pass" and relaxed.dmarc.result == "pass"
    strict = authenticate(
        _sign(_message("Bob <bob@strict.test>"), "sub.strict.test"),
        resolver=resolver,
        peer_ip="192.0.2.99",
        mail_from="x@elsewhere.test",
        helo="h",
        from_address="bob@strict.test",
        from_count=1,
    )
    assert strict.dkim.result == "pass" and strict.dmarc.result == "fail"


def test_unsigned_message_from_a_domain_without_dmarc_is_none(dns_server: LocalDNSServer) -> None:
    """No signature → dkim=none; no DMARC record → dmarc=none."""
    results = authenticate(
        _message("x@nothing.test"),
        resolver=make_resolver(dns_server.address),
        peer_ip="127.0.0.1",
        mail_from="x@nothing.test",
        helo="h",
        from_address="x@nothing.test",
        from_count=1,
    )
    assert (results.spf.result, results.dkim.result, results.dmarc.result) == ("none",) * 3


def test_header_value_cannot_be_bent_by_sender_chosen_domains() -> None:
    """Domains from the sender are reduced to host characters: no new field, no new clause."""
    hostile = AuthResult("pass", "evil.test\r\nX-Injected: 1; dkim=pass")
    value = AuthResults(spf=hostile, dkim=AuthResult("none"), dmarc=AuthResult("fail", "a.test"))
    text = value.header_value("mm.test")
    assert "\r" not in text and "\n" not in text
    assert text.startswith("mm.test; spf=pass smtp.mailfrom=evil.testX-Injected1dkimpass;")
    assert text.count("dkim=") == 1
