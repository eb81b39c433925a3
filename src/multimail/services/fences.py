"""Fences around text written by outsiders, and the look-alikes that must not close them early.

Two fences, one rule. An agent reads an email body between ``<untrusted_email_body>`` tags
(:mod:`multimail.mcp.server`); the operator reads an agent's draft in a backtick code block
(:mod:`multimail.services.notify`). Whoever can end a fence early makes what follows read as
ours. A reader, model or person, sees glyphs, not code points: ``</untrusted_email_body>``
with a zero-width space or a bidi control inside, in fullwidth letters, or with a Cyrillic e
for the Latin one, looks like the closing tag. So both fences judge text by its *visible
form*: Unicode format characters (category Cf) and the other default-ignorable code points
dropped, each character NFKC-normalised, and, for the markers' own characters, the letters
confusable with them (Unicode TR 39) read as those letters.

Text is only ever changed where the visible form shows a marker: an emoji joined with
U+200D, a right-to-left name or a soft hyphen elsewhere in a body comes back byte-identical.
"""

from __future__ import annotations

import re
import unicodedata

UNTRUSTED_BODY = "untrusted_email_body"

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties) outside category Cf: they draw
# nothing either, and Python's unicodedata has no such property to ask.
_IGNORABLE = frozenset(
    [
        0x034F,
        0x115F,
        0x1160,
        0x17B4,
        0x17B5,
        0x3164,
        0xFFA0,
        *range(0x180B, 0x1810),
        *range(0xFE00, 0xFE10),
        *range(0xE0100, 0xE01F0),
    ]
)

# Look-alikes of the markers' characters, from Unicode's confusables.txt (TR 39), after NFKC
# (which already folds fullwidth, small and mathematical forms): Cyrillic, Greek, Armenian,
# Cherokee, Lisu and Canadian syllabics letters, small capitals, angle quotation marks and
# slashes. Written escaped so that no look-alike hides in this file either; case is matched
# by the pattern.
_CONFUSABLE = {
    "<": "\u2039\u276e\u02c2\u1438\u3008\u27e8\u16b2",
    "/": "\u2044\u2215\u29f8\u2571\u27cb\u4e3f\u30ce\u3033\u2cc6\u1735",
    "_": "\u02cd\u07fa",
    "a": "\u0430\u0251\u03b1\u237a\u0410\u0391\u13aa\ua4ee",
    "b": "\u042c\u0185\u13cf\u1472\u15af\u0412\u0392\u13f4\ua4d0",
    "d": "\u0501\ua4d2\u146f\u13a0\ua4d3",
    "e": "\u0435\u04bd\u212e\u0415\u0395\u13ac\ua4f0",
    "i": "\u0456\u0131\u0269\u03b9\u13a5\u2373\u0406\u0399\u04c0\u0130",
    "l": "1|I\u01c0\u05c0\u04cf\u04c0\u0406\u0399\u2d4f\u07ca",
    "m": "\u041c\u039c\u13b7\ua4df",
    "n": "\u0578\u057c\u039d\ua4e0",
    "o": "0\u043e\u03bf\u0585\u1d0f\u041e\u039f",
    "r": "\u0433\u1d26\u2c85\u13a1\ua4e3",
    "s": "\u0455\ua731\u01bd\u0405\u13da\ua4e2",
    "t": "\u0422\u03a4\u13a2\ua4d4",
    "u": "\u057d\u028b\u03c5\u1d1c\u054d\ua4f4",
    "y": "\u0443\u04af\u03b3\u028f\u0423\u03a5\u04ae\ua4ec",
}
# Drawn as a letter pair: "rn" passes for "m" in most fonts.
_CONFUSABLE_PAIRS = {"m": "rn"}


def _shown(char: str) -> str:
    """What one character draws as: nothing for an invisible one, else its NFKC form."""
    if unicodedata.category(char) == "Cf" or ord(char) in _IGNORABLE:
        return ""
    return unicodedata.normalize("NFKC", char)


class _Shown(dict[int, str]):
    """``str.translate`` table computing :func:`_shown` on first sight of a code point."""

    _LIMIT = 65_536  # a body of every code point must not grow the cache without bound

    def __missing__(self, code: int) -> str:
        shown = _shown(chr(code))
        if len(self) < self._LIMIT:
            self[code] = shown
        return shown


_SHOWN = _Shown()


def visible_form(text: str) -> str:
    """``text`` as a reader sees it: invisible characters gone, each character NFKC-folded.

    Character by character, so position ``i`` of the result always comes from one character
    of ``text`` (:func:`_origins`); where NFKC would compose across characters this keeps
    them apart, which only ever shows a marker more often, never less."""
    if text.isascii():  # no format characters, and NFKC leaves ASCII alone
        return text
    return text.translate(_SHOWN)


def _origins(text: str) -> list[int]:
    """For each character of ``visible_form(text)``, the index in ``text`` it came from."""
    origins: list[int] = []
    for index, char in enumerate(text):
        origins.extend([index] * len(_SHOWN[ord(char)]))
    return origins


def _class(char: str) -> str:
    shown = {char, char.upper(), *_CONFUSABLE.get(char, "")}
    return "[" + "".join(sorted(re.escape(c) for c in shown)) + "]"


def _looks_like(word: str) -> str:
    parts = []
    for char in word:
        pair = _CONFUSABLE_PAIRS.get(char)
        drawn = "".join(_class(c) for c in pair) if pair else ""
        parts.append(f"(?:{_class(char)}|{drawn})" if pair else _class(char))
    return "".join(parts)


def _tag_pattern(name: str) -> re.Pattern[str]:
    """Any opening or closing tag ``name`` as a model reads one: whatever its case, spacing or
    look-alike characters (the ``<`` is group ``lt``)."""
    return re.compile(
        rf"(?P<lt>{_class('<')})\s*(?:{_class('/')}\s*)?{_looks_like(name)}", re.IGNORECASE
    )


_UNTRUSTED_TAG = _tag_pattern(UNTRUSTED_BODY)


def defuse_tags(text: str) -> str:
    """``text`` with every tag that reads as ``<untrusted_email_body>`` or its closing tag
    turned into text: the character drawn as ``<`` becomes ``&lt;``. Nothing else changes."""
    shown = visible_form(text)
    starts = [m.start("lt") for m in _UNTRUSTED_TAG.finditer(shown)]
    if not starts:
        return text
    if shown is text:
        targets = set(starts)
    else:
        origins = _origins(text)
        targets = {origins[i] for i in starts}
    return "".join("&lt;" if i in targets else c for i, c in enumerate(text))


# A backtick after NFKC (which already folds U+FF40 and U+1FEF into it), or drawn like one:
# modifier letter grave accent, modifier letter middle grave accent, reversed prime.
_TICKS = re.compile("[`\u02cb\u02f4\u2035]+")


def fenced(text: str) -> str:
    """A fenced code block that no run of backticks in ``text`` can close early, counting the
    runs a reader sees (look-alikes, and runs split by invisible characters). The text
    itself stays as written."""
    longest = max((len(m) for m in _TICKS.findall(visible_form(text))), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"
