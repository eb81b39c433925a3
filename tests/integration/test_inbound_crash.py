"""Durability of inbound mail: kill -9 after 250, a full disk, corrupt jobs, re-runs.

DUR-1 runs the SMTP server in a subprocess against a SQLite file and kills it at random
moments while clients send; every message that got a 250 must be stored whole after restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text

from multimail.config import Settings
from multimail.ids import utcnow
from multimail.runtime import build_services
from multimail.services import accounts, inbound, mailboxes
from multimail.services.context import Actor, Services
from multimail.smtp.inbound import InboundEnvelope
from multimail.store import jobs as queue
from multimail.store.tables import inbound_raw, jobs, messages
from multimail.testing.processes import free_port
from multimail.testing.server import LiveServer
from multimail.workers.inbound import handle_job, run_smtp
from tests.conftest import BACKEND

SERVER_SCRIPT = """
import asyncio, sys
from multimail.config import Settings
from multimail.runtime import build_services
from multimail.workers.inbound import run_smtp

settings = Settings(data_dir=sys.argv[1], database_url=sys.argv[2], domain="mm.test",
                    smtp_port=int(sys.argv[3]))
services = build_services(settings, run_migrations=False)
print("ready", flush=True)
asyncio.run(run_smtp(services, asyncio.Event()))
"""


def _mailbox(svc: Services, account_id: str, address: str) -> dict[str, Any]:
    actor = Actor(type="system", id=None, name="test", account_id=account_id)
    with svc.db.write() as conn:
        return mailboxes.create_mailbox(
            conn, actor=actor, settings=svc.settings, address=address, oversight_mode="autonomous"
        )


def _body(n: int) -> bytes:
    # A marker at both ends: a half-stored message would lack the closing one.
    filler = ("line %d of message %d\r\n" * 40) % tuple(x for i in range(40) for x in (i, n))
    return (
        f"From: a@sender.test\r\nTo: bot@mm.test\r\nSubject: m{n}\r\n\r\n"
        f"BEGIN-{n}\r\n{filler}END-{n}\r\n"
    ).encode()


def _sender(port: int, start: int, acked: list[int], stop: threading.Event) -> None:
    n = start
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
                while not stop.is_set():
                    client.sendmail("a@sender.test", ["bot@mm.test"], _body(n))
                    acked.append(n)  # only after the 250
                    n += 2
        except (OSError, smtplib.SMTPException):
            n += 2  # this one may or may not be stored; never counted as acknowledged
            time.sleep(0.01)


@pytest.mark.skipif(BACKEND != "sqlite", reason="DUR-1 kills a process holding a SQLite file")
def test_kill_9_after_250_loses_no_acknowledged_message(
    settings: Settings, services: Services, boot: accounts.Bootstrap, tmp_path: Path
) -> None:
    """DUR-1: over random kill points (12 in the suite; ``MULTIMAIL_DUR1_ROUNDS=200`` for the
    full RELIABILITY run), every 250'd message is stored whole afterwards."""
    _mailbox(services, boot.account["id"], "bot@mm.test")
    services.db.dispose()
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT)
    acked: list[int] = []
    rng = random.Random(4242)
    for _round in range(int(os.environ.get("MULTIMAIL_DUR1_ROUNDS", "12"))):
        proc = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(tmp_path / "data"),
                settings.effective_database_url,
                str(port),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                assert time.monotonic() < deadline, "the SMTP subprocess did not listen"
                time.sleep(0.02)
            stop = threading.Event()
            senders = [
                threading.Thread(target=_sender, args=(port, 10_000 * _round + k, acked, stop))
                for k in range(2)
            ]
            for thread in senders:
                thread.start()
            time.sleep(rng.uniform(0.05, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.set()
            for thread in senders:
                thread.join(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(acked) > 50, "too few messages were sent to mean anything"
    with services.db.read() as conn:
        stored = [bytes(r.data) for r in conn.execute(select(inbound_raw.c.data))]
        job_count = conn.execute(select(jobs.c.id).where(jobs.c.kind == inbound.JOB_KIND)).all()
    subjects: dict[int, bytes] = {}
    for data in stored:
        header, _, body = data.partition(b"\r\n\r\n")
        number = int(header.split(b"Subject: m", 1)[1].split(b"\r\n", 1)[0])
        assert body == _body(number).partition(b"\r\n\r\n")[2], "a stored message is not whole"
        subjects[number] = data
    assert set(acked) <= set(subjects)
    assert len(job_count) == len(stored)  # each stored message has its processing job


@pytest.mark.skipif(BACKEND != "sqlite", reason="simulates a full disk with SQLite max_page_count")
def test_full_disk_answers_452_and_never_250(settings: Settings, boot: accounts.Bootstrap) -> None:
    """DUR-4: when the database cannot grow, DATA gets a 4xx and nothing is half-stored."""
    svc = build_services(settings.model_copy(update={"smtp_port": 0}))
    _mailbox(svc, boot.account["id"], "bot@mm.test")
    with svc.db.read() as conn:
        pages = conn.execute(text("PRAGMA page_count")).scalar_one()

    @event.listens_for(svc.db.engine, "connect")
    def _cap(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    svc.db.engine.dispose()
    with LiveServer(svc, components=[run_smtp]):
        deadline = time.monotonic() + 10
        while "smtp_port" not in svc.extras and time.monotonic() < deadline:
            time.sleep(0.01)
        big = (
            b"From: a@x.test\r\nTo: bot@mm.test\r\nSubject: big\r\n\r\n"
            + (b"x" * 998 + b"\r\n") * 200
        )
        port = int(svc.extras["smtp_port"])  # type: ignore[call-overload]
        with (
            smtplib.SMTP("127.0.0.1", port) as client,
            pytest.raises(smtplib.SMTPDataError) as refused,
        ):
            client.sendmail("a@x.test", ["bot@mm.test"], big)
    assert refused.value.smtp_code == 452
    with svc.db.read() as conn:
        assert conn.execute(select(inbound_raw.c.id)).all() == []
    svc.db.dispose()


def _store(svc: Services, raw: bytes, rcpt: str = "bot@mm.test") -> str:
    envelope = InboundEnvelope(
        mail_from="a@sender.test",
        rcpt_tos=(rcpt,),
        data=raw,
        peer="127.0.0.1",
        helo="client.test",
        received_at=utcnow(),
        tls=False,
    )
    (inbound_id,) = inbound.store_envelopes(svc, [envelope])
    return inbound_id


def test_processing_twice_creates_one_message(services: Services, boot: accounts.Bootstrap) -> None:
    """A re-run (crash after commit, or a second worker) creates nothing twice."""
    _mailbox(services, boot.account["id"], "bot@mm.test")
    inbound_id = _store(services, _body(1))
    first = inbound.process_inbound(services, inbound_id)
    assert len(first) == 1
    assert inbound.process_inbound(services, inbound_id) == []
    with services.db.read() as conn:
        assert len(conn.execute(select(messages.c.id)).all()) == 1
        status = conn.execute(
            select(inbound_raw.c.status).where(inbound_raw.c.id == inbound_id)
        ).scalar_one()
    assert status == "processed"


def test_unparseable_input_is_marked_failed_and_its_bytes_kept(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """Bytes with no header are not a message: recorded as failed, never lost or half-made."""
    _mailbox(services, boot.account["id"], "bot@mm.test")
    inbound_id = _store(services, b"\r\n\r\njust a body with no header\r\n")
    assert inbound.process_inbound(services, inbound_id) == []
    with services.db.read() as conn:
        row = (
            conn.execute(select(inbound_raw).where(inbound_raw.c.id == inbound_id)).mappings().one()
        )
        assert conn.execute(select(messages.c.id)).all() == []
    assert row["status"] == "failed" and row["error"]
    assert b"just a body" in bytes(row["data"])


def test_corrupt_jobs_are_quarantined_and_the_server_still_serves(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """DUR-4: a job without a usable payload is set aside; good jobs around it still run."""
    _mailbox(services, boot.account["id"], "bot@mm.test")
    _store(services, _body(7))
    with services.db.write() as conn:
        for payload in ({"inbound_id": 12}, {"inbound_id": "inb_missing"}, {}):
            queue.enqueue(conn, inbound.JOB_KIND, payload, max_attempts=5)
    claimed = queue.claim(services.db, "w1", kinds=[inbound.JOB_KIND], limit=10)
    assert len(claimed) == 4
    for job in claimed:
        handle_job(services, job, "w1")
    with services.db.read() as conn:
        states = sorted(r.status for r in conn.execute(select(jobs.c.status)))
        made = conn.execute(select(messages.c.subject)).scalars().all()
    assert states == ["done", "failed", "failed", "failed"]
    assert made == ["m7"]


async def test_the_smtp_runner_stops_when_asked(settings: Settings) -> None:
    """run_smtp binds the configured port, serves, and returns once stop is set."""
    svc = build_services(settings.model_copy(update={"smtp_port": 0}))
    stop = asyncio.Event()
    task = asyncio.create_task(run_smtp(svc, stop))
    for _ in range(200):
        if "smtp_port" in svc.extras:
            break
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.extras["smtp_port"])  # type: ignore[arg-type]
    assert (await reader.readline()).startswith(b"220 ")
    writer.close()
    stop.set()
    await asyncio.wait_for(task, 10)
    svc.db.dispose()


def test_nul_bytes_from_a_sender_do_not_stall_processing(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """A NUL in the subject or body is stored as U+FFFD on every database, never an error."""
    _mailbox(services, boot.account["id"], "bot@mm.test")
    raw = b"From: a@x.test\r\nTo: bot@mm.test\r\nSubject: a\x00b\r\n\r\nbody\x00end\r\n"
    (created,) = inbound.process_inbound(services, _store(services, raw))
    with services.db.read() as conn:
        row = conn.execute(select(messages).where(messages.c.id == created)).mappings().one()
    assert "\x00" not in row["subject"] and "body\ufffdend" in row["text"]
