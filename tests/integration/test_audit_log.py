"""AUD-1: the audit log detects and locates every kind of tampering, on SQLite and PostgreSQL;
filters, export and verification over the live API; the proof CLI."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, delete, insert, select, text, update

from multimail.domain.audit import HASHED_FIELDS, entry_hash
from multimail.services import accounts, audit, checkpoints, identity
from multimail.services.context import Actor, Services
from multimail.store.tables import audit_checkpoints, audit_entries
from multimail.testing.server import LiveServer
from tests.conftest import Api

N = 12


def agent(boot: accounts.Bootstrap, name: str = "agent") -> Actor:
    return Actor(type="key", id=f"key_{name}", name=name, account_id=boot.account["id"])


def fill(services: Services, actor: Actor, n: int = N, **fields: Any) -> None:
    for i in range(n):
        with services.db.write() as conn:
            audit.append(
                conn,
                actor=actor,
                action=fields.get("action", "message.created"),
                subject_type="message",
                subject_id=fields.get("subject_id", f"msg_{i}"),
                mailbox_id=fields.get("mailbox_id"),
                details={"i": i, "note": "héllo"},
            )


def head(services: Services) -> int:
    with services.db.read() as conn:
        query = select(audit_entries.c.seq).order_by(audit_entries.c.seq.desc()).limit(1)
        return int(conn.execute(query).scalar_one())


@contextmanager
def tampering(services: Services) -> Iterator[Connection]:
    """A transaction with the append-only triggers out of the way, as an attacker with DB access."""
    with services.db.write() as conn:
        if services.db.dialect == "postgresql":
            conn.execute(
                text("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only")
            )
            yield conn
            conn.execute(text("ALTER TABLE audit_entries ENABLE TRIGGER audit_entries_append_only"))
        else:
            conn.execute(text("DROP TRIGGER IF EXISTS audit_entries_no_update"))
            conn.execute(text("DROP TRIGGER IF EXISTS audit_entries_no_delete"))
            yield conn


def row(conn: Connection, seq: int) -> dict[str, Any]:
    found = conn.execute(select(audit_entries).where(audit_entries.c.seq == seq)).mappings().one()
    return audit.row_to_entry(found)


def stored(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "details": json.dumps(entry["details"], sort_keys=True, separators=(",", ":"))}


def renumber(conn: Connection, start: int, delta: int) -> None:
    """Shift seq of every entry from ``start`` by ``delta`` one row at a time (PK-safe order)."""
    seqs = conn.execute(select(audit_entries.c.seq).where(audit_entries.c.seq >= start)).scalars()
    for seq in sorted(seqs, reverse=delta > 0):
        conn.execute(
            update(audit_entries).where(audit_entries.c.seq == seq).values(seq=seq + delta)
        )


def keys(services: Services) -> Any:
    return identity.keyring(services).verification_keys()


def located(services: Services, **kw: Any) -> tuple[int, str]:
    result = audit.verify(services.db, keys=keys(services), **kw)
    assert not result.ok
    assert result.first_break is not None, result.checkpoint_problems
    return result.first_break.seq, result.first_break.kind


@pytest.fixture
def chain(services: Services, boot: accounts.Bootstrap) -> int:
    fill(services, agent(boot))
    assert audit.verify(services.db).ok
    return head(services)


def flip(conn: Connection, seq: int) -> None:
    conn.execute(
        update(audit_entries).where(audit_entries.c.seq == seq).values(action="message.creatEd")
    )


def delete_one(conn: Connection, seq: int) -> None:
    conn.execute(delete(audit_entries).where(audit_entries.c.seq == seq))


def delete_and_renumber(conn: Connection, seq: int) -> None:
    delete_one(conn, seq)
    renumber(conn, seq + 1, -1)


def swap(conn: Connection, seq: int) -> None:
    conn.execute(update(audit_entries).where(audit_entries.c.seq == seq).values(seq=-1))
    conn.execute(update(audit_entries).where(audit_entries.c.seq == seq + 2).values(seq=seq))
    conn.execute(update(audit_entries).where(audit_entries.c.seq == -1).values(seq=seq + 2))


def insert_forged(conn: Connection, seq: int) -> None:
    before = row(conn, seq - 1)
    renumber(conn, seq, +1)
    forged = {**before, "seq": seq, "action": "message.approved", "prev_hash": before["hash"]}
    forged["hash"] = entry_hash(forged)
    conn.execute(insert(audit_entries).values(**stored(forged)))


def rehash_changed(conn: Connection, seq: int) -> None:
    entry = {**row(conn, seq), "actor_name": "someone else"}
    entry["hash"] = entry_hash(entry)
    conn.execute(update(audit_entries).where(audit_entries.c.seq == seq).values(**stored(entry)))


TAMPERINGS: dict[str, tuple[Callable[[Connection, int], None], str]] = {
    "flip a byte": (flip, "changed"),
    "change and recompute the hash": (rehash_changed, "changed"),
    "delete one": (delete_one, "deleted"),
    "delete one and renumber": (delete_and_renumber, "deleted"),
    "swap two": (swap, "reordered"),
    "insert a forged entry": (insert_forged, "inserted"),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
@pytest.mark.parametrize("where", ["first", "middle", "late"])
def test_each_tampering_is_detected_and_located(
    services: Services, chain: int, name: str, where: str
) -> None:
    """Flip, rehash, delete, delete-and-renumber, swap, insert: each named at its entry."""
    how, kind = TAMPERINGS[name]
    target = {"first": 2, "middle": chain // 2, "late": chain - 3}[where]
    with tampering(services) as conn:
        how(conn, target)
    assert located(services) == (target, kind)


def test_a_fork_is_detected(services: Services, chain: int) -> None:
    """A second entry branching off an earlier one (same prev_hash) is caught as a fork."""
    with tampering(services) as conn:
        parent = row(conn, 4)
        forged = {**row(conn, chain), "seq": chain + 1, "prev_hash": parent["hash"]}
        forged["hash"] = entry_hash(forged)
        conn.execute(insert(audit_entries).values(**stored(forged)))
    assert located(services) == (chain + 1, "forked")


def test_the_database_refuses_update_and_delete(services: Services, chain: int) -> None:
    """Append-only is enforced by triggers on both databases, not only by the application."""
    for statement in (
        update(audit_entries).where(audit_entries.c.seq == 2).values(action="x"),
        delete(audit_entries).where(audit_entries.c.seq == 2),
    ):
        with pytest.raises(Exception, match="append-only"), services.db.write() as conn:
            conn.execute(statement)
    assert audit.verify(services.db).ok


def test_truncation_is_caught_by_a_checkpoint_exported_earlier(
    services: Services, chain: int
) -> None:
    """Cutting off the newest entries (and the stored checkpoints) leaves a consistent chain;
    only the checkpoint kept elsewhere catches it, and says where the log now ends."""
    exported = checkpoints.make_checkpoint(services)
    assert exported is not None and exported["seq"] == chain
    assert checkpoints.verify_log(services).ok
    with tampering(services) as conn:
        conn.execute(delete(audit_entries).where(audit_entries.c.seq > chain - 3))
        conn.execute(delete(audit_checkpoints))
    assert checkpoints.verify_log(services).ok  # the chain alone cannot see it
    assert located(services, external_checkpoints=[exported]) == (chain - 2, "truncated")


def test_stored_checkpoints_catch_truncation_too(services: Services, chain: int) -> None:
    """A checkpoint left in the database is evidence as well."""
    checkpoints.make_checkpoint(services)
    with tampering(services) as conn:
        conn.execute(delete(audit_entries).where(audit_entries.c.seq == chain))
    assert located(services) == (chain, "truncated")


def test_rollback_to_an_old_backup_is_caught(
    services: Services, boot: accounts.Bootstrap, chain: int
) -> None:
    """Restoring an older log and writing new entries on top is caught at the checkpoint."""
    exported = checkpoints.make_checkpoint(services)
    assert exported is not None
    with tampering(services) as conn:
        conn.execute(delete(audit_entries).where(audit_entries.c.seq > chain - 4))
        conn.execute(delete(audit_checkpoints))
    fill(services, agent(boot, "new"), n=6)
    assert head(services) > chain and checkpoints.verify_log(services).ok
    assert located(services, external_checkpoints=[exported]) == (chain, "rolled_back")


def test_a_forged_or_foreign_checkpoint_is_not_trusted(services: Services, chain: int) -> None:
    """A checkpoint whose signature fails is reported and never used as evidence."""
    genuine = checkpoints.make_checkpoint(services)
    assert genuine is not None
    forged = {**genuine, "hash": "0" * 64}
    result = checkpoints.verify_log(services, external=[forged])
    assert not result.ok and result.first_break is None
    assert result.checkpoint_problems == [
        {"source": "external", "seq": chain, "problem": "signature does not verify"}
    ]
    unknown = {**genuine, "key_id": "mmk_0000000000000000"}
    problems = checkpoints.verify_log(services, external=[unknown]).checkpoint_problems
    assert "unknown key" in problems[0]["problem"]


def test_checkpoints_survive_key_rotation_and_skip_an_unchanged_head(
    services: Services, chain: int
) -> None:
    """Old checkpoints verify with a retired key; a tick with no new entry writes nothing."""
    first = checkpoints.make_checkpoint(services)
    assert first is not None
    assert checkpoints.make_checkpoint(services) is None
    identity.rotate_signing_key(services, actor=Actor("system", None, "test", None))
    second = checkpoints.make_checkpoint(services)  # the rotation itself was audited
    assert second is not None and second["key_id"] != first["key_id"]
    result = checkpoints.verify_log(services, external=[first])
    assert result.ok and result.checkpoints_checked == 3


# --- over the API ------------------------------------------------------------------------


def test_audit_log_filters_and_cursor(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """actor, action, mailbox (id or address), message and date range narrow the list."""
    admin = api.client(boot.admin_key)
    box = admin.post("/v1/mailboxes", json={"address": "filters@mm.test"}).json()
    fill(services, agent(boot, "alice"), n=5, mailbox_id=box["id"], action="message.sent")
    fill(services, agent(boot, "bob"), n=3, subject_id="msg_bob", action="message.cancelled")

    def entries(**params: Any) -> list[dict[str, Any]]:
        response = admin.get("/v1/audit-log", params={"limit": 1000, **params})
        assert response.status_code == 200, response.text
        return list(response.json()["entries"])

    assert {e["actor_id"] for e in entries(actor_id="key_alice")} == {"key_alice"}
    assert len(entries(action="message.cancelled")) == 3
    by_address = entries(mailbox="filters@mm.test")
    assert len(by_address) == 6  # the creation of the mailbox, then five sends
    assert by_address == entries(mailbox_id=box["id"])
    assert [e["seq"] for e in entries(message_id="msg_bob")] == sorted(
        (e["seq"] for e in entries(subject_id="msg_bob")), reverse=True
    )
    everything = entries()
    middle = everything[len(everything) // 2]["at"]
    newer, older = entries(date_after=middle), entries(date_before=middle)
    assert all(e["at"] >= middle for e in newer) and all(e["at"] < middle for e in older)
    assert len(newer) + len(older) == len(everything)
    seen, cursor = [], None
    while True:
        page = admin.get("/v1/audit-log", params={"limit": 4, "cursor": cursor}).json()
        seen += [e["seq"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [e["seq"] for e in everything]
    assert admin.get("/v1/audit-log", params={"mailbox": "nobody@mm.test"}).status_code == 404
    assert admin.get("/v1/audit-log", params={"date_after": "yesterday"}).status_code == 422


def test_export_streams_jsonl_and_csv_for_a_date_range(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """Export writes every entry of the range with its hashes; a full JSONL copy re-verifies."""
    fill(services, agent(boot))
    admin = api.client(boot.admin_key)
    full = admin.get("/v1/audit-log/export", params={"format": "jsonl"})
    assert full.status_code == 200 and full.headers["content-type"].startswith(
        "application/x-ndjson"
    )
    lines = [json.loads(line) for line in full.text.splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, len(lines) + 1))
    assert all(entry_hash(e) == e["hash"] for e in lines)
    cut = lines[len(lines) // 2]["at"]
    later = admin.get("/v1/audit-log/export", params={"format": "csv", "date_after": cut})
    assert later.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(later.text)))
    assert rows and all(r["at"] >= cut for r in rows)
    assert json.loads(rows[0]["details"]) == next(
        e["details"] for e in lines if e["seq"] == int(rows[0]["seq"])
    )
    assert api.client(boot.agent_key).get("/v1/audit-log/export").status_code == 403
    bad = admin.get("/v1/audit-log/export", params={"date_before": "31/12/2026"})
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"


def test_verify_over_the_api_names_the_break_and_uses_exported_checkpoints(
    api: Api, boot: accounts.Bootstrap, services: Services
) -> None:
    """GET verify reports the chain and checkpoints; POST verify holds it against a kept copy."""
    fill(services, agent(boot))
    admin = api.client(boot.admin_key)
    made = admin.post("/v1/audit-log/checkpoints")
    assert made.status_code == 201
    kept = made.json()["checkpoint"]
    assert admin.get("/v1/audit-log/checkpoints").json()["checkpoints"][0]["seq"] == kept["seq"]
    ok = admin.get("/v1/audit-log/verify").json()
    assert ok["intact"] is True and ok["checkpoints"]["checked"] == 1
    with tampering(services) as conn:
        conn.execute(delete(audit_entries).where(audit_entries.c.seq > kept["seq"] - 2))
        conn.execute(delete(audit_checkpoints))
    assert admin.get("/v1/audit-log/verify").json()["intact"] is True
    verdict = admin.post("/v1/audit-log/verify", json=kept).json()
    assert verdict["intact"] is False
    assert verdict["break"]["kind"] == "truncated"
    assert verdict["first_broken_seq"] == kept["seq"] - 1


# --- the CLI -----------------------------------------------------------------------------


def run_cli(services: Services, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MULTIMAIL_DATA_DIR": str(services.settings.data_dir),
        "MULTIMAIL_DATABASE_URL": services.settings.effective_database_url,
        "MULTIMAIL_DOMAIN": services.settings.domain,
    }
    program = "import sys; from multimail.cli_proof import audit_app; audit_app(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", program, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_verify_export_and_checkpoint(services: Services, chain: int, tmp_path: Path) -> None:
    """`audit checkpoint -o`, `audit export`, `audit verify --checkpoint FILE --json` end to end."""
    kept = tmp_path / "checkpoint.json"
    made = run_cli(services, "checkpoint", "--output", str(kept))
    assert made.returncode == 0, made.stderr
    assert json.loads(kept.read_text())["seq"] == chain
    out = tmp_path / "audit.csv"
    exported = run_cli(services, "export", "--format", "csv", "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    assert len(list(csv.DictReader(out.open()))) == chain
    good = run_cli(services, "verify", "--checkpoint", str(kept))
    assert good.returncode == 0 and "intact" in good.stdout
    with tampering(services) as conn:
        conn.execute(delete(audit_entries).where(audit_entries.c.seq == chain))
        conn.execute(delete(audit_checkpoints))
    bad = run_cli(services, "verify", "--checkpoint", str(kept), "--json")
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["break"] == {
        "seq": chain,
        "kind": "truncated",
        "explanation": json.loads(bad.stdout)["break"]["explanation"],
    }


# --- the fast canonical encoding used by verification --------------------------------------

_FIXED = ("seq", "details", "prev_hash")
_text = st.one_of(st.none(), st.text(max_size=30))
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.fixed_dictionaries({name: _text for name in HASHED_FIELDS if name not in _FIXED}),
    seq=st.integers(min_value=1, max_value=2**62),
    details=st.dictionaries(st.text(max_size=8), _json, max_size=5),
)
def test_verification_hashes_any_stored_row_like_the_canonical_encoder(
    fields: dict[str, Any], seq: int, details: dict[str, Any]
) -> None:
    """Whatever the text (quotes, controls, non-ASCII, nested details), the row-level hash used
    by verification equals the domain's canonical hash, so no honest entry is ever flagged."""
    entry = {**fields, "seq": seq, "details": details, "prev_hash": "a" * 64}
    expected = entry_hash(entry)
    stored_row = {**entry, "details": json.dumps(details, sort_keys=True, separators=(",", ":"))}
    values = (*tuple(stored_row[name] for name in audit._CANONICAL_ORDER), expected)
    assert audit._row_hash(values) == expected
    tampered = (*values[:-1], "b" * 64)
    assert audit._row_hash(tampered) == expected != tampered[-1]


def test_the_checkpoint_loop_signs_the_head_on_a_timer_and_at_shutdown(
    services: Services, chain: int
) -> None:
    """Run as a server component: a checkpoint appears within the interval, and the entries
    written just before shutdown are covered by a last checkpoint made while stopping."""
    loop = functools.partial(checkpoints.checkpoint_loop, interval=0.2)
    with LiveServer(services, components=[loop]):
        deadline = time.monotonic() + 10
        while (checkpoints.latest_checkpoint(services) or {}).get("seq") != chain:
            assert time.monotonic() < deadline, "no checkpoint within the interval"
            time.sleep(0.05)
        fill(services, Actor("system", "late", "late", None), n=2)
    final = checkpoints.latest_checkpoint(services)
    assert final is not None and final["seq"] == chain + 2
    assert checkpoints.verify_log(services).ok


def test_a_message_trail_lists_its_entries_in_order_for_its_account_only(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """trail_for_message: every entry about the message, oldest first; no other account's."""
    steps = ("message.created", "message.scanned", "oversight.approved", "message.delivered")
    for step in steps:
        fill(services, agent(boot), n=1, action=step, subject_id="msg_trail")
        fill(services, agent(boot), n=1, action="noise", subject_id="msg_other")
    with services.db.read() as conn:
        trail = audit.trail_for_message(conn, agent(boot), "msg_trail")
        stranger = Actor(type="key", id="key_x", name="x", account_id="acct_someone_else")
        hidden = audit.trail_for_message(conn, stranger, "msg_trail")
    assert [e["action"] for e in trail] == list(steps)
    assert [e["seq"] for e in trail] == sorted(e["seq"] for e in trail)
    assert all(e["hash"] and e["actor_name"] == "agent" for e in trail)
    assert hidden == []
