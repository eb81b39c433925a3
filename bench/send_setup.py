"""What the send profilers share: a server with one mailbox, and the body each send carries.

Imported by ``profile_send.py`` and ``send_instructions.py`` (run as scripts from this
directory, so it is on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import SecretStr

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts, mailboxes
from multimail.services.context import Actor, Services


def send_body(n: int) -> dict[str, Any]:
    return {
        "to": f"customer{n % 50}@example.com",
        "subject": f"Order update {n}",
        "markdown": "Hello,\n\nyour order **has shipped**. Thanks for waiting.\n\n- Acme",
        "metadata": {"n": n},
    }


def send_world(data_dir: Path, mode: str) -> tuple[Services, accounts.Bootstrap, str]:
    """Services on a fresh SQLite database, the first account, and a mailbox in ``mode``.

    Rate limits are out of the way and the relay points at the discard port: only the send
    path is measured, never delivery."""
    settings = Settings(
        data_dir=data_dir,
        domain="bench.test",
        rate_limit_per_minute=10_000_000,
        rate_limit_burst=10_000_000,
        smtp_url=SecretStr("smtp://127.0.0.1:9"),
    )
    services = build_services(settings)
    boot = accounts.bootstrap(services.db, account_name="Bench", operator_email="o@bench.test")
    operator = Actor(type="system", id=None, name="bench", account_id=boot.account["id"])
    with services.db.write() as conn:
        box = mailboxes.create_mailbox(
            conn,
            actor=operator,
            settings=settings,
            address="box@bench.test",
            oversight_mode=mode,
        )["id"]
    return services, boot, str(box)
