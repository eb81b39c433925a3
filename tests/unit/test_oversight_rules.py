"""The oversight rules: stricter-mode, loosening, and the lifecycle table."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from multimail.domain.oversight import (
    CANCELLABLE,
    DECIDABLE,
    FINAL,
    TRANSITIONS,
    GateTiming,
    OversightMode,
    Status,
    can_transition,
    effective_mode,
    first_outbound_status,
    is_loosening,
    outbound_is_gated,
    stricter,
)

modes = st.sampled_from(list(OversightMode))


@given(modes, modes)
def test_a_request_can_tighten_but_never_loosen_the_mailbox_mode(
    mailbox: OversightMode, requested: OversightMode
) -> None:
    """The effective mode is never looser than either the mailbox's or the request's."""
    effective = effective_mode(mailbox, requested)
    assert not is_loosening(mailbox, effective)
    assert not is_loosening(requested, effective)
    assert effective in (mailbox, requested)


def test_autonomous_request_on_gated_mailbox_still_waits() -> None:
    """An agent asking for autonomous on a gated_send mailbox is still gated."""
    assert effective_mode(OversightMode.GATED_SEND, OversightMode.AUTONOMOUS) is (
        OversightMode.GATED_SEND
    )
    assert outbound_is_gated(effective_mode(OversightMode.GATED_SEND, OversightMode.AUTONOMOUS))


@given(modes, modes)
def test_stricter_is_commutative(a: OversightMode, b: OversightMode) -> None:
    """Order of arguments does not matter."""
    assert stricter(a, b) is stricter(b, a)


def test_every_status_has_a_row_and_final_states_go_nowhere() -> None:
    """The table is total; rejected, cancelled and expired are final."""
    assert set(TRANSITIONS) == set(Status)
    for status in (Status.REJECTED, Status.CANCELLED, Status.EXPIRED, Status.SEND_FAILED):
        assert status in FINAL


@given(st.lists(st.sampled_from(list(Status)), max_size=30))
def test_no_walk_reaches_delivery_without_passing_queued(path: list[Status]) -> None:
    """Following only allowed transitions from a pending message, delivery implies queued first.

    This is the gate's invariant in table form: ``pending_send_approval`` can reach ``sending``
    only through ``queued``, which only an approval (or an ungated mode) produces.
    """
    current = Status.PENDING_SEND_APPROVAL
    seen = [current]
    for nxt in path:
        if can_transition(current, nxt):
            current = nxt
            seen.append(current)
    if Status.SENDING in seen or Status.DELIVERED in seen:
        assert (
            Status.QUEUED
            in seen[: seen.index(Status.SENDING if Status.SENDING in seen else Status.DELIVERED)]
        )


def test_rejected_and_cancelled_messages_can_never_be_sent() -> None:
    """No path leads out of rejected or cancelled."""
    for status in (Status.REJECTED, Status.CANCELLED, Status.EXPIRED):
        assert not TRANSITIONS[status]


def test_cancel_and_decide_sets_match_the_spec() -> None:
    """Cancel works in the pending and scheduled states only; decisions on pending ones."""
    assert {
        Status.PENDING_SCAN,
        Status.PENDING_SEND_APPROVAL,
        Status.PENDING_INBOUND_APPROVAL,
        Status.SCHEDULED,
    } == CANCELLABLE
    assert {Status.PENDING_SEND_APPROVAL, Status.PENDING_INBOUND_APPROVAL} == DECIDABLE


@given(modes, st.booleans(), st.sampled_from(list(GateTiming)), st.booleans())
def test_gated_mail_waits_for_approval_unless_allowlisted(
    mode: OversightMode, scheduled: bool, timing: GateTiming, allowlisted: bool
) -> None:
    """Gated modes never go straight to queued unless every recipient is allowlisted."""
    status = first_outbound_status(
        mode, scheduled=scheduled, timing=timing, allowlisted=allowlisted
    )
    if outbound_is_gated(mode) and not allowlisted:
        assert status in (Status.PENDING_SEND_APPROVAL, Status.SCHEDULED)
        if status is Status.SCHEDULED:
            assert scheduled and timing is GateTiming.SCHEDULE_FIRST
    else:
        assert status in (Status.QUEUED, Status.SCHEDULED)
