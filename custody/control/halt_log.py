"""The halt state as the audit log says it: a halt stands from its ``halt.raised`` entry until a
``halt.lifted`` entry that carries two distinct employees' valid signatures of its lift, by the
roster in force when they signed. The ``halt`` table is checked against this on every read.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from custody.clock import iso
from custody.errors import (
    InputError,
)
from custody.identity.statements import verify_statement
from custody.identity.webauthn import Credential, parse_credential, signs_statement
from custody.store.models import AuditEntry, HaltLift, HaltRow

LIFT_QUORUM = 2
LIFT_DOMAIN = "custody/halt-lift/v1"


def active_halts(s: Session) -> list[HaltRow]:
    return list(s.exec(select(HaltRow).where(col(HaltRow.active)).order_by(col(HaltRow.id))).all())


# ---------------------------------------------------------------- the halt state from the audit log

_HALT_EVENTS = ("halt.raised", "halt.lift_signed", "halt.lifted")
_ROSTER_EVENT = "roster.applied"


@dataclass
class _Logged:
    """One halt as the audit log tells it."""

    id: int
    raised_at: str | None  # the lift statement's field (microseconds); None in logs before it was recorded
    at: str  # when the halt.raised entry was appended
    raised_by: str
    source: str
    reason: str
    lifted_seq: int | None = None
    lifts: list[tuple[str, str | None, str]] = field(default_factory=list)  # (employee, pubkey, signature)
    signed: list[tuple[int, str, str]] = field(default_factory=list)  # halt.lift_signed: (seq, employee, signature)


def _read_log(s: Session) -> tuple[list[_Logged], dict[int, list[_Logged]], frozenset[str], list[str]]:
    """Every halt of the log; by id; the journal ids it recorded; entries it cannot read."""
    halts: list[_Logged] = []
    by_id: dict[int, list[_Logged]] = {}
    journal: set[str] = set()
    unreadable: list[str] = []
    rows = s.exec(select(AuditEntry).where(col(AuditEntry.event).in_(_HALT_EVENTS)).order_by(col(AuditEntry.seq))).all()
    for e in rows:
        seq, at, event, actor, payload, signature = e.seq, e.at, e.event, e.actor, e.payload, e.signature
        try:
            doc = json.loads(payload)
            halt_id = doc["halt_id"]
            if not isinstance(halt_id, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            unreadable.append(f"audit entry {seq} ({event}) cannot be read")
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
        elif event == "halt.lifted" and target[-1].lifted_seq is None:
            target[-1].lifted_seq = seq
            lifts = doc.get("lifts")
            if isinstance(lifts, list):
                target[-1].lifts = [
                    (str(x.get("employee")), x.get("pubkey"), str(x.get("signature")))
                    for x in lifts
                    if isinstance(x, dict)
                ]
            else:  # a log from before lifts carried their signatures: the signed entries before it
                target[-1].lifts = [(name, None, sig) for at_seq, name, sig in target[-1].signed if at_seq < seq]
    return halts, by_id, frozenset(journal), unreadable


Signers = dict[str, tuple[str | Credential, ...]]


def _roster_events(s: Session) -> list[tuple[int, Signers]]:
    """(seq, {name: keys}) of every founders' roster the log applied, oldest first: who could
    lift from that entry on (enabled, with the lift role) and with which keys (and security keys)."""
    events: list[tuple[int, Signers]] = []
    rows = s.exec(
        select(AuditEntry.seq, AuditEntry.payload)
        .where(AuditEntry.event == _ROSTER_EVENT)
        .order_by(col(AuditEntry.seq))
    ).all()
    for seq, payload in rows:
        lifters: Signers = {}
        try:
            for e in json.loads(payload)["employees"]:
                if e["enabled"] is True and "lift" in e["roles"]:
                    creds = tuple(parse_credential(c, "roster") for c in e.get("webauthn", []))
                    lifters[str(e["name"])] = (*(str(k) for k in e["keys"]), *creds)
        except (ValueError, KeyError, TypeError, InputError):
            lifters = {}  # an unreadable roster entry lets nobody lift
        events.append((seq, lifters))
    return events


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


def _lift_problem(s: Session, h: _Logged, events: list[tuple[int, Signers]]) -> str | None:
    """Why the log's lift of ``h`` does not count (None: it counts)."""
    raised_at = h.raised_at
    if raised_at is None:  # a log from before the field: the row's (its lifters signed that)
        row = s.get(HaltRow, h.id)
        raised_at = iso(row.raised_at, "microseconds") if row is not None else None
    if raised_at is None:
        return "its lift cannot be checked: the log does not say when it was raised"
    statement: tuple[str | int, ...] = (h.id, raised_at, h.raised_by, h.reason)
    keys = _lifter_keys(events, h.lifted_seq or 0)
    valid = {
        name
        for name, pubkey, signature in h.lifts
        if any(pubkey in (None, _named(k)) and _verifies(k, signature, statement) for k in keys.get(name, ()))
    }
    if len(valid) < LIFT_QUORUM:
        return f"its lift in the audit log carries {len(valid)} valid employee signature(s), not {LIFT_QUORUM}"
    return None


def _derive(s: Session, seq: int) -> tuple[list[dict[str, Any]], frozenset[str]]:
    """The active halts as of audit entry ``seq``, each checked against its row; and the
    journal ids the log recorded. A row that says lifted when the log does not, a row
    deleted, a lift without two valid signatures: each stays a halt, with a ``problem``."""
    halts, by_id, journal, unreadable = _read_log(s)
    events = _roster_events(s) if any(h.lifted_seq is not None for h in halts) else []
    active: list[dict[str, Any]] = []
    seen: set[int] = set()
    for h in halts:
        seen.add(h.id)
        problem = _lift_problem(s, h, events) if h.lifted_seq is not None else None
        if h.lifted_seq is not None and h.lifted_seq <= seq and problem is None:
            continue  # lifted, with two valid signatures, by the entry this state reflects
        row = s.get(HaltRow, h.id)
        if h is not by_id[h.id][-1]:
            problem = "a later halt was raised under its id (its row was replaced outside the tool)"
        elif h.lifted_seq is None and row is None:
            problem = "its row was deleted outside the tool"
        elif h.lifted_seq is None and row is not None and not row.active:
            problem = "its row says lifted; the audit log does not"
        active.append(_logged_dict(s, h, row, problem))
    for row in active_halts(s):
        if row.id not in seen:
            d = _halt_dict(s, row)
            d["problem"] = "its row is not in the audit log"
            active.append(d)
    for i, why in enumerate(unreadable):
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
    return active, journal


def _logged_dict(s: Session, h: _Logged, row: HaltRow | None, problem: str | None) -> dict[str, Any]:
    lifts = s.exec(select(HaltLift).where(HaltLift.halt_id == h.id).order_by(col(HaltLift.id))).all()
    d: dict[str, Any] = {
        "id": h.id,
        "raised_at": iso(row.raised_at) if row is not None else h.at,
        "raised_by": h.raised_by,
        "source": h.source,
        "reason": h.reason,
        "active": True,
        "lift_signatures": [lift.employee for lift in lifts],
        "lifted_at": None,
    }
    if problem:
        d["problem"] = problem
    return d


def _halt_dict(s: Session, h: HaltRow) -> dict[str, Any]:
    lifts = s.exec(select(HaltLift).where(HaltLift.halt_id == h.id).order_by(col(HaltLift.id))).all()
    return {
        "id": h.id,
        "raised_at": iso(h.raised_at),
        "raised_by": h.raised_by,
        "source": h.source,
        "reason": h.reason,
        "active": h.active,
        "lift_signatures": [lift.employee for lift in lifts],
        "lifted_at": iso(h.lifted_at),
    }
