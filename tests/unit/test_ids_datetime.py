"""ids.parse_datetime: every ISO 8601 text either parses to an aware UTC time or raises
ValueError, which callers answer with a 422 (anything else would be a 500)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multimail.ids import parse_datetime


@pytest.mark.parametrize(
    "text", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+01:00", "0001-01-01T00:30+00:31"]
)
def test_a_time_outside_the_calendar_in_utc_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        parse_datetime(text)


def test_the_edges_inside_the_calendar_parse() -> None:
    assert parse_datetime("9999-12-31T23:59:59Z") == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert parse_datetime("0001-01-01T00:00:00-01:00").year == 1


@given(
    st.datetimes(timezones=st.just(UTC)),
    st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
)
def test_any_offset_time_parses_or_is_refused_with_value_error(
    moment: datetime, offset_minutes: int
) -> None:
    zone = timezone(timedelta(minutes=offset_minutes))
    text = moment.replace(tzinfo=zone).isoformat()
    try:
        parsed = parse_datetime(text)
    except ValueError:
        return
    assert parsed.tzinfo is UTC
    assert parsed == moment.replace(tzinfo=zone)
