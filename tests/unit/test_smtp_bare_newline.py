"""The fast bare-newline check agrees with its definition (a CR or LF outside a CRLF)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.smtp.inbound import _has_bare_newline

DEFINITION = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b"\n\r"]), max_size=40))
def test_counts_agree_with_the_definition(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert _has_bare_newline(data) is (DEFINITION.search(data) is not None)


def test_examples() -> None:
    assert not _has_bare_newline(b"")
    assert not _has_bare_newline(b"a\r\nb\r\n")
    assert _has_bare_newline(b"a\nb\r\n")
    assert _has_bare_newline(b"a\rb\r\n")
    assert _has_bare_newline(b"a\n\r")  # an LF then a CR: both bare, although counts of each match
    assert _has_bare_newline(b"\r\r\n")
