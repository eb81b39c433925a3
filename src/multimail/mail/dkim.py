"""DKIM keys, signing and verification (RFC 6376).

Signing keeps dkimpy's parsing, relaxed/relaxed canonicalisation, header hashing and
signature folding, and replaces only the RSA step: dkimpy does RSA in pure Python
(~190 signatures/s), OpenSSL through ``cryptography`` is more than ten times faster. The
RSA-PKCS#1 v1.5 signature is deterministic, so the header we produce is byte-for-byte
the one ``dkim.sign`` would produce for the same message and timestamp.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from multimail.errors import InvalidInput

__all__ = [
    "DEFAULT_SIGNED_HEADERS",
    "DkimKeyPair",
    "dns_txt_value",
    "generate_rsa_keypair",
    "sign_message",
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


class _OpenSSLDKIM(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's DKIM with the RSA primitive done by OpenSSL.

    ``sign_rsa`` follows ``dkim.DKIM.sign`` for rsa-sha256 without its pure-Python PEM
    parse; ``gen_header`` follows dkimpy's folding exactly, so verifiers see the same
    header dkimpy would write.
    """

    def __init__(self, message: bytes, key: rsa.RSAPrivateKey) -> None:
        super().__init__(message, signature_algorithm=b"rsa-sha256", linesep=b"\r\n")
        self._openssl_key = key

    def sign_rsa(
        self, selector: bytes, domain: bytes, include_headers: Sequence[bytes], timestamp: int
    ) -> bytes:
        canon_policy = CanonicalizationPolicy.from_c_value(_CANONICALIZATION)
        self.include_headers = tuple(include_headers)
        refused = set(self.include_headers) & self.should_not_sign
        if refused:
            raise InvalidInput(
                "these header fields must not be signed",
                code="dkim_unsignable_header",
                headers=sorted(h.decode() for h in refused),
            )
        self.hasher = dkim.HASH_ALGORITHMS[self.signature_algorithm]
        body_hash = self.hasher(canon_policy.canonicalize_body(self.body)).digest()
        fields = [
            (b"v", b"1"),
            (b"a", self.signature_algorithm),
            (b"c", canon_policy.to_c_value()),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", selector),
            (b"t", str(timestamp).encode("ascii")),
            (b"h", b" : ".join(self.include_headers)),
            (b"bh", base64.b64encode(body_hash)),
            # A placeholder as long as dkimpy's keeps the folding of the other tags stable.
            (b"b", b"0" * 60),
        ]
        value: bytes = self.gen_header(
            fields, self.include_headers, canon_policy, b"DKIM-Signature", None
        )
        self.domain = domain
        self.selector = selector
        self.signature_fields = dict(fields)
        return b"DKIM-Signature: " + value

    def gen_header(
        self,
        fields: list[tuple[bytes, bytes]],
        include_headers: Sequence[bytes],
        canon_policy: Any,
        header_name: bytes,
        pk: Any,
        standardize: bool = False,
    ) -> bytes:
        header_value = b"; ".join(b"=".join(x) for x in fields)
        header_value = dkim.fold(header_value, namelen=len(header_name), linesep=b"\r\n")
        header_value = dkim.RE_BTAG.sub(b"\\1", header_value)
        header = (header_name, b" " + header_value)
        hasher = dkim.HashThrough(self.hasher(), self.debug_content)
        headers = canon_policy.canonicalize_headers(self.headers)
        self.signed_headers = dkim.hash_headers(
            hasher, canon_policy, headers, include_headers, header, dict(fields)
        )
        # Same bytes as dkimpy's RSASSA_PKCS1_v1_5_sign over the same digest.
        signature = self._openssl_key.sign(hasher.digest(), padding.PKCS1v15(), _PREHASHED_SHA256)
        index = next(i for i, (tag, _) in enumerate(fields) if tag == b"b")
        fields[index] = (b"b", base64.b64encode(signature))
        header_value = b"; ".join(b"=".join(x) for x in fields) + self.linesep
        folded: bytes = dkim.fold(header_value, namelen=len(header_name), linesep=self.linesep)
        return folded


def _header_names(message: dkim.DKIM) -> list[bytes]:
    return [name.lower() for name, _ in message.headers]


def _choose_headers(present: list[bytes], requested: Sequence[str] | None) -> list[bytes]:
    wanted = [h.lower().encode("ascii") for h in (requested or DEFAULT_SIGNED_HEADERS)]
    chosen: list[bytes] = []
    for name in dict.fromkeys([b"from", *wanted]):
        count = present.count(name)
        if count == 0:
            # Naming an absent field signs its absence: worth it only when asked for.
            if requested is not None:
                chosen.append(name)
            continue
        extra = 1 if name.decode() in _OVERSIGNED else 0
        chosen.extend([name] * (count + extra))
    return chosen


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
    for label, value in (("domain", domain), ("selector", selector)):
        if not value or not value.isascii() or any(c in value for c in " ;=\r\n\t\0"):
            raise InvalidInput(f"invalid DKIM {label}", code="invalid_dkim_parameter")
    key = _load_private_key(private_pem)
    signer = _OpenSSLDKIM(raw, key)
    present = _header_names(signer)
    if present.count(b"from") != 1:
        raise InvalidInput(
            "a message to sign needs exactly one From header",
            code="invalid_from_header",
            from_headers=present.count(b"from"),
        )
    include = _choose_headers(present, headers_to_sign)
    header = signer.sign_rsa(
        selector.encode("ascii"), domain.encode("ascii"), include, int(time.time())
    )
    return header + raw


def verify_message(raw: bytes, *, dnsfunc: Callable[[bytes], bytes | None] | None = None) -> bool:
    """True when the topmost DKIM signature verifies (plain dkimpy, its key-size minimum).

    ``dnsfunc`` answers the TXT lookup for a name like ``b"sel._domainkey.example.com."``;
    without it dkimpy queries DNS.
    """
    if dnsfunc is None:
        return bool(dkim.verify(raw))
    lookup = dnsfunc

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        return lookup(name)

    return bool(dkim.verify(raw, dnsfunc=txt))
