"""Security review of the outbound surface: defects found, each pinned by one failing test.

Both defects are fixed (the audit log honours ``mailbox_ids``; a test key decides only test
messages); the tests stay as regressions.
"""

from __future__ import annotations

from typing import Any

from multimail.services import accounts, keys
from multimail.services.context import SYSTEM, Services
from multimail.testing.smtp import CapturingSMTPServer
from tests.conftest import Api
from tests.integration.oversight_support import (
    key_id,
    make_mailbox,
    make_message,
    message_row,
    relay,
    settings,
)

__all__ = ["relay", "settings"]  # fixtures, re-exported so pytest finds them here

OTHER_SUBJECT = "OTHER-MAILBOX-ONLY-5e1d"


def _key(services: Services, boot: accounts.Bootstrap, **fields: Any) -> str:
    with services.db.write() as conn:
        created = keys.create_key(conn, actor=SYSTEM, account_id=boot.account["id"], **fields)
    return created.raw_key


def test_mailbox_limited_key_cannot_read_other_mailboxes_audit_entries(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    """A key limited to mailbox X gets 404 for mailbox Y everywhere else (mailboxes, emails,
    threads, pending); the audit log must not hand it Y's entries either."""
    mine = make_mailbox(services, boot.account["id"], address="desk-x@mm.test")
    other = make_mailbox(services, boot.account["id"], address="desk-y@mm.test")
    agent = key_id(services, "agent", boot.account["id"])
    # Y's draft, sent through the API so the send path writes its audit entry.
    sent = api.client(boot.agent_key).post(
        f"/v1/mailboxes/{other['id']}/send",
        json={"to": ["bob@example.org"], "subject": OTHER_SUBJECT, "markdown": "for Y only"},
    )
    assert sent.status_code == 202, sent.text
    make_message(services, other, subject=OTHER_SUBJECT, created_by_key_id=agent)
    limited = api.client(
        _key(services, boot, name="desk-x agent", scopes=["send", "read"], mailbox_ids=[mine["id"]])
    )
    # The restriction holds on the message routes ...
    assert limited.get(f"/v1/mailboxes/{other['id']}").status_code == 404
    assert limited.get(f"/v1/emails/{sent.json()['id']}").status_code == 404

    # ... but not on the audit log, neither the whole page nor filtered by Y.
    page = limited.get("/v1/audit-log", params={"limit": 1000})
    filtered = limited.get("/v1/audit-log", params={"mailbox": other["id"]})
    tool = limited.post("/get_audit_log", json={"mailbox_id": other["id"]})
    leaks = {
        "page": [e["action"] for e in page.json()["entries"] if e["mailbox_id"] == other["id"]],
        "page_subject": OTHER_SUBJECT in page.text,
        "filtered": filtered.status_code,
        "tool": tool.status_code,
    }
    assert leaks == {"page": [], "page_subject": False, "filtered": 404, "tool": 404}, leaks


def test_test_mode_reviewer_key_cannot_release_live_mail(
    api: Api, services: Services, boot: accounts.Bootstrap, relay: CapturingSMTPServer
) -> None:
    """A test key never hands mail to SMTP (SPEC §1). A sandbox reviewer key (what an
    integration under development holds) deciding a live, gated draft would do just that."""
    box = make_mailbox(services, boot.account["id"], address="live-desk@mm.test")
    agent = key_id(services, "agent", boot.account["id"])
    draft = make_message(services, box, created_by_key_id=agent)
    sandbox_reviewer = _key(
        services, boot, name="sandbox reviewer", scopes=["oversight", "read"], mode="test"
    )
    assert sandbox_reviewer.startswith("mm_test_")
    answer = api.client(sandbox_reviewer).post(
        "/v1/oversight/decide", json={"email_id": draft["id"], "action": "approve"}
    )
    handed = relay.messages
    status = message_row(services, draft["id"])["status"]
    outcome = {"http": answer.status_code, "status": status, "smtp": len(handed)}
    assert answer.status_code in (403, 404), outcome
    assert status == "pending_send_approval" and not handed, outcome
