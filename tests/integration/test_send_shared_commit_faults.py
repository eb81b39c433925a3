"""A storage fault in the middle of a shared SQLite commit must not acknowledge a
send that is not on disk."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from sqlalchemy import Connection, select

from multimail.services import accounts, keys, sending
from multimail.services.context import Actor, Services
from multimail.store.tables import messages
from tests.conftest import BACKEND
from tests.integration.test_sending import make_mailbox

pytestmark = pytest.mark.skipif(BACKEND != "sqlite", reason="shared commits are SQLite's")


def _mailbox(services: Services, boot: accounts.Bootstrap) -> str:
    return str(make_mailbox(services, boot, "full", "gated_send")["id"])


def test_a_disk_full_send_in_a_batch_does_not_lose_an_acknowledged_neighbour(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """Three sends share one commit; the middle one hits SQLITE_FULL (the disk fills while
    it writes its attachment). SQLite rolls the whole transaction back on SQLITE_FULL, so
    whatever the first send wrote is gone: it must not be answered as stored."""
    box = _mailbox(services, boot)
    agent = keys.authenticate(services.db, boot.agent_key)

    def work(subject: str, attachment: bytes | None = None) -> sending._Work:
        body: dict[str, Any] = {"to": "c@example.com", "subject": subject, "text": "Hi"}
        if attachment is not None:
            body["attachments"] = [
                {
                    "filename": "big.bin",
                    "content_type": "application/octet-stream",
                    "content_base64": base64.b64encode(attachment).decode(),
                }
            ]
        request = sending.SendRequest.model_validate(body)
        prepared = sending._prepare(request, [box, None, None], None)

        def write(conn: Connection, _: Actor | None) -> sending.SendResult:
            return sending._write_send(conn, services, agent, prepared)

        return sending._Work(write)

    first = work("first")
    big = work("big", attachment=bytes(range(256)) * 2048)  # 512 KiB: needs new pages
    inner = big.write

    def disk_full(conn: Connection, actor: Actor | None) -> sending.SendResult:
        # The disk is full from here on: no page may be added to the database file.
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
        conn.exec_driver_sql(f"PRAGMA max_page_count = {pages}")
        try:
            return inner(conn, actor)
        finally:
            conn.exec_driver_sql("PRAGMA max_page_count = 1073741823")

    big.write = disk_full
    last = work("last")
    batch = [first, big, last]
    sending._SharedCommits._commit(services.db, batch)

    with services.db.read() as conn:
        stored = set(conn.execute(select(messages.c.subject)).scalars())
    assert big.error is not None
    for w, subject in ((first, "first"), (last, "last")):
        acknowledged = w.error is None and w.result is not None
        assert acknowledged == (subject in stored), (subject, w.result, w.error, stored)
