"""Pure state machines: a table of every legal ``(state, event) -> state`` transition.

The withdrawal (custody.withdraw.states) and deposit (custody.books.deposit_states) machines
are instances. What is not in a table is illegal: :meth:`Machine.next_state` raises
IllegalTransition (a Conflict, exit code 6) naming the state and the event, and so does a state
the machine does not know (a row edited outside the tool). No store, no chain: the callers do
the side effects (ledger postings, audit-log entries) around the state the table gives them.

To add a state or an event, add it to the machine's states or its event enum and add its rows
to the table; ``tests/test_state_machines.py`` then checks every pair of states and events, and
``docs/ARCHITECTURE.md``'s diagrams are regenerated from the table (a test says when they differ).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from custody.errors import IllegalTransition

E = TypeVar("E", bound=enum.StrEnum)


@dataclass(frozen=True)
class Machine(Generic[E]):
    """A state machine: its states (the first ones are where a record starts), its events, and
    the table of its legal transitions."""

    name: str
    """What moves through it, for messages: ``withdrawal``, ``deposit``."""
    states: tuple[str, ...]
    initial: tuple[str, ...]
    """The states a record is created in."""
    events: type[E]
    table: Mapping[tuple[str, E], str]

    def __post_init__(self) -> None:
        for (state, event), target in self.table.items():
            if state not in self.states or target not in self.states or event not in list(self.events):
                raise ValueError(f"{self.name}: the row ({state}, {event}) -> {target} names an unknown state or event")
        if not set(self.initial) <= set(self.states):
            raise ValueError(f"{self.name}: an initial state is not one of its states")

    def can(self, state: str, event: E) -> bool:
        """Whether ``event`` may happen to a record in ``state``."""
        return (state, event) in self.table

    def next_state(self, state: str, event: E) -> str:
        """The state after ``event``. Raises IllegalTransition when the table has no such row."""
        target = self.table.get((state, event))
        if target is not None:
            return target
        if state not in self.states:
            raise IllegalTransition(
                f"a {self.name} cannot be '{state}': its states are {', '.join(self.states)} (was the store edited?)"
            )
        legal = [f"'{e}'" for (s, e) in self.table if s == state]
        may = f"only {', '.join(legal)}" if legal else "no event"
        raise IllegalTransition(f"a {self.name} that is {state} allows no '{event}': {may} moves it")

    def mermaid(self) -> str:
        """The machine as a Mermaid state diagram (docs/ARCHITECTURE.md shows it)."""
        lines = ["stateDiagram-v2"]
        lines += [f"    [*] --> {state}" for state in self.initial]
        lines += [f"    {state} --> {target}: {event}" for (state, event), target in self.table.items()]
        return "\n".join(lines)
