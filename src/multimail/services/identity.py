"""The server's verifiable identity (SPEC §3): the token each delivered message carries,
the public documents that let anyone check it, and the checks themselves.

The delivery worker asks :func:`identity_header_for` for the ``X-MultiMail-Identity``
header of each outbound message before DKIM signing, so the DKIM signature covers it.
A recipient (or ``multimail verify FILE.eml``, or ``POST /v1/verify``) then checks five
things independently: DKIM through DNS (a signature by the From domain, which must be the
domain of the mailbox the token names: a signature by any other domain vouches for
nothing here), the token's Ed25519 signature against our public keys, the body hashes
(text, HTML and attachments; the text part only for tokens issued before the other two
claims existed), the Message-ID, and that From is the signed mailbox.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any

import dns.exception
import dns.resolver
from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from multimail.domain.addresses import AddressError, domain_of, idna_ascii, normalize_address
from multimail.errors import InvalidInput, NotFound
from multimail.ids import aware
from multimail.mail import dkim as mail_dkim
from multimail.mail.compose import message_hashes
from multimail.mail.identity import (
    IDENTITY_HEADER,
    Approval,
    IdentityClaims,
    IdentityKeyError,
    SigningKeyring,
    check_message_identity,
    identity_header_value,
    issue_identity_token,
    new_signing_key,
    signing_key_from_pem,
    signing_key_pem,
    token_from_header_value,
)
from multimail.services import audit
from multimail.services.context import Actor, Services
from multimail.services.domains import make_sync_resolver
from multimail.store import keystore
from multimail.store.tables import accounts, domains, mailboxes
from multimail.workers.signing import DEFAULT_SELECTOR

__all__ = [
    "IDENTITY_HEADER",
    "identity_document",
    "identity_header_for",
    "keyring",
    "public_keys_document",
    "rotate_signing_key",
    "verify_raw_message",
    "verify_sent_dkim",
]

_KEYRING = "identity_keyring"
KEYS_PATH = "/.well-known/multimail/keys"
_MODE_MEANING = {
    "read_only": "the agent can read mail but cannot send",
    "gated_all": "a person approves every outbound message and every inbound one is held",
    "gated_send": "a person approves every outbound message before it is sent",
    "monitored": "the agent sends freely; a person is notified and every message is recorded",
    "autonomous": "the agent sends freely; every message is recorded",
}


_MANIFEST = "identity-manifest"
_KEY_PREFIX = "identity-key:"


def _stored_ring(conn: Connection, *, lock: bool = False) -> SigningKeyring | None:
    read = keystore.get_for_update if lock else keystore.get
    manifest = read(conn, _MANIFEST)
    if manifest is None:
        return None
    document = json.loads(manifest)
    pems = keystore.items(conn, _KEY_PREFIX)
    keys = [
        signing_key_from_pem(
            str(entry["kid"]),
            int(entry["created_at"]),
            pems[f"{_KEY_PREFIX}{entry['kid']}"].encode(),
        )
        for entry in document["keys"]
    ]
    return SigningKeyring(None, keys, str(document["current"]))


def _manifest(ring: SigningKeyring) -> str:
    keys = [{"kid": k.kid, "created_at": k.created_at} for k in ring.keys]
    return json.dumps({"current": ring.current.kid, "keys": keys})


def _first_ring(services: Services) -> SigningKeyring:
    """Store the keyring on first use: the data dir's older one if this install has it (its
    keys are already published and in delivered mail), else a fresh key. Two nodes starting
    together both try; one insert wins and both use the winner's keys."""
    legacy = SigningKeyring.load_existing(services.settings.data_dir / "identity")
    if legacy is None:
        key = new_signing_key(now=int(time.time()))
        candidate = SigningKeyring(None, [key], key.kid)
    else:
        candidate = SigningKeyring(None, legacy.keys, legacy.current.kid)
    try:
        with services.db.write() as conn:
            stored = _stored_ring(conn)
            if stored is not None:
                return stored
            for key in candidate.keys:
                keystore.add(conn, f"{_KEY_PREFIX}{key.kid}", signing_key_pem(key).decode())
            keystore.add(conn, _MANIFEST, _manifest(candidate))
    except IntegrityError:
        with services.db.read() as conn:
            stored = _stored_ring(conn)
        if stored is None:
            raise
        return stored
    return candidate


def keyring(services: Services, *, reload: bool = False) -> SigningKeyring:
    """The identity keyring, kept in the database so every node signs with and publishes the
    same keys; created on first use, cached per process.

    ``reload`` re-reads it, to pick up a rotation made by another process.
    """
    cached = services.extras.get(_KEYRING)
    if isinstance(cached, SigningKeyring) and not reload:
        return cached
    with services.db.read() as conn:
        ring = _stored_ring(conn)
    if ring is None:
        ring = _first_ring(services)
    services.extras[_KEYRING] = ring
    return ring


def _epoch(value: datetime | None) -> int | None:
    return None if value is None else int(aware(value).timestamp())


def identity_header_for(
    conn: Connection,
    services: Services,
    message_row: Mapping[str, Any],
    *,
    body_sha256: str,
    html_sha256: str | None = None,
    attachments_sha256: str | None = None,
    message_id: str | None = None,
    mailbox: Mapping[str, Any] | None = None,
    account: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """``(name, value)`` of the identity header for an outbound message about to be sent.

    ``body_sha256``, ``html_sha256`` and ``attachments_sha256`` are the hashes of the body
    as built (``compose.draft_hashes(draft)``: ``.text``, ``.html``, ``.attachments``), so
    they match what the recipient gets; a token without the last two binds the text part
    only. ``message_id`` is the Message-ID going on the
    wire when the row does not carry it yet. The delivery worker passes the message's
    ``mailbox`` and ``account`` rows it has already read (one query fewer per message).
    """
    if mailbox is not None and account is not None and mailbox["id"] == message_row["mailbox_id"]:
        address, mode, operator = mailbox["address"], mailbox["oversight_mode"], account["name"]
    else:
        row = conn.execute(
            select(mailboxes.c.address, mailboxes.c.oversight_mode, accounts.c.name)
            .join(accounts, accounts.c.id == mailboxes.c.account_id)
            .where(mailboxes.c.id == message_row["mailbox_id"])
        ).first()
        if row is None:
            raise NotFound("the message's mailbox no longer exists", code="mailbox_not_found")
        address, mode, operator = row.address, row.oversight_mode, row.name
    message_id = message_id or message_row.get("message_id_header")
    if not message_id:
        raise InvalidInput("the message has no Message-ID yet", code="no_message_id")
    approval = None
    if message_row.get("decision") == "approve" and message_row.get("decided_at") is not None:
        approval = Approval(
            reviewer=str(message_row.get("reviewer") or "unknown reviewer"),
            decided_at=_epoch(message_row["decided_at"]) or 0,
        )
    ring = keyring(services)
    claims = IdentityClaims(
        mailbox=str(message_row.get("from_address") or address),
        operator=str(operator),
        oversight_mode=str(message_row.get("oversight_mode") or mode),
        agent_key_id=message_row.get("created_by_key_id"),
        agent_key_name=message_row.get("created_by_key_name"),
        approval=approval,
        body_sha256=body_sha256,
        message_id=str(message_id),
        issued_at=int(time.time()),
        issuer=services.settings.base_url,
        html_sha256=html_sha256,
        attachments_sha256=attachments_sha256,
    )
    return IDENTITY_HEADER, identity_header_value(issue_identity_token(claims, ring))


def public_keys_document(services: Services) -> dict[str, Any]:
    """Current and retired public keys as a JWKS, with who issues tokens under them."""
    ring = keyring(services, reload=True)
    return {
        "issuer": services.settings.base_url,
        "token_type": "multimail-identity+jwt",
        "header": IDENTITY_HEADER,
        "current_key_id": ring.current.kid,
        **ring.jwks(),
    }


def identity_document(conn: Connection, services: Services, address: str) -> dict[str, Any]:
    """The public identity of a mailbox: who operates it and under which oversight."""
    try:
        normalized = normalize_address(address)
    except AddressError:
        raise NotFound(f"no mailbox {address!r} here", code="identity_not_found") from None
    row = conn.execute(
        select(
            mailboxes.c.address,
            mailboxes.c.display_name,
            mailboxes.c.oversight_mode,
            mailboxes.c.ai_disclosure,
            mailboxes.c.account_id,
            accounts.c.name.label("operator"),
        )
        .join(accounts, accounts.c.id == mailboxes.c.account_id)
        .where(mailboxes.c.address == normalized, mailboxes.c.deleted_at.is_(None))
    ).first()
    if row is None:
        raise NotFound(f"no mailbox {address!r} here", code="identity_not_found")
    ring = keyring(services, reload=True)
    base = services.settings.base_url
    return {
        "address": row.address,
        "display_name": row.display_name,
        "operator": row.operator,
        "oversight_mode": row.oversight_mode,
        "oversight": _MODE_MEANING.get(row.oversight_mode, row.oversight_mode),
        "ai_agent": True,
        "ai_disclosure": bool(row.ai_disclosure),
        "issuer": base,
        "public_key_ids": [info.kid for info in ring.public_keys()],
        "current_key_id": ring.current.kid,
        "keys_url": base + KEYS_PATH,
        "dkim": _dkim_info(conn, services, row.account_id, row.address),
    }


def _dkim_info(
    conn: Connection, services: Services, account_id: str, address: str
) -> dict[str, str] | None:
    domain = domain_of(address).lower()
    if domain == services.settings.domain.lower():
        return {"domain": domain, "selector": DEFAULT_SELECTOR}
    found = conn.execute(
        select(domains.c.dkim_selector).where(
            domains.c.account_id == account_id,
            domains.c.name == domain,
            domains.c.status == "verified",
        )
    ).first()
    return None if found is None else {"domain": domain, "selector": found.dkim_selector}


def rotate_signing_key(services: Services, *, actor: Actor) -> dict[str, Any]:
    """Make a new current identity key; older keys stay published so old mail still verifies."""
    keyring(services, reload=True)  # stored, if this is the first use
    with services.db.write() as conn:
        # The manifest row is held until commit: two rotations at once both land, in turn.
        ring = _stored_ring(conn, lock=True)
        if ring is None:
            raise IdentityKeyError("the identity keyring vanished while rotating")
        previous = ring.current.kid
        key = new_signing_key(now=int(time.time()))
        rotated = ring.with_current(key)
        keystore.add(conn, f"{_KEY_PREFIX}{key.kid}", signing_key_pem(key).decode())
        keystore.replace(conn, _MANIFEST, _manifest(rotated))
        audit.append(
            conn,
            actor=actor,
            action="identity.key_rotated",
            subject_type="identity_key",
            subject_id=key.kid,
            details={"previous_key_id": previous, "key_id": key.kid},
        )
    services.extras[_KEYRING] = rotated
    return {"key_id": key.kid, "previous_key_id": previous, "created_at": key.created_at}


# --- checking a message -----------------------------------------------------------------


def _dns_txt(services: Services) -> Callable[[bytes], bytes | None]:
    resolver = make_sync_resolver(services.settings.dns_resolver)

    def lookup(name: bytes) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT")
        except (dns.exception.DNSException, UnicodeDecodeError):
            return None
        return b"".join(b"".join(r.strings) for r in answer)  # type: ignore[attr-defined]

    return lookup


def _dkim_tags(value: Any) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in "".join(str(value).split()).split(";"):
        name, _, tag = part.partition("=")
        if name:
            tags[name] = tag
    return tags


def verify_sent_dkim(services: Services, raw: bytes, index: int = 0) -> bool:
    """Whether a message's ``index``-th DKIM signature (0: the topmost) verifies against DNS
    now."""
    try:
        return mail_dkim.verify_message(raw, dnsfunc=_dns_txt(services), index=index)
    except Exception:  # dkimpy raises many types on hostile input; any of them is "no"
        return False


# DKIM signatures by the From domain tried per message: each costs a DNS query.
_MAX_ALIGNED_SIGNATURES = 5


def _ascii_domain(value: str) -> str | None:
    try:
        return idna_ascii(value.strip())
    except AddressError:
        return None


def _from_domain(headers: Any) -> str | None:
    """The domain of the message's one From address (IDNA ASCII), or None."""
    found = [addr for _, addr in getaddresses([str(v) for v in headers.get_all("From") or []])]
    if len(found) != 1 or "@" not in found[0]:
        return None
    return _ascii_domain(domain_of(found[0]))


def _dkim_check(
    services: Services, raw: bytes, headers: Any, mailbox: str | None
) -> dict[str, Any]:
    """Passes when a DKIM signature by the From domain verifies and covers the identity
    header, and that domain is the one of ``mailbox`` (the signed claims', when the token
    verified). A signature by any other domain (DMARC alignment, strict: the same name)
    says nothing about who sent the message: anyone can sign with a domain of their own."""
    signatures = [_dkim_tags(v) for v in headers.get_all("DKIM-Signature") or []]
    if not signatures:
        return _check("dkim", False, "the message has no DKIM signature")
    from_domain = _from_domain(headers)
    if from_domain is None:
        return _check("dkim", False, "no single From address whose domain DKIM could align with")
    if mailbox is not None and _ascii_domain(domain_of(mailbox)) != from_domain:
        return _check(
            "dkim",
            False,
            f"the From domain {from_domain} is not the domain of the signed mailbox {mailbox}",
        )
    aligned = [
        (index, tags)
        for index, tags in enumerate(signatures)
        if _ascii_domain(tags.get("d", "")) == from_domain
    ][:_MAX_ALIGNED_SIGNATURES]
    if not aligned:
        others = ", ".join(sorted({f"d={t.get('d', '?')}" for t in signatures}))
        return _check(
            "dkim",
            False,
            f"no DKIM signature by the From domain {from_domain} (only {others}): "
            "a signature by another domain does not vouch for this message",
        )
    failures: list[str] = []
    for index, tags in aligned:
        where = f"d={tags.get('d', '?')} s={tags.get('s', '?')}"
        if not verify_sent_dkim(services, raw, index):
            failures.append(f"the DKIM signature ({where}) does not verify against DNS")
            continue
        covered = [h.strip().lower() for h in tags.get("h", "").split(":")]
        if IDENTITY_HEADER.lower() not in covered:
            failures.append(f"DKIM ({where}) verifies but does not cover {IDENTITY_HEADER}")
            continue
        return _check(
            "dkim",
            True,
            f"DKIM signature by the From domain verifies ({where}) and covers the identity",
        )
    return _check("dkim", False, "; ".join(failures))


def _check(name: str, passed: bool, reason: str) -> dict[str, Any]:
    return {"name": name, "passed": passed, "reason": reason}


def _unverified_issuer(headers: Any) -> str | None:
    """The ``iss`` claim read without checking the signature, only to explain a failure."""
    values = headers.get_all(IDENTITY_HEADER) or []
    try:
        payload = token_from_header_value(str(values[0])).split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, UnicodeError, LookupError):
        return None
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else None


_SIGNATURE_REASONS = {
    "malformed": "the identity token is malformed",
    "unknown_key": "the identity token is signed with a key this server does not have",
    "bad_signature": "the identity token's signature does not verify (forged or altered)",
    "wrong_algorithm": "the identity token uses an algorithm other than EdDSA",
}


def verify_raw_message(services: Services, raw: bytes) -> dict[str, Any]:
    """Check a received message end to end: ``verified`` only when every check passes."""
    if not raw.strip():
        raise InvalidInput("the message is empty", code="validation_error", field="raw")
    if len(raw) > services.settings.max_message_bytes:
        raise InvalidInput("the message is larger than this server accepts", code="too_large")
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    ring = keyring(services)
    result = check_message_identity(raw, ring, body_hasher=message_hashes)
    if result.token_signature.reason == "unknown_key":
        # Another process may have rotated the key since this one loaded the keyring.
        ring = keyring(services, reload=True)
        result = check_message_identity(raw, ring, body_hasher=message_hashes)
    mailbox = None if result.claims is None else result.claims.mailbox
    checks = [_dkim_check(services, raw, headers, mailbox)]
    signature = result.token_signature
    reason = _SIGNATURE_REASONS.get(signature.reason, signature.reason)
    issuer = _unverified_issuer(headers)
    base = services.settings.base_url
    if signature.reason == "unknown_key" and issuer and issuer.rstrip("/") != base:
        reason = (
            f"unknown issuer: the token was issued by {issuer}, not this server ({base}); "
            f"check it against {issuer.rstrip('/')}{KEYS_PATH}"
        )
    elif signature.passed:
        reason = f"signed by this server ({base}) with key {_kid_of(headers)}"
    checks.append(_check("identity_signature", signature.passed, reason))
    checks.append(_check("body_hash", result.body_hash_match.passed, result.body_hash_match.reason))
    checks.append(
        _check("message_id", result.message_id_match.passed, result.message_id_match.reason)
    )
    claims = result.claims
    if claims is not None:
        checks.append(_from_check(headers, claims.mailbox))
    verified = result.ok and all(c["passed"] for c in checks)
    return {
        "verdict": "verified" if verified else "failed",
        "verified": verified,
        "checks": checks,
        "claims": None if claims is None else claims.to_payload(),
    }


def _kid_of(headers: Any) -> str:
    try:
        token = token_from_header_value(str((headers.get_all(IDENTITY_HEADER) or [""])[0]))
        part = token.split(".")[0]
        header = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return str(header.get("kid"))
    except (ValueError, UnicodeError, LookupError, AttributeError):
        return "?"


def _from_check(headers: Any, mailbox: str) -> dict[str, Any]:
    found = [addr for _, addr in getaddresses([str(v) for v in headers.get_all("From") or []])]
    try:
        same = len(found) == 1 and normalize_address(found[0]) == normalize_address(mailbox)
    except AddressError:
        same = False
    if same:
        return _check("from_mailbox", True, f"From is the signed mailbox {mailbox}")
    return _check("from_mailbox", False, f"From ({', '.join(found) or 'none'}) is not {mailbox}")
