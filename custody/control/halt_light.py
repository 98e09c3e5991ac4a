"""``custody halt status`` without the ORM: the halt state read from the store through a
cursor of the standard library's sqlite3 (custody.store.light) or of libpq through psycopg's
``psycopg.pq`` (custody.store.light_pg), derived by the same code as the full path
(custody.control.halt_log over :class:`SqlRows` instead of the session), then published as the
full path publishes it (custody.control.halt_state: the halt file, never over a newer one, and
the hook), and the audit log's head witnessed (custody.control.witness_file).

It answers only where the full path (custody.control.halt.publish, then the CLI's witness and
notification steps) would answer the same; everywhere else :func:`publish` returns None before
it has written anything, and the caller takes the full path: a URL it cannot read with
certainty (custody.store.light.sqlite_file, custody.store.light_pg.conninfo); a store that is
missing, damaged, out of reach or at another schema version; halts waiting in the halt file
(they must be replayed into the store); a log that runs past its head; a witness that
disagrees with the log (the full path raises a halt); any stored value of a type the ORM would
read otherwise; on PostgreSQL, a table locked elsewhere (see :class:`_Store`).
Importing this module loads neither sqlalchemy nor sqlmodel nor custody.store.models nor
psycopg; reading PostgreSQL loads ``psycopg.pq`` alone (tests/test_startup.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from custody.clock import iso, now
from custody.config import Settings
from custody.control import halt_file, witness_file
from custody.control.halt_log import _HALT_EVENTS, _ROSTER_EVENT, LogRow, _derive
from custody.control.halt_state import HaltState, write_out
from custody.control.trust_text import StoredManifest, StoredPolicy
from custody.errors import InputError, StoreBusy
from custody.faults import pause_point
from custody.store import light_pg
from custody.store.light import (
    NotLight,
    read_transaction,
    sqlite_file,
    stored_bool,
    stored_int,
    stored_str,
    stored_time,
)


class Fetch(Protocol):
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...


class Cursor(Protocol):
    """sqlite3's cursor, or custody.store.light_pg.PgCursor: ``?`` marks, rows of tuples."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Fetch: ...


@dataclass(frozen=True)
class Dialect:
    """What differs between the two stores for these reads: how a time and a boolean come
    back from the driver (each checked to be what the ORM would read), and SQL's true."""

    time: Callable[[object], datetime]
    boolean: Callable[[object], bool]
    true: str


def _typed(kind: type[Any]) -> Callable[[object], Any]:
    def check(value: object) -> Any:
        if type(value) is not kind:
            raise NotLight(f"a stored {kind.__name__} {value!r}")
        return value

    return check


SQLITE = Dialect(stored_time, stored_bool, "1")
POSTGRES = Dialect(_typed(datetime), _typed(bool), "TRUE")
"""custody.store.light_pg gives times (aware, UTC, as the ORM) and booleans typed, by their
column's type."""


@dataclass(frozen=True)
class LightHalt:
    """A row of the ``halt`` table (halt_log.HaltRecord)."""

    id: int
    raised_at: datetime
    raised_by: str
    source: str
    reason: str
    active: bool
    lifted_at: datetime | None


_HALT_COLUMNS = "halt.id, halt.raised_at, halt.raised_by, halt.source, halt.reason, halt.active, halt.lifted_at"


class SqlRows:
    """halt_log.HaltRows over a cursor: the ORM's queries, each value checked to be of the type
    the ORM would give back (else NotLight)."""

    def __init__(self, cur: Cursor, pinned: Path | None, dialect: Dialect = SQLITE) -> None:
        self.cur = cur
        self.pinned = pinned
        self.dialect = dialect

    def pinned_manifest(self) -> Path | None:
        return self.pinned

    def halt_entries(self) -> list[LogRow]:
        marks = ", ".join("?" * len(_HALT_EVENTS))
        rows = self.cur.execute(
            "SELECT seq, at, event, actor, payload, signature FROM audit_log "
            f"WHERE audit_log.event IN ({marks}) ORDER BY audit_log.seq",
            _HALT_EVENTS,
        ).fetchall()
        return [
            (
                stored_int(seq),
                self.dialect.time(at),
                stored_str(event),
                stored_str(actor),
                stored_str(payload),
                None if signature is None else stored_str(signature),
            )
            for seq, at, event, actor, payload, signature in rows
        ]

    def roster_entries(self) -> list[tuple[int, str]]:
        rows = self.cur.execute(
            "SELECT seq, payload FROM audit_log WHERE audit_log.event = ? ORDER BY audit_log.seq", (_ROSTER_EVENT,)
        ).fetchall()
        return [(stored_int(seq), stored_str(payload)) for seq, payload in rows]

    def governance_text(self) -> tuple[StoredManifest, tuple[str, ...], StoredPolicy]:
        """custody.control.trust.store_text's reads, by SQL."""
        row = self.cur.execute("SELECT digest, document FROM signed_manifest WHERE signed_manifest.id = 1").fetchone()
        manifest = None if row is None else (stored_str(row[0]), stored_str(row[1]))
        epochs = self.cur.execute("SELECT document FROM policy_epoch ORDER BY policy_epoch.epoch").fetchall()
        policy = self.cur.execute("SELECT network, threshold, script_type FROM policy WHERE policy.id = 1").fetchone()
        stored: StoredPolicy = None
        if policy is not None:
            founders = self.cur.execute("SELECT name, xpub FROM founder ORDER BY founder.position").fetchall()
            stored = (
                stored_str(policy[0]),
                stored_int(policy[1]),
                stored_str(policy[2]),
                tuple((stored_str(n), stored_str(x)) for n, x in founders),
            )
        return manifest, tuple(stored_str(d) for (d,) in epochs), stored

    def roster_documents(self) -> dict[int, str]:
        rows = self.cur.execute("SELECT serial, document FROM roster").fetchall()
        return {stored_int(serial): stored_str(document) for serial, document in rows}

    def halt(self, halt_id: int) -> LightHalt | None:
        row = self.cur.execute(f"SELECT {_HALT_COLUMNS} FROM halt WHERE halt.id = ?", (halt_id,)).fetchone()
        return None if row is None else self._halt(row)

    def active_halts(self) -> Sequence[LightHalt]:
        true = self.dialect.true
        rows = self.cur.execute(f"SELECT {_HALT_COLUMNS} FROM halt WHERE halt.active = {true} ORDER BY halt.id")
        return [self._halt(row) for row in rows.fetchall()]

    def lift_employees(self, halt_id: int) -> list[str]:
        rows = self.cur.execute(
            "SELECT employee FROM halt_lift WHERE halt_lift.halt_id = ? ORDER BY halt_lift.id", (halt_id,)
        ).fetchall()
        return [stored_str(employee) for (employee,) in rows]

    def _halt(self, row: tuple[object, ...]) -> LightHalt:
        id_, raised_at, raised_by, source, reason, active, lifted_at = row
        return LightHalt(
            stored_int(id_),
            self.dialect.time(raised_at),
            stored_str(raised_by),
            stored_str(source),
            stored_str(reason),
            self.dialect.boolean(active),
            None if lifted_at is None else self.dialect.time(lifted_at),
        )


@dataclass
class _Read:
    state: HaltState
    head: witness_file.Checkpoint
    disagrees: bool
    recipients: bool


@dataclass(frozen=True)
class _Store:
    """Where the light read reads: a reading transaction's cursor, and its dialect."""

    open: Callable[[], AbstractContextManager[Cursor]]
    dialect: Dialect
    answers_busy: bool
    """Whether a lock held elsewhere is answered here ("unknown") or left to the full path.
    SQLite's lock (the file's) stops every read of the full path alike; a PostgreSQL table
    lock stops only the reads of that table, so which of its steps fail (the state, the
    witness) depends on the table: the full path says."""


def _store(url: str) -> _Store | None:
    path = sqlite_file(url)
    if path is not None:
        return _Store(lambda: read_transaction(path), SQLITE, answers_busy=True)
    info = light_pg.conninfo(url)
    if info is not None:
        return _Store(lambda: light_pg.read_transaction(info), POSTGRES, answers_busy=False)
    return None


def _read(store: _Store, witnessed: Sequence[witness_file.Checkpoint], pinned: Path) -> _Read:
    """The halt state, the head, whether the witness disagrees, whether anyone is to be
    notified: one read transaction. Raises NotLight, StoreBusy."""
    with store.open() as cur:
        # halt._consistent_seq's statement: head and tip in one snapshot
        row = cur.execute(
            "SELECT h.seq, (SELECT MAX(e.seq) FROM audit_log AS e), h.hash FROM audit_head AS h WHERE h.id = 1"
        ).fetchone()
        if row is None or (row[1] or 0) != row[0]:
            raise NotLight("the log does not end at its head")  # the full path says halted, and why
        seq, digest = stored_int(row[0]), stored_str(row[2])
        halts, recorded, tampered = _derive(SqlRows(cur, pinned, store.dialect), seq)
        wanted = witness_file.wanted_seqs(witnessed, seq)
        stored: dict[int, str] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            found = cur.execute(f"SELECT seq, hash FROM audit_log WHERE audit_log.seq IN ({marks})", chunk)
            stored.update((stored_int(s), stored_str(h)) for s, h in found.fetchall())
        disagrees = bool(witness_file.disagreements(witnessed, seq, stored))
        true = store.dialect.true
        recipients = cur.execute(f"SELECT id FROM notify_recipient WHERE notify_recipient.active = {true} LIMIT 1")
        anyone = recipients.fetchone() is not None
    state = HaltState(bool(halts), halts, seq=seq, recorded=recorded, warnings=tampered)
    return _Read(state, witness_file.Checkpoint(seq, digest, iso(now()), "the store"), disagrees, anyone)


@dataclass
class Published:
    """What :func:`publish` did: the state as written (warnings included, the witness's last)
    and whether anyone may be waiting for a notification (the CLI's notification step then
    runs as after any command; without a recipient it has nothing to do)."""

    state: HaltState
    notify: bool


def publish(settings: Settings) -> Published | None:
    """What ``custody halt status`` does after its work through the full path (halt.publish,
    then the CLI's witness step), without the ORM; None when the full path must answer (see
    the module's docstring), before anything was written."""
    store = _store(settings.db_url)
    if store is None or halt_file.pending(settings.halt_file):
        return None
    try:
        witnessed = witness_file.recent(settings.witness_file)
        read = _read(store, witnessed, settings.manifest)
    except StoreBusy as exc:  # as the full path: unknown, the halt file left alone, the head not witnessed
        if not store.answers_busy:
            return None
        state = HaltState(True, [], error=f"halt state unknown: {exc}", unknown=True)
        state.warnings.append(f"the audit log's head was not witnessed in {settings.witness_file}: {exc}")
        return Published(state, notify=True)
    except (NotLight, InputError):
        return None
    except Exception:  # noqa: BLE001 - whatever went wrong, the full path meets it too and says what
        return None
    if read.disagrees:
        return None  # the full path raises the halt and says why
    pause_point("halt.state_read")
    try:
        state = write_out(settings, read.state, lambda: _again(store, settings.manifest), hook=True, lease=None)
    except NotLight:  # from _again, before the halt file was written
        return None
    try:
        witness_file.append(settings.witness_file, read.head)
    except InputError as exc:
        state.warnings.append(f"the audit log's head was not witnessed in {settings.witness_file}: {exc}")
    return Published(state, notify=read.recipients)


def _again(store: _Store, pinned: Path) -> HaltState:
    """The state read once more (the halt file was newer). Raises NotLight (StoreBusy too: the
    full path then says what it finds)."""
    try:
        return _read(store, [], pinned).state
    except NotLight:
        raise
    except Exception as exc:  # noqa: BLE001 - StoreBusy included: the full path answers
        raise NotLight(str(exc)) from None
