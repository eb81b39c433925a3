"""The arguments of each tool, as pydantic models: the JSON schema agents see, and validation.

Field names are the SPEC §5.2 names. Where clients in the wild use several names for one
thing (``body``/``text``/``markdown``, ``message_id``/``email_id``), each name is its own
field so the schema shows all of them honestly; ``merged()`` folds them into the one value the
REST API takes. ``from``/``mailbox_id`` are two selectors of the sending mailbox rather than
two spellings of one value: the REST API judges whether they agree (see ``FromMailbox``).
Unknown arguments are refused: an agent cannot slip ``status: "approved"`` past the gate by
adding a field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from multimail.errors import InvalidInput

Mode = Literal["read_only", "gated_all", "gated_send", "monitored", "autonomous"]
GateTiming = Literal["gate_first", "schedule_first"]

# The longest wait_for_email may hold (the REST route's own bound, services.inbox).
MAX_WAIT_SECONDS = 120.0

_MAILBOX = "The mailbox: its id (mbx_…) or its address. Optional when the key sees one mailbox."
_CURSOR = "The next_cursor of the previous page, for the page after it."
_MESSAGE = "The message id (msg_…), as returned by send_email, check_inbox or list_pending."


class ToolInput(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def merged(self) -> dict[str, Any]:
        """The arguments with aliases folded, ``None`` dropped, in REST API names."""
        return self.model_dump(exclude_none=True, by_alias=True)


def _first(data: dict[str, Any], target: str, *names: str) -> None:
    """Move the first given of ``names`` into ``target``; two different values are an error."""
    given = {n: data.pop(n) for n in names if data.get(n) is not None}
    values = list(given.values())
    if any(v != values[0] for v in values[1:]):
        raise InvalidInput(
            f"give only one of {', '.join(repr(n) for n in given)}: they mean the same thing",
            code="conflicting_aliases",
        )
    if values:
        data[target] = values[0]
    else:
        data.pop(target, None)


class NoArgs(ToolInput):
    pass


class MailboxArg(ToolInput):
    mailbox_id: str | None = Field(None, max_length=320, description=_MAILBOX)


class MessageArg(ToolInput):
    message_id: str | None = Field(None, max_length=998, description=_MESSAGE)
    email_id: str | None = Field(None, max_length=998, description="Same as message_id.")
    mailbox_id: str | None = Field(
        None, max_length=320, description="The message's mailbox (id or address); optional."
    )

    @model_validator(mode="after")
    def _needs_message(self) -> MessageArg:
        if not (self.message_id or self.email_id):
            raise ValueError("give message_id (or its alias email_id)")
        if self.message_id and self.email_id and self.message_id != self.email_id:
            raise ValueError("message_id and email_id differ; give one of them")
        return self

    @property
    def message(self) -> str:
        return self.message_id or self.email_id or ""

    def merged(self) -> dict[str, Any]:
        data = super().merged()
        data.pop("email_id", None)
        data["message_id"] = self.message
        return data


class Attachment(ToolInput):
    name: str | None = Field(None, max_length=255, description="File name.")
    filename: str | None = Field(None, max_length=255, description="Same as name.")
    content_base64: str = Field(..., description="The file's bytes, base64-encoded.")
    content_type: str | None = Field(None, max_length=255)


class Draft(ToolInput):
    """What a new message says: shared by send, schedule and reply."""

    to: str | list[str] | None = Field(None, description="One address or a list.")
    cc: str | list[str] | None = None
    bcc: str | list[str] | None = None
    reply_to: str | list[str] | None = Field(None, description="Where replies should go.")
    subject: str | None = Field(None, max_length=998)
    markdown: str | None = Field(None, description="The body in Markdown.")
    body: str | None = Field(None, description="Same as markdown.")
    text: str | None = Field(None, description="Same as markdown.")
    html: str | None = Field(None, description="An HTML body (converted to Markdown).")
    attachments: list[Attachment] | None = None
    idempotency_key: str | None = Field(
        None, max_length=200, description="Retrying with the same key never sends twice."
    )
    send_at: str | None = Field(None, description="ISO 8601 UTC time to send at.")
    gate_timing: GateTiming | None = None
    oversight_mode: Mode | None = Field(
        None, description="Tighten the gate for this message (never loosens the mailbox's)."
    )
    thread_id: str | None = Field(None, max_length=200, description="Your conversation id.")
    metadata: dict[str, Any] | None = Field(None, description="Free JSON kept with the message.")

    def merged(self) -> dict[str, Any]:
        data = super().merged()
        _first(data, "markdown", "markdown", "body", "text")
        for field in ("to", "cc", "bcc"):
            if isinstance(data.get(field), str):
                data[field] = [data[field]]
        for att in data.get("attachments") or []:
            _first(att, "filename", "filename", "name")
        return data


class FromMailbox(Draft):
    """A draft sent from a mailbox chosen by ``from`` and/or ``mailbox_id`` (send and reply).

    The two are not aliases of one value but two selectors (an address, an id, either), so
    they are not compared as text here: given both and written differently, both go to the
    REST API, which resolves each and refuses only two different mailboxes
    (``from_mismatch``), exactly as ``POST /v1/send`` does with the same body.
    """

    from_: str | None = Field(
        None,
        alias="from",
        max_length=320,
        description="The sending mailbox's address (or id); with mailbox_id, the same mailbox.",
    )
    mailbox_id: str | None = Field(None, max_length=320, description=_MAILBOX)

    def merged(self) -> dict[str, Any]:
        data = super().merged()
        sender = data.pop("from", None)
        if data.get("mailbox_id") is None:
            if sender is not None:
                data["mailbox_id"] = sender
        elif sender is not None and sender != data["mailbox_id"]:
            data["from"] = sender  # the REST API checks it names mailbox_id's mailbox
        return data


class SendEmail(FromMailbox):
    @model_validator(mode="after")
    def _needs_recipient(self) -> SendEmail:
        if not self.to:
            raise ValueError("give 'to': one address or a list")
        return self


class ScheduleEmail(SendEmail):
    send_at: str = Field(..., description="ISO 8601 UTC time to send at.")

    @model_validator(mode="before")
    @classmethod
    def _needs_send_at(cls, data: Any) -> Any:
        # Its own code rather than a generic validation error: the guides test for it.
        if isinstance(data, dict) and not data.get("send_at"):
            raise InvalidInput("schedule_email needs 'send_at' (ISO 8601)", code="send_at_required")
        return data


# Without ``from`` or ``mailbox_id`` a reply comes from the mailbox of the message answered
# (the REST reply route's default). No docstring: pydantic would show it to agents.
class ReplyEmail(FromMailbox):
    message_id: str | None = Field(None, max_length=998, description="The message replied to.")
    email_id: str | None = Field(None, max_length=998, description="Same as message_id.")

    @model_validator(mode="after")
    def _needs_message(self) -> ReplyEmail:
        if not (self.message_id or self.email_id):
            raise ValueError("give message_id: the message you are replying to")
        return self

    def merged(self) -> dict[str, Any]:
        data = super().merged()
        _first(data, "message_id", "message_id", "email_id")
        return data


class EditScheduled(MessageArg):
    send_at: str | None = None
    to: str | list[str] | None = None
    cc: str | list[str] | None = None
    bcc: str | list[str] | None = None
    subject: str | None = Field(None, max_length=998)
    markdown: str | None = None
    body: str | None = Field(None, description="Same as markdown.")
    text: str | None = Field(None, description="Same as markdown.")
    html: str | None = Field(None, description="An HTML body (converted to Markdown).")

    def merged(self) -> dict[str, Any]:
        data = super().merged()
        _first(data, "markdown", "markdown", "body", "text")
        for field in ("to", "cc", "bcc"):
            if isinstance(data.get(field), str):
                data[field] = [data[field]]
        return data


class CheckInbox(MailboxArg):
    filter: str | None = Field(None, description="Same as status, e.g. 'unread'.")
    status: str | None = Field(None, description="unread, read, archived, spam, …")
    sender: str | None = None
    subject_contains: str | None = None
    date_after: str | None = None
    date_before: str | None = None
    direction: Literal["inbound", "outbound"] | None = None
    has_attachments: bool | None = None
    since_id: str | None = None
    limit: int | None = Field(None, ge=1, le=200)
    cursor: str | None = None
    offset: int | None = Field(None, ge=0)

    def merged(self) -> dict[str, Any]:
        data = super().merged()
        _first(data, "status", "status", "filter")
        return data


class DownloadAttachment(MessageArg):
    filename: str = Field(..., max_length=255)


class GetThread(MailboxArg):
    thread_id: str = Field(..., max_length=200, description="thr_… or your own thread id.")


class CancelMessage(MessageArg):
    reason: str | None = Field(None, max_length=2000)


class TagEmail(MessageArg):
    # Values may be numbers or booleans too: the REST route stores each as text.
    tags: list[str] | dict[str, str | int | float | bool | None] = Field(
        ..., description="Labels (a list) or key-value pairs (an object); merged into existing."
    )


class WaitForEmail(MailboxArg):
    timeout: float | None = Field(
        None, ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait (≤ 120)."
    )
    since_id: str | None = Field(
        None,
        max_length=998,  # a msg_ id, or an RFC 5322 Message-ID (up to a header line's length)
        description="Only messages newer than this one (the last you saw): its id or its "
        "Message-ID.",
    )


class MailboxSettings(ToolInput):
    display_name: str | None = Field(None, max_length=200)
    oversight_mode: Mode | None = None
    gate_timing: GateTiming | None = None
    signature: str | None = Field(None, max_length=10_000)
    auto_cc: list[str] | None = None
    auto_bcc: list[str] | None = None
    webhook_url: str | None = None
    ai_disclosure: bool | None = None
    approval_timeout_seconds: int | None = None
    approval_expiry_seconds: int | None = None
    send_cap_hour: int | None = None
    send_cap_day: int | None = None
    metadata: dict[str, Any] | None = None
    approval_code: str | None = Field(None, description="The operator's one-time code.")


class ConfigureMailbox(MailboxSettings):
    mailbox_id: str | None = Field(None, max_length=320, description=_MAILBOX)


class CreateMailbox(MailboxSettings):
    address: str | None = Field(None, max_length=320)
    address_local_part: str | None = Field(None, max_length=64)


class RequestUpgrade(MailboxArg):
    target_mode: Mode = Field(..., description="The looser mode wanted.")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            _first(data, "target_mode", "target_mode", "oversight_mode", "mode")
        return data


class ApplyUpgrade(MailboxArg):
    code: str = Field(..., max_length=64, description="The code mailed to the operator.")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            _first(data, "code", "code", "approval_code")
        return data


class UpdateAccount(ToolInput):
    name: str | None = Field(None, max_length=200)
    oversight_email: str | None = None
    postal_address: str | None = Field(None, max_length=1000)
    daily_send_quota: int | None = Field(None, ge=0)
    approval_code: str | None = None


class GetUsage(ToolInput):
    period: Literal["summary", "daily"] | None = None


class ListPending(MailboxArg):
    limit: int | None = Field(None, ge=1, le=200)
    cursor: str | None = None


class DecideEmail(MessageArg):
    # Free text, not an enum: reviewers write "approved" or "deny" too, and the service knows
    # every spelling (an unknown one is its 422 invalid_decision, as on the REST route).
    decision: str | None = Field(None, max_length=20, description="'approve' or 'reject'.")
    action: str | None = Field(None, max_length=20, description="Same as decision.")
    reason: str | None = Field(None, max_length=5000)
    note: str | None = Field(None, max_length=5000, description="Same as reason.")
    rejection_note: str | None = Field(None, max_length=5000, description="Same as reason.")
    reviewer: str | None = Field(None, max_length=320, description="Who decided.")
    revised_body: str | None = Field(None, description="Approve this text instead.")
    revised_markdown: str | None = Field(None, description="Same as revised_body.")
    revised_subject: str | None = Field(None, max_length=998)
    draft_digest: str | None = Field(
        None,
        max_length=64,
        description="The draft_digest of the pending item you reviewed: an approval then "
        "covers only that version (409 draft_changed if the draft changed since).",
    )

    @model_validator(mode="after")
    def _needs_decision(self) -> DecideEmail:
        if not (self.decision or self.action):
            raise InvalidInput(
                "give 'decision' (or 'action') as 'approve' or 'reject'", code="invalid_decision"
            )
        return self

    def merged(self) -> dict[str, Any]:
        data = super().merged()
        data["email_id"] = data.pop("message_id")
        _first(data, "action", "action", "decision")
        _first(data, "note", "note", "reason", "rejection_note")
        _first(data, "revised_markdown", "revised_markdown", "revised_body")
        return data


class ListSpam(MailboxArg):
    limit: int | None = Field(None, ge=1, le=200)
    cursor: str | None = None


class AddContact(ToolInput):
    email: str = Field(..., max_length=320)
    name: str | None = Field(None, max_length=200)
    tags: list[str] | None = None
    notes: str | None = Field(None, max_length=5000)


class SearchContacts(ToolInput):
    q: str | None = Field(None, max_length=320, description="Part of a name or address.")
    tag: str | None = Field(None, max_length=200)
    limit: int | None = Field(None, ge=1, le=500)
    cursor: str | None = Field(None, max_length=40, description=_CURSOR)
    offset: int | None = Field(None, ge=0)


class ListApiKeys(ToolInput):
    limit: int | None = Field(None, ge=1, le=500)
    cursor: str | None = Field(None, max_length=40, description=_CURSOR)


class ContactArg(ToolInput):
    contact_id: str = Field(..., max_length=64)


class AddressArg(ToolInput):
    address: str = Field(..., max_length=320)


class CreateApiKey(ToolInput):
    name: str = Field(..., max_length=200)
    scopes: list[Literal["read", "send", "oversight", "admin"]]
    mode: Literal["live", "test"] | None = None
    mailbox_ids: list[str] | None = None
    send_cap_hour: int | None = Field(None, ge=0)
    send_cap_day: int | None = Field(None, ge=0)
    approval_code: str | None = None


class RevokeApiKey(ToolInput):
    key_id: str = Field(..., max_length=64)
    approval_code: str | None = Field(
        None, max_length=64, description="The operator's one-time code (see approval_required)."
    )


class GetAuditLog(ToolInput):
    actor_id: str | None = None
    action: str | None = None
    mailbox_id: str | None = None
    subject_id: str | None = Field(None, description="An object's id, e.g. a message id.")
    date_after: str | None = None
    date_before: str | None = None
    limit: int | None = Field(None, ge=1, le=1000)
    cursor: str | None = None


class CreateWebhook(ToolInput):
    url: str | None = Field(None, max_length=2000, description="https endpoint.")
    endpoint: str | None = Field(None, max_length=2000, description="Same as url.")
    events: list[str] = Field(..., description="Event names, aliases, or ['*'].")
    mailbox_id: str | None = Field(None, max_length=320, description="Only this mailbox.")
    description: str | None = Field(None, max_length=500)
    approval_code: str | None = None

    @model_validator(mode="after")
    def _needs_url(self) -> CreateWebhook:
        if not (self.url or self.endpoint):
            raise ValueError("give url: the https endpoint to post events to")
        return self

    def merged(self) -> dict[str, Any]:
        data = super().merged()
        _first(data, "url", "url", "endpoint")
        return data


class WebhookArg(ToolInput):
    webhook_id: str = Field(..., max_length=64)


class VerifyMessage(ToolInput):
    raw: str | None = Field(None, description="The whole message (RFC 5322 text).")
    raw_base64: str | None = Field(None, description="The whole message, base64-encoded.")

    @model_validator(mode="after")
    def _needs_raw(self) -> VerifyMessage:
        if not (self.raw or self.raw_base64):
            raise ValueError("give raw (the message text) or raw_base64")
        return self
