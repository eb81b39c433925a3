"""The shipped test fakes behave like the real servers they stand in for."""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multimail.errors import InvalidInput
from multimail.testing.dns import LocalDNSServer
from multimail.testing.smtp import CapturingSMTPServer, Stage


def _resolver(server: LocalDNSServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = 3.0
    return resolver


@pytest.fixture
def dns_server() -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        yield server


@pytest.fixture(scope="module")
def shared_dns_server() -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        yield server


@pytest.fixture
def smtp_server() -> Iterator[CapturingSMTPServer]:
    with CapturingSMTPServer() as server:
        yield server


# -- LocalDNSServer ---------------------------------------------------------------------


def test_dns_server_address_is_the_resolver_setting_format(dns_server: LocalDNSServer) -> None:
    """`.address` is "127.0.0.1:PORT", what MULTIMAIL_DNS_RESOLVER expects."""
    assert dns_server.address == f"127.0.0.1:{dns_server.port}"
    assert dns_server.port > 0


def test_dns_server_answers_a_aaaa_and_mx(dns_server: LocalDNSServer) -> None:
    """Published A, AAAA and MX records come back as published, with their TTL."""
    dns_server.add_record("example.test", "MX", "10 mx1.example.test.")
    dns_server.add_record("example.test", "MX", "20 mx2.example.test.", ttl=300)
    dns_server.add_record("mx1.example.test", "A", "127.0.0.1")
    dns_server.add_record("mx1.example.test", "AAAA", "::1")
    resolver = _resolver(dns_server)

    mx = resolver.resolve("example.test", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx1.example.test."),
        (20, "mx2.example.test."),
    ]
    assert [r.address for r in resolver.resolve("mx1.example.test", "A")] == ["127.0.0.1"]
    assert [r.address for r in resolver.resolve("MX1.Example.Test.", "AAAA")] == ["::1"]


def test_dns_server_splits_long_txt_into_255_byte_strings(dns_server: LocalDNSServer) -> None:
    """A TXT value over 255 bytes (a DKIM key) is served as several strings that join back."""
    value = "v=DKIM1; k=rsa; p=" + "A" * 600
    dns_server.add_record("sel._domainkey.example.test", "TXT", value)
    [record] = _resolver(dns_server).resolve("sel._domainkey.example.test", "TXT")
    assert all(len(chunk) <= 255 for chunk in record.strings)
    assert len(record.strings) == 3
    assert b"".join(record.strings).decode() == value


def test_dns_server_answers_over_tcp_too(dns_server: LocalDNSServer) -> None:
    """The same port serves TCP, which resolvers use for large answers."""
    dns_server.add_record("example.test", "TXT", "x" * 2000)
    answer = _resolver(dns_server).resolve("example.test", "TXT", tcp=True)
    assert b"".join(answer[0].strings) == b"x" * 2000


def test_unknown_name_is_nxdomain_and_missing_type_is_empty(dns_server: LocalDNSServer) -> None:
    """Unknown names answer NXDOMAIN; a known name without the asked type answers NOERROR."""
    dns_server.add_record("example.test", "A", "127.0.0.1")
    query = dns.message.make_query("nowhere.test", "A")
    reply = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=3)
    assert reply.rcode() == dns.rcode.NXDOMAIN

    query = dns.message.make_query("example.test", "MX")
    reply = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=3)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer == []


def test_cname_is_followed_inside_the_zone(dns_server: LocalDNSServer) -> None:
    """An A query on an alias answers the CNAME and the target's address."""
    dns_server.add_record("www.example.test", "CNAME", "host.example.test.")
    dns_server.add_record("host.example.test", "A", "127.0.0.7")
    answer = _resolver(dns_server).resolve("www.example.test", "A")
    assert [r.address for r in answer] == ["127.0.0.7"]
    assert answer.canonical_name.to_text() == "host.example.test."


def test_records_change_while_the_server_runs(dns_server: LocalDNSServer) -> None:
    """Adding, removing and clearing records takes effect on the next query."""
    resolver = _resolver(dns_server)
    dns_server.add_record("example.test", "A", "127.0.0.1")
    dns_server.add_record("example.test", "TXT", "hello")
    assert [r.address for r in resolver.resolve("example.test", "A")] == ["127.0.0.1"]

    dns_server.remove_records("example.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("example.test", "A")
    assert resolver.resolve("example.test", "TXT")[0].strings == (b"hello",)

    dns_server.add_record("example.test", "A", "127.0.0.2")
    dns_server.remove_records("example.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("example.test", "A")

    dns_server.add_record("other.test", "A", "127.0.0.3")
    dns_server.clear()
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("other.test", "A")


def test_records_can_change_from_another_thread_during_queries(
    dns_server: LocalDNSServer,
) -> None:
    """Concurrent writers and readers never break the server: every query gets an answer."""
    resolver = _resolver(dns_server)
    dns_server.add_record("busy.test", "A", "127.0.0.1")
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            dns_server.add_record("busy.test", "TXT", f"value {n}")
            dns_server.remove_records("busy.test", "TXT")

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(50):
            assert [r.address for r in resolver.resolve("busy.test", "A")] == ["127.0.0.1"]
    finally:
        stop.set()
        writer.join()


@pytest.mark.parametrize(
    ("rtype", "value"),
    [("A", "not-an-ip"), ("AAAA", "127.0.0.1"), ("MX", "mx.example.test"), ("SRV", "x")],
)
def test_bad_records_are_refused(dns_server: LocalDNSServer, rtype: str, value: str) -> None:
    """Malformed values and unsupported types raise InvalidInput instead of serving junk."""
    with pytest.raises(InvalidInput):
        dns_server.add_record("example.test", rtype, value)


def test_dns_server_releases_its_port_on_stop() -> None:
    """After stop() the UDP and TCP port can be bound again: nothing is left listening."""
    server = LocalDNSServer()
    server.start()
    port = server.port
    server.stop()
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    value=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=900)
)
def test_any_txt_value_round_trips(shared_dns_server: LocalDNSServer, value: str) -> None:
    """Whatever text is published as TXT is what a resolver reads back, byte for byte."""
    shared_dns_server.remove_records("rt.example.test")
    shared_dns_server.add_record("rt.example.test", "TXT", value)
    [record] = _resolver(shared_dns_server).resolve("rt.example.test", "TXT", tcp=True)
    assert b"".join(record.strings) == value.encode("utf-8")


# -- CapturingSMTPServer ----------------------------------------------------------------


def _send(
    server: CapturingSMTPServer, rcpts: list[str], data: bytes, mail_from: str = "a@x.test"
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        return client.sendmail(mail_from, rcpts, data)


def test_capturing_server_records_exactly_what_arrived(smtp_server: CapturingSMTPServer) -> None:
    """Envelope, peer and the data after dot-unstuffing are recorded as received."""
    data = b"Subject: hi\r\n\r\n.starts with a dot\r\n..two dots\r\nend\r\n"
    _send(smtp_server, ["b@y.test", "c@y.test"], data)
    [message] = smtp_server.wait_for(1, timeout=5)
    assert message.mail_from == "a@x.test"
    assert message.rcpt_tos == ["b@y.test", "c@y.test"]
    assert message.data == data
    assert message.peer[0] == "127.0.0.1"
    assert message.tls is False
    assert message.as_email()["Subject"] == "hi"


def test_spool_dir_gets_one_eml_per_message(tmp_path: Path) -> None:
    """With spool_dir, each accepted message is also written there as .eml."""
    with CapturingSMTPServer(spool_dir=tmp_path / "spool") as server:
        _send(server, ["b@y.test"], b"Subject: one\r\n\r\n1\r\n")
        _send(server, ["b@y.test"], b"Subject: two\r\n\r\n2\r\n")
        server.wait_for(2, timeout=5)
    files = sorted((tmp_path / "spool").glob("*.eml"))
    assert [f.read_bytes() for f in files] == [
        b"Subject: one\r\n\r\n1\r\n",
        b"Subject: two\r\n\r\n2\r\n",
    ]


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
def test_fail_with_refuses_at_the_chosen_stage(
    smtp_server: CapturingSMTPServer, stage: Stage
) -> None:
    """fail_with answers the given code at MAIL, RCPT or DATA, and nothing is recorded."""
    smtp_server.fail_with(451, "4.3.0 try later", stage)
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=5) as client:
        client.ehlo()
        code, _ = client.mail("a@x.test")
        if stage == "mail":
            assert code == 451
            return
        code, _ = client.rcpt("b@y.test")
        if stage == "rcpt":
            assert code == 451
            return
        code, reply = client.data(b"Subject: x\r\n\r\nx\r\n")
        assert (code, reply) == (451, b"4.3.0 try later")
    assert smtp_server.messages == []


def test_fail_with_only_for_and_times(smtp_server: CapturingSMTPServer) -> None:
    """`only_for` refuses just those recipients; `times` stops refusing after N refusals."""
    smtp_server.fail_with(550, "5.1.1 no such user", "rcpt", only_for=["bad@y.test"], times=1)
    refused = _send(smtp_server, ["good@y.test", "bad@y.test"], b"Subject: x\r\n\r\nx\r\n")
    assert refused == {"bad@y.test": (550, b"5.1.1 no such user")}
    assert smtp_server.wait_for(1)[0].rcpt_tos == ["good@y.test"]

    assert _send(smtp_server, ["bad@y.test"], b"Subject: y\r\n\r\ny\r\n") == {}
    assert smtp_server.wait_for(2)[1].rcpt_tos == ["bad@y.test"]


def test_reset_behaviour_accepts_again(smtp_server: CapturingSMTPServer) -> None:
    """After reset_behaviour every refusal and hang-up switch is off."""
    smtp_server.fail_with(554, "5.7.1 no", "data")
    smtp_server.hang_up_after_data()
    smtp_server.reset_behaviour()
    assert _send(smtp_server, ["b@y.test"], b"Subject: x\r\n\r\nx\r\n") == {}
    assert len(smtp_server.wait_for(1)) == 1


def test_hang_up_after_data_reads_the_message_and_never_replies(
    smtp_server: CapturingSMTPServer,
) -> None:
    """The whole message arrives and is recorded, but the client gets no reply to DATA."""
    smtp_server.hang_up_after_data(times=1)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        _send(smtp_server, ["b@y.test"], b"Subject: lost reply\r\n\r\nbody\r\n")
    [message] = smtp_server.wait_for(1)
    assert message.data == b"Subject: lost reply\r\n\r\nbody\r\n"
    # `times=1`: the next session is answered normally.
    assert _send(smtp_server, ["b@y.test"], b"Subject: again\r\n\r\nbody\r\n") == {}


def test_wait_for_times_out_without_enough_messages(smtp_server: CapturingSMTPServer) -> None:
    """wait_for raises TimeoutError when the count is not reached in time."""
    with pytest.raises(TimeoutError):
        smtp_server.wait_for(1, timeout=0.2)


def test_wait_for_wakes_up_when_another_thread_delivers(
    smtp_server: CapturingSMTPServer,
) -> None:
    """A waiter blocked in wait_for is woken by a delivery from another thread."""
    sender = threading.Timer(0.2, _send, (smtp_server, ["b@y.test"], b"Subject: x\r\n\r\nx\r\n"))
    sender.start()
    try:
        assert len(smtp_server.wait_for(1, timeout=5)) == 1
    finally:
        sender.join()


def test_starttls_and_auth_are_required_and_recorded() -> None:
    """With tls+auth, AUTH is only offered after STARTTLS and the session is recorded as such."""
    with CapturingSMTPServer(tls=True, auth=("agent", "s3cret pass")) as server:
        with smtplib.SMTP(server.host, server.port, timeout=5) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert not client.has_extn("auth")
            code, _ = client.mail("a@x.test")
            assert code == 530
            client.rset()
            client.starttls(context=server.client_tls_context())
            client.ehlo()
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("agent", "wrong")
            client.login("agent", "s3cret pass")
            client.sendmail("a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nx\r\n")
        [message] = server.wait_for(1)
        assert message.tls is True
        assert message.auth_user == "agent"


def test_implicit_tls_server_speaks_tls_from_the_first_byte() -> None:
    """implicit_tls=True behaves like port 465, verified against its own certificate."""
    with CapturingSMTPServer(implicit_tls=True) as server:
        context = server.client_tls_context()
        with smtplib.SMTP_SSL(server.host, server.port, timeout=5, context=context) as client:
            client.sendmail("a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nx\r\n")
        assert server.wait_for(1)[0].tls is True


def test_self_signed_certificate_is_not_trusted_by_default() -> None:
    """A verifying client without the server's certificate refuses the handshake."""
    with (
        CapturingSMTPServer(tls=True) as server,
        smtplib.SMTP(server.host, server.port, timeout=5) as client,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        client.starttls(context=ssl.create_default_context())
