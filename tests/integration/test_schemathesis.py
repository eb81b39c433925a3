"""API-6: schemathesis against the live server's own ``/openapi.json``.

Every operation gets a few generated requests with a valid agent key (and the admin key for
admin routes): no answer is a 5xx, and every answer that the schema describes matches it.
Bounded so the whole file runs in about a minute: a few examples per operation, a time
budget for the run, long-polls told not to wait, and only 127.0.0.1 is ever called.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from multimail.services import accounts
from multimail.services.context import Services
from multimail.testing.server import LiveServer

EXAMPLES_PER_OPERATION = 10
BUDGET_SECONDS = 60.0

# Public pages (HTML, link tokens) and endpoints that talk to the outside or wait on purpose
# are exercised by their own tests; the dashboard and /mcp are not in the schema.
SKIPPED_OPERATIONS = {
    ("DELETE", "/v1/account"),  # would close the account for every later operation
    ("POST", "/v1/webhooks/test"),  # posts to a caller-chosen URL
}


@pytest.fixture
def server(services: Services) -> Iterator[LiveServer]:
    with LiveServer(services) as live:
        yield live


def _key_for(path: str, method: str, boot: accounts.Bootstrap) -> str:
    admin_paths = (
        "/v1/api-keys",
        "/v1/webhooks",
        "/v1/webhook-deliveries",
        "/v1/domains",
        "/v1/export",
    )
    if path.startswith(admin_paths) or path.startswith("/v1/audit-log/") or method != "GET":
        return boot.admin_key
    return boot.agent_key


def _exercise(operation: Any, base_url: str, key: str) -> Callable[[], None]:
    """A Hypothesis test over one operation's generated cases."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def exercise(case: schemathesis.Case[Any]) -> None:
        if "wait" in operation.path:
            # Long-polls wait up to their timeout by design; ask for an immediate answer.
            case.query = {**(case.query or {}), "timeout": 0}
            if operation.method.upper() == "POST":
                body = case.body if isinstance(case.body, dict) else {}
                case.body = {**body, "timeout": 0}
        response = case.call(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    result: Callable[[], None] = exercise
    return result


def test_generated_requests_get_no_5xx_and_match_the_schema(
    server: LiveServer, boot: accounts.Bootstrap
) -> None:
    """schemathesis over every operation of /openapi.json: never a server error, and every
    response conforms to the documented schema for its status."""
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    deadline = time.monotonic() + BUDGET_SECONDS
    failures: list[str] = []
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        if (operation.method.upper(), operation.path) in SKIPPED_OPERATIONS:
            continue
        if time.monotonic() > deadline:
            break
        key = _key_for(operation.path, operation.method.upper(), boot)

        exercise = _exercise(operation, server.base_url, key)
        try:
            exercise()
            ran += 1
        except Exception as exc:  # collect every operation's failure, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:1500])
    assert ran > 50, f"only {ran} operations ran within the budget"
    assert not failures, "\n\n".join(failures)


def test_tool_routes_publish_their_arguments_as_the_request_body(server: LiveServer) -> None:
    """Generated clients (and the run above) see each tool's input model, nested models
    included, as ``POST /{tool}``'s JSON body."""
    document = httpx.get(f"{server.base_url}/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    body = document["paths"]["/send_email"]["post"]["requestBody"]
    properties = body["content"]["application/json"]["schema"]["properties"]
    assert {"to", "subject"} <= set(properties)
    text = str(document)
    refs = {ref.split("/")[-1] for ref in re.findall(r"#/components/schemas/[\w.-]+", text)}
    assert refs <= set(schemas), f"dangling references: {sorted(refs - set(schemas))}"
    for path, item in document["paths"].items():
        if path.count("/") == 1 and "post" in item and "tools" in item["post"].get("tags", []):
            assert "requestBody" in item["post"], path
