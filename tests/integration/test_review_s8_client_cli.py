"""Each test pinning a defect here began as a reviewer's strict xfail (session 8), fixed the
same session; the three beside them (two mailboxes refused, the client's reply ``from_``,
clearing auto_bcc) guard the edges of those fixes. The agent surfaces (SPEC §5.2, §9, §10,
§12): the Python client, the tool-named HTTP endpoints and the CLI, against a live server with
workers and a capturing SMTP relay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import typer
from typer.testing import CliRunner

from multimail import MultimailClient, cli_agent
from multimail.config import Settings
from multimail.services import accounts, mailboxes
from multimail.services.context import Actor, Services
from tests.e2e.agent_world import AGENT_ADDRESS, World, live_world


@pytest.fixture
def world(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with live_world(settings, monkeypatch) as w:
        yield w


def _http(world: World, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=world.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def _inbound(world: World) -> str:
    """An email from a customer to the agent's mailbox; returns its message id."""
    raw = (
        "From: Alex <alex@example.com>\r\nTo: " + AGENT_ADDRESS + "\r\nSubject: Cancel?\r\n"
        "Message-ID: <s8-1@example.com>\r\n\r\nHow do I cancel my plan?\r\n"
    ).encode()
    with _http(world, world.boot.admin_key) as admin:
        answer = admin.post(
            "/v1/inbound",
            content=raw,
            params={"mail_from": "alex@example.com", "rcpt_to": AGENT_ADDRESS},
            headers={"Content-Type": "message/rfc822"},
        )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["message_ids"][0])


def test_send_email_tool_accepts_from_and_mailbox_id_of_the_same_mailbox(world: World) -> None:
    """`from` (address) and `mailbox_id` (id) naming one mailbox is a consistent request: the
    tool-named endpoint answers what POST /v1/send answers for the same body (SPEC §5.2)."""
    body = {
        "from": AGENT_ADDRESS,
        "mailbox_id": world.mailbox["id"],
        "to": "ana@example.com",
        "subject": "Welcome",
        "text": "Your contract has been processed.",
    }
    with _http(world, world.boot.agent_key) as agent:
        rest = agent.post("/v1/send", json=body)
        assert rest.status_code == 202, rest.text
        tool = agent.post("/send_email", json=body)
    assert tool.status_code == 202, (
        "POST /send_email must accept what POST /v1/send accepts: 'from' and 'mailbox_id' "
        f"name the same mailbox here; got {tool.status_code} {tool.text}"
    )


def test_send_email_tool_refuses_from_and_mailbox_id_of_two_mailboxes(world: World) -> None:
    """Two different mailboxes stay a refusal, the REST one (``from_mismatch``), and the tool
    answer carries the RateLimit-* headers on success as well."""
    operator = Actor(type="system", id=None, name="test", account_id=world.boot.account["id"])
    with world.services.db.write() as conn:
        other = mailboxes.create_mailbox(
            conn, actor=operator, settings=world.services.settings, address="other@mm.test"
        )
    body = {"from": AGENT_ADDRESS, "mailbox_id": other["id"], "to": "ana@example.com"}
    body |= {"subject": "Welcome", "text": "Hello."}
    with _http(world, world.boot.agent_key) as agent:
        rest = agent.post("/v1/send", json=body)
        tool = agent.post("/send_email", json=body)
        sent = agent.post("/send_email", json=body | {"mailbox_id": world.mailbox["id"]})
    assert (rest.status_code, rest.json()["code"]) == (422, "from_mismatch"), rest.text
    assert (tool.status_code, tool.json()["code"]) == (422, "from_mismatch"), tool.text
    assert sent.status_code == 202, sent.text
    assert "RateLimit-Remaining" in sent.headers, dict(sent.headers)


def test_reply_email_tool_accepts_from_like_the_rest_reply(world: World) -> None:
    """In the tool forms `from` selects the mailbox (SPEC §5.2); the REST reply route takes it,
    so POST /reply_email with the answering mailbox's address queues the reply."""
    incoming = _inbound(world)
    with _http(world, world.boot.agent_key) as agent:
        tool = agent.post(
            "/reply_email",
            json={
                "from": AGENT_ADDRESS,
                "message_id": incoming,
                "body": "You can cancel under Settings > Billing.",
                "oversight_mode": "gated_send",
            },
        )
    assert tool.status_code == 202, (
        "reply_email must accept 'from' (the mailbox answering), as POST "
        f"/v1/emails/{{id}}/reply does; got {tool.status_code} {tool.text}"
    )
    assert tool.json()["status"] == "pending_send_approval"


def test_client_reply_email_takes_from(world: World) -> None:
    """The client's reply_email has ``from_`` like its send_email (one method per tool)."""
    incoming = _inbound(world)
    with MultimailClient(api_key=world.boot.agent_key, base_url=world.base_url) as client:
        reply = client.reply_email(
            from_=AGENT_ADDRESS, message_id=incoming, body="Under Settings > Billing."
        )
    assert reply["status"] == "pending_send_approval"


def test_tool_named_429_carries_the_rate_limit_headers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rate-limited call answers 429 with Retry-After and the RateLimit-* headers (SPEC §12)
    on every surface, the tool-named endpoints included ("same behaviour", SPEC §5.2)."""
    tight = settings.model_copy(update={"rate_limit_per_minute": 2, "rate_limit_burst": 2})
    with live_world(tight, monkeypatch) as world, _http(world, world.boot.agent_key) as agent:
        answers = [
            agent.post(
                "/send_email",
                json={"from": AGENT_ADDRESS, "to": "a@example.com", "subject": "s", "body": "b"},
            )
            for _ in range(4)
        ]
        limited = answers[-1]
        assert limited.status_code == 429, [a.status_code for a in answers]
        assert int(limited.headers["Retry-After"]) >= 1
        rest = agent.post(
            "/v1/send",
            json={"from": AGENT_ADDRESS, "to": "a@example.com", "subject": "s", "body": "b"},
        )
        assert rest.status_code == 429 and "RateLimit-Limit" in rest.headers
    missing = [
        name
        for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
        if name not in limited.headers
    ]
    assert not missing, (
        f"POST /send_email answered 429 without {missing}; POST /v1/send sends them "
        f"({dict(rest.headers)})"
    )


def test_client_wait_for_email_may_wait_longer_than_the_http_timeout(world: World) -> None:
    """`wait_for_email(timeout=31)` on a client with default settings returns the (empty) answer
    after 31 s; the long poll is the tool's purpose and its timeout may be up to 120 s."""
    client = MultimailClient(api_key=world.boot.agent_key, base_url=world.base_url, max_retries=0)
    try:
        waited = client.wait_for_email(mailbox_id=AGENT_ADDRESS, timeout=31)
    except Exception as exc:  # any failure is the defect
        pytest.fail(f"wait_for_email(timeout=31) raised {type(exc).__name__}: {exc}")
    finally:
        client.close()
    assert waited["emails"] == []


def test_cli_review_walks_the_whole_pending_queue(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review loop goes over the pending queue (SPEC §10), not its first page: with 51
    drafts waiting, rejecting each one leaves nothing pending."""
    agent = MultimailClient(api_key=world.boot.agent_key, base_url=world.base_url)
    for i in range(51):
        agent.send_email(to=f"c{i}@example.com", subject=f"Draft {i}", body="draft")
    monkeypatch.setenv("MULTIMAIL_API_URL", world.base_url)
    monkeypatch.setenv("MULTIMAIL_API_KEY", world.boot.reviewer_key)
    app = typer.Typer()
    cli_agent.register(app)
    result = CliRunner().invoke(app, ["review", "--reviewer", "ops"], input="r\nnot now\n" * 51)
    assert result.exit_code == 0, result.output
    left = agent.list_pending(mailbox_id=AGENT_ADDRESS)
    agent.close()
    assert left["pending_count"] == 0, (
        f"`multimail review` ended with {left['pending_count']} draft(s) still pending and "
        "never shown: it reviews only the first page of the queue"
    )


def test_cli_review_survives_an_abandoned_edit(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quitting the editor with an error (vim's `:cq`, the usual way to abandon an edit) decides
    nothing for that draft, says so, and the loop goes on to the next draft."""
    agent = MultimailClient(api_key=world.boot.agent_key, base_url=world.base_url)
    for i in range(2):
        agent.send_email(to=f"c{i}@example.com", subject=f"Draft {i}", body="draft")
    monkeypatch.setenv("MULTIMAIL_API_URL", world.base_url)
    monkeypatch.setenv("MULTIMAIL_API_KEY", world.boot.reviewer_key)
    monkeypatch.setenv("EDITOR", "false")  # an editor that exits with status 1
    monkeypatch.delenv("VISUAL", raising=False)
    app = typer.Typer()
    cli_agent.register(app)
    result = CliRunner().invoke(app, ["review"], input="e\nr\nnot now\n")
    left = agent.list_pending(mailbox_id=AGENT_ADDRESS)["pending_count"]
    agent.close()
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"the review loop crashed on a failed editor: {result.exception!r}\n{result.output}"
    )
    assert left == 1, f"the second draft should have been rejected; {left} still pending"


def _local_cli(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIMAIL_")}
    env.update(
        MULTIMAIL_DATA_DIR=str(services.settings.data_dir),
        MULTIMAIL_DATABASE_URL=services.settings.effective_database_url,
        MULTIMAIL_DOMAIN=services.settings.domain,
    )
    return subprocess.run(
        [sys.executable, "-m", "multimail", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_mailbox_configure_sets_auto_bcc(services: Services, boot: accounts.Bootstrap) -> None:
    """The operator at the CLI configures what `configure` covers, auto_bcc included (an archive
    copy of every message is a common compliance setting)."""
    created = _local_cli(services, "mailbox", "create", "help@mm.test")
    assert created.returncode == 0, created.stderr
    configured = _local_cli(
        services,
        "mailbox",
        "configure",
        "help@mm.test",
        "--auto-bcc",
        "archive@example.com",
        "--json",
    )
    assert configured.returncode == 0, (
        f"`mailbox configure --auto-bcc` failed ({configured.returncode}): {configured.stderr}"
    )
    assert json.loads(configured.stdout)["auto_bcc"] == ["archive@example.com"]


def test_cli_mailbox_configure_clears_auto_bcc(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """--no-auto-bcc empties the list; giving it with --auto-bcc is a usage error."""
    assert _local_cli(services, "mailbox", "create", "help@mm.test").returncode == 0
    set_ = _local_cli(services, "mailbox", "configure", "help@mm.test", "--auto-bcc", "a@x.test")
    assert set_.returncode == 0, set_.stderr
    both = _local_cli(
        services, "mailbox", "configure", "help@mm.test", "--auto-bcc", "b@x.test", "--no-auto-bcc"
    )
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
    cleared = _local_cli(
        services, "mailbox", "configure", "help@mm.test", "--no-auto-bcc", "--json"
    )
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cleared.stdout)["auto_bcc"] == []
