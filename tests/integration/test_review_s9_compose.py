"""Review S9: what an agent's send becomes on the wire, and the send / schedule API
(SPEC §2 outbound lifecycle, §3, §5.1, §12).

Each of the first tests names a defect a reviewer found (session 9), pinned as a strict xfail
asserting the correct behaviour until it was fixed; the tests after them cover the other
paths to the same defects. Everything runs over the real API and workers, with a capturing
SMTP relay on
loopback as the smarthost (``tests.integration.send_support``); what the relay received is
read with the stdlib ``email`` package.
"""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from email import policy
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from typing import Any

import dkim
import pytest
from sqlalchemy import select

from multimail.errors import InvalidInput
from multimail.ids import isoformat, utcnow
from multimail.services import keys, sending
from multimail.store.tables import messages
from tests.integration.send_support import Stack, send_body, stack
from tests.integration.test_reliability_outbound_audit import _published, _signature_tags

__all__ = ["stack"]  # the fixture, re-exported so pytest finds it here


def _from_display_name_as_rfc2047_reads_it(data: bytes) -> str:
    """The From display name as an RFC 2047 reader shows it: adjacent encoded-words are
    joined and the white space between them is dropped (RFC 2047 §6.2). (The phrase parser
    of ``email.policy.default`` keeps that white space, so it cannot see the defect below;
    ``email.header.decode_header`` follows §6.2.)"""
    field = BytesHeaderParser(policy=policy.compat32).parsebytes(data)["From"]
    unfolded = re.sub(r"\r?\n[ \t]", " ", str(field))
    if "<" not in unfolded:
        return ""
    phrase = unfolded.rsplit("<", 1)[0].strip()
    return str(make_header(decode_header(phrase)))


@pytest.mark.parametrize(
    ("display_name", "subject"),
    [
        # A mailbox's display name longer than 42 UTF-8 octets.
        ("Müller 山田 and de Générale サポート für", "Hello"),
        # An agent's subject ending in a newline (common in model output): the service
        # folds it into a trailing space, which sends it down the same path.
        (None, "Ваша заявка принята в работу специалистом службы поддержки клиентов компании\n"),
    ],
    ids=["display_name", "subject"],
)
def test_non_ascii_display_names_and_subjects_keep_every_space(
    stack: Stack, display_name: str | None, subject: str
) -> None:
    """RFC 2047 §6.2: white space between two adjacent encoded-words is not displayed, so a
    space of the text must be carried inside a word. Recipients otherwise read
    "…サポートfür" for "…サポート für" and "службыподдержки" for "службы поддержки"."""
    fields = {"display_name": display_name} if display_name else {}
    box = stack.mailbox("intl", "autonomous", **fields)
    agent = stack.client(stack.boot.agent_key)
    sent = agent.post(f"/v1/mailboxes/{box['id']}/send", json=send_body(subject=subject))
    assert sent.status_code == 202, sent.text
    row = stack.settled(sent.json()["id"])
    assert row["status"] == "delivered", (row["status"], row["last_error"])
    # The operator's approval-request mails share the relay; whether they went before the
    # decisions made them moot depends on timing. The customer gets exactly one message.
    [got] = [m for m in stack.relay.messages if m.rcpt_tos == ["customer@example.com"]]
    shown_subject = got.as_email()["Subject"]
    raw_fields = BytesHeaderParser(policy=policy.compat32).parsebytes(got.data)
    assert " ".join(shown_subject.split()) == " ".join(subject.split()), (
        f"the Subject reads {shown_subject!r}; on the wire: {raw_fields['Subject']!r}"
    )
    shown_name = _from_display_name_as_rfc2047_reads_it(got.data)
    assert shown_name == (display_name or ""), (
        f"the From name reads {shown_name!r}; on the wire: {raw_fields['From']!r}"
    )


def test_every_reply_to_address_accepted_is_in_the_reply_to_header(stack: Stack) -> None:
    """The send API takes ``reply_to`` as one address or a list (the tools describe it as
    "Where replies should go") and the message view shows both; RFC 5322 §3.6.2 allows an
    address-list in Reply-To. Either every address accepted is on the wire or the request is
    refused; silently dropping the second sends the customer's answers to only one team."""
    box = stack.mailbox("replyto", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    wanted = ["sales@example.com", "ops@example.com"]
    sent = agent.post(f"/v1/mailboxes/{box['id']}/send", json=send_body(reply_to=wanted))
    if sent.status_code != 202:
        assert sent.status_code == 422 and sent.json().get("code"), sent.text
        return
    row = stack.settled(sent.json()["id"])
    assert row["status"] == "delivered", (row["status"], row["last_error"])
    # The operator's approval-request mails share the relay; whether they went before the
    # decisions made them moot depends on timing. The customer gets exactly one message.
    [got] = [m for m in stack.relay.messages if m.rcpt_tos == ["customer@example.com"]]
    header = got.as_email()["Reply-To"]
    assert header is not None
    assert [a.addr_spec for a in header.addresses] == wanted, str(header)


def test_reapproved_message_after_a_schedule_edit_is_released_at_its_new_time(
    stack: Stack,
) -> None:
    """SPEC §2/§5.1: gate_first approves, then waits for send_at; a content edit voids the
    approval and a time edit moves the send. Approved, edited (body and time) and approved
    again, the message must go out at its new time, not sit in ``scheduled`` with no job."""
    box = stack.mailbox("resched", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    reviewer = stack.client(stack.boot.reviewer_key)
    # Margins for a loaded machine: the approvals and the edit must land before first_at.
    first_at = utcnow() + timedelta(seconds=8)
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send", json=send_body(send_at=isoformat(first_at))
    )
    assert sent.status_code == 202 and sent.json()["status"] == "pending_send_approval"
    message_id = sent.json()["id"]
    decide = {"email_id": message_id, "action": "approve", "reviewer": "rita"}
    approved = reviewer.post("/v1/oversight/decide", json=decide)
    assert approved.status_code == 200 and approved.json()["status"] == "scheduled", approved.text

    new_at = utcnow() + timedelta(seconds=12)
    edited = agent.patch(
        f"/v1/mailboxes/{box['id']}/emails/{message_id}/schedule",
        json={"markdown": "Revised offer, valid until Friday.", "send_at": isoformat(new_at)},
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["status"] == "pending_send_approval"  # the edit voided the approval
    again = reviewer.post("/v1/oversight/decide", json=decide)
    assert again.status_code == 200 and again.json()["status"] == "scheduled", again.text

    waited = (new_at - utcnow()).total_seconds() + 20
    row = stack.settled(message_id, within=waited)
    assert row["status"] == "delivered", (
        f"approved for {isoformat(new_at)} but still {row['status']} well after it"
    )
    # The operator's approval-request mails share the relay; whether they went before the
    # decisions made them moot depends on timing. The customer gets exactly one message.
    [got] = [m for m in stack.relay.messages if m.rcpt_tos == ["customer@example.com"]]
    assert "Revised offer" in got.as_email().get_body(("plain",)).get_content()


# A JavaScript agent that cut its text at a UTF-16 index (``body.slice(0, n)``) through an
# emoji: JSON.stringify writes the half as an escape, which json.loads reads as a lone
# surrogate.
_HALF_EMOJI = b"\\ud83d"


def test_a_lone_surrogate_in_the_body_is_a_clear_client_error(stack: Stack) -> None:
    """SPEC §5/§12: bad input always gets a clear error (400/422 with a code), never a 500,
    which tells clients (the Python client among them) to retry a request that can never
    succeed. The subject already turns a lone surrogate into U+FFFD; the body does not."""
    box = stack.mailbox("surrogate", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    response = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        content=b'{"to": "customer@example.com", "subject": "Thanks", "markdown": "Thanks! '
        + _HALF_EMOJI
        + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code in (202, 400, 422), (response.status_code, response.text[:300])
    if response.status_code != 202:
        assert response.json().get("code") not in (None, "internal_error"), response.text


def test_a_send_answered_with_an_error_created_nothing(stack: Stack) -> None:
    """SPEC §12: bad input gets a clear error and never leaves a duplicate. A 500 that says
    "nothing was changed by this request. Retry" over a message that was committed and
    handed to SMTP makes the retry send the customer a second copy; the stored metadata then
    breaks GET of the message and the mailbox's email list (like the NaN metadata the send
    path already refuses)."""
    box = stack.mailbox("surrogatemeta", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    response = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        content=b'{"to": "customer@example.com", "subject": "Thanks", "markdown": "Thanks!",'
        b' "metadata": {"note": "' + _HALF_EMOJI + b'"}}',
        headers={"Content-Type": "application/json"},
    )
    with stack.services.db.read() as conn:
        created = [r.id for r in conn.execute(select(messages.c.id))]
    if created:
        stack.settled(created[0])
    if response.status_code != 202:
        assert not created and not stack.relay.messages, (
            f"answered {response.status_code} {response.text[:120]!r}, yet {created} was "
            f"stored and {len(stack.relay.messages)} message(s) reached the relay"
        )
        assert response.status_code in (400, 422), response.text
    else:
        listed = agent.get(f"/v1/mailboxes/{box['id']}/emails")
        assert listed.status_code == 200, listed.text[:300]


def test_html_given_with_a_text_body_is_not_silently_dropped(stack: Stack) -> None:
    """SPEC §5.1 takes ``markdown`` (or ``text``/``body``/``html``). A caller used to other
    mail APIs sends ``text`` and ``html`` together (two renderings of one message); taking
    the text and discarding the HTML without a word loses its links and formatting. Either
    the HTML is what the HTML part carries, or the request is refused as ambiguous."""
    box = stack.mailbox("both", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={
            "to": "customer@example.com",
            "subject": "Your invoice",
            "text": "Your invoice is ready.",
            "html": '<p>Your invoice is ready: <a href="https://pay.example/inv/42">pay it '
            "here</a>.</p>",
        },
    )
    if sent.status_code != 202:
        assert sent.status_code == 422 and sent.json().get("code"), sent.text
        return
    row = stack.settled(sent.json()["id"])
    assert row["status"] == "delivered", (row["status"], row["last_error"])
    # The operator's approval-request mails share the relay; whether they went before the
    # decisions made them moot depends on timing. The customer gets exactly one message.
    [got] = [m for m in stack.relay.messages if m.rcpt_tos == ["customer@example.com"]]
    html = got.as_email().get_body(("html",)).get_content()
    assert "https://pay.example/inv/42" in html, html


def test_many_reply_to_addresses_and_a_long_name_are_signed_and_verify(stack: Stack) -> None:
    """DKIM covers Reply-To (its h= tag) with the whole address-list, and the encoded-word
    From of a long non-ASCII name, as written, verifies against the published key."""
    box = stack.mailbox(
        "signedreply", "autonomous", display_name="Müller 山田 and de Générale サポート für"
    )
    agent = stack.client(stack.boot.agent_key)
    wanted = ["sales@example.com", "ops@example.com", "billing@example.org"]
    sent = agent.post(f"/v1/mailboxes/{box['id']}/send", json=send_body(reply_to=wanted))
    assert sent.status_code == 202, sent.text
    assert stack.settled(sent.json()["id"])["status"] == "delivered"
    # The operator's approval-request mails share the relay; whether they went before the
    # decisions made them moot depends on timing. The customer gets exactly one message.
    [got] = [m for m in stack.relay.messages if m.rcpt_tos == ["customer@example.com"]]
    assert [a.addr_spec for a in got.as_email()["Reply-To"].addresses] == wanted
    assert dkim.verify(got.data, dnsfunc=_published(stack)), got.data[:800]
    assert "reply-to" in [h.lower() for h in _signature_tags(got)["h"].split(":")]


def _status_becomes(stack: Stack, message_id: str, status: str, within: float) -> None:
    deadline = time.monotonic() + within
    while stack.row(message_id)["status"] != status:
        assert time.monotonic() < deadline, f"{message_id} never became {status}"
        time.sleep(0.05)


def test_a_schedule_first_message_moved_after_its_release_is_sent_at_its_new_time(
    stack: Stack,
) -> None:
    """schedule_first: released at send_at into the queue for approval, its time moved, then
    approved: the first release job ran already under the plain dedupe key, so the approval
    must add a job of its own (SPEC §2) or the message waits in ``scheduled`` for ever."""
    box = stack.mailbox("reschedfirst", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    reviewer = stack.client(stack.boot.reviewer_key)
    first_at = utcnow() + timedelta(seconds=2)
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json=send_body(send_at=isoformat(first_at), gate_timing="schedule_first"),
    )
    assert sent.status_code == 202 and sent.json()["status"] == "scheduled", sent.text
    message_id = sent.json()["id"]
    _status_becomes(stack, message_id, "pending_send_approval", within=15)

    new_at = utcnow() + timedelta(seconds=4)
    moved = agent.patch(
        f"/v1/mailboxes/{box['id']}/emails/{message_id}/schedule",
        json={"send_at": isoformat(new_at)},
    )
    assert moved.status_code == 200, moved.text
    decide = {"email_id": message_id, "action": "approve", "reviewer": "rita"}
    approved = reviewer.post("/v1/oversight/decide", json=decide)
    assert approved.status_code == 200 and approved.json()["status"] == "scheduled", approved.text
    assert stack.row(message_id)["status"] == "scheduled"

    row = stack.settled(message_id, within=(new_at - utcnow()).total_seconds() + 8)
    assert row["status"] == "delivered", f"approved for {isoformat(new_at)}, still {row['status']}"
    # Besides the operator's approval request (from <>), the message went out once.
    assert [m.rcpt_tos for m in stack.relay.messages if m.mail_from] == [["customer@example.com"]]


def _json(document: Any) -> bytes:
    # ensure_ascii (json.dumps's default) writes a lone surrogate as its escape, "\\ud83d",
    # as a JavaScript client's JSON.stringify does.
    return json.dumps(document).encode()


_HALF = "Thanks! \ud83d"


@pytest.mark.parametrize(
    ("route", "method", "raw", "content_type", "where"),
    [
        # The tool-named route reads its body as JSON whatever its type says.
        (
            "/send_email",
            "POST",
            _json(send_body(markdown=_HALF)),
            "application/json",
            "at markdown",
        ),
        ("/send_email", "POST", _json(send_body(markdown=_HALF)), "text/plain", "at markdown"),
        # FastAPI reads a body without a type as JSON.
        ("send", "POST", _json(send_body(subject=_HALF)), None, "at subject"),
        (
            "send",
            "POST",
            _json(send_body(metadata={"crm": [{"case\udc00": 1}]})),
            "application/json; charset=utf-8",
            "in a key of metadata.crm[0]",
        ),
        (
            "send",
            "POST",
            _json(send_body(to=["a@example.com", _HALF])),
            "application/json",
            "at to[1]",
        ),
        # UTF-16 (json.loads reads it), and a surrogate's bytes in UTF-8, which json.loads
        # decodes with "surrogatepass".
        (
            "send",
            "POST",
            _json(send_body(markdown=_HALF)).decode().encode("utf-16"),
            "application/json",
            "at markdown",
        ),
        (
            "send",
            "POST",
            b'{"to": "a@example.com", "markdown": "x\xed\xa0\xbd"}',
            "application/json",
            "at markdown",
        ),
        # A route with FastAPI's own handler (no lean path).
        ("schedule", "PATCH", _json({"markdown": _HALF}), "application/json", "at markdown"),
    ],
    ids=["tool", "tool-text-plain", "untyped", "nested-key", "list", "utf16", "raw-bytes", "patch"],
)
def test_a_lone_surrogate_anywhere_in_a_body_is_refused_on_every_route(
    stack: Stack, route: str, method: str, raw: bytes, content_type: str | None, where: str
) -> None:
    """SPEC §12: a clear 422 naming where the unpaired surrogate is, and nothing written."""
    box = stack.mailbox("halves", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    scheduled = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json=send_body(send_at=isoformat(utcnow() + timedelta(hours=1))),
    )
    assert scheduled.status_code == 202, scheduled.text
    path = {
        "send": f"/v1/mailboxes/{box['id']}/send",
        "schedule": f"/v1/mailboxes/{box['id']}/emails/{scheduled.json()['id']}/schedule",
    }.get(route, route)
    if route == "/send_email":
        raw = _json(json.loads(raw) | {"from": box["address"]})
    headers = {"Content-Type": content_type} if content_type else {}
    response = agent.request(method, path, content=raw, headers=headers)
    assert response.status_code == 422, response.text
    refusal = response.json()
    assert refusal["code"] == "invalid_text", refusal
    assert "unpaired UTF-16 surrogate (\\ud" in refusal["error"], refusal
    assert f"{where}: send valid Unicode" in refusal["error"], refusal
    assert stack.count(messages) == 1
    assert stack.row(scheduled.json()["id"])["markdown"] == "Hi there"


def test_a_surrogate_pair_is_one_character_and_accepted(stack: Stack) -> None:
    """The escapes of a whole emoji ("\\ud83d\\ude00") are one character: sent as written."""
    box = stack.mailbox("pairs", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        content=_json(send_body(markdown="Thanks! \U0001f600", metadata={"mood": "\U0001f600"})),
        headers={"Content-Type": "application/json"},
    )
    assert sent.status_code == 202, sent.text
    assert stack.settled(sent.json()["id"])["status"] == "delivered"
    assert (
        "Thanks! \U0001f600"
        in stack.relay.messages[0].as_email().get_body(("plain",)).get_content()
    )


def test_a_lone_surrogate_in_metadata_is_refused_by_the_service(stack: Stack) -> None:
    """MCP and the CLI call sending.send in-process, past the API's body checks: the service
    refuses metadata that is not valid Unicode itself (422 ``invalid_metadata``)."""
    box = stack.mailbox("servicemeta", "autonomous")
    agent = keys.authenticate(stack.services.db, stack.boot.agent_key)
    request = sending.SendRequest.model_validate(send_body(metadata={"note": [_HALF]}))
    with pytest.raises(InvalidInput) as refused:
        sending.send(stack.services, agent, mailbox_ref=box["id"], request=request)
    assert refused.value.code == "invalid_metadata"
    assert "unpaired UTF-16 surrogate (\\ud83d)" in refused.value.message
    assert stack.count(messages) == 0


def test_a_lone_surrogate_in_the_body_is_refused_by_the_service(stack: Stack) -> None:
    """The same for the body: an in-process caller's half emoji is 422 ``invalid_text``, not
    a message stored that no response or SMTP session can encode."""
    box = stack.mailbox("servicebody", "autonomous")
    agent = keys.authenticate(stack.services.db, stack.boot.agent_key)
    request = sending.SendRequest.model_validate(send_body(markdown=f"Thanks! {_HALF}"))
    with pytest.raises(InvalidInput) as refused:
        sending.send(stack.services, agent, mailbox_ref=box["id"], request=request)
    assert refused.value.code == "invalid_text"
    assert stack.count(messages) == 0


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (
            {"markdown": "Your invoice is ready.", "html": "<p>Your invoice</p>"},
            "'markdown' and 'html'",
        ),
        ({"markdown": "Your invoice is ready.", "text": "Your invoice."}, "'markdown' and 'text'"),
        ({"text": "Your invoice.", "body": "Invoice attached."}, "'text' and 'body'"),
    ],
    ids=["markdown+html", "markdown+text", "text+body"],
)
def test_two_different_bodies_are_refused_as_ambiguous(
    stack: Stack, fields: dict[str, str], named: str
) -> None:
    """SPEC §5.1: ``text`` and ``body`` are names for ``markdown``, and ``html`` is converted
    to it; given two that differ, one would be dropped unseen. The send and the schedule
    edit refuse them alike, naming the fields."""
    box = stack.mailbox("twobodies", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    body = {"to": "customer@example.com", "subject": "Your invoice", **fields}
    sent = agent.post(f"/v1/mailboxes/{box['id']}/send", json=body)
    assert sent.status_code == 422, sent.text
    assert sent.json()["code"] == "ambiguous_body"
    assert named in sent.json()["error"], sent.text
    assert stack.count(messages) == 0

    held = agent.post(f"/v1/mailboxes/{box['id']}/send", json=send_body())
    assert held.status_code == 202, held.text
    edited = agent.patch(
        f"/v1/mailboxes/{box['id']}/emails/{held.json()['id']}/schedule", json=fields
    )
    assert edited.status_code == 422, edited.text
    assert edited.json()["code"] == "ambiguous_body"
    assert stack.row(held.json()["id"])["markdown"] == "Hi there"


def test_the_same_body_under_two_names_is_one_body(stack: Stack) -> None:
    box = stack.mailbox("samebody", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    sent = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json=send_body(markdown="Same words.", text="Same words."),
    )
    assert sent.status_code == 202, sent.text
    assert stack.settled(sent.json()["id"])["status"] == "delivered"
    # The operator's approval-request mails share the relay; whether they went before the
    # decisions made them moot depends on timing. The customer gets exactly one message.
    [got] = [m for m in stack.relay.messages if m.rcpt_tos == ["customer@example.com"]]
    assert "Same words." in got.as_email().get_body(("plain",)).get_content()
