"""Which DKIM key signs a message: the sending domain's, or the server's own default key.

A mailbox on a verified domain signs with that domain's key (generated when the domain was
added, published by the operator, checked through DNS). A mailbox on the server's own domain
(``settings.domain``) signs with a key generated once, when the first node starts, and kept
in the database so every worker signs with the one key the operator published (selector
``mm1``; :func:`default_dkim_record` is its TXT record). An install from before keeps the key
in its ``<data_dir>/dkim/default.pem``: it is imported. Anything else has no key, and live
mail from it is refused.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection, select

from multimail.domain.addresses import domain_of
from multimail.mail.compose import ComposedMessage
from multimail.mail.dkim import dns_txt_value, generate_rsa_keypair, sign_message, sign_split
from multimail.services.context import Services
from multimail.store import keystore
from multimail.store.tables import domains

__all__ = [
    "DEFAULT_SELECTOR",
    "SigningKey",
    "default_dkim_record",
    "default_key",
    "ensure_default_key",
    "key_for_sender",
    "sign",
    "sign_composed",
]

DEFAULT_SELECTOR = "mm1"


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    private_pem: bytes

    def __repr__(self) -> str:
        # Never let the private key reach a log line through a repr.
        return f"SigningKey(domain={self.domain!r}, selector={self.selector!r})"


_CACHE = "dkim_default_key"


def default_key(services: Services) -> SigningKey:
    """The server's own key for ``settings.domain``; :func:`ensure_default_key` made it when
    the services started, and it is cached per process after the first read."""
    cached = services.extras.get(_CACHE)
    if isinstance(cached, SigningKey):
        return cached
    return ensure_default_key(services)


def ensure_default_key(services: Services) -> SigningKey:
    settings = services.settings

    def make() -> str:
        legacy = settings.data_dir / "dkim" / "default.pem"
        if legacy.exists():
            return legacy.read_text("ascii")
        return generate_rsa_keypair(2048).private_pem.decode("ascii")

    pem = keystore.create_once(services.db, "dkim-default", make)
    key = SigningKey(settings.domain.lower(), DEFAULT_SELECTOR, pem.encode("ascii"))
    services.extras[_CACHE] = key
    return key


def _public_b64(private_pem: bytes) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def default_dkim_record(services: Services) -> tuple[str, str]:
    """``(name, value)`` of the TXT record that publishes the default key."""
    key = default_key(services)
    return f"{key.selector}._domainkey.{key.domain}", dns_txt_value(_public_b64(key.private_pem))


def key_for_sender(
    conn: Connection, services: Services, *, account_id: str, from_address: str
) -> SigningKey | None:
    """The key for mail from ``from_address``; None when its domain may not send live mail."""
    domain = domain_of(from_address).lower()
    if domain == services.settings.domain.lower():
        return default_key(services)
    row = conn.execute(
        select(domains.c.name, domains.c.dkim_selector, domains.c.dkim_private_key).where(
            domains.c.account_id == account_id,
            domains.c.name == domain,
            domains.c.status == "verified",
        )
    ).first()
    if row is None:
        return None
    return SigningKey(row.name, row.dkim_selector, row.dkim_private_key.encode("ascii"))


def sign(raw: bytes, key: SigningKey) -> bytes:
    return sign_message(raw, domain=key.domain, selector=key.selector, private_pem=key.private_pem)


def sign_composed(message: ComposedMessage, key: SigningKey) -> bytes:
    """``sign(message.raw, key)`` without parsing the header block again: compose already
    split it when it checked the fields it wrote."""
    return sign_split(
        message.raw,
        message.fields,
        message.raw[message.body_start :],
        domain=key.domain,
        selector=key.selector,
        private_pem=key.private_pem,
    )
