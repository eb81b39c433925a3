"""Fixtures: a real database (SQLite or PostgreSQL, chosen by MULTIMAIL_TEST_DB), real servers.

The suite runs twice in CI: ``MULTIMAIL_TEST_DB=sqlite`` and ``MULTIMAIL_TEST_DB=postgres``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts
from multimail.services.context import Services
from multimail.store import migrate
from multimail.store.db import Database
from multimail.store.tables import metadata
from multimail.testing.server import LiveServer

BACKEND = os.environ.get("MULTIMAIL_TEST_DB", "sqlite")
PG_ADMIN_URL = os.environ.get(
    "MULTIMAIL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def pytest_report_header() -> str:
    return f"multimail database backend: {BACKEND}"


_template_keys: dict[str, list[dict[str, str]]] = {}


def _seed_server_keys(url: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The keys every node shares (link secret, identity, default DKIM) are made when services
    start; made once in the template, tests do not each pay for an RSA key."""
    data_dir = tmp_path_factory.mktemp("template-data")
    svc = build_services(Settings(data_dir=data_dir, database_url=url), run_migrations=False)
    with svc.db.read() as conn:
        rows = conn.execute(text("SELECT key, value FROM server_settings")).mappings()
        _template_keys[url] = [dict(r) for r in rows]
    svc.db.dispose()


@pytest.fixture(scope="session")
def _db_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database made once per session; each test gets a clean copy of it."""
    if BACKEND == "postgres":
        name = f"mm_test_{uuid.uuid4().hex[:10]}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
        db = Database(url)
        migrate.upgrade(db)
        db.dispose()
        _seed_server_keys(url, tmp_path_factory)
        yield url
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    elif BACKEND == "sqlite":
        path = tmp_path_factory.mktemp("template") / "template.db"
        db = Database(f"sqlite:///{path}")
        migrate.upgrade(db)
        db.dispose()
        _seed_server_keys(f"sqlite:///{path}", tmp_path_factory)
        yield str(path)
    else:
        raise pytest.UsageError(f"MULTIMAIL_TEST_DB must be sqlite or postgres, not {BACKEND!r}")


_cleaners: dict[str, Engine] = {}


def _pg_cleaner(url: str) -> Engine:
    if url not in _cleaners:
        _cleaners[url] = create_engine(url, poolclass=NullPool)
    return _cleaners[url]


@pytest.fixture
def db_url(_db_template: str, tmp_path: Path) -> str:
    if BACKEND == "postgres":
        # DELETE is much cheaper than TRUNCATE for near-empty tables; the replica role skips
        # the FK and append-only triggers for this clean-up only.
        with _pg_cleaner(_db_template).begin() as conn:
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            for table in reversed(metadata.sorted_tables):
                conn.execute(text(f'DELETE FROM "{table.name}"'))
            # Back to the template's server keys (a test may have rotated them).
            conn.execute(
                text("INSERT INTO server_settings (key, value) VALUES (:key, :value)"),
                _template_keys[_db_template],
            )
        return _db_template
    target = tmp_path / "multimail.db"
    shutil.copyfile(_db_template, target)
    return f"sqlite:///{target}"


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        domain="mm.test",
        rate_limit_per_minute=6000,
        rate_limit_burst=1000,
    )


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    svc = build_services(settings, run_migrations=False)  # the template is migrated
    yield svc
    svc.db.dispose()


@pytest.fixture
def boot(services: Services) -> accounts.Bootstrap:
    """The first account with its admin, agent and reviewer keys."""
    return accounts.bootstrap(services.db, account_name="Acme", operator_email="ops@mm.test")


@pytest.fixture
def minted_admin_key(services: Services, boot: accounts.Bootstrap) -> str:
    """An admin key minted through the API (not the operator's own): it needs approval codes."""
    from multimail.services import keys
    from multimail.services.context import Actor

    admin = keys.authenticate(services.db, boot.admin_key)
    assert isinstance(admin, Actor) and admin.operator_credential
    with services.db.write() as conn:
        created = keys.create_key(
            conn,
            actor=admin,
            account_id=boot.account["id"],
            name="integration",
            scopes=["admin", "read"],
        )
    return created.raw_key


@pytest.fixture
def live(services: Services) -> Iterator[LiveServer]:
    with LiveServer(services) as server:
        yield server


class Api:
    """httpx clients for a live server, one per key."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._clients: list[httpx.Client] = []

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.base_url, headers=headers, timeout=30)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()


@pytest.fixture
def api(live: LiveServer) -> Iterator[Api]:
    helper = Api(live.base_url)
    yield helper
    helper.close()
