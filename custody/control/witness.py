"""Anchors of the audit log outside the database: checkpoints, and checking the log against them.

The log's head (sequence and hash) lives in the same database as the log: whoever can edit
one can delete the last entries and set the head back, or re-hash the whole chain after an
edit, and the chain still verifies. What catches that is a copy of the head kept elsewhere,
taken earlier: a *witness*. A log that is shorter than a witness saw, or whose entry at a
witnessed sequence has another hash, was truncated or rewritten.

Witnesses:

* the local witness file (``CUSTODY_WITNESS_FILE``, default HOME/witness.jsonl): every
  command that opened the store appends the head after its work, when it changed, and checks
  the store against the file's last lines first (:func:`record`); ``custody serve`` does the
  same after every state change (:class:`LocalWitness`);
* a checkpoint file an auditor keeps (``custody audit log checkpoint --out FILE``);
* every notification (webhook body, or the text of the mail) carries its entry's sequence
  and hash.

A checkpoint file is JSON Lines, one checkpoint a line, appended one whole line at a time
under an exclusive lock and fsynced. A crash in the middle of an append can leave only an
unterminated last line; readers skip it and the next append removes it. Format:
docs/FORMATS.md.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from custody.clock import iso, now
from custody.config import Settings
from custody.control import halt
from custody.control.audit_log import ChainProblem
from custody.control.witness_file import FORMAT as FORMAT
from custody.control.witness_file import (
    GENESIS,
    Known,
    append,
    checkpoint_lines,
    disagreements,
    recent,
    tail,
    wanted_seqs,
)
from custody.control.witness_file import MAX_WITNESS_BYTES as MAX_WITNESS_BYTES
from custody.control.witness_file import VERSION as VERSION
from custody.control.witness_file import Checkpoint as Checkpoint
from custody.control.witness_file import parse as parse
from custody.control.witness_file import read as read
from custody.errors import CustodyError, HaltedError, StorageError
from custody.store.db import Database
from custody.store.models import AuditEntry, AuditHead


def head(s: Session) -> Checkpoint:
    """The store's head now. Raises StorageError without one."""
    row = s.get(AuditHead, 1)
    if row is None:
        raise StorageError("the store has no audit log head: run `custody init`")
    return Checkpoint(row.seq, row.hash, iso(now()), "the store")


def compare(s: Session, witnessed: Sequence[Checkpoint]) -> list[ChainProblem]:
    """What the store's log does not agree with: shorter than witnessed, or another hash at a
    witnessed sequence. Empty when every checkpoint is an entry of this log (or the genesis)."""
    row = s.get(AuditHead, 1)
    tip = row.seq if row is not None else 0
    wanted = wanted_seqs(witnessed, tip)
    stored: dict[int, str] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        stored.update(s.exec(select(AuditEntry.seq, AuditEntry.hash).where(col(AuditEntry.seq).in_(chunk))).all())
    return [ChainProblem(seq, reason) for seq, reason in disagreements(witnessed, tip, stored)]


def record(db: Database, path: Path) -> tuple[Checkpoint, list[ChainProblem]]:
    """Check the store against the witness file's last lines, then append its head when it moved.

    Returns the head and what disagrees; nothing is appended when something does (the file
    keeps what it saw). Raises StorageError, InputError.
    """
    witnessed = recent(path)
    with db.transaction(read_only=True) as s:
        current = head(s)
        problems = compare(s, witnessed)
    if not problems:
        append(path, current)
    return current, problems


SPREAD = 4096
"""The widest range of sequences :class:`LocalWitness` reads in one statement; a tail of the
witness spread wider (entries witnessed far apart) is compared by :func:`record` itself."""


class LocalWitness:
    """:func:`record` into one witness file for a process that calls it after every change
    (``custody serve``): the same comparison of the same checkpoints with the same store,
    cheaper where nothing disagrees.

    Each call reads the file's tail and the store afresh, as :func:`record` does: every
    checkpoint in the tail against the store's hash at its sequence, and the store's head
    against the highest. What it saves: the lines of the tail that this process parsed before
    are known by their exact bytes (a line edited, even one byte, is parsed anew), and the
    hashes are read in one statement over the witnessed range instead of through the ORM.
    Whatever is out of the ordinary (a torn or foreign line, no head, a range too wide, and any
    disagreement) is handed to :func:`record`, whose answer, message and halt are then
    exactly the command line's. Thread-safe.
    """

    def __init__(self, db: Database, path: Path) -> None:
        self.db = db
        self.path = path
        self._known: Known = {}
        self._lock = threading.Lock()

    def record(self) -> tuple[Checkpoint, list[ChainProblem]]:
        """:func:`record` (same answer, same append). Raises StorageError, InputError."""
        current = self._agreed()
        if current is None:
            return record(self.db, self.path)
        append(self.path, current)
        return current, []

    def _agreed(self) -> Checkpoint | None:
        """The store's head when every checkpoint in the tail agrees with the store; None when
        :func:`record` must look (something disagrees, or may)."""
        data = tail(self.path)
        if data is None:
            return None
        with self._lock:
            found = checkpoint_lines(data, self._known)
            if found is None:
                return None
            pairs, self._known = found
        read = self._read(pairs)
        if read is None:
            return None
        tip, digest, stored = read
        for seq, witnessed in pairs:
            if seq > tip or (GENESIS if seq == 0 else stored.get(seq)) != witnessed:
                return None
        return Checkpoint(tip, digest, iso(now()), "the store")

    def _read(self, pairs: list[tuple[int, str]]) -> tuple[int, str, dict[int, str]] | None:
        """The store's head and its hashes over the witnessed range of ``pairs``, read in one
        transaction through the driver's own cursor (no row objects); None when :func:`record`
        must read them (an odd head, a range too wide, a driver error, which it words)."""
        mark = "?" if self.db.is_sqlite else "%s"
        try:
            with self.db.transaction(read_only=True) as s:
                cursor = s.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
                try:
                    cursor.execute("SELECT seq, hash FROM audit_head WHERE id = 1")
                    row = cursor.fetchone()
                    if row is None or type(row[0]) is not int or type(row[1]) is not str:
                        return None
                    wanted = [seq for seq, _ in pairs if 0 < seq <= row[0]]
                    if not wanted:
                        return row[0], row[1], {}
                    lo, hi = min(wanted), max(wanted)
                    if hi - lo > SPREAD:
                        return None
                    cursor.execute(f"SELECT seq, hash FROM audit_log WHERE seq BETWEEN {mark} AND {mark}", (lo, hi))
                    return row[0], row[1], dict(cursor.fetchall())
                finally:
                    cursor.close()
        except self.db.engine.dialect.loaded_dbapi.Error:
            return None


def checkpoint(db: Database, out: Path) -> dict[str, Any]:
    """Append the store's head to the checkpoint file ``out`` (an auditor's); what was witnessed.

    Raises StorageError, InputError (the file cannot be written, or what it holds already is
    not a checkpoint file, or disagrees with this log: nothing is appended then).
    """
    db.check_schema()
    earlier = read(out) if out.exists() and out.stat().st_size else []
    with db.transaction() as s:
        current = head(s)
        problems = compare(s, earlier)
    if problems:
        raise WitnessMismatch(
            f"{out} disagrees with this log: {problems[0].reason}; run `custody audit log --verify --against {out}`"
        )
    written = append(out, current)
    return current.document() | {"out": str(out), "appended": written}


class WitnessMismatch(HaltedError):
    """The store's audit log is shorter than, or diverges from, what the local witness saw."""


def after_command(
    db: Database, settings: Settings, *, known: bool = False, local: LocalWitness | None = None
) -> str | None:
    """What every command does after its work: :func:`record` into the local witness file
    (``known``: the store is known to exist, as for ``custody serve``, which checked it when it
    started: not looked for again; were it gone, the read fails and the warning says so;
    ``local``: the process's :class:`LocalWitness` of ``db`` and that file, which records).

    A log that disagrees with the witness raises the trading halt (unless one stands
    already) and then WitnessMismatch (exit 3). Returns a warning when the witness could
    not be read or written (the command's own work is committed all the same), else None.
    """
    try:
        if not known and not db.exists():
            return None
        _, problems = local.record() if local is not None else record(db, settings.witness_file)
    except CustodyError as exc:
        return f"the audit log's head was not witnessed in {settings.witness_file}: {exc}"
    if not problems:
        return None
    reason = f"the audit log disagrees with the witness {settings.witness_file}: {problems[0].reason}"
    try:
        if not halt.read_state(db).halted:
            halt.raise_halt(db, settings, reason=reason, source="audit-log", actor="witness")
    except CustodyError as exc:
        reason += f" (the halt could not be recorded in the store: {exc})"
    raise WitnessMismatch(f"{reason}; trading is halted")
