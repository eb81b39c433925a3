"""DKIM keys, signing and verification (RFC 6376).

Signing is done here, not by dkimpy: its pure-Python RSA (~190 signatures/s) and its
message parsing and relaxed canonicalisation cost more than the whole rest of delivery.
We parse only the header block, canonicalise with ``re`` on bytes, hash with hashlib and
sign with OpenSSL through ``cryptography``. The tag list, its folding (dkimpy's ``fold``)
and the header selection follow ``dkim.DKIM.sign`` step by step, and RSA-PKCS#1 v1.5 is
deterministic, so the header is byte-for-byte the one ``dkim.sign`` writes for the same
message and second (a test holds us to that). Verification is plain dkimpy.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from multimail.errors import InvalidInput

__all__ = [
    "DEFAULT_SIGNED_HEADERS",
    "DkimKeyPair",
    "dns_txt_value",
    "generate_rsa_keypair",
    "sign_message",
    "sign_split",
    "verify_message",
]

#: Signed when present, in this order (RELIABILITY AUTH-1).
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "x-multimail-identity",
    "x-multimail-agent",
    "x-ai-generated",
)

# Listing a name once more than it occurs makes any added copy break the signature.
# From always; the other RFC 5322 singletons too, since a second Subject or To shown by
# a careless client is as misleading as a second From.
_OVERSIGNED = frozenset(
    {"from", "reply-to", "to", "cc", "subject", "date", "message-id", "in-reply-to", "references"}
)

_CANONICALIZATION = b"relaxed/relaxed"
_PREHASHED_SHA256 = Prehashed(hashes.SHA256())


@dataclass(frozen=True)
class DkimKeyPair:
    """An RSA key pair: the PKCS#1 PEM private key and the base64 SubjectPublicKeyInfo."""

    private_pem: bytes
    public_der_b64: str

    def __repr__(self) -> str:
        # The private key must never reach a log line through a repr.
        return f"DkimKeyPair(public_der_b64={self.public_der_b64[:16]!r}...)"


def generate_rsa_keypair(bits: int = 2048) -> DkimKeyPair:
    """A fresh key pair; the PEM is PKCS#1 ("RSA PRIVATE KEY") because dkimpy reads only that."""
    if bits < 1024:
        raise InvalidInput("DKIM keys shorter than 1024 bits are refused by verifiers", bits=bits)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimKeyPair(
        private_pem=private_pem, public_der_b64=base64.b64encode(public_der).decode()
    )


def dns_txt_value(keypair_or_public_b64: DkimKeyPair | str) -> str:
    """The TXT record to publish at ``<selector>._domainkey.<domain>``."""
    if isinstance(keypair_or_public_b64, DkimKeyPair):
        public_b64 = keypair_or_public_b64.public_der_b64
    else:
        public_b64 = "".join(keypair_or_public_b64.split())
    return f"v=DKIM1; k=rsa; p={public_b64}"


@lru_cache(maxsize=256)
def _load_private_key(private_pem: bytes) -> rsa.RSAPrivateKey:
    # Parsing a PEM costs about half a signature; each domain's key is loaded once.
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            "the DKIM private key could not be read", code="invalid_dkim_key"
        ) from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise InvalidInput("the DKIM private key is not an RSA key", code="invalid_dkim_key")
    return key


# dkimpy's rfc822_parse, applied to the header block only.
_EOL = re.compile(rb"\r?\n")
_FIELD = re.compile(rb"([\x21-\x7e]+?):")
# dkimpy's relaxed canonicalisation (dkim.canonicalization.Relaxed).
_WSP = re.compile(rb"[\t ]+")
# Only the runs that change (a tab, or two or more blanks): rewriting every single space
# of a body as itself costs more than the rest of the signature but RSA.
_WSP_TO_COMPRESS = re.compile(rb"\t[\t ]*| [\t ]+")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_SHOULD_NOT_SIGN = frozenset(dkim.DKIM.SHOULD_NOT)
_CRLF = b"\r\n"


def _split_message(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Header fields as (name, value with its CRLF) and the body with CRLF line ends.

    Reads CRLF or bare LF like dkimpy, but leaves the body alone unless it has a bare LF.
    """
    end = raw.find(b"\r\n\r\n")
    if end > 0 and raw.count(b"\n", 0, end) == raw.count(_CRLF, 0, end):
        # The usual message: CRLF only up to the first empty line.
        return _header_fields(raw[:end].split(_CRLF)), _crlf_body(raw[end + 4 :])
    lines: list[bytes] = []
    pos = 0
    while True:
        eol = _EOL.search(raw, pos)
        line = raw[pos : eol.start() if eol else len(raw)]
        if not line:
            return _header_fields(lines), _crlf_body(raw[eol.end() :] if eol else b"")
        lines.append(line)
        if eol is None:
            return _header_fields(lines), b""
        pos = eol.end()


def _header_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[0] in (0x09, 0x20):
            if not headers:
                raise InvalidInput(
                    "the message starts with a continuation line", code="invalid_message"
                )
            name, value = headers[-1]
            headers[-1] = (name, value + line + _CRLF)
        elif field := _FIELD.match(line):
            headers.append((field.group(1), line[field.end() :] + _CRLF))
        elif not line.startswith(b"From "):
            raise InvalidInput("the message has a malformed header line", code="invalid_message")
    return headers


def _crlf_body(body: bytes) -> bytes:
    if body.count(b"\n") != body.count(_CRLF):
        body = _EOL.sub(_CRLF, body)
    return body


def _relaxed_value(value: bytes) -> bytes:
    # Unfold, compress blanks, strip; each step skipped when it would change nothing.
    if value.count(b"\n") == value.count(_CRLF):
        value = value.replace(_CRLF, b"")
    else:
        value = _EOL.sub(b"", value)
    if b"\t" in value or b"  " in value:
        value = _WSP_TO_COMPRESS.sub(b" ", value)
    return value.strip()


def _relaxed_body(body: bytes) -> bytes:
    # Looking for a byte is a memchr; looking for a pair of blanks steps through the body
    # a byte at a time, so the tab searches are made only when there is a tab.
    tab = b"\t" in body
    if b" \r\n" in body or (tab and b"\t\r\n" in body):
        body = _TRAILING_WSP.sub(_CRLF, body)
    if tab or b"  " in body:
        body = _WSP_TO_COMPRESS.sub(b" ", body)
    # Ignore empty lines at the end; a non-empty body ends in exactly one CRLF.
    end = len(body)
    while body.endswith(_CRLF, 0, end):
        end -= 2
    if end == len(body):
        body += _CRLF
    else:
        body = body[: end + 2]
    return b"" if body == _CRLF else body


def _hash_headers(
    hasher: Any, headers: Sequence[tuple[bytes, bytes]], include: Sequence[bytes]
) -> None:
    # dkim.select_headers: each listed name takes the next instance from the bottom up;
    # a name with no instance left contributes nothing.
    unused: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        unused.setdefault(name.lower(), []).append(value)
    canonical: list[bytes] = []
    for wanted in include:
        values = unused.get(wanted)
        if values:
            canonical += (wanted, b":", _relaxed_value(values.pop()), _CRLF)
    hasher.update(b"".join(canonical))


def _unsigned_tags(fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The folded tag list with an empty b= (the last tag), as dkimpy hashes it."""
    folded: bytes = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=14, linesep=_CRLF)
    # dkimpy empties b= with its RE_BTAG; b= being last, that is a cut after its "b="
    # (folding breaks at the space before "b=", never inside it; a test holds them equal).
    return folded[: folded.rindex(b"b=") + 2]


def _signature_header(
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    key: rsa.RSAPrivateKey,
    *,
    selector: bytes,
    domain: bytes,
    include: Sequence[bytes],
    timestamp: int,
) -> bytes:
    """The rsa-sha256 relaxed/relaxed DKIM-Signature field (with its CRLF) for a message
    split by ``_split_message``."""
    refused = set(include) & _SHOULD_NOT_SIGN
    if refused:
        raise InvalidInput(
            "these header fields must not be signed",
            code="dkim_unsignable_header",
            headers=sorted(h.decode() for h in refused),
        )
    body_hash = hashlib.sha256(_relaxed_body(body)).digest()
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", _CANONICALIZATION),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", selector),
        (b"t", str(timestamp).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(body_hash)),
        # dkimpy folds with a placeholder this long before it signs; the folding of the
        # other tags, which the signature covers, must be the same as in the final header.
        (b"b", b"0" * 60),
    ]
    unsigned = _unsigned_tags(fields)
    hasher = hashlib.sha256()
    _hash_headers(hasher, headers, include)
    # The signature field itself is hashed last, with an empty b= and no final CRLF.
    hasher.update(b"dkim-signature:" + _relaxed_value(b" " + unsigned))
    signature = key.sign(hasher.digest(), padding.PKCS1v15(), _PREHASHED_SHA256)
    fields[-1] = (b"b", base64.b64encode(signature))
    value = b"; ".join(b"=".join(f) for f in fields) + _CRLF
    folded: bytes = dkim.fold(value, namelen=14, linesep=_CRLF)
    return b"DKIM-Signature: " + folded


_DEFAULT_WANTED = tuple(
    dict.fromkeys([b"from", *(h.encode("ascii") for h in DEFAULT_SIGNED_HEADERS)])
)
_OVERSIGNED_BYTES = frozenset(h.encode("ascii") for h in _OVERSIGNED)


def _choose_headers(present: list[bytes], requested: Sequence[str] | None) -> list[bytes]:
    if not requested:  # None or empty: the default list
        wanted: Sequence[bytes] = _DEFAULT_WANTED
    else:
        wanted = tuple(dict.fromkeys([b"from", *(h.lower().encode("ascii") for h in requested)]))
    counts = Counter(present)
    chosen: list[bytes] = []
    for name in wanted:
        count = counts[name]
        if count == 0:
            # Naming an absent field signs its absence: worth it only when asked for.
            if requested is not None:
                chosen.append(name)
            continue
        chosen.extend([name] * (count + (name in _OVERSIGNED_BYTES)))
    return chosen


@lru_cache(maxsize=256)
def _check_parameters(domain: str, selector: str) -> tuple[bytes, bytes]:
    for label, value in (("domain", domain), ("selector", selector)):
        if not value or not value.isascii() or any(c in value for c in " ;=\r\n\t\0"):
            raise InvalidInput(f"invalid DKIM {label}", code="invalid_dkim_parameter")
    return domain.encode("ascii"), selector.encode("ascii")


def sign_message(
    raw: bytes,
    *,
    domain: str,
    selector: str,
    private_pem: bytes,
    headers_to_sign: Sequence[str] | None = None,
) -> bytes:
    """Return ``raw`` with an rsa-sha256, relaxed/relaxed DKIM-Signature prepended.

    ``headers_to_sign`` defaults to ``DEFAULT_SIGNED_HEADERS`` (those present); From is
    always signed and oversigned, and no ``l=`` tag is ever written.
    """
    parameters = _check_parameters(domain, selector)
    key = _load_private_key(private_pem)
    headers, body = _split_message(raw)
    return _signed(raw, headers, body, key, parameters, headers_to_sign)


def sign_split(
    raw: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    *,
    domain: str,
    selector: str,
    private_pem: bytes,
    headers_to_sign: Sequence[str] | None = None,
) -> bytes:
    """``sign_message`` for a caller that wrote ``raw`` and so holds it already split.

    ``headers`` are its header fields in order, each as (name, everything after the colon
    up to and including the field's final CRLF, continuation lines included); ``body`` is
    everything after the empty line, with CRLF line ends. These must be exactly what
    ``raw`` holds (``_split_message(raw)``), or the signature will not verify.
    """
    parameters = _check_parameters(domain, selector)
    key = _load_private_key(private_pem)
    return _signed(raw, headers, body, key, parameters, headers_to_sign)


def _signed(
    raw: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    key: rsa.RSAPrivateKey,
    parameters: tuple[bytes, bytes],
    headers_to_sign: Sequence[str] | None,
) -> bytes:
    present = [name.lower() for name, _ in headers]
    if present.count(b"from") != 1:
        raise InvalidInput(
            "a message to sign needs exactly one From header",
            code="invalid_from_header",
            from_headers=present.count(b"from"),
        )
    header = _signature_header(
        headers,
        body,
        key,
        selector=parameters[1],
        domain=parameters[0],
        include=_choose_headers(present, headers_to_sign),
        timestamp=int(time.time()),
    )
    return header + raw


def verify_message(
    raw: bytes, *, dnsfunc: Callable[[bytes], bytes | None] | None = None, index: int = 0
) -> bool:
    """True when the ``index``-th DKIM signature (0: the topmost) verifies (plain dkimpy, its
    key-size minimum); what ``dkim.verify`` does for the topmost one.

    ``dnsfunc`` answers the TXT lookup for a name like ``b"sel._domainkey.example.com."``;
    without it dkimpy queries DNS.
    """
    options: dict[str, Any] = {}
    if dnsfunc is not None:
        lookup = dnsfunc

        def txt(name: bytes, timeout: int = 5) -> bytes | None:
            return lookup(name)

        options["dnsfunc"] = txt
    try:
        return bool(dkim.DKIM(raw).verify(idx=index, **options))
    except dkim.DKIMException:
        return False
