"""The local witness file and checkpoint files: reading, parsing, appending, and comparing
what they witnessed with the hashes a store holds. No store here (standard library only):
custody.control.witness reads the store through the ORM, custody.control.halt_light through a
DB-API cursor. Format: docs/FORMATS.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custody.errors import InputError
from custody.files import locked_lines, read_limited_text, read_tail

GENESIS = "0" * 64
"""The hash before the first entry (custody.control.audit_log.GENESIS)."""

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


def tail(path: Path) -> bytes | None:
    """The whole lines in the last files.TAIL_BYTES of a witness file; None when it does not
    exist. Raises InputError when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"cannot read the witness {path}: {exc.strerror}") from None
    try:
        return read_tail(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def recent(path: Path) -> list[Checkpoint]:
    """The checkpoints in the last lines of a witness file (files.TAIL_BYTES; empty when it does not exist)."""
    data = tail(path)
    text = "" if data is None else data.decode("utf-8", errors="replace")
    return parse(text, str(path)) if text.strip() else []


Known = dict[bytes, tuple[int, str]]
"""Lines of a witness file by their exact bytes, each with the (seq, hash) it parses to."""


def checkpoint_lines(data: bytes, known: Known) -> tuple[list[tuple[int, str]], Known] | None:
    """The (seq, hash) of each checkpoint :func:`parse` finds in ``data`` (the whole lines of a
    witness file's tail: what :func:`recent` parses), parsing only the lines not in ``known``
    (a line's checkpoint depends on its bytes alone); and the lines of ``data`` as ``known``
    for the next call.

    None wherever :func:`parse` could answer anything else than one checkpoint a line, which is
    then left to it: a torn last line, a line that is not ASCII or not a checkpoint (the error
    is parse's to raise), fewer than two lines (parse reads a lone document whole).
    """
    if not data.endswith(b"\n"):
        return None
    pairs: list[tuple[int, str]] = []
    seen: Known = {}
    for line in data.split(b"\n")[:-1]:
        if not line.strip():
            continue
        found = known.get(line)
        if found is None:
            if not line.isascii():
                return None
            try:
                checkpoint = _checkpoint(json.loads(line), "")
            except ValueError:
                return None
            if checkpoint is None:
                return None
            found = (checkpoint.seq, checkpoint.hash)
        seen[line] = found
        pairs.append(found)
    # Two JSON objects or more: never one document, so parse reads them line by line as here.
    return (pairs, seen) if len(pairs) >= 2 else None


def wanted_seqs(witnessed: Sequence[Checkpoint], tip: int) -> list[int]:
    """The entries whose hashes :func:`disagreements` needs, for a log ending at ``tip``."""
    return sorted({c.seq for c in witnessed if 0 < c.seq <= tip})


def disagreements(witnessed: Sequence[Checkpoint], tip: int, stored: Mapping[int, str]) -> list[tuple[int, str]]:
    """(seq, reason) of what a log ending at ``tip``, with ``stored`` hashes (of
    :func:`wanted_seqs`), does not agree with: shorter than witnessed, or another hash at a
    witnessed sequence."""
    diverged: Checkpoint | None = None
    beyond: Checkpoint | None = None
    for c in witnessed:
        if c.seq > tip:
            if beyond is None or c.seq > beyond.seq:
                beyond = c
        elif (GENESIS if c.seq == 0 else stored.get(c.seq)) != c.hash:
            if diverged is None or c.seq < diverged.seq:
                diverged = c
    problems: list[tuple[int, str]] = []
    if diverged is not None:
        have = GENESIS if diverged.seq == 0 else stored.get(diverged.seq)
        what = f"has hash {have[:16]}…" if have else "is missing"
        problems.append(
            (
                diverged.seq,
                f"entry {diverged.seq} {what}; {diverged.source} witnessed {diverged.hash[:16]}…: "
                "the log was rewritten at or before it",
            )
        )
    if beyond is not None:
        problems.append(
            (
                beyond.seq,
                f"the log ends at entry {tip}; {beyond.source} witnessed entry {beyond.seq} "
                f"({beyond.hash[:16]}…): entries were removed from its end",
            )
        )
    return problems
