"""Outbound delivery against the RFCs an MTA follows and SPEC §2-§3.

Each test began as a reviewer's strict xfail naming a defect (session 6) and became a plain
test with its fix: 5xx greetings, opportunistic STARTTLS, bounces beside deferrals, refused
senders, List-Unsubscribe, IDNA 2008. Everything runs on loopback: the real delivery worker, a
local DNS server, capturing or scripted SMTP servers on 127.0.0.1 (an MX host published
as 127.0.0.2 has nobody listening: a refused connection), and the live HTTP and inbound
SMTP servers where the unsubscribe paths need them.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import directory
from multimail.services.context import Services
from multimail.store.tables import events, suppressions
from multimail.testing.dns import LocalDNSServer
from multimail.testing.server import LiveServer
from multimail.testing.smtp import CapturingSMTPServer
from multimail.workers import delivery
from multimail.workers.inbound import run_inbound_worker, run_smtp
from tests.integration.inbound_support import running
from tests.integration.oversight_support import subscribe_everything
from tests.integration.test_delivery import World

# -- helpers ---------------------------------------------------------------------------------


class Sender(World):
    """test_delivery's World (the account and its autonomous mailbox agent@mm.test), with
    the lookups these tests make."""

    def queue(self, to: list[str], cc: list[str] | None = None) -> str:
        """A queued outbound message with its deliver job, as the sending service leaves it."""
        return self.message(to=to, cc=cc)

    def suppressed(self, *addresses: str) -> set[str]:
        with self.services.db.read() as conn:
            return directory.suppressed_among(conn, self.account_id, list(addresses))

    def events(self, message_id: str) -> list[dict[str, Any]]:
        with self.services.db.read() as conn:
            rows = conn.execute(
                select(events).where(events.c.message_id == message_id).order_by(events.c.seq)
            )
            return [dict(r) for r in rows.mappings()]


def _services(settings: Settings, **changes: Any) -> Services:
    return build_services(
        settings.model_copy(update={"compose_processes": 0, **changes}), run_migrations=False
    )


@asynccontextmanager
async def _mx_sender(
    settings: Settings, dns: LocalDNSServer, mx_port: int
) -> AsyncIterator[Sender]:
    """A ``Sender`` whose worker resolves MX hosts at ``dns`` and connects to ``mx_port``;
    its pooled SMTP sessions and database are closed after the test."""
    services = _services(settings, dns_resolver=dns.address, mx_port=mx_port)
    try:
        yield Sender(services)
    finally:
        await delivery._close_sessions(services)
        services.db.dispose()


@pytest.fixture
def relay() -> Iterator[CapturingSMTPServer]:
    with CapturingSMTPServer() as server:
        yield server


@pytest.fixture
def relayed(settings: Settings, relay: CapturingSMTPServer) -> Iterator[Services]:
    services = _services(settings, smtp_url=SecretStr(f"smtp://127.0.0.1:{relay.port}"))
    yield services
    services.db.dispose()


@dataclass
class ScriptedMX:
    """A plain ESMTP server on 127.0.0.1 that answers from a script, for what aiosmtpd will
    not do: ``greetings`` are the first lines of the first connections (a 5xx greeting then
    hangs up); later connections get ``220`` and a normal session that accepts everything.
    ``starttls_reply``, when set, makes EHLO offer STARTTLS and answers it with that line."""

    greetings: list[bytes] = field(default_factory=list)
    starttls_reply: bytes | None = None
    # After a 220 to STARTTLS, answer the client's handshake with clear text and hang up.
    tls_junk: bool = False
    port: int = 0
    connections: int = 0
    delivered: list[tuple[list[str], bytes]] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self.connections = self.connections, self.connections + 1
        try:
            if number < len(self.greetings):
                writer.write(self.greetings[number])
                await writer.drain()
                return
            writer.write(b"220 mx.scripted.test ESMTP\r\n")
            rcpts: list[str] = []
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-mx.scripted.test\r\n250-8BITMIME\r\n")
                    if self.starttls_reply is not None:
                        writer.write(b"250-STARTTLS\r\n")
                    writer.write(b"250 SIZE 10000000\r\n")
                elif verb == b"STAR" and self.starttls_reply is not None:
                    writer.write(self.starttls_reply)
                    if self.tls_junk:
                        await writer.drain()
                        writer.write(b"this is not a TLS server hello\r\n" * 4)
                        await writer.drain()
                        return
                elif verb == b"RCPT":
                    rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
                    writer.write(b"250 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    payload = b""
                    while not payload.endswith(b"\r\n.\r\n"):
                        payload += await reader.readuntil(b"\r\n")
                    self.delivered.append((rcpts, payload))
                    rcpts = []
                    writer.write(b"250 stored\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:  # HELO, MAIL, RSET, NOOP
                    if verb in (b"MAIL", b"RSET"):
                        rcpts = []
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted_mx() -> AsyncIterator[ScriptedMX]:
    server = ScriptedMX()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def dns_server() -> Iterator[LocalDNSServer]:
    with LocalDNSServer() as server:
        yield server


# -- 1. MX resolution ------------------------------------------------------------------------


async def test_a_5xx_greeting_at_the_preferred_mx_moves_on_to_the_next_mx(
    settings: Settings, dns_server: LocalDNSServer, scripted_mx: ScriptedMX
) -> None:
    """RFC 5321 §3.1 lets a host that will not serve us greet with 554; that is about the
    host, not any mailbox, so an MTA goes on to the next MX (Postfix: smtp_skip_5xx_greeting,
    on by default). The backup MX accepts here; the message must arrive and nobody may be
    suppressed."""
    scripted_mx.greetings = [b"554 5.7.1 mx1 does not accept mail from you\r\n"]
    dns_server.add_record("y.test", "MX", "10 mx1.y.test.")
    dns_server.add_record("y.test", "MX", "20 mx2.y.test.")
    dns_server.add_record("mx1.y.test", "A", "127.0.0.1")
    dns_server.add_record("mx2.y.test", "A", "127.0.0.1")
    async with _mx_sender(settings, dns_server, scripted_mx.port) as sender:
        message_id = sender.queue(["bob@y.test"])
        status = await delivery.deliver(sender.services, message_id, "w1")
        assert (status, sender.suppressed("bob@y.test")) == ("delivered", set())
        assert [rcpts for rcpts, _ in scripted_mx.delivered] == [["bob@y.test"]]


async def test_opportunistic_tls_falls_back_to_clear_text_when_starttls_is_refused(
    settings: Settings, dns_server: LocalDNSServer, scripted_mx: ScriptedMX
) -> None:
    """RFC 7435 (opportunistic security) and RFC 3207 §4 (454 TLS not available): with no
    policy requiring TLS (no MTA-STS, no DANE), an MTA that cannot start TLS sends in clear
    rather than hold the mail for three days and fail it (Postfix smtp_tls_security_level =
    may). The MX offers STARTTLS but answers 454; the message must still arrive."""
    scripted_mx.starttls_reply = b"454 4.7.0 TLS not available due to temporary reason\r\n"
    dns_server.add_record("y.test", "MX", "10 mx.y.test.")
    dns_server.add_record("mx.y.test", "A", "127.0.0.1")
    async with _mx_sender(settings, dns_server, scripted_mx.port) as sender:
        message_id = sender.queue(["bob@y.test"])
        assert await delivery.deliver(sender.services, message_id, "w1") == "delivered"
        assert [rcpts for rcpts, _ in scripted_mx.delivered] == [["bob@y.test"]]


async def test_a_failed_tls_handshake_at_an_mx_is_retried_in_clear_text(
    settings: Settings, dns_server: LocalDNSServer, scripted_mx: ScriptedMX
) -> None:
    """The MX answers 220 to STARTTLS and then no TLS: that connection is lost, and a new
    one without STARTTLS carries the message (Postfix retries in clear at level ``may``)."""
    scripted_mx.starttls_reply = b"220 2.0.0 go ahead\r\n"
    scripted_mx.tls_junk = True
    dns_server.add_record("y.test", "MX", "10 mx.y.test.")
    dns_server.add_record("mx.y.test", "A", "127.0.0.1")
    async with _mx_sender(settings, dns_server, scripted_mx.port) as sender:
        message_id = sender.queue(["bob@y.test"])
        assert await delivery.deliver(sender.services, message_id, "w1") == "delivered"
        assert [rcpts for rcpts, _ in scripted_mx.delivered] == [["bob@y.test"]]
        assert scripted_mx.connections == 2


async def test_a_5xx_greeting_at_the_only_mx_defers_without_suppressing(
    settings: Settings, dns_server: LocalDNSServer, scripted_mx: ScriptedMX
) -> None:
    """With no other MX to go to, a host that will not talk to us is a temporary failure:
    the message waits for its retries and nobody is suppressed."""
    scripted_mx.greetings = [b"554 5.7.1 not now\r\n"]
    dns_server.add_record("y.test", "MX", "10 mx.y.test.")
    dns_server.add_record("mx.y.test", "A", "127.0.0.1")
    async with _mx_sender(settings, dns_server, scripted_mx.port) as sender:
        message_id = sender.queue(["bob@y.test"])
        assert await delivery.deliver(sender.services, message_id, "w1") == "deferred"
        assert sender.suppressed("bob@y.test") == set()
        assert await delivery.deliver(sender.services, message_id, "w1") == "delivered"


# -- 2. Per-recipient outcomes ---------------------------------------------------------------


async def test_a_hard_bounce_beside_a_deferral_still_emits_message_bounced(
    settings: Settings, dns_server: LocalDNSServer
) -> None:
    """alice@a.test is accepted, bob@a.test refused with 550, carol@c.test deferred (her MX
    refuses connections). When carol's MX comes back the message is delivered. The agent
    must have been told about bob, as it is when no one is deferred (message.bounced with
    ``partial``)."""
    with CapturingSMTPServer() as mx:
        mx.fail_with(550, "5.1.1 no such user", stage="rcpt", only_for=["bob@a.test"])
        dns_server.add_record("a.test", "MX", "10 mx.a.test.")
        dns_server.add_record("mx.a.test", "A", "127.0.0.1")
        dns_server.add_record("c.test", "MX", "10 mx.c.test.", ttl=0)
        dns_server.add_record("mx.c.test", "A", "127.0.0.2", ttl=0)  # nobody listens there
        async with _mx_sender(settings, dns_server, mx.port) as sender:
            subscribe_everything(sender.services, sender.account_id)
            message_id = sender.queue(["alice@a.test", "bob@a.test"], cc=["carol@c.test"])
            assert await delivery.deliver(sender.services, message_id, "w1") == "deferred"
            assert sender.suppressed("bob@a.test") == {"bob@a.test"}
            dns_server.remove_records("mx.c.test")
            dns_server.add_record("mx.c.test", "A", "127.0.0.1", ttl=0)
            assert await delivery.deliver(sender.services, message_id, "w1") == "delivered"
            assert sorted(r for m in mx.wait_for(2) for r in m.rcpt_tos) == [
                "alice@a.test",
                "carol@c.test",
            ]
            bounced = [e for e in sender.events(message_id) if e["type"] == "message.bounced"]
            assert [e["payload"].get("bounced_recipients") for e in bounced] == [["bob@a.test"]]


async def test_a_refused_sender_does_not_suppress_the_recipients(
    relayed: Services, relay: CapturingSMTPServer
) -> None:
    """RFC 5321 §4.1.1.2 / RFC 3463: a 550 5.7.1 to MAIL FROM says the relay will not take
    mail from this sender (an expired sender verification, a policy, a quota). The message
    fails, but alice and bob did nothing: suppressing them would silently stop all later
    mail to them, from every mailbox of the account, after one relay misconfiguration."""
    relay.fail_with(550, "5.7.1 <agent@mm.test>: sender address rejected", stage="mail")
    sender = Sender(relayed)
    message_id = sender.queue(["alice@example.test"], cc=["bob@example.test"])
    status = await delivery.deliver(relayed, message_id, "w1")
    assert status in ("bounced", "send_failed")
    assert sender.suppressed("alice@example.test", "bob@example.test") == set()


# -- 3. Suppression and unsubscribe ----------------------------------------------------------


def _list_unsubscribe(data: bytes) -> tuple[str, str]:
    """(the mailto URI, the https URI) of a message's List-Unsubscribe header."""
    value = " ".join(str(_parse(data)["List-Unsubscribe"]).split())
    uris = [u.strip().strip("<>") for u in value.split(",")]
    mailto = next(u for u in uris if u.startswith("mailto:"))
    web = next(u for u in uris if u.startswith("http"))
    return mailto, web


def _parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


async def test_several_recipients_get_no_one_click_uri_that_could_name_another(
    relayed: Services, relay: CapturingSMTPServer
) -> None:
    """RFC 8058 §3.1: the one-click URI must identify the recipient, and alice (To) and bob
    (Cc) get the same bytes, so no token may be in them: bob's click would unsubscribe alice
    (it did, when the token named the first To). They get the mailto: URI, which names
    whoever mails it."""
    sender = Sender(relayed)
    message_id = sender.queue(["alice@example.test"], cc=["bob@example.test"])
    assert await delivery.deliver(relayed, message_id, "w1") == "delivered"
    [copy] = relay.wait_for(1)
    parsed = _parse(copy.data)
    assert str(parsed["List-Unsubscribe"]) == "<mailto:agent@mm.test?subject=unsubscribe>"
    assert parsed["List-Unsubscribe-Post"] is None


async def test_one_click_unsubscribe_suppresses_the_lone_recipient(
    relayed: Services, relay: CapturingSMTPServer
) -> None:
    """A message to one address carries the one-click URI for that address; the POST an
    RFC 8058 client sends suppresses it."""
    sender = Sender(relayed)
    message_id = sender.queue(["alice@example.test"])
    assert await delivery.deliver(relayed, message_id, "w1") == "delivered"
    [copy] = relay.wait_for(1)
    assert str(_parse(copy.data)["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    _mailto, https = _list_unsubscribe(copy.data)
    with LiveServer(relayed) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as client:
            response = await client.post(
                urlsplit(https).path,
                content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
    assert response.status_code == 200, response.text
    assert sender.suppressed("alice@example.test") == {"alice@example.test"}


def test_the_mailto_unsubscribe_address_is_accepted_and_suppresses_the_sender(
    settings: Settings, relay: CapturingSMTPServer
) -> None:
    """RFC 2369 §3.2 / RFC 8058 §3.1: a mail client without one-click support (or with an
    http:// URI, which RFC 8058 receivers ignore) unsubscribes by mailing the mailto: URI,
    from the recipient's address. That mail must be taken and must suppress alice."""
    with (
        LocalDNSServer() as dns_server,
        running(
            settings,
            [run_smtp, run_inbound_worker],
            smtp_url=SecretStr(f"smtp://127.0.0.1:{relay.port}"),
            compose_processes=0,
            dns_resolver=dns_server.address,
        ) as (services, _live, smtp_port),
    ):
        # alice's domain vouches for the host she mails from: a request in her name is acted
        # on only when SPF, DKIM or DMARC says it is hers.
        dns_server.add_record("example.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        sender = Sender(services)
        message_id = sender.queue(["alice@example.test"])
        assert asyncio.run(delivery.deliver(services, message_id, "w1")) == "delivered"
        [received] = relay.wait_for(1)
        mailto, _https = _list_unsubscribe(received.data)
        address, _, query = mailto.removeprefix("mailto:").partition("?")
        subject = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("subject", "")
        request = (
            f"From: alice@example.test\r\nTo: {address}\r\nSubject: {subject}\r\n"
            f"Message-ID: <unsub-{message_id}@example.test>\r\n\r\n{subject}\r\n"
        ).encode()
        with smtplib.SMTP("127.0.0.1", smtp_port) as client:
            client.ehlo("example.test")
            client.mail("alice@example.test")
            code, reply = client.rcpt(address)
            assert code == 250, f"RCPT TO:<{address}> answered {code} {reply.decode()}"
            client.data(request)
        deadline = time.monotonic() + 20
        while not sender.suppressed("alice@example.test") and time.monotonic() < deadline:
            time.sleep(0.1)
        with services.db.read() as conn:
            rows = conn.execute(select(suppressions.c.address, suppressions.c.reason)).all()
        assert [tuple(r) for r in rows] == [("alice@example.test", "unsubscribe")]


# -- 4. The delivered bytes ------------------------------------------------------------------


async def test_an_idn_domain_is_sent_to_its_idna2008_a_label(
    settings: Settings, dns_server: LocalDNSServer
) -> None:
    """RFC 5890/5891 (IDNA 2008, which replaced RFC 3490) keep ß as a letter: faß.test is
    xn--fa-hia.test, a different domain from fass.test (DENIC, for one, registers both to
    different holders). The envelope must name the A-label, and the MX lookup ask for it."""
    with CapturingSMTPServer() as mx:
        dns_server.add_record("xn--fa-hia.test", "MX", "10 mx.xn--fa-hia.test.")
        dns_server.add_record("mx.xn--fa-hia.test", "A", "127.0.0.1")
        async with _mx_sender(settings, dns_server, mx.port) as sender:
            message_id = sender.queue(["bob@faß.test"])
            status = await delivery.deliver(sender.services, message_id, "w1")
            assert status == "delivered"
            [received] = mx.wait_for(1)
            assert received.rcpt_tos == ["bob@xn--fa-hia.test"]
            assert _parse(received.data)["To"] == "bob@xn--fa-hia.test"
