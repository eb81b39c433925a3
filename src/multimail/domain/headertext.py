"""What text written into a header may hold (pure): no line break of any kind.

A break counts whether it is in the text itself or inside an RFC 2047 encoded-word that a
mail reader decodes (``=?utf-8?q?a=0Ab?=``). ``mail/compose.py`` refuses such text when it
writes a header; a setting that ends up in a header (a mailbox's display name) is checked
against the same definition when it is set, so a value the API accepted never makes every
later message of the mailbox fail at delivery.
"""

from __future__ import annotations

import email.policy
import re

# Everything str.splitlines() treats as a line boundary, plus NUL: the email package splits
# header values on some of these and mail readers on others.
LINE_BREAKS = re.compile("\r\n|[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00]")
# Honest text is encoded once; nesting deeper than a few levels is an attack.
MAX_DECODE_ROUNDS = 8

_SURROGATES = re.compile("[\ud800-\udfff]")
_DECODE_POLICY = email.policy.default


class HeaderTextError(ValueError):
    """Text that cannot be written into a header; the message says why."""


def decoded_header_text(value: str) -> str:
    """``value`` with its encoded-words decoded as ``EmailMessage`` decodes them, to a fixed
    point. Raises HeaderTextError when they are nested more than MAX_DECODE_ROUNDS deep."""
    if "=?" not in value and not _SURROGATES.search(value):
        return value  # no encoded-word to decode
    for _ in range(MAX_DECODE_ROUNDS):
        decoded = str(_DECODE_POLICY.header_factory("x-multimail-check", value))
        if decoded == value:
            return value
        value = decoded
    raise HeaderTextError("the text is nested in too many encodings")


def has_line_break(value: str) -> bool:
    """True when ``value`` holds a line break, itself or in an encoded-word.

    Raises HeaderTextError when its encoded-words are nested too deep to tell.
    """
    return LINE_BREAKS.search(value) is not None or (
        LINE_BREAKS.search(decoded_header_text(value)) is not None
    )
