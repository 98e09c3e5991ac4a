"""Lifting a halt: two distinct employees each sign its lift statement; the second signature lifts
it, resolves its incidents and publishes the new state to the halt file.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log
from custody.control.halt import HaltState, publish
from custody.control.halt_log import (
    LIFT_DOMAIN,
    LIFT_QUORUM,
    _named,
    _read_log,
    _verifies,
    lifted_validly,
)
from custody.control.roster import Trust, authenticate, check_pinned, load_trust, standing
from custody.errors import (
    Conflict,
    NotFound,
)
from custody.identity.employee_keys import EmployeeSigner
from custody.identity.statements import sign_statement, verify_statement
from custody.identity.webauthn import Credential
from custody.store.db import Database
from custody.store.models import AuditHead, HaltLift, HaltRow, IncidentRow, IncidentUpdate


def lift_statement(h: HaltRow) -> list[str | int]:
    """What a lift signs: this exact halt (id, when, by whom, why)."""
    return [h.id or 0, iso(h.raised_at, "microseconds") or "", h.raised_by, h.reason]


@dataclass(frozen=True)
class LiftResult:
    halt_id: int
    signers: list[str]
    lifted: bool
    needed: int
    state: HaltState | None


def lift(db: Database, settings: Settings, halt_id: int, name: str, key: EmployeeSigner) -> LiftResult:
    """Add ``name``'s signed consent to lift halt ``halt_id``; lift it at two distinct employees
    of the founders' roster with the lift role.

    The same employee twice counts once; the consent of one who is no longer allowed to lift
    (disabled, suspended, the role or key taken away by a later roster) no longer counts.
    Raises NotFound, Conflict (not active), ApprovalError, VerificationFailed.
    """
    trust = load_trust(settings)
    with db.transaction() as s:
        h = s.exec(select(HaltRow).where(HaltRow.id == halt_id).with_for_update()).first()
        if h is None or not h.active:
            h = _restore_from_log(s, halt_id, h) or h
        if h is None:
            raise NotFound(f"no halt #{halt_id}")
        if not h.active:
            raise Conflict(f"halt #{halt_id} was lifted already")
        authenticate(s, check_pinned(s, trust), name, key, "lift")
        statement = lift_statement(h)
        signature = sign_statement(key, LIFT_DOMAIN, statement)
        existing = s.exec(select(HaltLift).where(HaltLift.halt_id == halt_id, HaltLift.employee == name)).first()
        if existing is not None and not (
            existing.pubkey == key.public_key.hex()
            and verify_statement(existing.pubkey, existing.signature, LIFT_DOMAIN, statement)
        ):
            s.delete(existing)  # a row this key did not sign (planted by SQL, or an old key): replaced
            s.flush()
            existing = None
        if existing is None:
            s.add(HaltLift(halt_id=halt_id, employee=name, pubkey=key.public_key.hex(), signature=signature, at=now()))
            audit_log.append(s, "halt.lift_signed", name, {"halt_id": halt_id}, signature)
            s.flush()
        signers, lifted = conclude_lift(s, trust, h)
    state = publish(db, settings) if lifted else None
    return LiftResult(halt_id, signers, lifted, LIFT_QUORUM, state)


def conclude_lift(s: Session, trust: Trust, h: HaltRow) -> tuple[list[str], bool]:
    """After a lift signature was added: the valid lifters, and the halt lifted (with its
    incidents resolved and the log entry) when they are enough."""
    halt_id = h.id or 0
    signers = _valid_lifters(s, trust, h)
    lifted = len(signers) >= LIFT_QUORUM
    if lifted:
        h.active = False
        h.lifted_at = now()
        s.add(h)
        _resolve_incidents(s, h, signers)
        lifts = [
            {"employee": x.employee, "pubkey": x.pubkey, "signature": x.signature}
            for x in s.exec(select(HaltLift).where(HaltLift.halt_id == halt_id).order_by(col(HaltLift.id)))
            if x.employee in signers
        ]
        audit_log.append(s, "halt.lifted", ",".join(signers), {"halt_id": halt_id, "signers": signers, "lifts": lifts})
    return signers, lifted


def _restore_from_log(s: Session, halt_id: int, row: HaltRow | None) -> HaltRow | None:
    """A halt the log holds active whose row was deleted or marked lifted outside the tool:
    its row made active again from the log (recorded), so that two employees can lift it.
    None when the log does not hold it active."""
    s.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()
    logged = _read_log(s).by_id.get(halt_id, [])
    if not logged or lifted_validly(s, logged[-1]):
        return None
    h = logged[-1]
    if row is None:
        raised_at = _parse_time(h.raised_at or h.at)
        row = HaltRow(id=halt_id, raised_at=raised_at, raised_by=h.raised_by, source=h.source, reason=h.reason)
    row.active, row.lifted_at = True, None
    s.add(row)
    s.flush()
    audit_log.append(s, "halt.restored", "tool", {"halt_id": halt_id, "why": "its row disagreed with the audit log"})
    return row


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _valid_lifters(s: Session, trust: Trust, h: HaltRow) -> list[str]:
    """Distinct employees who may lift now (founders' roster, lift role, enabled, not suspended)
    whose lift signature verifies with one of their roster keys."""
    st = standing(s, trust)
    signers: list[str] = []
    statement = tuple(lift_statement(h))
    for lift_row in s.exec(select(HaltLift).where(HaltLift.halt_id == h.id)).all():
        e = st.roster.employee(lift_row.employee) if st.roster else None
        if e is None or st.refusal(e.name, "lift") is not None:
            continue
        mine: tuple[str | Credential, ...] = (*e.keys, *e.webauthn)
        keys = [k for k in mine if _named(k) == lift_row.pubkey]
        if keys and _verifies(keys[0], lift_row.signature, statement) and e.name not in signers:
            signers.append(e.name)
    return signers


def _resolve_incidents(s: Session, h: HaltRow, signers: list[str]) -> None:
    for incident in s.exec(select(IncidentRow).where(IncidentRow.halt_id == h.id)).all():
        if incident.status != "resolved":
            incident.status = "resolved"
            incident.resolved_at = h.lifted_at
            s.add(incident)
            s.add(
                IncidentUpdate(
                    incident_id=incident.id or 0,
                    at=h.lifted_at or now(),
                    status="resolved",
                    message=f"Halt #{h.id} lifted by {' and '.join(signers)}",
                    actor=",".join(signers),
                )
            )
