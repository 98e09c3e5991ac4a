"""The halt state as the audit log says it: a halt stands from its ``halt.raised`` entry until a
``halt.lifted`` entry that carries two distinct employees' valid signatures of its lift, by the
roster in force when they signed. The ``halt`` table is checked against this on every read.

The rows come from a :class:`HaltRows`: the ORM session (:class:`OrmRows`, what every caller
but one uses) or a DB-API cursor (custody.control.halt_light, the ORM-free read of
``custody halt status``). One derivation, two row sources: this module imports no ORM itself.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from custody.clock import iso
from custody.control.trust_text import StoredManifest, StoredPolicy, governance_from_text
from custody.errors import (
    InputError,
)
from custody.identity.governance import Governance
from custody.identity.roster import Roster, load_roster
from custody.identity.statements import verify_statement
from custody.identity.webauthn import Credential, signs_statement

if TYPE_CHECKING:  # the ORM is imported by OrmRows when it reads: halt_light reads without it
    from sqlmodel import Session

    from custody.store.models import HaltRow

LIFT_QUORUM = 2
LIFT_DOMAIN = "custody/halt-lift/v1"


def active_halts(s: Session) -> list[HaltRow]:
    from sqlmodel import col, select

    from custody.store.models import HaltRow

    return list(s.exec(select(HaltRow).where(col(HaltRow.active)).order_by(col(HaltRow.id))).all())


# ---------------------------------------------------------------- where the rows come from

_HALT_EVENTS = ("halt.raised", "halt.lift_signed", "halt.lifted")
_ROSTER_EVENT = "roster.applied"


class HaltRecord(Protocol):
    """A row of the ``halt`` table (the ORM's HaltRow, or halt_light's)."""

    @property
    def id(self) -> int | None: ...
    @property
    def raised_at(self) -> datetime: ...
    @property
    def raised_by(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def active(self) -> bool: ...
    @property
    def lifted_at(self) -> datetime | None: ...


LogRow = tuple[int, datetime, str, str, str, str | None]
"""An audit entry of a halt event: (seq, at, event, actor, payload, signature)."""


@runtime_checkable
class HaltRows(Protocol):
    """The rows the halt state is derived from, read in one transaction."""

    def halt_entries(self) -> Iterable[LogRow]:
        """The audit entries of _HALT_EVENTS, by seq."""
        ...

    def roster_entries(self) -> Iterable[tuple[int, str]]:
        """(seq, payload) of the roster.applied entries, by seq."""
        ...

    def governance_text(self) -> tuple[StoredManifest, tuple[str, ...], StoredPolicy]:
        """What the store's governance is built from (custody.control.trust_text)."""
        ...

    def roster_documents(self) -> dict[int, str]:
        """The applied rosters' documents by serial."""
        ...

    def halt(self, halt_id: int) -> HaltRecord | None: ...

    def active_halts(self) -> Sequence[HaltRecord]:
        """The rows that say active, by id."""
        ...

    def lift_employees(self, halt_id: int) -> list[str]:
        """Who signed the lift of ``halt_id`` (halt_lift rows, by id)."""
        ...

    def pinned_manifest(self) -> Path | None:
        """The founders' manifest pinned on this machine, whose founders alone sign the rosters
        that lift (None: no machine's settings, the store's own founders)."""
        ...


class OrmRows:
    """The rows through the ORM session ``s``."""

    def __init__(self, s: Session) -> None:
        self.s = s

    def halt_entries(self) -> Iterable[LogRow]:
        from sqlmodel import col, select

        from custody.store.models import AuditEntry

        query = select(AuditEntry).where(col(AuditEntry.event).in_(_HALT_EVENTS)).order_by(col(AuditEntry.seq))
        return ((e.seq, e.at, e.event, e.actor, e.payload, e.signature) for e in self.s.exec(query).all())

    def roster_entries(self) -> Iterable[tuple[int, str]]:
        from sqlmodel import col, select

        from custody.store.models import AuditEntry

        return self.s.exec(
            select(AuditEntry.seq, AuditEntry.payload)
            .where(AuditEntry.event == _ROSTER_EVENT)
            .order_by(col(AuditEntry.seq))
        ).all()

    def governance_text(self) -> tuple[StoredManifest, tuple[str, ...], StoredPolicy]:
        from custody.control.trust import store_text

        return store_text(self.s)

    def roster_documents(self) -> dict[int, str]:
        from sqlmodel import select

        from custody.store.models import RosterRow

        return dict(self.s.exec(select(RosterRow.serial, RosterRow.document)).all())

    def halt(self, halt_id: int) -> HaltRecord | None:
        from custody.store.models import HaltRow

        return self.s.get(HaltRow, halt_id)

    def active_halts(self) -> Sequence[HaltRecord]:
        return active_halts(self.s)

    def lift_employees(self, halt_id: int) -> list[str]:
        from sqlmodel import col, select

        from custody.store.models import HaltLift

        query = select(HaltLift.employee).where(HaltLift.halt_id == halt_id).order_by(col(HaltLift.id))
        return list(self.s.exec(query).all())

    def pinned_manifest(self) -> Path | None:
        from custody.store.db import PINNED_MANIFEST

        pinned: Path | None = self.s.info.get(PINNED_MANIFEST)
        return pinned


def _rows(s: Session | HaltRows) -> HaltRows:
    return s if isinstance(s, HaltRows) else OrmRows(s)


# ---------------------------------------------------------------- the halt state from the audit log


Lift = tuple[str, str | None, str]
"""One employee's signature in a ``halt.lifted`` entry: (employee, pubkey, signature)."""


@dataclass
class _Logged:
    """One halt as the audit log tells it."""

    id: int
    raised_at: str | None  # the lift statement's field (microseconds); None in logs before it was recorded
    at: str  # when the halt.raised entry was appended
    raised_by: str
    source: str
    reason: str
    lift_entries: list[tuple[int, list[Lift]]] = field(default_factory=list)  # every halt.lifted: (seq, lifts)
    signed: list[tuple[int, str, str]] = field(default_factory=list)  # halt.lift_signed: (seq, employee, signature)


@dataclass
class _Log:
    """What the audit log says of halts."""

    halts: list[_Logged]  # every halt, in log order
    by_id: dict[int, list[_Logged]]  # the halts raised under each id, in log order
    journal: frozenset[str]  # the journal ids it recorded
    unreadable: list[str]  # halt.raised entries it cannot read: each a halt of its own
    tampered: list[str]  # lift entries it cannot read: they lift nothing, and block nothing


def _read_log(s: Session | HaltRows) -> _Log:
    """Every halt of the log, and what it cannot read."""
    halts: list[_Logged] = []
    by_id: dict[int, list[_Logged]] = {}
    journal: set[str] = set()
    unreadable: list[str] = []
    tampered: list[str] = []
    for seq, at, event, actor, payload, signature in _rows(s).halt_entries():
        try:
            doc = json.loads(payload)
            halt_id = doc["halt_id"]
            if not isinstance(halt_id, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            if event == "halt.raised":  # perhaps a real halt, damaged: it stands (fail closed)
                unreadable.append(f"audit entry {seq} ({event}) cannot be read")
            else:  # a lift it cannot read lifts nothing; it must not hold a later valid lift back
                tampered.append(f"audit entry {seq} ({event}) cannot be read: {_OUTSIDE}")
            continue
        if event == "halt.raised":
            logged = _Logged(
                halt_id,
                doc.get("raised_at") if isinstance(doc.get("raised_at"), str) else None,
                iso(at) or "",
                actor,
                str(doc.get("source", "")),
                str(doc.get("reason", "")),
            )
            halts.append(logged)
            by_id.setdefault(halt_id, []).append(logged)
            if isinstance(doc.get("journal_id"), str):
                journal.add(doc["journal_id"])
            continue
        target = by_id.get(halt_id, [])
        if not target:
            continue  # a lift of a halt the log never raised changes nothing
        if event == "halt.lift_signed" and signature:
            target[-1].signed.append((seq, actor, signature))
        elif event == "halt.lifted":  # every one: a forged one before a valid one must not hide it
            target[-1].lift_entries.append((seq, _lifts_of(doc, target[-1], seq)))
    return _Log(halts, by_id, frozenset(journal), unreadable, tampered)


_OUTSIDE = "written outside the tool (run `custody audit log --verify`)"


def _lifts_of(doc: dict[str, Any], h: _Logged, seq: int) -> list[Lift]:
    """The signatures a ``halt.lifted`` entry (audit entry ``seq``) of ``h`` carries."""
    lifts = doc.get("lifts")
    if isinstance(lifts, list):
        return [
            (str(x.get("employee")), x.get("pubkey"), str(x.get("signature"))) for x in lifts if isinstance(x, dict)
        ]
    # a log from before lifts carried their signatures: the signed entries before it
    return [(name, None, sig) for at_seq, name, sig in h.signed if at_seq < seq]


Signers = dict[str, tuple[str | Credential, ...]]


def _roster_events(s: Session | HaltRows) -> list[tuple[int, Signers]]:
    """(seq, {name: keys}) of every founders' roster the log applied, oldest first: who could
    lift from that entry on (enabled, with the lift role) and with which keys (and security keys).
    An entry only says which roster (serial and digest); who is in it is read from that roster's
    document, whose founders' signatures are checked against its policy epoch's founders: an
    entry written by SQL, or a roster that does not stand, lets nobody lift. An entry of a
    founders' roster no newer than one applied before it (the tool applies serial + 1 only) is
    an older roster replayed by SQL, to give back a removed employee's key: it changes nothing."""
    events: list[tuple[int, Signers]] = []
    rows = _rows(s)
    entries = list(rows.roster_entries())
    governance = governance_from_text(*rows.governance_text(), rows.pinned_manifest()) if entries else None
    documents = rows.roster_documents() if governance else {}
    newest = 0
    for seq, payload in entries:
        lifters: Signers = {}
        try:
            logged = json.loads(payload)
            roster = _founders_roster(documents, governance, logged["serial"], logged["digest"])
            if roster is not None and roster.serial <= newest:
                continue
            newest = roster.serial if roster is not None else newest
            for e in roster.employees if roster else ():
                if e.may("lift"):
                    lifters[e.name] = (*e.keys, *e.webauthn)
        except (ValueError, KeyError, TypeError, InputError):
            lifters = {}  # an unreadable roster entry lets nobody lift
        events.append((seq, lifters))
    return events


def _founders_roster(
    documents: dict[int, str], governance: Governance | None, serial: object, digest: object
) -> Roster | None:
    """The applied roster ``serial`` when it is the one of ``digest`` and its founders signed it."""
    if governance is None or not isinstance(serial, int) or not isinstance(digest, str):
        return None
    document = documents.get(serial)
    return _standing_roster(document, digest, governance) if document is not None else None


@functools.lru_cache(maxsize=1024)
def _standing_roster(document: str, digest: str, governance: Governance) -> Roster | None:
    try:
        roster = load_roster(document.encode())
    except InputError:
        return None
    return roster if roster.digest == digest and not governance.problems(roster) else None


def _lifter_keys(events: list[tuple[int, Signers]], before: int) -> Signers:
    """Who could lift at log entry ``before``, with which keys: the roster in force then."""
    keys: Signers = {}
    for seq, lifters in events:
        if seq >= before:
            break
        keys = lifters
    return keys


@functools.lru_cache(maxsize=4096)
def _verifies(key: str | Credential, signature: str, statement: tuple[str | int, ...]) -> bool:
    if isinstance(key, Credential):  # a security key's WebAuthn assertion over the statement
        return signs_statement(key, signature, LIFT_DOMAIN, list(statement))
    return verify_statement(key, signature, LIFT_DOMAIN, list(statement))


def _named(key: str | Credential) -> str:
    """What a lift's ``pubkey`` says for ``key``: the public key, or the security key's fingerprint."""
    return key.fingerprint if isinstance(key, Credential) else key


@dataclass(frozen=True)
class _Lifted:
    """What the ``halt.lifted`` entries of one halt come to."""

    seq: int | None  # the first entry carrying LIFT_QUORUM valid signatures: it lifted the halt
    problem: str | None  # why none counts (None when one does, or there is none)
    void: list[tuple[int, str]]  # each entry that does not count, with why


def _lifted(s: Session | HaltRows, h: _Logged, events: list[tuple[int, Signers]]) -> _Lifted:
    """Which of the log's ``halt.lifted`` entries of ``h`` lifted it: the first that carries two
    distinct roster employees' valid signatures (by the roster in force at that entry). Every
    other entry lifts nothing and holds nothing back."""
    void: list[tuple[int, str]] = []
    statement = _statement(s, h) if h.lift_entries else None
    found: int | None = None
    for seq, lifts in h.lift_entries:
        why = _lift_problem(statement, lifts, _lifter_keys(events, seq))
        if why is not None:
            void.append((seq, why))
        elif found is None:
            found = seq
    return _Lifted(found, void[0][1] if void and found is None else None, void)


def _statement(s: Session | HaltRows, h: _Logged) -> tuple[str | int, ...] | None:
    """What a lift of ``h`` signs; None when the log cannot say."""
    raised_at = h.raised_at
    if raised_at is None:  # a log from before the field: the row's (its lifters signed that)
        row = _rows(s).halt(h.id)
        raised_at = iso(row.raised_at, "microseconds") if row is not None else None
    return None if raised_at is None else (h.id, raised_at, h.raised_by, h.reason)


def _lift_problem(statement: tuple[str | int, ...] | None, lifts: list[Lift], keys: Signers) -> str | None:
    """Why a lift carrying ``lifts`` of ``statement`` does not count with ``keys`` (None: it counts)."""
    if statement is None:
        return "its lift cannot be checked: the log does not say when it was raised"
    valid = {
        name
        for name, pubkey, signature in lifts
        if any(pubkey in (None, _named(k)) and _verifies(k, signature, statement) for k in keys.get(name, ()))
    }
    if len(valid) < LIFT_QUORUM:
        return f"its lift in the audit log carries {len(valid)} valid employee signature(s), not {LIFT_QUORUM}"
    return None


def lifted_validly(s: Session | HaltRows, h: _Logged) -> bool:
    """Whether the log holds ``h`` lifted by a valid ``halt.lifted`` entry (at any sequence)."""
    return bool(h.lift_entries) and _lifted(s, h, _roster_events(s)).seq is not None


class Derived(NamedTuple):
    """The halt state the audit log says (:func:`_derive`)."""

    halts: list[dict[str, Any]]
    """The active halts, each checked against its row."""
    recorded: frozenset[str]
    """The journal ids the log recorded."""
    tampered: list[str]
    """Halt entries that lift nothing and were not written by the tool: reported, never obeyed."""


def _derive(s: Session | HaltRows, seq: int) -> Derived:
    """The active halts as of audit entry ``seq``, each checked against its row; the journal ids
    the log recorded; the lift entries that are not the tool's. A row that says lifted when the
    log does not, a row deleted, a lift without two valid signatures: each stays a halt, with a
    ``problem``. A forged lift entry neither lifts its halt nor keeps a later valid lift from
    lifting it: it is reported in ``tampered``."""
    s = _rows(s)
    log = _read_log(s)
    halts, by_id = log.halts, log.by_id
    events = _roster_events(s) if any(h.lift_entries for h in halts) else []
    active: list[dict[str, Any]] = []
    tampered = list(log.tampered)
    seen: set[int] = set()
    for h in halts:
        seen.add(h.id)
        lifted = _lifted(s, h, events)
        tampered += [
            f"audit entry {n} (halt.lifted of halt #{h.id}) lifts nothing: {why}; {_OUTSIDE}" for n, why in lifted.void
        ]
        if lifted.seq is not None and lifted.seq <= seq:
            continue  # lifted, with two valid signatures, by an entry this state reflects
        problem = lifted.problem
        row = s.halt(h.id)
        if h is not by_id[h.id][-1]:
            problem = "a later halt was raised under its id (its row was replaced outside the tool)"
        elif not h.lift_entries and row is None:
            problem = "its row was deleted outside the tool"
        elif not h.lift_entries and row is not None and not row.active:
            problem = "its row says lifted; the audit log does not"
        active.append(_logged_dict(s, h, row, problem))
    for row in s.active_halts():
        if row.id not in seen:
            d = _halt_dict(s, row)
            d["problem"] = "its row is not in the audit log"
            active.append(d)
    for i, why in enumerate(log.unreadable):
        active.append(
            {
                "id": 0,
                "raised_at": None,
                "raised_by": "audit-log",
                "source": "audit-log",
                "reason": why,
                "active": True,
                "lift_signatures": [],
                "lifted_at": None,
                "problem": f"unreadable halt entry {i + 1}",
            }
        )
    active.sort(key=lambda d: d["id"])
    return Derived(active, log.journal, tampered)


def _logged_dict(s: HaltRows, h: _Logged, row: HaltRecord | None, problem: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": h.id,
        "raised_at": iso(row.raised_at) if row is not None else h.at,
        "raised_by": h.raised_by,
        "source": h.source,
        "reason": h.reason,
        "active": True,
        "lift_signatures": s.lift_employees(h.id),
        "lifted_at": None,
    }
    if problem:
        d["problem"] = problem
    return d


def _halt_dict(s: HaltRows, h: HaltRecord) -> dict[str, Any]:
    return {
        "id": h.id,
        "raised_at": iso(h.raised_at),
        "raised_by": h.raised_by,
        "source": h.source,
        "reason": h.reason,
        "active": h.active,
        "lift_signatures": s.lift_employees(h.id or 0),
        "lifted_at": iso(h.lifted_at),
    }
