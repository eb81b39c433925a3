"""DKIM signatures per second: our OpenSSL-backed signer against plain ``dkim.sign``.

    .venv/bin/python bench/bench_dkim.py [--seconds 2.0]

Both sign the same ~5 KB message with the same RSA-2048 key, relaxed/relaxed, the same
header list; every signature from ours is checked once with dkimpy first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dkim
from _drafts import bench_draft
from _support import rate

from multimail.mail.compose import ComposedMessage, compose_message
from multimail.mail.dkim import dns_txt_value, generate_rsa_keypair, sign_message
from multimail.workers.signing import SigningKey, sign_composed

DOMAIN = "bench.example"
SELECTOR = "bench"


def _message() -> ComposedMessage:
    return compose_message(bench_draft(DOMAIN))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per signer")
    parser.add_argument("--json", type=Path, default=None, help="also write figures here")
    args = parser.parse_args()

    keypair = generate_rsa_keypair(2048)
    composed = _message()
    raw = composed.raw
    record = dns_txt_value(keypair).encode()
    signed = sign_message(raw, domain=DOMAIN, selector=SELECTOR, private_pem=keypair.private_pem)
    if not dkim.verify(signed, dnsfunc=lambda name, timeout=5: record):
        raise SystemExit("our signature does not verify with dkimpy")
    include = [h.encode() for h in ("from", "to", "subject", "date", "message-id", "from")]

    def ours() -> bytes:
        return sign_message(raw, domain=DOMAIN, selector=SELECTOR, private_pem=keypair.private_pem)

    key = SigningKey(DOMAIN, SELECTOR, keypair.private_pem)
    if not dkim.verify(sign_composed(composed, key), dnsfunc=lambda name, timeout=5: record):
        raise SystemExit("our signature from compose's fields does not verify with dkimpy")

    def ours_split() -> bytes:
        # As the delivery worker signs: the header fields compose checked, not parsed again.
        return sign_composed(composed, key)

    def plain() -> bytes:
        result: bytes = dkim.sign(
            raw,
            SELECTOR.encode(),
            DOMAIN.encode(),
            keypair.private_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )
        return result

    ours_rate = rate(ours, args.seconds)
    split_rate = rate(ours_split, args.seconds)
    plain_rate = rate(plain, args.seconds)
    print(f"message size:        {len(raw)} bytes, RSA-2048, relaxed/relaxed")
    print(f"multimail signer:    {ours_rate:8.0f} signatures/s")
    print(f"  fields from compose: {split_rate:6.0f} signatures/s")
    print(f"plain dkim.sign:     {plain_rate:8.0f} signatures/s")
    print(f"speed-up:            {ours_rate / plain_rate:8.1f}x")
    if args.json:
        figures = {
            "message_bytes": len(raw),
            "ours_per_s": ours_rate,
            "ours_composed_per_s": split_rate,
            "plain_per_s": plain_rate,
        }
        args.json.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
