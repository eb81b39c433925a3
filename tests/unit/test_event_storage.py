"""Events keep a message's view once (no copies) and give back the very payload receivers get.

The stored form is what the events table holds; ``expanded_payload`` is what the webhook
dispatcher signs and posts. Exactness is checked on the JSON text (key order included), as
that is what a receiver sees and signs over.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.services import events
from multimail.services.messages import compact_view, expand_view, view

_text = st.text(max_size=40)
_maybe = st.none() | _text
_addresses = st.lists(st.emails(), max_size=3)
_json_leaf = st.none() | st.booleans() | st.integers(-5, 5) | _text
_metadata = st.dictionaries(st.text(max_size=8), _json_leaf, max_size=3)


@st.composite
def message_rows(draw: st.DrawFn) -> dict[str, Any]:
    created = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=draw(st.integers(0, 10**6)))
    markdown = draw(_maybe)
    decision = draw(st.sampled_from([None, "approve", "reject"]))
    return {
        "id": draw(st.sampled_from(["msg_01", "msg_02"])),
        "mailbox_id": "mbx_01",
        "thread_id": draw(st.none() | st.just("thr_01")),
        "direction": draw(st.sampled_from(["outbound", "inbound"])),
        "status": draw(st.sampled_from(["queued", "delivered", "pending_approval", "received"])),
        "test": draw(st.booleans()),
        "from_address": draw(st.none() | st.emails()),
        "from_name": draw(_maybe),
        "to": draw(_addresses),
        "cc": draw(_addresses),
        "bcc": draw(_addresses),
        "subject": draw(_maybe),
        "markdown": markdown,
        # Usually the text part is the markdown itself; sometimes it differs, or is absent.
        "text": draw(st.sampled_from([markdown, None]) | _maybe),
        "html": draw(_maybe),
        "quoted_text": draw(_maybe),
        "metadata": draw(_metadata),
        "decision": decision,
        "reviewer": "ops" if decision else None,
        "decision_note": draw(_maybe) if decision else None,
        "decided_at": created if decision else None,
        "original_markdown": draw(st.none() | _text),
        "original_subject": None,
        "created_at": created,
        "updated_at": created,
        "attempts": draw(st.integers(0, 3)),
        "spam_reasons": [],
    }


def _text_of(value: Any) -> str:
    return json.dumps(value)


@settings(max_examples=300)
@given(message_rows())
def test_a_view_comes_back_exactly_from_its_stored_form(row: dict[str, Any]) -> None:
    shown = view(row, tags={"team": "ops"})
    stored = compact_view(shown)
    assert _text_of(expand_view(stored)) == _text_of(shown)
    assert len(_text_of(stored)) <= len(_text_of(shown))


@settings(max_examples=300)
@given(message_rows(), st.sampled_from(events.CANONICAL), st.none() | _metadata)
def test_a_payload_comes_back_exactly_from_its_stored_form(
    row: dict[str, Any], event_type: str, extra: dict[str, Any] | None
) -> None:
    built = events.payload_for(
        event_id="evt_01",
        event_type=event_type,
        created_at="2026-01-01T00:00:00Z",
        mailbox_id="mbx_01",
        message=view(row),
        extra=extra,
    )
    stored = events.stored_payload(built)
    assert _text_of(events.expanded_payload(stored)) == _text_of(built)
    # What is stored must survive the JSON column: expand what a reader gets back.
    assert _text_of(events.expanded_payload(json.loads(_text_of(stored)))) == _text_of(built)


@settings(max_examples=300)
@given(message_rows(), st.sampled_from(events.CANONICAL), st.none() | st.just("mbx_01"))
def test_stored_text_is_the_text_of_the_stored_payload(
    row: dict[str, Any], event_type: str, mailbox_id: str | None
) -> None:
    """The delivery worker writes its events from one encoding of each message's view:
    the very text ``events.emit`` would store for the same event."""
    shown = view(row, tags={"team": "ops"})
    fields: dict[str, Any] = {
        "event_id": "evt_01",
        "event_type": event_type,
        "created_at": "2026-01-01T00:00:00Z",
        "mailbox_id": mailbox_id,
    }
    built = events.payload_for(**fields, message=shown)
    text = events.stored_text(**fields, compact_message_text=json.dumps(compact_view(shown)))
    assert text == _text_of(events.stored_payload(built))


@given(message_rows())
def test_a_payload_stored_whole_reads_back_unchanged(row: dict[str, Any]) -> None:
    """Rows written before payloads were stored compactly hold the whole payload."""
    built = events.payload_for(
        event_id="evt_01",
        event_type="message.delivered",
        created_at="2026-01-01T00:00:00Z",
        mailbox_id="mbx_01",
        message=view(row),
    )
    assert _text_of(events.expanded_payload(json.loads(_text_of(built)))) == _text_of(built)


def _delivered_view(metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    body = "Your refund is on its way. " * 80
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return view(
        {
            "id": "msg_01",
            "mailbox_id": "mbx_01",
            "direction": "outbound",
            "status": "delivered",
            "from_address": "agent@acme.test",
            "from_name": "Acme Agent",
            "to": ["customer@example.test"],
            "subject": "Refund",
            "markdown": body,
            "text": body,
            "html": f"<p>{body}</p>",
            "metadata": metadata or {},
            "created_at": now,
        }
    )


def test_the_body_is_stored_once_per_rendering() -> None:
    shown = _delivered_view()
    built = events.payload_for(
        event_id="evt_01",
        event_type="message.delivered",
        created_at="2026-01-01T00:00:00Z",
        mailbox_id="mbx_01",
        message=shown,
    )
    text = _text_of(events.stored_payload(built))
    # The markdown (= the text part) once and the HTML once; whole, the payload has the
    # body eight times.
    assert text.count("Your refund is on its way.") == 2 * 80
    assert _text_of(built).count("Your refund is on its way.") == 8 * 80


def test_an_extra_that_overrides_a_derived_field_is_kept() -> None:
    built = events.payload_for(
        event_id="evt_01",
        event_type="message.bounced",
        created_at="2026-01-01T00:00:00Z",
        mailbox_id="mbx_01",
        message=_delivered_view(),
        extra={"status": "bounced", "bounce": {"code": 550}},
    )
    stored = events.stored_payload(built)
    assert stored["status"] == "bounced"
    assert events.expanded_payload(stored) == built


def test_a_copy_that_differs_from_its_source_is_kept() -> None:
    """A view changed after the fact (here: a draft_body that is not the markdown) keeps it."""
    shown = _delivered_view()
    shown["draft_body"] = "the draft the reviewer saw"
    shown["sender"] = True  # equal to nothing it could be a copy of; JSON keeps the type
    stored = compact_view(shown)
    assert stored["draft_body"] == "the draft the reviewer saw"
    assert stored["sender"] is True
    assert _text_of(expand_view(stored)) == _text_of(shown)


def test_a_payload_without_a_message_is_stored_as_it_is() -> None:
    built = events.payload_for(
        event_id="evt_01",
        event_type="webhook.test",
        created_at="2026-01-01T00:00:00Z",
        mailbox_id=None,
        message=None,
        extra={"test": True},
    )
    assert events.stored_payload(built) == built
    assert _text_of(events.expanded_payload(built)) == _text_of(built)


def test_a_copy_out_of_its_usual_place_is_kept_where_it_was() -> None:
    """Dropped copies go back right after the key they follow in ``view``; one elsewhere
    (a view built in another order) stays stored, so the order comes back as it was."""
    shown = _delivered_view()
    sender = shown.pop("sender")
    body = shown.pop("body")
    shown["sender"] = sender
    shown["body"] = body
    stored = compact_view(shown)
    assert "sender" in stored
    assert _text_of(expand_view(stored)) == _text_of(shown)


@pytest.mark.parametrize(
    ("metadata", "extra"),
    [
        # JSON 1 is not JSON true, but {"retry": 1} == {"retry": True} in Python.
        ({"retry": True}, {"metadata": {"retry": 1}}),
        # The same members in another order are another JSON text (and another signature).
        ({}, {"from": {"name": "Acme Agent", "address": "agent@acme.test"}}),
    ],
    ids=["int-for-bool", "key-order"],
)
def test_a_dict_valued_extra_that_overrides_a_derived_field_comes_back_as_given(
    metadata: dict[str, Any], extra: dict[str, Any]
) -> None:
    """An extra equal to a derived dict field (``from``, ``tags``, ``metadata``) in Python but
    not in JSON is kept, so the receiver gets the text a whole stored payload gave (found
    in review: Python's == had dropped it)."""
    built = events.payload_for(
        event_id="evt_01",
        event_type="message.delivered",
        created_at="2026-01-01T00:00:00Z",
        mailbox_id="mbx_01",
        message=_delivered_view(metadata),
        extra=extra,
    )
    # What the JSON column gives back to the dispatcher.
    stored = json.loads(_text_of(events.stored_payload(built)))
    assert _text_of(events.expanded_payload(stored)) == _text_of(built)


def test_a_body_group_equal_only_in_python_is_kept_as_it_was() -> None:
    """``body`` is rebuilt only when its JSON text is what the rebuild gives: not when its
    keys are in another order or a flag is ``1`` instead of ``true``."""
    shown = _delivered_view()
    reordered = dict(reversed(list(shown["body"].items())))
    for body in (reordered, {**shown["body"], "untrusted": 0}):
        stored = compact_view({**shown, "body": body})
        assert stored["body"] == body
        assert _text_of(expand_view(stored)) == _text_of({**shown, "body": body})
