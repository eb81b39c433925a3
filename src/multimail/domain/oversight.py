"""Oversight modes, the stricter-mode rule and the message lifecycle as one transition table.

Pure: no I/O. Services ask :func:`check_transition` before every status change, so the table
below is the single definition of what can happen to a message.
"""

from __future__ import annotations

from enum import StrEnum


class OversightMode(StrEnum):
    READ_ONLY = "read_only"
    GATED_ALL = "gated_all"
    GATED_SEND = "gated_send"
    MONITORED = "monitored"
    AUTONOMOUS = "autonomous"


# Strictest first: a lower rank is a tighter gate.
_STRICTNESS: dict[OversightMode, int] = {
    OversightMode.READ_ONLY: 0,
    OversightMode.GATED_ALL: 1,
    OversightMode.GATED_SEND: 2,
    OversightMode.MONITORED: 3,
    OversightMode.AUTONOMOUS: 4,
}

DEFAULT_MODE = OversightMode.GATED_SEND


def parse_mode(value: str) -> OversightMode:
    try:
        return OversightMode(value)
    except ValueError:
        allowed = ", ".join(m.value for m in OversightMode)
        raise ValueError(f"unknown oversight mode {value!r}; use one of: {allowed}") from None


def stricter(a: OversightMode, b: OversightMode) -> OversightMode:
    """The tighter of two modes: a request can tighten the mailbox's gate, never loosen it."""
    return a if _STRICTNESS[a] <= _STRICTNESS[b] else b


def effective_mode(mailbox_mode: OversightMode, requested: OversightMode | None) -> OversightMode:
    return mailbox_mode if requested is None else stricter(mailbox_mode, requested)


def is_loosening(current: OversightMode, new: OversightMode) -> bool:
    """Loosening needs the operator (the trust ladder); tightening is immediate."""
    return _STRICTNESS[new] > _STRICTNESS[current]


def outbound_is_gated(mode: OversightMode) -> bool:
    return mode in (OversightMode.GATED_ALL, OversightMode.GATED_SEND)


def inbound_is_held(mode: OversightMode) -> bool:
    return mode is OversightMode.GATED_ALL


def can_send(mode: OversightMode) -> bool:
    return mode is not OversightMode.READ_ONLY


class GateTiming(StrEnum):
    GATE_FIRST = "gate_first"  # approve, then wait for send_at
    SCHEDULE_FIRST = "schedule_first"  # wait for send_at, then ask for approval


class Status(StrEnum):
    # outbound
    PENDING_SCAN = "pending_scan"
    PENDING_SEND_APPROVAL = "pending_send_approval"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    SEND_FAILED = "send_failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    # inbound
    RECEIVED = "received"  # stored, not yet classified
    PENDING_INBOUND_APPROVAL = "pending_inbound_approval"
    UNREAD = "unread"
    READ = "read"
    SPAM = "spam"
    ARCHIVED = "archived"


S = Status

# The whole lifecycle. Anything not listed is refused.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.PENDING_SCAN: frozenset(
        {S.PENDING_SEND_APPROVAL, S.SCHEDULED, S.QUEUED, S.SEND_FAILED, S.CANCELLED}
    ),
    S.PENDING_SEND_APPROVAL: frozenset(
        {S.QUEUED, S.SCHEDULED, S.REJECTED, S.CANCELLED, S.EXPIRED, S.PENDING_SCAN}
    ),
    # A scheduled message either was approved first (gate_first → queued at send_at) or waits
    # for send_at before asking (schedule_first → pending_send_approval); edits re-scan it.
    S.SCHEDULED: frozenset(
        {S.QUEUED, S.PENDING_SEND_APPROVAL, S.CANCELLED, S.PENDING_SCAN, S.SEND_FAILED}
    ),
    S.QUEUED: frozenset({S.SENDING, S.SEND_FAILED, S.BOUNCED}),
    S.SENDING: frozenset({S.DELIVERED, S.DEFERRED, S.BOUNCED, S.SEND_FAILED, S.QUEUED}),
    S.DEFERRED: frozenset({S.QUEUED, S.SENDING, S.SEND_FAILED, S.BOUNCED}),
    S.DELIVERED: frozenset({S.BOUNCED}),  # a DSN can arrive after the relay accepted it
    S.BOUNCED: frozenset(),
    S.SEND_FAILED: frozenset(),
    S.REJECTED: frozenset(),
    S.CANCELLED: frozenset(),
    S.EXPIRED: frozenset(),
    S.RECEIVED: frozenset({S.UNREAD, S.PENDING_INBOUND_APPROVAL, S.SPAM}),
    S.PENDING_INBOUND_APPROVAL: frozenset({S.UNREAD, S.REJECTED, S.CANCELLED, S.SPAM}),
    S.UNREAD: frozenset({S.READ, S.SPAM, S.ARCHIVED}),
    S.READ: frozenset({S.UNREAD, S.SPAM, S.ARCHIVED}),
    S.SPAM: frozenset({S.UNREAD, S.READ}),
    S.ARCHIVED: frozenset({S.UNREAD, S.READ}),
}

CANCELLABLE = frozenset(
    {S.PENDING_SCAN, S.PENDING_SEND_APPROVAL, S.PENDING_INBOUND_APPROVAL, S.SCHEDULED}
)
DECIDABLE = frozenset({S.PENDING_SEND_APPROVAL, S.PENDING_INBOUND_APPROVAL})
FINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
# Statuses from which the message may still be handed to SMTP.
DELIVERABLE = frozenset({S.QUEUED, S.SENDING, S.DEFERRED})
# Outbound statuses that mean "a decision or the gate already let it through".
PAST_THE_GATE = frozenset({S.QUEUED, S.SENDING, S.DEFERRED, S.DELIVERED, S.BOUNCED})
# Outbound statuses a delivery report can be about: the message may have reached a server
# (queued again after a deferral; given up on after some recipients accepted it).
MAY_HAVE_LEFT = PAST_THE_GATE | {S.SEND_FAILED}


def can_transition(current: Status, new: Status) -> bool:
    return new in TRANSITIONS[current]


class TransitionError(ValueError):
    def __init__(self, current: Status, new: Status) -> None:
        super().__init__(f"a message in status {current.value!r} cannot become {new.value!r}")
        self.current = current
        self.new = new


def check_transition(current: Status, new: Status) -> None:
    if not can_transition(current, new):
        raise TransitionError(current, new)


def first_outbound_status(
    mode: OversightMode, *, scheduled: bool, timing: GateTiming, allowlisted: bool
) -> Status:
    """Where a message that passed its scan goes next.

    Gated mail waits for approval unless every recipient is on the mailbox's allowlist;
    ``schedule_first`` defers the approval request until ``send_at``.
    """
    gated = outbound_is_gated(mode) and not allowlisted
    if not gated:
        return S.SCHEDULED if scheduled else S.QUEUED
    if scheduled and timing is GateTiming.SCHEDULE_FIRST:
        return S.SCHEDULED
    return S.PENDING_SEND_APPROVAL


def after_approval(*, scheduled_in_future: bool) -> Status:
    return S.SCHEDULED if scheduled_in_future else S.QUEUED
