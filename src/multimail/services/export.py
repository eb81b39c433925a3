"""The account's data as one downloadable archive (``GET /v1/export``, SPEC §5.1).

The archive is a ZIP whose entries are stored uncompressed (so it streams with flat memory,
opens in any archive tool, and a ``grep`` over the download finds what it holds):

* ``messages.jsonl``: one message per line, the view the API answers for
  ``GET /v1/mailboxes/{id}/emails/{id}`` (``services.messages.views``). Attachments are
  listed by metadata (id, filename, content type, size, ``sha256``) inside each message; their
  bytes and the raw MIME are not in the archive (they would double its size), the per-message
  attachment route serves them and the ``sha256`` proves a copy.
* ``threads.jsonl``: one thread per line (public id, mailbox, subject, counts, times).
* ``audit.jsonl``: the audit entries the caller may read, in the very format of
  ``GET /v1/audit-log/export?format=jsonl`` (hashes included, so a copy can be re-verified).
* ``manifest.json`` (last): format and version, account, generated_at, who exported, the
  filters, and the number of records in each file.

Only the caller's account is read, every query filtered by ``account_id``; a key limited to
some mailboxes exports those mailboxes' messages and threads and the audit entries it may
read. No secret is ever read: the queries name the message, thread and audit tables only
(key hashes, webhook secrets, DKIM keys, approval codes and passwords live elsewhere).

Everything is read in keyset batches on ``id`` (``seq`` for the audit log), one short read
transaction per batch, and sent on in pieces of 64 KiB or more as it is written. When the
data files are complete, the export itself is audited (``account.exported`` with the counts)
before the manifest and the ZIP directory close the archive: an archive that ends properly
was recorded.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, cast

from sqlalchemy import ColumnElement, Connection, Select, select

from multimail.domain.scopes import Scope
from multimail.ids import isoformat, parse_datetime, utcnow
from multimail.services import audit, inbox, messages
from multimail.services.context import Actor, Services
from multimail.store.db import Database
from multimail.store.tables import messages as messages_table
from multimail.store.tables import threads as threads_table

FORMAT = "multimail-export"
FORMAT_VERSION = 1
MEDIA_TYPE = "application/zip"
MESSAGE_BATCH = 200
THREAD_BATCH = 1000
AUDIT_BATCH = 5000
PIECE_BYTES = 64 * 1024  # bytes gathered before a piece of the archive is sent


@dataclass(frozen=True)
class ExportPlan:
    """What one export covers, checked before the first byte goes out."""

    actor: Actor
    account_id: str
    audit_filter: audit.EntryFilter
    date_after: datetime | None = None
    date_before: datetime | None = None
    generated_at: datetime = field(default_factory=utcnow)

    @property
    def filename(self) -> str:
        return f"multimail-export-{self.account_id}-{self.generated_at:%Y-%m-%d}.zip"


def plan_export(
    actor: Actor, *, date_after: str | None = None, date_before: str | None = None
) -> ExportPlan:
    """The caller's export; Forbidden without ``admin``, InvalidInput for a bad date.

    ``date_after`` (inclusive) and ``date_before`` (exclusive) are parsed as the audit export
    parses them and narrow all three files: messages by ``created_at``, threads to those
    active in the range, audit entries by ``at``.
    """
    actor.require(Scope.ADMIN)
    if actor.account_id is None:
        raise ValueError("an export needs an account")
    where = audit.export_filter(
        account_id=actor.account_id, date_after=date_after, date_before=date_before, actor=actor
    )
    return ExportPlan(
        actor=actor,
        account_id=actor.account_id,
        audit_filter=where,
        date_after=_as_datetime(where.date_after),
        date_before=_as_datetime(where.date_before),
    )


def _as_datetime(value: str | None) -> datetime | None:
    return None if value is None else parse_datetime(value)


# --- the records --------------------------------------------------------------------------


def _message_conditions(plan: ExportPlan) -> list[ColumnElement[bool]]:
    c = messages_table.c
    wanted: list[ColumnElement[bool]] = [c.account_id == plan.account_id]
    if plan.actor.mailbox_ids is not None:
        wanted.append(c.mailbox_id.in_(sorted(plan.actor.mailbox_ids)))
    wanted.append(inbox.visible(plan.actor))  # what the API hides from this key, hidden
    if plan.date_after is not None:
        wanted.append(c.created_at >= plan.date_after)
    if plan.date_before is not None:
        wanted.append(c.created_at < plan.date_before)
    return wanted


def _thread_conditions(plan: ExportPlan) -> list[ColumnElement[bool]]:
    c = threads_table.c
    wanted: list[ColumnElement[bool]] = [c.account_id == plan.account_id]
    if plan.actor.mailbox_ids is not None:
        wanted.append(c.mailbox_id.in_(sorted(plan.actor.mailbox_ids)))
    if plan.date_after is not None:
        wanted.append(c.last_activity_at >= plan.date_after)
    if plan.date_before is not None:
        wanted.append(c.created_at < plan.date_before)
    return wanted


def _keyset(
    db: Database,
    query: Select[Any],
    key: Any,
    batch: int,
    render: Callable[[Connection, list[Mapping[str, Any]]], str],
) -> Iterator[str]:
    """``query``'s rows in ``key`` order, ``render``-ed a batch at a time.

    One short read transaction per batch, closed before the batch is handed on: a slow
    download never holds a transaction (or SQLite's WAL) open.
    """
    last: Any = None
    while True:
        with db.read() as conn:
            page = query if last is None else query.where(key > last)
            rows: list[Mapping[str, Any]] = [
                dict(r) for r in conn.execute(page.order_by(key).limit(batch)).mappings()
            ]
            text = render(conn, rows) if rows else ""
        if not rows:
            return
        yield text
        last = rows[-1][key.name]


def _render_messages(conn: Connection, rows: list[Mapping[str, Any]]) -> str:
    return "".join(_json_line(item) for item in messages.views(conn, rows))


def message_lines(db: Database, plan: ExportPlan, *, batch: int = MESSAGE_BATCH) -> Iterator[str]:
    query = select(messages_table).where(*_message_conditions(plan))
    return _keyset(db, query, messages_table.c.id, batch, _render_messages)


def thread_view(row: Mapping[str, Any]) -> dict[str, Any]:
    public = str(row["external_id"] or row["id"])
    return {
        "id": public,
        "thread_id": public,
        "mailbox_id": row["mailbox_id"],
        "subject": row["subject"],
        "message_count": row["message_count"],
        "created_at": isoformat(row["created_at"]),
        "last_activity_at": isoformat(row["last_activity_at"]),
    }


def thread_lines(db: Database, plan: ExportPlan, *, batch: int = THREAD_BATCH) -> Iterator[str]:
    query = select(threads_table).where(*_thread_conditions(plan))
    return _keyset(db, query, threads_table.c.id, batch, _render_threads)


def _render_threads(conn: Connection, rows: list[Mapping[str, Any]]) -> str:
    return "".join(_json_line(thread_view(row)) for row in rows)


def audit_lines(db: Database, plan: ExportPlan, *, batch: int = AUDIT_BATCH) -> Iterator[str]:
    """The audit export's own JSONL (one definition: ``services.audit``)."""
    return audit.export_lines(audit.iter_entries(db, plan.audit_filter, batch=batch), "jsonl")


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True, default=str) + "\n"


# --- the archive ----------------------------------------------------------------------------


class _Sink:
    """A write-only file for ``ZipFile``: it keeps what was written until ``drain``.

    It has no ``tell`` or ``seek``, so ``zipfile`` writes each entry's sizes after its data
    (a data descriptor) instead of going back to the header: nothing is held but the batch.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        return None

    def drain(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        self.size = 0
        return out


def _info(name: str, at: datetime) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=at.timetuple()[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _entry(
    archive: zipfile.ZipFile, sink: _Sink, name: str, at: datetime, chunks: Iterable[str]
) -> Iterator[tuple[bytes, int]]:
    """Write one entry; yields ``(bytes ready to send, records written so far)``."""
    records = 0
    handle: IO[bytes]
    with archive.open(_info(name, at), mode="w", force_zip64=True) as handle:
        for chunk in chunks:
            handle.write(chunk.encode("utf-8"))
            records += chunk.count("\n")
            # The audit log comes a line at a time: send in pieces of a useful size.
            if sink.size >= PIECE_BYTES:
                yield sink.drain(), records
    yield sink.drain(), records


def stream_archive(services: Services, plan: ExportPlan) -> Iterator[bytes]:
    """The archive's bytes, batch by batch (see the module docstring for its contents)."""
    db = services.db
    at = plan.generated_at
    sink = _Sink()
    counts: dict[str, int] = {}
    sources = (
        ("messages", "messages.jsonl", message_lines(db, plan)),
        ("threads", "threads.jsonl", thread_lines(db, plan)),
        ("audit_entries", "audit.jsonl", audit_lines(db, plan)),
    )
    target = cast(IO[bytes], sink)
    with zipfile.ZipFile(target, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for label, name, chunks in sources:
            counts[label] = 0
            for data, records in _entry(archive, sink, name, at, chunks):
                counts[label] = records
                if data:
                    yield data
        _record(services, plan, counts)
        manifest = _manifest(plan, counts)
        for data, _ in _entry(archive, sink, "manifest.json", at, [manifest]):
            if data:
                yield data
    tail = sink.drain()
    if tail:
        yield tail


def _filters(plan: ExportPlan) -> dict[str, Any]:
    return {
        "date_after": plan.audit_filter.date_after,
        "date_before": plan.audit_filter.date_before,
        "mailbox_ids": sorted(plan.actor.mailbox_ids)
        if plan.actor.mailbox_ids is not None
        else None,
    }


def _manifest(plan: ExportPlan, counts: Mapping[str, int]) -> str:
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "account_id": plan.account_id,
        "generated_at": isoformat(plan.generated_at),
        "generated_by": {"type": plan.actor.type, "id": plan.actor.id, "name": plan.actor.name},
        "filters": _filters(plan),
        "counts": dict(counts),
        "files": {
            "messages.jsonl": "one message per line, as GET /v1/mailboxes/{id}/emails/{id}",
            "threads.jsonl": "one thread per line",
            "audit.jsonl": "audit entries as GET /v1/audit-log/export?format=jsonl",
        },
        "attachments": "metadata only (filename, content_type, size_bytes, sha256) in each "
        "message; the bytes are served by the message's attachment route",
    }
    return json.dumps(body, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def _record(services: Services, plan: ExportPlan, counts: Mapping[str, int]) -> None:
    with services.db.write() as conn:
        audit.append(
            conn,
            actor=plan.actor,
            action="account.exported",
            account_id=plan.account_id,
            subject_type="account",
            subject_id=plan.account_id,
            details={"counts": dict(counts), "filters": _filters(plan)},
        )


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MEDIA_TYPE",
    "ExportPlan",
    "audit_lines",
    "message_lines",
    "plan_export",
    "stream_archive",
    "thread_lines",
    "thread_view",
]
