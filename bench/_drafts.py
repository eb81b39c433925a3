"""The benchmark message: one definition for the benches that compose, sign or send it.

About 5 KB on the wire: four paragraphs, once as text and once as HTML.
"""

from __future__ import annotations

from datetime import UTC, datetime

from multimail.mail.compose import OutboundDraft

PARAGRAPH = "The quick brown fox jumps over the lazy dog, again and again. " * 8


def bench_draft(
    domain: str,
    *,
    to: str = "someone@example.org",
    extra_headers: list[tuple[str, str]] | None = None,
) -> OutboundDraft:
    """The draft from ``agent@domain`` to ``to`` (a fixed Message-ID and Date)."""
    return OutboundDraft(
        from_address=f"agent@{domain}",
        from_name="Bench Agent",
        to=[to],
        cc=[],
        reply_to=None,
        subject="Benchmark message",
        markdown="\n\n".join([PARAGRAPH] * 4),
        message_id=f"<bench-1@{domain}>",
        date=datetime(2024, 1, 1, tzinfo=UTC),
        extra_headers=extra_headers or [("X-MultiMail-Agent", "key_bench")],
    )
