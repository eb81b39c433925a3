"""Print ``services.fences._CONFUSABLE``: the look-alikes of the fence markers' characters.

Source: Unicode's confusables.txt (TR 39), as packaged in ``confusable_homoglyphs``'
``confusables.json`` (pass its path). For each marker character, every single code point
listed as confusable with it or its capital, each as NFKC leaves it (the fence judges
text after NFKC), plus the few the data lacks that were chosen by hand before
(``_EXTRA``). Run it, paste the output over the table and run ruff format, when Unicode
publishes new confusables:

    python scripts/gen_confusables.py path/to/confusable_homoglyphs/confusables.json
"""

from __future__ import annotations

import json
import sys
import unicodedata

MARKERS = "</_abdeilmnorstuy"
# Look-alikes missing from confusables.txt's entries for these characters.
_EXTRA = {
    "<": "\u3008\u27e8",
    "_": "\u02cd\u07fa",
    "b": "\u0185",
    "i": "\u04c0\u0399\u0406\u0130",
    "l": "\u07ca\u05c0\u04cf",
}


def _nfkc(char: str) -> str:
    return unicodedata.normalize("NFKC", char)


def table(data: dict[str, list[dict[str, str]]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for marker in MARKERS:
        forms = {marker, marker.upper()}
        alike: set[str] = set(_EXTRA.get(marker, ""))
        for char, entries in data.items():
            others = {entry["c"] for entry in entries}
            if len(char) == 1 and others & forms:
                alike.add(char)
            if char in forms:
                alike.update(other for other in others if len(other) == 1)
        # The fence compares text after NFKC, one character at a time: what matters is each
        # look-alike's NFKC form, and one that NFKC turns into several characters is kept
        # apart by the fence's per-character folding anyway.
        kept = {_nfkc(c) for c in alike if len(_nfkc(c)) == 1} - forms
        found[marker] = sorted(kept, key=ord)
    return found


def _escaped(chars: list[str]) -> list[str]:
    pieces = [
        c
        if c.isascii() and c.isprintable() and c not in '"\\'
        else (f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
        for c in chars
    ]
    lines, line = [], ""
    for piece in pieces:
        if len(line) + len(piece) > 72:
            lines.append(line)
            line = ""
        line += piece
    return [*lines, line] if line else lines


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        data = json.load(handle)
    print("_CONFUSABLE = {")
    for marker, chars in table(data).items():
        lines = _escaped(chars)
        if len(lines) == 1:
            print(f'    "{marker}": "{lines[0]}",')
        else:
            print(f'    "{marker}": (')
            for line in lines:
                print(f'        "{line}"')
            print("    ),")
    print("}")


if __name__ == "__main__":
    main()
