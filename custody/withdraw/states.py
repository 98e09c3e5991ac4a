"""A withdrawal's states and kinds, and its state machine: every legal transition in one table.

A withdrawal is created ``requested`` (a single one) or ``approved`` (a batch, whose members
were). What moves it is one of :class:`Event`; :func:`next_state` gives the state after it or
raises IllegalTransition. The steps of the queue (custody.withdraw.queue, psbt_io, broadcast)
and of replacements and self-transfers (replace, selftransfer, webauthn_approval) ask it for
every status they write, and :func:`can` where a step depends on the state alone.
A batch's members follow their batch (custody.withdraw.records._touch): they are ``approved``
until it is broadcast, then carry its status.

To add a state or an event (a fee bump, a cancel by double-spend, ...): add it below and its
rows to TRANSITIONS; tests/test_state_machines.py checks every pair, and docs/ARCHITECTURE.md's
diagram is generated from the table (tests/test_architecture_doc.py says when it differs).
"""

from __future__ import annotations

import enum

from custody.transitions import Machine

REQUESTED = "requested"
APPROVED = "approved"
SIGNED = "signed"
BROADCAST = "broadcast"
CONFIRMED = "confirmed"
FAILED = "failed"
STATES = (REQUESTED, APPROVED, SIGNED, BROADCAST, CONFIRMED, FAILED)
PENDING = (REQUESTED, APPROVED, SIGNED)
SINGLE = "single"
BATCH = "batch"
SWEEP = "sweep"  # custody.withdraw.sweep: an older policy's coins to the newest policy
CONSOLIDATE = "consol"  # custody.withdraw.utxo.consolidate: many small coins into one (8 characters)


class Event(enum.StrEnum):
    """What happens to a withdrawal."""

    APPROVED = "approved"
    """Its approvals reached the rulebook's tier for its amount."""
    SIGNED = "signed"
    """Founders' signatures reached the policy's threshold."""
    BROADCAST = "broadcast"
    """A node took its final transaction from us."""
    SEEN_ON_CHAIN = "seen-on-chain"
    """Its transaction is on the chain though we did not send it (signed or sent elsewhere)."""
    CONFIRMED = "confirmed"
    """Its transaction is as deep as CUSTODY_CONFIRMATIONS asks."""
    REORGED = "reorged"
    """A reorganisation took its confirmed transaction out of the chain."""
    CANCELLED = "cancelled"
    """An employee cancelled it, before any founder signed."""
    REFUNDED = "refunded"
    """Another transaction spent one of its inputs, CUSTODY_REFUND_CONFIRMATIONS deep (for a
    withdrawal with replacements: its cancel by double-spend did, or a transaction none of its
    versions is; its signed versions are refunded with it)."""
    SETTLED = "settled"
    """One version of a withdrawal that has replacements (custody.withdraw.replace) confirmed as
    deep as it must: the withdrawal, and that version itself (a fee bump, a cancel), whether or
    not we saw it sent."""
    REPLACED = "replaced"
    """Another version of it confirmed instead (the original, a fee bump or a cancel),
    CUSTODY_REFUND_CONFIRMATIONS deep, or, for a child paying for its parent (CPFP), another
    version than that parent: it can never confirm. (A replacement nobody signed yet fails so
    too when its withdrawal is refunded.)"""


TRANSITIONS: dict[tuple[str, Event], str] = {
    (REQUESTED, Event.APPROVED): APPROVED,
    (REQUESTED, Event.CANCELLED): FAILED,
    (APPROVED, Event.SIGNED): SIGNED,
    (APPROVED, Event.SEEN_ON_CHAIN): BROADCAST,
    (APPROVED, Event.CANCELLED): FAILED,
    (APPROVED, Event.REFUNDED): FAILED,
    (SIGNED, Event.BROADCAST): BROADCAST,
    (SIGNED, Event.SEEN_ON_CHAIN): BROADCAST,
    (SIGNED, Event.REFUNDED): FAILED,
    (BROADCAST, Event.CONFIRMED): CONFIRMED,
    (BROADCAST, Event.REFUNDED): FAILED,
    (CONFIRMED, Event.REORGED): BROADCAST,
    # custody.withdraw.replace: versions of one withdrawal race; the chain picks one
    (APPROVED, Event.SETTLED): CONFIRMED,
    (SIGNED, Event.SETTLED): CONFIRMED,
    (BROADCAST, Event.SETTLED): CONFIRMED,
    (REQUESTED, Event.REPLACED): FAILED,
    (APPROVED, Event.REPLACED): FAILED,
    (SIGNED, Event.REPLACED): FAILED,
    (BROADCAST, Event.REPLACED): FAILED,
}
"""Every legal transition; nothing else happens to a withdrawal. ``failed`` is final."""

MACHINE = Machine("withdrawal", STATES, (REQUESTED, APPROVED), Event, TRANSITIONS)

ONE_TRANSACTION = frozenset(set(Event) - {Event.SETTLED, Event.REPLACED})
"""The events of a row that is one transaction nothing replaces: a consolidation or a sweep
(custody.withdraw.replace bumps, cancels and pays for customers' withdrawals only), followed
by custody.withdraw.broadcast.sync as a withdrawal without replacements is."""

SELF_TRANSFER = Machine(
    "consolidation",
    STATES,
    (REQUESTED,),
    Event,
    {(state, event): target for (state, event), target in TRANSITIONS.items() if event in ONE_TRANSACTION},
)
"""The part of :data:`MACHINE` a consolidation (or a sweep) can take: docs/ARCHITECTURE.md
draws it; a transition outside it would need a version that replaces it, which nothing makes."""


def next_state(state: str, event: Event) -> str:
    """The state of a withdrawal in ``state`` after ``event``. Raises IllegalTransition."""
    return MACHINE.next_state(state, event)


def can(state: str, event: Event) -> bool:
    """Whether ``event`` may happen to a withdrawal in ``state``."""
    return MACHINE.can(state, event)
