"""The trading halt: persistent, fail-closed, readable by the trading engine.

The audit log is the truth of the halt: a halt stands from its ``halt.raised`` entry until a
``halt.lifted`` entry that carries two distinct employees' valid signatures of its lift. The
``halt`` table is checked against the log on every read; a row deleted or marked lifted
outside the tool is still a halt.

The halt file (custody.control.halt_file) is the trading engine's lease: written first when
a halt is raised (before the store is asked), ordered by the audit log sequence it reflects,
and kept fresh by ``custody halt watch``. A halt the store could not record waits in that
file and is replayed into the store by the next command. An optional hook command runs on
every change, with an environment that carries no secret.

Every entry point that moves custody state (issuance, approvals, signing, broadcast) calls
:func:`guard` inside its transaction; when the halt state cannot be read, the answer is
"halted". The guard also refuses while a halt waits in the halt file for the store (a store
that will not record it must not let custody state move through it).

This module: the guard, the halt state and its file and hook, raising a halt. Beside it:
``halt_log`` (the state the audit log says), ``halt_lift`` (lifting by two signatures) and
``incidents`` (incidents and the status view).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, bindparam, text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, func, select

from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log, halt_file
from custody.control.halt_log import _HALT_EVENTS, _ROSTER_EVENT, _derive, _read_log
from custody.control.halt_state import HaltState as HaltState
from custody.control.halt_state import run_hook, write_out
from custody.control.roster import Trust, authenticate, load_trust, standing
from custody.errors import (
    ApprovalError,
    CustodyError,
    HaltedError,
    InputError,
    StorageError,
    StoreBusy,
)
from custody.faults import crash_point, pause_point
from custody.files import read_limited
from custody.identity.employee_keys import EmployeeSigner
from custody.identity.statements import sign_statement, verify_statement
from custody.identity.webauthn import signs_statement
from custody.store.db import HALT_FILE, Database
from custody.store.models import AuditEntry, AuditHead, HaltRow, IncidentRow, IncidentUpdate

COMPONENTS = ("address-issuance", "address-verification", "withdrawals", "trading")
SOURCES = ("employee", "verification", "ledger", "reserves", "audit-log", "journal")
RAISE_DOMAIN = "custody/halt-raise/v1"
MAX_REASON = 2000
"""A halt reason replayed from the halt file is cut to this many characters."""


def guard(s: Session, *, lock: bool = True) -> int:
    """Refuse (HaltedError, exit 3) while trading is halted or the halt state is unreadable.

    ``lock=False``: the same check without the head's lock (head and log tip read in one
    statement, as :func:`read_state` does, so a concurrent append cannot make them look
    apart), for a path that checks first, refusing before any work, and takes the locked
    guard later, before it writes.

    It first takes the audit log head's row lock, which raising a halt also takes: a halt
    committed before this transaction got the lock is seen here, and one raised after it
    waits for this transaction. So the halt wins every race, on PostgreSQL as on SQLite.
    The halt state is the audit log's, checked against the halt table, and the halt file's
    journal (:func:`_refuse_waiting`): a halt the store has not recorded refuses as well. That
    file is read once, without its lock; a halt journaled after the read is the next call's to
    see (the race the store's lock settles is with a halt the store records). Returns the
    audit entry the state was checked at (for :func:`guard_since`).
    """
    try:
        if lock:
            head = s.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()
            _check_log_tip(s, head)
            seq = head.seq if head else 0
        else:
            seq = _consistent_seq(s)
        derived = _derive(s, seq)
    except SQLAlchemyError as exc:
        raise HaltedError(f"the halt state cannot be read ({type(exc).__name__}): treated as halted") from None
    if derived.halts:
        raise HaltedError(_halted_message(derived.halts))
    _refuse_waiting(s, derived.recorded)
    return seq


def _refuse_waiting(s: Session, recorded: frozenset[str]) -> None:
    """Refuse (HaltedError) while a halt waits in the session's halt file (the Database's
    ``halt_file``) that the store has not recorded, by journal id as
    custody.control.halt_state.with_waiting matches them: a store that refuses to record a halt
    (down, full, or made to refuse by SQL) must not let custody state move through it. A halt
    file missing or unreadable is a halt too (the engine reads it so; `custody halt status`
    writes it again from the store). One read of the file, no statement."""
    path = s.info.get(HALT_FILE)
    if path is None:
        return
    current = halt_file.read(path)
    if current is None:
        raise HaltedError(
            f"the halt file {path} is missing or unreadable: treated as halted; `custody halt status` writes it "
            "again from the store"
        )
    waiting = [p for p in current.pending if p["id"] not in recorded]
    if waiting:
        p = waiting[0]
        more = f" (and {len(waiting) - 1} more)" if len(waiting) > 1 else ""
        raise HaltedError(
            f"trading is halted: a halt raised by {str(p.get('actor'))[:64]} at {str(p.get('at'))[:40]} waits in the "
            f"halt file {path} for the store, which has not recorded it: {str(p.get('reason'))[:MAX_REASON]}{more}"
        )


_NEWS = "(SELECT MAX(seq) FROM audit_log), EXISTS (SELECT 1 FROM audit_log WHERE seq > :seen AND event IN :events)"
_EVENTS: BindParameter[Any] = bindparam("events", value=(*_HALT_EVENTS, _ROSTER_EVENT), expanding=True)
_SINCE = text(f"SELECT {_NEWS}").bindparams(_EVENTS)
_SINCE_ALLOCATING = text(
    f"UPDATE counter SET next_value = next_value + :n WHERE name = :name RETURNING {_NEWS}, next_value"
).bindparams(_EVENTS)
_HEAD_LOCK = select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1).with_for_update()


@dataclass(frozen=True)
class Locked:
    """What :func:`guard_since` read under the head's row lock: the head (its seq and hash, for
    custody.control.audit_log.append_locked) and the first index it allocated, if asked."""

    head: tuple[int, str]
    first: int | None


def guard_since(s: Session, seen: int, allocate: tuple[str, int] | None = None) -> Locked:
    """:func:`guard` with the lock after ``seen = guard(s, lock=False)`` in this transaction:
    the head's row lock, the log's tip, and only what was appended after ``seen`` (a halt or
    roster entry there: the full check again; the halt file was read by that first guard).
    Two statements under the lock, not every halt:
    the lock (no ORM object), then one that reads the tip and what came since and, with
    ``allocate`` (a counter's name and a count), reserves that many indexes of the counter
    (lock order: the head, then the counter). It runs after the lock was granted, so it sees
    everything committed before (PostgreSQL takes a statement's snapshot when it starts).
    The halt wins every race as with :func:`guard` (a halt commits with its ``halt.raised``
    entry); a halt row written by SQL alone is the next full check's to see. Raises
    HaltedError, StorageError when the counter is missing."""
    try:
        head = s.execute(_HEAD_LOCK).first()
        if allocate is None:
            row = s.execute(_SINCE, {"seen": seen}).first()
        else:
            row = s.execute(_SINCE_ALLOCATING, {"seen": seen, "name": allocate[0], "n": allocate[1]}).first()
            if row is None:
                raise StorageError(f"the store has no counter {allocate[0]}: run `custody init`")
    except SQLAlchemyError as exc:
        raise HaltedError(f"the halt state cannot be read ({type(exc).__name__}): treated as halted") from None
    if head is None or row is None or (row[0] or 0) != head[0] or head[0] < seen:
        raise HaltedError(_LOG_PAST_HEAD)
    if row[1]:
        guard(s)
    return Locked((int(head[0]), str(head[1])), None if allocate is None else int(row[2]) - allocate[1])


def _halted_message(halts: list[dict[str, Any]]) -> str:
    h = halts[0]
    more = f" (and {len(halts) - 1} more)" if len(halts) > 1 else ""
    problem = f" [{h['problem']}]" if h.get("problem") else ""
    return (
        f"trading is halted: halt #{h['id']} raised by {h['raised_by']} at {h['raised_at']}: {h['reason']}"
        f"{problem}{more}"
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


def _consistent_seq(s: Session) -> int:
    """The head's seq, checked against the log's tip without a lock: head and tip read in ONE
    statement, one snapshot, so an append committing meanwhile cannot make them look apart
    (PostgreSQL reads each statement anew under READ COMMITTED). Raises HaltedError."""
    row = s.execute(
        text("SELECT h.seq, (SELECT MAX(e.seq) FROM audit_log AS e) FROM audit_head AS h WHERE h.id = 1")
    ).first()
    if row is None or (row[1] or 0) != row[0]:
        raise HaltedError(_LOG_PAST_HEAD)
    return int(row[0])


def ensure_running(db: Database) -> None:
    """Refuse (HaltedError) while halted or when the store cannot be read."""
    try:
        with db.transaction() as s:
            guard(s)
    except HaltedError:
        raise
    except CustodyError as exc:
        raise HaltedError(f"the halt state cannot be read ({exc}): treated as halted") from None


"""Employees by name with their keys: secp256k1 public keys (hex) and security keys."""


# ---------------------------------------------------------------- the state, the halt file, the hook


def read_state(db: Database) -> HaltState:
    """The halt state from the store, read without waiting behind a writer; unreadable means
    halted (with the error), a store locked elsewhere means unknown (``unknown``, and halted
    for the library's callers)."""
    try:
        db.check_schema()
        with db.transaction(read_only=True) as s:
            return state_in(s)
    except StoreBusy as exc:
        return HaltState(True, [], error=f"halt state unknown: {exc}", unknown=True)
    except CustodyError as exc:
        return HaltState(True, [], error=f"halt state unreadable: {exc}")


def state_in(s: Session) -> HaltState:
    """The halt state as of the snapshot of ``s`` (a read transaction), for a caller that reads
    more in that snapshot (custody.service.halt_read). Raises HaltedError when the log does not
    end at its head, and what the session raises."""
    seq = _consistent_seq(s)
    halts, recorded, tampered = _derive(s, seq)
    return HaltState(bool(halts), halts, seq=seq, recorded=recorded, warnings=tampered)


def publish(
    db: Database,
    settings: Settings,
    state: HaltState | None = None,
    *,
    hook: bool | None = True,
    lease: float | None = None,
) -> HaltState:
    """Replay the halts waiting in the halt file into the store, read the state, write the
    halt file (never over a newer one) and run the hook: always (``hook=True``), on a change
    of the file's ``halted`` (None), or never (False). Returns the state as written.

    Failures to write or to run the hook do not undo a halt; they come back as warnings.
    """
    warnings = replay_pending(db, settings)
    state = state or read_state(db)
    pause_point("halt.state_read")
    state.warnings[:0] = warnings
    return write_out(settings, state, lambda: read_state(db), hook=hook, lease=lease)


def watch(
    db: Database,
    settings: Settings,
    *,
    interval: float,
    lease: float,
    stop: Callable[[float], bool],
    report: Callable[[HaltState, bool], None],
) -> None:
    """Keep the halt file fresh from the store: publish every ``interval`` seconds with a
    lease of ``lease`` seconds, until ``stop(interval)`` (which waits) returns True.
    ``report(state, changed)`` hears of every round. The hook runs when ``halted`` changes.
    Raises InputError when the lease does not outlast the interval."""
    if lease <= interval:
        raise InputError(f"the lease ({lease:g} s) must be longer than the interval ({interval:g} s)")
    last: bool | None = None
    while True:
        state = publish(db, settings, hook=None, lease=lease)
        report(state, last != state.halted)
        last = state.halted
        if stop(interval):
            return


# ---------------------------------------------------------------- raising a halt, first in the halt file


@dataclass(frozen=True)
class RaisedHalt:
    """``id`` is None when the store did not record the halt (it waits in the halt file)."""

    id: int | None
    state: HaltState
    stored: bool = True
    engine_halted: bool = True
    """The halt file says halted, or is gone (which an engine reads as halted)."""
    problems: tuple[str, ...] = ()

    def describe(self) -> str:
        """One sentence on where the halt stands, for the messages of the commands."""
        if not self.engine_halted:
            where = "in the store" if self.stored else "NOWHERE"
            return (
                f"THE HALT COULD NOT BE WRITTEN to the halt file (recorded {where}; the trading engine on this "
                f"machine may still trade): {'; '.join(self.problems)}"
            )
        if not self.stored:
            return (
                "trading is halted on this machine (the halt file says so), but the store could not record the "
                f"halt ({'; '.join(self.problems)}): it waits in the halt file and reaches the store at the next "
                "command or `custody halt watch`"
            )
        return f"trading is halted (halt #{self.id})"


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
    at: str | None = None,
    components: tuple[str, ...] = COMPONENTS,
) -> RaisedHalt:
    """Halt trading: the halt file (and the hook) first, then the store, then the file again.

    Never raises for a failure to write: a crash, a full disk, a read-only store or a dead
    database after the first step leaves the engine halted and the halt waiting in the halt
    file for the store; what failed is in the result's ``problems``. Raises InputError for an
    empty reason or an unknown source.
    """
    reason = reason.strip()
    if not reason:
        raise InputError("a halt needs a reason")
    if source not in SOURCES:
        raise InputError(f"unknown halt source {source!r}")
    entry: dict[str, Any] = {
        "id": secrets.token_hex(16),
        "at": at or iso(now(), "microseconds"),
        "source": source,
        "actor": actor,
        "reason": reason,
        "signature": signature,
        "components": list(components),
    }
    problems: list[str] = []
    first = halt_file.add_pending(settings.halt_file, entry, lease=settings.halt_lease)
    if not first.written:
        problems.append(first.error or "the halt file was not written")
    hooked = run_hook(settings, True, None)
    if hooked:
        problems.append(hooked)
    crash_point("halt.published")
    halt_id: int | None = None
    try:
        halt_id = _record(db, entry, _trust(settings))
        crash_point("halt.stored")
    except CustodyError as exc:
        problems.append(f"the store could not record it: {exc}")
    if halt_id is not None:
        state = publish(db, settings, hook=None)
    else:
        state = HaltState(True, [], error="the store could not record the halt", pending=[entry], file=first.doc)
    state.warnings.extend(w for w in first.warnings if w not in state.warnings)
    current = halt_file.read(settings.halt_file)
    engine_halted = not settings.halt_file.exists() or current is None or current.halted
    return RaisedHalt(halt_id, state, halt_id is not None, engine_halted, tuple(problems))


def _record(db: Database, entry: dict[str, Any], trust: Trust | None) -> int:
    """Record one journaled halt in the store, once (its journal id is in the log); return
    its id. A halt signed by an employee is checked against their registered key; one that
    does not check out is recorded all the same, as an unverified request (source journal).
    Raises StorageError (and any CustodyError of the store)."""
    with db.transaction() as s:
        s.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()
        for payload in s.exec(select(AuditEntry.payload).where(AuditEntry.event == "halt.raised")):
            try:
                doc = json.loads(payload)
                if doc.get("journal_id") == entry["id"]:
                    return int(doc["halt_id"])
            except (ValueError, TypeError, KeyError, AttributeError):
                continue  # an unreadable entry is a halt of its own (see _derive)
        source, actor, reason = _checked_origin(s, entry, trust)
        components = tuple(c for c in entry.get("components") or COMPONENTS if c in COMPONENTS) or COMPONENTS
        signature = entry.get("signature") if isinstance(entry.get("signature"), str) else None
        halt = HaltRow(
            id=_next_halt_id(s),
            raised_at=now(),
            raised_by=actor,
            source=source,
            reason=reason,
            signature=signature,
            active=True,
        )
        s.add(halt)
        s.flush()
        s.refresh(halt)  # raised_at as the store gives it back: what a lift will sign
        _open_incident(s, halt, components)
        audit_log.append(
            s,
            "halt.raised",
            actor,
            {
                "halt_id": halt.id,
                "source": source,
                "reason": reason,
                "components": list(components),
                "raised_at": iso(halt.raised_at, "microseconds"),
                "journal_id": entry["id"],
                "requested_at": str(entry.get("at", "")),
            },
            signature,
        )
        return int(halt.id or 0)


def _next_halt_id(s: Session) -> int:
    """An id no halt ever had, by the table or the log (the caller holds the head's lock):
    SQLite would hand a deleted last row's id out again, and a lift signed for the old halt
    must never apply to a new one."""
    in_table = s.exec(select(func.max(HaltRow.id))).one() or 0
    in_log = max((h.id for h in _read_log(s).halts), default=0)
    return max(in_table, in_log) + 1


def _checked_origin(s: Session, entry: dict[str, Any], trust: Trust | None) -> tuple[str, str, str]:
    """(source, actor, reason) of a journaled halt; an employee's signature checked against
    their keys in the founders' roster (any enabled, unsuspended employee may halt)."""
    reason = str(entry.get("reason") or "").strip()[:MAX_REASON] or "(no reason given)"
    source = str(entry.get("source") or "")
    actor = str(entry.get("actor") or "")[:64] or "journal"
    if source not in SOURCES:
        return "journal", "journal", f"halt of unknown source {source[:32]!r} from the halt file: {reason}"
    if source != "employee":
        return source, actor, reason
    signature = entry.get("signature")
    statement = [actor, reason, str(entry.get("at"))]
    try:
        st = standing(s, trust) if trust is not None else None
    except CustodyError:
        st = None
    e = st.roster.employee(actor) if st is not None and st.roster is not None else None
    if (
        st is not None
        and e is not None
        and st.refusal(actor, None) is None
        and isinstance(signature, str)
        and (
            any(verify_statement(k, signature, RAISE_DOMAIN, statement) for k in e.keys)
            or any(signs_statement(c, signature, RAISE_DOMAIN, statement) for c in e.webauthn)
        )
    ):
        return "employee", actor, reason
    return "journal", "journal", f"unverified halt request from the halt file (signed as {actor}): {reason}"


def _trust(settings: Settings) -> Trust | None:
    """The pinned founders' manifest, or None where it cannot be read (a journaled employee
    halt is then recorded as unverified)."""
    try:
        return load_trust(settings)
    except CustodyError:
        return None


def replay_pending(db: Database, settings: Settings) -> list[str]:
    """Record in the store every halt waiting in the halt file; returns warnings (the store
    is down: they keep waiting, and the halt file keeps saying halted)."""
    waiting = halt_file.pending(settings.halt_file)
    if not waiting:
        return []
    trust = _trust(settings)
    for entry in waiting:
        try:
            _record(db, entry, trust)
        except CustodyError as exc:
            return [f"{len(waiting)} halt(s) wait in the halt file for the store, which cannot record them: {exc}"]
    return []


def raise_by_employee(db: Database, settings: Settings, name: str, key: EmployeeSigner, reason: str) -> RaisedHalt:
    """Any single enabled, unsuspended employee of the founders' roster may halt trading; the
    request is signed.

    With the store down, the signed request halts this machine's engine at once and is
    checked when the store records it. Raises NotFound / ApprovalError when the employee or
    key does not check out.
    """
    reason = reason.strip()
    if not reason:
        raise InputError("a halt needs a reason")
    at = iso(now(), "microseconds") or ""
    signature = sign_statement(key, RAISE_DOMAIN, [name, reason, at])
    trust = load_trust(settings)
    try:
        with db.transaction() as s:
            authenticate(s, trust, name, key, None)
            if not verify_statement(key.public_key.hex(), signature, RAISE_DOMAIN, [name, reason, at]):
                raise ApprovalError("the halt request's signature does not verify")
    except StorageError:
        pass  # the store is down: halt first; the store checks the signature when it records it
    return raise_halt(db, settings, reason=reason, source="employee", actor=name, signature=signature, at=at)


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
            doc = json.loads(read_limited(settings.halt_file, halt_file.MAX_BYTES, "halt file"))
            halted = doc.get("halted") is not False
        except (OSError, ValueError, AttributeError, InputError):  # too large, a device: unreadable, halted
            halted = True
        if halted:
            raise HaltedError(f"trading is halted (halt file {settings.halt_file}): signing refused")
    if not db.is_sqlite or db.exists():
        consulted.append("store")
        ensure_running(db)
    return ", ".join(consulted) or "none (offline machine)"
