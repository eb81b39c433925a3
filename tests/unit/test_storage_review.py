"""Review of 823893b (events store a compact payload): the defects found in its pure parts,
each failed before its fix.

The claim under review: ``expanded_payload`` of what the events table holds gives back the
very JSON text (key order included) receivers got before, for every message shape,
including extras that override the fields ``payload_for`` derives from the message.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from multimail.services import events
from multimail.services.messages import view


def _view(metadata: dict[str, Any]) -> dict[str, Any]:
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
            "markdown": "Your refund is on its way.",
            "metadata": metadata,
            "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        }
    )


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
    """An extra that overrides a derived dict field (``from``, ``tags``, ``metadata``) with a
    value equal to the derivation in Python but not in JSON is kept, so the receiver gets
    the text it got when the whole payload was stored."""
    built = events.payload_for(
        event_id="evt_01",
        event_type="message.delivered",
        created_at="2026-01-01T00:00:00Z",
        mailbox_id="mbx_01",
        message=_view(metadata),
        extra=extra,
    )
    # What the JSON column gives back to the dispatcher.
    stored = json.loads(json.dumps(events.stored_payload(built)))
    assert json.dumps(events.expanded_payload(stored)) == json.dumps(built)
