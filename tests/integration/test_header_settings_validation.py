"""Settings and ids the API accepts are ones the composer can write.

A mailbox display_name goes into every From header; the composer refuses a line break of any
kind (CR, LF, VT, FF, NEL, U+2028, ...), written out or in an encoded-word, so settings must
refuse the same text when it is set, not let every later send fail. A thread_id ending in a
newline is not "letters, digits and . _ : @ / + -".
"""

from __future__ import annotations

import pytest

from multimail.services import accounts
from tests.conftest import Api

BREAKS = ["\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def _mailbox(api: Api, boot: accounts.Bootstrap, mode: str = "gated_send") -> str:
    created = api.client(boot.admin_key).post(
        "/v1/mailboxes", json={"address_local_part": "desk", "oversight_mode": mode}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


@pytest.mark.parametrize("brk", BREAKS, ids=lambda c: f"U+{ord(c[-1]):04X}")
def test_a_display_name_with_any_line_break_is_refused_when_set(
    api: Api, boot: accounts.Bootstrap, brk: str
) -> None:
    admin = api.client(boot.admin_key)
    box = _mailbox(api, boot)
    for name in (f"Support{brk}Team", f"Support Team{brk}"):
        changed = admin.patch(f"/v1/mailboxes/{box}", json={"display_name": name})
        assert changed.status_code == 422, changed.text
        body = changed.json()
        assert body["code"] == "invalid_field"
        assert "line break" in body["error"]
    assert admin.get(f"/v1/mailboxes/{box}").json()["display_name"] in (None, "")


def test_a_display_name_with_a_break_inside_an_encoded_word_is_refused(
    api: Api, boot: accounts.Bootstrap
) -> None:
    """The composer decodes encoded-words before looking for breaks; settings do the same."""
    admin = api.client(boot.admin_key)
    created = admin.post(
        "/v1/mailboxes",
        json={"address_local_part": "enc", "display_name": "=?utf-8?q?Support=E2=80=A8Team?="},
    )
    assert created.status_code == 422, created.text
    assert created.json()["code"] == "invalid_field"


@pytest.mark.parametrize(
    "name",
    ["Support Team", "Équipe d\u2019assistance — Paris", "=?utf-8?q?Caf=C3=A9?=", "Ops\tDesk"],
)
def test_a_one_line_display_name_is_kept(api: Api, boot: accounts.Bootstrap, name: str) -> None:
    admin = api.client(boot.admin_key)
    box = _mailbox(api, boot)
    changed = admin.patch(f"/v1/mailboxes/{box}", json={"display_name": name})
    assert changed.status_code == 200, changed.text
    assert changed.json()["display_name"] == name


def test_a_signature_may_span_lines(api: Api, boot: accounts.Bootstrap) -> None:
    """The signature is body text: the composer normalises its line breaks, refuses none."""
    admin = api.client(boot.admin_key)
    box = _mailbox(api, boot)
    changed = admin.patch(f"/v1/mailboxes/{box}", json={"signature": "Desk\u2028Acme\r\nInc"})
    assert changed.status_code == 200, changed.text


@pytest.mark.parametrize("thread_id", ["zd-4711\n", "zd-4711\r\n", "\nzd-4711", "zd 4711"])
def test_a_thread_id_that_is_not_one_token_is_refused(
    api: Api, boot: accounts.Bootstrap, thread_id: str
) -> None:
    box = _mailbox(api, boot)
    sent = api.client(boot.agent_key).post(
        f"/v1/mailboxes/{box}/send",
        json={
            "to": "customer@example.com",
            "subject": "Hello",
            "markdown": "Hi",
            "thread_id": thread_id,
        },
    )
    assert sent.status_code == 422, sent.text
    assert sent.json()["code"] == "invalid_thread_id"


def test_a_plain_thread_id_is_accepted(api: Api, boot: accounts.Bootstrap) -> None:
    box = _mailbox(api, boot)
    sent = api.client(boot.agent_key).post(
        f"/v1/mailboxes/{box}/send",
        json={
            "to": "customer@example.com",
            "subject": "Hello",
            "markdown": "Hi",
            "thread_id": "zd-4711",
        },
    )
    assert sent.status_code == 202, sent.text
    assert sent.json()["thread_id"] == "zd-4711"
