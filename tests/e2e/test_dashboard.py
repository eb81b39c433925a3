"""The dashboard in a real browser (Debian's chromium driven by Playwright) against a live server.

An agent key sends through the API, the operator reviews in the browser, a capturing SMTP
relay receives what was approved. Screenshots of the main pages go to
``test-artifacts/screenshots/`` for people to look at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from multimail.api import app as app_module
from multimail.config import Settings
from multimail.dashboard import mount_dashboard
from multimail.services import accounts, mailboxes, operators
from multimail.services.context import Actor, Services
from multimail.testing import server as server_module
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from tests.integration import relay_support
from tests.integration.relay_support import relayed_services

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
PASSWORD = "correct horse battery staple"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin"),
]

if CHROMIUM.exists():
    from playwright.sync_api import Browser, Page, expect, sync_playwright


@pytest.fixture(autouse=True)
def _dashboard_in_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app as ``multimail serve`` builds it: API plus dashboard (idempotent mount)."""

    def create_app(services: Services) -> Any:
        app = app_module.create_app(services)
        mount_dashboard(app, services)
        return app

    monkeypatch.setattr(server_module, "create_app", create_app)


relay = relay_support.relay


@pytest.fixture
def svc(settings: Settings, relay: CapturingSMTPServer) -> Iterator[Services]:
    with relayed_services(settings, relay) as services:
        yield services


@pytest.fixture
def live(svc: Services) -> Iterator[LiveServer]:
    with LiveServer(svc) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


class Tenant:
    """An account with an operator, a gated mailbox and the agent's key."""

    def __init__(self, services: Services, name: str, email: str) -> None:
        boot = accounts.bootstrap(services.db, account_name=name, operator_email=f"boot-{email}")
        self.account_id: str = boot.account["id"]
        self.agent_key = boot.agent_key
        self.email = email
        operators.create_operator(
            services.db, account_id=self.account_id, email=email, password=PASSWORD
        )
        self.system = Actor(type="system", id=None, name="test", account_id=self.account_id)
        with services.db.write() as conn:
            self.mailbox = mailboxes.create_mailbox(
                conn,
                actor=self.system,
                settings=services.settings,
                address=f"agent-{name.lower()}@mm.test",
                display_name=f"{name} Support",
            )

    def send(self, live: LiveServer, subject: str, markdown: str) -> str:
        with httpx.Client(base_url=live.base_url, timeout=30) as agent:
            response = agent.post(
                f"/v1/mailboxes/{self.mailbox['id']}/send",
                headers={"Authorization": f"Bearer {self.agent_key}"},
                json={"to": ["jane@example.com"], "subject": subject, "markdown": markdown},
            )
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "pending_send_approval"
        return str(response.json()["id"])

    def read(self, live: LiveServer, message_id: str) -> dict[str, Any]:
        with httpx.Client(base_url=live.base_url, timeout=30) as agent:
            response = agent.get(
                f"/v1/mailboxes/{self.mailbox['id']}/emails/{message_id}",
                headers={"Authorization": f"Bearer {self.agent_key}"},
            )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


def sign_in(page: Page, live: LiveServer, email: str) -> None:
    page.goto(f"{live.base_url}/dashboard/login")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/dashboard/queue$"))


def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_operator_reviews_a_live_queue_edits_approves_and_rejects(
    browser: Browser, live: LiveServer, svc: Services, relay: CapturingSMTPServer
) -> None:
    """Drafts appear without a reload; the edited text is what the relay receives; a
    rejection's note reaches the agent; every decision names the signed-in operator."""
    acme = Tenant(svc, "Acme", "ops@acme.test")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, live, acme.email)
    expect(page.locator("#first-steps")).to_contain_text("curl -X POST")
    shoot(page, "01-queue-empty")

    first = acme.send(live, "Your quote", "Hi Jane,\n\nThe price is **$120**. Let me know!")
    card = page.locator(f"article[data-message='{first}']")
    expect(card).to_be_visible(timeout=10_000)  # pushed by server-sent events, no reload
    expect(page.locator("#first-steps")).to_have_count(0)
    expect(page).to_have_title(re.compile(r"^\(1\) Pending"))
    expect(card.locator(".body strong")).to_have_text("$120")
    shoot(page, "02-queue-one-pending")

    second = acme.send(live, "Discount", "Hi Jane, here is 50% off if you sign today!!!")
    expect(page.locator(f"article[data-message='{second}']")).to_be_visible(timeout=10_000)
    expect(page).to_have_title(re.compile(r"^\(2\) Pending"))

    card.locator("summary", has_text="Edit & approve").click()
    card.locator("input[name=subject]").fill("Your quote from Acme")
    card.locator("textarea[name=markdown]").fill(
        "Hi Jane,\n\nThe price is **$110** after our call. Reply any time."
    )
    card.locator("[data-action=preview]").click()
    expect(page.locator("#edit-preview strong")).to_have_text("$110")
    shoot(page, "03-edit-preview")
    page.locator("#edit [data-action=approve-edited]").click()
    expect(page.locator(".notice")).to_contain_text("Approved")
    expect(page.locator("dl.meta")).to_contain_text(f"approve by {acme.email}")
    shoot(page, "04-message-approved")

    received = relay.wait_for(1, timeout=15)[0].as_email()
    assert received["Subject"] == "Your quote from Acme"
    text = received.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "**$110** after our call" in text and "$120" not in text

    page.goto(f"{live.base_url}/dashboard/queue")
    other = page.locator(f"article[data-message='{second}']")
    other.locator("summary", has_text="Reject with a note").click()
    other.locator("textarea[name=note]").fill("No discounts without a manager. Offer a call.")
    other.locator("[data-action=reject]").click()
    expect(page.locator(".notice")).to_contain_text("Rejected")

    seen = acme.read(live, second)
    assert seen["status"] == "rejected"
    assert seen["rejection_note"] == "No discounts without a manager. Offer a call."
    assert seen["decision"]["reviewer"] == acme.email
    assert len(relay.messages) == 1

    for path, name in [
        ("/dashboard/queue", "05-queue-empty-again"),
        ("/dashboard/messages", "06-messages"),
        (f"/dashboard/messages/{first}", "07-message-detail"),
        ("/dashboard/mailboxes", "08-mailboxes"),
        ("/dashboard/keys", "09-keys"),
        ("/dashboard/webhooks", "10-webhooks"),
        ("/dashboard/domains", "11-domains"),
        ("/dashboard/audit", "12-audit"),
        ("/dashboard/sandbox", "13-sandbox"),
        ("/dashboard/usage", "14-usage"),
    ]:
        response = page.goto(f"{live.base_url}{path}")
        assert response is not None and response.status == 200, path
        shoot(page, name)
    page.goto(f"{live.base_url}/dashboard/audit")
    page.click("text=Verify chain")
    expect(page.locator("#verification")).to_contain_text("intact")
    shoot(page, "15-audit-verified")

    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    small = phone.new_page()
    sign_in(small, live, acme.email)
    small.goto(f"{live.base_url}/dashboard/messages/{first}")
    shoot(small, "16-phone-message")
    phone.close()
    context.close()


def test_csrf_less_post_from_the_page_is_refused(
    browser: Browser, live: LiveServer, svc: Services
) -> None:
    """A POST carrying the session cookie but no CSRF token is 403 and decides nothing."""
    acme = Tenant(svc, "Acme", "ops@acme.test")
    message_id = acme.send(live, "Hold me", "Pending until a person decides.")
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, live, acme.email)
    status = page.evaluate(
        """async (url) => (await fetch(url, {method: "POST", credentials: "same-origin",
            headers: {"Content-Type": "application/x-www-form-urlencoded"}, body: ""})).status""",
        f"/dashboard/messages/{message_id}/approve",
    )
    assert status == 403
    assert acme.read(live, message_id)["status"] == "pending_send_approval"
    context.close()


def test_second_accounts_operator_cannot_see_the_first_accounts_messages(
    browser: Browser, live: LiveServer, svc: Services
) -> None:
    """Another account's operator gets 404 for the message and never sees it listed."""
    acme = Tenant(svc, "Acme", "ops@acme.test")
    globex = Tenant(svc, "Globex", "ops@globex.test")
    message_id = acme.send(live, "Acme internal", "Only Acme may see this.")
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, live, globex.email)
    expect(page.locator("body")).not_to_contain_text("Acme internal")
    response = page.goto(f"{live.base_url}/dashboard/messages/{message_id}")
    assert response is not None and response.status == 404
    page.goto(f"{live.base_url}/dashboard/messages")
    expect(page.locator("body")).not_to_contain_text("Acme internal")
    context.close()


def test_operator_edits_a_mailbox_signature_and_pauses_and_resumes_it(
    browser: Browser, live: LiveServer, svc: Services
) -> None:
    """From the mailbox list the operator opens a mailbox, saves a new signature, pauses
    sending and resumes it; the page shows each state and the database agrees."""
    acme = Tenant(svc, "Acme", "ops@acme.test")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, live, acme.email)
    page.goto(f"{live.base_url}/dashboard/mailboxes")
    page.click(f"text={acme.mailbox['address']}")
    expect(page).to_have_url(re.compile(rf"/dashboard/mailboxes/{acme.mailbox['id']}$"))
    shoot(page, "17-mailbox-settings")

    page.fill("#signature", "-- \nJane at Acme\nacme.example")
    page.fill("#send_cap_day", "200")
    page.click("[data-action=save-settings]")
    expect(page.locator(".notice")).to_contain_text("Settings saved")
    expect(page.locator("#signature")).to_have_value("-- \nJane at Acme\nacme.example")
    expect(page.locator("#send_cap_day")).to_have_value("200")

    page.click("[data-action=pause]")
    expect(page.locator(".notice")).to_contain_text("Paused")
    expect(page.locator("#mailbox-switch h2")).to_have_text("Sending is paused")
    shoot(page, "18-mailbox-paused")
    with svc.db.read() as conn:
        box = mailboxes.resolve(conn, acme.system, acme.mailbox["id"])
    assert box["paused"] is True
    assert box["signature"] == "-- \nJane at Acme\nacme.example" and box["send_cap_day"] == 200

    page.click("[data-action=resume]")
    expect(page.locator(".notice")).to_contain_text("Resumed")
    expect(page.locator("#mailbox-switch h2")).to_have_text("Sending is on")
    with svc.db.read() as conn:
        assert mailboxes.resolve(conn, acme.system, acme.mailbox["id"])["paused"] is False

    page.locator("#allowlist input[name=pattern]").fill("*@partner.example")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-action=allow]")
    expect(page.locator(".allowlist")).to_contain_text("*@partner.example")

    acme.send(live, "Batch one", "First of two.")
    acme.send(live, "Batch two", "Second of two.")
    page.goto(f"{live.base_url}/dashboard/queue")
    expect(page.locator("#batch")).to_be_visible()
    page.check("[data-select-all]")
    shoot(page, "19-queue-batch")
    page.click("[data-action=batch-approve]")
    expect(page.locator("#batch-results h2")).to_have_text("Approved 2 of 2")

    page.goto(f"{live.base_url}/dashboard/webhooks")
    page.fill("#wh-url", "https://hooks.example.test/acme")
    page.click("button:has-text('Subscribe')")
    expect(page.locator("#new-secret")).to_contain_text("whsec_")
    page.click("text=Manage")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-action=rotate]")
    expect(page.locator("#new-secret")).to_contain_text("whsec_")
    shoot(page, "20-webhook-rotated")
    page.goto(f"{live.base_url}/dashboard/domains")
    expect(page.locator("#default-dkim-name")).to_contain_text("._domainkey.mm.test")
    shoot(page, "21-domains-default-dkim")

    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    small = phone.new_page()
    sign_in(small, live, acme.email)
    small.goto(f"{live.base_url}/dashboard/mailboxes/{acme.mailbox['id']}")
    shoot(small, "22-phone-mailbox-settings")
    phone.close()
    context.close()
