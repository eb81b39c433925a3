"""Settings → database → services: what every process of an installation builds first.

Apart from :mod:`multimail.runtime` (which also runs the servers) so that a process that
serves nothing, such as a compose child of the delivery worker, builds the same services
without importing the transports.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from multimail.config import Settings
from multimail.services import identity
from multimail.services.context import Services
from multimail.store import keystore, migrate
from multimail.store.db import Database
from multimail.workers import signing

__all__ = ["build_services"]


def _shared_secret(db: Database, data_dir: Path) -> bytes:
    """The approval-link secret, shared by every node through the database. An install from
    before it moved there keeps the one in its data dir, so links already mailed still work."""

    def make() -> str:
        legacy = data_dir / "secret.key"
        return legacy.read_text().strip() if legacy.exists() else secrets.token_hex(32)

    return keystore.create_once(db, "link-secret", make).encode()


def build_services(settings: Settings, *, run_migrations: bool = True) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.effective_database_url)
    if run_migrations:
        migrate.upgrade(db)
    services = Services(db=db, settings=settings)
    secret = settings.secret_key.get_secret_value().encode() if settings.secret_key else None
    services.extras["secret_key"] = secret or _shared_secret(db, settings.data_dir)
    # The identity and default DKIM keys too, now: created by whichever request first needed
    # them, they would be a write on a request's behalf that no account owns.
    identity.keyring(services)
    signing.ensure_default_key(services)
    return services
