"""Domain names to the ASCII of DNS and SMTP: IDNA 2008 with the UTS #46 mapping (RFC 5890-5893).

Python's ``"idna"`` codec is IDNA 2003: it folds ß to ``ss`` and the final sigma to the medial
one and drops the joiners, which names a different domain (faß.test and fass.test can belong
to different holders).
"""

from __future__ import annotations

import idna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from multimail.domain.addresses import (
    AddressError,
    idna_ascii,
    normalize_address,
    normalize_domain,
)


def test_sharp_s_is_kept_as_a_letter() -> None:
    """faß.test is xn--fa-hia.test, not fass.test."""
    assert idna_ascii("faß.test") == "xn--fa-hia.test"
    assert idna_ascii("fass.test") == "fass.test"
    assert normalize_address("bob@faß.test") == "bob@xn--fa-hia.test"


def test_greek_final_sigma_is_kept() -> None:
    """The final sigma stays final (IDNA 2003 would make it the medial sigma: another label)."""
    assert idna_ascii("βόλος.test") == "xn--nxasmm1c.test"
    assert idna_ascii("βόλοσ.test") == "xn--nxasmq6b.test"


def test_a_joiner_is_kept_where_its_context_allows_it() -> None:
    """ZWJ and ZWNJ after a virama are part of the label (RFC 5892 Appendix A.1/A.2)."""
    zwnj = "\u0915\u094d\u200c\u0937.test"
    zwj = "\u0915\u094d\u200d\u0937.test"
    assert idna_ascii(zwnj) == "xn--11b2ezcs70k.test"
    assert idna_ascii(zwj) == "xn--11b2ezcw70k.test"
    assert idna_ascii(zwnj) != idna_ascii(zwj) != idna_ascii("\u0915\u094d\u0937.test")


@pytest.mark.parametrize("joiner", ["\u200c", "\u200d"])
def test_a_joiner_out_of_context_is_refused(joiner: str) -> None:
    """A joiner between two Latin letters has no context that allows it."""
    with pytest.raises(AddressError, match="not a valid domain name"):
        idna_ascii(f"a{joiner}b.test")


@pytest.mark.parametrize(
    "domain", ["example.com", "mail.example.co.uk", "localhost", "a-b.example", "123.test"]
)
def test_ascii_names_are_unchanged(domain: str) -> None:
    assert idna_ascii(domain) == domain


def test_upper_case_is_lowered() -> None:
    assert idna_ascii("Example.COM") == "example.com"
    assert idna_ascii("FAß.Test") == "xn--fa-hia.test"
    assert idna_ascii("XN--FA-HIA.TEST") == "xn--fa-hia.test"


def test_a_trailing_dot_is_the_root_and_is_dropped() -> None:
    assert idna_ascii("example.com.") == "example.com"
    assert idna_ascii("faß.test.") == "xn--fa-hia.test"
    assert idna_ascii("faß。test。") == "xn--fa-hia.test"  # ideographic full stops


def test_a_valid_a_label_is_accepted_as_it_is() -> None:
    assert idna_ascii("xn--fa-hia.test") == "xn--fa-hia.test"


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "a..b",
        "example.com..",
        "-a.test",
        "a-.test",
        "a_b.test",
        "a b.test",
        "a\n.test",
        "a" * 64 + ".test",
        ".".join(["a" * 63] * 4),  # 255 characters
        "xn--zz.test",  # not Punycode of anything valid
        "☃.test",  # a symbol: allowed by IDNA 2003, not by IDNA 2008
        "\u0300a.test",  # begins with a combining mark
        "a\u0661.test",  # bidi rule: Arabic digit in a left-to-right label
        "ab\u200d",
    ],
)
def test_invalid_names_are_refused_with_the_reason(domain: str) -> None:
    with pytest.raises(AddressError, match="not a valid domain name"):
        idna_ascii(domain)


def test_the_longest_name_is_accepted() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    assert idna_ascii(name) == name


def test_normalize_domain_keeps_stripping_space_and_root_dots() -> None:
    assert normalize_domain("  Faß.Test.  ") == "xn--fa-hia.test"
    with pytest.raises(AddressError):
        normalize_domain("example.com\n.evil")


def test_a_local_part_or_label_ending_in_a_newline_is_refused() -> None:
    """The syntax patterns are matched whole: ``$`` alone would accept a final newline."""
    with pytest.raises(AddressError):
        idna_ascii("example.com\n")
    with pytest.raises(AddressError):
        normalize_domain("example\n.com")


_LDH = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
_UNICODE_LABEL = st.text(
    st.characters(codec="utf-8", categories=["Ll", "Lu", "Lo", "Nd", "Mn", "Pd"]),
    min_size=1,
    max_size=12,
)


@given(st.lists(_LDH, min_size=1, max_size=4))
def test_plain_names_come_back_lower_cased(labels: list[str]) -> None:
    name = ".".join(labels)
    assert idna_ascii(name.upper()) == name


@given(st.lists(st.one_of(_LDH, _UNICODE_LABEL), min_size=1, max_size=4))
def test_any_name_is_refused_or_becomes_a_stable_ascii_name(labels: list[str]) -> None:
    """Only AddressError escapes; a result is lower-case ASCII, a fixed point, and what the
    idna package itself gives (for names without reserved ``??--`` ASCII labels, which we keep
    accepting as plain host names)."""
    name = ".".join(labels)
    try:
        value = idna_ascii(name)
    except AddressError:
        return
    assert value.isascii() and value == value.lower()
    assert all(0 < len(label) <= 63 for label in value.split("."))
    assert idna_ascii(value) == value
    try:
        expected = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError:
        # Only our leniency for reserved ASCII labels ("ab--cd") may accept what idna refuses.
        assert any(
            label[2:4] == "--" and not label.startswith("xn--") for label in value.split(".")
        )
        return
    assert value == expected
