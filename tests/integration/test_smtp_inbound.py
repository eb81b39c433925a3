"""The inbound SMTP engine over real loopback sockets: protocol, limits and known attacks."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import smtplib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from multimail.errors import InvalidInput
from multimail.smtp.inbound import (
    ACCEPT,
    RELAY_DENIED,
    UNKNOWN_MAILBOX,
    InboundEnvelope,
    InboundLimits,
    InboundSMTPServer,
    RecipientVerdict,
    StorageFull,
)

HOSTED = "hosted.example"
AGENT = f"agent@{HOSTED}"
SUPPORT = f"support@{HOSTED}"
SENDER = "alice@sender.example"
MESSAGE = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: agent@hosted.example\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hi agent,\r\n"
    b".a line that starts with a dot\r\n"
    b"bye\r\n"
)
# MESSAGE as a raw client must put it on the wire: dot-stuffed (RFC 5321 section 4.5.2).
WIRE = MESSAGE.replace(b"\r\n.", b"\r\n..")


@dataclass
class HostedSink:
    """A sink that hosts one domain, like our real one: everything else is a relay attempt."""

    mailboxes: frozenset[str] = frozenset({AGENT, SUPPORT})
    stored: list[InboundEnvelope] = field(default_factory=list)
    fail_with: Exception | None = None
    fail_recipient_check: bool = False
    gate: asyncio.Event | None = None
    store_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def check_recipient(self, address: str) -> RecipientVerdict:
        if self.fail_recipient_check:
            raise ConnectionError("database unreachable")
        if address.rpartition("@")[2].lower() != HOSTED:
            return RELAY_DENIED
        return ACCEPT if address.lower() in self.mailboxes else UNKNOWN_MAILBOX

    async def store(self, envelope: InboundEnvelope) -> str:
        self.store_started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.stored.append(envelope)
        return f"q{len(self.stored)}"


@asynccontextmanager
async def running(
    sink: HostedSink, *, tls: ssl.SSLContext | None = None, **limits: float
) -> AsyncIterator[InboundSMTPServer]:
    server = InboundSMTPServer(
        sink,
        port=0,
        hostname="mx.hosted.example",
        limits=InboundLimits(**limits),  # type: ignore[arg-type]
        tls_context=tls,
    )
    async with server:
        yield server


class RawClient:
    """Bytes on a socket, exactly as written: smtplib would normalise line endings."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def reply(self) -> str:
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            if not line:
                raise ConnectionError(f"closed after {lines!r}")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str | bytes) -> str:
        await self.send(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return await self.reply()

    async def rest(self) -> bytes:
        """Everything the server still sends until it hangs up."""
        return await asyncio.wait_for(self.reader.read(), 5)

    async def open_transaction(self, *rcpts: str) -> None:
        assert (await self.reply()).startswith("220 ")
        assert (await self.command("EHLO client.sender.example")).startswith("250")
        assert (await self.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
        for rcpt in rcpts or (AGENT,):
            assert (await self.command(f"RCPT TO:<{rcpt}>")).startswith("250")

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """Our trace header and the client's bytes after it (below our one-line Return-Path)."""
    return_path, _, data = data.partition(b"\r\n")
    assert return_path.startswith(b"Return-Path: <") and return_path.endswith(b">")
    assert data.startswith(b"Received: ")
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end : end + 1] not in (b"\t", b" "):
            return data[:end], data[end:]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def server_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return context


@pytest.fixture
def client_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files[0]))


# --- normal delivery -------------------------------------------------------------------


async def test_delivered_message_reaches_sink_byte_exact_under_a_received_line() -> None:
    """A normal delivery is stored with the client's exact bytes under our Received trace."""
    sink = HostedSink()
    async with running(sink) as server:
        errors, reply = await aiosmtplib.send(
            MESSAGE,
            sender=SENDER,
            recipients=[AGENT],
            hostname="127.0.0.1",
            port=server.port,
            local_hostname="client.sender.example",
        )
    assert errors == {}
    assert reply.startswith("2.0.0 OK queued as q1")
    [stored] = sink.stored
    trace, body = split_received(stored.data)
    assert body == MESSAGE
    assert trace.startswith(b"Received: from client.sender.example ([127.0.0.1])\r\n")
    assert b"by mx.hosted.example (MultiMail) with ESMTP id " in trace
    assert b"for <agent@hosted.example>; " in trace
    assert (stored.mail_from, stored.rcpt_tos) == (SENDER, (AGENT,))
    assert (stored.peer, stored.helo, stored.tls) == ("127.0.0.1", "client.sender.example", False)
    assert abs(stored.received_at - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=10)


async def test_smtplib_delivery_to_two_mailboxes_is_one_stored_message() -> None:
    """Several hosted recipients make one stored message; the trace does not name them."""
    sink = HostedSink()
    async with running(sink) as server:

        def deliver() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", server.port, local_hostname="c.example") as smtp:
                return smtp.sendmail(SENDER, [AGENT, SUPPORT], MESSAGE)

        refused = await asyncio.to_thread(deliver)
    assert refused == {}
    [stored] = sink.stored
    trace, body = split_received(stored.data)
    assert body == MESSAGE
    assert stored.rcpt_tos == (AGENT, SUPPORT)
    assert b"for <" not in trace


async def test_ehlo_announces_size_limit() -> None:
    """EHLO advertises SIZE with the configured maximum (RFC 1870)."""
    async with running(HostedSink(), max_message_size=123_456) as server:

        def ehlo() -> dict[str, str]:
            with smtplib.SMTP("127.0.0.1", server.port) as smtp:
                smtp.ehlo("c.example")
                return smtp.esmtp_features

        features = await asyncio.to_thread(ehlo)
    assert features["size"] == "123456"


async def test_null_sender_of_a_bounce_is_accepted() -> None:
    """MAIL FROM:<> (bounces, RFC 5321 §4.5.5) is accepted and stored as an empty sender."""
    sink = HostedSink()
    async with running(sink) as server:
        client = await RawClient.connect(server.port)
        assert (await client.reply()).startswith("220")
        await client.command("EHLO c.example")
        assert (await client.command("MAIL FROM:<>")).startswith("250 2.1.0")
        assert (await client.command(f"RCPT TO:<{AGENT}>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(WIRE + b".\r\n")).startswith("250 2.0.0")
        await client.close()
    assert sink.stored[0].mail_from == ""


# --- recipients and relaying -----------------------------------------------------------


async def test_unknown_mailbox_is_refused_with_550() -> None:
    """A recipient the sink does not host at our domain gets the sink's 550 5.1.1."""
    async with running(HostedSink()) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction()
        assert await client.command(f"RCPT TO:<nobody@{HOSTED}>") == (
            "550 5.1.1 Mailbox does not exist"
        )
        await client.close()


async def test_relay_attempt_is_refused_and_nothing_is_stored() -> None:
    """Mail for a domain we do not host is refused at RCPT: never an open relay."""
    sink = HostedSink()
    async with running(sink) as server:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await aiosmtplib.send(
                MESSAGE,
                sender=SENDER,
                recipients=["victim@elsewhere.example"],
                hostname="127.0.0.1",
                port=server.port,
            )
    [error] = refused.value.recipients
    assert error.code == 551
    assert "5.7.1" in error.message
    assert sink.stored == []


@pytest.mark.parametrize(
    "rcpt",
    ["no-at-sign", "a b@hosted.example", "a@@hosted.example", "a@-bad-.example", "x" * 65 + "@h.a"],
)
async def test_malformed_recipient_is_refused_with_553(rcpt: str) -> None:
    """Addresses outside RFC 5321 syntax or its length limits are refused before the sink."""
    async with running(HostedSink()) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction()
        assert (await client.command(f"RCPT TO:<{rcpt}>")).startswith("553 5.1.")
        await client.close()


async def test_recipients_beyond_the_limit_get_452() -> None:
    """Past max_recipients RCPT answers 452 4.5.3; the accepted ones still get the message."""
    sink = HostedSink(mailboxes=frozenset(f"a{i}@{HOSTED}" for i in range(5)))
    async with running(sink, max_recipients=3) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction("a0@hosted.example", "a1@hosted.example")
        assert (await client.command(f"RCPT TO:<a2@{HOSTED}>")).startswith("250")
        assert await client.command(f"RCPT TO:<a3@{HOSTED}>") == "452 4.5.3 Too many recipients"
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(WIRE + b".\r\n")).startswith("250")
        await client.close()
    assert sink.stored[0].rcpt_tos == tuple(f"a{i}@{HOSTED}" for i in range(3))


async def test_failing_recipient_check_is_a_temporary_451() -> None:
    """If the sink cannot answer at RCPT, the client is told to retry (451), not refused."""
    async with running(HostedSink(fail_recipient_check=True)) as server:
        client = await RawClient.connect(server.port)
        assert (await client.reply()).startswith("220")
        await client.command("EHLO c.example")
        await client.command(f"MAIL FROM:<{SENDER}>")
        assert (await client.command(f"RCPT TO:<{AGENT}>")).startswith("451 4.3.0")
        await client.close()


# --- size, line and header limits ----------------------------------------------------


async def test_mail_from_declaring_an_oversized_message_gets_552() -> None:
    """MAIL FROM with SIZE= above the limit is refused with 552 5.3.4 before any data."""
    async with running(HostedSink(), max_message_size=10_000) as server:
        client = await RawClient.connect(server.port)
        assert (await client.reply()).startswith("220")
        await client.command("EHLO c.example")
        assert (await client.command(f"MAIL FROM:<{SENDER}> SIZE=10001")).startswith("552 5.3.4")
        assert (await client.command(f"MAIL FROM:<{SENDER}> SIZE=9000")).startswith("250")
        await client.close()


async def test_oversized_data_gets_552_and_nothing_is_stored() -> None:
    """Data beyond max_message_size is read to the end, refused with 552, and not stored."""
    sink = HostedSink()
    async with running(sink, max_message_size=10_000) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction()
        assert (await client.command("DATA")).startswith("354")
        big = WIRE + b"x" * 900 + b"\r\n"
        reply = await client.command(big * 20 + b".\r\n")
        assert reply.startswith("552 5.3.4")
        assert (await client.command("NOOP")).startswith("250")
        await client.close()
    assert sink.stored == []


async def test_line_over_the_limit_is_refused_and_one_at_the_limit_is_accepted() -> None:
    """A 4097-octet line gets 554 5.3.4 (like Stalwart); a 4096-octet one is accepted."""
    sink = HostedSink()
    async with running(sink) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction()
        for length, expected in ((4097, "554 5.3.4"), (4096, "250 2.0.0")):
            assert (await client.command("DATA")).startswith("354")
            line = b"y" * (length - 2) + b"\r\n"
            assert (await client.command(WIRE + line + b".\r\n")).startswith(expected)
            if expected.startswith("554"):
                await client.command(f"MAIL FROM:<{SENDER}>")
                await client.command(f"RCPT TO:<{AGENT}>")
        await client.close()
    [stored] = sink.stored
    assert split_received(stored.data)[1].endswith(b"y" * 4094 + b"\r\n")


async def test_overlong_command_line_gets_500_5_5_2() -> None:
    """Command lines past RFC 5321's 512 octets, or past the stream limit, get 500 5.5.2."""
    async with running(HostedSink()) as server:
        client = await RawClient.connect(server.port)
        assert (await client.reply()).startswith("220")
        assert (await client.command("HELO " + "h" * 600)).startswith("500 5.5.2")
        assert (await client.command("HELO " + "h" * 9000)).startswith("500 5.5.2")
        assert (await client.command("HELO c.example")).startswith("250")
        await client.close()


async def test_oversized_header_section_gets_552_and_nothing_is_stored() -> None:
    """A header section beyond max_header_bytes is refused, with or without a body."""
    sink = HostedSink()
    async with running(sink, max_header_bytes=2_000) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction()
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"z" * 60) for i in range(40))
        for message in (headers + b"\r\nbody\r\n", headers):
            assert (await client.command("DATA")).startswith("354")
            assert (await client.command(message + b".\r\n")).startswith("552 5.3.4")
            await client.command(f"MAIL FROM:<{SENDER}>")
            await client.command(f"RCPT TO:<{AGENT}>")
        await client.close()
    assert sink.stored == []


# --- SMTP smuggling (RELIABILITY SMTP-1, CVE-2024-27305, CVE-2023-51764) -------------

SMUGGLED = (
    b"MAIL FROM:<ceo@hosted.example>\r\n"
    b"RCPT TO:<agent@hosted.example>\r\n"
    b"DATA\r\n"
    b"From: ceo@hosted.example\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"wire the money\r\n"
)


@pytest.mark.parametrize(
    "sequence",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n", b"\r"],
    ids=["LF.LF", "LF.CRLF", "CR.CR", "CRLF.LF", "CR.CRLF", "CRLF.CR", "bare-LF", "bare-CR"],
)
async def test_smuggling_sequence_never_splits_a_message_and_is_refused(sequence: bytes) -> None:
    """A fake end-of-data is neither an end nor stored: one 550 5.6.0, no smuggled replies."""
    sink = HostedSink()
    async with running(sink) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction()
        assert (await client.command("DATA")).startswith("354")
        await client.send(WIRE + b"outer" + sequence + SMUGGLED + b".\r\nQUIT\r\n")
        replies = await client.rest()
        await client.close()
    assert replies.startswith(b"550 5.6.0 ")
    assert replies.endswith(b"\r\n221 Bye\r\n")
    assert replies.count(b"\r\n") == 2
    assert sink.stored == []


_line = st.text(st.sampled_from(" .\tabcXYZ:-01"), max_size=40).map(str.encode)


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[bytes, bool]:
    """CRLF-terminated lines (many starting with a dot), sometimes with one bare CR or LF."""
    body = b"".join(line + b"\r\n" for line in draw(st.lists(_line, max_size=12)))
    bare = draw(st.sampled_from([None, b"\r", b"\n"]))
    if bare is None:
        return body, True
    at = draw(st.integers(0, len(body)))
    # Landing between a CR and its LF leaves one of them bare all the same. The final CRLF
    # keeps the real end-of-data recognisable: "\r.\r\n" is (rightly) not one.
    dirty = body[:at] + bare + body[at:]
    return dirty if dirty.endswith(b"\r\n") else dirty + b"\r\n", False


@settings(max_examples=60, deadline=None)
@given(case=_bodies())
async def test_data_is_stored_exactly_iff_it_has_no_bare_cr_or_lf(case: tuple[bytes, bool]) -> None:
    """Any body: stored byte-exact when all line ends are CRLF, otherwise refused and dropped."""
    wire_body, clean = case
    # A first line starting with whitespace would continue our Received header: refused too.
    clean = clean and not wire_body.startswith((b" ", b"\t"))
    # The client's dot transparency (RFC 5321 section 4.5.2) on CRLF-delimited lines.
    stuffed = b"\r\n".join(
        b"." + line if line.startswith(b".") else line for line in wire_body.split(b"\r\n")
    )
    sink = HostedSink()
    async with running(sink) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction()
        assert (await client.command("DATA")).startswith("354")
        reply = await client.command(stuffed + b".\r\n")
        await client.close()
    if clean:
        assert reply.startswith("250 2.0.0"), reply
        assert split_received(sink.stored[0].data)[1] == wire_body
    else:
        assert reply.startswith("550 5.6.0"), reply
        assert sink.stored == []


# --- STARTTLS (RELIABILITY SMTP-3, CVE-2024-34083) ------------------------------------


async def test_starttls_delivery_is_marked_tls(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    """With a tls_context, STARTTLS works and the message is recorded as received over TLS."""
    sink = HostedSink()
    async with running(sink, tls=server_tls) as server:
        errors, _ = await aiosmtplib.send(
            MESSAGE,
            sender=SENDER,
            recipients=[AGENT],
            hostname="localhost",
            port=server.port,
            start_tls=True,
            tls_context=client_tls,
        )
    assert errors == {}
    [stored] = sink.stored
    assert stored.tls
    assert b" with ESMTPS id " in split_received(stored.data)[0]


@pytest.mark.parametrize("injected", ["MAIL FROM:<ceo@hosted.example>", "QUIT"])
async def test_commands_pipelined_behind_starttls_are_not_executed(
    injected: str, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    """Plaintext sent in the same packet as STARTTLS is discarded, never run inside TLS."""
    sink = HostedSink()
    async with running(sink, tls=server_tls) as server:
        client = await RawClient.connect(server.port)
        assert (await client.reply()).startswith("220")
        assert "STARTTLS" in await client.command("EHLO c.example")
        await client.send(f"STARTTLS\r\n{injected}\r\n".encode())
        assert (await client.reply()).startswith("220")
        await client.writer.start_tls(client_tls, server_hostname="localhost")
        # Had the injected command run, its reply (or a hang-up) would come first.
        assert await client.command("NOOP") == "250 OK"
        assert (await client.command("EHLO c.example")).startswith("250-mx.hosted.example")
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250 2.1.0")
        assert (await client.command(f"RCPT TO:<{AGENT}>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(WIRE + b".\r\n")).startswith("250 2.0.0")
        await client.close()
    [stored] = sink.stored
    assert (stored.mail_from, stored.tls) == (SENDER, True)


async def test_require_starttls_refuses_mail_in_plaintext(server_tls: ssl.SSLContext) -> None:
    """With require_starttls, MAIL before STARTTLS gets 530 5.7.0."""
    server = InboundSMTPServer(HostedSink(), port=0, tls_context=server_tls, require_starttls=True)
    async with server:
        client = await RawClient.connect(server.port)
        assert (await client.reply()).startswith("220")
        await client.command("EHLO c.example")
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("530 5.7.0")
        await client.close()


def test_require_starttls_without_a_certificate_is_refused() -> None:
    """Requiring STARTTLS without a tls_context is a configuration error, not silent plaintext."""
    with pytest.raises(InvalidInput):
        InboundSMTPServer(HostedSink(), require_starttls=True)


# --- storage: 250 only after store returned -------------------------------------------


async def test_250_is_sent_only_after_store_returned() -> None:
    """The client gets no 250 while the sink is still storing; the 250 follows its return."""
    gate = asyncio.Event()
    sink = HostedSink(gate=gate)
    async with running(sink) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction()
        assert (await client.command("DATA")).startswith("354")
        await client.send(WIRE + b".\r\n")
        reply = asyncio.create_task(client.reply())
        await asyncio.wait_for(sink.store_started.wait(), 5)
        await asyncio.sleep(0.2)
        assert not reply.done()
        assert sink.stored == []
        gate.set()
        assert (await reply).startswith("250 2.0.0 OK queued as q1")
        await client.close()


async def test_storage_full_answers_452_and_nothing_is_accepted() -> None:
    """StorageFull from the sink becomes 452 4.3.1: the client keeps the message and retries."""
    sink = HostedSink(fail_with=StorageFull("disk full"))
    async with running(sink) as server:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await aiosmtplib.send(
                MESSAGE, sender=SENDER, recipients=[AGENT], hostname="127.0.0.1", port=server.port
            )
    assert refused.value.code == 452
    assert refused.value.message.startswith("4.3.1")
    assert sink.stored == []


async def test_sink_failure_answers_451_without_leaking_details() -> None:
    """Any other store error becomes 451 4.3.0, and its text never reaches the client."""
    sink = HostedSink(fail_with=RuntimeError("password=hunter2 in a stack trace"))
    async with running(sink) as server:
        client = await RawClient.connect(server.port)
        await client.open_transaction()
        assert (await client.command("DATA")).startswith("354")
        reply = await client.command(WIRE + b".\r\n")
        await client.close()
    assert reply.startswith("451 4.3.0")
    assert "hunter2" not in reply


def test_recipient_verdict_refuses_reply_injection() -> None:
    """A sink's reply text with CR/LF, or a non-reply code, is refused before it is sent."""
    with pytest.raises(InvalidInput):
        RecipientVerdict.reject(550, "5.1.1 no\r\n250 OK")
    with pytest.raises(InvalidInput):
        RecipientVerdict.reject(250, "2.1.5 not a rejection")
    with pytest.raises(InvalidInput):
        RecipientVerdict(354, "go ahead")
    assert not UNKNOWN_MAILBOX.accepted and ACCEPT.accepted


# --- connections and timeouts (RELIABILITY SMTP-6) ------------------------------------


async def test_connections_over_the_limit_get_421_at_greeting() -> None:
    """Past max_connections a client gets 421 4.7.0 and is hung up on; freed slots are reused."""
    # Both from 127.0.0.1: the per-peer cap (half of max_connections by default) is lifted.
    async with running(HostedSink(), max_connections=2, max_connections_per_peer=2) as server:
        first, second = await RawClient.connect(server.port), await RawClient.connect(server.port)
        for client in (first, second):
            assert (await client.reply()).startswith("220")
        third = await RawClient.connect(server.port)
        assert (await third.rest()).startswith(b"421 4.7.0 ")
        await third.close()
        assert (await first.command("QUIT")).startswith("221")
        await first.close()
        for _ in range(100):
            if server.active_sessions < 2:
                break
            await asyncio.sleep(0.01)
        fourth = await RawClient.connect(server.port)
        assert (await fourth.reply()).startswith("220")
        await fourth.close()
        await second.close()


async def test_idle_client_is_cut_off_while_another_is_served() -> None:
    """A client silent past command_timeout gets 421 4.4.2 and is closed; others carry on."""
    sink = HostedSink()
    async with running(sink, command_timeout=0.5) as server:
        slow = await RawClient.connect(server.port)
        assert (await slow.reply()).startswith("220")
        started = asyncio.get_running_loop().time()
        errors, _ = await aiosmtplib.send(
            MESSAGE, sender=SENDER, recipients=[AGENT], hostname="127.0.0.1", port=server.port
        )
        assert errors == {}
        assert (await slow.rest()).startswith(b"421 4.4.2 ")
        assert asyncio.get_running_loop().time() - started >= 0.4
        await slow.close()
    assert len(sink.stored) == 1


async def test_dribbling_data_is_cut_off_by_the_data_timeout() -> None:
    """A client that keeps DATA alive line by line is still cut off at data_timeout."""
    sink = HostedSink()
    async with running(sink, command_timeout=5, data_timeout=0.6) as server:
        slow = await RawClient.connect(server.port)
        await slow.open_transaction()
        assert (await slow.command("DATA")).startswith("354")
        await slow.send(WIRE)
        hung_up = asyncio.create_task(slow.rest())
        deadline = asyncio.get_running_loop().time() + 3
        # Each line comes well within command_timeout: only the DATA deadline can stop it.
        with suppress(ConnectionError):
            while not hung_up.done() and asyncio.get_running_loop().time() < deadline:
                await slow.send(b"still typing\r\n")
                await asyncio.sleep(0.1)
        assert (await hung_up).startswith(b"421 4.4.2 ")
        await slow.close()
        errors, _ = await aiosmtplib.send(
            MESSAGE, sender=SENDER, recipients=[AGENT], hostname="127.0.0.1", port=server.port
        )
        assert errors == {}
    assert [split_received(m.data)[1] for m in sink.stored] == [MESSAGE]


async def test_stop_hangs_up_on_sessions_but_lets_a_running_store_finish() -> None:
    """stop() closes open sessions; a store already under way completes rather than being cut."""
    gate = asyncio.Event()
    sink = HostedSink(gate=gate)
    server = InboundSMTPServer(sink, port=0)
    await server.start()
    client = await RawClient.connect(server.port)
    await client.open_transaction()
    assert (await client.command("DATA")).startswith("354")
    await client.send(WIRE + b".\r\n")
    await asyncio.wait_for(sink.store_started.wait(), 5)
    stopping = asyncio.create_task(server.stop())
    assert await client.rest() == b""  # hung up, and no 250 for a store not yet finished
    await asyncio.sleep(0.1)
    assert not stopping.done()
    gate.set()
    await asyncio.wait_for(stopping, 5)
    await client.close()
    assert len(sink.stored) == 1
    with pytest.raises(OSError):
        await RawClient.connect(server.port)


def test_limits_below_rfc_minimums_are_refused() -> None:
    """Limits that would break RFC 5321's 1000-octet lines or disable a guard are refused."""
    for bad in ({"max_line_length": 1000}, {"max_recipients": 0}, {"command_timeout": 0}):
        with pytest.raises(InvalidInput):
            InboundLimits(**bad)  # type: ignore[arg-type]


async def test_helo_with_a_bare_cr_cannot_inject_a_header_through_received() -> None:
    """A CR smuggled in the HELO name is neutralised in our Received line and the envelope."""
    sink = HostedSink()
    async with running(sink) as server:
        client = await RawClient.connect(server.port)
        assert (await client.reply()).startswith("220")
        assert (await client.command(b"EHLO evil\rX-Approved: yes\r\n")).startswith("250")
        await client.command(f"MAIL FROM:<{SENDER}>")
        await client.command(f"RCPT TO:<{AGENT}>")
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(WIRE + b".\r\n")).startswith("250")
        await client.close()
    [stored] = sink.stored
    trace, body = split_received(stored.data)
    assert body == MESSAGE
    assert b"\r" not in trace.replace(b"\r\n", b"")
    assert b"\nX-Approved" not in stored.data
    assert "\r" not in stored.helo
