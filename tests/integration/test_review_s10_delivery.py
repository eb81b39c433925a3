"""Review of outbound delivery (session 10): each test began as a strict xfail pinning a
defect, and became a plain test with its fix (smtp/outbound.py).

Everything runs on loopback with the real delivery worker: a capturing SMTP relay, a local
DNS server, and a small scripted MX written here on asyncio streams for what aiosmtpd will
not do (greet late, refuse EHLO, take its time before answering the final dot, answer in
Latin-1). The timing tests give the worker's transport short per-command timeouts, so a
wait of seconds stands for RFC 5321's minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, fields

import pytest

from multimail.config import Settings
from multimail.services.context import Services
from multimail.smtp import outbound
from multimail.smtp.outbound import (
    MXTransport,
    RelayConfig,
    RelayTransport,
    SMTPTimeouts,
    make_resolver,
)
from multimail.testing.dns import LocalDNSServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import delivery
from tests.integration import relay_support
from tests.integration.test_delivery_rfc import Sender, _mx_sender

relay = relay_support.relay


@pytest.fixture
def relayed(settings: Settings, relay: CapturingSMTPServer) -> Iterator[Services]:
    with relay_support.relayed_services(settings, relay, compose_processes=0) as services:
        yield services


@pytest.fixture
def dns_server() -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        yield server


@dataclass
class PatientMX:
    """A plain SMTP server on 127.0.0.1 that accepts everything, with habits of real MX
    hosts: ``greeting_delay`` seconds before its 220 (a loaded or tarpitting host),
    ``helo_only`` (no extensions: EHLO answers 502, HELO works), ``slow_first_reply``
    seconds of scanning before it answers the first message's final dot, and
    ``data_reply``, the exact bytes of that answer."""

    greeting_delay: float = 0.0
    helo_only: bool = False
    slow_first_reply: float = 0.0
    data_reply: bytes = b"250 2.0.0 queued\r\n"
    port: int = 0
    delivered: list[list[str]] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None
    # Set by stop(): a session still pausing ends there instead of being cancelled.
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _sessions: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._stopping.set()
        self._server.close()
        await self._server.wait_closed()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False when the server is stopping meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            if not await self._pause(self.greeting_delay):
                return
            writer.write(b"220 mx.patient.test ESMTP\r\n")
            rcpts: list[str] = []
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    if self.helo_only:
                        writer.write(b"502 5.5.2 Error: command not recognized\r\n")
                    else:
                        writer.write(b"250-mx.patient.test\r\n250 8BITMIME\r\n")
                elif verb == b"HELO":
                    writer.write(b"250 mx.patient.test\r\n")
                elif verb == b"RCPT":
                    rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    await reader.readuntil(b"\r\n.\r\n")
                    first = not self.delivered
                    self.delivered.append(rcpts)
                    rcpts = []
                    if first and not await self._pause(self.slow_first_reply):
                        return
                    writer.write(self.data_reply)
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:  # MAIL, RSET, NOOP
                    if verb in (b"MAIL", b"RSET"):
                        rcpts = []
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._sessions.discard(task)
            writer.close()


@pytest.fixture
async def patient_mx() -> AsyncIterator[PatientMX]:
    server = PatientMX()
    await server.start()
    yield server
    await server.stop()


def _publish(dns_server: LocalDNSServer, domain: str) -> None:
    dns_server.add_record(domain, "MX", f"10 mx.{domain}.")
    dns_server.add_record(f"mx.{domain}", "A", "127.0.0.1")


def _short_timeouts(**longer: float) -> SMTPTimeouts:
    """One second for every step but those named in ``longer``."""
    return SMTPTimeouts(**{**{step.name: 1.0 for step in fields(SMTPTimeouts)}, **longer})


def _with_timeouts(
    sender: Sender, dns_server: LocalDNSServer, mx_port: int, timeouts: SMTPTimeouts
) -> None:
    """Make the worker deliver through an MX transport with ``timeouts`` (it takes the one
    cached in the services' extras, as it caches its own)."""
    sender.services.extras["outbound_transport"] = MXTransport(
        make_resolver(dns_server.address),
        mx_port=mx_port,
        local_hostname=sender.services.settings.domain,
        timeouts=timeouts,
    )


# -- how a refusal is judged -------------------------------------------------------------------


async def test_552_too_many_recipients_at_rcpt_defers_instead_of_suppressing(
    relayed: Services, relay: CapturingSMTPServer
) -> None:
    """The relay takes two recipients per transaction and answers the third with the RFC 821
    code for a full recipients buffer. carol did nothing wrong: she must wait for the next
    transaction, and must not land on the account's suppression list (which would stop all
    later mail to her from every mailbox)."""
    relay.fail_with(
        552, "5.5.3 Too many recipients", stage="rcpt", only_for=["carol@example.test"], times=1
    )
    sender = Sender(relayed)
    message_id = sender.queue(["alice@example.test", "bob@example.test", "carol@example.test"])
    status = await delivery.deliver(relayed, message_id, "w1")
    assert sender.suppressed("carol@example.test") == set()
    assert status == "deferred"


async def test_relay_access_denied_does_not_suppress_the_recipients(
    relayed: Services, relay: CapturingSMTPServer
) -> None:
    """A relay that stops relaying for us (a changed mynetworks, an expired relay account)
    answers every RCPT with 554 5.7.1 Relay access denied (RFC 3463: X.7.1 is a policy
    refusal of the sender, not a bad mailbox). Until the operator notices, every recipient of
    every message would be put on the suppression list for good."""
    relay.fail_with(554, "5.7.1 Relay access denied", stage="rcpt")
    sender = Sender(relayed)
    message_id = sender.queue(["alice@example.test"], cc=["bob@example.test"])
    status = await delivery.deliver(relayed, message_id, "w1")
    assert status in ("bounced", "send_failed")
    assert sender.suppressed("alice@example.test", "bob@example.test") == set()


async def test_a_message_refused_for_its_size_does_not_suppress_the_recipient(
    relayed: Services, relay: CapturingSMTPServer
) -> None:
    """RFC 5321 552 after the final dot (RFC 3463 X.3.4, message too big; Gmail answers its
    size and blocked-attachment refusals the same way): alice's mailbox is fine, and her next
    (smaller) mail must reach her, so she must not be suppressed."""
    relay.fail_with(552, "5.3.4 Message size exceeds fixed maximum message size", stage="data")
    sender = Sender(relayed)
    message_id = sender.queue(["alice@example.test"])
    status = await delivery.deliver(relayed, message_id, "w1")
    assert status in ("bounced", "send_failed")
    assert sender.suppressed("alice@example.test") == set()


# -- how we talk to an MX ------------------------------------------------------------------------


async def test_an_mx_that_refuses_ehlo_is_greeted_with_helo(
    settings: Settings, dns_server: LocalDNSServer, patient_mx: PatientMX
) -> None:
    """Old appliances and minimal MTAs still speak only RFC 821 SMTP. Every MTA (Postfix,
    Exim, aiosmtplib's own _ehlo_or_helo_if_needed) falls back to HELO."""
    patient_mx.helo_only = True
    _publish(dns_server, "old.test")
    async with _mx_sender(settings, dns_server, patient_mx.port) as sender:
        message_id = sender.queue(["bob@old.test"])
        assert await delivery.deliver(sender.services, message_id, "w1") == "delivered"
        assert patient_mx.delivered == [["bob@old.test"]]


async def test_a_relay_that_refuses_ehlo_is_greeted_with_helo(patient_mx: PatientMX) -> None:
    """The relay path (MULTIMAIL_SMTP_URL) greets the same way: EHLO refused, HELO on the
    same connection, and the message goes through."""
    patient_mx.helo_only = True
    relay = RelayTransport(RelayConfig(host="127.0.0.1", port=patient_mx.port))
    try:
        [attempt] = await relay.deliver("a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nhi\r\n")
    finally:
        await relay.close()
    assert attempt.code == 250
    assert patient_mx.delivered == [["b@y.test"]]


async def test_an_mx_that_greets_late_still_gets_the_mail(
    settings: Settings, dns_server: LocalDNSServer, patient_mx: PatientMX
) -> None:
    """Many servers accept the TCP connection and hold the 220 until load permits (RFC 5321
    §4.5.3.2.1 says so in as many words), or pause on purpose to catch clients that talk
    first. The greeting has its own wait, longer than the TCP connection's: here the
    connection may take 1 s and the greeting 5 s, and the MX greets after 2 s."""
    patient_mx.greeting_delay = 2.0
    _publish(dns_server, "busy.test")
    async with _mx_sender(settings, dns_server, patient_mx.port) as sender:
        _with_timeouts(sender, dns_server, patient_mx.port, _short_timeouts(greeting=5.0))
        message_id = sender.queue(["bob@busy.test"])
        assert await delivery.deliver(sender.services, message_id, "w1") == "delivered"
        assert patient_mx.delivered == [["bob@busy.test"]]


async def test_a_receiver_slow_to_answer_the_final_dot_gets_one_copy(
    settings: Settings, dns_server: LocalDNSServer, patient_mx: PatientMX
) -> None:
    """The receiver reads the whole message and answers 250 after scanning it for longer
    than any other step may take (content and virus scanning of large mail does). The reply
    to the final dot has its own, longer wait (RFC 5321 §4.5.3.2.6: 10 minutes; here every
    command gets 1 s, the dot 5 s, and the scan takes 2 s). The message is then at the
    receiver: it must be recorded delivered, not deferred, since every retry would hand
    over another copy (and the next one is just as slow)."""
    patient_mx.slow_first_reply = 2.0
    _publish(dns_server, "scan.test")
    async with _mx_sender(settings, dns_server, patient_mx.port) as sender:
        _with_timeouts(sender, dns_server, patient_mx.port, _short_timeouts(data_end=5.0))
        message_id = sender.queue(["bob@scan.test"])
        status = await delivery.deliver(sender.services, message_id, "w1")
        assert (status, patient_mx.delivered) == ("delivered", [["bob@scan.test"]])


def test_the_default_timeouts_are_rfc_5321s(relayed: Services) -> None:
    """RFC 5321 §4.5.3.2's per-command minimums: 5 minutes for the greeting, MAIL and
    RCPT, 2 for the 354, 3 per data block, 10 for the reply to the final dot; the TCP
    connection alone 10 s. The worker's transport uses them."""
    assert (
        outbound.DEFAULT_GREETING_TIMEOUT,
        outbound.DEFAULT_MAIL_TIMEOUT,
        outbound.DEFAULT_RCPT_TIMEOUT,
        outbound.DEFAULT_DATA_START_TIMEOUT,
        outbound.DEFAULT_DATA_BLOCK_TIMEOUT,
        outbound.DEFAULT_DATA_END_TIMEOUT,
    ) == (5 * 60, 5 * 60, 5 * 60, 2 * 60, 3 * 60, 10 * 60)
    assert outbound.DEFAULT_CONNECT_TIMEOUT == 10
    assert SMTPTimeouts() == SMTPTimeouts(
        connect=10,
        greeting=300,
        command=300,
        mail=300,
        rcpt=300,
        data_start=120,
        data_block=180,
        data_end=600,
    )
    transport = delivery.outbound_transport(relayed)
    assert isinstance(transport, RelayTransport)
    assert transport.timeouts == SMTPTimeouts()


# -- what the server says ----------------------------------------------------------------------


async def test_a_250_whose_text_is_not_utf8_is_recorded_and_sent_once(
    settings: Settings, dns_server: LocalDNSServer, patient_mx: PatientMX
) -> None:
    """RFC 5321 §4.2 lets a client act on the reply code alone; localised MTAs still answer
    in Latin-1 ("Nachricht übernommen" with ü as the single byte 0xFC). The 250 was given:
    the message must be recorded delivered, and a second run of its job (a retry, the sweep)
    must not send it again."""
    patient_mx.data_reply = "250 2.0.0 Nachricht \u00fcbernommen\r\n".encode("latin-1")
    _publish(dns_server, "alt.test")
    async with _mx_sender(settings, dns_server, patient_mx.port) as sender:
        message_id = sender.queue(["bob@alt.test"])
        assert await delivery.deliver(sender.services, message_id, "w1") == "delivered"
        assert await delivery.deliver(sender.services, message_id, "w2") == "delivered"
        assert patient_mx.delivered == [["bob@alt.test"]]
