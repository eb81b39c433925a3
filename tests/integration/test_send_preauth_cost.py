"""What a send request may cost before its key is checked.

On SQLite small sends are parsed on the event loop before admission (the key lookup runs in
the send's own transaction). A caller with no valid key must not be able to buy event-loop
CPU with a long recipient list: such requests take the path that checks the key first, and
parsing is linear in the list.
"""

from __future__ import annotations

from multimail.services import sending
from multimail.services.context import Services
from tests.conftest import Api

MANY = 30_000


def _request(count: int) -> sending.SendRequest:
    return sending.SendRequest.model_validate(
        {"to": [f"u{i}@example.com" for i in range(count)], "subject": "s", "text": "hi"}
    )


def test_a_long_recipient_list_is_not_parsed_before_the_key_is_checked(
    services: Services,
) -> None:
    limit = services.settings.max_recipients
    assert sending.admits_in_shared_commit(services, _request(1)) == services.db.is_sqlite
    assert sending.admits_in_shared_commit(services, _request(limit)) == services.db.is_sqlite
    assert not sending.admits_in_shared_commit(services, _request(limit + 1))
    # A comma-separated string counts its addresses too.
    joined = sending.SendRequest.model_validate(
        {"to": ",".join(f"u{i}@example.com" for i in range(limit + 1)), "text": "hi"}
    )
    assert not sending.admits_in_shared_commit(services, joined)


def test_duplicate_addresses_collapse_in_first_seen_order() -> None:
    values = [f"U{i % 1000}@Example.com" for i in range(MANY)]
    parsed = sending._addresses(values, "to")
    assert parsed == [f"u{i}@example.com" for i in range(1000)]


def test_an_unknown_key_with_a_long_list_is_refused_as_unauthenticated(api: Api) -> None:
    bogus = api.client("mm_live_" + "x" * 40)
    body = {"to": [f"u{i}@example.com" for i in range(MANY)], "subject": "s", "text": "hi"}
    response = bogus.post("/v1/send", json=body)
    assert response.status_code == 401, response.text
