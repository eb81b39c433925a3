"""Kept-open SMTP sessions: reuse, and a dead or closing session never turns into a bounce.

A small SMTP server written here on asyncio streams (loopback only) lets each test see the
connections themselves and misbehave on cue: close an idle session, answer 421 to an old
session's MAIL, or drop the line after the message was sent.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from multimail.errors import TemporaryDeliveryError
from multimail.smtp import outbound
from multimail.smtp.outbound import RelayConfig, RelayTransport, SessionPool, SMTPTimeouts


def _message(n: int) -> bytes:
    return f"From: a@x.test\r\nTo: b@y.test\r\nSubject: m{n}\r\n\r\nbody {n}\r\n".encode()


@dataclass
class _Server:
    """Counts connections; replies ``250 queued as <subject>`` so each reply names its message."""

    port: int = 0
    connections: int = 0
    received: list[str] = field(default_factory=list)
    # Misbehaviours, each for the given number of times.
    close_after_data: int = 0
    refuse_mail_421_on_reused: int = 0
    refuse_mail_421: int = 0
    hang_up_at_mail_on_reused: int = 0
    hang_up_at_rset: int = 0
    rsets: int = 0
    envelope: list[bytes] = field(default_factory=list)
    hang_up_after_dot: int = 0
    stall_after_dot: int = 0
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        transactions = 0
        try:
            writer.write(b"220 pool.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"MAIL", b"RCPT"):
                    self.envelope.append(line.rstrip(b"\r\n"))
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-pool.test\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    if transactions and self.hang_up_at_mail_on_reused:
                        self.hang_up_at_mail_on_reused -= 1
                        return
                    if self.refuse_mail_421:
                        self.refuse_mail_421 -= 1
                        writer.write(b"421 closing this session\r\n")
                        await writer.drain()
                        return
                    if transactions and self.refuse_mail_421_on_reused:
                        self.refuse_mail_421_on_reused -= 1
                        writer.write(b"421 closing this session\r\n")
                        await writer.drain()
                        return
                    writer.write(b"250 ok\r\n")
                elif verb == b"RCPT":
                    writer.write(b"250 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    data = await reader.readuntil(b"\r\n.\r\n")
                    subject = re.search(rb"Subject: (\S+)", data)
                    name = subject.group(1).decode() if subject else "?"
                    transactions += 1
                    if self.stall_after_dot:
                        # Never answer; wait for the client to give up and hang up.
                        self.stall_after_dot -= 1
                        self.received.append(name)
                        await reader.read()
                        return
                    if self.hang_up_after_dot:
                        self.hang_up_after_dot -= 1
                        self.received.append(name)
                        return
                    self.received.append(name)
                    writer.write(f"250 queued as {name}\r\n".encode())
                    if self.close_after_data:
                        self.close_after_data -= 1
                        await writer.drain()
                        return
                elif verb == b"RSET":
                    self.rsets += 1
                    if self.hang_up_at_rset:
                        self.hang_up_at_rset -= 1
                        return
                    writer.write(b"250 reset\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 not here\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[_Server]:
    running = _Server()
    await running.start()
    yield running
    await running.stop()


def _relay(server: _Server, pool: SessionPool | None = None) -> RelayTransport:
    transport = RelayTransport(RelayConfig(host="127.0.0.1", port=server.port))
    if pool is not None:
        transport.pool = pool
    return transport


async def test_messages_in_a_row_share_one_session_and_each_gets_its_own_reply(
    server: _Server,
) -> None:
    relay = _relay(server)
    for n in range(5):
        [attempt] = await relay.deliver("a@x.test", ["b@y.test"], _message(n))
        assert attempt.code == 250 and attempt.reply == f"queued as m{n}"
    await relay.close()
    assert server.connections == 1
    assert server.received == [f"m{n}" for n in range(5)]


async def test_concurrent_messages_each_get_their_own_reply(server: _Server) -> None:
    relay = _relay(server)
    gate = asyncio.Semaphore(4)

    async def one(n: int) -> str:
        async with gate:
            [attempt] = await relay.deliver("a@x.test", ["b@y.test"], _message(n))
            return attempt.reply

    replies = await asyncio.gather(*(one(n) for n in range(40)))
    await relay.close()
    assert replies == [f"queued as m{n}" for n in range(40)]
    assert sorted(server.received) == sorted(f"m{n}" for n in range(40))
    assert server.connections <= 4


async def test_a_session_is_retired_after_max_messages(server: _Server) -> None:
    relay = _relay(server, SessionPool(max_messages=2))
    for n in range(5):
        await relay.deliver("a@x.test", ["b@y.test"], _message(n))
    await relay.close()
    assert server.connections == 3


async def test_an_idle_session_is_dropped_after_idle_seconds(server: _Server) -> None:
    relay = _relay(server, SessionPool(idle_seconds=0.05))
    await relay.deliver("a@x.test", ["b@y.test"], _message(0))
    await asyncio.sleep(0.1)
    await relay.deliver("a@x.test", ["b@y.test"], _message(1))
    await relay.close()
    assert server.connections == 2


async def test_a_session_the_server_closed_is_replaced_not_bounced(server: _Server) -> None:
    """The server hangs up after each message; the next message reconnects and goes."""
    server.close_after_data = 3
    relay = _relay(server)
    for n in range(4):
        [attempt] = await relay.deliver("a@x.test", ["b@y.test"], _message(n))
        assert attempt.code == 250 and attempt.reply == f"queued as m{n}"
        await asyncio.sleep(0.02)  # let the close reach us (or not): both must work
    await relay.close()
    assert server.received == ["m0", "m1", "m2", "m3"]
    assert server.connections == 4


async def test_a_dead_session_found_at_mail_reconnects_once(server: _Server) -> None:
    """The old session dies as the next message starts (no reply to MAIL): the message goes
    on a fresh session instead of being deferred."""
    server.hang_up_at_mail_on_reused = 1
    relay = _relay(server)
    await relay.deliver("a@x.test", ["b@y.test"], _message(0))
    [attempt] = await relay.deliver("a@x.test", ["b@y.test"], _message(1))
    await relay.close()
    assert attempt.code == 250 and attempt.reply == "queued as m1"
    assert server.received == ["m0", "m1"] and server.connections == 2


async def test_a_second_dead_session_is_a_deferral_not_a_loop(server: _Server) -> None:
    """One retry only: when the fresh session fails too, the message is deferred."""
    server.hang_up_at_mail_on_reused = 1
    relay = _relay(server)
    await relay.deliver("a@x.test", ["b@y.test"], _message(0))
    server.refuse_mail_421 = 1
    with pytest.raises(TemporaryDeliveryError):
        await relay.deliver("a@x.test", ["b@y.test"], _message(1))
    await relay.close()
    assert server.received == ["m0"] and server.connections == 2


async def test_an_idle_session_is_probed_with_rset_and_replaced_if_dead(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbound, "_PROBE_AFTER_S", 0.0)
    relay = _relay(server)
    await relay.deliver("a@x.test", ["b@y.test"], _message(0))
    await relay.deliver("a@x.test", ["b@y.test"], _message(1))
    assert server.rsets == 1 and server.connections == 1
    server.hang_up_at_rset = 1
    [attempt] = await relay.deliver("a@x.test", ["b@y.test"], _message(2))
    await relay.close()
    assert attempt.reply == "queued as m2"
    assert server.received == ["m0", "m1", "m2"] and server.connections == 2


async def test_421_to_an_old_sessions_mail_reconnects(server: _Server) -> None:
    server.refuse_mail_421_on_reused = 1
    relay = _relay(server)
    await relay.deliver("a@x.test", ["b@y.test"], _message(0))
    [attempt] = await relay.deliver("a@x.test", ["b@y.test"], _message(1))
    await relay.close()
    assert attempt.code == 250 and attempt.reply == "queued as m1"
    assert server.connections == 2


async def test_421_on_a_fresh_session_is_a_deferral(server: _Server) -> None:
    """Only a reused session gets a second chance; a fresh one's 421 is the server's word."""
    server.refuse_mail_421 = 1
    relay = _relay(server)
    with pytest.raises(TemporaryDeliveryError) as caught:
        await relay.deliver("a@x.test", ["b@y.test"], _message(0))
    assert caught.value.smtp_code == 421
    assert server.connections == 1 and server.received == []
    [attempt] = await relay.deliver("a@x.test", ["b@y.test"], _message(1))
    await relay.close()
    assert attempt.code == 250 and server.connections == 2


async def test_a_line_lost_after_the_data_is_not_retried(server: _Server) -> None:
    """After the whole message went out, a lost reply may hide an accepted message: no retry
    on a fresh session (that could duplicate it); the attempt says the reply was lost."""
    relay = _relay(server)
    await relay.deliver("a@x.test", ["b@y.test"], _message(0))
    server.hang_up_after_dot = 1
    with pytest.raises(TemporaryDeliveryError) as caught:
        await relay.deliver("a@x.test", ["b@y.test"], _message(1))
    [attempt] = caught.value.context["attempts"]
    assert attempt.reply_lost
    await relay.close()
    assert server.received == ["m0", "m1"]
    assert server.connections == 1


async def test_a_reply_that_never_comes_after_the_data_times_out_and_drops_the_session(
    server: _Server,
) -> None:
    """The reply to the final dot has its own time limit (RFC 5321 §4.5.3.2.6): a server
    silent after the message is cut off there, the reply counts as lost (it may have the
    message), and that session never carries another message."""
    relay = RelayTransport(
        RelayConfig(host="127.0.0.1", port=server.port), timeouts=SMTPTimeouts(data_end=0.3)
    )
    await relay.deliver("a@x.test", ["b@y.test"], _message(0))
    server.stall_after_dot = 1
    with pytest.raises(TemporaryDeliveryError) as caught:
        await asyncio.wait_for(relay.deliver("a@x.test", ["b@y.test"], _message(1)), 5)
    [attempt] = caught.value.context["attempts"]
    assert attempt.reply_lost and "timed out" in attempt.reply
    [attempt] = await relay.deliver("a@x.test", ["b@y.test"], _message(2))
    await relay.close()
    assert attempt.reply == "queued as m2"
    assert server.received == ["m0", "m1", "m2"] and server.connections == 2


async def test_sessions_belong_to_their_event_loop(server: _Server) -> None:
    """``deliver_now`` runs its own loop: a session opened there never serves another."""
    relay = _relay(server)
    await relay.deliver("a@x.test", ["b@y.test"], _message(0))

    def other_loop() -> None:
        async def go() -> None:
            await relay.deliver("a@x.test", ["b@y.test"], _message(1))
            await relay.close()

        asyncio.run(go())

    await asyncio.to_thread(other_loop)
    await relay.deliver("a@x.test", ["b@y.test"], _message(2))
    await relay.close()
    assert server.received == ["m0", "m1", "m2"]
    assert server.connections == 2


async def test_envelope_commands_on_the_wire(server: _Server) -> None:
    """Plain addresses are written as given; the null sender is ``<>``; anything else goes
    through aiosmtplib's own quoting (here it drops an RFC 5322 comment)."""
    relay = _relay(server)
    await relay.deliver("a+tag@x.test", ["B.c-d@y.test", "e_f@y.test"], _message(0))
    await relay.deliver("", ["b@y.test"], _message(1))
    await relay.deliver("a@x.test", ["a(c)@y.test", "o'neil@y.test"], _message(2))
    await relay.close()
    assert server.envelope == [
        b"MAIL FROM:<a+tag@x.test>",
        b"RCPT TO:<B.c-d@y.test>",
        b"RCPT TO:<e_f@y.test>",
        b"MAIL FROM:<>",
        b"RCPT TO:<b@y.test>",
        b"MAIL FROM:<a@x.test>",
        b"RCPT TO:<a@y.test>",
        b"RCPT TO:<o'neil@y.test>",
    ]
