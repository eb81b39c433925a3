"""DKIM: our OpenSSL-backed signer produces what plain dkimpy verifies (RELIABILITY AUTH-1)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import dkim
import dns.resolver
import pytest
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import parse_tag_value
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.errors import InvalidInput
from multimail.mail import dkim as our_dkim
from multimail.mail.compose import (
    ComposedMessage,
    OutboundAttachment,
    OutboundDraft,
    build_message,
    compose_message,
)
from multimail.mail.dkim import (
    DkimKeyPair,
    dns_txt_value,
    generate_rsa_keypair,
    sign_message,
    verify_message,
)
from multimail.testing.dns import LocalDNSServer
from multimail.workers import signing

DOMAIN = "acme.example"
SELECTOR = "mm2024"
KEY_NAME = f"{SELECTOR}._domainkey.{DOMAIN}."

DRAFT = OutboundDraft(
    from_address=f"support@{DOMAIN}",
    from_name="Acme Support",
    to=["bob@example.org"],
    cc=["carol@example.net"],
    reply_to=None,
    subject="Your order",
    markdown="Hello **Bob**,\n\nYour order has shipped.",
    message_id=f"<01HX5ZZKBKACTAV9WEVGEMMVRZ@{DOMAIN}>",
    date=datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
    in_reply_to="<prev@example.org>",
    references=["<prev@example.org>"],
    extra_headers=[
        ("X-MultiMail-Agent", "key_01HX"),
        ("X-MultiMail-Identity", "v1." + "a" * 200),
        ("List-Unsubscribe", f"<mailto:unsub@{DOMAIN}>, <https://{DOMAIN}/v1/unsubscribe/t0k>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ],
)


@pytest.fixture(scope="module")
def keypair() -> DkimKeyPair:
    return generate_rsa_keypair()


@pytest.fixture(scope="module")
def dnsfunc(keypair: DkimKeyPair) -> Callable[[bytes, int], bytes | None]:
    record = dns_txt_value(keypair).encode()

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == KEY_NAME.encode() else None

    return lookup


def _sign(raw: bytes, keypair: DkimKeyPair, headers_to_sign: Sequence[str] | None = None) -> bytes:
    return sign_message(
        raw,
        domain=DOMAIN,
        selector=SELECTOR,
        private_pem=keypair.private_pem,
        headers_to_sign=headers_to_sign,
    )


def sign_composed_checked(
    composed: ComposedMessage,
    key: signing.SigningKey,
    dnsfunc: Callable[[bytes, int], bytes | None],
) -> bytes:
    """``composed`` signed with ``key``, after checking that the header fields and body
    compose hands over are exactly what the signer's own parser reads from the bytes; the
    signature verifies with dkimpy."""
    headers, body = our_dkim._split_message(composed.raw)
    assert composed.fields == headers
    assert composed.raw[composed.body_start :] == body
    signed = signing.sign_composed(composed, key)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    return signed


def _tags(signed: bytes) -> dict[bytes, bytes]:
    header = signed.split(b"\r\n\r\n")[0].split(b"DKIM-Signature:", 1)[1]
    end = header.find(b"\r\n", 0)
    while header[end + 2 : end + 3] in (b" ", b"\t"):
        end = header.find(b"\r\n", end + 2)
    tags: dict[bytes, bytes] = parse_tag_value(header[:end])
    return tags


def _signed_names(signed: bytes) -> list[bytes]:
    return [h.strip() for h in _tags(signed)[b"h"].replace(b"\r\n", b"").split(b":")]


def test_composed_message_verifies_with_plain_dkimpy(
    keypair: DkimKeyPair, dnsfunc: Callable[[bytes, int], bytes | None]
) -> None:
    """What we sign, dkimpy's own dkim.verify accepts against the published key."""
    signed = _sign(build_message(DRAFT), keypair)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert verify_message(signed, dnsfunc=lambda name: dnsfunc(name, 5))


def _ours_and_dkimpys(
    raw: bytes, keypair: DkimKeyPair, include: Sequence[bytes]
) -> tuple[bytes, bytes]:
    """Our DKIM-Signature header and dkim.sign's, both made within the same second."""
    headers, body = our_dkim._split_message(raw)
    key = our_dkim._load_private_key(keypair.private_pem)
    while True:
        before = int(time.time())
        theirs: bytes = dkim.sign(
            raw,
            SELECTOR.encode(),
            DOMAIN.encode(),
            keypair.private_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(include),
        )
        ours = our_dkim._signature_header(
            headers,
            body,
            key,
            selector=SELECTOR.encode(),
            domain=DOMAIN.encode(),
            include=include,
            timestamp=before,
        )
        if int(time.time()) == before:
            return ours, theirs


def test_signature_is_byte_identical_to_dkimpy(keypair: DkimKeyPair) -> None:
    """For the same message and second our header equals dkim.sign's, byte for byte."""
    raw = build_message(DRAFT)
    include = [b"from", b"to", b"subject", b"date", b"message-id", b"from"]
    ours, theirs = _ours_and_dkimpys(raw, keypair, include)
    assert ours == theirs


@pytest.fixture(scope="module")
def small_keypair() -> DkimKeyPair:
    # dkimpy signs in pure Python: a short key keeps the comparison below quick.
    return generate_rsa_keypair(1024)


_header_values = st.lists(
    st.text(st.sampled_from("ab =;:\t"), max_size=30)
    | st.sampled_from(["  spaced   out  ", "\t", "", "x" * 90]),
    min_size=1,
    max_size=3,
).map(lambda parts: "\r\n ".join(parts))
_body_lines = st.lists(
    st.text(st.sampled_from("ab .\t"), max_size=40) | st.sampled_from(["", " ", "\t \t"]),
    max_size=8,
)


@given(
    fields=st.lists(
        st.tuples(st.sampled_from(["To", "Subject", "X-A", "SUBJECT", "to"]), _header_values),
        max_size=5,
    ),
    from_value=_header_values,
    lines=_body_lines,
    separator=st.sampled_from(["\r\n", "\n"]),
    body_end=st.sampled_from(["", "\r\n", "\r\n\r\n", "\n\n", "\r\n \r\n"]),
    include=st.lists(st.sampled_from([b"to", b"subject", b"x-a", b"cc", b"from"]), max_size=6),
)
@settings(max_examples=40, deadline=None)
def test_any_message_gets_dkimpys_signature(
    small_keypair: DkimKeyPair,
    fields: list[tuple[str, str]],
    from_value: str,
    lines: list[str],
    separator: str,
    body_end: str,
    include: list[bytes],
) -> None:
    """Odd whitespace, folding, bare LF, trailing blank lines: our header equals dkimpy's."""
    head = "".join(f"{name}:{value}\r\n" for name, value in [("From", from_value), *fields])
    text = head.replace("\r\n", separator) + separator + separator.join(lines) + body_end
    ours, theirs = _ours_and_dkimpys(text.encode(), small_keypair, [b"from", *include])
    assert ours == theirs


def test_signature_parameters(keypair: DkimKeyPair) -> None:
    """rsa-sha256, relaxed/relaxed, our domain and selector, and never an l= tag."""
    tags = _tags(_sign(build_message(DRAFT), keypair))
    assert tags[b"a"] == b"rsa-sha256"
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == DOMAIN.encode()
    assert tags[b"s"] == SELECTOR.encode()
    assert b"l" not in tags


def test_from_is_oversigned_and_the_important_headers_are_signed(keypair: DkimKeyPair) -> None:
    """From is signed twice (so a second From breaks it), plus every header we promise."""
    names = _signed_names(_sign(build_message(DRAFT), keypair))
    assert names.count(b"from") == 2
    promised = {
        b"to", b"cc", b"subject", b"date", b"message-id", b"in-reply-to", b"references",
        b"mime-version", b"content-type", b"list-unsubscribe", b"list-unsubscribe-post",
        b"x-multimail-identity", b"x-multimail-agent",
    }  # fmt: skip
    assert promised <= set(names)


def test_absent_headers_are_not_listed(keypair: DkimKeyPair) -> None:
    """A header the message lacks is not in h= unless the caller asks for it."""
    draft = replace(DRAFT, cc=[], in_reply_to=None, references=(), extra_headers=())
    names = _signed_names(_sign(build_message(draft), keypair))
    assert not {b"cc", b"in-reply-to", b"references", b"list-unsubscribe"} & set(names)


def test_explicit_header_list_still_signs_from(
    keypair: DkimKeyPair, dnsfunc: Callable[[bytes, int], bytes | None]
) -> None:
    """A caller's header list without From still gets From, oversigned."""
    signed = _sign(build_message(DRAFT), keypair, headers_to_sign=["Subject", "To"])
    assert _signed_names(signed).count(b"from") == 2
    assert dkim.verify(signed, dnsfunc=dnsfunc)


_TAMPERING: dict[str, Callable[[bytes], bytes]] = {
    "body": lambda m: m.replace(b"Your order has shipped", b"Your order was lost"),
    "from": lambda m: m.replace(b"support@acme.example>", b"ceo@acme.example>"),
    "subject": lambda m: m.replace(b"Subject: Your order", b"Subject: Urgent"),
    "second-from": lambda m: b"From: ceo@acme.example\r\n" + m,
    "added-subject": lambda m: m.replace(b"\r\n\r\n", b"\r\nSubject: Pay now\r\n\r\n", 1),
    "appended-body": lambda m: m + b"P.S. wire the money\r\n",
}


@pytest.mark.parametrize("tamper", _TAMPERING.values(), ids=_TAMPERING.keys())
def test_tampering_breaks_the_signature(
    keypair: DkimKeyPair,
    dnsfunc: Callable[[bytes, int], bytes | None],
    tamper: Callable[[bytes], bytes],
) -> None:
    """A changed body, From or Subject, an added From or Subject, or appended text all fail."""
    signed = _sign(build_message(DRAFT), keypair)
    tampered = tamper(signed)
    assert tampered != signed
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_relaxed_canonicalisation_tolerates_refolding(
    keypair: DkimKeyPair, dnsfunc: Callable[[bytes, int], bytes | None]
) -> None:
    """Whitespace changes a relay may make to headers and body do not break the signature."""
    signed = _sign(build_message(DRAFT), keypair)
    refolded = signed.replace(b"Subject: Your order", b"Subject:   Your\r\n order  ")
    assert refolded != signed
    assert dkim.verify(refolded, dnsfunc=dnsfunc)


def test_another_key_does_not_verify(keypair: DkimKeyPair) -> None:
    """A signature checked against a different published key fails."""
    other = dns_txt_value(generate_rsa_keypair(1024)).encode()
    signed = _sign(build_message(DRAFT), keypair)
    assert not verify_message(signed, dnsfunc=lambda name: other)


def test_a_message_with_two_from_headers_is_not_signed(keypair: DkimKeyPair) -> None:
    """We never vouch for a message whose author is ambiguous."""
    raw = b"From: a@acme.example\r\n" + build_message(DRAFT)
    with pytest.raises(InvalidInput) as caught:
        _sign(raw, keypair)
    assert caught.value.code == "invalid_from_header"


def test_bad_key_and_parameters_are_refused(keypair: DkimKeyPair) -> None:
    """An unreadable key, or a domain or selector that would corrupt the tag list, is refused."""
    raw = build_message(DRAFT)
    with pytest.raises(InvalidInput) as caught:
        sign_message(raw, domain=DOMAIN, selector=SELECTOR, private_pem=b"not a key")
    assert caught.value.code == "invalid_dkim_key"
    for domain, selector in [("acme.example; l=0", SELECTOR), (DOMAIN, "a\r\nb"), ("", SELECTOR)]:
        with pytest.raises(InvalidInput):
            sign_message(raw, domain=domain, selector=selector, private_pem=keypair.private_pem)


def test_private_key_is_loaded_once_per_pem(keypair: DkimKeyPair) -> None:
    """Signing many messages with one key parses its PEM once."""
    raw = build_message(DRAFT)
    _sign(raw, keypair)
    before = our_dkim._load_private_key.cache_info()
    for _ in range(5):
        _sign(raw, keypair)
    after = our_dkim._load_private_key.cache_info()
    assert after.misses == before.misses
    assert after.hits == before.hits + 5


def test_key_pair_and_txt_record(keypair: DkimKeyPair) -> None:
    """The PEM is PKCS#1, the TXT record has the DKIM1 form, the repr hides the private key."""
    assert keypair.private_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert dns_txt_value(keypair) == f"v=DKIM1; k=rsa; p={keypair.public_der_b64}"
    assert dns_txt_value(keypair.public_der_b64) == dns_txt_value(keypair)
    assert "PRIVATE" not in repr(keypair)
    with pytest.raises(InvalidInput):
        generate_rsa_keypair(512)


@pytest.fixture(scope="module")
def dns_server(keypair: DkimKeyPair) -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        server.add_record(KEY_NAME, "TXT", dns_txt_value(keypair))
        yield server


def test_key_published_in_real_dns_verifies(
    keypair: DkimKeyPair, dns_server: LocalDNSServer
) -> None:
    """The TXT value, served by a DNS server (split into 255-byte strings), verifies."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.host]
    resolver.port = dns_server.port

    def lookup(name: bytes) -> bytes | None:
        answer = resolver.resolve(name.decode(), "TXT", lifetime=5)
        return b"".join(b"".join(rdata.strings) for rdata in answer)

    signed = _sign(build_message(DRAFT), keypair)
    assert verify_message(signed, dnsfunc=lookup)


@given(
    subject=st.text(max_size=300),
    markdown=st.text(max_size=1500),
    name=st.text(max_size=60).filter(lambda s: not any(c in s for c in "\r\n\x00")),
)
@settings(max_examples=60, deadline=None)
def test_any_composed_message_verifies(
    keypair: DkimKeyPair,
    dnsfunc: Callable[[bytes, int], bytes | None],
    subject: str,
    markdown: str,
    name: str,
) -> None:
    """Whatever the subject, name and body, the signed message verifies with dkimpy."""
    draft = replace(DRAFT, subject=subject, markdown=markdown, from_name=name)
    try:
        raw = build_message(draft)
    except InvalidInput:
        return  # encoded line breaks in a name are refused before signing
    signed = _sign(raw, keypair)
    assert dkim.verify(signed, dnsfunc=dnsfunc)


_wire_bytes = st.lists(
    st.sampled_from([b"a", b" ", b"\t", b"\r\n", b"\n", b"\r", b"  ", b"\r\n\r\n", b"."]),
    max_size=40,
).map(b"".join)


@given(_wire_bytes)
@settings(max_examples=500)
def test_relaxed_canonicalisation_matches_dkimpys(data: bytes) -> None:
    """Body and header-value canonicalisation give dkimpy's bytes for any whitespace mix."""
    relaxed = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    body = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert our_dkim._relaxed_body(body) == relaxed.canonicalize_body(body)
    [(_, value)] = relaxed.canonicalize_headers([(b"X", data)])
    assert our_dkim._relaxed_value(data) + b"\r\n" == value


@given(
    subject=st.text(max_size=200),
    markdown=st.text(max_size=1200) | st.sampled_from(["a  b\t\n\n  c  ", "x" * 300, ""]),
    extra=st.lists(
        st.tuples(st.sampled_from(["X-Note", "X-Agent"]), st.text(max_size=150)), max_size=3
    ),
    references=st.lists(st.sampled_from(["<a@x.example>", "<" + "r" * 80 + "@x.example>"])),
    files=st.lists(
        st.builds(
            OutboundAttachment,
            st.sampled_from(["a.txt", "résumé.pdf", "x" * 90 + ".bin"]),
            st.sampled_from(["text/plain", "application/pdf"]),
            st.binary(max_size=200),
        ),
        max_size=2,
    ),
)
@settings(max_examples=60, deadline=None)
def test_composed_fields_are_what_the_signer_would_read(
    keypair: DkimKeyPair,
    dnsfunc: Callable[[bytes, int], bytes | None],
    subject: str,
    markdown: str,
    extra: list[tuple[str, str]],
    references: list[str],
    files: list[OutboundAttachment],
) -> None:
    """The header fields and body compose hands over are exactly what the signer's own
    parser reads from the bytes, and the signature made from them verifies with dkimpy."""
    draft = replace(
        DRAFT,
        subject=subject,
        markdown=markdown,
        extra_headers=[*DRAFT.extra_headers, *extra],
        references=references,
        attachments=files,
    )
    try:
        composed = compose_message(draft)
    except InvalidInput:
        return
    key = signing.SigningKey(DOMAIN, SELECTOR, keypair.private_pem)
    sign_composed_checked(composed, key, dnsfunc)
    while True:
        second = int(time.time())
        pair = signing.sign_composed(composed, key), signing.sign(composed.raw, key)
        if int(time.time()) == second:
            assert pair[0] == pair[1]
            return


@given(
    domain=st.text(st.sampled_from("abc.-"), min_size=1, max_size=60),
    selector=st.text(st.sampled_from("xyz1"), min_size=1, max_size=30),
    include=st.lists(
        st.sampled_from([b"from", b"to", b"x-multimail-identity", b"cc"]), max_size=20
    ),
    timestamp=st.integers(0, 2**40),
)
@settings(max_examples=500)
def test_emptying_b_is_dkimpys_re_btag(
    domain: str, selector: str, include: list[bytes], timestamp: int
) -> None:
    """Cutting the folded tag list after its last "b=" is what dkimpy's RE_BTAG does."""
    fields = [
        (b"v", b"1"),
        (b"d", domain.encode()),
        (b"s", selector.encode()),
        (b"t", str(timestamp).encode()),
        (b"h", b" : ".join([b"from", *include])),
        (b"bh", b"A" * 44),
        (b"b", b"0" * 60),
    ]
    folded = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=14, linesep=b"\r\n")
    assert our_dkim._unsigned_tags(fields) == dkim.RE_BTAG.sub(b"\\1", folded)


@given(
    present=st.lists(st.sampled_from([b"from", b"to", b"subject", b"cc", b"x-a"]), max_size=8),
    requested=st.none() | st.lists(st.sampled_from(["From", "to", "CC", "X-A", "date"])),
)
def test_header_choice_is_the_documented_rule(
    present: list[bytes], requested: list[str] | None
) -> None:
    """From first, then each wanted name once per instance, once more for the RFC 5322
    singletons; an absent name only when the caller named it (an empty list is the default)."""
    names = [h.lower().encode() for h in (requested or our_dkim.DEFAULT_SIGNED_HEADERS)]
    expected: list[bytes] = []
    for name in dict.fromkeys([b"from", *names]):
        count = present.count(name)
        if count == 0:
            expected += [name] if requested is not None else []
            continue
        expected += [name] * (count + (name.decode() in our_dkim._OVERSIGNED))
    assert our_dkim._choose_headers(present, requested) == expected
