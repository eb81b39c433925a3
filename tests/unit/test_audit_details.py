"""How an audit entry's details are stored and hashed (services.audit._details)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from multimail.services.audit import _details


def _as_before(details: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What append_many stored and hashed before details were encoded once."""
    clean = json.loads(json.dumps(dict(details), default=str))
    return json.dumps(clean, sort_keys=True, separators=(",", ":")), clean


@pytest.mark.parametrize(
    "details",
    [
        {},
        {"to": ["a@example.com"], "subject": "Zürich ✓", "send_at": None, "test": False},
        {"b": {"z": 1, "a": [1.5, None, True]}, "a": "x"},
        {"when": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), "amount": Decimal("1.10")},
        {"changes": {"subject": {"from": "a", "to": "b"}}, "rescanned": True},
    ],
)
def test_details_are_stored_and_hashed_as_before(details: dict[str, Any]) -> None:
    stored, clean = _details(details)
    before_stored, before_clean = _as_before(details)
    assert stored == before_stored
    assert clean == before_clean


def test_keys_that_do_not_sort_together_still_work() -> None:
    stored, clean = _details({1: "one", "two": 2})
    assert clean == {"1": "one", "two": 2}
    assert json.loads(stored) == clean


def test_no_details_is_an_empty_object() -> None:
    assert _details(None) == ("{}", {})
