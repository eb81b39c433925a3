"""WH-1: our webhook signatures, checked by an independent Standard Webhooks implementation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from multimail.errors import AuthenticationFailed, InvalidInput
from multimail.webhook_signature import (
    WebhookVerificationError,
    generate_secret,
    sign_payload,
    verify_multimail_signature,
    verify_webhook,
)

SECRET = generate_secret()
OLD_SECRET = generate_secret()

bodies = st.binary(max_size=512)
text_bodies = st.text(max_size=256).map(lambda t: t.encode("utf-8"))
msg_ids = st.from_regex(r"msg_[A-Za-z0-9]{1,30}", fullmatch=True)


def _reference_accepts(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    """The standardwebhooks package's verdict; any exception it raises is a rejection."""
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except Exception:
        return False
    return True


def _ours_accepts(secret: str, body: bytes, headers: dict[str, str], now: int) -> bool:
    try:
        verify_webhook(body, headers, secret, now=now)
    except WebhookVerificationError:
        return False
    return True


def test_generated_secret_has_standard_webhooks_form() -> None:
    """A new secret is whsec_ + base64 of 32 random bytes, and secrets never repeat."""
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[6:], validate=True)) == 32
    assert secret != generate_secret()


@settings(max_examples=60, deadline=None)
@given(body=text_bodies, msg_id=msg_ids)
def test_reference_implementation_verifies_every_signature_we_make(
    body: bytes, msg_id: str
) -> None:
    """Every signature we make passes the standardwebhooks package and our own verifier."""
    now = int(time.time())
    headers = sign_payload(body, secrets=[SECRET], msg_id=msg_id, timestamp=now)
    assert _reference_accepts(SECRET, body, headers)
    assert _ours_accepts(SECRET, body, headers, now)


@settings(max_examples=60, deadline=None)
@given(body=text_bodies, msg_id=msg_ids)
def test_we_verify_signatures_made_by_the_reference_implementation(
    body: bytes, msg_id: str
) -> None:
    """A signature made by the standardwebhooks package passes our verifier."""
    now = int(time.time())
    signature = Webhook(SECRET).sign(
        msg_id=msg_id, timestamp=datetime.fromtimestamp(now, tz=UTC), data=body.decode()
    )
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(now), "webhook-signature": signature}
    verify_webhook(body, headers, SECRET, now=now)


def _flip(data: bytes, position: int, bit: int) -> bytes:
    index = position % len(data)
    return data[:index] + bytes([data[index] ^ (1 << bit)]) + data[index + 1 :]


@settings(max_examples=150, deadline=None)
@given(
    body=text_bodies.filter(bool),
    msg_id=msg_ids,
    field=st.sampled_from(["body", "id", "timestamp", "signature"]),
    position=st.integers(min_value=0),
    bit=st.integers(min_value=0, max_value=7),
    shift=st.integers(min_value=-200, max_value=200).filter(bool),
)
def test_any_mutation_fails_both_verifiers(
    body: bytes, msg_id: str, field: str, position: int, bit: int, shift: int
) -> None:
    """Changing the body, the id, the timestamp or the signature makes both verifiers refuse."""
    now = int(time.time())
    headers = sign_payload(body, secrets=[SECRET], msg_id=msg_id, timestamp=now)
    if field == "body":
        body = _flip(body, position, bit)
    elif field == "id":
        headers["webhook-id"] = msg_id + "x" if bit % 2 else "M" + msg_id[1:]
    elif field == "timestamp":
        # A different instant still inside the window: only the signature can catch it.
        headers["webhook-timestamp"] = str(now + shift)
    else:
        raw = base64.b64decode(headers["webhook-signature"].removeprefix("v1,"))
        headers["webhook-signature"] = "v1," + base64.b64encode(_flip(raw, position, bit)).decode()
    assert not _reference_accepts(SECRET, body, headers)
    assert not _ours_accepts(SECRET, body, headers, now)


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _other_padding_bits(signature: str) -> str:
    # 32 bytes take 43 base64 digits; the last digit's lowest 2 bits are padding, so
    # flipping one gives a different text that lenient decoders read as the same bytes.
    last = signature[-2]
    return signature[:-2] + _B64[_B64.index(last) ^ 1] + signature[-1]


@pytest.mark.parametrize(
    "spelling",
    [_other_padding_bits, lambda s: s.replace("v1,", "v1, "), lambda s: s + "!"],
)
def test_we_accept_only_the_canonical_spelling_of_a_signature(
    spelling: Callable[[str], str],
) -> None:
    """An altered signature text is refused even when it would decode to the same bytes."""
    now = int(time.time())
    headers = sign_payload(b"{}", secrets=[SECRET], msg_id="msg_1", timestamp=now)
    headers["webhook-signature"] = spelling(headers["webhook-signature"])
    with pytest.raises(WebhookVerificationError) as caught:
        verify_webhook(b"{}", headers, SECRET, now=now)
    assert caught.value.reason == "no_matching_signature"


def test_rotation_window_message_verifies_with_new_and_old_secret() -> None:
    """A message signed with [new, old] verifies with either secret, in both implementations."""
    now = int(time.time())
    body = b'{"type":"message.received"}'
    headers = sign_payload(body, secrets=[SECRET, OLD_SECRET], msg_id="msg_rot", timestamp=now)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, OLD_SECRET):
        verify_webhook(body, headers, secret, now=now)
        assert _reference_accepts(secret, body, headers)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, headers, generate_secret(), now=now)


def test_multimail_signature_is_hex_hmac_of_body_keyed_by_secret_text() -> None:
    """X-MultiMail-Signature is hex HMAC-SHA256 of the raw body keyed by the secret's UTF-8
    text, so the integration guide's receiver (hmac.new(secret, body, sha256)) works."""
    body = b'{"message_id":"msg_1"}'
    headers = sign_payload(body, secrets=[SECRET, OLD_SECRET], msg_id="msg_1", timestamp=1)
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-MultiMail-Signature"] == expected
    assert verify_multimail_signature(body, expected, SECRET)
    assert verify_multimail_signature(body, expected.upper(), SECRET)
    assert not verify_multimail_signature(body + b" ", expected, SECRET)
    assert not verify_multimail_signature(body, expected, OLD_SECRET)
    assert not verify_multimail_signature(body, "é" + expected[1:], SECRET)


@pytest.mark.parametrize("offset", [-300, 300, 0])
def test_timestamps_within_five_minutes_either_way_are_accepted(offset: int) -> None:
    """Clock skew up to 5 minutes in either direction is tolerated, inclusive."""
    now = 1_700_000_000
    headers = sign_payload(b"x", secrets=[SECRET], msg_id="msg_t", timestamp=now + offset)
    verify_webhook(b"x", headers, SECRET, now=now)


@pytest.mark.parametrize(
    ("offset", "reason"), [(-301, "timestamp_too_old"), (301, "timestamp_too_new")]
)
def test_timestamps_beyond_five_minutes_are_refused(offset: int, reason: str) -> None:
    """A replay older than 5 minutes, or a message from more than 5 minutes ahead, is refused."""
    now = 1_700_000_000
    headers = sign_payload(b"x", secrets=[SECRET], msg_id="msg_t", timestamp=now + offset)
    with pytest.raises(WebhookVerificationError) as caught:
        verify_webhook(b"x", headers, SECRET, now=now)
    assert caught.value.reason == reason
    assert isinstance(caught.value, AuthenticationFailed)


def test_reference_implementation_refuses_stale_messages_too() -> None:
    """The reference package applies the same 5-minute window to our signatures."""
    now = int(time.time())
    stale = sign_payload(b"x", secrets=[SECRET], msg_id="m", timestamp=now - 400)
    future = sign_payload(b"x", secrets=[SECRET], msg_id="m", timestamp=now + 400)
    assert not _reference_accepts(SECRET, b"x", stale)
    assert not _reference_accepts(SECRET, b"x", future)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_refused(missing: str) -> None:
    """Each of the three Standard Webhooks headers is required."""
    headers = sign_payload(b"x", secrets=[SECRET], msg_id="m", timestamp=100)
    del headers[missing]
    with pytest.raises(WebhookVerificationError) as caught:
        verify_webhook(b"x", headers, SECRET, now=100)
    assert caught.value.reason == "missing_headers"


@pytest.mark.parametrize("stamp", ["100.0", " 100", "1e2", "-100", ""])
def test_timestamp_must_be_plain_epoch_seconds(stamp: str) -> None:
    """Alternative spellings of the timestamp are refused rather than reinterpreted."""
    headers = sign_payload(b"x", secrets=[SECRET], msg_id="m", timestamp=100)
    headers["webhook-timestamp"] = stamp
    with pytest.raises(WebhookVerificationError) as caught:
        verify_webhook(b"x", headers, SECRET, now=100)
    assert caught.value.reason in {"invalid_headers", "missing_headers"}


def test_header_lookup_ignores_case() -> None:
    """Headers are found whatever case the receiving framework gives them."""
    headers = sign_payload(b"x", secrets=[SECRET], msg_id="m", timestamp=100)
    shouted = {name.upper(): value for name, value in headers.items()}
    verify_webhook(b"x", shouted, SECRET, now=100)


def test_unknown_signature_versions_are_skipped() -> None:
    """Entries of other versions do not break verification of the v1 entry next to them."""
    headers = sign_payload(b"x", secrets=[SECRET], msg_id="m", timestamp=100)
    headers["webhook-signature"] = "v1a,AAAA " + headers["webhook-signature"]
    verify_webhook(b"x", headers, SECRET, now=100)


@pytest.mark.parametrize("bad", ["", "whsec_", "whsec_not base64!", "whsec_QQ"])
def test_unusable_secrets_are_rejected_when_signing(bad: str) -> None:
    """A secret that is not whsec_<base64> cannot sign: fail loudly, never sign with garbage."""
    with pytest.raises(InvalidInput):
        sign_payload(b"x", secrets=[bad], msg_id="m", timestamp=1)


@pytest.mark.parametrize("msg_id", ["", "has space", "line\r\nX-Injected: 1"])
def test_webhook_id_cannot_inject_headers(msg_id: str) -> None:
    """A webhook-id with spaces or line breaks is refused before it reaches a header."""
    with pytest.raises(InvalidInput):
        sign_payload(b"x", secrets=[SECRET], msg_id=msg_id, timestamp=1)


def test_empty_secret_list_is_refused() -> None:
    """Signing needs at least one secret."""
    with pytest.raises(InvalidInput):
        sign_payload(b"x", secrets=[], msg_id="m", timestamp=1)
