"""The composer's checks the send path calls (one definition each), the scan's judging of
the name a mail program shows, and a reply's threading headers."""

from __future__ import annotations

import email
import email.policy
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.domain.addresses import normalize_address
from multimail.domain.scan import ScanAttachment, ScanInput, blocking, scan
from multimail.errors import InvalidInput
from multimail.mail.compose import (
    OutboundAttachment,
    OutboundDraft,
    attachment_content_type,
    attachment_filename,
    build_message,
    check_address,
    check_message_id,
)
from multimail.services.sending import (
    MAX_REFERENCES,
    SendRequest,
    _reply_threading,
    _request_hash,
    _stored_key,
)

DRAFT = OutboundDraft(
    from_address="support@acme.example",
    from_name=None,
    to=["customer@example.com"],
    cc=[],
    reply_to=None,
    subject="Files",
    markdown="See attached.",
    message_id="<m1@acme.example>",
    date=datetime(2024, 1, 1, tzinfo=UTC),
)


@pytest.mark.parametrize(
    ("given_type", "stored"),
    [
        ("text/csv; charset=utf-8", "text/csv; charset=utf-8"),
        ('Text/CSV;Charset="UTF-8"', "text/csv; charset=UTF-8"),
        (
            "text/calendar; method=REQUEST; charset=utf-8",
            "text/calendar; method=REQUEST; charset=utf-8",
        ),
        ('application/pdf; name="run.vbs"', "application/pdf"),
        ("application/pdf; name*=utf-8''run.vbs", "application/pdf"),
        ("text/plain;", "text/plain"),
        ('text/plain; x="a b; c"', 'text/plain; x="a b; c"'),
        ("text/plain; x='", 'text/plain; x="\'"'),
        ("text/plain; title*=utf-8''a%20b", "text/plain; title*=utf-8''a%20b"),
        (" image/png ", "image/png"),
    ],
)
def test_content_types_are_kept_in_their_canonical_form(given_type: str, stored: str) -> None:
    assert attachment_content_type(given_type) == stored
    assert attachment_content_type(stored) == stored  # what is stored reads back the same


@pytest.mark.parametrize(
    "given_type",
    [
        "not a mime type",
        "text/plain\r\nBcc: thief@evil.example",
        "multipart/mixed; boundary=x",
        "text/plain; charset",
        "text/plain; charset=utf-8; charset=latin1",
        'text/plain; x="é"',
        'text/plain; x="a \\" b"',
        'text/plain; x="a\\\\"',
        "text/plain; title*=\"utf-8''a%20b\"",
        "text/plain; x=a b",
        'text/plain; x="a\r\nBcc: y"',
        "",
    ],
)
def test_malformed_content_types_are_refused(given_type: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        attachment_content_type(given_type)
    assert refused.value.code == "invalid_content_type"


_TOKENS = st.text(st.sampled_from("abcXYZ019-._+"), min_size=1, max_size=12)
_VALUES = _TOKENS | st.text(
    st.characters(min_codepoint=32, max_codepoint=126).filter(lambda c: c not in '"\\'),
    max_size=30,
)


@given(
    params=st.dictionaries(
        _TOKENS.map(str.lower).filter(lambda a: a.split("*")[0] not in ("name", "boundary")),
        _VALUES,
        max_size=3,
    ),
    filename=st.sampled_from(["a.txt", 'q"uote.txt', "résumé.txt"]),
)
@settings(max_examples=200, deadline=None)
def test_parameters_reach_the_reader_as_given(params: dict[str, str], filename: str) -> None:
    """Written here or by the email package (an unusual filename), a reader gets back each
    parameter's value, and nothing else is added to the headers."""
    given_type = "text/plain" + "".join(f'; {a}="{v}"' for a, v in params.items())
    stored = attachment_content_type(given_type)
    raw = build_message(replace(DRAFT, attachments=[OutboundAttachment(filename, stored, b"x")]))
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    [part] = message.iter_attachments()
    assert part.get_content_type() == "text/plain" and part.get_filename() == filename
    read = {k: v for k, v in part.get_params() or [] if k != "text/plain"}
    assert read == params
    assert sorted(message.keys()) == sorted(build_message_keys())


def build_message_keys() -> list[str]:
    raw = build_message(DRAFT)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return list(parsed.keys())


def test_the_composer_writes_an_address_it_accepts_unchanged() -> None:
    assert check_address("o'brien+x@example.org", "to") == "o'brien+x@example.org"
    assert check_address("=?utf-8?q?bob?=@example.com", "to") == "bob@example.com"
    with pytest.raises(InvalidInput):
        check_address("=?utf-8?q?x=0D=0ABcc=3A_y=40evil.example?=@example.com", "to")


def test_message_ids_are_checked_as_the_composer_writes_them() -> None:
    assert check_message_id(" <a@b.example> ") == "<a@b.example>"
    for bad in ("<café@b.example>", "a@b.example", "<a@b>\r\n<c@d>"):
        with pytest.raises(InvalidInput):
            check_message_id(bad)


def test_attachment_names_are_the_names_shown() -> None:
    assert attachment_filename("=?utf-8?b?cnVuLnZicw==?=") == "run.vbs"
    assert attachment_filename(" report.pdf ") == "report.pdf"
    for bad in ("a/b.txt", "=?utf-8?q?a=0Ab.txt?=", "", "x" * 256):
        with pytest.raises(InvalidInput):
            attachment_filename(bad)


def _scan_one(name: str, data: bytes = b"hello") -> list[str]:
    attachment = ScanAttachment(name, "text/plain", data)
    found = scan(
        ScanInput(recipients=["a@example.com"], subject="s", markdown="m", attachments=[attachment])
    )
    return [f.detail.get("reason", "") for f in blocking(found)]


@pytest.mark.parametrize(
    "name", ["=?utf-8?b?cnVuLnZicw==?=", "=?utf-8?q?setup=2Eexe?=", "=?utf-8?q?run?=.vbs"]
)
def test_the_scan_judges_the_name_a_mail_program_shows(name: str) -> None:
    assert _scan_one(name) == ["extension"]


def test_the_scan_blocks_a_name_the_composer_would_refuse() -> None:
    assert _scan_one("=?utf-8?q?a=0D=0Ab.txt?=") == ["filename"]


def test_the_scan_passes_ordinary_names() -> None:
    assert _scan_one("=?utf-8?q?r=C3=A9sum=C3=A9.pdf?=") == []
    assert _scan_one("notes.txt") == []


def test_reply_references_drop_what_the_composer_refuses() -> None:
    parent = {
        "message_id_header": "<q1@customer.example>",
        "references": ["<root@customer.example>", "<café@customer.example>", "nobrackets"],
    }
    assert _reply_threading(parent) == (
        "<q1@customer.example>",
        ["<root@customer.example>", "<q1@customer.example>"],
    )


def test_reply_references_keep_the_root_and_the_newest_when_trimmed() -> None:
    chain = [f"<r{i}@x.example>" for i in range(40)]
    parent = {"message_id_header": "<p@x.example>", "references": chain}
    in_reply_to, references = _reply_threading(parent)
    assert in_reply_to == "<p@x.example>" and len(references) == MAX_REFERENCES
    assert references[0] == "<r0@x.example>" and references[-1] == "<p@x.example>"
    assert references[1:-1] == chain[-(MAX_REFERENCES - 2) :]


def test_reply_references_fall_back_to_the_parents_in_reply_to() -> None:
    parent = {"message_id_header": "<p@x.example>", "references": [], "in_reply_to": "<g@y>"}
    assert _reply_threading(parent) == ("<p@x.example>", ["<g@y>", "<p@x.example>"])


def test_reply_threading_without_a_writable_parent_id_keeps_the_chain() -> None:
    parent = {"message_id_header": "<bad id@x>", "references": ["<a@x>", "<a@x>"]}
    assert _reply_threading(parent) == (None, ["<a@x>"])
    assert _reply_threading({"message_id_header": None}) == (None, [])


def test_test_keys_have_their_own_key_space_that_fits_the_column() -> None:
    assert _stored_key("opp-1", test_mode=False) == "opp-1"
    sandbox = _stored_key("opp-1", test_mode=True)
    assert sandbox != "opp-1" and sandbox == _stored_key("opp-1", test_mode=True)
    assert len(_stored_key("k" * 255, test_mode=True)) <= 255


@pytest.mark.parametrize("address", ["x@faß.de", "info@bücher.example", "a@ΣΊΣΥΦΟΣ.gr"])
def test_the_composer_writes_a_domain_as_the_service_stores_it(address: str) -> None:
    """IDNA 2008 (UTS #46) in both: with IDNA 2003 the composer wrote faß.de as fass.de,
    another domain than the one the message was accepted and recorded for."""
    stored = normalize_address(address)
    assert check_address(address, "to") == stored == check_address(stored, "to")


def test_the_request_hash_is_the_requests_meaning_with_the_old_spelling_kept() -> None:
    """``"to": "a@x"`` and ``["a@x"]``, or ``body``/``text``/``markdown``, are one request (the
    tool routes fold them before the service sees them: the same JSON retried there answered
    422 idempotency_key_reused). Rows stored before hold the spelling's hash, still matched."""
    spelled = SendRequest(to="a@x.test", subject="Hi", body="Hello")
    folded = SendRequest(to=["a@x.test"], subject="Hi", markdown="Hello")
    first, second = (_request_hash(r, "mbx_1", None) for r in (spelled, folded))
    assert first.current == second.current
    assert first.legacy != second.legacy
    assert first.matches(first.legacy) and second.matches(first.current)
    other = _request_hash(SendRequest(to="a@x.test", subject="Hi", text="Bye"), "mbx_1", None)
    assert not first.matches(other.current) and not other.matches(first.legacy)
