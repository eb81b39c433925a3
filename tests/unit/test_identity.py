"""The X-MultiMail-Identity token: keys on disk, signing, verification, message checks."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.errors import InvalidInput
from multimail.mail.compose import (
    OutboundAttachment,
    OutboundDraft,
    body_sha256,
    build_message,
    compose_html,
    compose_message,
    draft_body_sha256,
    draft_hashes,
    message_hashes,
)
from multimail.mail.identity import (
    IDENTITY_HEADER,
    Approval,
    IdentityClaims,
    IdentityKeyError,
    IdentityVerificationError,
    SigningKeyring,
    check_message_identity,
    identity_header_value,
    issue_identity_token,
    key_id,
    token_from_header_value,
    verify_identity_token,
)
from multimail.mail.markdown import render_markdown

MESSAGE_ID = "<msg_01HZX0000000000000000000@acme.example>"


def _claims(**overrides: object) -> IdentityClaims:
    base = IdentityClaims(
        mailbox="support@acme.example",
        operator="Acme Corp",
        oversight_mode="gated_send",
        agent_key_id="key_01HZX00000000000000000000",
        agent_key_name="support-agent",
        approval=Approval(reviewer="alice@acme.example", decided_at=1_700_000_100),
        body_sha256="a" * 64,
        message_id=MESSAGE_ID,
        issued_at=1_700_000_200,
        issuer="https://mail.acme.example",
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _reason(token: str, keys: object) -> str:
    with pytest.raises(IdentityVerificationError) as caught:
        verify_identity_token(token, keys)  # type: ignore[arg-type]
    assert isinstance(caught.value, InvalidInput)
    return caught.value.reason


@pytest.fixture
def keyring(tmp_path: Path) -> SigningKeyring:
    return SigningKeyring.load_or_create(tmp_path / "keys")


@pytest.fixture(scope="module")
def shared_ring(tmp_path_factory: pytest.TempPathFactory) -> SigningKeyring:
    """One keyring for Hypothesis tests, which cannot use function-scoped fixtures."""
    return SigningKeyring.load_or_create(tmp_path_factory.mktemp("shared") / "keys")


# --- keyring ------------------------------------------------------------------------


def test_first_use_creates_one_current_key_with_private_file_mode(tmp_path: Path) -> None:
    """The first load creates a key whose file is mode 0600 in a 0700 directory."""
    directory = tmp_path / "data" / "keys"
    ring = SigningKeyring.load_or_create(directory)
    [info] = ring.public_keys()
    assert info.status == "current" and info.kid == ring.current.kid
    assert info.kid.startswith("mmk_") and len(info.kid) == 4 + 16
    key_file = directory / f"{ring.current.kid}.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "keyring.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_reloading_keeps_the_same_key(keyring: SigningKeyring) -> None:
    """A restart loads the key made before rather than making a new one."""
    again = SigningKeyring.load_or_create(keyring.directory)
    assert again.current.kid == keyring.current.kid
    assert again.jwks() == keyring.jwks()


def test_key_id_is_derived_from_the_public_key(keyring: SigningKeyring) -> None:
    """The key id is stable: mmk_ + 16 hex of SHA-256 over the raw public key."""
    assert key_id(keyring.current.private_key.public_key()) == keyring.current.kid


def test_group_or_world_readable_key_file_is_refused(keyring: SigningKeyring) -> None:
    """A key file others can read is refused at load, like ssh does, instead of used."""
    key_file = keyring.directory / f"{keyring.current.kid}.pem"
    os.chmod(key_file, 0o644)
    with pytest.raises(IdentityKeyError, match="chmod 600"):
        SigningKeyring.load_or_create(keyring.directory)


def test_corrupt_key_file_is_refused(keyring: SigningKeyring) -> None:
    """A key file that does not hold the key its name promises is refused."""
    key_file = keyring.directory / f"{keyring.current.kid}.pem"
    key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityKeyError):
        SigningKeyring.load_or_create(keyring.directory)


def test_rotation_makes_a_new_current_key_and_keeps_old_tokens_verifiable(
    keyring: SigningKeyring,
) -> None:
    """After rotate(), new tokens use the new key and tokens signed before still verify,
    also for a process that loads the keyring afresh."""
    old_kid = keyring.current.kid
    old_token = issue_identity_token(_claims(), keyring)
    new = keyring.rotate()
    assert new.kid != old_kid and keyring.current.kid == new.kid
    statuses = {k.kid: k.status for k in keyring.public_keys()}
    assert statuses == {old_kid: "retired", new.kid: "current"}
    assert stat.S_IMODE((keyring.directory / f"{new.kid}.pem").stat().st_mode) == 0o600

    reloaded = SigningKeyring.load_or_create(keyring.directory)
    assert reloaded.current.kid == new.kid
    assert verify_identity_token(old_token, reloaded.jwks()) == _claims()
    new_token = issue_identity_token(_claims(), reloaded)
    header = json.loads(base64.urlsafe_b64decode(new_token.split(".")[0] + "=="))
    assert header["kid"] == new.kid


def test_rotation_in_another_process_is_not_lost(keyring: SigningKeyring) -> None:
    """Two keyring objects rotating in turn keep every key: rotation starts from disk."""
    other = SigningKeyring.load_or_create(keyring.directory)
    first = keyring.rotate()
    second = other.rotate()
    kids = {k.kid for k in SigningKeyring.load_or_create(keyring.directory).public_keys()}
    assert {first.kid, second.kid} <= kids and len(kids) == 3


def _load_kid(directory: str, queue: multiprocessing.Queue[str]) -> None:
    queue.put(SigningKeyring.load_or_create(Path(directory)).current.kid)


def test_processes_starting_together_agree_on_one_first_key(tmp_path: Path) -> None:
    """Several processes creating the keyring at once all end up with the same key."""
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[str] = context.Queue()
    workers = [
        context.Process(target=_load_kid, args=(str(tmp_path / "k"), queue)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    kids = {queue.get(timeout=30) for _ in workers}
    for worker in workers:
        worker.join(timeout=30)
    assert len(kids) == 1


def test_jwks_document_has_okp_keys(keyring: SigningKeyring) -> None:
    """The published JWKS lists each key as an OKP/Ed25519 JWK with kid, x, alg and status."""
    [jwk] = keyring.jwks()["keys"]
    assert {k: jwk[k] for k in ("kty", "crv", "alg", "kid", "status")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "EdDSA",
        "kid": keyring.current.kid,
        "status": "current",
    }
    public = keyring.current.private_key.public_key()
    assert base64.urlsafe_b64decode(jwk["x"] + "=") == public.public_bytes_raw()


def test_private_key_is_not_in_repr(keyring: SigningKeyring) -> None:
    """Printing the keyring or a key never shows private material."""
    assert "private_key" not in repr(keyring.current)
    assert "BEGIN" not in repr(keyring) + repr(keyring.current)


# --- tokens -------------------------------------------------------------------------

texts = st.text(min_size=1, max_size=60)


@settings(max_examples=40, deadline=None)
@given(
    mailbox=texts,
    operator=texts,
    reviewer=st.none() | texts,
    name=st.none() | texts,
    body=st.text(max_size=200),
)
def test_round_trip_with_every_key_source(
    shared_ring: SigningKeyring,
    mailbox: str,
    operator: str,
    reviewer: str | None,
    name: str | None,
    body: str,
) -> None:
    """Claims signed by the keyring come back identical from a key map, a JWKS or the keyring."""
    ring = shared_ring
    claims = _claims(
        mailbox=mailbox,
        operator=operator,
        agent_key_name=name,
        approval=None if reviewer is None else Approval(reviewer, 1_700_000_000),
        body_sha256=hashlib.sha256(body.encode()).hexdigest(),
    )
    token = issue_identity_token(claims, ring)
    assert token.isascii() and token.count(".") == 2
    for source in (ring, ring.jwks(), ring.verification_keys()):
        assert verify_identity_token(token, source) == claims


def test_token_signed_by_another_key_under_our_kid_is_bad_signature(
    keyring: SigningKeyring, tmp_path: Path
) -> None:
    """A forger's key claiming our key id fails with bad_signature."""
    forger = SigningKeyring.load_or_create(tmp_path / "forger")
    forged = issue_identity_token(_claims(), forger)
    payload = forged.split(".")[1]
    ours = _b64(
        json.dumps({"alg": "EdDSA", "typ": "multimail-identity+jwt", "kid": keyring.current.kid})
        .replace(" ", "")
        .encode()
    )
    forger_key = forger.current.private_key
    resigned = forger_key.sign(f"{ours}.{payload}".encode())
    assert _reason(f"{ours}.{payload}.{_b64(resigned)}", keyring.jwks()) == "bad_signature"


def test_token_checked_against_keys_without_its_kid_is_unknown_key(
    keyring: SigningKeyring, tmp_path: Path
) -> None:
    """Verifying against another server's keys fails with unknown_key."""
    token = issue_identity_token(_claims(), keyring)
    other = SigningKeyring.load_or_create(tmp_path / "other")
    assert _reason(token, other.jwks()) == "unknown_key"


def test_same_kid_with_a_different_key_is_bad_signature(keyring: SigningKeyring) -> None:
    """If the key published under a kid is not the one that signed, the signature fails."""
    token = issue_identity_token(_claims(), keyring)
    wrong = {keyring.current.kid: Ed25519PrivateKey.generate().public_key()}
    assert _reason(token, wrong) == "bad_signature"


@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(
        ["mailbox", "operator", "mode", "agent_key", "body_sha256", "msgid", "iat", "approval"]
    )
)
def test_edited_payload_is_bad_signature(shared_ring: SigningKeyring, field: str) -> None:
    """Changing any claim in the payload (kept well-formed) fails with bad_signature."""
    ring = shared_ring
    header, payload, signature = issue_identity_token(_claims(), ring).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    edits: dict[str, object] = {
        "iat": claims["iat"] + 1,
        "approval": None,
        "body_sha256": "b" * 64,
        "mode": "autonomous",
    }
    claims[field] = edits.get(field, str(claims[field]) + "x")
    edited = _b64(json.dumps(claims, separators=(",", ":")).encode())
    assert _reason(f"{header}.{edited}.{signature}", ring) == "bad_signature"


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), replacement=st.sampled_from("AQgw_-.x0"))
def test_any_character_changed_never_verifies(
    shared_ring: SigningKeyring, position: int, replacement: str
) -> None:
    """Replacing any character of a token makes verification fail (never pass)."""
    ring = shared_ring
    token = issue_identity_token(_claims(), ring)
    index = position % len(token)
    if token[index] == replacement:
        return
    tampered = token[:index] + replacement + token[index + 1 :]
    with pytest.raises(IdentityVerificationError):
        verify_identity_token(tampered, ring)


@pytest.mark.parametrize("alg", ["none", "HS256", "RS256", "ES256", None])
def test_other_algorithms_are_wrong_algorithm(keyring: SigningKeyring, alg: str | None) -> None:
    """alg=none, HMAC or any algorithm other than EdDSA is refused as wrong_algorithm."""
    token = issue_identity_token(_claims(), keyring)
    _, payload, signature = token.split(".")
    header = {"typ": "multimail-identity+jwt", "kid": keyring.current.kid}
    if alg is not None:
        header["alg"] = alg
    forged_header = _b64(json.dumps(header).encode())
    assert _reason(f"{forged_header}.{payload}.{signature}", keyring) == "wrong_algorithm"
    assert _reason(f"{forged_header}.{payload}.", keyring) == "wrong_algorithm"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "!!!.e30.AA", "W10.e30.AA", "é.é.é", "x" * 9000],
)
def test_garbage_is_malformed(keyring: SigningKeyring, token: str) -> None:
    """Text that is not a compact JWS with a JSON-object header is malformed."""
    assert _reason(token, keyring) == "malformed"


def test_wrong_token_type_or_crit_header_is_malformed(keyring: SigningKeyring) -> None:
    """A JWS of another type (e.g. a plain JWT) or with crit is refused as malformed."""
    _, payload, _ = issue_identity_token(_claims(), keyring).split(".")
    for header in (
        {"alg": "EdDSA", "typ": "JWT", "kid": keyring.current.kid},
        {"alg": "EdDSA", "typ": "multimail-identity+jwt", "kid": keyring.current.kid, "crit": []},
        {"alg": "EdDSA", "typ": "multimail-identity+jwt"},
    ):
        head = _b64(json.dumps(header).encode())
        sig = _b64(keyring.current.private_key.sign(f"{head}.{payload}".encode()))
        assert _reason(f"{head}.{payload}.{sig}", keyring) == "malformed"


def test_signed_payload_with_missing_claims_is_malformed(keyring: SigningKeyring) -> None:
    """A correctly signed token whose claims are incomplete is still refused (malformed)."""
    head = _b64(
        json.dumps(
            {"alg": "EdDSA", "typ": "multimail-identity+jwt", "kid": keyring.current.kid}
        ).encode()
    )
    payload = _b64(b'{"mailbox":"a@b"}')
    sig = _b64(keyring.current.private_key.sign(f"{head}.{payload}".encode()))
    assert _reason(f"{head}.{payload}.{sig}", keyring) == "malformed"


def test_issuing_refuses_a_body_hash_that_is_not_sha256_hex(keyring: SigningKeyring) -> None:
    """A token never carries a malformed body hash."""
    with pytest.raises(InvalidInput):
        issue_identity_token(_claims(body_sha256="xyz"), keyring)


def test_header_value_folds_and_reads_back(keyring: SigningKeyring) -> None:
    """The header value splits the token into short words and reading it back restores it,
    also after folding with CRLF or RFC 2047 encoding by a mail generator."""
    token = issue_identity_token(_claims(), keyring)
    value = identity_header_value(token)
    assert all(len(word) <= 56 for word in value.split(" "))
    assert token_from_header_value(value) == token
    assert token_from_header_value(value.replace(" ", "\r\n ")) == token
    encoded = " ".join(
        "=?utf-8?b?" + base64.b64encode(token[i : i + 40].encode()).decode() + "?="
        for i in range(0, len(token), 40)
    )
    assert token_from_header_value(encoded) == token


# --- whole messages -----------------------------------------------------------------


def _draft(markdown: str = "Hello **there**.") -> OutboundDraft:
    return OutboundDraft(
        from_address="support@acme.example",
        from_name="Acme Support",
        to=["customer@example.org"],
        cc=[],
        reply_to=None,
        subject="Your ticket",
        markdown=markdown,
        message_id=MESSAGE_ID,
        date=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


def _build(draft: OutboundDraft, token: str) -> bytes:
    headers = [(IDENTITY_HEADER, identity_header_value(token))]
    return build_message(replace(draft, extra_headers=headers))


def _message(keyring: SigningKeyring) -> bytes:
    draft = _draft()
    claims = _claims(body_sha256=draft_body_sha256(draft))
    return _build(draft, issue_identity_token(claims, keyring))


def test_message_built_by_compose_passes_every_check(keyring: SigningKeyring) -> None:
    """A message built with its identity header passes signature, Message-ID and body checks,
    and every header line stays within 78 characters."""
    raw = _message(keyring)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    result = check_message_identity(raw, keyring.jwks(), body_hasher=body_sha256)
    assert result.ok, result.to_dict()
    assert result.claims is not None and result.claims.mailbox == "support@acme.example"
    assert result.to_dict()["ok"] is True


def test_message_with_edited_body_fails_only_the_body_check(keyring: SigningKeyring) -> None:
    """Changing the delivered body keeps the token valid but fails body_hash_match."""
    raw = _message(keyring)
    edited = raw.replace(b"Hello", b"Jello")
    assert edited != raw
    result = check_message_identity(edited, keyring.jwks(), body_hasher=body_sha256)
    assert not result.ok
    assert result.token_signature.passed and result.message_id_match.passed
    assert not result.body_hash_match.passed


def test_message_with_replaced_message_id_fails_the_id_check(keyring: SigningKeyring) -> None:
    """Moving a token onto another message (new Message-ID) fails message_id_match."""
    raw = _message(keyring).replace(b"msg_01HZX", b"msg_99HZX")
    result = check_message_identity(raw, keyring.jwks(), body_hasher=body_sha256)
    assert result.token_signature.passed and not result.message_id_match.passed
    assert not result.ok


def test_message_with_edited_body_hash_claim_fails_the_signature(keyring: SigningKeyring) -> None:
    """Editing the body and rewriting the token's body hash to match breaks the signature."""
    genuine = issue_identity_token(_claims(body_sha256=draft_body_sha256(_draft())), keyring)
    edited_draft = _draft("Please wire the money to a new account.")
    header, payload, signature = genuine.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["body_sha256"] = draft_body_sha256(edited_draft)
    forged = f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"
    result = check_message_identity(
        _build(edited_draft, forged), keyring.jwks(), body_hasher=body_sha256
    )
    assert not result.token_signature.passed
    assert result.token_signature.reason == "bad_signature"
    assert not result.message_id_match.passed and not result.body_hash_match.passed
    assert result.claims is None and not result.ok


def test_message_checked_with_another_servers_keys_is_unknown_key(
    keyring: SigningKeyring, tmp_path: Path
) -> None:
    """A recipient holding a different server's keys sees unknown_key."""
    other = SigningKeyring.load_or_create(tmp_path / "other")
    result = check_message_identity(_message(keyring), other.jwks(), body_hasher=body_sha256)
    assert result.token_signature.reason == "unknown_key" and not result.ok


def test_message_without_or_with_two_identity_headers_fails(keyring: SigningKeyring) -> None:
    """No identity header, or a second one prepended by someone else, fails the check."""
    raw = _message(keyring)
    without = b"Subject: x\r\nMessage-ID: " + MESSAGE_ID.encode() + b"\r\n\r\nbody\r\n"
    doubled = f"{IDENTITY_HEADER}: e30.e30.AA\r\n".encode() + raw
    for message in (without, doubled):
        result = check_message_identity(message, keyring, body_hasher=body_sha256)
        assert not result.ok and not result.token_signature.passed


def test_message_without_text_part_fails_the_body_check(keyring: SigningKeyring) -> None:
    """If the body cannot be hashed (no text part), the body check fails instead of raising."""
    token = issue_identity_token(_claims(), keyring)
    raw = (
        f"{IDENTITY_HEADER}: {identity_header_value(token)}\r\n"
        f"Message-ID: {MESSAGE_ID}\r\nContent-Type: image/png\r\n\r\nxx\r\n"
    ).encode()
    result = check_message_identity(raw, keyring, body_hasher=body_sha256)
    assert result.token_signature.passed and result.message_id_match.passed
    assert not result.body_hash_match.passed and not result.ok


# --- the HTML part and attachments ------------------------------------------------------


def _full_message(keyring: SigningKeyring, draft: OutboundDraft) -> bytes:
    hashes = draft_hashes(draft)
    claims = _claims(
        body_sha256=hashes.text, html_sha256=hashes.html, attachments_sha256=hashes.attachments
    )
    return _build(draft, issue_identity_token(claims, keyring))


_ATTACHMENTS = (
    OutboundAttachment("report.pdf", "application/pdf", b"%PDF-1.4\n" + bytes(range(256))),
    OutboundAttachment("notes.txt", "text/plain; charset=utf-8", "naïve\r\nline\n".encode()),
    OutboundAttachment("mail.eml", "message/rfc822", b"Subject: hi\r\n\r\nbody\r\n"),
)


@settings(max_examples=60, deadline=None)
@given(
    markdown=st.text(max_size=300),
    signature=st.none() | st.text(max_size=60),
    files=st.integers(min_value=0, max_value=len(_ATTACHMENTS)),
    stored_html=st.booleans(),
)
def test_hashes_of_a_draft_are_those_a_receiver_computes(
    markdown: str, signature: str | None, files: int, stored_html: bool
) -> None:
    """draft_hashes (what the delivery worker signs, from the strings it builds the parts
    of) equals message_hashes of the built message, whatever encoding the parts got."""
    draft = replace(
        _draft(markdown),
        signature=signature,
        attachments=list(_ATTACHMENTS[:files]),
        body_html=render_markdown(markdown).html if stored_html else None,
    )
    try:
        html = compose_html(draft)
        raw = compose_message(draft, html=html).raw
    except InvalidInput:
        return  # not sendable at all
    assert message_hashes(raw) == draft_hashes(draft) == draft_hashes(draft, html=html)
    assert message_hashes(raw).text == body_sha256(raw) == draft_body_sha256(draft)


@pytest.mark.parametrize(
    "markdown",
    [
        "Hello **there**.",
        "Grüße, naïve café — " * 30,  # non-ASCII, long lines: quoted-printable or base64
        "x" * 400 + "\n\n| a | b |\n|---|---|\n| 1 | 2 |",
        "=" * 200,
    ],
)
def test_a_message_with_the_html_and_attachment_hashes_passes(
    keyring: SigningKeyring, markdown: str
) -> None:
    draft = replace(_draft(markdown), attachments=list(_ATTACHMENTS))
    result = check_message_identity(_full_message(keyring, draft), keyring.jwks())
    assert result.ok, result.to_dict()
    assert result.body_hash_match.reason == "body matches (text and HTML parts and attachments)"
    assert result.claims is not None and result.claims.html_sha256 is not None


def test_an_edited_html_part_or_attachment_fails_the_body_check(keyring: SigningKeyring) -> None:
    """The HTML part mail clients show, and each attachment, are bound as well as the text."""
    draft = replace(_draft("Your refund is on its way."), attachments=[_ATTACHMENTS[0]])
    raw = _full_message(keyring, draft)
    assert b"<p>Your refund is on its way.</p>" in raw
    cases = {
        "the HTML part differs from the one signed": raw.replace(
            b"<p>Your refund is on its way.</p>", b"<p>Pay the fee at https://evil.example</p>"
        ),
        "the attachments differ from the ones signed": raw.replace(
            b"JVBERi0xLjQK", b"JVBERi0xLjUK"
        ),
    }
    for reason, edited in cases.items():
        assert edited != raw
        result = check_message_identity(edited, keyring.jwks())
        assert result.token_signature.passed and result.message_id_match.passed
        assert (result.body_hash_match.passed, result.body_hash_match.reason) == (False, reason)


def test_a_message_with_an_attachment_added_or_the_html_removed_fails(
    keyring: SigningKeyring,
) -> None:
    draft = _draft()
    token = issue_identity_token(
        _claims(
            body_sha256=draft_hashes(draft).text,
            html_sha256=draft_hashes(draft).html,
            attachments_sha256=draft_hashes(draft).attachments,
        ),
        keyring,
    )
    extra = replace(draft, attachments=[_ATTACHMENTS[0]])
    result = check_message_identity(_build(extra, token), keyring.jwks())
    assert result.body_hash_match.reason == "the attachments differ from the ones signed"
    text_only = (
        f"{IDENTITY_HEADER}: {identity_header_value(token)}\r\nMessage-ID: {MESSAGE_ID}\r\n"
        "Content-Type: text/plain\r\n\r\nHello **there**.\r\n\r\n---\r\n\r\n"
        "*This message was written by an AI agent.*\r\n"
    ).encode()
    assert message_hashes(text_only).text == draft_hashes(draft).text
    result = check_message_identity(text_only, keyring.jwks())
    assert not result.body_hash_match.passed
    assert result.body_hash_match.reason == "the message has no HTML part; the one signed had"
    # A checker that hashes the text part only cannot vouch for a token binding more.
    plain = check_message_identity(_build(draft, token), keyring.jwks(), body_hasher=body_sha256)
    assert not plain.body_hash_match.passed


def test_a_token_without_the_html_hash_still_verifies_with_the_text_part(
    keyring: SigningKeyring,
) -> None:
    """Tokens issued before html_sha256/attachments_sha256 bind the text part only: they
    verify as before, their payload reads back without the new claims, and an edit to the
    HTML part alone is (as it always was for them) not detected."""
    raw = _message(keyring)
    result = check_message_identity(raw, keyring.jwks())
    assert result.ok, result.to_dict()
    assert result.body_hash_match.reason == "body matches (text part only: an older token)"
    assert result.claims is not None and result.claims.html_sha256 is None
    assert set(result.claims.to_payload()) == {
        "iss", "iat", "mailbox", "operator", "mode", "agent_key", "agent_name", "approval",
        "body_sha256", "msgid",
    }  # fmt: skip
    edited_html = raw.replace(b"<strong>there</strong>", b"<strong>you</strong>")
    assert edited_html != raw
    assert check_message_identity(edited_html, keyring.jwks()).ok


@pytest.mark.parametrize("claim", ["html_sha256", "attachments_sha256"])
def test_a_malformed_part_hash_is_refused(keyring: SigningKeyring, claim: str) -> None:
    with pytest.raises(InvalidInput):
        issue_identity_token(_claims(**{claim: "xyz"}), keyring)
    head = _b64(
        json.dumps(
            {"alg": "EdDSA", "typ": "multimail-identity+jwt", "kid": keyring.current.kid}
        ).encode()
    )
    payload = json.loads(
        base64.urlsafe_b64decode(issue_identity_token(_claims(), keyring).split(".")[1] + "==")
    )
    payload[claim] = "XYZ"
    body = _b64(json.dumps(payload).encode())
    sig = _b64(keyring.current.private_key.sign(f"{head}.{body}".encode()))
    assert _reason(f"{head}.{body}.{sig}", keyring) == "malformed"
