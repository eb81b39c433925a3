"""CPU per outbound message: compose (MIME) + DKIM-sign, ours beside the email package/dkimpy.

    .venv/bin/python bench/bench_compose.py [--seconds 1.0] [--json FILE]

The delivery worker composes and signs every message; this measures both steps on a
typical ~5 KB message (four paragraphs, text + HTML) and on one with two attachments. The
"stored HTML" and "fields from compose" rows are the delivery worker's path: the body HTML
rendered when the message was sent (``OutboundDraft.body_html``), and the header fields
``compose_message`` read back handed to the signer (``signing.sign_composed``). The
baseline, measured in the same run on the same drafts, is how the work was done before:
``EmailMessage`` + ``BytesGenerator`` writing the message, and dkimpy parsing and
canonicalising it with only the RSA step done by OpenSSL. Figures are CPU time of this
process (``time.process_time``), so other load on the machine distorts them less than wall
time; "per core" is what one core sustains on these two steps alone.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from functools import partial
from pathlib import Path

import dkim
from _drafts import bench_draft
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from multimail.mail import compose
from multimail.mail import dkim as our_dkim
from multimail.mail.compose import (
    OutboundAttachment,
    OutboundDraft,
    build_message,
    compose_message,
    draft_body_sha256,
)
from multimail.mail.dkim import dns_txt_value, generate_rsa_keypair, sign_message
from multimail.mail.identity import (
    IdentityClaims,
    SigningKeyring,
    identity_header_value,
    issue_identity_token,
    new_signing_key,
)
from multimail.mail.markdown import render_markdown
from multimail.workers.signing import SigningKey, sign_composed

DOMAIN = "bench.example"
SELECTOR = "bench"
DRAFT = bench_draft(
    DOMAIN,
    extra_headers=[
        ("X-MultiMail-Agent", "agent (key_bench)"),
        ("X-AI-Generated", "true"),
        ("List-Unsubscribe", f"<mailto:unsubscribe@{DOMAIN}>, <https://{DOMAIN}/u/t0k3n>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ("X-MultiMail-Identity", "v1." + "a" * 180),
    ],
)
WITH_FILES = replace(
    DRAFT,
    attachments=[
        OutboundAttachment("report.pdf", "application/pdf", bytes(range(256)) * 16),
        OutboundAttachment("notes.txt", "text/plain", b"plain notes\n" * 50),
    ],
)


def _email_package_build(draft: OutboundDraft) -> bytes:
    """The previous writer: the same checks, then EmailMessage + BytesGenerator."""
    sender = compose._address(draft.from_address, "from")
    recipients = [compose._address(a, "to") for a in draft.to]
    msg = EmailMessage(policy=compose._POLICY)
    msg["From"] = Address(compose._display_name(draft.from_name), addr_spec=sender)
    msg["To"] = [Address(addr_spec=a) for a in recipients]
    msg["Subject"] = compose.safe_subject(draft.subject)
    msg["Date"] = format_datetime(draft.date.astimezone(UTC))
    msg["Message-ID"] = compose._RawHeader("Message-ID", draft.message_id)
    msg["MIME-Version"] = "1.0"
    for name, value in draft.extra_headers:
        field_name, field_value = compose._extra_header(name, value)
        msg[field_name] = field_value
    rendered = render_markdown(compose.compose_body(draft))
    msg.set_content(rendered.text)
    msg.add_alternative(compose._html_document(rendered.html), subtype="html")
    for attachment in draft.attachments:
        maintype, subtype = compose._attachment_type(attachment)
        msg.add_attachment(
            attachment.data, maintype, subtype, filename=compose._filename(attachment.filename)
        )
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    raw = msg.as_bytes(policy=compose._POLICY)
    compose._check_wire(raw)
    intended = [name.lower() for name in msg]
    compose._check_headers(raw, intended, sender, {"to": recipients, "cc": []}, None, parse=True)
    return raw


def _dkimpy_sign(raw: bytes, private_pem: bytes) -> bytes:
    """The previous signer: dkimpy's parsing, canonicalisation and hashing, OpenSSL RSA."""
    key = our_dkim._load_private_key(private_pem)
    message = dkim.DKIM(raw, signature_algorithm=b"rsa-sha256", linesep=b"\r\n")
    present = [name.lower() for name, _ in message.headers]
    include = our_dkim._choose_headers(present, None)
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    body_hash = dkim.hashlib.sha256(policy.canonicalize_body(message.body)).digest()
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", DOMAIN.encode()),
        (b"i", b"@" + DOMAIN.encode()),
        (b"q", b"dns/txt"),
        (b"s", SELECTOR.encode()),
        (b"t", str(int(time.time())).encode()),
        (b"h", b" : ".join(include)),
        (b"bh", dkim.base64.b64encode(body_hash)),
        (b"b", b"0" * 60),
    ]
    value = dkim.RE_BTAG.sub(
        b"\\1", dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=14)
    )
    hasher = dkim.HashThrough(dkim.hashlib.sha256(), False)
    headers = policy.canonicalize_headers(message.headers)
    dkim.hash_headers(
        hasher, policy, headers, include, (b"DKIM-Signature", b" " + value), dict(fields)
    )
    signature = key.sign(hasher.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    fields[-1] = (b"b", dkim.base64.b64encode(signature))
    folded: bytes = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=14)
    return b"DKIM-Signature: " + folded + raw


def _cpu_us(work: Callable[[], object], seconds: float) -> float:
    work()  # warm caches before timing
    count = 0
    start = time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        work()
        count += 1
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU time per figure")
    parser.add_argument("--json", type=Path, default=None, help="also write figures here")
    args = parser.parse_args()
    keypair = generate_rsa_keypair(2048)
    record = dns_txt_value(keypair).encode()
    figures: dict[str, float] = {}

    def ours_sign(raw: bytes) -> bytes:
        return sign_message(raw, domain=DOMAIN, selector=SELECTOR, private_pem=keypair.private_pem)

    dkim_key = SigningKey(DOMAIN, SELECTOR, keypair.private_pem)
    print("CPU µs per message                 ours   before   before/ours")
    for label, draft in (("typical", DRAFT), ("attachments", WITH_FILES)):
        # As the delivery worker builds it: the body's HTML was stored when it was sent.
        stored = replace(draft, body_html=render_markdown(draft.markdown).html)
        raw = build_message(draft)
        for signed in (ours_sign(raw), _dkimpy_sign(raw, keypair.private_pem)):
            if not dkim.verify(signed, dnsfunc=lambda name, timeout=5: record):
                raise SystemExit("a signature does not verify with dkimpy")
        rows = {
            "compose": (
                _cpu_us(partial(build_message, draft), args.seconds),
                _cpu_us(partial(_email_package_build, draft), args.seconds),
            ),
            "sign": (
                _cpu_us(partial(ours_sign, raw), args.seconds),
                _cpu_us(partial(_dkimpy_sign, raw, keypair.private_pem), args.seconds),
            ),
        }
        composed = compose_message(stored)
        signed = sign_composed(composed, dkim_key)
        if not dkim.verify(signed, dnsfunc=lambda name, timeout=5: record):
            raise SystemExit("a signature from compose's fields does not verify with dkimpy")
        rows["compose, stored HTML"] = (
            _cpu_us(partial(compose_message, stored), args.seconds),
            rows["compose"][1],
        )
        rows["sign, fields from compose"] = (
            _cpu_us(partial(sign_composed, composed, dkim_key), args.seconds),
            rows["sign"][1],
        )
        both = (
            rows["compose, stored HTML"][0] + rows["sign, fields from compose"][0],
            rows["compose"][1] + rows["sign"][1],
        )
        rows["compose (stored) + sign"] = both
        print(f"-- {label} message, {len(raw)} bytes")
        for name, (ours, before) in rows.items():
            print(f"  {name:<31} {ours:7.0f} {before:8.0f} {before / ours:10.1f}x")
            key = re.sub(r"\W+", "_", name.replace(" + ", " and ")).strip("_")
            figures[f"{label}_{key}_us"] = ours
            figures[f"{label}_{key}_before_us"] = before
        print(f"  per core: {1e6 / both[0]:.0f} messages/s (before {1e6 / both[1]:.0f})")
    render = _cpu_us(lambda: render_markdown(compose.compose_body(DRAFT)), args.seconds)
    rsa_key = our_dkim._load_private_key(keypair.private_pem)
    rsa = _cpu_us(
        lambda: rsa_key.sign(b"\0" * 32, padding.PKCS1v15(), Prehashed(hashes.SHA256())),
        args.seconds,
    )
    ring = SigningKeyring(None, [identity_key := new_signing_key(now=0)], identity_key.kid)
    claims = IdentityClaims(
        mailbox=DRAFT.from_address,
        operator="Bench operator",
        oversight_mode="autonomous",
        agent_key_id="key_bench",
        agent_key_name="agent",
        approval=None,
        body_sha256=draft_body_sha256(DRAFT),
        message_id=DRAFT.message_id,
        issued_at=1_700_000_000,
        issuer="https://bench.example",
    )
    token = _cpu_us(lambda: identity_header_value(issue_identity_token(claims, ring)), args.seconds)
    body_hash = _cpu_us(partial(draft_body_sha256, DRAFT), args.seconds)
    print(
        f"of which markdown → HTML (typical): {render:.0f} µs; one RSA-2048 signature: {rsa:.0f} µs"
    )
    print(
        f"beside them: identity token {token:.0f} µs (Ed25519 inside); "
        f"draft_body_sha256 {body_hash:.0f} µs"
    )
    figures.update(markdown_us=render, rsa_us=rsa, identity_token_us=token, body_hash_us=body_hash)
    if args.json:
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
