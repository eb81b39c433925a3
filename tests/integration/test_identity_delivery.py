"""Every delivered message carries X-MultiMail-Identity, covered by DKIM, and verifies."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import Iterator

import httpx
import pytest
from pydantic import SecretStr

from multimail.config import Settings
from multimail.mail.identity import token_from_header_value, verify_identity_token
from multimail.runtime import build_services
from multimail.services import accounts, identity
from multimail.services.context import Services
from multimail.testing.dns import LocalDNSServer
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers.runner import run_workers
from multimail.workers.signing import default_dkim_record


@pytest.fixture
def world(settings: Settings) -> Iterator[tuple[Services, LiveServer, CapturingSMTPServer]]:
    with CapturingSMTPServer() as relay, LocalDNSServer() as dns_server:
        svc = build_services(
            settings.model_copy(
                update={
                    "smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}"),
                    "dns_resolver": dns_server.address,
                }
            ),
            run_migrations=False,
        )
        name, value = default_dkim_record(svc)
        dns_server.add_record(name, "TXT", value)
        with LiveServer(svc, components=[run_workers]) as server:
            yield svc, server, relay
        svc.db.dispose()


def test_a_delivered_gated_message_proves_who_wrote_and_who_approved_it(
    world: tuple[Services, LiveServer, CapturingSMTPServer], boot: accounts.Bootstrap
) -> None:
    """The relay receives the identity header (mailbox, mode, agent key, reviewer, body hash,
    Message-ID), DKIM signs it, and POST /v1/verify says verified; an edited copy fails."""
    svc, server, relay = world
    headers = {"Authorization": f"Bearer {boot.admin_key}"}
    base = server.base_url
    box = httpx.post(f"{base}/v1/mailboxes", headers=headers, json={"address": "help@mm.test"})
    sent = httpx.post(
        f"{base}/v1/mailboxes/help@mm.test/send",
        headers={"Authorization": f"Bearer {boot.agent_key}"},
        json={
            "to": "jane@example.com",
            "subject": "Refund",
            "markdown": "Your refund is on its way.",
        },
    ).json()
    assert box.status_code == 201 and sent["status"] == "pending_send_approval"
    httpx.post(
        f"{base}/v1/oversight/decide",
        headers={"Authorization": f"Bearer {boot.reviewer_key}"},
        json={"email_id": sent["id"], "action": "approve", "reviewer": "dana@acme.example"},
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        mine = [m for m in relay.messages if m.mail_from == "help@mm.test"]
        if mine:
            break
        time.sleep(0.05)
    raw = mine[0].data
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert "x-multimail-identity" in str(parsed["DKIM-Signature"]).lower()
    claims = verify_identity_token(
        token_from_header_value(str(parsed["X-MultiMail-Identity"])), identity.keyring(svc)
    )
    assert claims.mailbox == "help@mm.test"
    assert claims.oversight_mode == "gated_send"
    assert claims.agent_key_name == "agent"
    assert claims.approval is not None and claims.approval.reviewer == "dana@acme.example"
    assert claims.message_id == str(parsed["Message-ID"])

    verdict = httpx.post(
        f"{base}/v1/verify",
        headers={"Authorization": f"Bearer {boot.agent_key}", "content-type": "message/rfc822"},
        content=raw,
    ).json()
    assert verdict["verdict"] == "verified", verdict
    tampered = raw.replace(b"on its way", b"cancelled")
    bad = httpx.post(
        f"{base}/v1/verify",
        headers={"Authorization": f"Bearer {boot.agent_key}", "content-type": "message/rfc822"},
        content=tampered,
    ).json()
    assert bad["verdict"] == "failed"
    failed = {c["name"] for c in bad["checks"] if not c["passed"]}
    assert {"dkim", "body_hash"} <= failed

    # read_email re-verifies what was sent (SPEC §5.2: dkim_verified, decision.reviewer).
    read = httpx.get(
        f"{base}/read_email",
        params={"message_id": sent["id"]},
        headers={"Authorization": f"Bearer {boot.agent_key}"},
    ).json()
    assert read["dkim_verified"] is True
    assert read["decision"]["reviewer"] == "dana@acme.example"
    assert read["delivered_at"]
