"""The withdrawal and deposit state machines, exhaustively: every pair of a state and an event
is either the transition the rules below say, or IllegalTransition naming both.

The expectations are written from the rules (README, THREAT_MODEL), not read from the tables:
who may move a withdrawal where, and what the chain's word does to a deposit.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from custody.books import deposit_states as dep
from custody.errors import Conflict, IllegalTransition
from custody.transitions import Machine
from custody.withdraw import states as wd

# ---------------------------------------------------------------- withdrawals

W = wd.Event
WITHDRAWAL_RULES = {
    # approvals reach the tier; an employee may cancel before any founder signed
    ("requested", W.APPROVED): "approved",
    ("requested", W.CANCELLED): "failed",
    ("approved", W.SIGNED): "signed",
    ("approved", W.CANCELLED): "failed",
    # the chain may carry it though we did not send it, or prove it void (refund)
    ("approved", W.SEEN_ON_CHAIN): "broadcast",
    ("approved", W.REFUNDED): "failed",
    ("signed", W.BROADCAST): "broadcast",
    ("signed", W.SEEN_ON_CHAIN): "broadcast",
    ("signed", W.REFUNDED): "failed",
    ("broadcast", W.CONFIRMED): "confirmed",
    ("broadcast", W.REFUNDED): "failed",
    ("confirmed", W.REORGED): "broadcast",
    # versions of one withdrawal (fee bumps, a cancel, a child paying for its parent) race:
    # the one the chain confirms settles it (and itself) from wherever a version can be
    # outstanding; every other version can never confirm, whatever state it got to
    ("approved", W.SETTLED): "confirmed",
    ("signed", W.SETTLED): "confirmed",
    ("broadcast", W.SETTLED): "confirmed",
    ("requested", W.REPLACED): "failed",
    ("approved", W.REPLACED): "failed",
    ("signed", W.REPLACED): "failed",
    ("broadcast", W.REPLACED): "failed",
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(wd.STATES, wd.Event)))
def test_every_withdrawal_state_and_event(state: str, event: wd.Event) -> None:
    expected = WITHDRAWAL_RULES.get((state, event))
    assert wd.can(state, event) is (expected is not None)
    if expected is not None:
        assert wd.next_state(state, event) == expected
        return
    with pytest.raises(IllegalTransition) as caught:
        wd.next_state(state, event)
    assert f"a withdrawal that is {state} allows no '{event}'" in str(caught.value)
    assert isinstance(caught.value, Conflict) and caught.value.exit_code == 6  # the CLI's code for it


def test_once_founders_signed_only_the_chain_moves_a_withdrawal() -> None:
    """Nobody's word fails a signed withdrawal: no employee event from signed on, and failed
    only by the chain's proof (refunded, or another version of it confirmed)."""
    employee_events = {W.APPROVED, W.CANCELLED, W.SIGNED, W.BROADCAST}
    for state in ("signed", "broadcast", "confirmed"):
        for event in wd.Event:
            if wd.can(state, event) and wd.next_state(state, event) == "failed":
                assert event in (W.REFUNDED, W.REPLACED)
    for state in ("broadcast", "confirmed", "failed"):
        assert not any(wd.can(state, e) for e in employee_events), state
    assert not wd.can("signed", W.CANCELLED)


def test_a_settled_or_void_withdrawal_is_never_settled_or_replaced_again() -> None:
    """A version confirming moves only what is still outstanding: nothing confirmed is
    replaced (a reorganisation, not a rival's confirmation, moves it), nothing failed revived,
    and nothing nobody approved is settled."""
    for state in ("confirmed", "failed", "requested"):
        assert not wd.can(state, W.SETTLED), state
    for state in ("confirmed", "failed"):
        assert not wd.can(state, W.REPLACED), state


def test_failed_is_final_and_every_state_is_reachable() -> None:
    assert not any(wd.can("failed", e) for e in wd.Event)
    assert _reachable(wd.MACHINE) == set(wd.STATES)


# ---------------------------------------------------------------- deposits

Obs = dep.Observation
DEPOSIT_RULES = {
    # credited once deep enough, from wherever it was
    **{(s, Obs.DEEP): "credited" for s in dep.STATUSES},
    # in a block, not yet deep: a credit stays, anything else waits
    ("pending", Obs.SHALLOW): "pending",
    ("credited", Obs.SHALLOW): "credited",
    ("reversed", Obs.SHALLOW): "pending",
    ("dropped", Obs.SHALLOW): "pending",
    # out of every block: a credit is reversed; a pending one waits in the mempool or is dropped
    ("pending", Obs.UNCONFIRMED): "pending",
    ("pending", Obs.UNKNOWN): "dropped",
    ("credited", Obs.UNCONFIRMED): "reversed",
    ("credited", Obs.UNKNOWN): "reversed",
    ("reversed", Obs.UNCONFIRMED): "reversed",
    ("reversed", Obs.UNKNOWN): "reversed",
    ("dropped", Obs.UNCONFIRMED): "pending",
    ("dropped", Obs.UNKNOWN): "dropped",
}


@pytest.mark.parametrize(("state", "observation"), list(itertools.product(dep.STATUSES, dep.Observation)))
def test_every_deposit_state_and_observation(state: str, observation: dep.Observation) -> None:
    """The deposit machine is total: the chain's every answer moves a deposit somewhere."""
    assert dep.next_state(state, observation) == DEPOSIT_RULES[(state, observation)]


def test_only_a_deep_confirmation_credits_and_only_leaving_the_chain_reverses() -> None:
    for (state, observation), target in dep.TRANSITIONS.items():
        if target == "credited" and state != "credited":
            assert observation == Obs.DEEP
        if state == "credited" and target != "credited":
            assert observation in (Obs.UNCONFIRMED, Obs.UNKNOWN) and target == "reversed"


@pytest.mark.parametrize(
    ("confirmations", "known", "required", "observation"),
    [(3, True, 3, Obs.DEEP), (4, True, 3, Obs.DEEP), (2, True, 3, Obs.SHALLOW), (1, True, 1, Obs.DEEP)]
    + [(0, True, 1, Obs.UNCONFIRMED), (0, False, 1, Obs.UNKNOWN), (0, True, 6, Obs.UNCONFIRMED)],
)
def test_what_the_chain_says_is_observed(confirmations: int, known: bool, required: int, observation: Obs) -> None:
    assert dep.observe(confirmations, known, required) == observation


# ---------------------------------------------------------------- both


@pytest.mark.parametrize("machine", [wd.MACHINE, dep.MACHINE], ids=["withdrawal", "deposit"])
def test_a_state_edited_into_the_store_is_refused_by_name(machine: Machine[Any]) -> None:
    for bogus in ("", "Credited", "approved ", "signed; drop table"):
        if bogus in machine.states:
            continue
        for event in machine.events:
            with pytest.raises(IllegalTransition, match=f"a {machine.name} cannot be '{bogus}'"):
                machine.next_state(bogus, event)


def test_a_table_naming_an_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown state"):
        Machine("thing", ("a", "b"), ("a",), Obs, {("a", Obs.DEEP): "c"})


def _reachable(machine: Machine[Any]) -> set[str]:
    seen, todo = set(machine.initial), list(machine.initial)
    while todo:
        state = todo.pop()
        for (source, _), target in machine.table.items():
            if source == state and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen
