"""Verifiable identity (SPEC §3): public keys and identity documents, and messages that prove
who sent them — checked through POST /v1/verify and `multimail verify FILE.eml`."""

from __future__ import annotations

import base64
import json
import os
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from multimail.config import Settings
from multimail.ids import new_id, utcnow
from multimail.mail.compose import OutboundDraft, build_message, draft_body_sha256, draft_hashes
from multimail.mail.dkim import dns_txt_value, generate_rsa_keypair, sign_message
from multimail.mail.identity import (
    IDENTITY_HEADER,
    IdentityClaims,
    SigningKeyring,
    identity_header_value,
    issue_identity_token,
    token_from_header_value,
    verify_identity_token,
)
from multimail.runtime import build_services
from multimail.services import accounts, identity, mailboxes
from multimail.services.context import SYSTEM, Actor, Services
from multimail.store.tables import audit_entries, messages
from multimail.testing.dns import LocalDNSServer
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import signing
from tests.conftest import Api

MAILBOX = "agent@mm.test"


@pytest.fixture
def dns_server() -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        yield server


@pytest.fixture
def svc(settings: Settings, dns_server: LocalDNSServer) -> Iterator[Services]:
    """Services whose DNS is the local server publishing the default DKIM key."""
    services = build_services(settings.model_copy(update={"dns_resolver": dns_server.address}))
    name, value = signing.default_dkim_record(services)
    dns_server.add_record(name, "TXT", value)
    yield services
    services.db.dispose()


@pytest.fixture
def server(svc: Services) -> Iterator[LiveServer]:
    with LiveServer(svc) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[Api]:
    helper = Api(server.base_url)
    yield helper
    helper.close()


@pytest.fixture
def boot(svc: Services) -> accounts.Bootstrap:
    result = accounts.bootstrap(svc.db, account_name="Acme", operator_email="ops@mm.test")
    operator = Actor(type="user", id="usr_t", name="op", account_id=result.account["id"])
    with svc.db.write() as conn:
        mailboxes.create_mailbox(
            conn, actor=operator, settings=svc.settings, address=MAILBOX, oversight_mode="monitored"
        )
    return result


BODY = "Hello **Bob**,\n\nYour refund is on its way."


def draft(message_id: str, *, markdown: str = BODY) -> OutboundDraft:
    return OutboundDraft(
        from_address=MAILBOX,
        from_name="Support Agent",
        to=["bob@example.net"],
        cc=[],
        reply_to=None,
        subject="Your refund",
        markdown=markdown,
        message_id=message_id,
        date=datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
    )


def stored_message(svc: Services, boot: accounts.Bootstrap, **fields: Any) -> dict[str, Any]:
    """An outbound message row as the sending pipeline leaves it just before delivery."""
    with svc.db.write() as conn:
        box = mailboxes.resolve(conn, Actor("user", "u", "op", boot.account["id"]), MAILBOX)
        now = utcnow()
        message_id = new_id("msg")
        row = {
            "id": message_id,
            "account_id": boot.account["id"],
            "mailbox_id": box["id"],
            "direction": "outbound",
            "status": "sending",
            "message_id_header": f"<{message_id}@mm.test>",
            "from_address": MAILBOX,
            "to": ["bob@example.net"],
            "subject": "Your refund",
            "markdown": "Hello",
            "oversight_mode": "monitored",
            "created_by_key_id": "key_agent1",
            "created_by_key_name": "refund-bot",
            "created_at": now,
            "updated_at": now,
            **fields,
        }
        conn.execute(insert(messages).values(**row))
        query = select(messages).where(messages.c.id == message_id)
        return dict(conn.execute(query).mappings().one())


def sent_bytes(
    svc: Services, row: dict[str, Any], *, body: OutboundDraft | None = None, old: bool = False
) -> bytes:
    """Build, add the identity header, DKIM-sign: what the delivery worker hands to SMTP.

    ``old`` issues the token as before the HTML and attachment hashes (text part only)."""
    message = body or draft(row["message_id_header"])
    hashes = draft_hashes(message)
    parts: dict[str, Any] = (
        {} if old else {"html_sha256": hashes.html, "attachments_sha256": hashes.attachments}
    )
    with svc.db.read() as conn:
        header = identity.identity_header_for(
            conn, svc, row, body_sha256=draft_body_sha256(message), **parts
        )
    raw = build_message(replace(message, extra_headers=[header]))
    return signing.sign(raw, signing.default_key(svc))


def resign(svc: Services, raw: bytes) -> bytes:
    """Drop the DKIM signature and sign again, as a sender controlling the domain would."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    kept: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"dkim-signature:")
        if not skipping:
            kept.append(line)
    return signing.sign(b"\r\n".join(kept) + b"\r\n\r\n" + body, signing.default_key(svc))


def checks(report: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    return {c["name"]: (c["passed"], c["reason"]) for c in report["checks"]}


def test_public_keys_and_identity_documents_need_no_key(
    client: Api, svc: Services, boot: accounts.Bootstrap
) -> None:
    """Anyone can fetch the public keys (both paths) and a mailbox's identity; unknown → 404."""
    anon = client.client(None)
    keys = anon.get("/.well-known/multimail/keys")
    assert keys.status_code == 200
    document = keys.json()
    assert anon.get("/.well-known/multimail-signing-key").json() == document
    current = document["current_key_id"]
    assert [k["kid"] for k in document["keys"]] == [current]
    assert document["keys"][0]["kty"] == "OKP" and document["keys"][0]["crv"] == "Ed25519"
    assert "d" not in document["keys"][0]  # never the private part
    who = anon.get(f"/v1/identity/{MAILBOX}")
    assert who.status_code == 200, who.text
    body = who.json()
    assert body["operator"] == "Acme" and body["oversight_mode"] == "monitored"
    assert body["public_key_ids"] == [current]
    assert body["dkim"] == {"domain": "mm.test", "selector": signing.DEFAULT_SELECTOR}
    assert body["keys_url"].endswith("/.well-known/multimail/keys")
    missing = anon.get("/v1/identity/nobody@mm.test")
    assert missing.status_code == 404 and missing.json()["code"] == "identity_not_found"

    rotated = identity.rotate_signing_key(svc, actor=SYSTEM)
    after = anon.get("/.well-known/multimail/keys").json()
    assert {k["kid"]: k["status"] for k in after["keys"]} == {
        current: "retired",
        rotated["key_id"]: "current",
    }
    with svc.db.read() as conn:
        actions = conn.execute(select(audit_entries.c.action)).scalars().all()
    assert "identity.key_rotated" in actions


def test_identity_header_binds_what_was_sent(svc: Services, boot: accounts.Bootstrap) -> None:
    """The token names mailbox, operator, mode, agent key, approval, body hash and Message-ID."""
    decided = datetime(2026, 3, 1, 11, 30, tzinfo=UTC)
    row = stored_message(
        svc, boot, decision="approve", reviewer="rita@acme.example", decided_at=decided
    )
    with svc.db.read() as conn:
        name, value = identity.identity_header_for(conn, svc, row, body_sha256="ab" * 32)
    assert name == IDENTITY_HEADER and all(len(part) <= 56 for part in value.split(" "))
    claims = verify_identity_token(token_from_header_value(value), identity.keyring(svc))
    assert claims.mailbox == MAILBOX and claims.operator == "Acme"
    assert claims.oversight_mode == "monitored"
    assert (claims.agent_key_id, claims.agent_key_name) == ("key_agent1", "refund-bot")
    assert claims.approval is not None and claims.approval.reviewer == "rita@acme.example"
    assert claims.approval.decided_at == int(decided.timestamp())
    assert claims.body_sha256 == "ab" * 32 and claims.message_id == row["message_id_header"]
    assert claims.issuer == svc.settings.base_url
    unsent = {**row, "message_id_header": None}
    with svc.db.read() as conn:
        _, later = identity.identity_header_for(
            conn, svc, unsent, body_sha256="cd" * 32, message_id="<x@y>"
        )
    token = token_from_header_value(later)
    assert verify_identity_token(token, identity.keyring(svc)).message_id == "<x@y>"


def test_a_delivered_message_verifies_end_to_end(
    client: Api, svc: Services, boot: accounts.Bootstrap, tmp_path: Path
) -> None:
    """A message captured by a real SMTP server passes DKIM (via DNS), the token, body and
    Message-ID checks, through POST /v1/verify (raw or base64 JSON) and `multimail verify`."""
    raw = sent_bytes(svc, stored_message(svc, boot))
    with CapturingSMTPServer() as smtp:
        with smtplib.SMTP(smtp.host, smtp.port) as session:
            session.sendmail(MAILBOX, ["bob@example.net"], raw)
        received = smtp.wait_for(1)[0].data
    reader = client.client(boot.agent_key)
    report = reader.post(
        "/v1/verify", content=received, headers={"content-type": "message/rfc822"}
    ).json()
    assert report["verdict"] == "verified", report
    assert list(checks(report)) == [
        "dkim",
        "identity_signature",
        "body_hash",
        "message_id",
        "from_mailbox",
    ]
    assert report["claims"]["agent_name"] == "refund-bot"
    as_json = reader.post(
        "/v1/verify", json={"raw_base64": base64.b64encode(received).decode()}
    ).json()
    assert as_json["verdict"] == "verified"
    assert client.client(None).post("/v1/verify", content=received).status_code == 401

    eml = tmp_path / "message.eml"
    eml.write_bytes(received)
    ok = run_verify(svc, eml)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verdict: VERIFIED" in ok.stdout and "PASS  dkim" in ok.stdout
    eml.write_bytes(received.replace(b"refund is on its way", b"refund is cancelled."))
    bad = run_verify(svc, eml)
    assert bad.returncode == 1 and "verdict: FAILED" in bad.stdout
    assert "FAIL  body_hash" in bad.stdout


def run_verify(svc: Services, path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MULTIMAIL_DATA_DIR": str(svc.settings.data_dir),
        "MULTIMAIL_DATABASE_URL": svc.settings.effective_database_url,
        "MULTIMAIL_DNS_RESOLVER": svc.settings.dns_resolver or "",
        "MULTIMAIL_DOMAIN": svc.settings.domain,
    }
    # The installed `multimail` command, as an operator or a recipient would run it.
    program = Path(sys.executable).with_name("multimail")
    return subprocess.run(
        [str(program), "verify", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def forge_claims(raw: bytes, **changes: Any) -> bytes:
    """Rewrite the token's claims but keep its original signature."""
    head, _, body = raw.partition(b"\r\n\r\n")
    text = head.decode("ascii")
    start = text.index(IDENTITY_HEADER + ":")
    end = text.index("\r\n", start)
    while text[end + 2] in " \t":
        end = text.index("\r\n", end + 2)
    token = token_from_header_value(text[start + len(IDENTITY_HEADER) + 1 : end])
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = f"{header}.{forged_payload}.{signature}"
    new_head = text[:start] + f"{IDENTITY_HEADER}: {identity_header_value(forged)}" + text[end:]
    return new_head.encode("ascii") + b"\r\n\r\n" + body


def other_server_token(svc: Services, row: dict[str, Any], tmp_path: Path, issuer: str) -> str:
    ring = SigningKeyring.load_or_create(tmp_path / "elsewhere")
    claims = IdentityClaims(
        mailbox=MAILBOX,
        operator="Acme",
        oversight_mode="monitored",
        agent_key_id=None,
        agent_key_name=None,
        approval=None,
        body_sha256=draft_body_sha256(draft(row["message_id_header"])),
        message_id=row["message_id_header"],
        issued_at=0,
        issuer=issuer,
    )
    return issue_identity_token(claims, ring)


def test_each_forgery_fails_with_its_reason(
    client: Api, svc: Services, boot: accounts.Bootstrap, tmp_path: Path
) -> None:
    """Forged token, another key, another issuer, edited body, replaced Message-ID, another
    From: each fails verification on exactly the check it breaks (DKIM re-signed each time)."""
    row = stored_message(svc, boot)
    genuine = sent_bytes(svc, row)
    reader = client.client(boot.agent_key)

    def verify(raw: bytes) -> dict[str, tuple[bool, str]]:
        report = reader.post("/v1/verify", content=resign(svc, raw)).json()
        assert report["verdict"] == "failed", report
        failed = {name for name, (passed, _) in checks(report).items() if not passed}
        assert len(failed) == 1 or "identity_signature" in failed, report
        return checks(report)

    forged = verify(forge_claims(genuine, mode="autonomous", approval=None))
    assert forged["identity_signature"] == (
        False,
        "the identity token's signature does not verify (forged or altered)",
    )

    def with_token(token: str) -> bytes:
        header = (IDENTITY_HEADER, identity_header_value(token))
        return build_message(replace(draft(row["message_id_header"]), extra_headers=[header]))

    wrong_key = verify(with_token(other_server_token(svc, row, tmp_path, svc.settings.base_url)))
    assert wrong_key["identity_signature"] == (
        False,
        "the identity token is signed with a key this server does not have",
    )
    elsewhere = other_server_token(svc, row, tmp_path, "https://mail.other.example")
    foreign = verify(with_token(elsewhere))
    assert foreign["identity_signature"][1].startswith(
        "unknown issuer: the token was issued by https://mail.other.example"
    )

    edited = verify(genuine.replace(b"refund is on its way", b"refund was denied!!"))
    assert edited["body_hash"] == (False, "body differs from the one signed")
    assert edited["identity_signature"][0] and edited["message_id"][0]

    replaced = verify(genuine.replace(row["message_id_header"].encode(), b"<other@mm.test>"))
    assert replaced["message_id"] == (False, "Message-ID differs from the one signed")

    spoofed = verify(genuine.replace(b"From: Support Agent <agent@mm.test>", b"From: boss@mm.test"))
    assert spoofed["from_mailbox"][0] is False


def test_dkim_failure_and_missing_signature_are_reported(
    client: Api, svc: Services, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """No DKIM signature, or a key no longer in DNS, fails the DKIM check with a clear reason."""
    row = stored_message(svc, boot)
    raw = sent_bytes(svc, row)
    reader = client.client(boot.agent_key)
    unsigned = raw.split(b"\r\n", 1)[1]
    while unsigned[:1] in (b" ", b"\t"):
        unsigned = unsigned.split(b"\r\n", 1)[1]
    report = reader.post("/v1/verify", content=unsigned).json()
    assert checks(report)["dkim"] == (False, "the message has no DKIM signature")
    dns_server.clear()
    report = reader.post("/v1/verify", content=raw).json()
    assert report["verdict"] == "failed"
    passed, reason = checks(report)["dkim"]
    assert not passed and "does not verify against DNS" in reason and "s=mm1" in reason
    empty = reader.post("/v1/verify", json={"nothing": 1})
    assert empty.status_code == 422


def test_a_token_issued_before_the_html_hash_still_verifies(
    client: Api, svc: Services, boot: accounts.Bootstrap
) -> None:
    """Tokens already in delivered mail bind only the text part (no html_sha256 or
    attachments_sha256): they still verify, and the report says what they cover."""
    raw = sent_bytes(svc, stored_message(svc, boot), old=True)
    report = client.client(boot.agent_key).post("/v1/verify", content=raw).json()
    assert report["verdict"] == "verified", report
    assert "html_sha256" not in report["claims"]
    assert "attachments_sha256" not in report["claims"]
    assert checks(report)["body_hash"] == (True, "body matches (text part only: an older token)")
    new = client.client(boot.agent_key).post(
        "/v1/verify", content=sent_bytes(svc, stored_message(svc, boot))
    )
    assert checks(new.json())["body_hash"] == (
        True,
        "body matches (text and HTML parts and attachments)",
    )


def test_a_signature_by_another_domain_next_to_the_aligned_one_is_ignored(
    client: Api, svc: Services, boot: accounts.Bootstrap, dns_server: LocalDNSServer
) -> None:
    """A forwarder or list adding its own DKIM signature on top does not stop the message
    verifying through the From domain's signature; a signature by the From domain that
    does not cover the identity header is not enough."""
    genuine = sent_bytes(svc, stored_message(svc, boot))
    stranger = generate_rsa_keypair(2048)
    dns_server.add_record("list._domainkey.lists.example", "TXT", dns_txt_value(stranger))
    forwarded = sign_message(
        genuine, domain="lists.example", selector="list", private_pem=stranger.private_pem
    )
    reader = client.client(boot.agent_key)
    report = reader.post("/v1/verify", content=forwarded).json()
    assert report["verdict"] == "verified", report
    assert "d=mm.test" in checks(report)["dkim"][1]

    unsigned = resign(svc, genuine).split(b"\r\n", 1)[1]
    while unsigned[:1] in (b" ", b"\t"):
        unsigned = unsigned.split(b"\r\n", 1)[1]
    key = signing.default_key(svc)
    narrow = sign_message(
        unsigned,
        domain=key.domain,
        selector=key.selector,
        private_pem=key.private_pem,
        headers_to_sign=["from", "subject"],
    )
    passed, reason = checks(reader.post("/v1/verify", content=narrow).json())["dkim"]
    assert not passed and f"does not cover {IDENTITY_HEADER}" in reason
