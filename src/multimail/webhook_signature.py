"""Sign and verify MultiMail webhooks.

Every webhook request carries two independent proofs, so receivers can pick either:

``X-MultiMail-Signature``
    Lower-case hex HMAC-SHA256 of the raw request body. The HMAC key is the secret
    string **exactly as shown when the webhook was created**, encoded as UTF-8 — the
    whole ``whsec_…`` text, prefix included. A receiver written as::

        expected = hmac.new(b"whsec_…", request.data, hashlib.sha256).hexdigest()
        hmac.compare_digest(request.headers["X-MultiMail-Signature"], expected)

    therefore works by pasting the secret. This header has no timestamp, so it does not
    stop replays; use the Standard Webhooks headers for that.

``webhook-id``, ``webhook-timestamp``, ``webhook-signature``
    The Standard Webhooks scheme (https://www.standardwebhooks.com/): the key is the
    base64-decoded part of the secret after ``whsec_``; the signed content is
    ``f"{webhook-id}.{webhook-timestamp}.{body}"``; the header holds ``v1,<base64>``
    once per active secret, space-separated, so a rotation can overlap. Any Standard
    Webhooks library verifies it, and :func:`verify_webhook` does too.

This module depends only on the standard library and :mod:`multimail.errors`, so a
receiver can use it without running MultiMail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets as _random
import time
from collections.abc import Mapping, Sequence

from multimail.errors import AuthenticationFailed, InvalidInput

__all__ = [
    "MULTIMAIL_SIGNATURE_HEADER",
    "WebhookVerificationError",
    "generate_secret",
    "sign_payload",
    "verify_multimail_signature",
    "verify_webhook",
]

MULTIMAIL_SIGNATURE_HEADER = "X-MultiMail-Signature"
SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300

# A webhook-id becomes part of an HTTP header and of the signed content: printable
# ASCII without spaces keeps it from smuggling a header or a second signature.
_MSG_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class WebhookVerificationError(AuthenticationFailed):
    """A webhook request did not prove it came from MultiMail; ``reason`` says why.

    Reasons: ``missing_headers``, ``invalid_headers``, ``timestamp_too_old``,
    ``timestamp_too_new``, ``no_matching_signature``.
    """

    code = "webhook_signature_invalid"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason


def generate_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(32)).decode("ascii")


def _standard_key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(
            "webhook secret is not base64 (expected whsec_<base64>)",
            code="webhook_secret_invalid",
        ) from exc
    if not key:
        raise InvalidInput("webhook secret is empty", code="webhook_secret_invalid")
    return key


def _standard_signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    signed = msg_id.encode("ascii") + b"." + timestamp.encode("ascii") + b"." + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def _multimail_signature(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def sign_payload(
    body: bytes, *, secrets: Sequence[str], msg_id: str, timestamp: int
) -> dict[str, str]:
    """The signature headers for one delivery attempt of ``body``.

    ``secrets[0]`` is the current secret and alone keys ``X-MultiMail-Signature``; every
    secret gets a ``v1`` entry in ``webhook-signature`` so receivers still on an older
    secret keep verifying during a rotation.
    """
    if isinstance(secrets, str) or not secrets:
        raise InvalidInput("at least one webhook secret is needed", code="webhook_secret_invalid")
    if not _MSG_ID.fullmatch(msg_id):
        raise InvalidInput("webhook-id must be 1-256 printable ASCII characters, no spaces")
    if timestamp < 0:
        raise InvalidInput("webhook-timestamp must be a non-negative epoch second")
    stamp = str(timestamp)
    signatures = [
        "v1," + _standard_signature(_standard_key(s), msg_id, stamp, body) for s in secrets
    ]
    return {
        MULTIMAIL_SIGNATURE_HEADER: _multimail_signature(body, secrets[0]),
        "webhook-id": msg_id,
        "webhook-timestamp": stamp,
        "webhook-signature": " ".join(signatures),
    }


def verify_multimail_signature(body: bytes, signature_hex: str, secret: str) -> bool:
    """Whether ``signature_hex`` is the ``X-MultiMail-Signature`` of ``body`` under ``secret``."""
    expected = _multimail_signature(body, secret).encode("ascii")
    given = signature_hex.strip().lower().encode("utf-8", "replace")
    return hmac.compare_digest(expected, given)


def verify_webhook(
    body: bytes,
    headers: Mapping[str, str],
    secret: str,
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: int | None = None,
) -> None:
    """Raise :class:`WebhookVerificationError` unless the Standard Webhooks headers prove
    that MultiMail sent ``body`` within ``tolerance`` seconds of ``now``."""
    key = _standard_key(secret)
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    offered = lowered.get("webhook-signature", "")
    if not (msg_id and stamp and offered):
        raise WebhookVerificationError(
            "webhook-id, webhook-timestamp and webhook-signature are required",
            reason="missing_headers",
        )
    if not _TIMESTAMP.fullmatch(stamp) or not _MSG_ID.fullmatch(msg_id):
        raise WebhookVerificationError(
            "webhook-timestamp must be whole epoch seconds and webhook-id printable ASCII",
            reason="invalid_headers",
        )
    current = int(time.time()) if now is None else now
    sent_at = int(stamp)
    if sent_at < current - tolerance:
        raise WebhookVerificationError("webhook timestamp is too old", reason="timestamp_too_old")
    if sent_at > current + tolerance:
        raise WebhookVerificationError("webhook timestamp is too new", reason="timestamp_too_new")

    # Comparing the canonical base64 text (not decoded bytes) means no alternative
    # spelling of a signature is accepted.
    expected = _standard_signature(key, msg_id, stamp, body).encode("ascii")
    matched = False
    for entry in offered.split():
        version, _, candidate = entry.partition(",")
        if version != "v1":
            continue
        # Every entry is compared so the time taken does not reveal which one matched.
        matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    if not matched:
        raise WebhookVerificationError(
            "no webhook-signature entry matches this secret", reason="no_matching_signature"
        )
