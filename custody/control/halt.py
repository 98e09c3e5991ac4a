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
"halted".
"""

from __future__ import annotations

import functools
import json
import secrets
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, func, select

from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log, halt_file
from custody.control.roster import Trust, authenticate, check_pinned, load_trust, standing
from custody.errors import (
    ApprovalError,
    Conflict,
    CustodyError,
    HaltedError,
    InputError,
    NotFound,
    StorageError,
    StoreBusy,
)
from custody.faults import crash_point, pause_point
from custody.files import read_limited
from custody.identity.employee_keys import EmployeeSigner
from custody.identity.statements import sign_statement, verify_statement
from custody.identity.webauthn import Credential, parse_credential, signs_statement
from custody.store.db import Database
from custody.store.models import AuditEntry, AuditHead, HaltLift, HaltRow, IncidentRow, IncidentUpdate

LIFT_QUORUM = 2
COMPONENTS = ("address-issuance", "address-verification", "withdrawals", "trading")
STATUSES = ("investigating", "identified", "monitoring", "resolved")
SOURCES = ("employee", "verification", "ledger", "reserves", "audit-log", "journal")
RAISE_DOMAIN = "custody/halt-raise/v1"
LIFT_DOMAIN = "custody/halt-lift/v1"
MAX_REASON = 2000
"""A halt reason replayed from the halt file is cut to this many characters."""

HOOK_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR")
"""The only variables of custody's environment a halt hook inherits (and ``LC_*``): never a
passphrase, PIN, node or mail credential, nor the database URL."""


def active_halts(s: Session) -> list[HaltRow]:
    return list(s.exec(select(HaltRow).where(col(HaltRow.active)).order_by(col(HaltRow.id))).all())


def guard(s: Session, *, lock: bool = True) -> None:
    """Refuse (HaltedError, exit 3) while trading is halted or the halt state is unreadable.

    ``lock=False``: the same check without the head's lock (head and log tip read in one
    statement, as :func:`read_state` does, so a concurrent append cannot make them look
    apart), for a path that checks first, refusing before any work, and takes the locked
    guard later, before it writes.

    It first takes the audit log head's row lock, which raising a halt also takes: a halt
    committed before this transaction got the lock is seen here, and one raised after it
    waits for this transaction. So the halt wins every race, on PostgreSQL as on SQLite.
    The halt state is the audit log's, checked against the halt table.
    """
    try:
        if lock:
            head = s.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()
            _check_log_tip(s, head)
            seq = head.seq if head else 0
        else:
            seq = _consistent_seq(s)
        halts = _derive(s, seq)[0]
    except SQLAlchemyError as exc:
        raise HaltedError(f"the halt state cannot be read ({type(exc).__name__}): treated as halted") from None
    if halts:
        raise HaltedError(_halted_message(halts))


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
"""Employees by name with their keys: secp256k1 public keys (hex) and security keys."""


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


# ---------------------------------------------------------------- the state, the halt file, the hook


@dataclass
class HaltState:
    """What ``custody halt status`` shows and the halt file mirrors."""

    halted: bool
    halts: list[dict[str, Any]]
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    seq: int | None = None
    """The audit log entry this state reflects (None: the store was not read)."""
    recorded: frozenset[str] = frozenset()
    """Journal ids the store has recorded."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    """Halts waiting in the halt file for the store."""
    file: dict[str, Any] | None = None
    """The halt file as written (None: not written)."""
    unknown: bool = False
    """The store was locked elsewhere (StoreBusy): the state is unknown, not a halt. ``halted``
    stays True for every caller in the library (fail closed); ``halt status`` says "unknown"
    and leaves the halt file alone, whose lease then decides for the engine."""

    def to_dict(self) -> dict[str, Any]:
        if self.file is not None:
            return dict(self.file)
        doc: dict[str, Any] = {
            "format": halt_file.FORMAT,
            "version": halt_file.VERSION,
            "halted": None if self.unknown else self.halted,
            "seq": self.seq,
            "updated_at": iso(now()),
            "valid_until": None,
            "halts": self.halts,
        }
        if self.pending:
            doc["pending"] = self.pending
        if self.error:
            doc["error"] = self.error
        return doc


def read_state(db: Database) -> HaltState:
    """The halt state from the store, read without waiting behind a writer; unreadable means
    halted (with the error), a store locked elsewhere means unknown (``unknown``, and halted
    for the library's callers)."""
    try:
        db.check_schema()
        with db.transaction(read_only=True) as s:
            seq = _consistent_seq(s)
            halts, recorded = _derive(s, seq)
        return HaltState(bool(halts), halts, seq=seq, recorded=recorded)
    except StoreBusy as exc:
        return HaltState(True, [], error=f"halt state unknown: {exc}", unknown=True)
    except CustodyError as exc:
        return HaltState(True, [], error=f"halt state unreadable: {exc}")


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
    if state.unknown:  # nothing known to write: the file's lease runs out on its own
        return state
    lease = settings.halt_lease if lease is None else lease
    force_over: int | None = None
    for _ in range(5):
        want = halt_file.Doc(state.halted, state.seq, state.halts, recorded=state.recorded, error=state.error)
        written = halt_file.write(settings.halt_file, want, lease=lease, force_over=force_over)
        if written.newer is None:
            break
        again = read_state(db)
        again.warnings[:0] = state.warnings
        state = again
        if state.seq is not None and state.seq < written.newer:
            state.warnings.append(
                f"the halt file {settings.halt_file} claimed audit entry {written.newer}, beyond the log's head "
                f"{state.seq}: replaced"
            )
            force_over = written.newer
    state.warnings.extend(written.warnings)
    if written.written and written.doc is not None:
        state.file = written.doc
        state.halted = bool(written.doc["halted"])
        state.pending = list(written.doc.get("pending", []))
    elif written.error:
        removed = " (removed instead: the engine reads that as halted)" if written.removed else ""
        state.warnings.append(written.error + removed)
    changed = written.before is None or written.before != state.halted
    if hook or (hook is None and (changed or not written.written)):
        problem = run_hook(settings, state.halted, state.seq)
        if problem:
            state.warnings.append(problem)
    return state


def hook_environment(settings: Settings, halted: bool, seq: int | None) -> dict[str, str]:
    """The hook's environment: an allow-list of custody's, and the halt state."""
    env = {k: v for k, v in settings.hook_env.items() if k in HOOK_ENV or k.startswith("LC_")}
    env["CUSTODY_HALTED"] = "1" if halted else "0"
    env["CUSTODY_HALT_FILE"] = str(settings.halt_file)
    env["CUSTODY_HALT_SEQ"] = "" if seq is None else str(seq)
    return env


def run_hook(settings: Settings, halted: bool, seq: int | None) -> str | None:
    """Run CUSTODY_HALT_HOOK (at most 30 s); returns what went wrong, else None."""
    if not settings.halt_hook:
        return None
    try:
        result = subprocess.run(
            shlex.split(settings.halt_hook),
            env=hook_environment(settings, halted, seq),
            timeout=30,
            capture_output=True,
            check=False,
        )
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return f"halt hook failed: {exc}"
    return f"halt hook exited with {result.returncode}" if result.returncode != 0 else None


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
    in_log = max((h.id for h in _read_log(s)[0]), default=0)
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
    halts, by_id, _, _ = _read_log(s)
    logged = by_id.get(halt_id, [])
    if not logged or logged[-1].lifted_seq is not None and _lift_problem(s, logged[-1], _roster_events(s)) is None:
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
        with db.transaction(read_only=True) as s:
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
        "halted": None if state.unknown else state.halted,
        "error": state.error,
        "components": {
            c: ("unknown" if state.unknown else "halted" if c in halted_components else "operational")
            for c in COMPONENTS
        },
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
