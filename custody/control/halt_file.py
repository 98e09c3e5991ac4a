"""The halt file: a lease on "trading may run" for the trading engine, and the journal of
halts the store has not recorded yet.

One JSON document (format ``custody-halt-state``, version 2) with two files beside it:
``NAME.lock`` (every writer takes its fcntl lock) and ``NAME.reserve`` (space kept free: on a
full disk it is deleted so that a halt can still be written).

* **A lease.** The document says which audit log entry it reflects (``seq``) and until when
  it holds (``valid_until``). An engine trades only while the file exists, parses, says
  ``"halted": false`` and has not expired; anything else is a halt.
* **Ordered.** Under the lock, a writer compares the ``seq`` already in the file with its
  own and never replaces a newer state with an older one. A state read from the store
  equals any other state read at the same ``seq``: the halt state is derived from the audit
  log, so ``seq`` orders them completely.
* **A journal.** A halt is written here, as a ``pending`` entry, before the store is asked
  to record it. Every later writer carries the pending entries over until the store has
  recorded them (their ids are then in the audit log), so a crash, a full disk or a dead
  database never loses a halt; the next command replays them into the store.

Standard library only: ``custody halt status`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from custody.clock import iso, now

FORMAT = "custody-halt-state"
VERSION = 2
MAX_BYTES = 1 << 20
"""A halt file larger than this is not read (it is not ours)."""
RESERVE_BYTES = 128 * 1024
LOCK_WAIT = 10.0
"""Seconds a writer waits for the lock. A halt is written without it after that; a state
that allows trading is not written at all."""


@dataclass
class Doc:
    """What a writer wants in the file (``seq`` None: the store was not read)."""

    halted: bool
    seq: int | None
    halts: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    recorded: frozenset[str] = frozenset()
    """Ids of journal entries the store has recorded: dropped from ``pending``."""
    error: str | None = None


@dataclass(frozen=True)
class Current:
    """A halt file as read back (only a well-formed one of ours)."""

    halted: bool
    seq: int | None
    pending: list[dict[str, Any]]
    doc: dict[str, Any]


@dataclass
class Written:
    """What a write did: ``written``, else ``newer`` (the file's newer seq) or ``error``."""

    written: bool
    doc: dict[str, Any] | None = None
    newer: int | None = None
    error: str | None = None
    removed: bool = False
    """The write failed and the file was removed instead (a missing file is a halt)."""
    before: bool | None = None
    """What the file said before (halted or not); None when there was none of ours."""
    warnings: list[str] = field(default_factory=list)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def reserve_path(path: Path) -> Path:
    return path.with_name(path.name + ".reserve")


def read(path: Path) -> Current | None:
    """The file's state, or None when it is missing, unreadable or not a halt file of ours."""
    try:
        with open(path, "rb") as fh:
            # Sized by fstat: a buffer of MAX_BYTES made each read cost ~3x (the halt guard reads
            # the file per call). Grown meanwhile, or a device (size 0): read on, bounded.
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(min(size, MAX_BYTES) + 1)
            if len(raw) > size:
                raw += fh.read(MAX_BYTES + 1 - len(raw))
        if len(raw) > MAX_BYTES:
            return None
        doc = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") not in (1, VERSION):
        return None
    seq = doc.get("seq")
    pending = doc.get("pending") or []
    if not isinstance(pending, list):
        pending = []
    pending = [p for p in pending if isinstance(p, dict) and isinstance(p.get("id"), str) and 0 < len(p["id"]) <= 64]
    return Current(
        halted=doc.get("halted") is not False or bool(pending),
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        pending=pending,
        doc=doc,
    )


@contextlib.contextmanager
def locked(path: Path, wait: float = LOCK_WAIT) -> Iterator[bool]:
    """Hold the file's lock; yields whether it was had (False: could not create or wait)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.01)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def write(path: Path, want: Doc, *, lease: float, force_over: int | None = None) -> Written:
    """Write ``want`` unless the file holds a newer state (by ``seq``); never raises.

    The pending entries of the file that ``want`` does not know as recorded are carried
    over, and make the state halted. ``force_over`` replaces a file at exactly that ``seq``
    although it is newer: one that ran ahead of the store (forged, or of another store),
    which the caller found by reading the store again.
    """
    with locked(path) as have_lock:
        if not have_lock and not (want.halted or want.pending):
            return Written(False, error=f"the halt file's lock {lock_path(path)} could not be taken")
        current = read(path)
        seq, halts = want.seq, want.halts
        if current is not None and seq is None:
            # A halt written without reading the store: keep the file's place and its halts.
            seq = current.seq
            kept = current.doc.get("halts")
            halts = [*kept, *halts] if isinstance(kept, list) else halts
        elif current is not None and current.seq is not None and seq is not None and current.seq > seq:
            if current.seq != force_over:
                return Written(False, newer=current.seq, before=current.halted)
        pending = [p for p in want.pending if p["id"] not in want.recorded]
        ids = {p["id"] for p in pending}
        for p in current.pending if current else []:
            if p["id"] not in want.recorded and p["id"] not in ids:
                pending.append(p)
                ids.add(p["id"])
        stamp = now()
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "halted": want.halted or bool(pending),
            "seq": seq,
            "updated_at": iso(stamp),
            "valid_until": iso(stamp + timedelta(seconds=lease)),
            "halts": halts,
        }
        if pending:
            doc["pending"] = pending
        if want.error:
            doc["error"] = want.error
        result = Written(True, doc, before=current.halted if current else None)
        if not have_lock:
            result.warnings.append(f"the halt file's lock {lock_path(path)} could not be taken: written without it")
        try:
            _atomic_write(path, doc, result)
        except OSError as exc:
            result.written = False
            result.error = f"could not write the halt file {path}: {exc.strerror or exc}"
            if doc["halted"]:
                # The last resort: a missing halt file is a halt to the engine.
                try:
                    path.unlink(missing_ok=True)
                    result.removed = True
                except OSError as unlink_exc:
                    result.error += f"; nor could it be removed: {unlink_exc.strerror or unlink_exc}"
        return result


def _atomic_write(path: Path, doc: dict[str, Any], result: Written) -> None:
    """Temporary file, fsync, rename, fsync of the directory; on a full disk, the reserve
    is given up and the write tried once more; after a write, the reserve is made again."""
    body = (json.dumps(doc, indent=2) + "\n").encode()
    try:
        _replace(path, body)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not reserve_path(path).exists():
            raise
        reserve_path(path).unlink(missing_ok=True)
        result.warnings.append(f"the disk holding {path} is full: its reserve was used to write it")
        _replace(path, body)
        return
    if not reserve_path(path).exists():
        _make_reserve(path)


def _replace(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _make_reserve(path: Path) -> None:
    """Keep RESERVE_BYTES allocated beside the halt file (best effort, never a full disk)."""
    reserve = reserve_path(path)
    tmp = reserve.with_name(f".{reserve.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * RESERVE_BYTES)  # real blocks, not a sparse file
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, reserve)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def add_pending(path: Path, entry: dict[str, Any], *, lease: float) -> Written:
    """Journal one halt in the file, halted at once, before the store knows of it."""
    return write(path, Doc(True, None, pending=[entry]), lease=lease)


def pending(path: Path) -> list[dict[str, Any]]:
    """The journal: halts written to the file that the store may not have recorded yet."""
    current = read(path)
    return list(current.pending) if current else []
