"""Markdown to a sanitised HTML part and a plain-text part.

Agents write markdown; receivers get both renderings. The HTML goes through two gates:
markdown-it never passes raw HTML through, and nh3 then allows only a small set of tags,
attributes and URL schemes, so a prompt-injected agent cannot ship a script, an event
handler or a ``javascript:`` link.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import nh3
from markdown_it import MarkdownIt

__all__ = ["RenderedBody", "normalise_text", "render_markdown", "sanitise_fragment"]

_ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4",
        "h5", "h6", "hr", "i", "img", "li", "ol", "p", "pre", "s", "strong", "sub", "sup",
        "table", "tbody", "td", "th", "thead", "tr", "ul",
    }
)  # fmt: skip
_ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "img": {"src", "alt", "title"},
    "ol": {"start"},
    "th": {"style"},
    "td": {"style"},
    "abbr": {"title"},
}
_URL_SCHEMES = frozenset({"http", "https", "mailto"})

# Controls that are not line breaks have no business in mail and some MTAs choke on NUL.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0e-\x1f\x7f]")
_SURROGATES = re.compile("[\ud800-\udfff]")
# Anything normalise_text would change besides the final LF: a line break other than LF
# (str.splitlines' list), a control character, a lone surrogate.
_NEEDS_NORMALISING = re.compile("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")
# The ASCII characters normalise_text leaves alone: tab, LF, printable.
_PLAIN_ASCII = bytes([0x09, 0x0A, *range(0x20, 0x7F)])

# Email writers expect a single newline to break the line, as in any mail client.
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")
# Built once: nh3.clean would convert these sets into the sanitiser's own on every call,
# which costs as much as the cleaning of a short body.
_CLEANER = nh3.Cleaner(
    tags=set(_ALLOWED_TAGS),
    attributes={tag: set(attrs) for tag, attrs in _ALLOWED_ATTRIBUTES.items()},
    url_schemes=set(_URL_SCHEMES),
    link_rel="noopener noreferrer",
    filter_style_properties={"text-align"},
    strip_comments=True,
)


@dataclass(frozen=True)
class RenderedBody:
    """The two renderings of one markdown body: an HTML fragment and plain text."""

    html: str
    text: str


def normalise_text(text: str) -> str:
    """LF line endings, no control characters, no lone surrogates.

    Every line boundary Python knows (``str.splitlines``: CR, CRLF, VT, FF, NEL, U+2028
    ...) becomes LF, because the email package splits on some of them and not others; a
    body hash has to see the same lines on both sides of the wire.
    """
    if _is_normal(text):
        # What splitlines + join does to text with LF breaks only: drop one final LF.
        return text[:-1] if text.endswith("\n") else text
    text = _SURROGATES.sub("\ufffd", text)
    text = "\n".join(text.splitlines())
    return _CONTROL_CHARS.sub("", text)


def _is_normal(text: str) -> bool:
    if text.isascii():
        # One C pass over the bytes is several times cheaper than the regex below.
        return not text.encode("ascii").translate(None, _PLAIN_ASCII)
    return _NEEDS_NORMALISING.search(text) is None


def render_markdown(markdown: str) -> RenderedBody:
    """Render markdown (CommonMark + tables, no raw HTML) to sanitised HTML and text.

    The text part is the normalised markdown source itself: markdown is written to be
    read as plain text, and keeping it verbatim means the text part hashes the same as
    the markdown the reviewer approved.
    """
    text = normalise_text(markdown)
    return RenderedBody(html=_CLEANER.clean(_MARKDOWN.render(text)), text=text)


def sanitise_fragment(html: str) -> str:
    """``html`` through the same allow-list as ``render_markdown``'s output.

    For HTML rendered earlier and kept (a message's body, rendered when it was sent):
    whatever wrote it, and whichever rules were in force then, what goes out passes the
    rules in force now. Cleaning ``render_markdown``'s output changes nothing.
    """
    return _CLEANER.clean(html)
