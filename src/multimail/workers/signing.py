"""Which DKIM key signs a message: the sending domain's, or the server's own default key.

A mailbox on a verified domain signs with that domain's key (generated when the domain was
added, published by the operator, checked through DNS). A mailbox on the server's own domain
(``settings.domain``) signs with a key generated once into ``<data_dir>/dkim/default.pem``
(mode 0600) under the selector ``mm1``; :func:`default_dkim_record` is the TXT record the
operator publishes for it. Anything else has no key, and live mail from it is refused.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection, select

from multimail.config import Settings
from multimail.domain.addresses import domain_of
from multimail.mail.dkim import dns_txt_value, generate_rsa_keypair, sign_message
from multimail.services.context import Services
from multimail.store.tables import domains

__all__ = [
    "DEFAULT_SELECTOR",
    "SigningKey",
    "default_dkim_record",
    "default_key",
    "key_for_sender",
    "sign",
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


def _default_key_path(settings: Settings) -> Path:
    return settings.data_dir / "dkim" / "default.pem"


@lru_cache(maxsize=16)
def _load_or_create(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = generate_rsa_keypair(2048).private_pem
    # Write privately under a unique name, then link into place: two processes starting at
    # once both generate a key, exactly one wins, and the loser reads the winner's.
    partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path.read_bytes()


def default_key(settings: Settings) -> SigningKey:
    """The server's own key for ``settings.domain``, created on first use."""
    return _default_key(settings.data_dir, settings.domain)


@lru_cache(maxsize=16)
def _default_key(data_dir: Path, domain: str) -> SigningKey:
    # Cached per data dir: resolving the path is a few system calls, once per message.
    pem = _load_or_create((data_dir / "dkim" / "default.pem").resolve())
    return SigningKey(domain.lower(), DEFAULT_SELECTOR, pem)


def _public_b64(private_pem: bytes) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def default_dkim_record(services: Services) -> tuple[str, str]:
    """``(name, value)`` of the TXT record that publishes the default key."""
    key = default_key(services.settings)
    return f"{key.selector}._domainkey.{key.domain}", dns_txt_value(_public_b64(key.private_pem))


def key_for_sender(
    conn: Connection, settings: Settings, *, account_id: str, from_address: str
) -> SigningKey | None:
    """The key for mail from ``from_address``; None when its domain may not send live mail."""
    domain = domain_of(from_address).lower()
    if domain == settings.domain.lower():
        return default_key(settings)
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
