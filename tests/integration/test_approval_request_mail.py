"""The approval request is written by the worker: the send only records that one is owed."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest

from multimail.domain.linktokens import make_token, new_nonce
from multimail.services import accounts, notify
from multimail.services.context import Services
from multimail.store import jobs
from multimail.testing.smtp import CapturedMessage, CapturingSMTPServer
from tests.conftest import Api
from tests.integration.oversight_support import (
    audit_actions,
    job_rows,
    make_mailbox,
    message_row,
    relay,
    run_operator_mail,
    settings,
)

__all__ = ["relay", "settings"]  # fixtures, re-exported so pytest finds them here

LINK = re.compile(r"\((http://[^)]+/v1/approve/[^)]+)\)")
OPERATOR = "ops@mm.test"


@pytest.fixture
def box(services: Services, boot: accounts.Bootstrap) -> dict[str, Any]:
    return make_mailbox(services, boot.account["id"], oversight_mode="gated_send")


def _gated_send(
    api: Api, boot: accounts.Bootstrap, box: dict[str, Any], markdown: str = "Hi **Bob**"
) -> str:
    response = api.client(boot.agent_key).post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": "bob@example.org", "subject": "Quarterly numbers", "markdown": markdown},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _request_job_ids(services: Services, message_id: str) -> list[str]:
    return [
        str(j["id"])
        for j in job_rows(services, "system_mail")
        if j["payload"].get("kind") == "approval_request"
        and j["payload"].get("message_id") == message_id
    ]


def _request_job(services: Services, message_id: str) -> dict[str, Any]:
    [job_id] = _request_job_ids(services, message_id)
    [job] = [j for j in job_rows(services, "system_mail") if j["id"] == job_id]
    return job


def _edit_body(api: Api, boot: accounts.Bootstrap, message_id: str, markdown: str) -> None:
    response = api.client(boot.agent_key).patch(
        f"/v1/emails/{message_id}/schedule", json={"markdown": markdown}
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "pending_send_approval"


def _text(mail: CapturedMessage) -> str:
    part = mail.as_email().get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def _to_operator(relay: CapturingSMTPServer) -> list[CapturedMessage]:
    return [m for m in relay.messages if m.rcpt_tos == [OPERATOR]]


def _path(link: str) -> str:
    return "/v1/" + link.split("/v1/", 1)[1]


def test_gated_send_queues_a_bare_request_and_the_worker_mails_working_links(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    relay: CapturingSMTPServer,
) -> None:
    """The job a gated send writes names the message and carries no text; the mail the worker
    writes from it has the draft and Approve / Reject links, and the Approve link delivers."""
    message_id = _gated_send(api, boot, box)
    job = _request_job(services, message_id)
    assert job["payload"] == {
        "to": [OPERATOR],
        "kind": "approval_request",
        "account_id": boot.account["id"],
        "message_id": message_id,
    }

    run_operator_mail(services, job["id"])
    [mail] = relay.wait_for(1)
    assert mail.rcpt_tos == [OPERATOR] and mail.mail_from == ""
    parsed = mail.as_email()
    assert parsed["Subject"] == "[MultiMail] Approval needed: Quarterly numbers"
    assert parsed["Message-ID"] == f"<{job['id']}.system@mm.test>"
    text = _text(mail)
    assert "```text\nHi **Bob**\n```" in text and f"(message {message_id})" in text
    approve, reject = LINK.findall(text)
    [sent] = [a for a in audit_actions(services, job["id"]) if a["action"] == "system_mail.sent"]
    # Found from the message too, not only from the job.
    assert json.loads(sent["details"])["message_id"] == message_id

    anon = api.client(None)
    done = anon.post(_path(approve))
    assert done.status_code == 200 and "Approved" in done.text
    assert message_row(services, message_id)["decision"] == "approve"
    assert [m.rcpt_tos for m in relay.wait_for(2)] == [[OPERATOR], ["bob@example.org"]]
    assert anon.post(_path(reject)).status_code == 409


def _cancel(api: Api, boot: accounts.Bootstrap, message_id: str) -> httpx.Response:
    return api.client(boot.agent_key).post(f"/v1/cancel/{message_id}")


def _approve(api: Api, boot: accounts.Bootstrap, message_id: str) -> httpx.Response:
    return api.client(boot.reviewer_key).post(
        "/v1/oversight/decide", json={"email_id": message_id, "action": "approve"}
    )


@pytest.mark.parametrize("decide", [_cancel, _approve], ids=["cancelled", "approved"])
def test_a_message_decided_before_the_worker_runs_gets_no_request(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    relay: CapturingSMTPServer,
    decide: Any,
) -> None:
    """Cancelled or approved before the job runs: the operator gets no mail asking for a
    decision that is already made, and the skip is audited with its reason."""
    message_id = _gated_send(api, boot, box)
    job = _request_job(services, message_id)
    response = decide(api, boot, message_id)
    assert response.status_code == 200, response.text

    run_operator_mail(services, job["id"])
    assert _to_operator(relay) == []
    [skipped] = [
        a for a in audit_actions(services, job["id"]) if a["action"] == "system_mail.skipped"
    ]
    details = json.loads(skipped["details"])
    assert details["reason"] == "the message no longer waits for a decision"
    assert details["message_id"] == message_id and details["to"] == [OPERATOR]
    assert "system_mail.sent" not in [a["action"] for a in audit_actions(services, job["id"])]


def test_no_request_is_written_for_a_message_that_is_gone(services: Services) -> None:
    """A message that no longer exists waits for nothing: no subject, no links."""
    with services.db.read() as conn:
        assert notify.approval_request_mail(conn, services, "msg_doesnotexist") is None


def test_a_request_queued_with_its_text_is_sent_as_it_stands(
    services: Services, boot: accounts.Bootstrap, relay: CapturingSMTPServer
) -> None:
    """A job the previous release wrote carries subject and markdown and names no message:
    the worker sends exactly that text."""
    markdown = "A message is waiting for your decision.\n\n[Approve](http://old.example/a)"
    with services.db.write() as conn:
        job_id = jobs.enqueue(
            conn,
            "system_mail",
            {
                "to": [OPERATOR],
                "subject": "[MultiMail] Approval needed: from the last release",
                "markdown": markdown,
                "account_id": boot.account["id"],
                "kind": "approval_request",
            },
        )
    assert job_id is not None

    run_operator_mail(services, str(job_id))
    [mail] = relay.wait_for(1)
    assert mail.rcpt_tos == [OPERATOR]
    assert mail.as_email()["Subject"] == "[MultiMail] Approval needed: from the last release"
    assert _text(mail).strip() == markdown
    assert "system_mail.sent" in [a["action"] for a in audit_actions(services, str(job_id))]


# --- found in review: edits of a waiting draft ---------------------------------------------


def test_an_edit_before_the_worker_runs_mails_the_operator_one_request(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    relay: CapturingSMTPServer,
) -> None:
    """The agent edits its pending draft before the first request went out: the operator is
    asked once, about the edited text (before 4eef5bc the two mails at least differed: old
    draft, then new; now both show the new draft, so the second says nothing new)."""
    message_id = _gated_send(api, boot, box, "First draft.")
    _edit_body(api, boot, message_id, "Second draft.")
    job_ids = _request_job_ids(services, message_id)
    assert len(job_ids) == 2  # one from the send, one from the edit re-opening approval

    for job_id in job_ids:
        run_operator_mail(services, job_id)

    mails = _to_operator(relay)
    assert all("Second draft." in _text(m) for m in mails)
    assert len(mails) == 1


def test_a_link_from_a_request_showing_the_old_draft_does_not_approve_an_edit(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    relay: CapturingSMTPServer,
) -> None:
    """The operator reads "Old words." in the request, the agent then edits the draft, the
    operator clicks Approve in that mail: the approval must not cover text the operator was
    never shown (the edit queued a new request for that). Pre-existing before 4eef5bc; the
    worker now writing the mail makes the link able to carry the digest of what it shows."""
    message_id = _gated_send(api, boot, box, "Old words.")
    [first_job] = _request_job_ids(services, message_id)
    run_operator_mail(services, first_job)
    [mail] = _to_operator(relay)
    assert "Old words." in _text(mail)
    approve, _reject = LINK.findall(_text(mail))

    _edit_body(api, boot, message_id, "New words.")
    decided = api.client(None).post("/v1/" + approve.split("/v1/", 1)[1])

    assert decided.status_code == 409, decided.text
    assert message_row(services, message_id)["decision"] is None
    assert not [m for m in relay.messages if m.rcpt_tos == ["bob@example.org"]]


def test_a_reject_link_from_an_older_draft_still_rejects(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    relay: CapturingSMTPServer,
) -> None:
    """Only approval is bound to the draft shown: refusing to send is never unsafe."""
    message_id = _gated_send(api, boot, box, "Old words.")
    [first_job] = _request_job_ids(services, message_id)
    run_operator_mail(services, first_job)
    [mail] = _to_operator(relay)
    _approve, reject = LINK.findall(_text(mail))
    _edit_body(api, boot, message_id, "New words.")
    decided = api.client(None).post("/v1/" + reject.split("/v1/", 1)[1])
    assert decided.status_code == 200, decided.text
    assert message_row(services, message_id)["decision"] == "reject"


def test_an_approve_link_minted_before_links_named_their_draft_still_approves(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """Links already in operators' inboxes at the upgrade name the message only."""
    message_id = _gated_send(api, boot, box, "Words.")
    token = make_token(
        notify.secret_key(services),
        purpose=notify.APPROVAL_PURPOSE,
        subject_id=message_id,
        action="approve",
        expires_at=int(time.time()) + 3600,
        nonce=new_nonce(),
    )
    decided = api.client(None).post(f"/v1/approve/{token}")
    assert decided.status_code == 200, decided.text
    assert message_row(services, message_id)["decision"] == "approve"


def _approve_token(services: Services, subject_id: str) -> str:
    return make_token(
        notify.secret_key(services),
        purpose=notify.APPROVAL_PURPOSE,
        subject_id=subject_id,
        action="approve",
        expires_at=int(time.time()) + 3600,
        nonce=new_nonce(),
    )


def test_an_approve_link_names_its_draft_by_the_whole_sha256(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """The agent writes both drafts, so a digest must resist collisions, not only second
    preimages: 64 bits fell to ~2**32 hashes. A 32-character prefix of the right digest (a
    length never minted) is refused, and so is a wrong full digest."""
    message_id = _gated_send(api, boot, box, "Words.")
    digest = notify.draft_digest(message_row(services, message_id))
    assert len(digest) == 64
    for wrong in (digest[:32], "0" * 64):
        refused = api.client(None).post(
            f"/v1/approve/{_approve_token(services, f'{message_id}|{wrong}')}"
        )
        assert refused.status_code == 409, refused.text
    decided = api.client(None).post(
        f"/v1/approve/{_approve_token(services, f'{message_id}|{digest}')}"
    )
    assert decided.status_code == 200, decided.text


def test_an_approve_link_with_the_previous_releases_short_digest_still_approves(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """Links minted before the digest grew (16 characters) live out their 72 hours."""
    message_id = _gated_send(api, boot, box, "Words.")
    short = notify.draft_digest(message_row(services, message_id))[:16]
    decided = api.client(None).post(
        f"/v1/approve/{_approve_token(services, f'{message_id}|{short}')}"
    )
    assert decided.status_code == 200, decided.text
    assert message_row(services, message_id)["decision"] == "approve"
