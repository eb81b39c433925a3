"""The audit chain: canonical encoding and hashing of entries (pure).

``hash = SHA-256(prev_hash || canonical(entry))``. The canonical form is JSON with sorted keys,
no insignificant whitespace, UTF-8, and timestamps as ISO strings, so any implementation in
any language can recompute it. The first entry's ``prev_hash`` is 64 zeros.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS_HASH = "0" * 64

# The fields that are hashed, in the record every entry has. ``hash`` itself is excluded.
HASHED_FIELDS = (
    "seq",
    "at",
    "account_id",
    "actor_type",
    "actor_id",
    "actor_name",
    "action",
    "subject_type",
    "subject_id",
    "mailbox_id",
    "oversight_mode",
    "details",
    "prev_hash",
)


def canonical_bytes(entry: Mapping[str, Any]) -> bytes:
    record = {name: entry.get(name) for name in HASHED_FIELDS}
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    prev = str(entry.get("prev_hash") or GENESIS_HASH)
    return hashlib.sha256(prev.encode("ascii") + canonical_bytes(entry)).hexdigest()


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    kind: str  # changed | missing | reordered | inserted | bad_link
    explanation: str


@dataclass
class ChainVerifier:
    """Checks entries fed in ``seq`` order one at a time: a million-row log in flat memory."""

    expected_prev: str = GENESIS_HASH
    expected_seq: int | None = None
    checked: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    first_break: ChainBreak | None = None

    def feed(self, entry: Mapping[str, Any]) -> bool:
        """Check one entry; returns False (and records the first break) when the chain breaks."""
        if self.first_break is not None:
            return False
        seq = int(entry["seq"])
        if self.expected_seq is not None and seq != self.expected_seq:
            kind = "missing" if seq > self.expected_seq else "reordered"
            self.first_break = ChainBreak(
                self.expected_seq,
                kind,
                f"expected entry {self.expected_seq} next but found {seq}: "
                + ("entries are missing" if kind == "missing" else "entries are out of order"),
            )
            return False
        if entry.get("prev_hash") != self.expected_prev:
            self.first_break = ChainBreak(
                seq,
                "bad_link",
                f"entry {seq} does not link to the entry before it (prev_hash differs): an entry "
                "before it was changed, removed or inserted",
            )
            return False
        if entry_hash(entry) != entry.get("hash"):
            self.first_break = ChainBreak(
                seq, "changed", f"entry {seq} was changed after it was written (hash mismatch)"
            )
            return False
        self.expected_prev = str(entry["hash"])
        self.expected_seq = seq + 1
        self.last_seq = seq
        self.last_hash = str(entry["hash"])
        self.checked += 1
        return True

    @property
    def ok(self) -> bool:
        return self.first_break is None


def verify_chain(entries: Iterable[Mapping[str, Any]]) -> ChainVerifier:
    verifier = ChainVerifier()
    for entry in entries:
        if not verifier.feed(entry):
            break
    return verifier
