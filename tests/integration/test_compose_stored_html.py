"""A reviewer's edit is what is sent, HTML part included, when the message is built from the
HTML stored with it (``OutboundDraft.body_html``) rather than rendered at delivery."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from multimail.config import Settings
from multimail.mail.compose import OutboundDraft, compose_message, draft_body_sha256
from multimail.mail.identity import token_from_header_value, verify_identity_token
from multimail.mail.markdown import render_markdown
from multimail.runtime import build_services
from multimail.services import accounts, identity
from multimail.services.context import Services
from multimail.store.tables import messages
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers.runner import run_workers

ORIGINAL = "Draft numbers: **12%** growth."
EDITED = "Hi Bob,\n\n*Final* figures: 9% growth."


@pytest.fixture
def world(settings: Settings) -> Iterator[tuple[Services, LiveServer, CapturingSMTPServer]]:
    with CapturingSMTPServer() as relay:
        svc = build_services(
            settings.model_copy(update={"smtp_url": SecretStr(f"smtp://127.0.0.1:{relay.port}")}),
            run_migrations=False,
        )
        with LiveServer(svc, components=[run_workers]) as server:
            yield svc, server, relay
        svc.db.dispose()


def _parts(raw: bytes) -> tuple[str, str]:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    html = parsed.get_body(("html",))
    text = parsed.get_body(("plain",))
    assert html is not None and text is not None
    return str(html.get_content()), str(text.get_content())


def test_approve_with_edit_sends_the_edit_in_both_parts(
    world: tuple[Services, LiveServer, CapturingSMTPServer], boot: accounts.Bootstrap
) -> None:
    """Oversight stores the edit's markdown and its HTML together; the delivered message
    carries the edit in the text and the HTML part, never the agent's draft, and building
    from the stored HTML gives the same HTML part and body hash as what was delivered."""
    svc, server, relay = world
    base = server.base_url
    admin = {"Authorization": f"Bearer {boot.admin_key}"}
    httpx.post(f"{base}/v1/mailboxes", headers=admin, json={"address": "help@mm.test"})
    sent = httpx.post(
        f"{base}/v1/mailboxes/help@mm.test/send",
        headers={"Authorization": f"Bearer {boot.agent_key}"},
        json={"to": "jane@example.com", "subject": "Q3", "markdown": ORIGINAL},
    ).json()
    assert sent["status"] == "pending_send_approval"
    decided = httpx.post(
        f"{base}/v1/oversight/decide",
        headers={"Authorization": f"Bearer {boot.reviewer_key}"},
        json={
            "email_id": sent["id"],
            "action": "approve",
            "reviewer": "dana@acme.example",
            "revised_body": EDITED,
        },
    )
    assert decided.status_code == 200, decided.text

    with svc.db.read() as conn:
        row = conn.execute(select(messages).where(messages.c.id == sent["id"])).mappings().one()
    assert row["markdown"] == EDITED
    assert row["html"] == render_markdown(EDITED).html

    deadline = time.monotonic() + 15
    mine = []
    while time.monotonic() < deadline and not mine:
        mine = [m for m in relay.messages if m.mail_from == "help@mm.test"]
        time.sleep(0.05)
    assert mine, "the approved message was not delivered"
    raw = mine[0].data
    html, text = _parts(raw)
    assert "<em>Final</em> figures: 9% growth." in html and "9% growth." in text
    assert "12%" not in html and "12%" not in text

    # What the worker builds from the stored row (its markdown and its HTML).
    draft = OutboundDraft(
        from_address="help@mm.test",
        from_name=None,
        to=["jane@example.com"],
        cc=[],
        reply_to=None,
        subject="Q3",
        markdown=row["markdown"],
        message_id="<stored@mm.test>",
        date=datetime.now(UTC),
        body_html=row["html"],
    )
    built_html, built_text = _parts(compose_message(draft).raw)
    assert built_html == html and built_text == text
    assert draft_body_sha256(draft) == draft_body_sha256(replace(draft, body_html=None))
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    claims = verify_identity_token(
        token_from_header_value(str(parsed["X-MultiMail-Identity"])), identity.keyring(svc)
    )
    assert claims.body_sha256 == draft_body_sha256(draft)
