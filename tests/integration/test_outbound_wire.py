"""The bytes on the wire: our DATA phase writes exactly what aiosmtplib's ``SMTP.data`` would.

The transport normalises and dot-stuffs a message once and hands the result to aiosmtplib's
protocol, instead of letting ``SMTP.data`` make its own passes. A raw server written here on
asyncio streams (loopback only) records every byte after ``354`` up to the closing dot, for
our transport and for bare aiosmtplib sending the same body, and the two must be equal:
tricky bodies (leading dots, lines of only ".", bare CR and LF, a missing final CRLF, 8-bit
bytes, an SMTPUTF8 envelope) and, through Hypothesis, arbitrary ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiosmtplib
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.smtp import outbound
from multimail.smtp.outbound import RelayConfig, RelayTransport


@dataclass
class _RawServer:
    """Answers like a plain ESMTP server and keeps each DATA payload exactly as received."""

    port: int = 0
    payloads: list[bytes] = field(default_factory=list)
    mail_lines: list[bytes] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 raw.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-raw.test\r\n250-8BITMIME\r\n250-SIZE 1000000\r\n")
                    writer.write(b"250 SMTPUTF8\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    # The payload ends at the first line holding only "." (RFC 5321 §4.1.1.4);
                    # a payload of just ".\r\n" (an empty message) has no CRLF before it.
                    payload = b""
                    while not (payload.endswith(b"\r\n.\r\n") or payload == b".\r\n"):
                        payload += await reader.readuntil(b"\r\n")
                    self.payloads.append(payload)
                    writer.write(b"250 stored\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    if verb == b"MAIL":
                        self.mail_lines.append(line.rstrip(b"\r\n"))
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[_RawServer]:
    running = _RawServer()
    await running.start()
    yield running
    await running.stop()


async def _both(server: _RawServer, body: bytes, rcpt: str = "b@y.test") -> tuple[bytes, bytes]:
    """The DATA payload our transport wrote, then the one bare ``SMTP.sendmail`` wrote."""
    relay = RelayTransport(RelayConfig(host="127.0.0.1", port=server.port))
    await relay.deliver("a@x.test", [rcpt], body)
    await relay.close()
    options = ["SMTPUTF8"] if not rcpt.isascii() else []
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port) as client:
        await client.sendmail("a@x.test", [rcpt], body, mail_options=options)
    ours, theirs = server.payloads[-2:]
    return ours, theirs


TRICKY_BODIES = {
    "plain": b"Subject: x\r\n\r\nhello\r\n",
    "leading dots": b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n...three\r\nend\r\n",
    "lines of only a dot": b"Subject: x\r\n\r\n.\r\nmiddle\r\n.\r\n",
    "starts with a dot": b".first line\r\n\r\nbody\r\n",
    "smuggling attempt, bare LF dot": b"Subject: x\r\n\r\nbefore\n.\nMAIL FROM:<e@vil>\r\n",
    "smuggling attempt, bare CR dot": b"Subject: x\r\n\r\nbefore\r.\rafter\r\n",
    "CR before CRLF": b"Subject: x\r\n\r\nodd\r\r\n.\r\r\nend\r\n",
    "as many bare LFs as bare CRs": b"Subject: x\r\n\r\nswapped\n\r.\n\rend\r\n",
    "bare LF everywhere": b"Subject: x\n\nline\n.dot\nlast",
    "missing final CRLF": b"Subject: x\r\n\r\nno ending",
    "ends in a bare CR": b"Subject: x\r\n\r\nending\r",
    "8-bit": "Subject: café\r\n\r\nGrüße\r\n.ünïcode\r\n".encode(),
    "empty": b"",
    "only a dot": b".",
    # Sent in several blocks (outbound._DATA_BLOCK), with dots and line ends across them.
    "larger than a data block": b"Subject: big\r\n\r\n" + b".dot line\r\nplain\n" * 12000,
}


@pytest.mark.parametrize("body", TRICKY_BODIES.values(), ids=TRICKY_BODIES.keys())
async def test_data_payload_matches_aiosmtplib_byte_for_byte(
    raw_server: _RawServer, body: bytes
) -> None:
    """Whatever the body, the server receives from us exactly what SMTP.data would send."""
    ours, theirs = await _both(raw_server, body)
    assert ours == theirs


async def test_smtputf8_message_matches_aiosmtplib(raw_server: _RawServer) -> None:
    """An internationalised envelope and an 8-bit body: the same payload, SMTPUTF8 announced."""
    body = "From: a@x.test\r\nTo: josé@y.test\r\n\r\n.Grüße\r\n".encode()
    ours, theirs = await _both(raw_server, body, rcpt="josé@y.test")
    assert ours == theirs
    assert raw_server.mail_lines[0].endswith(b" BODY=8BITMIME SMTPUTF8")


async def test_size_counts_the_message_before_dot_stuffing(raw_server: _RawServer) -> None:
    """RFC 1870: SIZE is the normalised message, without doubled dots or the closing dot."""
    body = b"Subject: x\n\n.a\n..b\nend"
    relay = RelayTransport(RelayConfig(host="127.0.0.1", port=raw_server.port))
    await relay.deliver("a@x.test", ["b@y.test"], body)
    await relay.close()
    normalised = b"Subject: x\r\n\r\n.a\r\n..b\r\nend\r\n"
    assert raw_server.mail_lines == [b"MAIL FROM:<a@x.test> SIZE=%d" % len(normalised)]
    assert raw_server.payloads == [b"Subject: x\r\n\r\n..a\r\n...b\r\nend\r\n.\r\n"]


@settings(max_examples=500)
@given(body=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b" ", b"\xe9"])))
def test_wire_form_is_aiosmtplibs_for_any_body(body: list[bytes]) -> None:
    """The one-pass wire form equals aiosmtplib's normalise + dot-stuff + closing dot."""
    data = b"".join(body)
    normalised = normalize_message_line_endings(data)
    wire = outbound._wire_data(data)
    assert wire.payload == PERIOD_REGEX.sub(b"..", normalised) + b".\r\n"
    assert wire.size == len(normalised)
    assert wire.eight_bit == (not data.isascii())
