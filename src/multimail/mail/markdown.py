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

__all__ = ["RenderedBody", "normalise_text", "render_markdown"]

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

# Email writers expect a single newline to break the line, as in any mail client.
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")


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
    text = _SURROGATES.sub("\ufffd", text)
    text = "\n".join(text.splitlines())
    return _CONTROL_CHARS.sub("", text)


def render_markdown(markdown: str) -> RenderedBody:
    """Render markdown (CommonMark + tables, no raw HTML) to sanitised HTML and text.

    The text part is the normalised markdown source itself: markdown is written to be
    read as plain text, and keeping it verbatim means the text part hashes the same as
    the markdown the reviewer approved.
    """
    text = normalise_text(markdown)
    html = nh3.clean(
        _MARKDOWN.render(text),
        tags=set(_ALLOWED_TAGS),
        attributes={tag: set(attrs) for tag, attrs in _ALLOWED_ATTRIBUTES.items()},
        url_schemes=set(_URL_SCHEMES),
        link_rel="noopener noreferrer",
        filter_style_properties={"text-align"},
        strip_comments=True,
    )
    return RenderedBody(html=html, text=text)
