"""Signed, expiring tokens for one-click links (Approve / Reject in approval emails,
List-Unsubscribe).

A token is ``v1.<payload>.<mac>``: ``payload`` is base64url JSON of purpose, subject,
action, expiry and nonce; ``mac`` is base64url HMAC-SHA256 over everything before the
last dot. Every character is URL-safe, so a token drops into a path segment as is.

The MAC covers the version and payload text, and it is checked before anything in the
payload is believed, so a token changed in any character reads as ``forged``.

Single use is the caller's job: this module is pure and remembers nothing. The service
that acts on a token must record ``LinkToken.nonce`` in the same transaction as the
decision and refuse a nonce it has already recorded. A GET shows a confirmation page
only; reading a token decides nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets as _random
from dataclasses import dataclass
from typing import Any

from multimail.errors import AuthenticationFailed, InvalidInput

__all__ = ["InvalidLinkToken", "LinkToken", "make_token", "new_nonce", "read_token"]

_VERSION = "v1"
# An HMAC-SHA256 key shorter than the digest weakens it; refuse rather than sign weakly.
MIN_SECRET_BYTES = 32
# Links live in URLs and email bodies; anything longer than this is not one of ours.
MAX_TOKEN_LENGTH = 2048


class InvalidLinkToken(AuthenticationFailed):
    """A link token was refused; ``reason`` is forged, expired, wrong_purpose or malformed."""

    code = "link_token_invalid"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LinkToken:
    """What a verified token says: do ``action`` to ``subject_id`` for ``purpose``."""

    purpose: str
    subject_id: str
    action: str
    expires_at: int
    nonce: str


def new_nonce() -> str:
    """A random nonce suitable for :func:`make_token`."""
    return _random.token_urlsafe(16)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, signed: str) -> str:
    return _b64(hmac.new(secret, signed.encode("utf-8"), hashlib.sha256).digest())


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise InvalidInput(
            f"link token secret must be at least {MIN_SECRET_BYTES} bytes",
            code="link_secret_too_short",
        )


def make_token(
    secret: bytes, *, purpose: str, subject_id: str, action: str, expires_at: int, nonce: str
) -> str:
    """A URL-safe token binding ``purpose``, ``subject_id``, ``action``, expiry and nonce."""
    _check_secret(secret)
    for name, value in (
        ("purpose", purpose),
        ("subject_id", subject_id),
        ("action", action),
        ("nonce", nonce),
    ):
        if not value:
            raise InvalidInput(f"link token {name} must not be empty")
    fields = {"p": purpose, "s": subject_id, "a": action, "e": expires_at, "n": nonce}
    payload = _b64(json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii"))
    signed = f"{_VERSION}.{payload}"
    token = f"{signed}.{_mac(secret, signed)}"
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidInput("link token fields are too long for a URL")
    return token


def _parse_payload(payload: str) -> LinkToken:
    try:
        fields: Any = json.loads(_unb64(payload))
    except (binascii.Error, ValueError) as exc:
        raise InvalidLinkToken("link token payload is unreadable", reason="malformed") from exc
    if not isinstance(fields, dict):
        raise InvalidLinkToken("link token payload is not an object", reason="malformed")
    texts = [fields.get(key) for key in ("p", "s", "a", "n")]
    expiry = fields.get("e")
    if not all(isinstance(t, str) for t in texts) or type(expiry) is not int:
        raise InvalidLinkToken("link token payload lacks fields", reason="malformed")
    return LinkToken(
        purpose=fields["p"],
        subject_id=fields["s"],
        action=fields["a"],
        expires_at=expiry,
        nonce=fields["n"],
    )


def read_token(secret: bytes, token: str, *, purpose: str, now: int) -> LinkToken:
    """Verify ``token`` and return what it says; raise :class:`InvalidLinkToken` otherwise.

    A token expires at ``expires_at``: it is refused when ``now >= expires_at``.
    """
    _check_secret(secret)
    if not token or len(token) > MAX_TOKEN_LENGTH or "." not in token:
        raise InvalidLinkToken("not a link token", reason="malformed")
    signed, _, offered = token.rpartition(".")
    expected = _mac(secret, signed)
    if not hmac.compare_digest(expected.encode("ascii"), offered.encode("utf-8", "replace")):
        raise InvalidLinkToken("link token signature does not match", reason="forged")
    version, _, payload = signed.partition(".")
    if version != _VERSION:
        raise InvalidLinkToken("unknown link token version", reason="malformed")
    link = _parse_payload(payload)
    if link.purpose != purpose:
        raise InvalidLinkToken(
            f"link token is for {link.purpose!r}, not {purpose!r}", reason="wrong_purpose"
        )
    if now >= link.expires_at:
        raise InvalidLinkToken("link token has expired", reason="expired")
    return link
