"""The audit hash chain detects every kind of tampering and says where."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from multimail.domain.audit import GENESIS_HASH, ChainVerifier, entry_hash


def make_chain(n: int) -> list[dict[str, Any]]:
    chain = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        entry = {
            "seq": seq,
            "at": f"2026-01-01T00:00:{seq % 60:02d}.000Z",
            "account_id": "acct_1",
            "actor_type": "key",
            "actor_id": "key_1",
            "actor_name": "agent",
            "action": "message.created",
            "subject_type": "message",
            "subject_id": f"msg_{seq}",
            "mailbox_id": "mbx_1",
            "oversight_mode": "gated_send",
            "details": {"n": seq, "nested": {"b": 1, "a": [1, 2]}},
            "prev_hash": prev,
        }
        entry["hash"] = entry_hash(entry)
        prev = entry["hash"]
        chain.append(entry)
    return chain


def verify(entries: list[dict[str, Any]]) -> ChainVerifier:
    verifier = ChainVerifier(expected_seq=1)
    for entry in entries:
        if not verifier.feed(entry):
            break
    return verifier


def test_an_untouched_chain_verifies() -> None:
    """A fresh chain is intact."""
    result = verify(make_chain(50))
    assert result.ok and result.checked == 50


@given(st.integers(1, 30), st.sampled_from(["action", "actor_name", "details", "at"]))
def test_a_changed_field_is_located(position: int, field: str) -> None:
    """Changing any field of entry N breaks exactly at N."""
    chain = make_chain(30)
    entry = chain[position - 1]
    entry[field] = {"tampered": True} if field == "details" else str(entry[field]) + "x"
    result = verify(chain)
    assert not result.ok
    assert result.first_break is not None
    assert result.first_break.seq == position
    assert result.first_break.kind == "changed"


@given(st.integers(1, 29))
def test_a_deleted_entry_is_located(position: int) -> None:
    """Removing entry N reports N missing."""
    chain = make_chain(30)
    del chain[position - 1]
    result = verify(chain)
    assert result.first_break is not None and result.first_break.seq == position
    assert result.first_break.kind == "missing"


@given(st.integers(1, 29))
def test_swapped_entries_are_located(position: int) -> None:
    """Reordering two neighbours breaks at the first of them."""
    chain = make_chain(30)
    chain[position - 1], chain[position] = chain[position], chain[position - 1]
    result = verify(chain)
    assert result.first_break is not None and result.first_break.seq == position


def test_a_rewritten_suffix_with_recomputed_hashes_breaks_the_link() -> None:
    """Recomputing one entry's hash after editing it still breaks the next link."""
    chain = make_chain(10)
    chain[4]["action"] = "message.deleted"
    chain[4]["hash"] = entry_hash(chain[4])
    result = verify(chain)
    assert result.first_break is not None and result.first_break.seq == 6
    assert result.first_break.kind == "bad_link"


def test_key_order_in_details_does_not_matter() -> None:
    """The canonical form sorts keys: a database that reorders JSON keys changes nothing."""
    chain = make_chain(3)
    chain[1]["details"] = {"nested": {"a": [1, 2], "b": 1}, "n": 2}
    assert verify(chain).ok
