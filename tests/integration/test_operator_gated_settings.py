"""Settings that loosen the operator's hold need the operator's approval_code (SPEC §2), live.

An admin key minted through the API (not the operator's own) raising or removing a send cap or
the daily quota, or pointing a mailbox's webhook_url somewhere new, gets ``202
approval_required`` and a mailed code; tightening applies at once. A code approves exactly the
set of gated changes it was issued for, no more and no fewer.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from multimail.services import accounts
from multimail.services.context import Services
from multimail.store.tables import accounts as account_table
from multimail.store.tables import approval_codes
from multimail.store.tables import mailboxes as mailbox_table
from tests.conftest import Api
from tests.integration.oversight_support import job_rows, last_code, make_mailbox

HOOK = "https://hooks.example.test/collect"


@pytest.fixture
def box(services: Services, boot: accounts.Bootstrap) -> dict[str, Any]:
    return make_mailbox(services, boot.account["id"], send_cap_hour=5)


def _row(services: Services, mailbox_id: str) -> dict[str, Any]:
    with services.db.read() as conn:
        query = select(mailbox_table).where(mailbox_table.c.id == mailbox_id)
        return dict(conn.execute(query).mappings().one())


def _codes_mailed(services: Services) -> int:
    return len(
        [j for j in job_rows(services, "system_mail") if j["payload"]["kind"] == "approval_code"]
    )


def _purposes(services: Services) -> list[str]:
    with services.db.read() as conn:
        query = select(approval_codes.c.purpose).order_by(approval_codes.c.id)
        return list(conn.execute(query).scalars())


def _asks(response: Any) -> None:
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "approval_required"
    assert response.json()["code"] == "approval_required"


def test_raising_or_removing_a_send_cap_needs_the_code_lowering_is_immediate(
    api: Api, services: Services, box: dict[str, Any], minted_admin_key: str
) -> None:
    """A raised or removed cap waits for the code (which then applies it); a lowered cap, or
    a cap set where there was none, applies at once without mailing anything."""
    admin = api.client(minted_admin_key)
    url = f"/v1/mailboxes/{box['id']}"
    _asks(admin.patch(url, json={"send_cap_hour": 50}))
    assert _row(services, box["id"])["send_cap_hour"] == 5
    assert _purposes(services) == ["mailbox_settings"]
    raised = admin.patch(url, json={"send_cap_hour": 50, "approval_code": last_code(services)})
    assert raised.status_code == 200, raised.text
    assert raised.json()["send_cap_hour"] == 50

    mailed = _codes_mailed(services)
    lowered = admin.patch(url, json={"send_cap_hour": 3, "send_cap_day": 20})
    assert lowered.status_code == 200, lowered.text
    assert (lowered.json()["send_cap_hour"], lowered.json()["send_cap_day"]) == (3, 20)
    assert admin.patch(url, json={"send_cap_day": 20}).status_code == 200, "unchanged"
    assert _codes_mailed(services) == mailed

    _asks(admin.patch(url, json={"send_cap_day": None}))
    assert _row(services, box["id"])["send_cap_day"] == 20
    removed = admin.patch(url, json={"send_cap_day": None, "approval_code": last_code(services)})
    assert removed.status_code == 200 and removed.json()["send_cap_day"] is None


def test_the_operators_own_key_lifts_a_cap_directly(
    api: Api, services: Services, boot: accounts.Bootstrap, box: dict[str, Any]
) -> None:
    """The operator acts directly: no code is mailed."""
    lifted = api.client(boot.admin_key).patch(
        f"/v1/mailboxes/{box['id']}", json={"send_cap_hour": None, "webhook_url": HOOK}
    )
    assert lifted.status_code == 200, lifted.text
    assert lifted.json()["send_cap_hour"] is None and lifted.json()["webhook_url"] == HOOK
    assert _codes_mailed(services) == 0


def test_a_new_webhook_url_needs_the_code_clearing_it_does_not(
    api: Api, services: Services, box: dict[str, Any], minted_admin_key: str
) -> None:
    """Setting or changing webhook_url is creating a webhook: 202, then the code applies it.
    Repeating the same URL changes nothing and asks nothing; clearing it is immediate."""
    admin = api.client(minted_admin_key)
    url = f"/v1/mailboxes/{box['id']}"
    _asks(admin.patch(url, json={"webhook_url": HOOK}))
    assert _row(services, box["id"])["webhook_url"] is None
    code = last_code(services)
    other = admin.patch(url, json={"webhook_url": HOOK + "/other", "approval_code": code})
    assert other.status_code == 403 and other.json()["code"] == "invalid_approval_code"
    done = admin.patch(url, json={"webhook_url": HOOK, "approval_code": code})
    assert done.status_code == 200 and done.json()["webhook_url"] == HOOK

    mailed = _codes_mailed(services)
    assert admin.patch(url, json={"webhook_url": HOOK}).status_code == 200
    assert _codes_mailed(services) == mailed
    _asks(admin.patch(url, json={"webhook_url": HOOK + "/elsewhere"}))
    assert _row(services, box["id"])["webhook_url"] == HOOK
    cleared = admin.patch(url, json={"webhook_url": None})
    assert cleared.status_code == 200 and cleared.json()["webhook_url"] is None


def test_a_code_approves_exactly_the_set_of_gated_changes_it_was_issued_for(
    api: Api, services: Services, box: dict[str, Any], minted_admin_key: str
) -> None:
    """A code for auto_cc + webhook_url does not apply either alone, nor the pair plus a
    lifted cap; the exact pair applies (an ungated tightening may ride along)."""
    admin = api.client(minted_admin_key)
    url = f"/v1/mailboxes/{box['id']}"
    pair = {"auto_cc": ["boss@example.org"], "webhook_url": HOOK}
    _asks(admin.patch(url, json=pair))
    code = last_code(services)
    for attempt in (
        {"webhook_url": HOOK},
        {"auto_cc": ["boss@example.org"]},
        pair | {"send_cap_hour": None},
    ):
        refused = admin.patch(url, json=attempt | {"approval_code": code})
        assert refused.status_code == 403, (attempt, refused.text)
        assert refused.json()["code"] == "invalid_approval_code"
    row = _row(services, box["id"])
    assert (row["auto_cc"], row["webhook_url"], row["send_cap_hour"]) == ([], None, 5)
    done = admin.patch(url, json=pair | {"send_cap_hour": 4, "approval_code": code})
    assert done.status_code == 200, done.text
    body = done.json()
    assert (body["auto_cc"], body["webhook_url"], body["send_cap_hour"]) == (
        ["boss@example.org"],
        HOOK,
        4,
    )


def test_a_copies_code_still_fits_its_own_change_but_carries_nothing_else(
    api: Api, services: Services, box: dict[str, Any], minted_admin_key: str
) -> None:
    """A change of auto_cc / auto_bcc alone keeps the purpose and parameters codes were issued
    with before (mailbox_copies), so such a code still applies that change; it no longer lets a
    webhook_url or a lifted cap through with it."""
    admin = api.client(minted_admin_key)
    url = f"/v1/mailboxes/{box['id']}"
    copies = {"auto_bcc": ["archive@example.org"]}
    _asks(admin.patch(url, json=copies))
    assert _purposes(services) == ["mailbox_copies"]
    code = last_code(services)
    for extra in ({"webhook_url": HOOK}, {"send_cap_hour": 500}):
        refused = admin.patch(url, json=copies | extra | {"approval_code": code})
        assert refused.status_code == 403, (extra, refused.text)
    done = admin.patch(url, json=copies | {"display_name": "Agent", "approval_code": code})
    assert done.status_code == 200, done.text
    assert done.json()["auto_bcc"] == ["archive@example.org"]
    row = _row(services, box["id"])
    assert (row["webhook_url"], row["send_cap_hour"]) == (None, 5)


def test_a_loosened_mode_is_refused_before_any_code_is_mailed(
    api: Api, services: Services, box: dict[str, Any], minted_admin_key: str
) -> None:
    """Loosening the mode has its own flow (request-upgrade): asked together with a gated
    field it answers 403 upgrade_requires_approval at once, and no code goes out for a
    request that could never complete."""
    response = api.client(minted_admin_key).patch(
        f"/v1/mailboxes/{box['id']}", json={"oversight_mode": "autonomous", "webhook_url": HOOK}
    )
    assert response.status_code == 403 and response.json()["code"] == "upgrade_requires_approval"
    assert _codes_mailed(services) == 0
    bad = api.client(minted_admin_key).patch(
        f"/v1/mailboxes/{box['id']}", json={"webhook_url": "ftp://x.example"}
    )
    assert bad.status_code == 422 and _codes_mailed(services) == 0


def test_reminder_and_expiry_settings_apply_at_once(
    api: Api, services: Services, box: dict[str, Any], minted_admin_key: str
) -> None:
    """approval_timeout_seconds / approval_expiry_seconds only decide when the operator is
    reminded and when a pending draft dies unsent, never whether mail passes the gate: no
    code."""
    changed = api.client(minted_admin_key).patch(
        f"/v1/mailboxes/{box['id']}",
        json={"approval_timeout_seconds": 7 * 86400, "approval_expiry_seconds": 14 * 86400},
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["approval_expiry_seconds"] == 14 * 86400
    assert _codes_mailed(services) == 0


def _quota(services: Services, account_id: str) -> int | None:
    with services.db.read() as conn:
        query = select(account_table.c.daily_send_quota).where(account_table.c.id == account_id)
        return conn.execute(query).scalar_one()  # type: ignore[no-any-return]


def test_raising_or_removing_the_daily_quota_needs_the_code_lowering_is_immediate(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """The account's daily_send_quota follows the caps' rule: set where none or lowered at
    once; raised or removed only with the operator's code."""
    admin = api.client(minted_admin_key)
    account_id = boot.account["id"]
    assert admin.patch("/v1/account", json={"daily_send_quota": 100}).status_code == 200
    assert admin.patch("/v1/account", json={"daily_send_quota": 40}).status_code == 200
    assert _quota(services, account_id) == 40 and _codes_mailed(services) == 0
    _asks(admin.patch("/v1/account", json={"daily_send_quota": 400}))
    assert _quota(services, account_id) == 40
    assert _purposes(services) == ["account_settings"]
    code = last_code(services)
    wrong = admin.patch("/v1/account", json={"daily_send_quota": 4000, "approval_code": code})
    assert wrong.status_code == 403 and wrong.json()["code"] == "invalid_approval_code"
    done = admin.patch("/v1/account", json={"daily_send_quota": 400, "approval_code": code})
    assert done.status_code == 200, done.text
    assert _quota(services, account_id) == 400
    _asks(admin.patch("/v1/account", json={"daily_send_quota": None}))
    assert _quota(services, account_id) == 400
    lifted = admin.patch(
        "/v1/account", json={"daily_send_quota": None, "approval_code": last_code(services)}
    )
    assert lifted.status_code == 200 and _quota(services, account_id) is None


def test_an_oversight_email_code_does_not_carry_a_quota_raise(
    api: Api, services: Services, boot: accounts.Bootstrap, minted_admin_key: str
) -> None:
    """oversight_email alone keeps its purpose (a code issued for it before still fits); with
    a quota raise in the same request it needs one code for both."""
    admin = api.client(minted_admin_key)
    with services.db.write() as conn:
        conn.execute(
            account_table.update()
            .where(account_table.c.id == boot.account["id"])
            .values(daily_send_quota=10)
        )
    email = {"oversight_email": "ops2@mm.test"}
    _asks(admin.patch("/v1/account", json=email))
    assert _purposes(services) == ["oversight_email"]
    code = last_code(services)
    both = email | {"daily_send_quota": 1000}
    refused = admin.patch("/v1/account", json=both | {"approval_code": code})
    assert refused.status_code == 403, refused.text
    assert _quota(services, boot.account["id"]) == 10
    _asks(admin.patch("/v1/account", json=both))
    assert _purposes(services)[-1] == "account_settings"
    done = admin.patch("/v1/account", json=both | {"approval_code": last_code(services)})
    assert done.status_code == 200, done.text
    assert done.json()["oversight_email"] == "ops2@mm.test"
    assert _quota(services, boot.account["id"]) == 1000
