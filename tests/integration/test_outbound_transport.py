"""Outbound delivery over real sockets: a relay, MX hosts found through a real DNS server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multimail.errors import (
    DeliveryError,
    InvalidInput,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from multimail.smtp.outbound import (
    DeliveryAttempt,
    MXTransport,
    OutboundTransport,
    RelayConfig,
    RelayTransport,
    SMTPTimeouts,
    make_resolver,
    parse_relay_url,
    recipient_outcomes,
    resolve_mx,
)
from multimail.testing.dns import LocalDNSServer
from multimail.testing.processes import free_port
from multimail.testing.smtp import CapturingSMTPServer, Stage

MESSAGE = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: hello\r\n\r\nHello there.\r\n"


@pytest.fixture
def smtp_server() -> Iterator[CapturingSMTPServer]:
    with CapturingSMTPServer() as server:
        yield server


@pytest.fixture
def dns_server() -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        yield server


def _relay(server: CapturingSMTPServer) -> RelayTransport:
    return RelayTransport(RelayConfig(host=server.host, port=server.port))


def _attempts(error: DeliveryError) -> list[DeliveryAttempt]:
    attempts = error.context["attempts"]
    assert isinstance(attempts, list)
    return attempts


# -- relay: what goes on the wire ---------------------------------------------------------


async def test_relay_delivers_the_bytes_exactly(smtp_server: CapturingSMTPServer) -> None:
    """The receiver gets the envelope and the data byte for byte; one attempt reports 250."""
    [attempt] = await _relay(smtp_server).deliver("a@x.test", ["b@y.test", "c@y.test"], MESSAGE)
    [message] = smtp_server.wait_for(1)
    assert (message.mail_from, message.rcpt_tos, message.data) == (
        "a@x.test",
        ["b@y.test", "c@y.test"],
        MESSAGE,
    )
    assert attempt.code == 250
    assert attempt.port == smtp_server.port
    assert [r.ok for r in attempt.recipients] == [True, True]
    assert attempt.started_at <= attempt.finished_at


async def test_lines_starting_with_a_dot_survive(smtp_server: CapturingSMTPServer) -> None:
    """Dot-stuffing round trip: lines starting with '.', '..' or a lone '.' arrive intact."""
    data = b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\n...three\r\nend\r\n"
    await _relay(smtp_server).deliver("a@x.test", ["b@y.test"], data)
    assert smtp_server.wait_for(1)[0].data == data


async def test_bare_line_feeds_never_reach_the_wire(smtp_server: CapturingSMTPServer) -> None:
    """Bare LF and CR are sent as CRLF, and a missing final CRLF is added."""
    await _relay(smtp_server).deliver("a@x.test", ["b@y.test"], b"Subject: x\n\nline\rnext")
    assert smtp_server.wait_for(1)[0].data == b"Subject: x\r\n\r\nline\r\nnext\r\n"


async def test_null_sender_is_sent_as_empty_reverse_path(
    smtp_server: CapturingSMTPServer,
) -> None:
    """Bounces go out with MAIL FROM:<> (RFC 5321 §4.5.5)."""
    await _relay(smtp_server).deliver("", ["b@y.test"], MESSAGE)
    assert smtp_server.wait_for(1)[0].mail_from == ""


async def test_eight_bit_body_is_announced(smtp_server: CapturingSMTPServer) -> None:
    """A body with 8-bit bytes is sent with BODY=8BITMIME and arrives unchanged."""
    data = "Subject: café\r\n\r\nGrüße\r\n".encode()
    await _relay(smtp_server).deliver("a@x.test", ["b@y.test"], data)
    [message] = smtp_server.wait_for(1)
    assert message.data == data
    assert "BODY=8BITMIME" in message.mail_options


text_lines = st.lists(
    st.text(alphabet=st.sampled_from(list(".ab \t-")), max_size=12), min_size=1, max_size=12
)


@pytest.fixture(scope="module")
def shared_smtp_server() -> Iterator[CapturingSMTPServer]:
    with CapturingSMTPServer() as server:
        yield server


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=text_lines)
def test_any_body_arrives_exactly(
    shared_smtp_server: CapturingSMTPServer, lines: list[str]
) -> None:
    """SMTP-2: whatever CRLF body we send, the receiver reconstructs it exactly, once."""
    shared_smtp_server.clear()
    data = ("\r\n".join(lines) + "\r\n").encode()
    transport = _relay(shared_smtp_server)
    asyncio.run(transport.deliver("a@x.test", ["b@y.test"], data))
    assert [m.data for m in shared_smtp_server.wait_for(1)] == [data]


# -- relay: how failures are classified ---------------------------------------------------


async def test_451_is_temporary(smtp_server: CapturingSMTPServer) -> None:
    """A 4xx at RCPT raises TemporaryDeliveryError carrying code, host and the attempts."""
    smtp_server.fail_with(451, "4.3.0 greylisted", "rcpt")
    with pytest.raises(TemporaryDeliveryError) as exc:
        await _relay(smtp_server).deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert exc.value.smtp_code == 451
    assert exc.value.host == smtp_server.host
    [attempt] = _attempts(exc.value)
    assert attempt.recipients[0].permanent is False
    assert smtp_server.messages == []


async def test_550_is_permanent(smtp_server: CapturingSMTPServer) -> None:
    """A 5xx at RCPT for every recipient raises PermanentDeliveryError."""
    smtp_server.fail_with(550, "5.1.1 no such user", "rcpt")
    with pytest.raises(PermanentDeliveryError) as exc:
        await _relay(smtp_server).deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert exc.value.smtp_code == 550
    assert _attempts(exc.value)[0].recipients[0].message == "5.1.1 no such user"


@pytest.mark.parametrize(
    ("stage", "code", "error"),
    [
        ("mail", 421, TemporaryDeliveryError),
        ("mail", 553, PermanentDeliveryError),
        ("data", 452, TemporaryDeliveryError),
        ("data", 554, PermanentDeliveryError),
    ],
)
async def test_refusals_at_mail_and_data_are_classified_by_code(
    smtp_server: CapturingSMTPServer, stage: Stage, code: int, error: type[DeliveryError]
) -> None:
    """4xx at MAIL or DATA is temporary, 5xx permanent; nothing is recorded as received."""
    smtp_server.fail_with(code, "refused", stage)
    with pytest.raises(error) as exc:
        await _relay(smtp_server).deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert exc.value.smtp_code == code
    assert smtp_server.messages == []


async def test_mixed_recipients_are_reported_one_by_one(
    smtp_server: CapturingSMTPServer,
) -> None:
    """A 550 on one RCPT: the others get the message, that one is permanently failed."""
    smtp_server.fail_with(550, "5.1.1 unknown", "rcpt", only_for=["gone@y.test"])
    smtp_server_rcpts = ["b@y.test", "gone@y.test", "c@y.test"]
    attempts = await _relay(smtp_server).deliver("a@x.test", smtp_server_rcpts, MESSAGE)
    outcomes = recipient_outcomes(attempts)
    assert outcomes["b@y.test"].ok and outcomes["c@y.test"].ok
    gone = outcomes["gone@y.test"]
    assert (gone.ok, gone.permanent, gone.code) == (False, True, 550)
    assert smtp_server.wait_for(1)[0].rcpt_tos == ["b@y.test", "c@y.test"]


async def test_lost_reply_after_data_is_temporary_and_flagged(
    smtp_server: CapturingSMTPServer,
) -> None:
    """Hang-up after DATA: temporary, `reply_lost` set, and the receiver does hold the message."""
    smtp_server.hang_up_after_data()
    with pytest.raises(TemporaryDeliveryError) as exc:
        await _relay(smtp_server).deliver("a@x.test", ["b@y.test"], MESSAGE)
    [attempt] = _attempts(exc.value)
    assert attempt.reply_lost is True
    assert attempt.code is None
    assert smtp_server.wait_for(1)[0].data == MESSAGE


async def test_connection_refused_is_temporary() -> None:
    """Nobody listening: TemporaryDeliveryError, no SMTP code."""
    transport = RelayTransport(RelayConfig(host="127.0.0.1", port=free_port()))
    with pytest.raises(TemporaryDeliveryError) as exc:
        await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert exc.value.smtp_code is None
    assert _attempts(exc.value)[0].reply_lost is False


async def test_silent_server_times_out_as_temporary() -> None:
    """A server that accepts the connection and never greets is cut off at the greeting
    timeout."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        transport = RelayTransport(
            RelayConfig(host="127.0.0.1", port=port),
            timeouts=SMTPTimeouts(connect=0.5, greeting=0.5),
        )
        with pytest.raises(TemporaryDeliveryError):
            await asyncio.wait_for(transport.deliver("a@x.test", ["b@y.test"], MESSAGE), 5)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_refusal_in_the_middle_of_a_large_message_is_heard() -> None:
    """A server that answers 552 5.3.4 (too big) after the first lines of a message sent in
    several blocks, and reads no further: its reply is the verdict (the message bounces,
    the address is not blamed), not a lost line to retry for three days."""
    lines: list[bytes] = []

    async def impatient(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 impatient.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                lines.append(line)
                if line.startswith(b"DATA"):
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    await reader.readline()
                    writer.write(b"552 5.3.4 message too big for this system\r\n")
                    await writer.drain()
                    await reader.read()  # whatever still comes, until the client hangs up
                    return
                writer.write(b"250 ok\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(impatient, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = b"Subject: big\r\n\r\n" + b"a line of a long message\r\n" * 40000
    try:
        transport = RelayTransport(RelayConfig(host="127.0.0.1", port=port))
        with pytest.raises(PermanentDeliveryError) as exc:
            await asyncio.wait_for(transport.deliver("a@x.test", ["b@y.test"], body), 30)
    finally:
        server.close()
        await server.wait_closed()
    assert exc.value.smtp_code == 552
    [attempt] = _attempts(exc.value)
    [result] = attempt.recipients
    assert (result.permanent, result.blames_recipient, attempt.reply_lost) == (True, False, False)
    assert lines[-1] == b"DATA\r\n"


@pytest.mark.parametrize(
    ("mail_from", "rcpt"),
    [
        ("a@x.test\r\nRCPT TO:<evil@z.test>", "b@y.test"),
        ("a@x.test", "b@y.test>\r\nDATA"),
        ("a@x.test", "b@y.test NOTIFY=NEVER"),
        ("a@x.test", "b@y.test\x00"),
        ("<a@x.test>", "b@y.test"),
        ("a@x.test", "\nb@y.test"),
    ],
)
async def test_envelope_injection_is_refused(
    smtp_server: CapturingSMTPServer, mail_from: str, rcpt: str
) -> None:
    """CR, LF, NUL, spaces or angle brackets in the envelope: InvalidInput, nothing sent."""
    with pytest.raises(InvalidInput) as exc:
        await _relay(smtp_server).deliver(mail_from, [rcpt], MESSAGE)
    assert exc.value.code == "header_injection"
    with pytest.raises(TimeoutError):
        smtp_server.wait_for(1, timeout=0.1)


# -- relay with TLS and AUTH ----------------------------------------------------------------


async def test_relay_with_starttls_and_auth() -> None:
    """STARTTLS then AUTH with the configured credentials; the relay sees an encrypted session."""
    with CapturingSMTPServer(tls=True, auth=("agent@x.test", "p@ss:w/rd")) as server:
        config = parse_relay_url(
            f"smtp://agent%40x.test:p%40ss%3Aw%2Frd@127.0.0.1:{server.port}?starttls=true"
        )
        transport = RelayTransport(config, tls_context=server.client_tls_context())
        [attempt] = await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
        [message] = server.wait_for(1)
    assert attempt.tls is True
    assert message.tls is True
    assert message.auth_user == "agent@x.test"
    assert message.data == MESSAGE


async def test_relay_with_implicit_tls() -> None:
    """smtps:// speaks TLS from the first byte and verifies the certificate it is given."""
    with CapturingSMTPServer(implicit_tls=True) as server:
        config = parse_relay_url(f"smtps://127.0.0.1:{server.port}")
        transport = RelayTransport(config, tls_context=server.client_tls_context())
        await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
        assert server.wait_for(1)[0].tls is True


async def test_wrong_relay_password_is_temporary_not_a_bounce() -> None:
    """A 535 on AUTH is our configuration, so the message is kept for retry, never bounced."""
    with CapturingSMTPServer(tls=True, auth=("agent", "right")) as server:
        config = RelayConfig(
            host="127.0.0.1", port=server.port, username="agent", password="wrong", starttls=True
        )
        transport = RelayTransport(config, tls_context=server.client_tls_context())
        with pytest.raises(TemporaryDeliveryError) as exc:
            await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
        assert exc.value.smtp_code == 535
        assert server.messages == []


async def test_untrusted_relay_certificate_is_refused_when_verifying() -> None:
    """verify_tls (the default) refuses a self-signed relay certificate: temporary failure."""
    with CapturingSMTPServer(tls=True) as server:
        config = RelayConfig(host="127.0.0.1", port=server.port, starttls=True)
        with pytest.raises(TemporaryDeliveryError):
            await RelayTransport(config).deliver("a@x.test", ["b@y.test"], MESSAGE)
        unverified = RelayConfig(
            host="127.0.0.1", port=server.port, starttls=True, verify_tls=False
        )
        await RelayTransport(unverified).deliver("a@x.test", ["b@y.test"], MESSAGE)
        assert len(server.wait_for(1)) == 1


# -- parse_relay_url ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "smtp://user:pass@mail.example.com:587?starttls=true",
            RelayConfig("mail.example.com", 587, "user", "pass", starttls=True),
        ),
        ("smtp://relay.local", RelayConfig("relay.local", 25)),
        ("smtp://relay.local?starttls=yes", RelayConfig("relay.local", 587, starttls=True)),
        (
            "smtps://u:p@relay.example.com",
            RelayConfig("relay.example.com", 465, "u", "p", tls=True),
        ),
        (
            "smtps://relay.example.com:2465?verify=false",
            RelayConfig("relay.example.com", 2465, tls=True, verify_tls=False),
        ),
        ("smtp://127.0.0.1:1025", RelayConfig("127.0.0.1", 1025)),
        ("smtp://u%20x:p%25%40w@localhost:2525", RelayConfig("localhost", 2525, "u x", "p%@w")),
        ("smtp://[::1]:2525", RelayConfig("::1", 2525)),
    ],
)
def test_parse_relay_url_accepts_the_documented_forms(url: str, expected: RelayConfig) -> None:
    """smtp:// and smtps:// URLs give host, port, decoded credentials and TLS flags."""
    assert parse_relay_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://relay.example.com",
        "smtp://",
        "smtp://relay.example.com:99999",
        "smtp://relay.example.com:port",
        "smtp://relay.example.com/path",
        "smtp://relay.example.com?starttls=maybe",
        "smtp://relay.example.com?unknown=1",
        "smtps://relay.example.com?starttls=true",
        "smtp://user:pass@relay.example.com:25",
        "relay.example.com:25",
    ],
)
def test_parse_relay_url_refuses_bad_urls(url: str) -> None:
    """Malformed, unknown or unsafe relay URLs raise InvalidInput (clear-text AUTH included)."""
    with pytest.raises(InvalidInput) as exc:
        parse_relay_url(url)
    assert exc.value.code == "invalid_relay_url"


def test_relay_password_never_shows_in_repr_or_errors() -> None:
    """repr, str, the redacted URL and the transport's repr never contain the password."""
    secret = "hunter2-very-secret"
    config = parse_relay_url(f"smtps://agent:{secret}@relay.example.com")
    transport = RelayTransport(config)
    shown = [repr(config), str(config), config.redacted_url, repr(transport)]
    assert all(secret not in text for text in shown)
    assert config.redacted_url == "smtps://agent:***@relay.example.com:465"
    with pytest.raises(InvalidInput) as exc:
        parse_relay_url(f"smtp://agent:{secret}@relay.example.com?bogus=1")
    assert secret not in str(exc.value)


@settings(max_examples=60)
@given(
    user=st.text(min_size=1, max_size=20).filter(lambda s: s.strip() == s and s.isprintable()),
    password=st.text(max_size=30).filter(str.isprintable),
)
def test_any_credentials_round_trip_through_percent_encoding(user: str, password: str) -> None:
    """Credentials percent-encoded into the URL come back exactly."""
    from urllib.parse import quote

    config = parse_relay_url(
        f"smtps://{quote(user, safe='')}:{quote(password, safe='')}@relay.example.com"
    )
    assert config.username == user
    assert config.password == (password if user else None)


# -- DNS and MX delivery ------------------------------------------------------------------


def test_make_resolver_reads_host_and_port() -> None:
    """'host:port', '[v6]:port' and 'host' configure a resolver pointed only there."""
    resolver = make_resolver("127.0.0.1:5353")
    assert (resolver.nameservers, resolver.port) == (["127.0.0.1"], 5353)
    resolver = make_resolver("[::1]:5300")
    assert (resolver.nameservers, resolver.port) == (["::1"], 5300)
    assert make_resolver("127.0.0.2").port == 53
    for bad in ("dns.example.com:53", "127.0.0.1:0", "127.0.0.1:x", ":53"):
        with pytest.raises(InvalidInput):
            make_resolver(bad)


async def test_resolve_mx_sorts_by_preference(dns_server: LocalDNSServer) -> None:
    """MX hosts come back most preferred first, without trailing dots."""
    dns_server.add_record("example.test", "MX", "20 backup.example.test.")
    dns_server.add_record("example.test", "MX", "5 primary.example.test.")
    dns_server.add_record("example.test", "MX", "10 second.example.test.")
    hosts = await resolve_mx("example.test", make_resolver(dns_server.address))
    assert hosts == [
        (5, "primary.example.test"),
        (10, "second.example.test"),
        (20, "backup.example.test"),
    ]


async def test_resolve_mx_falls_back_to_the_address_record(dns_server: LocalDNSServer) -> None:
    """No MX but an A record: the domain itself is the mail host (RFC 5321 §5.1)."""
    dns_server.add_record("plain.test", "A", "127.0.0.1")
    assert await resolve_mx("plain.test", make_resolver(dns_server.address)) == [(0, "plain.test")]


@pytest.mark.parametrize(
    ("records", "code"),
    [
        ([("null.test", "MX", "0 .")], "null_mx"),
        ([("bare.test", "TXT", "v=spf1 -all")], "no_mail_host"),
        ([], "no_such_domain"),
    ],
)
async def test_domains_that_take_no_mail_are_permanent(
    dns_server: LocalDNSServer, records: list[tuple[str, str, str]], code: str
) -> None:
    """Null MX, no MX and no address, or NXDOMAIN: PermanentDeliveryError with a clear code."""
    for name, rtype, value in records:
        dns_server.add_record(name, rtype, value)
    domain = records[0][0] if records else "missing.test"
    with pytest.raises(PermanentDeliveryError) as exc:
        await resolve_mx(domain, make_resolver(dns_server.address))
    assert exc.value.code == code


async def test_dead_resolver_is_temporary() -> None:
    """A resolver that never answers gives a TemporaryDeliveryError, not a hang."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        resolver = make_resolver(f"127.0.0.1:{silent.getsockname()[1]}", lifetime=0.5)
        with pytest.raises(TemporaryDeliveryError) as exc:
            await resolve_mx("example.test", resolver)
    assert exc.value.code == "dns_failure"


@pytest.fixture
async def mx_world(
    dns_server: LocalDNSServer, smtp_server: CapturingSMTPServer
) -> AsyncIterator[tuple[LocalDNSServer, CapturingSMTPServer, MXTransport]]:
    transport = MXTransport(
        make_resolver(dns_server.address), mx_port=smtp_server.port, local_hostname="mm.test"
    )
    yield dns_server, smtp_server, transport


async def test_mx_delivery_through_local_dns(
    mx_world: tuple[LocalDNSServer, CapturingSMTPServer, MXTransport],
) -> None:
    """MX points at a name whose A is 127.0.0.1: the message reaches the capturing server."""
    dns_server, smtp_server, transport = mx_world
    dns_server.add_record("y.test", "MX", "10 mx.y.test.")
    dns_server.add_record("mx.y.test", "A", "127.0.0.1")
    [attempt] = await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert (attempt.host, attempt.address, attempt.code) == ("mx.y.test", "127.0.0.1", 250)
    [message] = smtp_server.wait_for(1)
    assert (message.rcpt_tos, message.data, message.helo) == (["b@y.test"], MESSAGE, "mm.test")


async def test_mx_delivery_falls_back_to_a_record(
    mx_world: tuple[LocalDNSServer, CapturingSMTPServer, MXTransport],
) -> None:
    """A domain without MX is delivered to its own address."""
    dns_server, smtp_server, transport = mx_world
    dns_server.add_record("y.test", "A", "127.0.0.1")
    [attempt] = await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert attempt.host == "y.test"
    assert len(smtp_server.wait_for(1)) == 1


async def test_mx_answers_are_kept_for_their_ttl(
    mx_world: tuple[LocalDNSServer, CapturingSMTPServer, MXTransport],
) -> None:
    """The next message to a domain reuses the DNS answers while their TTL lasts (no MX and
    address lookups per message); an answer published with TTL 0 is asked for again."""
    dns_server, smtp_server, transport = mx_world
    dns_server.add_record("y.test", "MX", "10 mx.y.test.", ttl=300)
    dns_server.add_record("mx.y.test", "A", "127.0.0.1", ttl=300)
    dns_server.add_record("z.test", "MX", "10 mx.y.test.", ttl=0)
    await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
    await transport.deliver("a@x.test", ["b@z.test"], MESSAGE)
    dns_server.remove_records("y.test")
    dns_server.remove_records("z.test")
    [attempt] = await transport.deliver("a@x.test", ["c@y.test"], MESSAGE)
    assert (attempt.host, attempt.code) == ("mx.y.test", 250)
    with pytest.raises(PermanentDeliveryError) as caught:
        await transport.deliver("a@x.test", ["c@z.test"], MESSAGE)
    [lookup] = _attempts(caught.value)
    assert lookup.reply == "the domain z.test does not exist"
    await transport.close()
    assert [m.rcpt_tos for m in smtp_server.wait_for(3)] == [
        ["b@y.test"],
        ["b@z.test"],
        ["c@y.test"],
    ]


async def test_null_mx_domain_bounces(
    mx_world: tuple[LocalDNSServer, CapturingSMTPServer, MXTransport],
) -> None:
    """Mail to a domain with a null MX is a permanent failure and never connects anywhere."""
    dns_server, smtp_server, transport = mx_world
    dns_server.add_record("y.test", "MX", "0 .")
    with pytest.raises(PermanentDeliveryError):
        await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert smtp_server.messages == []


async def test_next_mx_is_tried_when_the_first_refuses_connections(
    mx_world: tuple[LocalDNSServer, CapturingSMTPServer, MXTransport],
) -> None:
    """The preferred MX is down (connection refused): the backup MX gets the message."""
    dns_server, smtp_server, transport = mx_world
    dns_server.add_record("y.test", "MX", "10 down.y.test.")
    dns_server.add_record("y.test", "MX", "20 up.y.test.")
    # 127.0.0.2 is loopback too, but the capturing server only listens on 127.0.0.1.
    dns_server.add_record("down.y.test", "A", "127.0.0.2")
    dns_server.add_record("up.y.test", "A", "127.0.0.1")
    attempts = await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert [(a.host, a.code) for a in attempts] == [("down.y.test", None), ("up.y.test", 250)]
    assert len(smtp_server.wait_for(1)) == 1


async def test_no_second_mx_after_a_lost_reply(
    mx_world: tuple[LocalDNSServer, CapturingSMTPServer, MXTransport],
) -> None:
    """After DATA went out unanswered, no other MX is tried: that would risk a duplicate."""
    dns_server, smtp_server, transport = mx_world
    dns_server.add_record("y.test", "MX", "10 mx1.y.test.")
    dns_server.add_record("y.test", "MX", "20 mx2.y.test.")
    dns_server.add_record("mx1.y.test", "A", "127.0.0.1")
    dns_server.add_record("mx2.y.test", "A", "127.0.0.1")
    smtp_server.hang_up_after_data()
    with pytest.raises(TemporaryDeliveryError) as exc:
        await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert [a.host for a in _attempts(exc.value)] == ["mx1.y.test"]
    assert len(smtp_server.messages) == 1


async def test_all_mx_down_is_temporary(
    mx_world: tuple[LocalDNSServer, CapturingSMTPServer, MXTransport],
) -> None:
    """Every MX refusing connections: TemporaryDeliveryError with one attempt per host."""
    dns_server, _smtp_server, transport = mx_world
    dns_server.add_record("y.test", "MX", "10 a.y.test.")
    dns_server.add_record("y.test", "MX", "20 b.y.test.")
    dns_server.add_record("a.y.test", "A", "127.0.0.2")
    dns_server.add_record("b.y.test", "A", "127.0.0.3")
    with pytest.raises(TemporaryDeliveryError) as exc:
        await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
    assert [a.host for a in _attempts(exc.value)] == ["a.y.test", "b.y.test"]


async def test_opportunistic_starttls_to_mx(dns_server: LocalDNSServer) -> None:
    """An MX offering STARTTLS gets an encrypted session even with a self-signed certificate."""
    with CapturingSMTPServer(tls=True) as smtp_server:
        dns_server.add_record("y.test", "MX", "10 mx.y.test.")
        dns_server.add_record("mx.y.test", "A", "127.0.0.1")
        transport = MXTransport(make_resolver(dns_server.address), mx_port=smtp_server.port)
        [attempt] = await transport.deliver("a@x.test", ["b@y.test"], MESSAGE)
        assert attempt.tls is True
        assert smtp_server.wait_for(1)[0].tls is True


async def test_recipients_are_grouped_by_domain_with_separate_outcomes(
    mx_world: tuple[LocalDNSServer, CapturingSMTPServer, MXTransport],
) -> None:
    """One session per domain; a domain that does not exist fails only its own recipients."""
    dns_server, smtp_server, transport = mx_world
    for domain in ("y.test", "z.test"):
        dns_server.add_record(domain, "MX", f"10 mx.{domain}.")
        dns_server.add_record(f"mx.{domain}", "A", "127.0.0.1")
    rcpts = ["b@y.test", "c@z.test", "d@nowhere.test", "e@Y.test"]
    attempts = await transport.deliver("a@x.test", rcpts, MESSAGE)
    outcomes = recipient_outcomes(attempts)
    assert {r: (o.ok, o.permanent) for r, o in outcomes.items()} == {
        "b@y.test": (True, False),
        "e@Y.test": (True, False),
        "c@z.test": (True, False),
        "d@nowhere.test": (False, True),
    }
    received = sorted(tuple(m.rcpt_tos) for m in smtp_server.wait_for(2))
    assert received == [("b@y.test", "e@Y.test"), ("c@z.test",)]


async def test_recipient_deferred_by_one_mx_is_tried_at_the_next(
    mx_world: tuple[LocalDNSServer, CapturingSMTPServer, MXTransport],
) -> None:
    """A 451 for one recipient at the first MX: the second MX gets just that recipient."""
    dns_server, smtp_server, transport = mx_world
    dns_server.add_record("y.test", "MX", "10 mx1.y.test.")
    dns_server.add_record("y.test", "MX", "20 mx2.y.test.")
    dns_server.add_record("mx1.y.test", "A", "127.0.0.1")
    dns_server.add_record("mx2.y.test", "A", "127.0.0.1")
    smtp_server.fail_with(451, "4.2.0 busy", "rcpt", only_for=["slow@y.test"], times=1)
    attempts = await transport.deliver("a@x.test", ["b@y.test", "slow@y.test"], MESSAGE)
    assert [a.host for a in attempts] == ["mx1.y.test", "mx2.y.test"]
    assert all(o.ok for o in recipient_outcomes(attempts).values())
    assert [m.rcpt_tos for m in smtp_server.wait_for(2)] == [["b@y.test"], ["slow@y.test"]]


async def test_internationalised_address_uses_smtputf8(smtp_server: CapturingSMTPServer) -> None:
    """A non-ASCII mailbox is sent with the SMTPUTF8 option when the server offers it."""
    await _relay(smtp_server).deliver("a@x.test", ["josé@y.test"], MESSAGE)
    [message] = smtp_server.wait_for(1)
    assert message.rcpt_tos == ["josé@y.test"]
    assert "SMTPUTF8" in message.mail_options


def test_transports_satisfy_the_outbound_protocol(dns_server: LocalDNSServer) -> None:
    """Both transports can stand wherever an OutboundTransport is expected (checked by mypy)."""
    transports: list[OutboundTransport] = [
        RelayTransport(RelayConfig(host="127.0.0.1", port=2525)),
        MXTransport(make_resolver(dns_server.address)),
    ]
    assert all(callable(t.deliver) for t in transports)


forbidden = st.sampled_from(["\r", "\n", "\x00", " ", "\t", "<", ">"])


@settings(max_examples=80)
@given(
    local=st.text(alphabet=st.characters(codec="ascii", exclude_characters="@"), max_size=10),
    bad=forbidden,
    where=st.sampled_from(["mail_from", "rcpt"]),
)
def test_any_forbidden_character_in_the_envelope_is_refused(
    local: str, bad: str, where: str
) -> None:
    """SMTP-4: an envelope address carrying CR, LF, NUL, whitespace or <> never goes out."""
    address = f"{local}{bad}x@y.test"
    mail_from, rcpt = (address, "b@y.test") if where == "mail_from" else ("a@x.test", address)
    # Port 1 on loopback: refusal happens before any connection is attempted.
    transport = RelayTransport(RelayConfig(host="127.0.0.1", port=1))
    with pytest.raises(InvalidInput) as exc:
        asyncio.run(transport.deliver(mail_from, [rcpt], MESSAGE))
    assert exc.value.code == "header_injection"
