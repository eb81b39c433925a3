"""The webhook dispatcher: claims due deliveries, posts them signed, records every attempt.

A delivery is claimed with a lease (``locked_by``/``locked_until``; PostgreSQL
``FOR UPDATE SKIP LOCKED``, SQLite's single writer), so a dispatcher killed mid-request loses
nothing: the lease runs out and the delivery is claimed again, with the same ``webhook-id``.

Outcomes: 2xx delivered; 410 disables the subscription; anything else (timeouts, 3xx, 5xx,
refused targets) is retried on :data:`SCHEDULE` with ±20 % jitter until three days after the
delivery was queued, then ``failed``. An endpoint failing continuously for ``disable_after``
(5 days) is disabled and the operator is mailed.

Attempts are recorded by group commit: each POST's outcome joins a queue, and one recorder
writes every outcome waiting (attempt rows, status changes, audit) in one transaction, so the
disk's commit rate does not cap the delivery rate. Claims are batched the same way: the
dispatcher claims again once half its slots are free, not once per finished request.

Order per message: a delivery is not started while an earlier event of the same message for
the same subscription is still pending, so ``oversight.pending`` arrives before
``oversight.approved`` before ``message.delivered``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, exists, insert, or_, select, update

from multimail.domain.netguard import Resolver
from multimail.ids import aware, isoformat, utcnow
from multimail.services import audit, events, health
from multimail.services.context import Actor, Services
from multimail.services.webhooks import (
    AttemptResult,
    ClientPool,
    encode_body,
    post_signed,
    signing_secrets,
)
from multimail.store import jobs
from multimail.store.tables import (
    accounts,
    operator_users,
    webhook_attempts,
    webhook_deliveries,
    webhooks,
)
from multimail.store.tables import (
    events as events_table,
)
from multimail.webhook_signature import sign_payload

__all__ = [
    "DISABLE_AFTER",
    "MAX_AGE",
    "SCHEDULE",
    "Dispatcher",
    "retry_delay",
    "run_dispatcher",
    "wake",
]

log = logging.getLogger("multimail.webhooks")

# Seconds before retry N (1-based); the last step repeats until MAX_AGE is reached.
SCHEDULE = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800)
JITTER = 0.2
MAX_AGE = timedelta(days=3)
DISABLE_AFTER = timedelta(days=5)
DEFAULT_LEASE = timedelta(seconds=60)
POLL_INTERVAL_S = 0.25
# A nudge can arrive a moment before its transaction is visible; look again this soon.
RECHECK_S = 0.02
# How long the recorder waits for more outcomes while other posts are in flight.
GATHER_S = 0.002


def retry_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based), jitter included."""
    base = SCHEDULE[min(max(attempt, 1), len(SCHEDULE)) - 1]
    spread = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return base * spread


def wake() -> None:
    """Nudge every dispatcher in this process to look for due deliveries now (thread-safe)."""
    events.notify_listeners()


@dataclass(frozen=True, slots=True)
class Claimed:
    delivery_id: str
    webhook_id: str
    event_id: str
    event_name: str
    account_id: str
    payload: dict[str, Any]
    url: str
    secrets: list[str]
    attempt: int
    created_at: datetime


class Dispatcher:
    """One dispatcher; :func:`run_dispatcher` is the usual way to run it."""

    def __init__(
        self,
        services: Services,
        *,
        worker_id: str | None = None,
        concurrency: int = 16,
        lease: timedelta = DEFAULT_LEASE,
        poll_interval: float = POLL_INTERVAL_S,
        max_age: timedelta = MAX_AGE,
        disable_after: timedelta = DISABLE_AFTER,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.services = services
        self.worker_id = worker_id or f"webhooks@{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.concurrency = max(1, concurrency)
        self.lease = lease
        self.poll_interval = poll_interval
        self.max_age = max_age
        self.disable_after = disable_after
        self.resolver = resolver
        self.rng = rng or random.Random()
        # Bounded by the lease, so a hung endpoint never outlives our claim on its delivery.
        self.attempt_timeout = min(30.0, lease.total_seconds() / 2)
        self.pool = ClientPool(max_connections=self.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._outcomes: list[tuple[Claimed, AttemptResult]] = []
        self._outcome_ready = asyncio.Event()
        self._closing = False
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- waking -------------------------------------------------------------------------------

    def _nudge(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:
            return  # the loop is shutting down; the next start polls anyway

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        events.add_commit_listener(self._nudge)
        stopper = asyncio.create_task(self._stop_wakes(stop))
        recorder = asyncio.create_task(self._recorder())
        pulse = health.Heartbeat(self.services.db, "webhooks", self.worker_id)
        recheck = False
        try:
            while not stop.is_set():
                pulse.tick()
                free = self.concurrency - len(self._tasks)
                claimed: list[Claimed] = []
                # Claim in batches (one commit each), not one delivery per freed slot.
                if free > 0 and (not self._tasks or free * 2 >= self.concurrency):
                    try:
                        claimed = await asyncio.to_thread(self._claim, free)
                    except Exception:
                        log.exception("claiming webhook deliveries failed")
                for item in claimed:
                    task = asyncio.create_task(self._deliver(item))
                    self._tasks.add(task)
                    task.add_done_callback(self._finished)
                if claimed and len(claimed) == free:
                    # There may be more due: loop again as soon as a slot frees up.
                    recheck = False
                    await self._wait(None if self._tasks else 0)
                    continue
                woke = await self._wait(RECHECK_S if recheck else self.poll_interval)
                recheck = woke and not claimed
        finally:
            events.remove_commit_listener(self._nudge)
            stopper.cancel()
            if self._tasks:
                # In-flight posts get a moment; anything cut off is re-claimed after its lease.
                await asyncio.wait(self._tasks, timeout=5)
                for task in self._tasks:
                    task.cancel()
            # Record what was posted before leaving; unrecorded deliveries are re-sent with
            # the same webhook-id once their lease runs out.
            self._closing = True
            self._outcome_ready.set()
            await asyncio.wait({recorder}, timeout=10)
            recorder.cancel()
            await self.pool.aclose()
            await pulse.stop()

    async def _stop_wakes(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wakeup.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wakeup.set()

    async def _wait(self, limit_s: float | None) -> bool:
        """Wait for a nudge, a finished delivery or the timeout; True when nudged."""
        try:
            await asyncio.wait_for(self._wakeup.wait(), limit_s)
        except TimeoutError:
            return False
        self._wakeup.clear()
        return True

    # --- claiming -----------------------------------------------------------------------------

    def _claim(self, limit: int) -> list[Claimed]:
        d, e, w = webhook_deliveries, events_table, webhooks
        d2 = webhook_deliveries.alias("earlier")
        e2 = events_table.alias("earlier_event")
        earlier_pending = (
            select(d2.c.id)
            .join(e2, e2.c.id == d2.c.event_id)
            .where(
                d2.c.webhook_id == d.c.webhook_id,
                d2.c.status == "pending",
                e2.c.message_id == e.c.message_id,
                e2.c.seq < e.c.seq,
            )
        )
        now = utcnow()
        query = (
            select(
                d.c.id,
                d.c.webhook_id,
                d.c.event_id,
                d.c.event_name,
                d.c.attempts,
                d.c.created_at,
                e.c.payload,
                e.c.account_id,
                w.c.url,
                w.c.secret,
                w.c.previous_secret,
                w.c.previous_secret_expires_at,
            )
            .join(e, e.c.id == d.c.event_id)
            .join(w, w.c.id == d.c.webhook_id)
            .where(
                d.c.status == "pending",
                d.c.next_attempt_at <= now,
                or_(d.c.locked_until.is_(None), d.c.locked_until < now),
                w.c.enabled.is_(True),
                or_(e.c.message_id.is_(None), ~exists(earlier_pending)),
            )
            .order_by(e.c.seq, d.c.id)
            .limit(limit)
        )
        with self.services.db.write() as conn:
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=d)
            rows = conn.execute(query).mappings().all()
            out: list[Claimed] = []
            for row in rows:
                taken = conn.execute(
                    update(d)
                    .where(
                        d.c.id == row["id"],
                        d.c.status == "pending",
                        or_(d.c.locked_until.is_(None), d.c.locked_until < now),
                    )
                    .values(
                        locked_by=self.worker_id,
                        locked_until=now + self.lease,
                        attempts=d.c.attempts + 1,
                    )
                )
                if not taken.rowcount:
                    continue
                out.append(
                    Claimed(
                        delivery_id=row["id"],
                        webhook_id=row["webhook_id"],
                        event_id=row["event_id"],
                        event_name=row["event_name"],
                        account_id=row["account_id"],
                        payload=events.expanded_payload(row["payload"]),
                        url=row["url"],
                        secrets=signing_secrets(row, now),
                        attempt=row["attempts"] + 1,
                        created_at=aware(row["created_at"]),
                    )
                )
        return out

    # --- delivering ---------------------------------------------------------------------------

    async def _deliver(self, item: Claimed) -> None:
        settings = self.services.settings
        body = encode_body(events.renamed(item.payload, item.event_name))
        # Same webhook-id on every attempt (receivers de-duplicate on it), fresh timestamp
        # and signature each time (so the replay window stays meaningful).
        headers = sign_payload(
            body, secrets=item.secrets, msg_id=item.event_id, timestamp=int(time.time())
        )
        started = time.perf_counter()
        try:
            outcome = await asyncio.wait_for(
                post_signed(
                    item.url,
                    body,
                    headers,
                    allow_http=settings.allow_http_webhooks,
                    allow_private=settings.allow_private_webhooks,
                    pool=self.pool,
                    resolver=self.resolver,
                ),
                self.attempt_timeout,
            )
        except TimeoutError:
            outcome = AttemptResult(
                None,
                int((time.perf_counter() - started) * 1000),
                None,
                f"timeout: no answer within {self.attempt_timeout:.0f} s",
            )
        self._outcomes.append((item, outcome))
        self._outcome_ready.set()

    # --- recording (group commit) ---------------------------------------------------------------

    async def _recorder(self) -> None:
        while True:
            if not self._outcomes:
                if self._closing:
                    return
                await self._outcome_ready.wait()
                self._outcome_ready.clear()
                continue
            if self._tasks and not self._closing:
                # Posts answered together finish a few loop turns apart: a moment lets the
                # rest of such a burst join this commit instead of each taking its own fsync.
                await asyncio.sleep(GATHER_S)
            batch, self._outcomes = self._outcomes, []
            try:
                await asyncio.to_thread(self._record_all, batch)
            except Exception:
                log.exception("recording %d webhook deliveries failed", len(batch))
            # A recorded delivery may let a later event of the same message go.
            self._wakeup.set()

    def _record_all(self, batch: list[tuple[Claimed, AttemptResult]]) -> None:
        with self.services.db.write() as conn:
            for item, outcome in batch:
                try:
                    with conn.begin_nested():
                        self._record(conn, item, outcome)
                except Exception:  # one bad row must not lose the others' records
                    log.exception("recording webhook delivery %s failed", item.delivery_id)

    def _record(self, conn: Connection, item: Claimed, outcome: AttemptResult) -> None:
        now = utcnow()
        d = webhook_deliveries
        conn.execute(
            insert(webhook_attempts).values(
                delivery_id=item.delivery_id,
                at=now,
                status_code=outcome.status_code,
                latency_ms=outcome.latency_ms,
                response_excerpt=outcome.response_excerpt,
                error=outcome.error,
            )
        )
        mine = and_(
            d.c.id == item.delivery_id, d.c.locked_by == self.worker_id, d.c.status == "pending"
        )
        common = {
            "locked_by": None,
            "locked_until": None,
            "last_status_code": outcome.status_code,
            "last_error": outcome.error,
        }
        hook = conn.execute(select(webhooks).where(webhooks.c.id == item.webhook_id))
        hook_row = hook.mappings().first()
        if outcome.delivered:
            conn.execute(
                update(d).where(mine).values(**common, status="delivered", delivered_at=now)
            )
            if hook_row is not None and hook_row["failing_since"] is not None:
                conn.execute(
                    update(webhooks)
                    .where(webhooks.c.id == item.webhook_id)
                    .values(failing_since=None, updated_at=now)
                )
            return
        if outcome.status_code == 410:
            conn.execute(update(d).where(mine).values(**common, status="failed"))
            self._disable(conn, item, hook_row, "the endpoint answered 410 Gone", now)
            return
        retry_at = now + timedelta(seconds=retry_delay(item.attempt, self.rng))
        if retry_at > item.created_at + self.max_age:
            result = conn.execute(update(d).where(mine).values(**common, status="failed"))
            if result.rowcount:
                audit.append(
                    conn,
                    actor=self._system(item),
                    action="webhook.delivery_failed",
                    subject_type="webhook",
                    subject_id=item.webhook_id,
                    details={
                        "delivery_id": item.delivery_id,
                        "event_id": item.event_id,
                        "attempts": item.attempt,
                        "last_error": outcome.error,
                        "last_status_code": outcome.status_code,
                    },
                )
        else:
            conn.execute(
                update(d).where(mine).values(**common, status="pending", next_attempt_at=retry_at)
            )
        if hook_row is None:
            return
        failing_since = hook_row["failing_since"]
        if failing_since is None:
            conn.execute(
                update(webhooks)
                .where(webhooks.c.id == item.webhook_id)
                .values(failing_since=now, updated_at=now)
            )
        elif hook_row["enabled"] and aware(failing_since) <= now - self.disable_after:
            days = (now - aware(failing_since)).total_seconds() / 86400
            self._disable(
                conn,
                item,
                hook_row,
                f"the endpoint has failed every delivery for {days:.1f} days",
                now,
            )

    def _system(self, item: Claimed) -> Actor:
        return Actor(
            type="system", id=self.worker_id, name="webhook dispatcher", account_id=item.account_id
        )

    def _disable(self, conn: Any, item: Claimed, hook: Any, reason: str, now: datetime) -> None:
        if hook is None or not hook["enabled"]:
            return
        conn.execute(
            update(webhooks)
            .where(webhooks.c.id == item.webhook_id)
            .values(enabled=False, disabled_reason=reason, updated_at=now)
        )
        audit.append(
            conn,
            actor=self._system(item),
            action="webhook.disabled",
            subject_type="webhook",
            subject_id=item.webhook_id,
            mailbox_id=hook["mailbox_id"],
            details={"reason": reason, "url": hook["url"], "delivery_id": item.delivery_id},
        )
        to = conn.execute(
            select(accounts.c.oversight_email).where(accounts.c.id == item.account_id)
        ).scalar()
        if not to:
            to = conn.execute(
                select(operator_users.c.email)
                .where(operator_users.c.account_id == item.account_id)
                .order_by(operator_users.c.created_at)
            ).scalar()
        if not to:
            return
        since = isoformat(aware(hook["failing_since"])) if hook["failing_since"] else None
        jobs.enqueue(
            conn,
            "system_mail",
            {
                "to": [to],
                "account_id": item.account_id,
                "subject": f"MultiMail disabled a webhook: {hook['url']}"[:200],
                "markdown": (
                    f"The webhook **{hook['url']}** (`{item.webhook_id}`) was disabled: "
                    f"{reason}.\n\n"
                    + (f"It has been failing since {since}.\n\n" if since else "")
                    + "Events are kept: fix the endpoint, then enable it again with "
                    f"`POST /v1/webhooks/{item.webhook_id}/enable` (or from the dashboard); "
                    "pending deliveries resume and failed ones can be redelivered."
                ),
            },
            dedupe_key=f"webhook_disabled:{item.webhook_id}:{int(now.timestamp())}",
        )


async def run_dispatcher(
    services: Services,
    stop: asyncio.Event,
    *,
    worker_id: str | None = None,
    concurrency: int = 16,
    lease: timedelta = DEFAULT_LEASE,
    poll_interval: float = POLL_INTERVAL_S,
    max_age: timedelta = MAX_AGE,
    disable_after: timedelta = DISABLE_AFTER,
    resolver: Resolver | None = None,
) -> None:
    """Deliver webhooks until ``stop`` is set (the runtime and LiveServer component signature)."""
    dispatcher = Dispatcher(
        services,
        worker_id=worker_id,
        concurrency=concurrency,
        lease=lease,
        poll_interval=poll_interval,
        max_age=max_age,
        disable_after=disable_after,
        resolver=resolver,
    )
    await dispatcher.run(stop)
