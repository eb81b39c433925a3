"""The SSRF guard: webhooks never reach loopback, private, link-local or reserved addresses."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.domain.netguard import (
    check_webhook_url,
    is_forbidden_target,
    resolve_and_check,
)
from multimail.errors import Forbidden, InvalidInput, TemporaryDeliveryError

FORBIDDEN_V4 = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
]
FORBIDDEN_V6 = ["::1/128", "::/128", "fc00::/7", "fe80::/10", "ff00::/8", "2001:db8::/32"]
PUBLIC_V4 = ["1.0.0.0/8", "8.0.0.0/8", "23.0.0.0/8", "93.184.0.0/16", "151.101.0.0/16"]
PUBLIC_V6 = ["2600::/12", "2a00::/12", "2400::/12"]


def _addresses_in(
    networks: list[str],
) -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    def draw_from(cidr: str) -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        net = ipaddress.ip_network(cidr)
        return st.integers(int(net.network_address), int(net.broadcast_address)).map(
            lambda n: ipaddress.ip_address(n)
        )

    return st.sampled_from(networks).flatmap(draw_from)


def _wrappings(v4: ipaddress.IPv4Address) -> list[ipaddress.IPv6Address]:
    n = int(v4)
    return [
        ipaddress.IPv6Address((0xFFFF << 32) | n),  # IPv4-mapped
        ipaddress.IPv6Address((0x64FF9B << 96) | n),  # NAT64 well-known prefix
        ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1),  # 6to4
    ]


@settings(max_examples=300, deadline=None)
@given(address=_addresses_in(FORBIDDEN_V4))
def test_internal_ipv4_is_forbidden_bare_and_wrapped(address: ipaddress.IPv4Address) -> None:
    """Every internal IPv4 address is refused, also inside IPv4-mapped, NAT64 and 6to4 IPv6."""
    assert is_forbidden_target(address) is not None
    assert is_forbidden_target(str(address)) is not None
    for wrapped in _wrappings(address):
        assert is_forbidden_target(wrapped) is not None, wrapped


@settings(max_examples=200, deadline=None)
@given(address=_addresses_in(FORBIDDEN_V6))
def test_internal_ipv6_is_forbidden(address: ipaddress.IPv6Address) -> None:
    """Loopback, unspecified, unique-local, link-local, multicast, documentation IPv6: refused."""
    assert is_forbidden_target(address) is not None


@settings(max_examples=200, deadline=None)
@given(address=_addresses_in(PUBLIC_V4))
def test_public_ipv4_is_allowed_bare_and_wrapped(address: ipaddress.IPv4Address) -> None:
    """Public IPv4 addresses pass, and so do their IPv4-mapped, NAT64 and 6to4 forms."""
    assert is_forbidden_target(address) is None
    for wrapped in _wrappings(address):
        assert is_forbidden_target(wrapped) is None, wrapped


@settings(max_examples=200, deadline=None)
@given(address=_addresses_in(PUBLIC_V6))
def test_public_ipv6_is_allowed(address: ipaddress.IPv6Address) -> None:
    """Global unicast IPv6 addresses pass."""
    assert is_forbidden_target(address) is None


@settings(max_examples=500, deadline=None)
@given(n=st.integers(0, 2**32 - 1))
def test_no_ipv4_address_the_stdlib_calls_non_global_slips_through(n: int) -> None:
    """Across all of IPv4: whatever ipaddress says is not globally reachable is forbidden,
    and an address and its IPv4-mapped form get the same verdict."""
    address = ipaddress.IPv4Address(n)
    verdict = is_forbidden_target(address)
    if not address.is_global or address.is_multicast:
        assert verdict is not None
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | n)
    assert (is_forbidden_target(mapped) is None) == (verdict is None)


@settings(max_examples=500, deadline=None)
@given(n=st.integers(0, 2**128 - 1))
def test_no_ipv6_address_the_stdlib_calls_non_global_slips_through(n: int) -> None:
    """Across all of IPv6: a non-global address is forbidden unless it wraps a public IPv4."""
    address = ipaddress.IPv6Address(n)
    if address.is_global and not address.is_multicast:
        return
    if address.ipv4_mapped is not None and address.ipv4_mapped.is_global:
        return
    assert is_forbidden_target(address) is not None


@pytest.mark.parametrize(
    ("address", "reason_part"),
    [
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:10.1.2.3", "private"),
        ("64:ff9b::7f00:1", "loopback"),
        ("2002:c0a8:0101::1", "private"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ("fe80::1%eth0", "link-local"),
        ("100.100.100.200", "carrier-grade NAT"),
        ("255.255.255.255", "reserved"),
        ("[::1]", "loopback"),
    ],
)
def test_reason_names_the_kind_of_address(address: str, reason_part: str) -> None:
    """The reason says what the address is, for the error shown to the operator."""
    reason = is_forbidden_target(address)
    assert reason is not None and reason_part in reason


def test_non_address_text_is_invalid_input() -> None:
    """A string that is not an IP address raises InvalidInput instead of passing."""
    with pytest.raises(InvalidInput):
        is_forbidden_target("example.com")


@pytest.mark.parametrize(
    ("url", "host", "port", "path"),
    [
        ("https://hooks.example.com/in", "hooks.example.com", 443, "/in"),
        ("https://Hooks.Example.COM:8443/a/b?x=1#frag", "hooks.example.com", 8443, "/a/b?x=1"),
        ("https://8.8.8.8", "8.8.8.8", 443, "/"),
        ("https://[2606:4700::1111]:444/x", "2606:4700::1111", 444, "/x"),
        ("https://bücher.example/h", "xn--bcher-kva.example", 443, "/h"),
        ("https://hooks.example.com./in", "hooks.example.com", 443, "/in"),
    ],
)
def test_good_webhook_urls_are_parsed(url: str, host: str, port: int, path: str) -> None:
    """Public https URLs pass, with host, port and request path normalised."""
    target = check_webhook_url(url, allow_http=False, allow_private=False)
    assert (target.scheme, target.host, target.port, target.path) == ("https", host, port, path)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://hooks.example.com/in", "webhook_url_insecure"),
        ("ftp://hooks.example.com/in", "webhook_url_invalid"),
        ("hooks.example.com/in", "webhook_url_invalid"),
        ("https://user:pw@hooks.example.com/", "webhook_url_invalid"),
        ("https://user@hooks.example.com/", "webhook_url_invalid"),
        ("https:///path", "webhook_url_invalid"),
        ("https://hooks.example.com:0/", "webhook_url_invalid"),
        ("https://hooks.example.com:65536/", "webhook_url_invalid"),
        ("https://hooks.example.com:-1/", "webhook_url_invalid"),
        ("https://hooks.example.com/a b", "webhook_url_invalid"),
        ("https://hooks.example.com/\r\nX: y", "webhook_url_invalid"),
        ("https://under_score.example.com/", "webhook_url_invalid"),
        ("https://-bad.example.com/", "webhook_url_invalid"),
        ("https://2130706433/", "webhook_url_invalid"),
        ("https://0x7f.1/", "webhook_url_invalid"),
        ("https://127.1/", "webhook_url_invalid"),
        ("https://127.0.0.1/", "webhook_target_forbidden"),
        ("https://[::1]/", "webhook_target_forbidden"),
        ("https://[::ffff:169.254.169.254]/", "webhook_target_forbidden"),
        ("https://169.254.169.254/latest/meta-data", "webhook_target_forbidden"),
        ("https://localhost:8000/", "webhook_target_forbidden"),
        ("https://api.localhost/", "webhook_target_forbidden"),
        ("https://" + "a" * 64 + ".example.com/", "webhook_url_invalid"),
        ("https://example.com/" + "x" * 3000, "webhook_url_invalid"),
    ],
)
def test_bad_webhook_urls_are_refused_with_a_code(url: str, code: str) -> None:
    """Insecure, malformed, credential-carrying and internal URLs are refused with their code."""
    with pytest.raises(InvalidInput) as caught:
        check_webhook_url(url, allow_http=False, allow_private=False)
    assert caught.value.code == code


def test_development_switches_allow_http_and_private_targets() -> None:
    """allow_http admits http, and allow_private admits loopback, for local development."""
    target = check_webhook_url("http://127.0.0.1:9000/h", allow_http=True, allow_private=True)
    assert (target.scheme, target.host, target.port, target.is_ip_literal) == (
        "http",
        "127.0.0.1",
        9000,
        True,
    )
    assert check_webhook_url("http://localhost/", allow_http=True, allow_private=True).port == 80
    with pytest.raises(InvalidInput) as caught:
        check_webhook_url("http://127.0.0.1/", allow_http=True, allow_private=False)
    assert caught.value.code == "webhook_target_forbidden"


async def test_system_resolution_of_localhost_is_forbidden() -> None:
    """localhost, resolved by the real system resolver, is refused with webhook_target_forbidden."""
    with pytest.raises(Forbidden) as caught:
        await resolve_and_check("localhost", 443, allow_private=False)
    assert caught.value.code == "webhook_target_forbidden"
    assert caught.value.context["address"] in {"127.0.0.1", "::1"}


async def test_ip_literal_passes_through_the_system_resolver() -> None:
    """An IP literal resolves to itself: a public one passes, a private one is refused."""
    assert await resolve_and_check("8.8.8.8", 443, allow_private=False) == ["8.8.8.8"]
    with pytest.raises(Forbidden):
        await resolve_and_check("10.0.0.1", 443, allow_private=False)


async def test_allow_private_returns_the_loopback_addresses() -> None:
    """With allow_private the resolved addresses come back unchecked, for local testing."""
    addresses = await resolve_and_check("127.0.0.1", 80, allow_private=True)
    assert addresses == ["127.0.0.1"]


async def test_one_internal_address_among_public_ones_is_enough_to_refuse() -> None:
    """A name resolving to public and internal addresses is refused (rebinding defence)."""

    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "2606:2800:220:1::1", "169.254.169.254"]

    with pytest.raises(Forbidden) as caught:
        await resolve_and_check("evil.example", 443, allow_private=False, resolver=resolver)
    assert caught.value.context["address"] == "169.254.169.254"


async def test_public_addresses_are_returned_deduplicated_in_order() -> None:
    """Public results are returned once each, in the resolver's order, for the connect step."""

    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "2606:2800:220:1::1", "93.184.216.34"]

    addresses = await resolve_and_check("ok.example", 443, allow_private=False, resolver=resolver)
    assert addresses == ["93.184.216.34", "2606:2800:220:1::1"]


async def test_resolution_failure_is_a_temporary_error() -> None:
    """A name that does not resolve is retried later, not treated as permanent or as allowed."""

    async def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def empty(host: str, port: int) -> list[str]:
        return []

    for resolver in (failing, empty):
        with pytest.raises(TemporaryDeliveryError) as caught:
            await resolve_and_check("gone.example", 443, allow_private=False, resolver=resolver)
        assert caught.value.code == "webhook_dns_failed"
