"""Follow-ups to the operator-gated settings (SPEC §2 ``approval_code``), live.

- ``auto_cc`` / ``auto_bcc`` and ``oversight_email`` are saved only as addresses the composer
  writes as given (an RFC 2047 encoded-word would make every later send fail at delivery, or
  go to another address than the one shown): 422 ``invalid_address`` naming the field, before
  any code is mailed.
- ``oversight_email`` is never a mailbox hosted by this server (its agents would read the
  approval requests and codes): 422 ``oversight_email_hosted_here`` on change and at
  bootstrap; a mailbox asked for at some account's oversight_email is 409
  ``address_is_oversight_email``.
- Turning a mailbox's ``ai_disclosure`` off is a loosening: an API key needs the operator's
  code; turning it on applies at once.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select

from multimail.errors import Conflict, InvalidInput, MultimailError
from multimail.services import accounts, mailboxes
from multimail.services.context import Services
from multimail.store.tables import accounts as account_table
from multimail.store.tables import approval_codes
from multimail.store.tables import mailboxes as mailbox_table
from tests.conftest import Api
from tests.integration.oversight_support import (
    box,
    job_rows,
    last_code,
    make_mailbox,
    operator,
    second_account,
)

__all__ = ["box"]  # a fixture, re-exported for pytest

ENCODED = "=?utf-8?q?boss?=@example.org"  # mail programs read it as boss@example.org
BROKEN = "=?utf-8?q?a=0Ab?=@example.org"  # decodes to a line break: the composer refuses it


def _row(services: Services, mailbox_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        query = select(mailbox_table).where(mailbox_table.c.id == mailbox_id)
        return dict(conn.execute(query).mappings().one())


def _oversight_email(services: Services, account_id: str) -> str | None:
    with services.db.read() as conn:
        query = select(account_table.c.oversight_email).where(account_table.c.id == account_id)
        return conn.execute(query).scalar_one()


def _codes_mailed(services: Services) -> int:
    return len(
        [j for j in job_rows(services, "system_mail") if j["payload"]["kind"] == "approval_code"]
    )


def _purposes(services: Services) -> list[str]:
    with services.db.read() as conn:
        query = select(approval_codes.c.purpose).order_by(approval_codes.c.id)
        return list(conn.execute(query).scalars())


def _refused(response: Any, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    if field is not None:
        assert body.get("field") == field, body


# --- 2. addresses the composer would refuse or rewrite ---------------------------------------


@pytest.mark.parametrize("field", ["auto_cc", "auto_bcc"])
@pytest.mark.parametrize("value", [ENCODED, BROKEN])
def test_copies_the_composer_would_refuse_or_rewrite_are_refused_when_saved(
    api: Api,
    services: Services,
    boot: accounts.Bootstrap,
    box: dict[str, Any],
    minted_admin_key: str,
    field: str,
    value: str,
) -> None:
    """The operator's own key and a minted key alike get 422 invalid_address naming the
    field; the minted key's request is refused before a code is mailed; nothing is stored."""
    url = f"/v1/mailboxes/{box['id']}"
    for key in (boot.admin_key, minted_admin_key):
        response = api.client(key).patch(url, json={field: ["ok@example.org", value]})
        _refused(response, 422, "invalid_address", field)
    assert _codes_mailed(services) == 0
    assert _row(services, box["id"])[field] == []
    created = api.client(boot.admin_key).post(
        "/v1/mailboxes", json={"address": "new@mm.test", field: [value]}
    )
    _refused(created, 422, "invalid_address", field)
    fine = api.client(boot.admin_key).patch(url, json={field: ["Boss@Example.ORG"]})
    assert fine.status_code == 200 and fine.json()[field] == ["boss@example.org"]


@pytest.mark.parametrize("value", [ENCODED, BROKEN])
def test_an_oversight_email_the_composer_would_refuse_or_rewrite_is_refused(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str, value: str
) -> None:
    """Approval codes are mailed to oversight_email: it is checked like a recipient, for the
    operator (422 at once) and for a minted key (422 before a code is mailed), and at
    bootstrap."""
    for key in (boot.admin_key, minted_admin_key):
        response = api.client(key).patch("/v1/account", json={"oversight_email": value})
        _refused(response, 422, "invalid_address", "oversight_email")
    assert _codes_mailed(services) == 0
    assert _oversight_email(services, boot.account["id"]) == "ops@mm.test"
    with pytest.raises(InvalidInput) as refused:
        accounts.bootstrap(services.db, account_name="Other", operator_email=value)
    assert refused.value.code == "invalid_address"


# --- 3. oversight_email is never a mailbox of this server ------------------------------------


def test_oversight_email_may_not_be_a_mailbox_hosted_here(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """A mailbox of this account or of another one is refused with 422 and a reason; an
    outside address (or a deleted mailbox's) is fine."""
    other = second_account(services)
    theirs = make_mailbox(services, other.account["id"], address="theirs@mm.test")
    admin = api.client(boot.admin_key)
    for address in (box["address"], "Agent@MM.test", theirs["address"]):
        response = admin.patch("/v1/account", json={"oversight_email": address})
        _refused(response, 422, "oversight_email_hosted_here", "oversight_email")
        message = response.json()["error"]
        assert "mailbox on this MultiMail server" in message and "outside MultiMail" in message
    assert _oversight_email(services, boot.account["id"]) == "ops@mm.test"

    with services.db.write() as conn:
        mailboxes.delete_mailbox(conn, actor=operator(other.account["id"]), ref=theirs["id"])
    moved = admin.patch("/v1/account", json={"oversight_email": theirs["address"]})
    assert moved.status_code == 200, moved.text
    assert moved.json()["oversight_email"] == "theirs@mm.test"


def test_a_minted_key_is_refused_a_hosted_oversight_email_before_any_code_is_mailed(
    api: Api, services: Services, box: dict[str, Any], minted_admin_key: str
) -> None:
    """No code goes out for a change that could never apply; an outside address still asks."""
    admin = api.client(minted_admin_key)
    hosted = admin.patch("/v1/account", json={"oversight_email": box["address"]})
    _refused(hosted, 422, "oversight_email_hosted_here", "oversight_email")
    assert _codes_mailed(services) == 0
    asked = admin.patch("/v1/account", json={"oversight_email": "boss@example.org"})
    assert asked.status_code == 202, asked.text
    assert _purposes(services) == ["oversight_email"]


def test_bootstrap_refuses_an_oversight_email_hosted_here(
    services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """A further account whose operator (or oversight) address is a mailbox here is refused,
    and nothing of it is created."""
    for kwargs in (
        {"operator_email": box["address"]},
        {"operator_email": "ops@other.test", "oversight_email": box["address"]},
    ):
        with pytest.raises(InvalidInput) as refused:
            accounts.bootstrap(services.db, account_name="Other", **kwargs)
        assert refused.value.code == "oversight_email_hosted_here"
    with services.db.read() as conn:
        assert len(conn.execute(select(account_table.c.id)).all()) == 1


def test_a_mailbox_at_an_accounts_oversight_email_is_refused_with_409(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """ops@mm.test is this account's oversight_email, ops-other@mm.test another account's:
    neither may become a mailbox (409, the other account not named), through the operator's
    key, a minted key (before any code is mailed) or the service the CLI calls."""
    other = second_account(services)
    with services.db.write() as conn:
        accounts.update_account(
            conn,
            actor=operator(other.account["id"]),
            account_id=other.account["id"],
            changes={"oversight_email": "Ops-Other@MM.test"},
        )
    with services.db.write() as conn:
        mailboxes.create_mailbox(
            conn,
            actor=operator(other.account["id"]),
            settings=services.settings,
            address="new@mm.test",
        )
    for key in (boot.admin_key, minted_admin_key):
        for body in (
            {"address": "OPS@mm.test"},
            {"address_local_part": "ops"},
            {"address": "ops-other@mm.test"},
        ):
            response = api.client(key).post("/v1/mailboxes", json=body)
            _refused(response, 409, "address_is_oversight_email")
            assert "Other" not in response.json()["error"]
    assert _codes_mailed(services) == 0
    with pytest.raises(Conflict) as refused, services.db.write() as conn:
        mailboxes.create_mailbox(
            conn,
            actor=operator(boot.account["id"]),
            settings=services.settings,
            address="ops@mm.test",
        )
    assert refused.value.code == "address_is_oversight_email"
    with services.db.read() as conn:
        addresses = set(conn.execute(select(mailbox_table.c.address)).scalars())
    assert addresses == {"new@mm.test"}


def _race(services: Services, account_id: str, address: str) -> dict[str, Any]:
    """Create a mailbox at ``address`` and make it the oversight_email, in two threads that
    start together; each side's outcome is True or its error code."""
    actor = operator(account_id)
    start = threading.Barrier(2)
    outcome: dict[str, Any] = {}

    def create() -> None:
        start.wait()
        try:
            with services.db.write() as conn:
                mailboxes.create_mailbox(
                    conn, actor=actor, settings=services.settings, address=address
                )
            outcome["mailbox"] = True
        except MultimailError as exc:
            outcome["mailbox"] = exc.code

    def point() -> None:
        start.wait()
        try:
            with services.db.write() as conn:
                accounts.update_account(
                    conn, actor=actor, account_id=account_id, changes={"oversight_email": address}
                )
            outcome["oversight"] = True
        except MultimailError as exc:
            outcome["oversight"] = exc.code

    threads = [threading.Thread(target=create), threading.Thread(target=point)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcome


def test_a_mailbox_and_an_oversight_email_racing_for_one_address_never_both_win(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """Created and set at the same moment (PostgreSQL runs both transactions at once; SQLite
    serialises them): one of the two is refused, every time, and neither deadlocks."""
    account_id = boot.account["id"]
    for round_ in range(8):
        outcome = _race(services, account_id, f"race{round_}@mm.test")
        assert sorted(map(str, outcome.values())) in (
            ["True", "address_is_oversight_email"],
            ["True", "oversight_email_hosted_here"],
        ), outcome
        with services.db.write() as conn:  # the next round starts from a free oversight_email
            accounts.update_account(
                conn,
                actor=operator(account_id),
                account_id=account_id,
                changes={"oversight_email": "ops@mm.test"},
            )


# --- 4. turning ai_disclosure off needs the operator ------------------------------------------


def test_turning_ai_disclosure_off_needs_the_code_turning_it_on_is_immediate(
    api: Api, services: Services, box: dict[str, Any], minted_admin_key: str
) -> None:
    """Off: 202 and a mailed code that shows the change, then the code applies it. Asking for
    off when it is off asks nothing; turning it back on applies at once."""
    admin = api.client(minted_admin_key)
    url = f"/v1/mailboxes/{box['id']}"
    assert _row(services, box["id"])["ai_disclosure"] is True
    asked = admin.patch(url, json={"ai_disclosure": False})
    assert asked.status_code == 202 and asked.json()["status"] == "approval_required"
    assert _row(services, box["id"])["ai_disclosure"] is True
    assert _purposes(services) == ["mailbox_settings"]
    mail = [j for j in job_rows(services, "system_mail") if j["payload"]["kind"] == "approval_code"]
    assert "ai_disclosure: on -> off" in mail[-1]["payload"]["markdown"]
    done = admin.patch(url, json={"ai_disclosure": False, "approval_code": last_code(services)})
    assert done.status_code == 200 and done.json()["ai_disclosure"] is False, done.text

    mailed = _codes_mailed(services)
    assert admin.patch(url, json={"ai_disclosure": False}).status_code == 200, "unchanged"
    back_on = admin.patch(f"{url}/configure", json={"ai_disclosure": True})
    assert back_on.status_code == 200 and back_on.json()["ai_disclosure"] is True
    assert _codes_mailed(services) == mailed
    assert admin.patch(f"{url}/configure", json={"ai_disclosure": False}).status_code == 202


def test_the_operator_turns_ai_disclosure_off_directly_and_null_is_refused(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """The operator's own key acts at once; ai_disclosure is true or false, never null."""
    admin = api.client(boot.admin_key)
    url = f"/v1/mailboxes/{box['id']}"
    off = admin.patch(url, json={"ai_disclosure": False})
    assert off.status_code == 200 and off.json()["ai_disclosure"] is False
    assert _codes_mailed(services) == 0
    _refused(admin.patch(url, json={"ai_disclosure": None}), 422, "invalid_field", "ai_disclosure")
    assert _row(services, box["id"])["ai_disclosure"] is False


def test_codes_bind_ai_disclosure_with_the_other_gated_changes(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """A code for a raised cap does not also turn the disclosure off (nor the reverse); one
    code approves both together, through the tool-named endpoint too."""
    box = make_mailbox(services, boot.account["id"], send_cap_hour=5)
    admin = api.client(minted_admin_key)
    url = f"/v1/mailboxes/{box['id']}"
    assert admin.patch(url, json={"send_cap_hour": 50}).status_code == 202
    cap_code = last_code(services)
    both = {"send_cap_hour": 50, "ai_disclosure": False}
    refused = admin.patch(url, json=both | {"approval_code": cap_code})
    _refused(refused, 403, "invalid_approval_code")
    assert admin.patch(url, json=both).status_code == 202
    both_code = last_code(services)
    for attempt in ({"ai_disclosure": False}, {"send_cap_hour": 50}):
        refused = admin.patch(url, json=attempt | {"approval_code": both_code})
        _refused(refused, 403, "invalid_approval_code")
    row = _row(services, box["id"])
    assert (row["send_cap_hour"], row["ai_disclosure"]) == (5, True)
    done = admin.post(
        "/update_mailbox", json={"mailbox_id": box["id"], **both, "approval_code": both_code}
    )
    assert done.status_code == 200, done.text
    row = _row(services, box["id"])
    assert (row["send_cap_hour"], row["ai_disclosure"]) == (50, False)
