"""domain/headertext.py: the one definition of a line break in header text.

mail/compose.py still holds its own copy (``_BREAKS`` and the encoded-word decoding); these
tests pin the two to the same answer until it imports this module.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multimail.domain.headertext import (
    LINE_BREAKS,
    MAX_DECODE_ROUNDS,
    HeaderTextError,
    decoded_header_text,
    has_line_break,
)
from multimail.errors import InvalidInput
from multimail.mail import compose


def test_the_breaks_are_the_composers_breaks() -> None:
    """One definition: what settings refuse is what the composer refuses."""
    assert compose._BREAKS is LINE_BREAKS


def test_the_breaks_are_what_splitlines_splits_on_plus_nul() -> None:
    for code in range(0x110000):
        char = chr(code)
        expected = len(f"a{char}b".splitlines()) == 2 or char == "\0"
        assert bool(LINE_BREAKS.search(char)) == expected, hex(code)


@pytest.mark.parametrize(
    "value",
    ["=?utf-8?q?a=0Ab?=", "=?utf-8?b?YQ1i?=", "=?utf-8?q?a=E2=80=A8b?=", "x =?utf-8?q?=C2=85?="],
)
def test_a_break_inside_an_encoded_word_counts(value: str) -> None:
    assert not LINE_BREAKS.search(value)
    assert has_line_break(value)


def test_plain_and_encoded_one_line_text_has_no_break() -> None:
    assert not has_line_break("Support Team")
    assert not has_line_break("Ops\tDesk")
    assert decoded_header_text("=?utf-8?q?Caf=C3=A9?=") == "Café"
    assert not has_line_break("=?utf-8?q?Caf=C3=A9?=")


def test_nesting_deeper_than_the_limit_is_an_error() -> None:
    value = "a"
    for _ in range(MAX_DECODE_ROUNDS + 1):
        value = "=?utf-8?b?" + base64.b64encode(value.encode()).decode() + "?="
    with pytest.raises(HeaderTextError):
        has_line_break(value)


_PIECES = st.sampled_from(
    [
        "a",
        " ",
        "Team",
        "=?utf-8?q?",
        "?=",
        "=0A",
        "=0D",
        "=E2=80=A8",
        "=C2=85",
        "=?utf-8?b?",
        "Cg==",
        "\n",
        "\u2028",
        "\x0b",
        "\t",
        "é",
        "\x01",
    ]
)


@given(st.lists(_PIECES, max_size=12).map("".join))
def test_the_composer_refuses_a_name_exactly_when_it_has_a_break(value: str) -> None:
    try:
        expected = has_line_break(value)
    except HeaderTextError:
        expected = True
    try:
        compose._display_name(value)
    except InvalidInput as exc:
        assert exc.code == "header_injection"
        assert expected, value
    else:
        assert not expected, value
