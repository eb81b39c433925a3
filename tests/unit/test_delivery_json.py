"""The delivery worker's event-payload encoder writes exactly what json.dumps writes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.workers.delivery import _json_encoder

_LONG = st.text(min_size=120, max_size=400)
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text() | _LONG
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_VALUES, min_size=1, max_size=4))
def test_same_text_as_json_dumps(values: list[Any]) -> None:
    # One encoder for several values, as for a message's events: the shared strings must
    # not leak from one value into another.
    encode = _json_encoder()
    for value in values:
        assert encode(value) == json.dumps(value)


def test_a_long_string_in_many_places_is_written_in_each() -> None:
    body = 'Grüße "quoted" \\ \n line ' * 20
    view = {"markdown": body, "body_text": body, "body": {"markdown": body, "text": body}}
    payload = {"message": view, "body_text": body, 3: [body], "n": 1.5}
    encode = _json_encoder()
    assert encode(payload) == json.dumps(payload)
    assert encode(payload) == json.dumps(payload)


def test_refuses_what_json_dumps_refuses() -> None:
    looped: dict[str, Any] = {}
    looped["self"] = looped
    with pytest.raises(ValueError, match="Circular"):
        _json_encoder()(looped)
    with pytest.raises(TypeError, match="not JSON serializable"):
        _json_encoder()({"when": object()})
