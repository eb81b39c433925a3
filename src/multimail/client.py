"""The Python client: ``MultimailClient`` and ``AsyncMultimailClient``, one method per tool.

::

    from multimail import MultimailClient

    client = MultimailClient(api_key="mm_live_…")        # or env MULTIMAIL_API_KEY
    sent = client.send_email(from_="agent@acme.example", to="ana@example.com",
                             subject="Hello", body="…")
    client.list_pending()["messages"]

Each method is a tool of :mod:`multimail.tools.catalog` and runs that tool's plan
(:mod:`multimail.tools.execute`), the same code the MCP server and the tool-named HTTP routes
run. Errors are typed::

    MultimailAPIError                 (.status, .code, .message, .body, .headers)
    ├── AuthenticationError           401
    ├── PermissionDeniedError         403
    ├── NotFoundError                 404
    ├── ConflictError                 409
    ├── ValidationError               400 / 413 / 422 (also raised before sending)
    ├── RateLimitError                429 (.retry_after seconds)
    ├── ServerError                   5xx
    └── APIConnectionError            the server could not be reached

Only idempotent calls are retried (GETs, and calls carrying an ``idempotency_key``), on 429,
5xx and connection errors, with exponential backoff that honours ``Retry-After``.

``timeout`` (30 s by default) bounds each request, except that a long poll
(``wait_for_email``) may also take as long as the wait it asked the server for.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import httpx

from multimail import __version__
from multimail.errors import MultimailError
from multimail.tools import catalog
from multimail.tools.execute import Plan, RestCall, RestResponse, plan
from multimail.tools.inputs import GateTiming, Mode

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
_MAX_BACKOFF = 30.0


class MultimailAPIError(Exception):
    """The server (or the client's own validation) refused a call; ``message`` says why."""

    def __init__(
        self,
        status: int,
        body: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body: dict[str, Any] = dict(body or {})
        self.code: str = str(self.body.get("code") or "error")
        self.message: str = str(self.body.get("error") or f"HTTP {status}")
        # The error answer's headers (RateLimit-*, Retry-After …); none when the client
        # refused the call itself or never reached the server.
        self.headers = httpx.Headers(headers or {})
        super().__init__(f"{self.message} (HTTP {status}, code {self.code})")


class AuthenticationError(MultimailAPIError):
    pass


class PermissionDeniedError(MultimailAPIError):
    pass


class NotFoundError(MultimailAPIError):
    pass


class ConflictError(MultimailAPIError):
    pass


class ValidationError(MultimailAPIError):
    pass


class RateLimitError(MultimailAPIError):
    def __init__(
        self,
        status: int,
        body: Mapping[str, Any] | None = None,
        retry_after: float = 1.0,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, body, headers=headers)
        self.retry_after = retry_after


class ServerError(MultimailAPIError):
    pass


class APIConnectionError(MultimailAPIError):
    pass


_BY_STATUS: dict[int, type[MultimailAPIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,
    422: ValidationError,
}


def _retry_after(headers: Mapping[str, str], body: Mapping[str, Any]) -> float:
    for value in (headers.get("retry-after"), body.get("retry_after")):
        try:
            return max(0.0, float(str(value)))
        except (TypeError, ValueError):
            continue
    return 1.0


def error_for(
    status: int, body: Any, headers: Mapping[str, str] | None = None
) -> MultimailAPIError:
    """The typed exception for an error answer."""
    data = body if isinstance(body, dict) else {"error": str(body or f"HTTP {status}")}
    if status == 429:
        return RateLimitError(status, data, _retry_after(headers or {}, data), headers=headers)
    if status >= 500:
        return ServerError(status, data, headers=headers)
    return _BY_STATUS.get(status, MultimailAPIError)(status, data, headers=headers)


def _from_local(exc: MultimailError) -> MultimailAPIError:
    """Validation done before sending fails exactly like the server's would."""
    return error_for(exc.status, exc.to_dict())


def _retryable(call: RestCall) -> bool:
    return call.method == "GET" or (
        isinstance(call.json, dict) and bool(call.json.get("idempotency_key"))
    )


def _backoff(attempt: int, error: MultimailAPIError | None) -> float:
    if isinstance(error, RateLimitError):
        return min(error.retry_after, _MAX_BACKOFF)
    return min(0.25 * 2.0**attempt, _MAX_BACKOFF) * (0.5 + random.random() / 2)


def _tool_args(values: Mapping[str, Any]) -> dict[str, Any]:
    """A method's keyword arguments as tool arguments (``from_`` is ``from``)."""
    out = {k: v for k, v in values.items() if k != "self" and v is not None}
    if "from_" in out:
        out["from"] = out.pop("from_")
    return out


@dataclass(frozen=True)
class ToolAnswer:
    """A tool's result with the status and headers of the REST answer it came from (202,
    RateLimit-* …): what the tool-named routes answer their own caller."""

    result: Any
    status: int
    headers: Mapping[str, str]


R = TypeVar("R")


class _Config:
    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        mailbox_id: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 2,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if headers is None and api_key is None:
            api_key = os.environ.get("MULTIMAIL_API_KEY")
        self.base_url = (
            base_url or os.environ.get("MULTIMAIL_API_URL") or DEFAULT_BASE_URL
        ).rstrip("/")
        # The guides' base URLs end in /v1; our paths carry their own prefix.
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        # None: MULTIMAIL_MAILBOX_ID, as the stdio MCP server and scripts want; "" (the
        # server's own in-process client): no default, whatever this process's environment.
        if mailbox_id is None:
            mailbox_id = os.environ.get("MULTIMAIL_MAILBOX_ID")
        self.mailbox_id = mailbox_id or None
        self.timeout = timeout
        self.max_retries = max_retries
        self._headers = {"User-Agent": f"multimail-python/{__version__}", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._transport = transport

    def _timeout(self, call: RestCall) -> httpx.Timeout:
        """``timeout`` for the call, plus, for a long poll, the wait the server may hold it:
        nothing arrives before the wait is over, so reading may take that much longer."""
        if call.wait is None:
            return httpx.Timeout(self.timeout)
        return httpx.Timeout(self.timeout, read=self.timeout + call.wait)

    def _answer(self, call: RestCall, response: httpx.Response) -> RestResponse:
        if response.status_code >= 400 and not (call.probe and response.status_code == 404):
            try:
                body = response.json()
            except ValueError:
                body = {"error": response.text[:500] or f"HTTP {response.status_code}"}
            raise error_for(response.status_code, body, response.headers)
        data: Any = None
        if not call.raw and response.content:
            try:
                data = response.json()
            except ValueError:
                data = {"text": response.text}
        return RestResponse(response.status_code, data, response.content, response.headers)


class _Tools(Generic[R]):
    """One method per tool of the catalogue (a test keeps them identical to it)."""

    def _tool(self, name: str, values: Mapping[str, Any]) -> R:
        raise NotImplementedError

    def list_mailboxes(self) -> R:
        """The mailboxes this key can use, with address, display_name and oversight_mode."""
        return self._tool("list_mailboxes", locals())

    def create_mailbox(
        self,
        *,
        display_name: str | None = None,
        oversight_mode: Mode | None = None,
        gate_timing: GateTiming | None = None,
        signature: str | None = None,
        auto_cc: list[str] | None = None,
        auto_bcc: list[str] | None = None,
        webhook_url: str | None = None,
        ai_disclosure: bool | None = None,
        approval_timeout_seconds: int | None = None,
        approval_expiry_seconds: int | None = None,
        send_cap_hour: int | None = None,
        send_cap_day: int | None = None,
        metadata: dict[str, Any] | None = None,
        approval_code: str | None = None,
        address: str | None = None,
        address_local_part: str | None = None,
    ) -> R:
        """Create a mailbox (address or address_local_part on the server's domain)."""
        return self._tool("create_mailbox", locals())

    def configure_mailbox(
        self,
        *,
        display_name: str | None = None,
        oversight_mode: Mode | None = None,
        gate_timing: GateTiming | None = None,
        signature: str | None = None,
        auto_cc: list[str] | None = None,
        auto_bcc: list[str] | None = None,
        webhook_url: str | None = None,
        ai_disclosure: bool | None = None,
        approval_timeout_seconds: int | None = None,
        approval_expiry_seconds: int | None = None,
        send_cap_hour: int | None = None,
        send_cap_day: int | None = None,
        metadata: dict[str, Any] | None = None,
        approval_code: str | None = None,
        mailbox_id: str | None = None,
    ) -> R:
        """Change a mailbox's oversight mode (tightening is immediate; loosening needs
        request_upgrade), gate timing, auto_cc/auto_bcc, signature.

        Asked by an API key, some changes answer ``approval_required`` and apply once called
        again with the operator's ``approval_code``: auto_cc/auto_bcc, a new webhook_url,
        raising or removing a send cap, turning ai_disclosure off. Tightening is immediate.
        """
        return self._tool("configure_mailbox", locals())

    def update_mailbox(
        self,
        *,
        display_name: str | None = None,
        oversight_mode: Mode | None = None,
        gate_timing: GateTiming | None = None,
        signature: str | None = None,
        auto_cc: list[str] | None = None,
        auto_bcc: list[str] | None = None,
        webhook_url: str | None = None,
        ai_disclosure: bool | None = None,
        approval_timeout_seconds: int | None = None,
        approval_expiry_seconds: int | None = None,
        send_cap_hour: int | None = None,
        send_cap_day: int | None = None,
        metadata: dict[str, Any] | None = None,
        approval_code: str | None = None,
        mailbox_id: str | None = None,
    ) -> R:
        """Change a mailbox's settings (display name, signature, webhook_url, limits).

        Asked by an API key, some changes answer ``approval_required`` and apply once called
        again with the operator's ``approval_code``: auto_cc/auto_bcc, a new webhook_url,
        raising or removing a send cap, turning ai_disclosure off. Tightening is immediate.
        """
        return self._tool("update_mailbox", locals())

    def delete_mailbox(self, *, mailbox_id: str | None = None) -> R:
        """Delete a mailbox: it stops sending and receiving."""
        return self._tool("delete_mailbox", locals())

    def request_upgrade(self, *, target_mode: Mode, mailbox_id: str | None = None) -> R:
        """Ask the operator to loosen a mailbox's oversight mode: a one-time code is mailed to the
        operator, who gives it to apply_upgrade.
        """
        return self._tool("request_upgrade", locals())

    def apply_upgrade(self, *, code: str, mailbox_id: str | None = None) -> R:
        """Loosen a mailbox's mode with the operator's one-time code."""
        return self._tool("apply_upgrade", locals())

    def send_email(
        self,
        *,
        to: str | list[str] | None = None,
        cc: str | list[str] | None = None,
        bcc: str | list[str] | None = None,
        reply_to: str | list[str] | None = None,
        subject: str | None = None,
        markdown: str | None = None,
        body: str | None = None,
        text: str | None = None,
        html: str | None = None,
        attachments: list[dict[str, Any]] | None = None,
        idempotency_key: str | None = None,
        send_at: str | None = None,
        gate_timing: GateTiming | None = None,
        oversight_mode: Mode | None = None,
        thread_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        from_: str | None = None,
        mailbox_id: str | None = None,
    ) -> R:
        """Send a new email from a mailbox (choose it with from or mailbox_id)."""
        return self._tool("send_email", locals())

    def schedule_email(
        self,
        *,
        send_at: str,
        to: str | list[str] | None = None,
        cc: str | list[str] | None = None,
        bcc: str | list[str] | None = None,
        reply_to: str | list[str] | None = None,
        subject: str | None = None,
        markdown: str | None = None,
        body: str | None = None,
        text: str | None = None,
        html: str | None = None,
        attachments: list[dict[str, Any]] | None = None,
        idempotency_key: str | None = None,
        gate_timing: GateTiming | None = None,
        oversight_mode: Mode | None = None,
        thread_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        from_: str | None = None,
        mailbox_id: str | None = None,
    ) -> R:
        """Like send_email with a required send_at (ISO 8601 UTC)."""
        return self._tool("schedule_email", locals())

    def edit_scheduled_email(
        self,
        *,
        message_id: str | None = None,
        email_id: str | None = None,
        mailbox_id: str | None = None,
        send_at: str | None = None,
        to: str | list[str] | None = None,
        cc: str | list[str] | None = None,
        bcc: str | list[str] | None = None,
        subject: str | None = None,
        markdown: str | None = None,
        body: str | None = None,
        text: str | None = None,
        html: str | None = None,
    ) -> R:
        """Change a scheduled or still-pending message's time, recipients, subject or body."""
        return self._tool("edit_scheduled_email", locals())

    def reply_email(
        self,
        *,
        to: str | list[str] | None = None,
        cc: str | list[str] | None = None,
        bcc: str | list[str] | None = None,
        reply_to: str | list[str] | None = None,
        subject: str | None = None,
        markdown: str | None = None,
        body: str | None = None,
        text: str | None = None,
        html: str | None = None,
        attachments: list[dict[str, Any]] | None = None,
        idempotency_key: str | None = None,
        send_at: str | None = None,
        gate_timing: GateTiming | None = None,
        oversight_mode: Mode | None = None,
        thread_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        from_: str | None = None,
        mailbox_id: str | None = None,
        message_id: str | None = None,
        email_id: str | None = None,
    ) -> R:
        """Reply in the thread of message_id (In-Reply-To and References are set for you).

        The reply comes from the mailbox named by from or mailbox_id, else from the mailbox of
        the message answered.
        """
        return self._tool("reply_email", locals())

    def cancel_message(
        self,
        *,
        message_id: str | None = None,
        email_id: str | None = None,
        mailbox_id: str | None = None,
        reason: str | None = None,
    ) -> R:
        """Cancel a message that is still waiting (pending approval, scanning or scheduled)."""
        return self._tool("cancel_message", locals())

    def check_inbox(
        self,
        *,
        mailbox_id: str | None = None,
        filter: str | None = None,
        status: str | None = None,
        sender: str | None = None,
        subject_contains: str | None = None,
        date_after: str | None = None,
        date_before: str | None = None,
        direction: Literal["inbound", "outbound"] | None = None,
        has_attachments: bool | None = None,
        since_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        offset: int | None = None,
    ) -> R:
        """List a mailbox's messages, newest first, with filters (status/filter e.g."""
        return self._tool("check_inbox", locals())

    def read_email(
        self,
        *,
        message_id: str | None = None,
        email_id: str | None = None,
        mailbox_id: str | None = None,
    ) -> R:
        """One message with its trusted metadata (from, to, subject, status, delivered_at, decision
        with reviewer, dkim_verified, auth_results, tags, attachments) and its body.
        """
        return self._tool("read_email", locals())

    def get_thread(self, *, thread_id: str, mailbox_id: str | None = None) -> R:
        """A conversation in order: messages with direction, status, from, to, subject, date and
        body_text, plus participants, message_count, last_activity and unanswered.
        """
        return self._tool("get_thread", locals())

    def download_attachment(
        self,
        *,
        filename: str,
        message_id: str | None = None,
        email_id: str | None = None,
        mailbox_id: str | None = None,
    ) -> R:
        """An attachment's bytes as {filename, content_type, size_bytes, content_base64}."""
        return self._tool("download_attachment", locals())

    def tag_email(
        self,
        *,
        tags: list[str] | dict[str, str],
        message_id: str | None = None,
        email_id: str | None = None,
        mailbox_id: str | None = None,
    ) -> R:
        """Add tags to a message: labels or key-value pairs, merged into its existing tags."""
        return self._tool("tag_email", locals())

    def wait_for_email(
        self,
        *,
        mailbox_id: str | None = None,
        timeout: float | None = None,
        since_id: str | None = None,
    ) -> R:
        """Wait up to timeout seconds (≤ 120) for a new message; returns as soon as one arrives."""
        return self._tool("wait_for_email", locals())

    def list_pending(
        self, *, mailbox_id: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> R:
        """The oversight queue: drafts waiting for a human decision, newest first, each with
        draft_body, scan_findings and thread context.
        """
        return self._tool("list_pending", locals())

    def decide_email(
        self,
        *,
        message_id: str | None = None,
        email_id: str | None = None,
        mailbox_id: str | None = None,
        decision: Literal["approve", "reject"] | None = None,
        action: Literal["approve", "reject"] | None = None,
        reason: str | None = None,
        note: str | None = None,
        rejection_note: str | None = None,
        reviewer: str | None = None,
        revised_body: str | None = None,
        revised_markdown: str | None = None,
        revised_subject: str | None = None,
        draft_digest: str | None = None,
    ) -> R:
        """A human reviewer's decision (needs an oversight key; the agent that wrote a message never
        approves it). ``draft_digest`` (from the pending queue) makes an approval cover only the
        version reviewed.
        """
        return self._tool("decide_email", locals())

    def get_account(self) -> R:
        """The account: name, plan, quotas, sending status."""
        return self._tool("get_account", locals())

    def update_account(
        self,
        *,
        name: str | None = None,
        oversight_email: str | None = None,
        postal_address: str | None = None,
        daily_send_quota: int | None = None,
        approval_code: str | None = None,
    ) -> R:
        """Change the account's name, oversight_email, postal address or daily quota.

        Asked by an API key, changing oversight_email and raising or removing the daily quota
        answer ``approval_required`` and apply once called again with the operator's
        ``approval_code``; oversight_email must be an address the operator reads outside
        MultiMail (not a mailbox hosted here).
        """
        return self._tool("update_account", locals())

    def get_usage(self, *, period: Literal["summary", "daily"] | None = None) -> R:
        """Messages sent and received, storage and limits."""
        return self._tool("get_usage", locals())

    def report_spam(
        self,
        *,
        message_id: str | None = None,
        email_id: str | None = None,
        mailbox_id: str | None = None,
    ) -> R:
        """Mark a received message as spam."""
        return self._tool("report_spam", locals())

    def not_spam(
        self,
        *,
        message_id: str | None = None,
        email_id: str | None = None,
        mailbox_id: str | None = None,
    ) -> R:
        """Release a message from the spam quarantine to the inbox."""
        return self._tool("not_spam", locals())

    def list_spam(
        self, *, mailbox_id: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> R:
        """Messages held as spam."""
        return self._tool("list_spam", locals())

    def add_contact(
        self,
        *,
        email: str,
        name: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
    ) -> R:
        """Add an address-book entry (email, name, tags)."""
        return self._tool("add_contact", locals())

    def search_contacts(
        self,
        *,
        q: str | None = None,
        tag: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        offset: int | None = None,
    ) -> R:
        """Contacts whose name or email contains q, or with a tag."""
        return self._tool("search_contacts", locals())

    def delete_contact(self, *, contact_id: str) -> R:
        """Remove an address-book entry."""
        return self._tool("delete_contact", locals())

    def check_suppression(self, *, address: str) -> R:
        """Whether an address must not receive mail (bounced, complained, unsubscribed) and why."""
        return self._tool("check_suppression", locals())

    def remove_suppression(self, *, address: str) -> R:
        """Allow mail to a suppressed address again (operator decision)."""
        return self._tool("remove_suppression", locals())

    def list_api_keys(self, *, limit: int | None = None, cursor: str | None = None) -> R:
        """The account's API keys (never their secrets)."""
        return self._tool("list_api_keys", locals())

    def create_api_key(
        self,
        *,
        name: str,
        scopes: list[Literal["read", "send", "oversight", "admin"]],
        mode: Literal["live", "test"] | None = None,
        mailbox_ids: list[str] | None = None,
        send_cap_hour: int | None = None,
        send_cap_day: int | None = None,
        approval_code: str | None = None,
    ) -> R:
        """Create a key with scopes (send and oversight never together)."""
        return self._tool("create_api_key", locals())

    def revoke_api_key(self, *, key_id: str, approval_code: str | None = None) -> R:
        """Revoke a key: refused from its next request. Another key than this one or one it
        created may answer ``approval_required``: repeat with the operator's code."""
        return self._tool("revoke_api_key", locals())

    def get_audit_log(
        self,
        *,
        actor_id: str | None = None,
        action: str | None = None,
        mailbox_id: str | None = None,
        subject_id: str | None = None,
        date_after: str | None = None,
        date_before: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> R:
        """Audit entries, newest first, filtered by actor, action, mailbox, subject (e.g."""
        return self._tool("get_audit_log", locals())

    def create_webhook(
        self,
        *,
        events: list[str],
        url: str | None = None,
        endpoint: str | None = None,
        mailbox_id: str | None = None,
        description: str | None = None,
        approval_code: str | None = None,
    ) -> R:
        """Subscribe an https endpoint to events (e.g."""
        return self._tool("create_webhook", locals())

    def list_webhooks(self) -> R:
        """The account's webhook subscriptions (without secrets)."""
        return self._tool("list_webhooks", locals())

    def delete_webhook(self, *, webhook_id: str) -> R:
        """Remove a webhook subscription."""
        return self._tool("delete_webhook", locals())

    def search_identity(self, *, address: str) -> R:
        """The public identity document of an address on this server: operator, oversight mode and
        signing keys, to check who stands behind a sender.
        """
        return self._tool("search_identity", locals())

    def verify_message(self, *, raw: str | None = None, raw_base64: str | None = None) -> R:
        """Check a raw email's DKIM signature and MultiMail identity token."""
        return self._tool("verify_message", locals())


class MultimailClient(_Config, _Tools[dict[str, Any]]):
    """Synchronous client. ``api_key`` defaults to env MULTIMAIL_API_KEY, ``base_url`` to env
    MULTIMAIL_API_URL or http://127.0.0.1:8000, ``mailbox_id`` to env MULTIMAIL_MAILBOX_ID."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, **kw: Any) -> None:
        super().__init__(api_key, base_url, **kw)
        transport = self._transport if isinstance(self._transport, httpx.BaseTransport) else None
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.timeout,
            transport=transport,
            trust_env=transport is None,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MultimailClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run any tool of the catalogue by name with its arguments."""
        try:
            steps = plan(catalog.get(name), arguments, default_mailbox=self.mailbox_id)
            return self._drive(steps)
        except MultimailError as exc:
            raise _from_local(exc) from None

    def _tool(self, name: str, values: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call_tool(name, _tool_args(values))
        return result

    def _drive(self, steps: Plan) -> Any:
        try:
            call = next(steps)
            while True:
                call = steps.send(self._send(call))
        except StopIteration as done:
            return done.value

    def _send(self, call: RestCall) -> RestResponse:
        attempt = 0
        while True:
            error: MultimailAPIError
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    timeout=self._timeout(call),
                )
                return self._answer(call, response)
            except (RateLimitError, ServerError) as exc:
                error = exc
            except httpx.TransportError as exc:
                error = APIConnectionError(0, {"error": f"cannot reach {self.base_url}: {exc}"})
            if not _retryable(call) or attempt >= self.max_retries:
                raise error
            time.sleep(_backoff(attempt, error))
            attempt += 1


class AsyncMultimailClient(_Config, _Tools[Awaitable[dict[str, Any]]]):
    """The same client for asyncio: every tool method is a coroutine."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, **kw: Any) -> None:
        super().__init__(api_key, base_url, **kw)
        transport = (
            self._transport if isinstance(self._transport, httpx.AsyncBaseTransport) else None
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.timeout,
            transport=transport,
            trust_env=transport is None,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMultimailClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run any tool of the catalogue by name with its arguments."""
        return (await self.answer_tool(name, arguments)).result

    async def answer_tool(
        self, name: str, arguments: Mapping[str, Any] | None = None
    ) -> ToolAnswer:
        """The tool's result with the status and headers of the REST answer it came from."""
        try:
            steps = plan(catalog.get(name), arguments, default_mailbox=self.mailbox_id)
            return await self._drive(steps)
        except MultimailError as exc:
            raise _from_local(exc) from None

    async def _call(self, name: str, values: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call_tool(name, _tool_args(values))
        return result

    def _tool(self, name: str, values: Mapping[str, Any]) -> Awaitable[dict[str, Any]]:
        return self._call(name, values)

    async def _drive(self, steps: Plan) -> ToolAnswer:
        answer = RestResponse(200)
        try:
            call = next(steps)
            while True:
                answer = await self._send(call)
                call = steps.send(answer)
        except StopIteration as done:
            return ToolAnswer(done.value, answer.status, answer.headers)

    async def _send(self, call: RestCall) -> RestResponse:
        attempt = 0
        while True:
            error: MultimailAPIError
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    timeout=self._timeout(call),
                )
                return self._answer(call, response)
            except (RateLimitError, ServerError) as exc:
                error = exc
            except httpx.TransportError as exc:
                error = APIConnectionError(0, {"error": f"cannot reach {self.base_url}: {exc}"})
            if not _retryable(call) or attempt >= self.max_retries:
                raise error
            await asyncio.sleep(_backoff(attempt, error))
            attempt += 1


__all__ = [
    "APIConnectionError",
    "AsyncMultimailClient",
    "AuthenticationError",
    "ConflictError",
    "MultimailAPIError",
    "MultimailClient",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "ValidationError",
]
