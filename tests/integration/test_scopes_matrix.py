"""API-2: every route's exact scope, over the same route table as the BOLA matrix.

Four keys, each holding one scope, call every authenticated route (with ids that exist
nowhere, so nothing changes): a key without the route's scope gets 403
``insufficient_scope``; a key with it never does. Revocation holds on the very next request
on every route, tool-named ones included. (Hash-only storage and the first revocation check
are in test_foundation_api.py.)
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.routing import APIRoute

from multimail.api.app import create_app
from multimail.domain.scopes import ALL_SCOPES, Scope, satisfies
from multimail.ids import new_id
from multimail.services import accounts, keys
from multimail.services.context import Actor, Services
from multimail.testing.server import LiveServer
from multimail.tools.catalog import TOOLS, Tool
from tests.integration.test_bola_matrix import CASES, _call, _code, _walk, route_table

# Routes that authenticate any key and check the scope inside the service, because more
# than one scope may act (SPEC §2: the agent, a reviewer or the operator may cancel; the kill
# switch belongs to reviewers and the operator; decisions to reviewers only; an allowlist
# entry loosens the gate, so operator only). The admin key here is the operator's own.
CANCEL = frozenset({Scope.SEND, Scope.OVERSIGHT, Scope.ADMIN})
SERVICE_CHECKED: dict[tuple[str, str], frozenset[Scope]] = {
    ("POST", "/v1/mailboxes/{mailbox}/emails/{email_id}/cancel"): CANCEL,
    ("POST", "/v1/cancel/{email_id}"): CANCEL,
    ("POST", "/v1/oversight/decide"): frozenset({Scope.OVERSIGHT}),
    ("POST", "/v1/oversight/pause"): frozenset({Scope.OVERSIGHT, Scope.ADMIN}),
    ("POST", "/v1/oversight/resume"): frozenset({Scope.OVERSIGHT, Scope.ADMIN}),
    ("POST", "/v1/mailboxes/{mailbox}/allowlist"): frozenset({Scope.ADMIN}),
    ("DELETE", "/v1/mailboxes/{mailbox}/allowlist"): frozenset({Scope.ADMIN}),
    ("DELETE", "/v1/mailboxes/{mailbox}/allowlist/{entry}"): frozenset({Scope.ADMIN}),
}

# The promises of SPEC §1/§2 that must never drift, whatever the route code says.
PINNED: dict[tuple[str, str], frozenset[Scope]] = {
    ("POST", "/v1/mailboxes/{mailbox}/send"): frozenset({Scope.SEND}),
    ("POST", "/v1/send"): frozenset({Scope.SEND}),
    ("POST", "/v1/oversight/decide"): frozenset({Scope.OVERSIGHT}),
    ("POST", "/decide_email"): frozenset({Scope.OVERSIGHT}),
    ("POST", "/v1/mailboxes"): frozenset({Scope.ADMIN}),
    ("POST", "/v1/api-keys"): frozenset({Scope.ADMIN}),
    ("POST", "/v1/webhooks"): frozenset({Scope.ADMIN}),
    ("PATCH", "/v1/mailboxes/{mailbox}/configure"): frozenset({Scope.ADMIN}),
    ("POST", "/v1/inbound"): frozenset({Scope.ADMIN}),
}

# The catalogue (what MCP clients are told) asks for admin where the REST route lets any key
# with read *ask* for an upgrade or apply the operator's mailed code (the code is the
# operator's consent). Reported to the catalogue's owner; listed so any new drift fails.
CATALOGUE_DRIFT: set[str] = set()

_DEPENDENCY_SCOPE = {f"require_{scope.value}": scope for scope in Scope}


def _tool_target(tool: Tool) -> tuple[str, str]:
    return tool.route.method, tool.route.path.replace("{message_id}", "{email_id}")


def expected_scopes(services: Services) -> dict[tuple[str, str], frozenset[Scope]]:
    """Each route's accepted scopes: its REST dependency (or SERVICE_CHECKED); a tool-named
    route runs its REST route with the caller's key, so it accepts what that route accepts
    (every key, when the REST route is public)."""
    rest: dict[tuple[str, str], frozenset[Scope]] = {}
    app = create_app(services)
    tools = {f"/{tool.name}": tool for tool in TOOLS}
    tool_routes = []
    for route in _walk(app.routes):
        path = route.path_format  # as route_table names it: without convertors (":path")
        for method in route.methods or set():
            names = [getattr(d.call, "__name__", "") for d in route.dependant.dependencies]
            found = [_DEPENDENCY_SCOPE[n] for n in names if n in _DEPENDENCY_SCOPE]
            if found:
                rest[(method, path)] = frozenset(found)
            elif path in tools:
                tool_routes.append((method, path))
            elif (method, path) in SERVICE_CHECKED:
                rest[(method, path)] = SERVICE_CHECKED[(method, path)]
            else:
                rest[(method, path)] = ALL_SCOPES  # public
    for method, path in tool_routes:
        rest[(method, path)] = rest[_tool_target(tools[path])]
    table = route_table(app)
    return {route: scopes for route, scopes in rest.items() if route in table}


def accepts(needed: frozenset[Scope], held: Scope) -> bool:
    return any(satisfies([held], scope) for scope in needed)


@pytest.fixture
def single_scope_keys(services: Services, boot: accounts.Bootstrap) -> dict[Scope, str]:
    system = Actor(type="system", id=None, name="test", account_id=boot.account["id"])
    made = {}
    with services.db.write() as conn:
        for scope in Scope:
            created = keys.create_key(
                conn, actor=system, account_id=boot.account["id"], name=scope.value, scopes=[scope]
            )
            made[scope] = created.raw_key
    return made


@pytest.fixture
def live_app(services: Services) -> Iterator[LiveServer]:
    with LiveServer(services) as server:
        yield server


def _ghost_ids() -> dict[str, str]:
    ghost = {
        name: new_id(prefix)
        for name, prefix in {
            "mbx": "mbx",
            "msg": "msg",
            "inb": "msg",
            "thr": "thr",
            "con": "con",
            "key": "key",
            "whk": "whk",
            "dlv": "dlv",
            "dom": "dom",
            "alw": "alw",
        }.items()
    }
    return {**ghost, "addr": "ghost@mm.test", "sup": "ghost@example.org"}


def test_pinned_scopes_match_the_route_table(services: Services) -> None:
    """The scopes SPEC §1/§2 fixes (send to send, decide to oversight, gate-loosening and
    key/webhook/mailbox creation to admin) are what the routes declare, and the catalogue
    names the same scope as the REST route each tool runs (known drift listed)."""
    expected = expected_scopes(services)
    for route, scopes in PINNED.items():
        assert expected[route] == scopes, route
    drift = {
        tool.name
        for tool in TOOLS
        if _tool_target(tool) in expected and tool.scope not in expected[_tool_target(tool)]
    }
    assert drift == CATALOGUE_DRIFT


def test_each_route_refuses_keys_without_its_scope(
    services: Services, live_app: LiveServer, single_scope_keys: dict[Scope, str]
) -> None:
    """A key lacking the route's scope gets 403 insufficient_scope on every route; a key with
    it is never refused for scope."""
    expected = expected_scopes(services)
    ghost = _ghost_ids()
    failures = []
    for scope, raw in single_scope_keys.items():
        headers = {"Authorization": f"Bearer {raw}"}
        with httpx.Client(base_url=live_app.base_url, headers=headers, timeout=30) as client:
            for (method, path), case in CASES.items():
                if (method, path) == ("DELETE", "/v1/account"):
                    continue  # the admin key would close the account for the next keys
                response = _call(client, method, path, case, ghost)
                code = _code(response)
                refused = response.status_code == 403 and code == "insufficient_scope"
                allowed = accepts(expected[(method, path)], scope)
                if allowed == refused:
                    failures.append(
                        f"{scope.value} key, {method} {path} (needs "
                        f"{sorted(s.value for s in expected[(method, path)])}): "
                        f"{response.status_code} {code}"
                    )
    assert not failures, "\n".join(failures)


def test_revoked_key_is_refused_on_every_route_at_once(
    services: Services, live_app: LiveServer, boot: accounts.Bootstrap
) -> None:
    """After revocation the very next request fails with 401 api_key_revoked on every
    authenticated route, REST and tool-named alike: no route keeps a cached identity."""
    admin = httpx.Client(
        base_url=live_app.base_url, headers={"Authorization": f"Bearer {boot.admin_key}"}
    )
    with admin:
        created = admin.post(
            "/v1/api-keys", json={"name": "short-lived", "scopes": ["send", "read"]}
        ).json()
        headers = {"Authorization": f"Bearer {created['key']}"}
        with httpx.Client(base_url=live_app.base_url, headers=headers, timeout=30) as agent:
            assert agent.get("/v1/mailboxes").status_code == 200
            assert agent.get("/list_mailboxes").status_code == 200
            assert admin.delete(f"/v1/api-keys/{created['id']}").status_code == 200
            ghost = _ghost_ids()
            expected = expected_scopes(services)
            failures = []
            for (method, path), case in CASES.items():
                if expected[(method, path)] == ALL_SCOPES:
                    continue  # a tool over a public route (search_identity) needs no key
                response = _call(agent, method, path, case, ghost)
                if (response.status_code, _code(response)) != (401, "api_key_revoked"):
                    failures.append(
                        f"{method} {path}: {response.status_code} {response.text[:150]}"
                    )
            assert not failures, "\n".join(failures)


def test_route_table_walk_sees_every_api_route(services: Services) -> None:
    """The walk behind both matrices finds routes inside included routers (FastAPI no longer
    flattens them): the REST surface of SPEC §5.1 is there."""
    app = create_app(services)
    paths = {route.path for route in _walk(app.routes) if isinstance(route, APIRoute)}
    for path in ("/v1/mailboxes/{mailbox}/send", "/v1/oversight/decide", "/v1/audit-log"):
        assert path in paths
