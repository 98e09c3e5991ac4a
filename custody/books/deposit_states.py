"""A deposit's states and its state machine: every legal transition in one table.

A deposit is created ``pending`` when sync first sees its output. What moves it is what the
chain says of its transaction, an :class:`Observation` (:func:`observe` turns the chain's
answer into one); :func:`next_state` gives the state after it, and custody.books.deposits
does what the change means (a credit, a reversal) in the same database transaction.

The machine is total over its states: every observation of every state has a row, so a sync
never stops on a deposit the chain moved; what it refuses is a state it does not know (a row
edited outside the tool), with IllegalTransition.

To add a state or an observation (a deposit seen in the mempool, ...): add it below and its
rows to TRANSITIONS; tests/test_state_machines.py checks every pair, and docs/ARCHITECTURE.md's
diagram is generated from the table (tests/test_architecture_doc.py says when it differs).
"""

from __future__ import annotations

import enum

from custody.transitions import Machine

PENDING = "pending"
CREDITED = "credited"
REVERSED = "reversed"
DROPPED = "dropped"
STATUSES = (PENDING, CREDITED, REVERSED, DROPPED)
WATCHED = (PENDING, CREDITED)
"""The states sync asks the chain about when their output leaves the unspent set."""


class Observation(enum.StrEnum):
    """What the chain says of a deposit's transaction."""

    DEEP = "deep"
    """In a block, at least CUSTODY_DEPOSIT_CONFIRMATIONS deep."""
    SHALLOW = "shallow"
    """In a block, not yet that deep."""
    UNCONFIRMED = "unconfirmed"
    """Known to the chain, in no block (back in the mempool: a reorganisation)."""
    UNKNOWN = "unknown"
    """Not known to the chain at all."""


TRANSITIONS: dict[tuple[str, Observation], str] = {
    (PENDING, Observation.SHALLOW): PENDING,
    (PENDING, Observation.DEEP): CREDITED,
    (PENDING, Observation.UNCONFIRMED): PENDING,
    (PENDING, Observation.UNKNOWN): DROPPED,
    (CREDITED, Observation.SHALLOW): CREDITED,
    (CREDITED, Observation.DEEP): CREDITED,
    (CREDITED, Observation.UNCONFIRMED): REVERSED,
    (CREDITED, Observation.UNKNOWN): REVERSED,
    (REVERSED, Observation.SHALLOW): PENDING,
    (REVERSED, Observation.DEEP): CREDITED,
    (REVERSED, Observation.UNCONFIRMED): REVERSED,
    (REVERSED, Observation.UNKNOWN): REVERSED,
    (DROPPED, Observation.SHALLOW): PENDING,
    (DROPPED, Observation.DEEP): CREDITED,
    (DROPPED, Observation.UNCONFIRMED): PENDING,
    (DROPPED, Observation.UNKNOWN): DROPPED,
}
"""Every legal transition. A credit happens on entering ``credited``, a reversal on leaving it."""

MACHINE = Machine("deposit", STATUSES, (PENDING,), Observation, TRANSITIONS)


def observe(confirmations: int, known: bool, required: int) -> Observation:
    """What the chain's answer (``confirmations``, 0 when in no block; whether it ``known`` the
    transaction) means for a deposit that needs ``required`` confirmations."""
    if confirmations > 0:
        return Observation.DEEP if confirmations >= required else Observation.SHALLOW
    return Observation.UNCONFIRMED if known else Observation.UNKNOWN


def next_state(state: str, observation: Observation) -> str:
    """The state of a deposit in ``state`` after ``observation``. Raises IllegalTransition."""
    return MACHINE.next_state(state, observation)
