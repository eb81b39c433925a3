"""The verifiable agent identity carried by every delivered message (SPEC §3).

The server signs, with its Ed25519 key, a compact JWS that binds the sending mailbox,
the operator, the oversight mode, the agent key that wrote the message, the approval
(reviewer and time) if there was one, the Message-ID and hashes of the body: the text
part, the HTML part and the attachments (``mail.compose.BodyHashes``). It travels
in the ``X-MultiMail-Identity`` header. Anyone holding the public keys (served as a JWKS
document at ``/.well-known/multimail/keys``) can check that a message was sent through
this server, under these terms, and not altered since.

Token layout (RFC 7515 compact serialisation)::

    base64url({"alg":"EdDSA","typ":"multimail-identity+jwt","kid":"mmk_…"})
    . base64url({"iss":…,"iat":…,"mailbox":…,"operator":…,"mode":…,"agent_key":…,
                 "agent_name":…,"approval":{"reviewer":…,"at":…}|null,
                 "body_sha256":…,"html_sha256":…,"attachments_sha256":…,"msgid":…})
    . base64url(Ed25519 signature over the first two parts)

``body_sha256`` is ``text_sha256`` of the decoded text/plain part, ``html_sha256`` the same
of the decoded text/html part, ``attachments_sha256`` ``compose.attachments_sha256`` of the
decoded content of every other leaf part, in order. Tokens issued before the last two
claims existed lack them; they still verify, and bind the text part only.

A token has no whitespace, so it cannot be folded as is; :func:`identity_header_value`
splits it with spaces so mail generators fold it into short lines, and readers drop all
whitespace (as DKIM does for ``b=``).

A keyring is a list of keys and the name of the current one. The server keeps it in its
database (``multimail.services.identity``), so every node signs and publishes the same keys;
a directory of PKCS#8 PEM files (mode 0600) with a ``keyring.json`` manifest is the older
home, still readable so an existing install's keys are imported. Rotation adds a key;
retired keys stay so that tokens in messages already delivered keep verifying.
"""

from __future__ import annotations

import base64
import contextlib
import email.header
import fcntl
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from multimail.errors import InvalidInput, MultimailError
from multimail.mail.compose import message_hashes

__all__ = [
    "IDENTITY_HEADER",
    "Approval",
    "CheckResult",
    "IdentityCheck",
    "IdentityClaims",
    "IdentityKeyError",
    "IdentityVerificationError",
    "KeySource",
    "PartHashes",
    "PublicKeyInfo",
    "SigningKey",
    "SigningKeyring",
    "check_message_identity",
    "identity_header_value",
    "issue_identity_token",
    "key_id",
    "new_signing_key",
    "signing_key_from_pem",
    "signing_key_pem",
    "token_from_header_value",
    "verify_identity_token",
]

IDENTITY_HEADER = "X-MultiMail-Identity"
TOKEN_TYPE = "multimail-identity+jwt"
ALGORITHM = "EdDSA"
MAX_TOKEN_LENGTH = 8192
_MANIFEST = "keyring.json"
_LOCK = ".keyring.lock"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class IdentityKeyError(MultimailError):
    """The signing keyring on disk is unusable (bad permissions, corrupt or missing file)."""

    code = "identity_key_error"


class IdentityVerificationError(InvalidInput):
    """An identity token did not verify; ``reason`` is one of
    ``malformed``, ``unknown_key``, ``bad_signature``, ``wrong_algorithm``."""

    code = "identity_token_invalid"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason


# --- keys ---------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Only the canonical spelling is accepted, so a token has exactly one text form.
    if _b64url(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The stable id of a public key: ``mmk_`` + first 16 hex of SHA-256 of its raw bytes."""
    return "mmk_" + hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey = field(repr=False)
    created_at: int


@dataclass(frozen=True, slots=True)
class PublicKeyInfo:
    kid: str
    x: str  # base64url of the raw 32-byte public key
    created_at: int
    status: Literal["current", "retired"]
    alg: str = ALGORITHM
    crv: str = "Ed25519"

    def to_jwk(self) -> dict[str, Any]:
        return {
            "kty": "OKP",
            "crv": self.crv,
            "alg": self.alg,
            "use": "sig",
            "kid": self.kid,
            "x": self.x,
            "created_at": self.created_at,
            "status": self.status,
        }


def new_signing_key(*, now: int) -> SigningKey:
    private = Ed25519PrivateKey.generate()
    return SigningKey(kid=key_id(private.public_key()), private_key=private, created_at=now)


def signing_key_pem(key: SigningKey) -> bytes:
    return key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def signing_key_from_pem(kid: str, created_at: int, pem: bytes) -> SigningKey:
    """Load a stored key, checking it is the Ed25519 key its id names."""
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityKeyError(f"signing key {kid} is corrupt") from exc
    if not isinstance(private, Ed25519PrivateKey) or key_id(private.public_key()) != kid:
        raise IdentityKeyError(f"signing key {kid} does not hold that key")
    return SigningKey(kid=kid, private_key=private, created_at=created_at)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Several processes (api, smtp, worker) may start at once on a fresh data dir;
    # the lock makes exactly one of them create the first key.
    fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _read_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise IdentityKeyError(f"signing key file {path} is missing") from exc
    if mode & 0o077:
        raise IdentityKeyError(
            f"signing key file {path} is readable by others (mode {mode & 0o777:o});"
            " run: chmod 600 " + str(path)
        )
    return path.read_bytes()


class SigningKeyring:
    """The server's Ed25519 identity keys: one current signing key plus retired ones."""

    def __init__(self, directory: Path | None, keys: list[SigningKey], current_kid: str) -> None:
        if not any(k.kid == current_kid for k in keys):
            raise IdentityKeyError(f"current key {current_kid} is not in the keyring")
        self.directory = directory
        self._set(list(keys), current_kid)

    def __repr__(self) -> str:
        return f"SigningKeyring({str(self.directory)!r}, current={self._current_kid!r})"

    @classmethod
    def load_or_create(cls, directory: Path) -> SigningKeyring:
        """Load the keyring in ``directory``, creating it with a first key if absent."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(directory):
            if not (directory / _MANIFEST).exists():
                first = cls._new_key(directory, now=int(time.time()))
                cls._write_manifest(directory, [first], first.kid)
            return cls._load(directory)

    @classmethod
    def load_existing(cls, directory: Path) -> SigningKeyring | None:
        """The keyring in ``directory`` if one was ever written there, else ``None``."""
        if not (directory / _MANIFEST).exists():
            return None
        with _locked(directory):
            return cls._load(directory)

    @property
    def keys(self) -> list[SigningKey]:
        return list(self._keys)

    def with_current(self, key: SigningKey) -> SigningKeyring:
        """A new keyring: these keys plus ``key``, which becomes the current one."""
        return SigningKeyring(self.directory, [*self._keys, key], key.kid)

    @classmethod
    def _load(cls, directory: Path) -> SigningKeyring:
        try:
            manifest = json.loads((directory / _MANIFEST).read_text("utf-8"))
            entries = [(str(e["kid"]), int(e["created_at"])) for e in manifest["keys"]]
            current = str(manifest["current"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IdentityKeyError(f"keyring manifest in {directory} is unreadable") from exc
        keys = [
            signing_key_from_pem(kid, created_at, _read_private(directory / f"{kid}.pem"))
            for kid, created_at in entries
        ]
        return cls(directory, keys, current)

    @staticmethod
    def _new_key(directory: Path, *, now: int) -> SigningKey:
        key = new_signing_key(now=now)
        _write_new_file(directory / f"{key.kid}.pem", signing_key_pem(key))
        return key

    @staticmethod
    def _write_manifest(directory: Path, keys: list[SigningKey], current: str) -> None:
        body = {
            "current": current,
            "keys": [{"kid": k.kid, "created_at": k.created_at} for k in keys],
        }
        temporary = directory / f"{_MANIFEST}.tmp"
        temporary.unlink(missing_ok=True)
        _write_new_file(temporary, json.dumps(body, indent=2).encode("utf-8"))
        os.replace(temporary, directory / _MANIFEST)
        _fsync_dir(directory)

    def rotate(self) -> SigningKey:
        """Make a new current key in the keyring's directory; earlier keys are kept (retired)
        for verification. A keyring kept elsewhere rotates with :meth:`with_current`."""
        if self.directory is None:
            raise IdentityKeyError("this keyring has no directory; rotate it where it is kept")
        with _locked(self.directory):
            # Start from what is on disk, so a rotation elsewhere is not thrown away.
            latest = self._load(self.directory)
            key = self._new_key(self.directory, now=int(time.time()))
            keys = [*latest._keys, key]
            self._write_manifest(self.directory, keys, key.kid)
        self._set(keys, key.kid)
        return key

    def _set(self, keys: list[SigningKey], current_kid: str) -> None:
        self._keys = keys
        self._current_kid = current_kid
        # Looked up for every message signed: found once here.
        self._current = next(k for k in keys if k.kid == current_kid)

    @property
    def current(self) -> SigningKey:
        return self._current

    def public_keys(self) -> list[PublicKeyInfo]:
        return [
            PublicKeyInfo(
                kid=k.kid,
                x=_b64url(_raw_public(k.private_key.public_key())),
                created_at=k.created_at,
                status="current" if k.kid == self._current_kid else "retired",
            )
            for k in self._keys
        ]

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWKS document (RFC 7517, OKP keys per RFC 8037)."""
        return {"keys": [info.to_jwk() for info in self.public_keys()]}

    def verification_keys(self) -> dict[str, Ed25519PublicKey]:
        return {k.kid: k.private_key.public_key() for k in self._keys}


KeySource = SigningKeyring | Mapping[str, Ed25519PublicKey] | Mapping[str, Any]


def _keys_from(source: KeySource) -> Mapping[str, Ed25519PublicKey]:
    if isinstance(source, SigningKeyring):
        return source.verification_keys()
    listed = source.get("keys")
    if not isinstance(listed, list):
        return {kid: k for kid, k in source.items() if isinstance(k, Ed25519PublicKey)}
    found: dict[str, Ed25519PublicKey] = {}
    for jwk in listed:
        # A JWKS may carry keys for other uses; only Ed25519 keys can verify our tokens.
        if not isinstance(jwk, dict) or (jwk.get("kty"), jwk.get("crv")) != ("OKP", "Ed25519"):
            continue
        kid, x = jwk.get("kid"), jwk.get("x")
        if not isinstance(kid, str) or not isinstance(x, str):
            continue
        try:
            found[kid] = Ed25519PublicKey.from_public_bytes(_unb64url(x))
        except ValueError:
            continue
    return found


# --- tokens -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Approval:
    reviewer: str
    decided_at: int


@dataclass(frozen=True, slots=True)
class IdentityClaims:
    mailbox: str
    operator: str
    oversight_mode: str
    agent_key_id: str | None
    agent_key_name: str | None
    approval: Approval | None
    body_sha256: str
    message_id: str
    issued_at: int
    issuer: str
    #: None in tokens issued before these claims existed (they bind the text part only).
    html_sha256: str | None = None
    attachments_sha256: str | None = None

    def to_payload(self) -> dict[str, Any]:
        approval = self.approval
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "iat": self.issued_at,
            "mailbox": self.mailbox,
            "operator": self.operator,
            "mode": self.oversight_mode,
            "agent_key": self.agent_key_id,
            "agent_name": self.agent_key_name,
            "approval": None
            if approval is None
            else {"reviewer": approval.reviewer, "at": approval.decided_at},
            "body_sha256": self.body_sha256,
            "msgid": self.message_id,
        }
        # Absent rather than null when not set: an older token reads back as it was issued.
        if self.html_sha256 is not None:
            payload["html_sha256"] = self.html_sha256
        if self.attachments_sha256 is not None:
            payload["attachments_sha256"] = self.attachments_sha256
        return payload

    @classmethod
    def from_payload(cls, payload: Any) -> IdentityClaims:
        """Rebuild claims from a decoded payload; ValueError if a claim is missing or mistyped."""
        if not isinstance(payload, dict):
            raise ValueError("payload is not an object")
        text = {k: payload.get(k) for k in ("iss", "mailbox", "operator", "mode", "msgid")}
        optional = {k: payload.get(k) for k in ("agent_key", "agent_name")}
        raw_approval, body_hash, issued = (
            payload.get("approval"),
            payload.get("body_sha256"),
            payload.get("iat"),
        )
        if not all(isinstance(v, str) for v in text.values()):
            raise ValueError("a text claim is missing")
        if not all(v is None or isinstance(v, str) for v in optional.values()):
            raise ValueError("agent claims must be text or null")
        if not isinstance(body_hash, str) or not _SHA256_HEX.fullmatch(body_hash):
            raise ValueError("body_sha256 must be 64 lower-case hex digits")
        part_hashes = {k: payload.get(k) for k in ("html_sha256", "attachments_sha256")}
        for name, value in part_hashes.items():
            if value is not None and not (isinstance(value, str) and _SHA256_HEX.fullmatch(value)):
                raise ValueError(f"{name} must be 64 lower-case hex digits")
        if type(issued) is not int:
            raise ValueError("iat must be an integer")
        approval = None
        if raw_approval is not None:
            if not isinstance(raw_approval, dict):
                raise ValueError("approval must be an object")
            reviewer, at = raw_approval.get("reviewer"), raw_approval.get("at")
            if not isinstance(reviewer, str) or type(at) is not int:
                raise ValueError("approval needs reviewer and at")
            approval = Approval(reviewer=reviewer, decided_at=at)
        return cls(
            mailbox=payload["mailbox"],
            operator=payload["operator"],
            oversight_mode=payload["mode"],
            agent_key_id=payload["agent_key"],
            agent_key_name=payload["agent_name"],
            approval=approval,
            body_sha256=body_hash,
            message_id=payload["msgid"],
            issued_at=issued,
            issuer=payload["iss"],
            html_sha256=part_hashes["html_sha256"],
            attachments_sha256=part_hashes["attachments_sha256"],
        )


# One encoder for every token: json.dumps builds a new one per call when given options.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _json_b64(value: Mapping[str, Any]) -> str:
    return _b64url(_COMPACT_JSON.encode(value).encode("utf-8"))


@lru_cache(maxsize=64)
def _protected_header(kid: str) -> str:
    # The same for every token signed with one key.
    return _json_b64({"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": kid})


def issue_identity_token(claims: IdentityClaims, keyring: SigningKeyring) -> str:
    """Sign ``claims`` with the keyring's current key; a compact JWS."""
    for name, value in (
        ("body_sha256", claims.body_sha256),
        ("html_sha256", claims.html_sha256),
        ("attachments_sha256", claims.attachments_sha256),
    ):
        if value is not None and not _SHA256_HEX.fullmatch(value):
            raise InvalidInput(f"{name} must be 64 lower-case hex digits")
    key = keyring.current
    signing_input = f"{_protected_header(key.kid)}.{_json_b64(claims.to_payload())}"
    signature = key.private_key.sign(signing_input.encode("ascii"))
    token = f"{signing_input}.{_b64url(signature)}"
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidInput("identity claims are too long for a mail header")
    return token


def _fail(reason: str, message: str) -> IdentityVerificationError:
    return IdentityVerificationError(message, reason=reason)


def _decode_json(part: str, what: str) -> Any:
    try:
        return json.loads(_unb64url(part))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail("malformed", f"token {what} is not base64url JSON") from exc


def verify_identity_token(token: str, public_keys: KeySource) -> IdentityClaims:
    """Verify a token and return its claims, or raise :class:`IdentityVerificationError`.

    ``public_keys`` may be a mapping of key id to public key, a JWKS document, or a
    :class:`SigningKeyring`.
    """
    if not token.isascii() or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
        raise _fail("malformed", "not a compact JWS")
    header_part, payload_part, signature_part = token.split(".")
    header = _decode_json(header_part, "header")
    if not isinstance(header, dict):
        raise _fail("malformed", "token header is not an object")
    if header.get("alg") != ALGORITHM:
        raise _fail("wrong_algorithm", f"token algorithm must be {ALGORITHM}")
    kid = header.get("kid")
    if header.get("typ") != TOKEN_TYPE or not isinstance(kid, str) or "crit" in header:
        raise _fail("malformed", "token header lacks typ or kid, or has crit")
    key = _keys_from(public_keys).get(kid)
    if key is None:
        raise _fail("unknown_key", f"no public key with id {kid}")
    try:
        key.verify(_unb64url(signature_part), f"{header_part}.{payload_part}".encode("ascii"))
    except (InvalidSignature, ValueError) as exc:
        raise _fail("bad_signature", "token signature does not verify") from exc
    try:
        return IdentityClaims.from_payload(_decode_json(payload_part, "payload"))
    except ValueError as exc:
        raise _fail("malformed", f"token claims are invalid: {exc}") from exc


def identity_header_value(token: str, width: int = 56) -> str:
    """The header value for ``token``, broken with spaces so it folds into short lines.

    56 characters after ``X-MultiMail-Identity: `` (22) make a 78-character line, the
    RFC 5322 recommended limit, even when a folder keeps the first word on the name's line.
    """
    return " ".join(token[i : i + width] for i in range(0, len(token), width))


def token_from_header_value(value: str) -> str:
    """Undo folding, chunking and any RFC 2047 encoding a mail generator applied."""
    if "=?" in value:
        value = "".join(
            part.decode(charset or "ascii") if isinstance(part, bytes) else part
            for part, charset in email.header.decode_header(value)
        )
    return "".join(value.split())


# --- checking a received message ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckResult:
    passed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class IdentityCheck:
    """The outcome of :func:`check_message_identity`, one result per check."""

    token_signature: CheckResult
    message_id_match: CheckResult
    body_hash_match: CheckResult
    claims: IdentityClaims | None

    @property
    def ok(self) -> bool:
        return all(
            r.passed for r in (self.token_signature, self.message_id_match, self.body_hash_match)
        )

    def to_dict(self) -> dict[str, Any]:
        def result(r: CheckResult) -> dict[str, Any]:
            return {"passed": r.passed, "reason": r.reason}

        return {
            "ok": self.ok,
            "token_signature": result(self.token_signature),
            "message_id_match": result(self.message_id_match),
            "body_hash_match": result(self.body_hash_match),
            "claims": None if self.claims is None else self.claims.to_payload(),
        }


def _bare_message_id(value: str) -> str:
    return "".join(value.split()).removeprefix("<").removesuffix(">")


class PartHashes(Protocol):
    """The hashes of a received message's parts (``mail.compose.BodyHashes``)."""

    @property
    def text(self) -> str: ...

    @property
    def html(self) -> str | None: ...

    @property
    def attachments(self) -> str: ...


def _same(actual: str, claimed: str) -> bool:
    return hmac.compare_digest(actual.lower().encode(), claimed.encode())


def _body_result(claims: IdentityClaims, hashed: str | PartHashes) -> CheckResult:
    text = hashed if isinstance(hashed, str) else hashed.text
    if not _same(text, claims.body_sha256):
        return CheckResult(False, "body differs from the one signed")
    if claims.html_sha256 is None and claims.attachments_sha256 is None:
        return CheckResult(True, "body matches (text part only: an older token)")
    if isinstance(hashed, str):
        return CheckResult(False, "the token binds the HTML part and attachments; not checked")
    if claims.html_sha256 is not None:
        if hashed.html is None:
            return CheckResult(False, "the message has no HTML part; the one signed had")
        if not _same(hashed.html, claims.html_sha256):
            return CheckResult(False, "the HTML part differs from the one signed")
    if claims.attachments_sha256 is not None and not _same(
        hashed.attachments, claims.attachments_sha256
    ):
        return CheckResult(False, "the attachments differ from the ones signed")
    return CheckResult(True, "body matches (text and HTML parts and attachments)")


def check_message_identity(
    raw: bytes,
    public_keys: KeySource,
    *,
    body_hasher: Callable[[bytes], str | PartHashes] = message_hashes,
) -> IdentityCheck:
    """Check a received message's identity header against the message itself.

    ``body_hasher`` gets the whole raw message and returns the hashes the sender put in
    the token: ``multimail.mail.compose.message_hashes`` (text, HTML and attachments), the
    default; a plain hex string (``compose.body_sha256``) checks the text part only, which
    is enough for tokens without ``html_sha256``/``attachments_sha256`` and fails the
    others.
    """
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    skipped = CheckResult(False, "not checked: the identity token did not verify")
    values = headers.get_all(IDENTITY_HEADER) or []
    if len(values) != 1:
        why = "no identity header" if not values else "more than one identity header"
        return IdentityCheck(CheckResult(False, why), skipped, skipped, None)
    try:
        claims = verify_identity_token(token_from_header_value(str(values[0])), public_keys)
    except (IdentityVerificationError, UnicodeError, LookupError) as exc:
        reason = getattr(exc, "reason", "malformed")
        return IdentityCheck(CheckResult(False, reason), skipped, skipped, None)
    signature = CheckResult(True, "signed by this server's key")

    message_ids = headers.get_all("Message-ID") or []
    if len(message_ids) != 1:
        id_result = CheckResult(False, f"message has {len(message_ids)} Message-ID headers")
    elif _bare_message_id(str(message_ids[0])) != _bare_message_id(claims.message_id):
        id_result = CheckResult(False, "Message-ID differs from the one signed")
    else:
        id_result = CheckResult(True, "Message-ID matches")

    try:
        hashed = body_hasher(raw)
    except (ValueError, LookupError) as exc:
        body_result = CheckResult(False, f"body could not be hashed: {exc}")
    else:
        body_result = _body_result(claims, hashed)
    return IdentityCheck(signature, id_result, body_result, claims)
