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

# Look-alikes of the markers' characters: every single code point Unicode's confusables.txt
# (TR 39) lists as confusable with one of them, minus those NFKC already folds (fullwidth,
# small and mathematical forms), plus a few the data lacks. Made by
# scripts/gen_confusables.py; written escaped so that no look-alike hides in this file
# either; case is matched by the pattern.
_CONFUSABLE = {
    "<": "\u02c2\u1438\u16b2\u2039\u276e\u27e8\u3008\U0001d236",
    "/": ("\u1735\u2041\u2044\u2215\u2571\u27cb\u29f8\u2cc6\u3033\u30ce\u31d3\u4e3f\U0001d23a"),
    "_": "\u02cd\u07fa",
    "a": ("\u0251\u0391\u03b1\u0410\u0430\u13aa\u15c5\u237a\ua4ee\U000102a0\U00016f40"),
    "b": (
        "\u0184\u0185\u0392\u0412\u042c\u13cf\u13f4\u1472\u15af\u15f7\ua4d0\ua7b4"
        "\U00010282\U000102a1\U00010301"
    ),
    "d": "\u0501\u13a0\u13e7\u146f\u15de\u15ea\ua4d2\ua4d3",
    "e": (
        "\u0395\u0415\u0435\u04bd\u13ac\u212e\u22ff\u2d39\ua4f0\uab32\U00010286\U000118a6\U000118ae"
    ),
    "i": (
        "l\u0130\u0131\u0269\u026a\u0399\u03b9\u0406\u0456\u04c0\u04cf\u13a5"
        "\u2373\ua647\uab75\U000118c3"
    ),
    "l": (
        "1I|\u0196\u01c0\u0399\u0406\u04c0\u04cf\u05c0\u06f1\u07ca\u13de\u14aa"
        "\u16c1\u2223\u23fd\u2502\u2c92\u2cd0\u2d4f\ua4e1\ua4f2\U0001028a"
        "\U00010309\U00010320\U0001041b\U00010526\U000118a3\U000118b2\U00016f16"
        "\U00016f28\U0001d22a"
    ),
    "m": "\u039c\u03fa\u041c\u13b7\u15f0\u16d6\u2c98\ua4df\U000102b0\U00010311",
    "n": "\u039d\u0578\u057c\u2c9a\ua4e0\U00010513",
    "o": (
        "0\u039f\u03bf\u03c3\u041e\u043e\u0555\u0585\u06f5\u0966\u09e6\u0a66"
        "\u0ae6\u0b20\u0b66\u0be6\u0c02\u0c66\u0c82\u0ce6\u0d02\u0d20\u0d66\u0d82"
        "\u0e50\u0ed0\u101d\u1040\u10ff\u12d0\u1d0f\u1d11\u2c9e\u2c9f\u2d54\u3007"
        "\ua4f3\uab3d\U00010292\U000102ab\U00010404\U0001042c\U000104c2\U000104ea"
        "\U00010516\U000114d0\U000118b5\U000118c8\U000118d7\U000118e0"
    ),
    "r": (
        "\u01a6\u0433\u13a1\u13d2\u1587\u1d26\u2c85\ua4e3\uab47\uab48\uab81"
        "\U000104b4\U00016f35\U0001d216"
    ),
    "s": (
        "\u01bd\u0405\u0455\u054f\u13d5\u13da\ua4e2\ua731\uabaa\U00010296"
        "\U00010420\U00010448\U000118c1\U00016f3a"
    ),
    "t": (
        "\u03a4\u0422\u13a2\u22a4\u27d9\u2ca6\ua4d4\U00010297\U000102b1\U00010315"
        "\U000118bc\U00016f0a\U0001f768"
    ),
    "u": (
        "\u028b\u03c5\u054d\u057d\u1200\u144c\u1d1c\u222a\u22c3\ua4f4\ua79f\uab4e"
        "\uab52\U000104ce\U000104f6\U000118b8\U000118d8\U00016f42"
    ),
    "y": (
        "\u0263\u028f\u03a5\u03b3\u0423\u0443\u04ae\u04af\u10e7\u13a9\u13bd\u1d8c"
        "\u1eff\u2ca8\ua4ec\uab5a\U000102b2\U000118a4\U000118dc\U00016f43"
    ),
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
    alike = _CONFUSABLE.get(char, "")
    # Both cases of each look-alike: re.IGNORECASE misses some (a class holding U+118BC,
    # Warang Citi capital HAR, does not match it in Python 3.11 under IGNORECASE).
    cased = {form for c in alike for form in (c.lower(), c.upper()) if len(form) == 1}
    shown = {char, char.upper(), *alike, *cased}
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
