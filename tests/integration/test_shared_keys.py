"""Nodes that share a database share their keys (SPEC §11: any number of each role).

Two ``Services`` built on one database but with separate data directories stand for two
machines. Before the keys moved into the database each generated its own link secret and
identity keys: an approval link minted by a worker failed on an API node, and mail signed by
one worker did not verify against the keys another node published.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete

from multimail.config import Settings
from multimail.mail.dkim import generate_rsa_keypair
from multimail.mail.identity import SigningKeyring
from multimail.runtime import build_services
from multimail.services import identity
from multimail.services.context import Actor, Services
from multimail.store.tables import server_settings
from multimail.workers import signing


@pytest.fixture
def nodes(settings: Settings, tmp_path: Path) -> Iterator[list[Services]]:
    built = [
        build_services(
            settings.model_copy(update={"data_dir": tmp_path / f"node{n}"}), run_migrations=False
        )
        for n in range(2)
    ]
    yield built
    for node in built:
        node.db.dispose()


def test_every_node_uses_the_same_link_secret_and_identity_keys(nodes: list[Services]) -> None:
    first, second = nodes
    assert first.extras["secret_key"] == second.extras["secret_key"]
    assert len(first.extras["secret_key"]) == 64
    assert identity.keyring(first).jwks() == identity.keyring(second).jwks()
    assert signing.default_key(first).private_pem == signing.default_key(second).private_pem
    # Nothing secret is left behind in a data directory for a copy to go stale.
    for node in nodes:
        assert not (node.settings.data_dir / "secret.key").exists()
        assert not (node.settings.data_dir / "identity").exists()
        assert not (node.settings.data_dir / "dkim").exists()


def test_a_rotation_on_one_node_is_published_by_the_other(nodes: list[Services]) -> None:
    first, second = nodes
    before = identity.keyring(second).current.kid
    actor = Actor(type="operator", id=None, name="ops", account_id=None)
    rotated = identity.rotate_signing_key(first, actor=actor)
    assert rotated["previous_key_id"] == before
    ring = identity.keyring(second, reload=True)
    assert ring.current.kid == rotated["key_id"]
    assert {before, rotated["key_id"]} <= set(ring.verification_keys())


def test_nodes_starting_together_agree_on_one_keyring(settings: Settings, tmp_path: Path) -> None:
    built = [
        build_services(
            settings.model_copy(update={"data_dir": tmp_path / f"racer{n}"}),
            run_migrations=False,
        )
        for n in range(4)
    ]
    rings: list[str] = []
    barrier = threading.Barrier(len(built))

    def start(node: Services) -> None:
        barrier.wait()
        rings.append(identity.keyring(node).current.kid)

    threads = [threading.Thread(target=start, args=(node,)) for node in built]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for node in built:
        node.db.dispose()
    assert len(rings) == len(built) and len(set(rings)) == 1


def test_an_existing_install_keeps_the_keys_it_already_published(
    settings: Settings, tmp_path: Path
) -> None:
    """A data dir from before the move: its secret and keyring are imported, not replaced,
    so links already mailed and tokens in mail already delivered keep verifying."""
    data_dir = tmp_path / "old-node"
    (data_dir / "dkim").mkdir(parents=True)
    (data_dir / "secret.key").write_text("ab" * 32 + "\n")
    old_ring = SigningKeyring.load_or_create(data_dir / "identity")
    old_ring.rotate()
    old_dkim = generate_rsa_keypair(2048).private_pem
    (data_dir / "dkim" / "default.pem").write_bytes(old_dkim)
    # A database that has never held keys (the suite's template is seeded with some).
    fresh = build_services(settings, run_migrations=False)
    with fresh.db.write() as conn:
        conn.execute(delete(server_settings).where(server_settings.c.key.like("key:%")))
    fresh.db.dispose()
    node = build_services(settings.model_copy(update={"data_dir": data_dir}), run_migrations=False)
    try:
        assert node.extras["secret_key"] == ("ab" * 32).encode()
        ring = identity.keyring(node)
        assert ring.current.kid == old_ring.current.kid
        assert set(ring.verification_keys()) == set(old_ring.verification_keys())
        assert signing.default_key(node).private_pem == old_dkim
    finally:
        node.db.dispose()
