"""Inbound HTML: the sanitisers built once give what nh3.clean gives with the same options."""

from __future__ import annotations

import nh3
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.mail import htmlmd

_FRAGMENTS = st.sampled_from(
    [
        "<p>",
        "</p>",
        "<script>alert(1)</script>",
        "<a href='javascript:x'>j</a>",
        '<a href="cid:img1">c</a>',
        "<img src='data:x' onerror='y'>",
        "<style>p{}</style>",
        "<b>bold</b>",
        "<table><tr><td>x</td></tr></table>",
        "&amp;",
        "<!-- c -->",
        "<iframe src=x></iframe>",
        "<title>t</title>",
        "<a href='tel:123'>t</a>",
        "<template>x</template>",
        "\x00",
    ]
)


@given(st.lists(_FRAGMENTS | st.text(max_size=20), max_size=20).map("".join))
@settings(max_examples=300)
def test_prebuilt_sanitisers_match_nh3_clean(html: str) -> None:
    """Same tags dropped with their content, same URL schemes, same text-only flattening."""
    scrubbed = htmlmd._scrub(html)
    drop = set(htmlmd._DROP_WITH_CONTENT)
    expected = nh3.clean(scrubbed, clean_content_tags=drop, url_schemes=set(htmlmd._URL_SCHEMES))
    assert htmlmd.sanitize_html(html) == expected
    flat = nh3.clean(expected, tags=set(), clean_content_tags=drop)
    assert htmlmd._TEXT_ONLY.clean(expected) == flat
