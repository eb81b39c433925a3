"""Untrusted HTML from inbound mail, made safe and turned into markdown for agents.

Everything here is total: any ``str`` in, a ``str`` out, never an exception. Inbound bodies
are attacker-controlled, and a body that cannot be rendered must still be stored.
"""

from __future__ import annotations

import html as html_lib
import re

import nh3
from markdownify import markdownify

__all__ = ["html_to_markdown", "sanitize_html"]

# Dropped together with everything inside them: their content is code or chrome, never
# something the sender meant the reader to see.
_DROP_WITH_CONTENT = frozenset(
    {"script", "style", "iframe", "object", "embed", "noscript", "template", "head", "title"}
)
# ``cid:`` keeps inline images pointing at their MIME part; ``data:`` is left out because
# it can smuggle arbitrary documents.
_URL_SCHEMES = frozenset({"http", "https", "mailto", "cid", "tel"})
_BLANK_RUNS = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


# Built once: nh3.clean converts its option sets into the sanitiser's own on every call.
_SANITISER = nh3.Cleaner(clean_content_tags=set(_DROP_WITH_CONTENT), url_schemes=set(_URL_SCHEMES))
_TEXT_ONLY = nh3.Cleaner(tags=set(), clean_content_tags=set(_DROP_WITH_CONTENT))


def _scrub(text: str) -> str:
    # Lone surrogates (from undecodable bytes) cannot cross into Rust; NULs are never content.
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


def sanitize_html(html: str) -> str:
    """Return ``html`` with scripts, styles, frames, event handlers and unsafe URLs removed."""
    try:
        return _SANITISER.clean(_scrub(html))
    except Exception:
        # nh3 has no documented failure mode; if one appears, an escaped copy is still safe.
        return html_lib.escape(_scrub(html))


def _html_to_text(html: str) -> str:
    """Flatten (already sanitised or not) HTML to text without any markup."""
    try:
        stripped = _TEXT_ONLY.clean(_scrub(html))
    except Exception:
        stripped = re.sub(r"<[^>]*>", " ", _scrub(html))
    return _tidy(html_lib.unescape(stripped))


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def html_to_markdown(html: str) -> str:
    """Sanitise ``html`` and convert it to clean markdown; never raises."""
    safe = sanitize_html(html)
    try:
        markdown = markdownify(safe, heading_style="ATX", bullets="-")
    except Exception:
        # markdownify walks the tree recursively; absurdly deep HTML ends here as plain text.
        return _html_to_text(safe)
    return _tidy(markdown)
