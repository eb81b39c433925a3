"""``GET /v1/export`` (SPEC §5.1): the account's messages, threads and audit as a ZIP.

What is in it and in what shape, what is not (another account, another mailbox, secrets),
who may ask, and that a few thousand messages stream through in batches.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from typing import Any

import httpx
from sqlalchemy import select

from multimail.ids import new_id, utcnow
from multimail.services import accounts, export, keys
from multimail.services.context import SYSTEM, Services
from multimail.store.tables import (
    api_keys,
    approval_codes,
    domains,
    messages,
    operator_users,
    webhooks,
)
from tests.conftest import Api
from tests.integration.oversight_support import make_mailbox, second_account


def _box(admin: httpx.Client, local: str) -> dict[str, Any]:
    made = admin.post("/v1/mailboxes", json={"address_local_part": local})
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    return body


def _send(client: httpx.Client, box: dict[str, Any], subject: str) -> dict[str, Any]:
    sent = client.post(
        f"/v1/mailboxes/{box['id']}/send",
        json={"to": "customer@example.com", "subject": subject, "markdown": "Hi there"},
    )
    assert sent.status_code == 202, sent.text
    body: dict[str, Any] = sent.json()
    return body


def _archive(response: httpx.Response) -> dict[str, Any]:
    """The archive's files: JSONL as lists of records, the manifest as a dict."""
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        files: dict[str, Any] = {}
        for name in names:
            text = archive.read(name).decode("utf-8")
            if name.endswith(".jsonl"):
                files[name] = [json.loads(line) for line in text.splitlines() if line]
            else:
                files[name] = json.loads(text)
    assert sorted(files) == ["audit.jsonl", "manifest.json", "messages.jsonl", "threads.jsonl"]
    return files


def _key(services: Services, boot: accounts.Bootstrap, **fields: Any) -> tuple[str, str]:
    with services.db.write() as conn:
        created = keys.create_key(conn, actor=SYSTEM, account_id=boot.account["id"], **fields)
    return created.raw_key, created.record["id"]


def test_the_archive_holds_the_accounts_messages_threads_and_audit(
    api: Api, boot: accounts.Bootstrap
) -> None:
    admin = api.client(boot.admin_key)
    box = _box(admin, "sales")
    sent = _send(api.client(boot.agent_key), box, "Quarterly numbers")
    read = admin.get(f"/v1/mailboxes/{box['id']}/emails/{sent['id']}")
    assert read.status_code == 200, read.text

    response = admin.get("/v1/export")
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="multimail-export-')
    assert boot.account["id"] in disposition and disposition.endswith('.zip"')
    files = _archive(response)

    (message,) = files["messages.jsonl"]
    shown = read.json()
    # The very view the API answers (read_email adds its "trusted" block and DKIM check).
    for key, value in message.items():
        if key not in ("status", "read_at", "updated_at"):
            assert shown[key] == value, key
    assert message["subject"] == "Quarterly numbers" and message["mailbox_id"] == box["id"]

    (thread,) = files["threads.jsonl"]
    assert thread["id"] == message["thread_id"] and thread["mailbox_id"] == box["id"]
    assert thread["message_count"] == 1

    audit_lines = files["audit.jsonl"]
    assert any(e["subject_id"] == sent["id"] for e in audit_lines)
    assert any(e["subject_id"] == box["id"] for e in audit_lines)
    assert all(e["account_id"] == boot.account["id"] for e in audit_lines)
    assert all(len(e["hash"]) == 64 and e["prev_hash"] for e in audit_lines)
    # The same lines as the audit export (one definition of the format).
    plain = admin.get("/v1/audit-log/export", params={"format": "jsonl"}).text.splitlines()
    assert [json.loads(line) for line in plain[: len(audit_lines)]] == audit_lines

    manifest = files["manifest.json"]
    assert manifest["format"] == "multimail-export" and manifest["format_version"] == 1
    assert manifest["account_id"] == boot.account["id"]
    assert manifest["generated_at"].endswith("Z")
    assert manifest["counts"] == {"messages": 1, "threads": 1, "audit_entries": len(audit_lines)}

    # The export itself is audited, with what it held.
    latest = admin.get("/v1/audit-log", params={"action": "account.exported"}).json()
    (entry,) = latest["entries"]
    assert entry["details"]["counts"] == manifest["counts"]
    assert entry["mailbox_id"] is None and entry["subject_id"] == boot.account["id"]


def test_another_accounts_data_is_absent(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    other = second_account(services)
    theirs = _box(api.client(other.admin_key), "theirs")
    their_mail = _send(api.client(other.agent_key), theirs, "THEIR-SECRET-SUBJECT")
    mine = _box(api.client(boot.admin_key), "mine")
    _send(api.client(boot.agent_key), mine, "ours")

    response = api.client(boot.admin_key).get("/v1/export")
    files = _archive(response)
    for needle in (other.account["id"], theirs["id"], their_mail["id"], "THEIR-SECRET-SUBJECT"):
        assert needle.encode() not in response.content, needle
    assert {m["mailbox_id"] for m in files["messages.jsonl"]} == {mine["id"]}

    # And theirs holds theirs only.
    their_files = _archive(api.client(other.admin_key).get("/v1/export"))
    assert [m["id"] for m in their_files["messages.jsonl"]] == [their_mail["id"]]


def test_a_mailbox_limited_key_exports_only_its_mailboxes(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    mine = make_mailbox(services, boot.account["id"], address="export-x@mm.test")
    other = make_mailbox(services, boot.account["id"], address="export-y@mm.test")
    agent = api.client(boot.agent_key)
    kept = _send(agent, mine, "for X")
    hidden = _send(agent, other, "EXPORT-Y-ONLY")
    raw, limited_id = _key(
        services, boot, name="x exporter", scopes=["admin"], mailbox_ids=[mine["id"]]
    )

    response = api.client(raw).get("/v1/export")
    files = _archive(response)
    assert [m["id"] for m in files["messages.jsonl"]] == [kept["id"]]
    assert {t["mailbox_id"] for t in files["threads.jsonl"]} == {mine["id"]}
    for entry in files["audit.jsonl"]:
        assert entry["mailbox_id"] == mine["id"] or (
            entry["mailbox_id"] is None and entry["actor_id"] == limited_id
        ), entry
    for needle in (hidden["id"], other["id"], "EXPORT-Y-ONLY"):
        assert needle.encode() not in response.content, needle
    assert files["manifest.json"]["filters"]["mailbox_ids"] == [mine["id"]]

    whole = _archive(api.client(boot.admin_key).get("/v1/export"))
    assert {m["id"] for m in whole["messages.jsonl"]} == {kept["id"], hidden["id"]}


def test_the_archive_holds_no_secret(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    admin = api.client(boot.admin_key)
    box = _box(admin, "secrets")
    _send(api.client(boot.agent_key), box, "hello")
    hook = admin.post("/v1/webhooks", json={"url": "https://hooks.example.com/collect"})
    assert hook.status_code in (200, 201), hook.text
    assert admin.post("/v1/domains", json={"domain": "export-secrets.example"}).status_code in (
        200,
        201,
    )
    # An approval code waits for the operator (its hash is stored).
    asked = api.client(minted_admin_key).post(
        "/v1/webhooks", json={"url": "https://hooks.example.com/other"}
    )
    assert asked.status_code == 202, asked.text

    response = admin.get("/v1/export")
    _archive(response)
    body = response.content
    with services.db.read() as conn:
        secrets = [
            *conn.execute(select(api_keys.c.key_hash)).scalars(),
            *conn.execute(select(webhooks.c.secret)).scalars(),
            *conn.execute(select(domains.c.dkim_private_key)).scalars(),
            *conn.execute(select(approval_codes.c.code_hash)).scalars(),
            *conn.execute(select(operator_users.c.password_hash)).scalars(),
        ]
    assert len(secrets) >= 7  # three key hashes (+ minted), a webhook, a DKIM key, a code, a user
    secrets += [
        hook.json()["secret"],
        boot.admin_key,
        boot.agent_key,
        boot.reviewer_key,
        minted_admin_key,
        boot.operator_password,
    ]
    for secret in secrets:
        assert secret and secret.encode() not in body, secret[:12]
    assert b"PRIVATE KEY" not in body


def test_only_an_admin_key_may_export(api: Api, boot: accounts.Bootstrap) -> None:
    for key in (boot.agent_key, boot.reviewer_key):
        refused = api.client(key).get("/v1/export")
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "insufficient_scope"
    assert api.client(None).get("/v1/export").status_code == 401
    bad = api.client(boot.admin_key).get("/v1/export", params={"date_after": "31/12/2026"})
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error", bad.text


def test_a_date_range_narrows_every_file(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    admin = api.client(boot.admin_key)
    box = _box(admin, "ranges")
    early = _send(api.client(boot.agent_key), box, "early")
    time.sleep(0.01)  # bounds are kept to the millisecond, as the audit export keeps them
    cut = utcnow().isoformat()
    time.sleep(0.01)
    late = _send(api.client(boot.agent_key), box, "late")
    after = _archive(admin.get("/v1/export", params={"date_after": cut}))
    assert [m["id"] for m in after["messages.jsonl"]] == [late["id"]]
    assert all(e["at"] >= cut[:19] for e in after["audit.jsonl"])
    before = _archive(admin.get("/v1/export", params={"date_before": cut}))
    assert [m["id"] for m in before["messages.jsonl"]] == [early["id"]]
    assert before["manifest.json"]["filters"]["date_before"].endswith("Z")


def test_a_few_thousand_messages_stream_in_batches(
    api: Api, services: Services, boot: accounts.Bootstrap
) -> None:
    box = make_mailbox(services, boot.account["id"], address="bulk@mm.test")
    total = 3000
    now = utcnow()
    rows = [
        {
            "id": new_id("msg"),
            "account_id": boot.account["id"],
            "mailbox_id": box["id"],
            "direction": "inbound",
            "status": "unread",
            "from_address": f"sender{i}@example.org",
            "to": [box["address"]],
            "subject": f"bulk {i}",
            "markdown": "body " * 50,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(total)
    ]
    with services.db.write() as conn:
        conn.execute(messages.insert(), rows)

    # The service hands the archive on in many pieces, not as one buffer.
    admin = keys.authenticate(services.db, boot.admin_key)
    pieces = list(export.stream_archive(services, export.plan_export(admin)))
    assert len(pieces) > total // export.MESSAGE_BATCH
    assert max(len(p) for p in pieces) < sum(len(p) for p in pieces) // 5

    with api.client(boot.admin_key).stream("GET", "/v1/export") as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers
        body = b"".join(response.iter_bytes())
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        lines = archive.read("messages.jsonl").decode().splitlines()
        manifest = json.loads(archive.read("manifest.json"))
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == total and ids == sorted(ids) and set(ids) == {r["id"] for r in rows}
    assert manifest["counts"]["messages"] == total
