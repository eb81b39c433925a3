"""Review: the From field written here as an encoded-word (non-ASCII display names) is
split for the DKIM signer exactly as the signer's parser reads it, verifies with dkimpy,
and decodes to the display name given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from email import policy
from email.parser import BytesParser

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multimail.errors import InvalidInput
from multimail.mail import compose
from multimail.mail.compose import OutboundAttachment, compose_message
from multimail.mail.dkim import DkimKeyPair
from multimail.workers import signing
from tests.unit import test_dkim
from tests.unit.test_dkim import DOMAIN, DRAFT, SELECTOR, sign_composed_checked

keypair = test_dkim.keypair
dnsfunc = test_dkim.dnsfunc

_names = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"])
    | st.sampled_from(list(' ,;:"()<>@\\.ë日本éß\u2013\u00a0\t=?')),
    min_size=1,
    max_size=40,
)


@given(
    name=_names,
    subject=_names | st.text(st.sampled_from("äö ü"), min_size=100, max_size=400),
    markdown=st.sampled_from(["", "x", "Grüße\n\n.\n.."]),
    filename=st.sampled_from(["résumé.pdf", "日本語の長いファイル名" * 3 + ".txt", "a b.txt"]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_non_ascii_from_names_sign_and_decode(
    keypair: DkimKeyPair,
    dnsfunc: Callable[[bytes, int], bytes | None],
    name: str,
    subject: str,
    markdown: str,
    filename: str,
) -> None:
    draft = replace(
        DRAFT,
        from_name=name,
        subject=subject,
        markdown=markdown,
        attachments=[OutboundAttachment(filename, "application/pdf", b"%PDF")],
    )
    try:
        composed = compose_message(draft)
    except InvalidInput:
        return
    key = signing.SigningKey(DOMAIN, SELECTOR, keypair.private_pem)
    signed = sign_composed_checked(composed, key, dnsfunc)
    parsed = BytesParser(policy=policy.default).parsebytes(signed)
    sender = parsed["From"].addresses
    assert [a.addr_spec for a in sender] == [DRAFT.from_address]
    given = compose._display_name(name)
    if given.isascii() or len(given.encode()) > 42:
        # Names the email package writes: it may merge blanks, and its reader puts a space
        # between two encoded-words of one display name (why compose writes one word).
        assert "".join(sender[0].display_name.split()) == "".join(given.split())
    else:
        # The encoded-word carries the name exactly (a TAB too); the email package's reader
        # hands a decoded TAB back as a space.
        assert sender[0].display_name == given.replace("\t", " ")
    assert [p.get_filename() for p in parsed.iter_attachments()] == [filename]
