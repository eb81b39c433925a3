"""Outbound composition: sanitised markdown, MIME structure, wire safety, header injection."""

from __future__ import annotations

import base64
import binascii
import email
import email.errors
import email.policy
import re
import smtplib
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime, unquote
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import idna
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from multimail.errors import InvalidInput
from multimail.mail import compose
from multimail.mail.compose import (
    AI_DISCLOSURE,
    OutboundAttachment,
    OutboundDraft,
    body_sha256,
    build_message,
    compose_body,
    draft_body_sha256,
)
from multimail.mail.markdown import normalise_text, render_markdown
from multimail.testing.smtp import CapturingSMTPServer

DRAFT = OutboundDraft(
    from_address="support@acme.example",
    from_name="Acme Support",
    to=["bob@example.org"],
    cc=["carol@example.net"],
    reply_to=None,
    subject="Your order",
    markdown="Hello **Bob**,\n\nYour order has shipped.",
    message_id="<01HX5ZZKBKACTAV9WEVGEMMVRZ@acme.example>",
    date=datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
)

BASE_HEADERS = ["from", "to", "cc", "subject", "date", "message-id", "mime-version"]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def _tags(html: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    parser = _Tags()
    parser.feed(html)
    parser.close()
    return parser.tags


def _parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _header_names(raw: bytes) -> list[str]:
    return [name.lower() for name in _parse(raw)]


def _assert_wire_safe(raw: bytes) -> None:
    assert b"\0" not in raw
    assert raw.endswith(b"\r\n")
    for line in raw.split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line, line[:80]
        assert len(line) <= 998
        assert line.isascii()


# -- markdown ------------------------------------------------------------------------


def test_script_tags_never_reach_the_html() -> None:
    """Raw HTML in markdown is shown as text, never executed: no <script> element."""
    html = render_markdown("Hi <script>alert(1)</script>\n\n<script>\nalert(2)\n</script>").html
    assert all(tag != "script" for tag, _ in _tags(html))


def test_event_handlers_are_stripped() -> None:
    """No element in the HTML carries an on* event handler attribute."""
    html = render_markdown('<img src=x onerror=alert(1)> ![a](http://x/y.png "t")').html
    attrs = [name for _, pairs in _tags(html) for name, _ in pairs]
    assert attrs and not [a for a in attrs if a.startswith("on")]


@pytest.mark.parametrize(
    "markdown",
    [
        "[x](javascript:alert(1))",
        "[x](JavaScript:alert(1))",
        "<javascript:alert(1)>",
        "[x](vbscript:msgbox(1))",
        "[x](data:text/html;base64,PHNjcmlwdD4=)",
        '<a href="javascript:alert(1)">x</a>',
    ],
)
def test_script_urls_never_become_links(markdown: str) -> None:
    """javascript:, vbscript: and data: URLs never end up in an href."""
    html = render_markdown(markdown).html
    hrefs = [v or "" for _, pairs in _tags(html) for k, v in pairs if k in {"href", "src"}]
    assert not [h for h in hrefs if urlsplit(h).scheme not in {"", "http", "https", "mailto"}]


def test_links_get_noopener_noreferrer() -> None:
    """Every link opens without giving the target page a handle on the reader's window."""
    html = render_markdown("[docs](https://example.com/docs) and <https://example.org>").html
    links = [dict(attrs) for tag, attrs in _tags(html) if tag == "a"]
    assert len(links) == 2
    assert all(link.get("rel") == "noopener noreferrer" for link in links)


def test_tables_and_line_breaks_render() -> None:
    """GitHub-style tables render, and a single newline is a line break as in mail clients."""
    html = render_markdown("| a | b |\n|---|--:|\n| 1 | 2 |\n\nBest,\nAgent").html
    tags = [tag for tag, _ in _tags(html)]
    assert {"table", "th", "td", "br"} <= set(tags)


def test_text_part_is_the_markdown_with_normalised_line_endings() -> None:
    """The text rendering keeps the markdown source, with LF line ends and no NULs."""
    assert render_markdown("# Hi\r\nthere\rnow\x00\n").text == "# Hi\nthere\nnow"


@given(st.text(max_size=400))
@settings(max_examples=150)
def test_any_markdown_renders_only_allowed_markup(markdown: str) -> None:
    """Whatever the agent writes, the HTML has no script, no handler, no unsafe URL."""
    html = render_markdown(markdown).html
    for tag, attrs in _tags(html):
        assert tag not in {"script", "style", "iframe", "object", "embed", "form"}
        for name, value in attrs:
            assert not name.startswith("on")
            if name in {"href", "src"}:
                assert urlsplit(value or "").scheme.lower() in {"", "http", "https", "mailto"}


# -- composition ---------------------------------------------------------------------


def test_message_is_alternative_text_and_html_without_attachments() -> None:
    """A plain message is multipart/alternative: text/plain first, then text/html."""
    message = _parse(build_message(DRAFT))
    assert message.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in message.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    assert "Your order has shipped." in message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "<strong>Bob</strong>" in message.get_body(("html",)).get_content()  # type: ignore[union-attr]


def test_attachments_make_mixed_around_the_alternative() -> None:
    """With attachments the message is multipart/mixed: the alternative, then each file."""
    data = bytes(range(256)) * 40
    draft = replace(
        DRAFT,
        attachments=[
            OutboundAttachment("report.pdf", "application/pdf", data),
            OutboundAttachment("résumé notes.txt", "text/plain", "naïve\n".encode()),
        ],
    )
    raw = build_message(draft)
    _assert_wire_safe(raw)
    message = _parse(raw)
    assert message.get_content_type() == "multipart/mixed"
    first, *files = message.iter_parts()
    assert first.get_content_type() == "multipart/alternative"
    assert [(f.get_filename(), f.get_content_type()) for f in files] == [
        ("report.pdf", "application/pdf"),
        ("résumé notes.txt", "text/plain"),
    ]
    assert files[0].get_payload(decode=True) == data


def test_headers_carry_identity_threading_and_extras() -> None:
    """Sender, recipients, date, ids, threading and extra headers arrive as given."""
    token = "v1." + "a" * 300
    unsubscribe = (
        "<mailto:unsub@acme.example>, <https://acme.example/v1/unsubscribe/" + "t" * 120 + ">"
    )
    draft = replace(
        DRAFT,
        reply_to=["help@acme.example"],
        in_reply_to="<prev@example.org>",
        references=["<root@example.org>", "<prev@example.org>"],
        extra_headers=[
            ("X-MultiMail-Agent", "key_01HX"),
            ("X-AI-Generated", "true"),
            ("X-MultiMail-Identity", token),
            ("List-Unsubscribe", unsubscribe),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ],
    )
    raw = build_message(draft)
    _assert_wire_safe(raw)
    message = _parse(raw)
    assert str(message["From"]) == "Acme Support <support@acme.example>"
    assert str(message["Reply-To"]) == "help@acme.example"
    assert str(message["To"]) == "bob@example.org"
    assert str(message["Cc"]) == "carol@example.net"
    assert message["Date"].datetime == draft.date
    assert message["Message-ID"] == draft.message_id
    assert message["In-Reply-To"] == "<prev@example.org>"
    assert message["References"] == "<root@example.org> <prev@example.org>"
    assert message["X-MultiMail-Identity"] == token
    assert message["List-Unsubscribe"] == unsubscribe
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # Receivers read these raw; an RFC 2047 encoding of a URL or token would break them.
    assert b"=?" not in raw.split(b"\r\n\r\n")[0]


def test_every_reply_to_address_is_in_one_reply_to_field() -> None:
    """Reply-To is an address-list (RFC 5322 3.6.2): every address the send accepted."""
    wanted = ["sales@acme.example", "o'brien+ops@example.org", "info@bücher.example"]
    raw = build_message(replace(DRAFT, reply_to=wanted))
    _assert_wire_safe(raw)
    assert _header_names(raw).count("reply-to") == 1
    written = [a.addr_spec for a in _parse(raw)["Reply-To"].addresses]
    assert written == [
        "sales@acme.example",
        "o'brien+ops@example.org",
        "info@xn--bcher-kva.example",
    ]


def test_a_bare_string_reply_to_is_one_address() -> None:
    """A str is a Sequence[str] to the type checker: it must not become one address per letter."""
    raw = build_message(replace(DRAFT, reply_to="help@acme.example"))
    assert str(_parse(raw)["Reply-To"]) == "help@acme.example"


def test_bcc_never_appears() -> None:
    """Blind copies travel in the envelope only: no Bcc header is ever written."""
    assert "bcc" not in _header_names(build_message(DRAFT))


def test_body_has_signature_and_footers() -> None:
    """The body ends with the signature after "-- ", the AI disclosure and the postal line."""
    draft = replace(
        DRAFT, signature="Best,\nAcme", operator_postal_address="1 Main St, Springfield"
    )
    body = compose_body(draft)
    assert body.index("Your order has shipped.") < body.index("-- \nBest,\nAcme")
    assert body.index("Acme") < body.index(AI_DISCLOSURE) < body.index("1 Main St, Springfield")
    message = _parse(build_message(draft))
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "This message was written by an AI agent." in html
    assert "1 Main St, Springfield" in html


def test_ai_disclosure_can_be_turned_off() -> None:
    """With ai_disclosure off and no signature or address, the body is just the markdown."""
    draft = replace(DRAFT, ai_disclosure=False)
    assert compose_body(draft) == DRAFT.markdown + "\n"


def test_non_ascii_subject_and_name_are_rfc2047_encoded() -> None:
    """Non-ASCII subjects and display names go out as encoded-words and decode back."""
    draft = replace(DRAFT, subject="Grüße — 你好", from_name="Zoë Agent")
    raw = build_message(draft)
    head = raw.split(b"\r\n\r\n")[0]
    assert head.isascii() and b"=?utf-8?" in head
    message = _parse(raw)
    assert message["Subject"] == "Grüße — 你好"
    assert message["From"].addresses[0].display_name == "Zoë Agent"


def test_idn_domains_are_punycoded() -> None:
    """An internationalised domain is written in its ASCII (IDNA) form."""
    message = _parse(build_message(replace(DRAFT, to=["info@bücher.example"])))
    assert str(message["To"]) == "info@xn--bcher-kva.example"


# -- header injection (RELIABILITY SMTP-4) --------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        "hi\r\nBcc: evil@attacker.example",
        "hi\nBcc: evil@attacker.example",
        "hi\rBcc: evil@attacker.example",
        "Re: =?utf-8?q?hi=0D=0ABcc:_evil@attacker.example?=",
        "Re: =?utf-8?b?aGkNCkJjYzogZXZpbEBhdHRhY2tlci5leGFtcGxl?=",
        "=?utf-8?q?=3D=3Futf-8=3Fq=3Fx=3D0D=3D0ABcc:_evil@attacker.example=3F=3D?=",
        "hi\x00\u2028\x85Bcc: evil@attacker.example",
    ],
)
def test_line_breaks_in_a_subject_fold_into_spaces(subject: str) -> None:
    """A subject (say an inbound one reused in a reply) can never add a header."""
    raw = build_message(replace(DRAFT, subject=subject))
    _assert_wire_safe(raw)
    assert _header_names(raw) == [*BASE_HEADERS, "content-type"]
    parsed = _parse(raw)["Subject"]
    assert "Bcc: evil@attacker.example" in parsed
    assert "\r" not in parsed and "\n" not in parsed


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("from_address", "support@acme.example\r\nBcc: evil@attacker.example"),
        ("reply_to", "a@acme.example\nBcc: evil@attacker.example"),
        ("to", ["bob@example.org\r\nBcc: evil@attacker.example"]),
        ("cc", ["=?utf-8?q?x=0D=0ABcc:_evil@attacker.example?=@example.org"]),
        ("to", ["bob@example.org\x00"]),
        ("from_name", "Acme\r\nBcc: evil@attacker.example"),
        ("from_name", "=?utf-8?q?Acme=0D=0ABcc:_evil@attacker.example?="),
        ("extra_headers", [("X-Agent", "a\r\nBcc: evil@attacker.example")]),
        ("extra_headers", [("X-Agent", "=?utf-8?q?a=0ABcc:_evil@attacker.example?=")]),
        ("extra_headers", [("X-Agent: x\r\nBcc", "evil@attacker.example")]),
        ("extra_headers", [("Bad Name", "x")]),
        ("attachments", [OutboundAttachment("a\r\nBcc: e@x.example", "text/plain", b"x")]),
        ("attachments", [OutboundAttachment("=?utf-8?q?a=0D=0A?=.txt", "text/plain", b"x")]),
    ],
)
def test_line_breaks_in_addresses_names_and_extra_headers_are_refused(
    field: str, value: Any
) -> None:
    """CR, LF or NUL (also RFC 2047-encoded) in any other header value is refused."""
    changes: dict[str, Any] = {field: value}
    with pytest.raises(InvalidInput) as caught:
        build_message(replace(DRAFT, **changes))
    assert caught.value.code == "header_injection"


@pytest.mark.parametrize(
    "address",
    [
        "not-an-address",
        "a@",
        "@example.org",
        "a b@example.org",
        "a@example.org, c@example.org",
        "Bob <bob@example.org>",
        "a@-bad-.example",
        "a@exa mple.org",
        "ünï@example.org",
        "a@example.org (comment)",
    ],
)
def test_invalid_addresses_are_refused(address: str) -> None:
    """Anything but one plain addr-spec is refused with invalid_address."""
    with pytest.raises(InvalidInput) as caught:
        build_message(replace(DRAFT, to=[address]))
    assert caught.value.code == "invalid_address"


@pytest.mark.parametrize("name", ["From", "bcc", "Content-Type", "DKIM-Signature", "Resent-To"])
def test_extra_headers_cannot_replace_ours(name: str) -> None:
    """Structural headers are set by MultiMail only; an extra header cannot override them."""
    with pytest.raises(InvalidInput) as caught:
        build_message(replace(DRAFT, extra_headers=[(name, "x@example.org")]))
    assert caught.value.code == "reserved_header"


def test_naive_dates_and_bad_message_ids_are_refused() -> None:
    """A date without a zone and a Message-ID not in <...> form are input errors."""
    with pytest.raises(InvalidInput):
        build_message(replace(DRAFT, date=datetime(2024, 5, 1, 12, 0)))
    with pytest.raises(InvalidInput) as caught:
        build_message(replace(DRAFT, message_id="no-brackets@acme.example"))
    assert caught.value.code == "invalid_message_id"


def test_date_is_written_in_utc() -> None:
    """A date given in another zone is sent as the same instant in UTC."""
    local = datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    message = _parse(build_message(replace(DRAFT, date=local)))
    assert message["Date"].datetime == local
    assert str(message["Date"]).endswith("+0000")


# -- wire safety properties ------------------------------------------------------------

header_text = st.text(max_size=200) | st.sampled_from(
    ["=?utf-8?q?a=0D=0AX-Evil:_1?=", "a\r\nX-Evil: 1", ".", "x" * 990, "é" * 300]
)


@given(
    subject=st.text(max_size=998) | header_text,
    name=header_text,
    markdown=st.text(max_size=2000) | st.sampled_from([".\n..\n.x", "a" * 5000, "é" * 3000]),
)
@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_any_subject_name_and_body_stay_wire_safe(subject: str, name: str, markdown: str) -> None:
    """No input yields a bare CR/LF or a line over 998 octets, or changes the header list."""
    draft = replace(DRAFT, subject=subject, from_name=name, markdown=markdown)
    try:
        raw = build_message(draft)
    except InvalidInput as exc:
        # Only a name with a line break, or one too long to be a name, is refused.
        assert exc.code in {"header_injection", "display_name_too_long"}
        return
    _assert_wire_safe(raw)
    assert _header_names(raw) == [*BASE_HEADERS, "content-type"]
    message = _parse(raw)
    assert [a.addr_spec for a in message["To"].addresses] == list(DRAFT.to)
    assert body_sha256(raw) == draft_body_sha256(draft)


@given(value=header_text, filename=header_text)
@settings(max_examples=120, deadline=None)
def test_any_extra_header_or_filename_adds_no_header(value: str, filename: str) -> None:
    """An extra header value or filename either is refused or leaves the header list as meant."""
    draft = replace(
        DRAFT,
        extra_headers=[("X-MultiMail-Agent", value)],
        attachments=[OutboundAttachment(filename, "application/octet-stream", b"\0data")],
    )
    try:
        raw = build_message(draft)
    except InvalidInput as exc:
        assert exc.code in {"header_injection", "invalid_filename", "header_too_long"}
        return
    _assert_wire_safe(raw)
    assert _header_names(raw) == [*BASE_HEADERS, "x-multimail-agent", "content-type"]


@given(
    address=st.emails()
    | st.text(max_size=80)
    | st.builds(lambda a, b: f"{a}@{b}", st.text(max_size=30), st.text(max_size=30))
)
@settings(max_examples=200, deadline=None)
def test_any_address_is_refused_or_is_the_only_recipient(address: str) -> None:
    """An address string either is refused or becomes exactly one recipient, no other header."""
    try:
        raw = build_message(replace(DRAFT, to=[address], cc=[]))
    except InvalidInput as exc:
        assert exc.code in {"invalid_address", "header_injection"}
        return
    _assert_wire_safe(raw)
    message = _parse(raw)
    assert [n for n in _header_names(raw) if n in {"to", "cc", "bcc"}] == ["to"]
    [recipient] = message["To"].addresses
    assert recipient.addr_spec.lower() == address.strip().lower() or "xn--" in recipient.domain


def test_deeply_nested_encodings_are_refused() -> None:
    """A value encoded inside itself many times is an attack, not a subject."""
    subject = "x"
    for _ in range(11):  # 11 levels still fit in 998 characters
        subject = "=?utf-8?b?" + base64.b64encode(subject.encode()).decode() + "?="
    with pytest.raises(InvalidInput) as caught:
        build_message(replace(DRAFT, subject=subject))
    assert caught.value.code == "header_injection"


# -- body hash ---------------------------------------------------------------------------


@given(markdown=st.text(max_size=2000), signature=st.none() | st.text(max_size=200))
@settings(max_examples=120, deadline=None)
def test_body_hash_survives_a_parse_round_trip(markdown: str, signature: str | None) -> None:
    """The body hash is the same on our bytes and on the stdlib's re-serialisation of them."""
    draft = replace(DRAFT, markdown=markdown, signature=signature)
    raw = build_message(draft)
    expected = draft_body_sha256(draft)
    assert body_sha256(raw) == expected
    assert body_sha256(_parse(raw).as_bytes()) == expected
    compat = email.message_from_bytes(raw)
    assert body_sha256(compat.as_bytes()) == expected
    assert body_sha256(compat.as_string().encode()) == expected


@pytest.fixture(scope="module")
def smtp_server() -> Iterator[CapturingSMTPServer]:
    with CapturingSMTPServer() as server:
        yield server


@given(
    markdown=st.text(max_size=600)
    | st.sampled_from([".", ".\n.\n..", "a\n.\nb", ".leading\n..two\n", "é\n." * 50])
)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_body_hash_survives_smtp(smtp_server: CapturingSMTPServer, markdown: str) -> None:
    """After SMTP (dot-stuffed by the client, unstuffed by the server) the hash is unchanged."""
    smtp_server.clear()
    draft = replace(DRAFT, markdown=markdown)
    raw = build_message(draft)
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=5) as client:
        client.sendmail(DRAFT.from_address, list(DRAFT.to), raw)
    [received] = smtp_server.wait_for(1, timeout=5)
    assert body_sha256(received.data) == draft_body_sha256(draft)
    assert received.data.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")


# -- the fast writer against the email package ---------------------------------------------


def _reference_build(draft: OutboundDraft) -> bytes:
    """The message as EmailMessage + BytesGenerator write it from the same checked values."""
    sender = compose._address(draft.from_address, "from")
    msg = EmailMessage(policy=compose._POLICY)
    name = compose._display_name(draft.from_name)
    msg["From"] = Address(display_name=name, addr_spec=sender)
    if draft.reply_to:
        msg["Reply-To"] = [
            Address(addr_spec=compose._address(a, "reply_to")) for a in draft.reply_to
        ]
    for field, addresses in (("To", draft.to), ("Cc", draft.cc)):
        if addresses:
            msg[field] = [Address(addr_spec=compose._address(a, field)) for a in addresses]
    msg["Subject"] = compose.safe_subject(draft.subject)
    msg["Date"] = format_datetime(draft.date.astimezone(UTC))
    msg["Message-ID"] = compose._RawHeader("Message-ID", draft.message_id)
    if draft.in_reply_to:
        msg["In-Reply-To"] = compose._RawHeader("In-Reply-To", draft.in_reply_to)
    if draft.references:
        msg["References"] = compose._RawHeader("References", " ".join(draft.references))
    msg["MIME-Version"] = "1.0"
    for header, value in draft.extra_headers:
        field_name, field_value = compose._extra_header(header, value)
        msg[field_name] = field_value
    msg.set_content(render_markdown(compose_body(draft)).text)
    # The HTML is the body's and the footers' renderings side by side (tested apart below).
    msg.add_alternative(compose._html_document(compose.compose_html(draft)), subtype="html")
    for attachment in draft.attachments:
        maintype, subtype = compose._attachment_type(attachment)
        filename = compose._filename(attachment.filename)
        msg.add_attachment(attachment.data, maintype, subtype, filename=filename)
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    return msg.as_bytes(policy=compose._POLICY)


def _lf(content: object) -> object:
    # Line ends of a text part are the transport's: 7bit keeps CRLF, QP and base64 keep LF.
    return content.replace("\r\n", "\n") if isinstance(content, str) else content


_TEXT_FIELDS = re.compile(r"from|subject|x-.*", re.IGNORECASE)


def _shape(raw: bytes) -> tuple[list[tuple[str, object]], list[tuple[object, ...]]]:
    """What a receiver sees: each header decoded (of From its addresses only; the text of
    From, Subject and the extra fields is ``_texts``'s), and each part's type, name and
    content."""
    message = _parse(raw)
    headers: list[tuple[str, object]] = []
    for name, value in message.items():
        key = name.lower()
        if key == "content-type":
            headers.append((key, message.get_content_type()))
        elif key == "from":
            headers.append((key, [a.addr_spec for a in value.addresses]))
        else:
            headers.append((key, None if _TEXT_FIELDS.fullmatch(key) else str(value)))
    parts: list[tuple[object, ...]] = []
    for part in message.walk():
        if part.is_multipart():
            parts.append((part.get_content_type(), [n.lower() for n in part]))
            continue
        parts.append(
            (
                part.get_content_type(),
                part.get_content_charset(),
                part.get_filename(),
                part.get_content_disposition(),
                _lf(part.get_content()),
                sorted(n.lower() for n in part),
            )
        )
    return headers, parts


def _rfc2047(text: str) -> str:
    """Header text as a mail reader following RFC 2047 shows it: adjacent encoded-words
    joined, the white space between them dropped (6.2), as ``email.header.decode_header``
    does. (The email package's own parser keeps that white space in a display name.)"""
    return "".join(
        part.decode(charset or "ascii") if isinstance(part, bytes) else part
        for part, charset in decode_header(text)
    )


def _texts(raw: bytes) -> list[tuple[str, str]]:
    """(field, text) of the From display name, the Subject and the extra fields, in order,
    as an RFC 2047 reader shows them: unfolded (RFC 5322 2.2.3), a quoted display name
    unquoted, encoded-words decoded by ``_rfc2047``."""
    fields = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    texts = []
    for name, value in fields.items():
        key = name.lower()
        if not _TEXT_FIELDS.fullmatch(key):
            continue
        text = re.sub(r"\r?\n(?=[ \t])", "", str(value))
        if key == "from":
            phrase = text.rsplit(" <", 1)[0] if text.endswith(">") else ""
            text = unquote(phrase) if phrase.startswith('"') else _rfc2047(phrase)
        else:
            text = _rfc2047(text)
        texts.append((key, text))
    return texts


def _meant_texts(draft: OutboundDraft) -> list[tuple[str, str]]:
    """What ``_texts`` must give for ``draft``: the name, subject and extra values as the
    composer's checks leave them (encoded-words decoded, line breaks in a subject folded
    into spaces, a name stripped); a printable ASCII extra value is written as given."""
    texts = [
        ("from", compose._display_name(draft.from_name)),
        ("subject", compose.safe_subject(draft.subject)),
    ]
    for header, value in draft.extra_headers:
        name, written = compose._extra_header(header, value)
        raw = isinstance(written, compose._RawHeader)
        texts.append((name.lower(), _rfc2047(written) if raw else written))
    return texts


def _assert_reads_like_the_email_packages(draft: OutboundDraft) -> None:
    """Our writer and the email package give the same headers and decoded parts for
    ``draft``, or both refuse it; what we write is wire-safe, and its text fields read as
    meant. (Not as the email package's: its writer puts a real space between two
    encoded-words, which RFC 2047 readers drop.)"""
    try:
        reference: bytes | None = _reference_build(draft)
    except InvalidInput:
        reference = None
    try:
        ours = build_message(draft)
    except InvalidInput:
        assert reference is None
        return
    assert reference is not None
    _assert_wire_safe(ours)
    assert _shape(ours) == _shape(reference)
    assert _texts(ours) == _meant_texts(draft)


_names = st.text(max_size=80) | st.sampled_from(
    ["Acme Support", "J. Smith", 'Say "hi"', "back\\slash", "Zoë", "a" * 70, "=?x?=", "a  b"]
)
_subjects = st.text(max_size=300) | st.sampled_from(
    ["", " lead", "trail ", "a  b", "Re: " + "word " * 40, "x" * 120, "tab\there", "=?bad?="]
)
_filenames = st.text(min_size=1, max_size=60) | st.sampled_from(
    ["report.pdf", "a b.txt", 'q"uote.txt', "résumé.txt", "x" * 200, "=?utf-8?q?a?=.txt"]
)


@given(
    name=_names,
    subject=_subjects,
    markdown=st.text(max_size=1500)
    | st.sampled_from(["a" * 100, "line  \nnext\t\n", "é" * 400, "= sign =3D", "--==", ""]),
    to=st.lists(st.emails() | st.sampled_from(["o'brien+x@example.org"]), min_size=1, max_size=3),
    reply_to=st.none() | st.lists(st.emails(), max_size=3),
    extra=st.lists(
        st.tuples(st.sampled_from(["X-Agent", "X-Note"]), st.text(max_size=120)), max_size=2
    ),
    attachments=st.lists(
        st.builds(
            OutboundAttachment,
            _filenames,
            st.sampled_from(["application/pdf", "text/plain", "image/png", "message/rfc822"]),
            st.binary(max_size=300),
        ),
        max_size=2,
    ),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_written_message_reads_like_the_email_packages(
    name: str,
    subject: str,
    markdown: str,
    to: list[str],
    reply_to: list[str] | None,
    extra: list[tuple[str, str]],
    attachments: list[OutboundAttachment],
) -> None:
    """Our writer and the email package give the same headers and decoded parts, or both refuse."""
    draft = replace(
        DRAFT,
        from_name=name,
        subject=subject,
        markdown=markdown,
        to=to,
        reply_to=reply_to,
        extra_headers=extra,
        attachments=attachments,
    )
    _assert_reads_like_the_email_packages(draft)


@given(st.text(max_size=200).filter(lambda s: "=?" not in s))
@settings(max_examples=300)
def test_values_without_encoded_words_decode_to_themselves(value: str) -> None:
    """The shortcut in the decode check agrees with the email package's own header parser."""
    decoded = str(email.policy.default.header_factory("x-multimail-check", value))
    if decoded == value:
        assert compose._decode_like_email_package(value) == value
    else:
        assert compose._SURROGATES.search(value)


def _reference_address(value: str) -> str | None:
    """The address check as written with the idna codec and the email package only."""
    value = compose._refuse_breaks(value, "to").strip()
    if "@" not in value:
        return None
    local, _, domain = value.rpartition("@")
    try:
        # IDNA 2008, as the service stores addresses (the stdlib codec is IDNA 2003).
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii") if domain else ""
    except UnicodeError:
        ascii_domain = ""
    spec = f"{local}@{ascii_domain.lower()}"
    try:
        parsed = Address(addr_spec=spec)
    except (ValueError, IndexError, email.errors.HeaderParseError):
        return None
    valid = (
        parsed.addr_spec == spec
        and spec.isascii()
        and len(spec) <= 254
        and bool(parsed.username)
        and compose._HOSTNAME.fullmatch(ascii_domain) is not None
    )
    return spec if valid else None


@given(
    st.emails()
    | st.text(max_size=60)
    | st.builds(
        lambda a, b: f"{a}@{b}",
        st.text(st.sampled_from('ab.+"\\ (),:;<>[]=?é'), max_size=12),
        st.sampled_from(["example.org", "Example.ORG", "bücher.example", "a..b", "-a.b", "x"]),
    )
)
@settings(max_examples=400, deadline=None)
def test_address_check_agrees_with_the_email_package(value: str) -> None:
    """The shortcut for plain dot-atom addresses accepts and rewrites exactly as before."""
    try:
        ours: str | None = compose._address(value, "to")
    except InvalidInput:
        ours = None
    try:
        expected = _reference_address(value)
    except InvalidInput:
        expected = None
    assert ours == expected


# -- the body's HTML rendered once, the footers' kept per mailbox ---------------------------

_ORDINARY_BODIES = [
    "Hello **Bob**,\n\nYour order has shipped.",
    "# Heading\n\nSome *text* and a [link](https://example.org).",
    "- one\n- two\n  - nested\n\n1. first\n2. second",
    "> quoted\n> reply\n\nAnswer.",
    "```python\nprint('hi')\n```",
    "    indented code\n    more",
    "| a | b |\n|---|--:|\n| 1 | 2 |",
    "Trailing spaces   \n\n\n",
    "Line one\nline two\r\nline three\rend",
    "Zoë writes ünïcode — and emoji 🎉",
    "Setext\n===",
    "",
]


@pytest.mark.parametrize("markdown", _ORDINARY_BODIES)
@pytest.mark.parametrize(
    ("signature", "postal"), [(None, None), ("Best,\nAcme", "1 Main St"), ("---", None)]
)
def test_body_and_footers_rendered_apart_read_as_one_rendering(
    markdown: str, signature: str | None, postal: str | None
) -> None:
    """For ordinary bodies, the body's HTML followed by the footers' HTML is exactly the
    rendering of the whole text part, as it was when the whole body was rendered at once."""
    draft = replace(DRAFT, markdown=markdown, signature=signature, operator_postal_address=postal)
    assert compose.compose_html(draft) == render_markdown(compose_body(draft)).html


def test_a_body_cannot_swallow_the_ai_disclosure() -> None:
    """An unclosed code fence or an indented block at the end of the body stays in the body:
    the signature and the AI disclosure are still rendered as themselves."""
    for markdown in ("```\nunclosed fence", "- item\n\n      indented"):
        draft = replace(DRAFT, markdown=markdown, signature="Acme")
        html = compose.compose_html(draft)
        assert html.endswith(
            "<p>--<br>\nAcme</p>\n<hr>\n<p><em>This message was written by an AI agent.</em></p>\n"
        )


@given(
    markdown=st.text(max_size=600) | st.sampled_from(_ORDINARY_BODIES),
    signature=st.none() | st.text(max_size=80),
    disclosure=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_the_stored_body_html_gives_the_same_message(
    markdown: str, signature: str | None, disclosure: bool
) -> None:
    """A draft built from the HTML stored at send time (``render_markdown(markdown).html``)
    reads exactly like one that renders the markdown itself: same headers, same parts."""
    draft = replace(DRAFT, markdown=markdown, signature=signature, ai_disclosure=disclosure)
    stored = replace(draft, body_html=render_markdown(markdown).html)
    assert _shape(build_message(stored)) == _shape(build_message(draft))


def test_the_html_part_is_the_stored_html_and_the_text_part_the_markdown() -> None:
    """The stored HTML is what goes out (the edit a reviewer approved, re-rendered by
    oversight), and the text part still comes from the markdown, unchanged."""
    edited = "Hi Bob,\n\n*Final* figures."
    draft = replace(DRAFT, markdown=edited, body_html=render_markdown(edited).html)
    message = _parse(build_message(draft))
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "<p><em>Final</em> figures.</p>" in html and AI_DISCLOSURE.strip("*") in html
    assert text.replace("\r\n", "\n") == compose_body(draft)


_LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_REFERENCE_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f\x7f]")


@given(
    st.text(
        st.characters(codec=None)
        | st.sampled_from([*_LINE_BREAKS, "\t", "\x00", "\x7f", "\ud800", "\u00e9", " "]),
        max_size=200,
    )
)
@settings(max_examples=400)
def test_normalise_text_matches_its_definition(text: str) -> None:
    """The fast path for already-normal text gives what the full normalisation gives."""
    reference = _REFERENCE_CONTROLS.sub(
        "", "\n".join(re.sub("[\ud800-\udfff]", "\ufffd", text).splitlines())
    )
    assert normalise_text(text) == reference


@given(st.datetimes(timezones=st.timezones()))
@settings(max_examples=300)
def test_date_header_is_what_the_email_package_writes(when: datetime) -> None:
    """The Date field is format_datetime's, in UTC, byte for byte."""
    expected = f"Date: {format_datetime(when.astimezone(UTC))}\r\n".encode("ascii")
    assert compose._date_header(when) == expected


@given(
    st.text(st.sampled_from("ab =\t\r\né.<>"), max_size=400)
    | st.text(max_size=300)
    | st.sampled_from(["x" * 500 + " \n" + "y" * 300 + "\t", "=" * 200, " \n\t\n"])
)
@settings(max_examples=400)
def test_text_encoding_is_the_email_packages_choice(text: str) -> None:
    """The transfer encoding and bytes of a text part are the email package's: LF-based
    encoding with its line ends turned into CRLF (b2a_qp fed CRLF wraps differently)."""
    cte, payload = compose._encode_text(text)
    data = text.encode("utf-8", "surrogatepass")
    lines = data.splitlines()
    if data.isascii() and max(map(len, lines), default=0) <= 78:
        assert (cte, payload) == ("7bit", b"\r\n".join(lines) + b"\r\n")
        return
    body = b"\n".join(lines) + b"\n"
    eight_bit = len(body.translate(None, bytes(range(128))))
    if 6 * (eight_bit + body.count(b"=")) > len(body):
        expected = ("base64", base64.encodebytes(body).replace(b"\n", b"\r\n"))
    else:
        qp = binascii.b2a_qp(body, istext=True).replace(b"\n", b"\r\n")
        expected = ("quoted-printable", qp)
    assert (cte, payload) == expected


def test_the_shared_sanitiser_gives_every_thread_the_same_safe_html() -> None:
    """The sanitiser is built once and shared; the delivery worker renders in threads."""
    markdown = "Hi **X** <script>x</script> [a](javascript:alert(1)) [b](https://ok.example)\n\n"
    expected = render_markdown(markdown * 5).html
    assert "<script" not in expected and 'href="javascript' not in expected
    results: list[bool] = []

    def work() -> None:
        results.append(all(render_markdown(markdown * 5).html == expected for _ in range(300)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 4


_non_ascii = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zl", "Zp"])
    | st.sampled_from(list(' ,;:"()<>@\\.ë日本éß\u2013\u2014\u00a0\t')),
    min_size=1,
    max_size=50,
)


@given(name=_non_ascii, subject=_non_ascii, extra=_non_ascii)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_non_ascii_names_and_subjects_read_like_the_email_packages(
    name: str, subject: str, extra: str
) -> None:
    """Non-ASCII display names, subjects and extra headers, written here as base64
    encoded-words, decode to what was meant, and the rest reads as the email package's
    message; a name with commas, quotes or an address in it is still one display name."""
    draft = replace(DRAFT, from_name=name, subject=subject, extra_headers=[("X-Note", extra)])
    ours = build_message(draft)
    _assert_wire_safe(ours)
    assert _shape(ours) == _shape(_reference_build(draft))
    assert _texts(ours) == _meant_texts(draft)
    assert [a.addr_spec for a in _parse(ours)["From"].addresses] == [DRAFT.from_address]


def test_non_ascii_from_and_subject_are_encoded_words_written_here() -> None:
    """The common non-ASCII shapes skip the email package (half a millisecond each)."""
    draft = replace(DRAFT, from_name="Zoë Müller", subject="Rückfrage \u2013 Bestellung")
    head = build_message(draft).split(b"\r\n\r\n")[0]
    assert b"From: =?utf-8?b?Wm/DqyBNw7xsbGVy?= <support@acme.example>\r\n" in head
    assert b"Subject: =?utf-8?b?UsO8Y2tmcmFnZSDigJMgQmVzdGVsbHVuZw==?=\r\n" in head


_printable_with_spaces = st.text(
    st.characters(exclude_categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"])
    | st.sampled_from([" ", " ", "\u00a0"]),
    max_size=256,
).filter(lambda text: "=?" not in text)  # encoded-words in a value are decoded first


@example(name="Müller 山田 and de Générale サポート für", subject="Hello")
@example(
    name="",
    subject="Ваша заявка принята в работу специалистом службы поддержки клиентов компании ",
)
@example(
    name="J. Smith, Acme Corporation Customer Support Team for Europe and the Middle East",
    subject=" lead  and trail ",
)
@given(name=_printable_with_spaces, subject=_printable_with_spaces)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_printable_name_and_subject_read_back_whole_on_short_lines(
    name: str, subject: str
) -> None:
    """RFC 2047 6.2: readers drop the white space between two adjacent encoded-words, so
    every space of a name or subject is carried inside a word (recipients read
    "…サポートfür" for "…サポート für" otherwise). Read as such a reader reads them, the
    name is the one given less blanks at its ends (a name is stripped) and the subject is
    exactly the one given, blanks at its ends and runs of them included; and every header
    line stays within 78 characters (RFC 5322 2.1.1)."""
    raw = build_message(replace(DRAFT, from_name=name, subject=subject))
    assert _texts(raw) == [("from", name.strip()), ("subject", subject)]
    head = raw.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78, head.decode()


@given(
    names=st.lists(
        _non_ascii | st.text(st.sampled_from("ab .'%*=?\"\\"), max_size=90), min_size=1, max_size=2
    )
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_attachment_names_read_like_the_email_packages(names: list[str]) -> None:
    """Filenames written here (quoted, or RFC 2231 percent-encoded UTF-8, on one line or
    folded onto a second) give the email package's decoded names, or both refuse."""
    files = [OutboundAttachment(n, "application/pdf", b"data") for n in names]
    draft = replace(DRAFT, attachments=files)
    _assert_reads_like_the_email_packages(draft)


def _wire_is_safe(raw: bytes) -> bool:
    """The wire rule itself: CRLF line ends only, ASCII, no NUL, lines of 998 at most."""
    body, _, rest = raw.rpartition(b"\r\n")
    lines = body.split(b"\r\n")
    return (
        raw.endswith(b"\r\n")
        and not rest
        and all(b"\r" not in line and b"\n" not in line for line in lines)
        and b"\0" not in raw
        and raw.isascii()
        and all(len(line) <= 998 for line in lines)
    )


@given(
    st.lists(
        st.sampled_from([b"a", b"\r\n", b"\r", b"\n", b"\0", b"\xe9", b"\n\r", b"x" * 500]),
        max_size=12,
    ).map(b"".join)
)
@settings(max_examples=1000)
def test_the_wire_check_is_the_wire_rule(raw: bytes) -> None:
    """_check_wire refuses exactly what breaks the rule (bare CR or LF, NUL, 8-bit, a line
    over 998 octets, no final CRLF)."""
    try:
        compose._check_wire(raw)
    except InvalidInput:
        assert not _wire_is_safe(raw)
    else:
        assert _wire_is_safe(raw)


def test_stored_html_is_sanitised_again_before_it_is_sent() -> None:
    """HTML kept in the database is not trusted as is: a row written by anything else, or
    under older rules, still goes out through the allow-list."""
    stored = '<p>Hi</p><script>alert(1)</script><a href="javascript:x" onclick="y">z</a>'
    html = compose.compose_html(replace(DRAFT, body_html=stored))
    assert "<script" not in html and "javascript:" not in html and "onclick" not in html
    assert html.startswith("<p>Hi</p>")
