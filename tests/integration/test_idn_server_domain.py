"""A server whose own domain is set in its Unicode form (MULTIMAIL_DOMAIN=bücher.test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from multimail.config import Settings
from multimail.runtime import build_services
from multimail.services import accounts, keys, mailboxes
from multimail.services.context import Actor, Services


@pytest.fixture
def idn_services(settings: Settings) -> Iterator[Services]:
    # Validated again, as the environment's value would be: model_copy would skip it.
    unicode_domain = Settings(**{**settings.model_dump(), "domain": "bücher.test"})
    svc = build_services(unicode_domain, run_migrations=False)
    yield svc
    svc.db.dispose()


def test_mailboxes_on_a_unicode_server_domain_can_be_made_in_either_form(
    idn_services: Services,
) -> None:
    """Found by review: the setting was compared as written with the A-labels addresses are
    normalised to, so even the server's own domain answered domain_not_owned."""
    boot = accounts.bootstrap(idn_services.db, account_name="Acme", operator_email="ops@x.test")
    admin = keys.authenticate(idn_services.db, boot.admin_key)
    assert isinstance(admin, Actor)
    with idn_services.db.write() as conn:
        made = [
            mailboxes.create_mailbox(
                conn, actor=admin, settings=idn_services.settings, address=address
            )
            for address in ("bot@bücher.test", "desk@xn--bcher-kva.test")
        ]
    assert [m["address"] for m in made] == ["bot@xn--bcher-kva.test", "desk@xn--bcher-kva.test"]
