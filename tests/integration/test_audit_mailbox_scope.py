"""The audit log under a key restricted to some mailboxes (``mailbox_ids``).

Such a key sees its mailboxes' entries and the account-level entries (no mailbox) it wrote
itself; every other entry is hidden, in the page, the mailbox filter, the tool route and the
export. Another mailbox named in a filter answers 404, as every mailbox-scoped read does.
Verification checks the whole chain whatever the caller sees, so it never reports a break
that is only the filtering.
"""

from __future__ import annotations

import json
from typing import Any

from multimail.services import accounts, keys
from multimail.services.context import SYSTEM, Services
from tests.conftest import Api
from tests.integration.oversight_support import make_mailbox, relay, second_account, settings

__all__ = ["relay", "settings"]  # fixtures, re-exported so pytest finds them here


def _key(services: Services, boot: accounts.Bootstrap, **fields: Any) -> tuple[str, str]:
    with services.db.write() as conn:
        created = keys.create_key(conn, actor=SYSTEM, account_id=boot.account["id"], **fields)
    return created.raw_key, created.record["id"]


def _two_boxes(services: Services, boot: accounts.Bootstrap) -> tuple[dict[str, Any], ...]:
    mine = make_mailbox(services, boot.account["id"], address="scope-x@mm.test")
    other = make_mailbox(services, boot.account["id"], address="scope-y@mm.test")
    return mine, other


def _send(api: Api, key: str, box: dict[str, Any], subject: str) -> str:
    sent = api.client(key).post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": ["bob@example.org"], "subject": subject, "markdown": "hello"},
    )
    assert sent.status_code == 202, sent.text
    return str(sent.json()["id"])


def test_limited_key_sees_its_mailboxes_and_its_own_account_entries(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    mine, other = _two_boxes(services, boot)
    mine_sent = _send(api, boot.agent_key, mine, "for X")
    other_sent = _send(api, boot.agent_key, other, "for Y")
    raw, limited_id = _key(
        services, boot, name="x admin", scopes=["admin"], mailbox_ids=[mine["id"]]
    )
    limited = api.client(raw)
    # An account-level action of its own (no mailbox): a contact.
    made = limited.post("/v1/contacts", json={"email": "carol@example.org", "name": "Carol"})
    assert made.status_code in (200, 201), made.text

    page = limited.get("/v1/audit-log", params={"limit": 1000})
    assert page.status_code == 200, page.text
    entries = page.json()["entries"]
    assert entries
    for entry in entries:
        assert entry["mailbox_id"] == mine["id"] or (
            entry["mailbox_id"] is None and entry["actor_id"] == limited_id
        ), entry
    subjects = {e["subject_id"] for e in entries}
    assert mine_sent in subjects and other_sent not in subjects
    assert any(e["actor_id"] == limited_id and e["mailbox_id"] is None for e in entries)
    # Account-level entries others wrote (this key's own creation, the mailboxes' owner's
    # keys) are not this key's to read.
    assert not any(e["action"] == "api_key.created" for e in entries)

    # The mailbox filter: its own mailbox by id and by address; another is 404 either way.
    by_id = limited.get("/v1/audit-log", params={"mailbox": mine["id"]}).json()["entries"]
    by_address = limited.get("/v1/audit-log", params={"mailbox": mine["address"]}).json()
    assert by_id and by_id == by_address["entries"]
    assert all(e["mailbox_id"] == mine["id"] for e in by_id)
    for ref in (other["id"], other["address"]):
        assert limited.get("/v1/audit-log", params={"mailbox": ref}).status_code == 404
        assert limited.get("/v1/audit-log", params={"mailbox_id": ref}).status_code == 404
    # Naming the other mailbox's message finds nothing (its entries stay hidden).
    assert limited.get("/v1/audit-log", params={"message_id": other_sent}).json()["entries"] == []

    # The unrestricted admin key still reads everything, both mailboxes included.
    full = api.client(boot.admin_key).get("/v1/audit-log", params={"limit": 1000}).json()
    seen = {e["mailbox_id"] for e in full["entries"]}
    assert {mine["id"], other["id"], None} <= seen


def test_limited_admin_key_export_holds_only_what_it_may_read(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    mine, other = _two_boxes(services, boot)
    _send(api, boot.agent_key, mine, "export X")
    _send(api, boot.agent_key, other, "EXPORT-Y-ONLY")
    raw, limited_id = _key(
        services, boot, name="x exporter", scopes=["admin"], mailbox_ids=[mine["id"]]
    )
    limited = api.client(raw)

    exported = limited.get("/v1/audit-log/export", params={"format": "jsonl"})
    assert exported.status_code == 200, exported.text
    lines = [json.loads(line) for line in exported.text.splitlines() if line]
    assert lines
    assert "EXPORT-Y-ONLY" not in exported.text
    for entry in lines:
        assert entry["mailbox_id"] == mine["id"] or (
            entry["mailbox_id"] is None and entry["actor_id"] == limited_id
        ), entry
    as_csv = limited.get("/v1/audit-log/export", params={"format": "csv"})
    assert as_csv.status_code == 200 and "EXPORT-Y-ONLY" not in as_csv.text
    assert other["id"] not in as_csv.text

    # The account's unrestricted admin key exports both mailboxes.
    whole = api.client(boot.admin_key).get("/v1/audit-log/export", params={"format": "jsonl"})
    assert "EXPORT-Y-ONLY" in whole.text

    # Verification is of the whole chain, not of the caller's view: intact for both keys.
    for client in (limited, api.client(boot.admin_key)):
        verdict = client.get("/v1/audit-log/verify")
        assert verdict.status_code == 200, verdict.text
        assert verdict.json()["intact"] is True, verdict.json()


def test_another_accounts_mailbox_answers_as_one_that_exists_nowhere(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    mine = make_mailbox(services, boot.account["id"], address="scope-own@mm.test")
    theirs = make_mailbox(services, second_account(services).account["id"], address="t@mm.test")
    admin = api.client(boot.admin_key)
    answers = [
        admin.get("/v1/audit-log", params={"mailbox": ref})
        for ref in (theirs["id"], "mbx_nothere", theirs["address"], "nobody@mm.test")
    ]
    assert {(a.status_code, a.text) for a in answers} == {
        (404, '{"error":"mailbox not found","code":"mailbox_not_found"}')
    }, [a.text for a in answers]
    assert admin.get("/v1/audit-log", params={"mailbox": mine["id"]}).status_code == 200


def test_deleted_mailbox_keeps_its_history_for_a_key_limited_to_it(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    mine, _other = _two_boxes(services, boot)
    _send(api, boot.agent_key, mine, "before deletion")
    raw, _ = _key(services, boot, name="x reader", scopes=["read"], mailbox_ids=[mine["id"]])
    deleted = api.client(boot.admin_key).delete(f"/v1/mailboxes/{mine['id']}")
    assert deleted.status_code in (200, 204), deleted.text
    limited = api.client(raw)
    for ref in (mine["id"], mine["address"]):
        page = limited.get("/v1/audit-log", params={"mailbox": ref})
        assert page.status_code == 200, page.text
        assert "mailbox.deleted" in {e["action"] for e in page.json()["entries"]}
