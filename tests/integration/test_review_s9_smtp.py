"""Review S9: the inbound SMTP server (``multimail.smtp.inbound``) against the running server.

The first tests each pinned one defect a reviewer found (session 9) as a strict xfail; they
pass since the fixes. The hardening tests after them (refused-recipient limit, 421 at
shutdown, the Return-Path and duplicate checks' edges) came with those fixes.

The tests run the production wiring: ``run_smtp`` (``InboundSMTPServer`` over the real
``DatabaseSink``) in a LiveServer, with STARTTLS from ``smtp_tls_cert`` where TLS matters, or
the whole inbound stack of ``test_inbound_pipeline`` (SMTP server, processing worker and a
LocalDNSServer) where the stored message matters. Clients are raw sockets on 127.0.0.1. Where
a limit must be small, the engine runs alone over ``test_smtp_inbound``'s HostedSink.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from datetime import timedelta
from email.parser import BytesHeaderParser
from pathlib import Path

import dkim
import pytest
from sqlalchemy import func, select

from multimail.config import Settings
from multimail.ids import utcnow
from multimail.services.inbound import process_inbound, store_envelopes
from multimail.smtp.inbound import InboundEnvelope
from multimail.store.tables import audit_entries, inbound_raw, messages
from multimail.workers.inbound import run_smtp
from tests.integration.inbound_support import running
from tests.integration.test_inbound_pipeline import KEY, Stack, stack
from tests.integration.test_smtp_inbound import HostedSink, RawClient, client_tls, tls_files
from tests.integration.test_smtp_inbound import running as running_engine

__all__ = ["client_tls", "stack", "tls_files"]  # fixtures, re-exported so pytest finds them

SENDER = "alice@sender.test"
BOT = "bot@mm.test"


@pytest.fixture
def tls_smtp_port(settings: Settings, tls_files: tuple[Path, Path]) -> Iterator[int]:
    """The inbound SMTP server as ``serve`` runs it, with a certificate for STARTTLS."""
    cert, key = tls_files
    with running(settings, [run_smtp], smtp_tls_cert=cert, smtp_tls_key=key) as (_, _, port):
        yield port


async def starttls(port: int, context: ssl.SSLContext) -> tuple[RawClient, str]:
    """A client that has said EHLO, STARTTLS and EHLO again; and the server's second EHLO."""
    client = await RawClient.connect(port)
    assert (await client.reply()).startswith("220 ")
    assert "STARTTLS" in await client.command("EHLO client.sender.test")
    assert (await client.command("STARTTLS")).startswith("220 ")
    await client.writer.start_tls(context, server_hostname="localhost")
    ehlo = await client.command("EHLO client.sender.test")
    assert ehlo.startswith("250-")
    return client, ehlo


async def close(client: RawClient) -> None:
    with suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
        await asyncio.wait_for(client.close(), 5)


def wire(message: bytes) -> bytes:
    """``message`` dot-stuffed and terminated as a raw client sends it after DATA."""
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def raw_rows_settled(stack: Stack, count: int, timeout: float = 20.0) -> None:
    """Wait until ``count`` messages are stored and none of them waits to be processed."""
    deadline = time.monotonic() + timeout
    while True:
        with stack.services.db.read() as conn:
            statuses = [r.status for r in conn.execute(select(inbound_raw.c.status))]
        if len(statuses) >= count and "stored" not in statuses:
            return
        assert time.monotonic() < deadline, f"inbound_raw still {statuses}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- AUTH / STARTTLS


async def test_auth_is_not_advertised_when_no_authentication_is_configured(
    tls_smtp_port: int, client_tls: ssl.SSLContext
) -> None:
    """An MX without SMTP AUTH must not offer it (RFC 4954 §3), encrypted or not."""
    client, ehlo = await starttls(tls_smtp_port, client_tls)
    try:
        attempt = await client.command("AUTH PLAIN AGFsaWNlAHNlY3JldA==")
    finally:
        await close(client)
    assert not any(line[4:].upper().startswith("AUTH") for line in ehlo.splitlines()), ehlo
    # Not "535 credentials invalid" for a mechanism that cannot succeed: not offered at all.
    assert attempt[:3] in {"502", "503", "504"}, attempt


async def test_starttls_inside_tls_is_refused_and_the_session_goes_on(
    tls_smtp_port: int, client_tls: ssl.SSLContext
) -> None:
    """RFC 3207 §4.2: TLS is already active, so STARTTLS is refused with a 5xx (Postfix:
    554 5.5.1 Error: TLS already active) and the encrypted session stays usable."""
    client, ehlo = await starttls(tls_smtp_port, client_tls)
    assert "STARTTLS" not in ehlo  # already right: not offered again
    try:
        again = await client.command("STARTTLS")
        noop = await client.command("NOOP") if again.startswith("5") else ""
    finally:
        await close(client)
    assert again[:1] == "5", again
    assert noop.startswith("250")


# --------------------------------------------------------------------------- connections


async def test_one_peer_cannot_take_every_connection_slot(tls_smtp_port: int) -> None:
    """RELIABILITY SMTP-6 (slow clients cut off while others are served): one address that
    opens the default 100 sessions and sits in them (each renewable for 300 s by a NOOP)
    must not lock out a sender from another address (Postfix's anvil caps one client at
    half the process limit by default: smtpd_client_connection_count_limit)."""
    hogs: list[RawClient] = []
    try:
        for _ in range(100):  # InboundLimits().max_connections, as run_smtp uses it
            hog = await RawClient.connect(tls_smtp_port)
            hogs.append(hog)
            await hog.reply()  # a greeting, or a refusal once a per-client cap exists
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", tls_smtp_port, local_addr=("127.0.0.2", 0)
        )
        try:
            greeting = await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()
    finally:
        for hog in hogs:
            await close(hog)
    assert greeting.startswith(b"220 "), greeting


# --------------------------------------------------------------------------- addresses


async def test_quoted_form_of_a_hosted_local_part_is_the_same_mailbox(stack: Stack) -> None:
    """RFC 5321 §4.1.2: "all quoted forms MUST be treated as equivalent" when comparing a
    local part to a mailbox name, so "bot"@mm.test is bot@mm.test and its mail arrives."""
    client = await RawClient.connect(stack.smtp_port)
    try:
        assert (await client.reply()).startswith("220 ")
        assert (await client.command("EHLO client.sender.test")).startswith("250")
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
        rcpt = await client.command('RCPT TO:<"bot"@mm.test>')
        if rcpt.startswith("250"):
            assert (await client.command("DATA")).startswith("354")
            body = f"From: {SENDER}\r\nTo: {BOT}\r\nSubject: quoted\r\n\r\nHello.\r\n"
            assert (await client.command(wire(body.encode()))).startswith("250 ")
    finally:
        await close(client)
    assert rcpt.startswith("250 "), rcpt
    (row,) = stack.inbound()
    assert row["mailbox_id"] == stack.mailbox["id"]


# --------------------------------------------------------------------------- final delivery


def test_final_delivery_records_the_envelope_sender_as_return_path(stack: Stack) -> None:
    """RFC 5321 §4.4: the server making final delivery inserts "Return-Path: <reverse-path>"
    at the top of the message ("required; mail systems MUST support it"), above anything the
    sender wrote; a sender's own Return-Path must not pass for the envelope's."""
    raw = (
        "Return-Path: <ceo@mm.test>\r\n"
        f"From: Alice <{SENDER}>\r\nTo: {BOT}\r\nSubject: Where do bounces go\r\n"
        "Message-ID: <return-path@sender.test>\r\n\r\nHello.\r\n"
    ).encode()
    stack.smtp_in(SENDER, BOT, raw)
    (row,) = stack.inbound()
    paths = BytesHeaderParser().parsebytes(bytes(row["raw"])).get_all("Return-Path") or []
    assert paths[:1] == [f"<{SENDER}>"], paths


async def test_retry_after_a_lost_250_is_not_delivered_twice(stack: Stack) -> None:
    """RFC 5321 §6.1 makes the client resend when the 250 after DATA never reaches it; SPEC
    §2 relies on receivers dropping such a retry by its Message-ID and §12 allows no
    duplicate. The agent must see one message (and one message.received), not two."""
    raw = (
        f"From: Alice <{SENDER}>\r\nTo: {BOT}\r\nSubject: Pay invoice 42\r\n"
        "Message-ID: <lost-250@sender.test>\r\n\r\nPlease pay invoice 42 once.\r\n"
    ).encode()
    client = await RawClient.connect(stack.smtp_port)
    try:
        assert (await client.reply()).startswith("220 ")
        assert (await client.command("EHLO client.sender.test")).startswith("250")
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
        assert (await client.command(f"RCPT TO:<{BOT}>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        await client.send(wire(raw))
        raw_rows_settled(stack, 1)  # committed, and the 250 is on its way ...
    finally:
        client.writer.transport.abort()  # ... but the connection dies before it is read
    stack.smtp_in(SENDER, BOT, raw)  # the sender's queue retries, as it must
    raw_rows_settled(stack, 2)
    with stack.services.db.read() as conn:
        delivered = conn.execute(
            select(func.count())
            .select_from(messages)
            .where(
                messages.c.mailbox_id == stack.mailbox["id"],
                messages.c.message_id_header == "<lost-250@sender.test>",
            )
        ).scalar_one()
    assert delivered == 1


# --------------------------------------------------------------------------- configuration


async def test_idn_server_domain_is_greeted_in_its_ascii_form(settings: Settings) -> None:
    """RFC 5321 §2.3.5 and RFC 5890: a domain on the wire is its A-label. An operator whose
    mail domain is bücher.test gets a server that greets as xn--bcher-kva.test (the form
    ``idna_ascii`` gives every hosted address), not one that silently never answers."""
    with running(settings, [run_smtp], domain="bücher.test") as (_, _, port):
        client = await RawClient.connect(port)
        try:
            greeting = await client.reply()
        except TimeoutError:
            greeting = "(no greeting within 5 s)"
        finally:
            await close(client)
    assert greeting.startswith("220 xn--bcher-kva.test "), greeting


# --------------------------------------------------------------------------- hardening


def copies(stack: Stack, message_id: str) -> int:
    with stack.services.db.read() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(messages)
                .where(
                    messages.c.mailbox_id == stack.mailbox["id"],
                    messages.c.message_id_header == message_id,
                )
            ).scalar_one()
        )


async def test_a_peers_slot_is_given_back_when_its_session_ends() -> None:
    """The per-peer count follows sessions that end, or a busy sender would be locked out
    for good after its first max_connections // 2 sessions."""
    async with running_engine(HostedSink(), max_connections=4) as server:
        first, second = await RawClient.connect(server.port), await RawClient.connect(server.port)
        for client in (first, second):
            assert (await client.reply()).startswith("220 ")
        third = await RawClient.connect(server.port)
        assert (await third.rest()).startswith(b"421 4.7.0 ")
        await third.close()
        assert server.active_sessions == 2
        assert (await first.command("QUIT")).startswith("221")
        await first.close()
        for _ in range(100):
            if server.active_sessions < 2:
                break
            await asyncio.sleep(0.01)
        fourth = await RawClient.connect(server.port)
        try:
            assert (await fourth.reply()).startswith("220 ")
        finally:
            await fourth.close()
            await second.close()


async def test_address_harvesting_is_cut_off_after_twenty_refused_recipients(
    tls_smtp_port: int,
) -> None:
    """Like Postfix's smtpd_hard_error_limit: a session walking guessed names gets 20
    refusals, then 421 4.7.0 instead of the 21st, and is hung up on."""
    client = await RawClient.connect(tls_smtp_port)
    try:
        assert (await client.reply()).startswith("220 ")
        assert (await client.command("EHLO client.sender.test")).startswith("250")
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
        refused = [await client.command(f"RCPT TO:<guess{n}@mm.test>") for n in range(20)]
        cut_off = await client.command("RCPT TO:<guess20@mm.test>")
        rest = await client.rest()
    finally:
        await close(client)
    assert all(reply.startswith("550 5.1.1") for reply in refused), refused
    assert cut_off.startswith("421 4.7.0 mm.test "), cut_off
    assert rest == b""


async def test_stopping_server_says_421_before_it_hangs_up(settings: Settings) -> None:
    """RFC 5321 §3.8: a server shutting down answers 421 rather than vanishing mid-session."""
    with running(settings, [run_smtp]) as (_, _, port):
        client = await RawClient.connect(port)
        assert (await client.reply()).startswith("220 ")
        assert (await client.command("EHLO client.sender.test")).startswith("250")
    try:
        rest = await client.rest()
    finally:
        await close(client)
    assert rest.startswith(b"421 4.3.2 mm.test "), rest


@pytest.mark.parametrize(
    ("local", "accepted"),
    [(r'"\b\o\t"', True), ('"Bot"', True), ('"b o t"', False), ('"bot."', False)],
)
async def test_only_quoted_local_parts_a_dot_atom_can_write_are_unquoted(
    stack: Stack, local: str, accepted: bool
) -> None:
    """Quoted pairs are unescaped before comparing; content no dot-atom can write (a space, a
    trailing dot) names no mailbox of ours and stays refused."""
    client = await RawClient.connect(stack.smtp_port)
    try:
        assert (await client.reply()).startswith("220 ")
        assert (await client.command("EHLO client.sender.test")).startswith("250")
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).startswith("250")
        rcpt = await client.command(f"RCPT TO:<{local}@mm.test>")
    finally:
        await close(client)
    assert rcpt.startswith("250 " if accepted else "550 5.1.1"), rcpt


def test_a_signature_over_the_senders_return_path_still_verifies(stack: Stack) -> None:
    """RFC 6376 §5.4.1 advises against signing Return-Path, but a signer may; DKIM is checked
    over the bytes as received, with the sender's Return-Path below ours, and only then is it
    dropped from the stored message."""
    body = (
        "Return-Path: <bounces@sender.test>\r\n"
        f"From: Alice <{SENDER}>\r\nTo: {BOT}\r\nSubject: Signed path\r\n"
        "Message-ID: <signed-path@sender.test>\r\n\r\nHello.\r\n"
    ).encode()
    signer = dkim.DKIM(body)
    signer.should_not_sign.discard(b"return-path")  # dkimpy would refuse, as RFC 6376 advises
    signature: bytes = signer.sign(
        b"sel",
        b"sender.test",
        KEY.private_pem,
        include_headers=[b"from", b"to", b"subject", b"return-path"],
    )
    stack.smtp_in("bounces@sender.test", BOT, signature + body)
    (row,) = stack.inbound()
    assert row["auth_results"]["dkim"]["result"] == "pass"
    stored = BytesHeaderParser().parsebytes(bytes(row["raw"]))
    assert stored.get_all("Return-Path") == ["<bounces@sender.test>"]


def test_a_bounce_is_recorded_with_the_null_return_path(stack: Stack) -> None:
    """MAIL FROM:<> (RFC 5321 §4.5.5) is final-delivered as "Return-Path: <>"."""
    raw = (
        f"From: MAILER-DAEMON@sender.test\r\nTo: {BOT}\r\nSubject: Delay\r\n"
        "Message-ID: <bounce-path@sender.test>\r\n\r\nStill trying.\r\n"
    ).encode()
    stack.smtp_in("<>", BOT, raw)
    (row,) = stack.inbound()
    stored = bytes(row["raw"])
    assert BytesHeaderParser().parsebytes(stored).get_all("Return-Path") == ["<>"]
    assert b"\r\nReturn-Path: <>\r\nReceived: from " in stored


def test_dropped_retry_is_audited_and_other_bytes_under_one_message_id_are_delivered(
    stack: Stack,
) -> None:
    """Only a true resend is dropped (audited as message.duplicate_dropped, not received
    again); a different message reusing the Message-ID, or the same bytes from another
    envelope sender, is mail the agent must see."""
    raw = (
        f"From: Alice <{SENDER}>\r\nTo: {BOT}\r\nSubject: Report\r\n"
        "Message-ID: <reused@sender.test>\r\n\r\nFirst text.\r\n"
    ).encode()
    stack.smtp_in(SENDER, BOT, raw)
    stack.smtp_in(SENDER, BOT, raw)
    stack.smtp_in(SENDER, BOT, raw.replace(b"First", b"Other"))
    stack.smtp_in("list-bounces@sender.test", BOT, raw)
    raw_rows_settled(stack, 4)
    assert copies(stack, "<reused@sender.test>") == 3
    with stack.services.db.read() as conn:
        dropped = conn.execute(
            select(audit_entries.c.subject_id, audit_entries.c.details).where(
                audit_entries.c.action == "message.duplicate_dropped"
            )
        ).all()
        received = conn.execute(
            select(func.count())
            .select_from(audit_entries)
            .where(audit_entries.c.action == "message.received")
        ).scalar_one()
        (kept,) = [
            bytes(raw)
            for raw in conn.execute(
                select(messages.c.raw).where(messages.c.id == dropped[0].subject_id)
            ).scalars()
        ]
    assert len(dropped) == 1 and json.loads(dropped[0].details)["mail_from"] == SENDER
    assert b"Return-Path: <alice@sender.test>" in kept and b"First text." in kept
    assert received == 3


def test_two_copies_processed_at_once_make_one_message(stack: Stack) -> None:
    """Two workers taking the two copies of a resent message at the same moment: one of
    them delivers it, the other finds it there."""
    raw = (
        f"From: Alice <{SENDER}>\r\nTo: {BOT}\r\nSubject: Race\r\n"
        "Message-ID: <race@sender.test>\r\n\r\nOnce.\r\n"
    ).encode()
    envelope = InboundEnvelope(
        mail_from=SENDER,
        rcpt_tos=(BOT,),
        data=b"Return-Path: <alice@sender.test>\r\n" + raw,
        peer="127.0.0.1",
        helo="client.sender.test",
        received_at=utcnow(),
        tls=False,
    )
    # Held back so the stack's own worker leaves both to the two threads below.
    ids = store_envelopes(
        stack.services, [envelope, envelope], jobs_run_at=utcnow() + timedelta(hours=1)
    )
    start = threading.Barrier(2)
    created: list[list[str]] = []

    def work(inbound_id: str) -> None:
        start.wait()
        created.append(process_inbound(stack.services, inbound_id))

    threads = [threading.Thread(target=work, args=(inbound_id,)) for inbound_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(len(made) for made in created) == [0, 1]
    assert copies(stack, "<race@sender.test>") == 1
