"""Job kinds owned by the services, registered with the runner in one place.

Delivery, operator mail and the delivery sweep register themselves in ``workers.delivery``;
this module adds the kinds whose logic lives in a service, plus their timers.
"""

from __future__ import annotations

from multimail.services import domains, oversight, sending
from multimail.services.context import Services
from multimail.store.jobs import Job
from multimail.workers import delivery, runner

__all__ = ["RECHECK_DOMAINS", "RELEASE_SCHEDULED", "SWEEP_PENDING", "install"]

RELEASE_SCHEDULED = "release_scheduled"
SWEEP_PENDING = "sweep_pending"
RECHECK_DOMAINS = "recheck_domains"


def _release(services: Services, job: Job, worker_id: str) -> None:
    message_id = job.payload.get("message_id")
    if isinstance(message_id, str):
        sending.release_scheduled(services, message_id)


def _sweep(services: Services, job: Job, worker_id: str) -> None:
    oversight.sweep_pending(services)


def _recheck(services: Services, job: Job, worker_id: str) -> None:
    domains.recheck_verified(services)


def install(services: Services) -> None:
    """Register every service-owned kind and its timer (idempotent)."""
    assert delivery.DELIVER in runner.HANDLERS
    runner.register(RELEASE_SCHEDULED)(_release)
    runner.register(SWEEP_PENDING)(_sweep)
    runner.every(SWEEP_PENDING, services.settings.approval_sweep_seconds)
    runner.register(RECHECK_DOMAINS)(_recheck)
    runner.every(RECHECK_DOMAINS, services.settings.domain_recheck_seconds)
