"""One way to look a message up and one way to show it, shared by every reader.

``id``, ``message_id`` and ``email_id`` are the same value (clients in the wild read each of
them); the RFC 5322 header is ``message_id_header``. Bodies from outside are untrusted: the
view carries them both where clients read them (``markdown``, ``body_text``) and grouped under
``body`` with ``untrusted: true`` so agent-facing transports can fence them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, select

from multimail.errors import NotFound
from multimail.ids import isoformat
from multimail.services.context import Actor
from multimail.store.tables import attachments, message_tags, messages, threads

# Inbound mail a reviewer has not released (gated_all): still held, or refused (rejected,
# cancelled) and so never released. The agent's own outbound messages in those statuses are
# not held: it reads a rejection's note to revise.
HELD_STATUSES = ("pending_inbound_approval", "rejected", "cancelled")


def held_from_agents(row: Mapping[str, Any]) -> bool:
    return row.get("direction") == "inbound" and row.get("status") in HELD_STATUSES


def get_row(
    conn: Connection,
    actor: Actor,
    message_ref: str,
    *,
    mailbox_id: str | None = None,
    for_update: bool = False,
) -> dict[str, Any]:
    """The caller's message (by ``msg_`` id, or RFC Message-ID); NotFound for anything else.

    ``for_update`` is for a change (decide, cancel, edit): a test key changes only test
    messages, and a live one answers as absent. A test key never hands mail to SMTP (SPEC
    §1), and an edit of a live scheduled message's recipients would.
    """
    query = select(messages).where(messages.c.account_id == actor.account_id)
    if for_update and actor.test_mode:
        query = query.where(messages.c.test.is_(True))
    if message_ref.startswith("msg_"):
        query = query.where(messages.c.id == message_ref)
    else:
        query = query.where(messages.c.message_id_header == message_ref)
    if mailbox_id:
        query = query.where(messages.c.mailbox_id == mailbox_id)
    if actor.mailbox_ids is not None:
        query = query.where(messages.c.mailbox_id.in_(actor.mailbox_ids))
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query.limit(1)).mappings().first()
    if row is None:
        raise NotFound(f"message {message_ref!r} not found", code="message_not_found")
    return dict(row)


def text_column(markdown: str, text: str) -> str | None:
    """The ``text`` column of an outbound message: NULL when the text part is the markdown
    itself (the usual case: it is the markdown, normalised), so the row holds the body once
    less; :func:`view` shows the markdown then, and the worker never reads the column."""
    return None if text == markdown else text


def shown_text(row: Mapping[str, Any]) -> str | None:
    """The text part a row shows: its ``text`` column, or the markdown when that is NULL."""
    text = row.get("text")
    return text if text is not None else row.get("markdown")


def tags_for(conn: Connection, ids: Iterable[str]) -> dict[str, dict[str, str]]:
    ids = list(ids)
    out: dict[str, dict[str, str]] = {i: {} for i in ids}
    if not ids:
        return out
    for row in conn.execute(select(message_tags).where(message_tags.c.message_id.in_(ids))):
        out[row.message_id][row.key] = row.value
    return out


def attachments_for(conn: Connection, ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    ids = list(ids)
    out: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if not ids:
        return out
    query = select(
        attachments.c.id,
        attachments.c.message_id,
        attachments.c.filename,
        attachments.c.content_type,
        attachments.c.size_bytes,
        attachments.c.inline,
        attachments.c.content_id,
        attachments.c.sha256,
    ).where(attachments.c.message_id.in_(ids))
    for row in conn.execute(query).mappings():
        item = dict(row)
        out[item.pop("message_id")].append(item)
    return out


def public_thread_ids(conn: Connection, thread_ids: Iterable[str | None]) -> dict[str, str]:
    ids = [t for t in set(thread_ids) if t]
    if not ids:
        return {}
    rows = conn.execute(select(threads.c.id, threads.c.external_id).where(threads.c.id.in_(ids)))
    return {r.id: (r.external_id or r.id) for r in rows}


def _decision(row: Mapping[str, Any]) -> dict[str, Any] | None:
    if not row.get("decision"):
        return None
    return {
        "action": row["decision"],
        "decision": row["decision"],
        "reviewer": row["reviewer"],
        "note": row["decision_note"],
        "decided_at": isoformat(row["decided_at"]),
        "edited": row.get("original_markdown") is not None
        or row.get("original_subject") is not None,
    }


def view(
    row: Mapping[str, Any],
    *,
    tags: dict[str, str] | None = None,
    attachment_list: list[dict[str, Any]] | None = None,
    thread_public_id: str | None = None,
) -> dict[str, Any]:
    """The JSON shape of a message everywhere it appears (API, events, pending queue)."""
    inbound = row["direction"] == "inbound"
    decision = _decision(row)
    text = shown_text(row)
    data: dict[str, Any] = {
        "id": row["id"],
        "message_id": row["id"],
        "email_id": row["id"],
        "mailbox_id": row["mailbox_id"],
        "thread_id": thread_public_id or row.get("thread_id"),
        "direction": row["direction"],
        "status": row["status"],
        "test": bool(row.get("test")),
        "from": row.get("from_address"),
        "from_name": row.get("from_name"),
        "sender": row.get("from_address"),
        "to": list(row.get("to") or []),
        "cc": list(row.get("cc") or []),
        "subject": row.get("subject") or "",
        "markdown": row.get("markdown") or "",
        "body_text": text or "",
        "html": row.get("html"),
        "body": {
            "untrusted": inbound,
            "markdown": row.get("markdown") or "",
            "text": text or "",
            "html": row.get("html"),
            "quoted_text": row.get("quoted_text"),
        },
        "metadata": row.get("metadata") or {},
        "tags": tags or {},
        "attachments": attachment_list or [],
        "message_id_header": row.get("message_id_header"),
        "in_reply_to": row.get("in_reply_to"),
        "references": list(row.get("references") or []),
        "reply_to_email_id": row.get("reply_to_email_id"),
        "oversight_mode": row.get("oversight_mode"),
        "scan_findings": row.get("scan_findings") or [],
        "decision": decision,
        "rejection_note": row.get("decision_note") if row.get("decision") == "reject" else None,
        "send_at": isoformat(row.get("send_at")),
        "gate_timing": row.get("gate_timing"),
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row.get("updated_at")),
        "delivered_at": isoformat(row.get("delivered_at")),
        "read_at": isoformat(row.get("read_at")),
        "attempts": row.get("attempts") or 0,
        "last_error": row.get("last_error"),
        "bounce_type": row.get("bounce_type"),
        "size_bytes": row.get("size_bytes") or 0,
    }
    if not inbound:
        data["bcc"] = list(row.get("bcc") or [])
        data["draft_body"] = data["markdown"]
        if row.get("original_markdown") is not None or row.get("original_subject") is not None:
            data["original_draft"] = {
                "subject": row.get("original_subject") or row.get("subject"),
                "markdown": row.get("original_markdown") or row.get("markdown"),
            }
    else:
        data["auth_results"] = row.get("auth_results")
        data["spam_score"] = row.get("spam_score")
        data["spam_reasons"] = row.get("spam_reasons") or []
    return data


def views(conn: Connection, rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Views for many rows with their tags, attachments and thread ids in three queries."""
    ids = [r["id"] for r in rows]
    tags = tags_for(conn, ids)
    atts = attachments_for(conn, ids)
    thread_ids = public_thread_ids(conn, [r.get("thread_id") for r in rows])
    return [
        view(
            r,
            tags=tags[r["id"]],
            attachment_list=atts[r["id"]],
            thread_public_id=thread_ids.get(r.get("thread_id") or ""),
        )
        for r in rows
    ]


def full_view(conn: Connection, row: Mapping[str, Any]) -> dict[str, Any]:
    return views(conn, [row])[0]


# --- stored snapshots ---------------------------------------------------------------------
# Events keep the view of the message as it was, and a view repeats itself: the body up to
# seven times, for the names the guides read. A stored snapshot keeps one copy of each
# value; ``expand_view`` rebuilds the very view (same keys, same order). Each entry: the
# copy, the key it copies, and the key it follows in ``view`` (where it goes back).
_COPIES: tuple[tuple[str, str, str], ...] = (
    ("message_id", "id", "id"),
    ("email_id", "id", "message_id"),
    ("sender", "from", "from_name"),
    ("body_text", "markdown", "markdown"),
    ("draft_body", "markdown", "bcc"),
)
_COPY_OF = {copy: source for copy, source, _ in _COPIES}
_FOLLOWS = {copy: follows for copy, _, follows in _COPIES}
_FOLLOWERS: dict[str, list[tuple[str, str]]] = {}
for _copy, _source, _follows in _COPIES:
    _FOLLOWERS.setdefault(_follows, []).append((_copy, _source))
# ``body`` groups values the view also has at the top level; only ``quoted_text`` is its own.
_BODY_OWN = ("quoted_text",)
_BODY_SOURCES = frozenset({"direction", "markdown", "body_text", "html"})


def _grouped_body(data: Mapping[str, Any], quoted_text: Any) -> dict[str, Any]:
    return {
        "untrusted": data.get("direction") == "inbound",
        "markdown": data.get("markdown"),
        "text": data.get("body_text"),
        "html": data.get("html"),
        "quoted_text": quoted_text,
    }


def compact_view(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a :func:`view`) without the copies :func:`expand_view` can put back.

    A key is dropped only when it equals what it copies, so a view that differs from the
    usual shape (an older one, one edited after the fact) keeps what makes it differ.
    """
    out: dict[str, Any] = {}
    seen: set[str] = set()
    previous = None
    for key, value in data.items():
        # Dropped only where expand_view puts it back: right after the key it follows.
        source = _COPY_OF.get(key)
        if source in seen and previous == _FOLLOWS[key] and same_json_value(value, data[source]):
            seen.add(key)
            previous = key
            continue
        if key == "body" and isinstance(value, dict) and seen >= _BODY_SOURCES:
            own = {k: value.get(k) for k in _BODY_OWN}
            if same_json_value(value, _grouped_body(data, own["quoted_text"])):
                value = own
        out[key] = value
        seen.add(key)
        previous = key
    return out


def same_json_value(value: Any, other: Any) -> bool:
    """The same JSON text: Python's ``==`` has ``True == 1`` and ignores a dict's key order,
    a receiver reading (and verifying a signature over) the text does not."""
    if value is other:
        return True
    if type(value) is not type(other):
        return False
    if isinstance(value, dict):
        return list(value) == list(other) and all(
            same_json_value(item, other[key]) for key, item in value.items()
        )
    if isinstance(value, list):
        return len(value) == len(other) and all(map(same_json_value, value, other))
    return bool(value == other)


def expand_view(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The view :func:`compact_view` made ``stored`` from; a full view comes back as it is."""
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        out[key] = value
        for copy, source in _FOLLOWERS.get(key, ()):
            if copy not in stored and source in out:
                put(copy, out[source])

    for key, value in stored.items():
        if key == "body" and isinstance(value, dict) and list(value) == list(_BODY_OWN):
            value = _grouped_body(out, value["quoted_text"])
        put(key, value)
    return out
