"""A delivery worker process for the crash tests.

Run as ``python -m tests.integration.delivery_worker_proc``.

Settings come from the ``MULTIMAIL_*`` environment (the test's database, data dir and relay).
A short lease (``WORKER_LEASE_S``) lets a restarted worker take over a killed one's job fast.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta

from multimail.config import load_settings
from multimail.runtime import build_services
from multimail.workers.runner import run_workers


async def main() -> None:
    services = build_services(load_settings(), run_migrations=False)
    lease = timedelta(seconds=float(os.environ.get("WORKER_LEASE_S", "1")))
    sys.stderr.write("READY\n")
    sys.stderr.flush()
    await run_workers(services, asyncio.Event(), lease=lease, poll_interval=0.05)


if __name__ == "__main__":
    asyncio.run(main())
