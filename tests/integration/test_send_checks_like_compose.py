"""The send path checks what it accepts with the composer's own rules, and idempotency keys
answer with the message as it is now, per mode (regressions beside the review's tests in
test_send_contract). Real API, real workers, a capturing relay on loopback."""

from __future__ import annotations

import base64
import time
from datetime import timedelta

from sqlalchemy import select, update

from multimail.ids import isoformat, utcnow
from multimail.services import keys
from multimail.services.context import Actor
from multimail.services.sending import _stored_key
from multimail.store.tables import attachments, idempotency_keys, messages
from tests.integration.send_support import Stack, attachment_names, send_body, stack

__all__ = ["stack"]  # the fixture, re-exported so pytest finds it here

ENCODED_CRLF = "=?utf-8?q?x=0D=0ABcc=3A_thief=40evil.example?=@example.com"


def _test_key(stack: Stack) -> str:
    operator = Actor(type="system", id=None, name="operator", account_id=stack.boot.account["id"])
    with stack.services.db.write() as conn:
        return keys.create_key(
            conn,
            actor=operator,
            account_id=stack.boot.account["id"],
            name="sandbox-agent",
            scopes=["send", "read"],
            mode="test",
        ).raw_key


def test_an_encoded_word_address_is_refused_in_every_address_field(stack: Stack) -> None:
    """cc, bcc and reply_to take the same check as to: 422 invalid_address, nothing stored."""
    box = stack.mailbox("fields", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    for field in ("cc", "bcc", "reply_to"):
        sent = agent.post(
            f"/v1/mailboxes/{box['id']}/send", json=send_body(**{field: ENCODED_CRLF})
        )
        assert sent.status_code == 422, sent.text
        assert sent.json()["code"] == "invalid_address" and sent.json()["field"] == field
    # One that decodes to another address (no line break) is refused too: the header would
    # name someone else than the envelope.
    other = agent.post(
        f"/v1/mailboxes/{box['id']}/send", json=send_body(to="=?utf-8?q?bob?=@example.com")
    )
    assert other.status_code == 422 and other.json()["code"] == "invalid_address", other.text
    assert stack.count(messages) == 0


def test_a_schedule_edit_refuses_a_recipient_the_composer_would_refuse(stack: Stack) -> None:
    """PATCH …/schedule takes recipients too: the same check, and the draft is unchanged."""
    box = stack.mailbox("edit", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    sent = agent.post(f"/v1/mailboxes/{box['id']}/send", json=send_body())
    assert sent.status_code == 202, sent.text
    edited = agent.patch(
        f"/v1/mailboxes/{box['id']}/emails/{sent.json()['id']}/schedule",
        json={"to": ENCODED_CRLF},
    )
    assert edited.status_code == 422 and edited.json()["code"] == "invalid_address", edited.text
    assert stack.row(sent.json()["id"])["to"] == ["customer@example.com"]


def test_an_encoded_word_attachment_name_is_stored_and_sent_as_shown(stack: Stack) -> None:
    """The name kept (shown to the reviewer, scanned, sent) is the one mail programs show."""
    box = stack.mailbox("resume", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    attachment = {
        "filename": "=?utf-8?q?r=C3=A9sum=C3=A9.pdf?=",
        "content_base64": base64.b64encode(b"%PDF-1.4\n").decode(),
    }
    sent = agent.post(f"/v1/mailboxes/{box['id']}/send", json=send_body(attachments=[attachment]))
    assert sent.status_code == 202, sent.text
    row = stack.settled(sent.json()["id"])
    assert row["status"] == "delivered", (row["status"], row["last_error"])
    with stack.services.db.read() as conn:
        stored = conn.execute(select(attachments.c.filename, attachments.c.content_type)).one()
    assert tuple(stored) == ("résumé.pdf", "application/pdf")
    assert attachment_names(stack.relay.messages) == ["résumé.pdf"]


def test_a_second_name_in_the_content_type_is_not_sent(stack: Stack) -> None:
    """``name=`` in a Content-Type is a second filename some readers show (and the scan
    does not judge): it is dropped; the other parameters are kept."""
    box = stack.mailbox("named", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    attachment = {
        "filename": "notes.txt",
        "content_base64": base64.b64encode(b"hello\n").decode(),
        "content_type": 'Text/Plain; name="run.vbs"; charset="UTF-8"',
    }
    sent = agent.post(f"/v1/mailboxes/{box['id']}/send", json=send_body(attachments=[attachment]))
    assert sent.status_code == 202, sent.text
    assert stack.settled(sent.json()["id"])["status"] == "delivered"
    with stack.services.db.read() as conn:
        assert conn.execute(select(attachments.c.content_type)).scalar_one() == (
            "text/plain; charset=UTF-8"
        )
    [got] = stack.relay.messages
    [part] = got.as_email().iter_attachments()
    assert part.get_param("name") is None and part.get_filename() == "notes.txt"
    assert part.get_content_charset() == "utf-8"


def test_a_retry_with_another_body_after_send_at_passed_is_refused(stack: Stack) -> None:
    """Only the same request replays: another one under the key, now invalid, is refused for
    what is wrong with it, and nothing new is stored."""
    box = stack.mailbox("later", "gated_send")
    agent = stack.client(stack.boot.agent_key)
    at = isoformat(utcnow() + timedelta(seconds=1))
    first = agent.post(
        f"/v1/mailboxes/{box['id']}/send", json=send_body(idempotency_key="c-1", send_at=at)
    )
    assert first.status_code == 202, first.text
    time.sleep(1.3)
    other = agent.post(
        f"/v1/mailboxes/{box['id']}/send",
        json=send_body(idempotency_key="c-1", send_at=at, subject="Changed"),
    )
    assert other.status_code == 422 and other.json()["code"] == "send_at_in_past", other.text
    assert stack.count(messages) == 1


def test_sandbox_and_live_keys_each_replay_their_own_message(stack: Stack) -> None:
    """A test key's retry replays its captured message, a live key's its live one, with the
    same idempotency_key (255 characters: the test key space fits the column)."""
    box = stack.mailbox("modes", "autonomous")
    sandbox, live = stack.client(_test_key(stack)), stack.client(stack.boot.agent_key)
    body = send_body(idempotency_key="k" * 255)
    answers = []
    for client in (sandbox, live, sandbox, live):
        answers.append(client.post(f"/v1/mailboxes/{box['id']}/send", json=body))
    assert [a.status_code for a in answers] == [202, 202, 200, 200], [a.text for a in answers]
    rehearsal, real, rehearsal_again, real_again = (a.json() for a in answers)
    assert rehearsal["test"] is True and real["test"] is False
    assert rehearsal_again["id"] == rehearsal["id"] and rehearsal_again["test"] is True
    assert real_again["id"] == real["id"] and real_again["test"] is False
    assert stack.count(messages) == 2


def test_a_live_send_takes_over_a_key_a_sandbox_send_stored_before(stack: Stack) -> None:
    """Rows written before test keys had their own key space hold the plain key: a live
    send with it is not answered by that test message; it sends, and owns the key."""
    box = stack.mailbox("legacy", "autonomous")
    body = send_body(idempotency_key="opp-0099")
    rehearsal = stack.client(_test_key(stack)).post(f"/v1/mailboxes/{box['id']}/send", json=body)
    assert rehearsal.status_code == 202, rehearsal.text
    with stack.services.db.write() as conn:  # the row as the release before wrote it
        conn.execute(
            update(idempotency_keys)
            .where(idempotency_keys.c.key == _stored_key("opp-0099", test_mode=True))
            .values(key="opp-0099")
        )
    live = stack.client(stack.boot.agent_key)
    sent = live.post(f"/v1/mailboxes/{box['id']}/send", json=body)
    assert sent.status_code == 202 and sent.json()["test"] is False, sent.text
    again = live.post(f"/v1/mailboxes/{box['id']}/send", json=body)
    assert again.status_code == 200 and again.json()["id"] == sent.json()["id"], again.text
    assert stack.settled(sent.json()["id"])["status"] == "delivered"


def test_a_replay_after_delivery_says_delivered(stack: Stack) -> None:
    """The replay is the message as it is now, in the send response's own shape."""
    box = stack.mailbox("done", "autonomous")
    agent = stack.client(stack.boot.agent_key)
    body = send_body(idempotency_key="d-1")
    first = agent.post(f"/v1/mailboxes/{box['id']}/send", json=body)
    assert first.status_code == 202 and first.json()["status"] == "queued", first.text
    assert stack.settled(first.json()["id"])["status"] == "delivered"
    again = agent.post(f"/v1/mailboxes/{box['id']}/send", json=body)
    assert again.status_code == 200, again.text
    assert again.json().keys() == first.json().keys()
    assert again.json() == first.json() | {"status": "delivered", "idempotent": True}
