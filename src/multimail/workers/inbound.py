"""The inbound SMTP server and the worker that processes what it stored.

``run_smtp(services, stop)`` serves SMTP on ``settings.smtp_host:smtp_port`` until ``stop`` is
set (port 0 binds a free port, published as ``services.extras["smtp_port"]``).
``handle_job`` runs one ``process_inbound`` job; ``run_inbound_worker`` is a small loop of
them, woken by the sink's commits and polling slowly for work stored by other processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from datetime import timedelta

from multimail.errors import NotFound
from multimail.ids import utcnow
from multimail.services import health, inbound
from multimail.services.context import Services
from multimail.smtp.inbound import InboundLimits, InboundSMTPServer
from multimail.store import jobs

__all__ = ["handle_job", "run_inbound_worker", "run_smtp", "tls_context"]

log = logging.getLogger(__name__)

_IDLE_POLL_S = 1.0
_RETRY_AFTER = timedelta(seconds=30)


def tls_context(services: Services) -> ssl.SSLContext | None:
    """A server context from the configured certificate, or None when there is none."""
    cert = services.settings.smtp_tls_cert
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, services.settings.smtp_tls_key)
    return context


async def run_smtp(services: Services, stop: asyncio.Event) -> None:
    settings = services.settings
    limits = InboundLimits(
        max_message_size=settings.max_message_bytes,
        max_recipients=settings.max_recipients,
    )
    server = InboundSMTPServer(
        inbound.DatabaseSink(services),
        host=settings.smtp_host,
        port=settings.smtp_port,
        hostname=settings.domain,
        limits=limits,
        tls_context=tls_context(services),
    )
    async with server:
        services.extras["smtp_port"] = server.port
        await health.beat_until(services.db, "smtp", f"smtp-{os.getpid()}-{id(stop):x}", stop)


def handle_job(services: Services, job: jobs.Job, worker: str) -> None:
    """Run one job and record its outcome; a malformed job is quarantined, not retried."""
    inbound_id = job.payload.get("inbound_id")
    if not isinstance(inbound_id, str):
        with services.db.write() as conn:
            jobs.fail(conn, job.id, worker, error="quarantined: payload has no inbound_id")
        return
    try:
        inbound.process_inbound(services, inbound_id)
    except NotFound as exc:
        with services.db.write() as conn:
            jobs.fail(conn, job.id, worker, error=f"quarantined: {exc.message}")
        return
    except Exception as exc:
        log.exception("processing %s failed", inbound_id)
        with services.db.write() as conn:
            if job.attempts >= job.max_attempts:
                jobs.fail(conn, job.id, worker, error=repr(exc))
            else:
                jobs.retry(conn, job.id, worker, run_at=utcnow() + _RETRY_AFTER, error=repr(exc))
        return
    with services.db.write() as conn:
        jobs.complete(conn, job.id, worker)


def _work_once(services: Services, worker: str) -> int:
    claimed = jobs.claim(services.db, worker, kinds=[inbound.JOB_KIND], limit=20)
    for job in claimed:
        handle_job(services, job, worker)
    return len(claimed)


async def run_inbound_worker(services: Services, stop: asyncio.Event) -> None:
    """Process stored messages until ``stop`` is set."""
    worker = f"inbound-{os.getpid()}-{id(stop):x}"
    stored = inbound.signals(services).stored
    pulse = health.Heartbeat(services.db, "inbound", worker)
    while not stop.is_set():
        pulse.tick()
        with stored.listen() as wake:
            try:
                done = await asyncio.to_thread(_work_once, services, worker)
            except Exception:
                log.exception("inbound worker iteration failed")
                done = 0
            if done:
                continue
            stopping = asyncio.ensure_future(stop.wait())
            woken = asyncio.ensure_future(wake.wait())
            await asyncio.wait(
                {stopping, woken}, timeout=_IDLE_POLL_S, return_when=asyncio.FIRST_COMPLETED
            )
            stopping.cancel()
            woken.cancel()
    await pulse.stop()
