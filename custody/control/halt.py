"""The trading halt: persistent, fail-closed, readable by the trading engine.

A halt lives in the store until two distinct registered employees each sign its lift. It is
mirrored to a halt file (JSON, written atomically) that a trading engine polls: the engine
must trade only while that file exists, parses, and says ``"halted": false``. An optional
hook command runs after every change.

Every entry point that moves custody state (issuance, approvals, signing, broadcast) calls
:func:`guard` inside its transaction; when the halt state cannot be read, the answer is
"halted".
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, func, select

from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log
from custody.control.roster import Trust, authenticate, check_pinned, load_trust, standing
from custody.errors import (
    ApprovalError,
    Conflict,
    CustodyError,
    HaltedError,
    InputError,
    NotFound,
)
from custody.faults import crash_point
from custody.identity.employee_keys import EmployeeSigner
from custody.identity.statements import sign_statement, verify_statement
from custody.store.db import Database
from custody.store.models import AuditEntry, AuditHead, HaltLift, HaltRow, IncidentRow, IncidentUpdate

LIFT_QUORUM = 2
COMPONENTS = ("address-issuance", "address-verification", "withdrawals", "trading")
STATUSES = ("investigating", "identified", "monitoring", "resolved")
SOURCES = ("employee", "verification", "ledger", "reserves", "audit-log")
RAISE_DOMAIN = "custody/halt-raise/v1"
LIFT_DOMAIN = "custody/halt-lift/v1"


def active_halts(s: Session) -> list[HaltRow]:
    return list(s.exec(select(HaltRow).where(col(HaltRow.active)).order_by(col(HaltRow.id))).all())


def guard(s: Session) -> None:
    """Refuse (HaltedError, exit 3) while trading is halted or the halt state is unreadable.

    It first takes the audit log head's row lock, which raising a halt also takes: a halt
    committed before this transaction got the lock is seen here, and one raised after it
    waits for this transaction. So the halt wins every race, on PostgreSQL as on SQLite.
    """
    try:
        head = s.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()
        _check_log_tip(s, head)
        halts = active_halts(s)
    except SQLAlchemyError as exc:
        raise HaltedError(f"the halt state cannot be read ({type(exc).__name__}): treated as halted") from None
    if halts:
        h = halts[0]
        more = f" (and {len(halts) - 1} more)" if len(halts) > 1 else ""
        raise HaltedError(
            f"trading is halted: halt #{h.id} raised by {h.raised_by} at {iso(h.raised_at)}: {h.reason}{more}"
        )


def _check_log_tip(s: Session, head: AuditHead | None) -> None:
    """Fail closed when the audit log runs past its head (an entry forged at the end).

    The caller holds the head's row lock (guard), so no append can come in between. One
    primary-key lookup; the full chain check is `custody audit log --verify`.
    """
    tip = s.exec(select(func.max(AuditEntry.seq))).one()
    if head is None or (tip or 0) != head.seq:
        raise HaltedError(_LOG_PAST_HEAD)


_LOG_PAST_HEAD = (
    "the audit log does not end at its head (an entry was added or removed behind the tool's back): "
    "treated as halted; run `custody audit log --verify`"
)


def _log_consistent(s: Session) -> bool:
    """The same check without a lock: head and tip read in ONE statement, one snapshot, so an
    append committing meanwhile cannot make them look apart (PostgreSQL reads each statement
    anew under READ COMMITTED)."""
    row = s.execute(
        text("SELECT h.seq, (SELECT MAX(e.seq) FROM audit_log AS e) FROM audit_head AS h WHERE h.id = 1")
    ).first()
    return row is not None and (row[1] or 0) == row[0]


def ensure_running(db: Database) -> None:
    """Refuse (HaltedError) while halted or when the store cannot be read."""
    try:
        with db.transaction() as s:
            guard(s)
    except HaltedError:
        raise
    except CustodyError as exc:
        raise HaltedError(f"the halt state cannot be read ({exc}): treated as halted") from None


@dataclass
class HaltState:
    """What ``custody halt status`` shows and the halt file mirrors."""

    halted: bool
    halts: list[dict[str, Any]]
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": "custody-halt-state",
            "version": 1,
            "halted": self.halted,
            "updated_at": iso(now()),
            "halts": self.halts,
        }
        if self.error:
            doc["error"] = self.error
        return doc


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


def read_state(db: Database) -> HaltState:
    """The halt state from the store; unreadable means halted (with the error)."""
    try:
        db.check_schema()
        with db.transaction() as s:
            if not _log_consistent(s):
                raise HaltedError(_LOG_PAST_HEAD)
            halts = [_halt_dict(s, h) for h in active_halts(s)]
        return HaltState(bool(halts), halts)
    except CustodyError as exc:
        return HaltState(True, [], error=f"halt state unreadable: {exc}")


def write_halt_file(path: Path, state: HaltState) -> None:
    """Write the mirror atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state.to_dict(), fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish(db: Database, settings: Settings, state: HaltState | None = None) -> HaltState:
    """Mirror the current state to the halt file and run the hook; return the state.

    Failures to write or to run the hook do not undo the halt; they come back as warnings.
    """
    state = state or read_state(db)
    try:
        write_halt_file(settings.halt_file, state)
    except OSError as exc:
        state.warnings.append(f"could not write the halt file {settings.halt_file}: {exc.strerror}")
    if settings.halt_hook:
        env = dict(os.environ, CUSTODY_HALTED="1" if state.halted else "0", CUSTODY_HALT_FILE=str(settings.halt_file))
        try:
            result = subprocess.run(
                shlex.split(settings.halt_hook), env=env, timeout=30, capture_output=True, check=False
            )
            if result.returncode != 0:
                state.warnings.append(f"halt hook exited with {result.returncode}")
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            state.warnings.append(f"halt hook failed: {exc}")
    return state


@dataclass(frozen=True)
class RaisedHalt:
    id: int | None
    state: HaltState


def _open_incident(s: Session, halt: HaltRow, components: tuple[str, ...]) -> None:
    incident = IncidentRow(
        halt_id=halt.id,
        title=f"Trading halted: {halt.reason[:200]}",
        status="investigating",
        components=json.dumps(list(components)),
        opened_at=halt.raised_at,
    )
    s.add(incident)
    s.flush()
    s.add(
        IncidentUpdate(
            incident_id=incident.id or 0,
            at=halt.raised_at,
            status="investigating",
            message=f"Halt #{halt.id} raised by {halt.raised_by} ({halt.source}): {halt.reason}",
            actor=halt.raised_by,
        )
    )


def raise_halt(
    db: Database,
    settings: Settings,
    *,
    reason: str,
    source: str,
    actor: str,
    signature: str | None = None,
    components: tuple[str, ...] = COMPONENTS,
) -> RaisedHalt:
    """Record a halt and publish it. The halt file says halted even if the store fails.

    Raises InputError for an empty reason or unknown source; StorageError (after writing
    the halt file as halted) when the store cannot record it.
    """
    reason = reason.strip()
    if not reason:
        raise InputError("a halt needs a reason")
    if source not in SOURCES:
        raise InputError(f"unknown halt source {source!r}")
    # Fail closed first: the engine stops before the store records why. A crash between
    # here and the commit leaves the engine halted and the store not: safe, and the next
    # publish (any `custody halt status`) makes them agree again.
    try:
        write_halt_file(settings.halt_file, HaltState(True, [{"reason": reason, "source": source, "pending": True}]))
    except OSError:
        pass  # reported by publish() below
    try:
        with db.transaction() as s:
            halt = HaltRow(
                raised_at=now(),
                raised_by=actor,
                source=source,
                reason=reason,
                signature=signature,
                active=True,
            )
            s.add(halt)
            s.flush()
            _open_incident(s, halt, components)
            audit_log.append(
                s,
                "halt.raised",
                actor,
                {"halt_id": halt.id, "source": source, "reason": reason, "components": list(components)},
                signature,
            )
            halt_id = halt.id
        crash_point("halt.stored")
    except CustodyError as exc:
        # Fail closed: the engine must stop even when the store cannot record why.
        publish(db, settings, HaltState(True, [], error=f"halt could not be stored: {exc}; reason: {reason}"))
        raise
    return RaisedHalt(halt_id, publish(db, settings))


def raise_by_employee(db: Database, settings: Settings, name: str, key: EmployeeSigner, reason: str) -> RaisedHalt:
    """Any single enabled, unsuspended employee of the founders' roster may halt trading; the
    request is signed.

    Raises NotFound / ApprovalError when the employee or key does not check out.
    """
    reason = reason.strip()
    if not reason:
        raise InputError("a halt needs a reason")
    at = iso(now(), "microseconds") or ""
    signature = sign_statement(key, RAISE_DOMAIN, [name, reason, at])
    trust = load_trust(settings)
    with db.transaction() as s:
        authenticate(s, trust, name, key, None)
        if not verify_statement(key.public_key.hex(), signature, RAISE_DOMAIN, [name, reason, at]):
            raise ApprovalError("the halt request's signature does not verify")
    return raise_halt(db, settings, reason=reason, source="employee", actor=name, signature=signature)


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
        signers = _valid_lifters(s, trust, h)
        lifted = len(signers) >= LIFT_QUORUM
        if lifted:
            h.active = False
            h.lifted_at = now()
            s.add(h)
            _resolve_incidents(s, h, signers)
            audit_log.append(s, "halt.lifted", ",".join(signers), {"halt_id": halt_id, "signers": signers})
    state = publish(db, settings) if lifted else None
    return LiftResult(halt_id, signers, lifted, LIFT_QUORUM, state)


def _valid_lifters(s: Session, trust: Trust, h: HaltRow) -> list[str]:
    """Distinct employees who may lift now (founders' roster, lift role, enabled, not suspended)
    whose lift signature verifies with one of their roster keys."""
    st = standing(s, trust)
    signers: list[str] = []
    statement = lift_statement(h)
    for lift_row in s.exec(select(HaltLift).where(HaltLift.halt_id == h.id)).all():
        e = st.roster.employee(lift_row.employee) if st.roster else None
        if e is None or st.refusal(e.name, "lift") is not None or lift_row.pubkey not in e.keys:
            continue
        if verify_statement(lift_row.pubkey, lift_row.signature, LIFT_DOMAIN, statement) and e.name not in signers:
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


# ---------------------------------------------------------------- incidents and status view


def update_incident(db: Database, incident_id: int, status: str, message: str, actor: str) -> IncidentRow:
    """Add a timestamped update to an incident.

    Raises InputError (unknown status, empty message), NotFound, Conflict (resolving an
    incident whose halt is still active, or updating a resolved one).
    """
    if status not in STATUSES:
        raise InputError(f"unknown status {status!r}: expected one of {', '.join(STATUSES)}")
    if not message.strip():
        raise InputError("an incident update needs a message")
    with db.transaction() as s:
        incident = s.get(IncidentRow, incident_id)
        if incident is None:
            raise NotFound(f"no incident #{incident_id}")
        if incident.status == "resolved":
            raise Conflict(f"incident #{incident_id} is resolved")
        if status == "resolved" and incident.halt_id is not None:
            h = s.get(HaltRow, incident.halt_id)
            if h is not None and h.active:
                raise Conflict(
                    f"incident #{incident_id} cannot be resolved while halt #{h.id} is active: "
                    "lift the halt (two employees)"
                )
        at = now()
        incident.status = status
        if status == "resolved":
            incident.resolved_at = at
        s.add(incident)
        s.add(IncidentUpdate(incident_id=incident_id, at=at, status=status, message=message.strip(), actor=actor))
        audit_log.append(
            s, "incident.updated", actor, {"incident_id": incident_id, "status": status, "message": message}
        )
        return incident


def status_view(db: Database, recent: int = 10) -> dict[str, Any]:
    """Components (operational or halted) and open and recent incidents with their timelines."""
    state = read_state(db)
    incidents: list[dict[str, Any]] = []
    halted_components: set[str] = set()
    if state.error is None:
        with db.transaction() as s:
            rows = s.exec(select(IncidentRow).order_by(col(IncidentRow.id).desc()).limit(recent)).all()
            open_rows = s.exec(select(IncidentRow).where(IncidentRow.status != "resolved")).all()
            for row in {r.id: r for r in [*open_rows, *rows]}.values():
                comps = json.loads(row.components)
                if row.status != "resolved":
                    halted_components.update(comps)
                updates = s.exec(
                    select(IncidentUpdate).where(IncidentUpdate.incident_id == row.id).order_by(col(IncidentUpdate.id))
                ).all()
                incidents.append(
                    {
                        "id": row.id,
                        "halt_id": row.halt_id,
                        "title": row.title,
                        "status": row.status,
                        "components": comps,
                        "opened_at": iso(row.opened_at),
                        "resolved_at": iso(row.resolved_at),
                        "updates": [
                            {"at": iso(u.at), "status": u.status, "message": u.message, "actor": u.actor}
                            for u in updates
                        ],
                    }
                )
    if state.halted:
        halted_components.update(COMPONENTS)
    incidents.sort(key=lambda i: i["id"], reverse=True)
    return {
        "halted": state.halted,
        "error": state.error,
        "components": {c: ("halted" if c in halted_components else "operational") for c in COMPONENTS},
        "incidents": incidents,
    }


def check_before_signing(db: Database, settings: Settings) -> str:
    """The halt check of the offline signer; returns what it consulted.

    Where this machine has a store or a halt file, a halt (or an unreadable state) refuses
    with HaltedError. A machine with neither is an offline signing machine: the halt is
    enforced again when the signatures are imported, finalized and broadcast.
    """
    consulted = []
    if settings.halt_file.exists():
        consulted.append(str(settings.halt_file))
        try:
            doc = json.loads(settings.halt_file.read_text(encoding="utf-8"))
            halted = doc.get("halted") is not False
        except (OSError, ValueError, AttributeError):
            halted = True
        if halted:
            raise HaltedError(f"trading is halted (halt file {settings.halt_file}): signing refused")
    if not db.is_sqlite or db.exists():
        consulted.append("store")
        ensure_running(db)
    return ", ".join(consulted) or "none (offline machine)"
