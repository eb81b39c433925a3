"""What the send profilers share: a server with one mailbox, and the body each send carries.

Imported by ``profile_send.py`` and ``send_instructions.py`` (run as scripts from this
directory, so it is on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _stack import make_desk, make_services
from pydantic import SecretStr

from multimail.services import accounts
from multimail.services.context import Services


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
    services = make_services(data_dir, None, smtp_url=SecretStr("smtp://127.0.0.1:9"))
    desk = make_desk(services, [mode], address="box@{domain}")
    return services, desk.boot, str(desk.boxes[mode]["id"])
