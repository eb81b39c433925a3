"""Our bulk DATA reader answers and stores exactly what aiosmtpd's line-by-line one does.

Both protocols run on loopback sockets with the same small limits and a handler that keeps
whatever DATA delivers; the same bytes (end-of-data look-alikes, bare CR/LF, dot-stuffed
lines, lines over the length limit, messages over the size limit, commands after the end,
in chunks of varying size) go to both, and the reply transcripts and stored contents must
be equal. Our protocol's extra checks (bare newlines, header size) live in the handler, which
this test replaces, so only the reading is compared.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from unittest.mock import patch

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.smtp.inbound import _REWORDED, InboundLimits, _InboundProtocol

LINE_LIMIT = 1001  # the least InboundLimits allows
SIZE_LIMIT = 3000
HOST = "mx.test"
IDENT = "MultiMail ESMTP"
OPENING = b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
CLOSING = b"\r\n.\r\nQUIT\r\n"


class Keep:
    """Accepts every recipient and keeps every message's content."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.contents.append(envelope.original_content or b"")
        return "250 kept"


class ReferenceSMTP(SMTP):
    line_length_limit = LINE_LIMIT


def reference(handler: Keep) -> SMTP:
    return ReferenceSMTP(
        handler,
        data_size_limit=SIZE_LIMIT,
        hostname=HOST,
        ident=IDENT,
        loop=asyncio.get_running_loop(),
    )


def ours(handler: Keep) -> SMTP:
    return _InboundProtocol(
        handler,  # type: ignore[arg-type]  # any aiosmtpd handler will do for reading
        limits=InboundLimits(max_line_length=LINE_LIMIT, max_message_size=SIZE_LIMIT),
        hostname=HOST,
        tls_context=None,
        require_starttls=False,
        on_close=lambda _: None,
    )


@asynccontextmanager
async def listening(factory: Callable[[], Any]) -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def transcript(make: Callable[[Keep], SMTP], wire: bytes, chunk: int) -> tuple[Any, ...]:
    handler = Keep()
    # Junk after an early end of data reads as unknown commands; past aiosmtpd's budget of
    # five it hangs up on bytes still unread, and the reset can swallow its last replies.
    with patch.object(aiosmtpd.smtp, "BOGUS_LIMIT", 1_000_000):
        replies = await _exchange(make, handler, wire, chunk)
    lines = replies.decode().split("\r\n")
    return tuple(_REWORDED.get(line, line) for line in lines), tuple(handler.contents)


async def _exchange(make: Callable[[Keep], SMTP], handler: Keep, wire: bytes, chunk: int) -> bytes:
    async with listening(lambda: make(handler)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for start in range(0, len(wire), chunk):
            writer.write(wire[start : start + chunk])
            await writer.drain()
            await asyncio.sleep(0)
        replies = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    return replies


_piece = st.sampled_from(
    [b".", b"..", b"a", b" ", b"\r", b"\n", b"\r\n", b".\r\n", b"\r\n.", b"\r\n.\r\n", b"x" * 600]
)


@settings(max_examples=150, deadline=None)
@given(
    body=st.lists(_piece, max_size=30).map(b"".join),
    chunk=st.sampled_from([3, 50, 1000, 1 << 20]),
)
async def test_bulk_reader_matches_aiosmtpd(body: bytes, chunk: int) -> None:
    wire = OPENING + body + CLOSING
    assert await transcript(ours, wire, chunk) == await transcript(reference, wire, chunk)


async def test_limits_and_edges_match_aiosmtpd() -> None:
    """The cases the random bodies might miss, each checked against the reference."""
    cases = [
        b"",  # an empty message: DATA then "." at once
        b"..",  # a first line that is a stuffed dot
        b"a" * (LINE_LIMIT - 2),  # a line exactly at the limit with its CRLF
        b"a" * (LINE_LIMIT - 1),  # one over
        (b"b" * 70 + b"\r\n") * (SIZE_LIMIT // 72),  # just under the size limit
        (b"b" * 70 + b"\r\n") * (SIZE_LIMIT // 72 + 1),  # just over
        (b"d" * 98 + b"\r\n") * 29 + b"d" * 98,  # with CLOSING's CRLF exactly the limit
        (b"d" * 98 + b"\r\n") * 29 + b"d" * 99,  # one byte over
        (b"." * 98 + b"\r\n") * 29 + b"." * 98,  # at the limit only counting the stuffing
        b"c" * (SIZE_LIMIT * 3),  # over both, the long line first
        b"x\r\n.\r\nRSET\r\nMAIL FROM:<e@f.example>\r\nRCPT TO:<g@h.example>\r\nDATA\r\ny",
        b"x\n.\r\nNOOP",  # a bare-LF look-alike of the end is data
    ]
    for body in cases:
        wire = OPENING + body + CLOSING
        for chunk in (1, 4096):
            expected = await transcript(reference, wire, chunk)
            assert await transcript(ours, wire, chunk) == expected, body[:40]
