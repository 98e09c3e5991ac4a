"""Anchors of the audit log outside the database: checkpoints, and checking the log against them.

The log's head (sequence and hash) lives in the same database as the log: whoever can edit
one can delete the last entries and set the head back, or re-hash the whole chain after an
edit, and the chain still verifies. What catches that is a copy of the head kept elsewhere,
taken earlier: a *witness*. A log that is shorter than a witness saw, or whose entry at a
witnessed sequence has another hash, was truncated or rewritten.

Witnesses:

* the local witness file (``CUSTODY_WITNESS_FILE``, default HOME/witness.jsonl): every
  command that opened the store appends the head after its work, when it changed, and checks
  the store against the file's last lines first (:func:`record`);
* a checkpoint file an auditor keeps (``custody audit log checkpoint --out FILE``);
* every notification (webhook body, or the text of the mail) carries its entry's sequence
  and hash.

A checkpoint file is JSON Lines, one checkpoint a line, appended one whole line at a time
under an exclusive lock and fsynced. A crash in the middle of an append can leave only an
unterminated last line; readers skip it and the next append removes it. Format:
docs/FORMATS.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from custody.clock import iso, now
from custody.config import Settings
from custody.control import halt
from custody.control.audit_log import GENESIS, ChainProblem
from custody.errors import CustodyError, HaltedError, InputError, StorageError
from custody.files import locked_lines, read_limited_text, read_tail
from custody.store.db import Database
from custody.store.models import AuditEntry, AuditHead

FORMAT = "custody-checkpoint"
VERSION = 1
MAX_WITNESS_BYTES = 256 * 1024 * 1024
"""A witness file larger than this is refused before it is read (InputError, exit 2)."""

_HASH = re.compile(r"^[0-9a-f]{64}$")
_MAIL_SEQ = re.compile(r"\(audit log entry (\d{1,18})\)")
_MAIL_HASH = re.compile(r"^hash:\s+([0-9a-f]{64})\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Checkpoint:
    """The log's head as someone saw it: entry ``seq`` had hash ``hash``."""

    seq: int
    hash: str
    at: str | None = None
    source: str = ""

    def document(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "seq": self.seq, "hash": self.hash, "at": self.at}

    def line(self) -> str:
        return json.dumps(self.document(), sort_keys=True, separators=(",", ":")) + "\n"


def head(s: Session) -> Checkpoint:
    """The store's head now. Raises StorageError without one."""
    row = s.get(AuditHead, 1)
    if row is None:
        raise StorageError("the store has no audit log head: run `custody init`")
    return Checkpoint(row.seq, row.hash, iso(now()), "the store")


def _checkpoint(doc: Any, source: str) -> Checkpoint | None:
    """A checkpoint line or a notification body as a checkpoint; None for anything else."""
    if not isinstance(doc, dict):
        return None
    if doc.get("format") == FORMAT:
        seq, digest, at = doc.get("seq"), doc.get("hash"), doc.get("at")
    elif doc.get("format") == "custody-notification" and isinstance(doc.get("audit"), dict):
        seq, digest, at = doc["audit"].get("seq"), doc["audit"].get("hash"), doc["audit"].get("at")
    else:
        return None
    if type(seq) is not int or seq < 0 or not isinstance(digest, str) or not _HASH.match(digest):
        return None
    return Checkpoint(seq, digest, at if isinstance(at, str) else None, source)


def parse(text: str, source: str) -> list[Checkpoint]:
    """Checkpoints in a witness: checkpoint lines, a notification body (or lines of them), or
    the text of a notification mail. An unterminated last line (a torn append) is skipped.

    Raises InputError when nothing in it is a witness or a line is not one.
    """
    stripped = text.strip()
    if not stripped:
        raise InputError(f"{source} is empty: it witnesses nothing")
    try:
        whole = json.loads(stripped)
    except ValueError:
        whole = None
    if whole is not None:
        found = _checkpoint(whole, source)
        if found is None:
            raise InputError(f"{source} is JSON but neither a custody checkpoint nor a custody notification")
        return [found]
    if stripped.startswith("{"):
        lines = text.split("\n")
        complete, torn = lines[:-1], lines[-1]  # after the last newline: a line maybe never finished
        try:
            last = _checkpoint(json.loads(torn), f"{source} line {len(lines)}") if torn.strip() else None
        except ValueError:
            last = None  # torn by a crash: skipped
        checkpoints = []
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            found = _checkpoint(doc, f"{source} line {number}")
            if found is None:
                raise InputError(f"{source} line {number} is not a custody checkpoint or notification")
            checkpoints.append(found)
        if last is not None:
            checkpoints.append(last)
        if not checkpoints:
            raise InputError(f"{source} holds only an unfinished line")
        return checkpoints
    seq, digest = _MAIL_SEQ.search(text), _MAIL_HASH.search(text)
    if seq is None or digest is None:
        raise InputError(f"{source} is not a checkpoint file, a notification body or a notification mail")
    return [Checkpoint(int(seq.group(1)), digest.group(1), None, source)]


def read(path: Path) -> list[Checkpoint]:
    """The checkpoints of a witness file. Raises InputError (missing, too large, unreadable)."""
    try:
        text = read_limited_text(path, MAX_WITNESS_BYTES, "witness")
    except FileNotFoundError:
        raise InputError(f"witness {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read witness {path}: {exc.strerror}") from None
    return parse(text, str(path))


def compare(s: Session, witnessed: Sequence[Checkpoint]) -> list[ChainProblem]:
    """What the store's log does not agree with: shorter than witnessed, or another hash at a
    witnessed sequence. Empty when every checkpoint is an entry of this log (or the genesis)."""
    row = s.get(AuditHead, 1)
    tip = row.seq if row is not None else 0
    wanted = sorted({c.seq for c in witnessed if 0 < c.seq <= tip})
    stored: dict[int, str] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        stored.update(s.exec(select(AuditEntry.seq, AuditEntry.hash).where(col(AuditEntry.seq).in_(chunk))).all())
    diverged: Checkpoint | None = None
    beyond: Checkpoint | None = None
    for c in witnessed:
        if c.seq > tip:
            if beyond is None or c.seq > beyond.seq:
                beyond = c
        elif (GENESIS if c.seq == 0 else stored.get(c.seq)) != c.hash:
            if diverged is None or c.seq < diverged.seq:
                diverged = c
    problems = []
    if diverged is not None:
        have = GENESIS if diverged.seq == 0 else stored.get(diverged.seq)
        what = f"has hash {have[:16]}…" if have else "is missing"
        problems.append(
            ChainProblem(
                diverged.seq,
                f"entry {diverged.seq} {what}; {diverged.source} witnessed {diverged.hash[:16]}…: "
                "the log was rewritten at or before it",
            )
        )
    if beyond is not None:
        problems.append(
            ChainProblem(
                beyond.seq,
                f"the log ends at entry {tip}; {beyond.source} witnessed entry {beyond.seq} "
                f"({beyond.hash[:16]}…): entries were removed from its end",
            )
        )
    return problems


def append(path: Path, checkpoint: Checkpoint) -> bool:
    """Append ``checkpoint`` unless it is the file's last line already; True when written.

    One write of one whole line under an exclusive lock, then fsync; an unterminated last
    line (an append torn by a crash) is cut off first. Raises InputError when the file
    cannot be written.
    """

    try:
        with locked_lines(path) as f:
            if f.last:
                try:
                    previous = _checkpoint(json.loads(f.last), str(path))
                except ValueError:
                    previous = None
                if previous is not None and (previous.seq, previous.hash) == (checkpoint.seq, checkpoint.hash):
                    return False
            f.append(checkpoint.line().encode())
            return True
    except OSError as exc:
        raise InputError(f"cannot write the witness {path}: {exc.strerror}") from None


def recent(path: Path) -> list[Checkpoint]:
    """The checkpoints in the last lines of a witness file (files.TAIL_BYTES; empty when it does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InputError(f"cannot read the witness {path}: {exc.strerror}") from None
    try:
        data = read_tail(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    text = data.decode("utf-8", errors="replace")
    return parse(text, str(path)) if text.strip() else []


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


def after_command(db: Database, settings: Settings) -> str | None:
    """What every command does after its work: :func:`record` into the local witness file.

    A log that disagrees with the witness raises the trading halt (unless one stands
    already) and then WitnessMismatch (exit 3). Returns a warning when the witness could
    not be read or written (the command's own work is committed all the same), else None.
    """
    try:
        if not db.exists():
            return None
        _, problems = record(db, settings.witness_file)
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
