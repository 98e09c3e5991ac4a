"""More keys than memory should hold, sorted through temporary files (standard library only).

The verifier's duplicate checks (an address listed twice, a chain/index used twice) need every
record's key beside every other's. Up to :data:`custody.verify.core.SPILL_AT` records they are
kept in memory; beyond that they go through :class:`Runs`: each chunk sorted and written to a
temporary file (a run), the runs merged (``heapq.merge``) as they are read back, so that equal
keys come out side by side whatever the number of records. At most :data:`FAN_IN` runs are
open at one level: when a level fills, its runs are merged into one run of the next level, so
neither the open files nor the merge's buffers grow with the records (a few levels at the
largest export the verifier reads).

A run is the online machine's file, as its database is: an insider who can open it (as the
same user, through ``/proc/PID/fd``) could rewrite it between its write and its read and hide
a duplicate. So every block carries a keyed BLAKE2b tag over the run's number, the block's
number and its bytes, under a key that exists only in this process's memory; a block that
does not match, a run cut short or lengthened, is a :class:`SpillError`, never an answer.
Nothing read from a run is used before its block's tag matched.

It is written here rather than taken from the store's own sorter because the verifier
imports nothing of ours.
"""

from __future__ import annotations

import heapq
import hmac
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from hashlib import blake2b
from typing import IO

from .errors import SpillError

FAN_IN = 32
"""Runs merged at once: the open files and the read buffers of one level."""
BLOCK_BYTES = 64 * 1024
"""About this many bytes of items per block (the unit that is tagged, read and checked)."""
_TAG = 16
_HEAD = 4 + _TAG  # the block's length, then its tag


def spill_directory() -> str:
    """Where the runs go when the caller names no directory: Python's temporary directory.
    custody's commands name one (its Settings read ``$TMPDIR`` strictly: a TMPDIR that cannot
    be written is an error there, not a silent fall-back to another disk)."""
    return tempfile.gettempdir()


def _failed(directory: str, exc: OSError) -> SpillError:
    return SpillError(
        f"cannot write the verifier's temporary files in {directory}: {exc.strerror or exc}; "
        "set TMPDIR to a writable directory with room for about 200 bytes an address"
    )


class _Run:
    """One sorted run in its own (unnamed where the system allows) temporary file."""

    def __init__(self, runs: Runs, items: Iterable[bytes]) -> None:
        self.number = runs.numbered
        runs.numbered += 1
        self.key = runs.key
        self.directory = runs.directory
        self.blocks = 0
        self.largest = 0  # the longest block written: a longer length read back is a change
        self.file: IO[bytes] | None = None
        try:
            self.file = tempfile.TemporaryFile(dir=self.directory)
            block: list[bytes] = []
            size = 0
            for item in items:
                block.append(len(item).to_bytes(4, "big"))
                block.append(item)
                size += 4 + len(item)
                if size >= BLOCK_BYTES:
                    self._write(b"".join(block))
                    block, size = [], 0
            if block:
                self._write(b"".join(block))
            self.file.flush()
            self.file.seek(0)
        except OSError as exc:
            self.close()
            raise _failed(self.directory, exc) from None
        except BaseException:
            self.close()
            raise

    def _tag(self, number: int, data: bytes) -> bytes:
        mac = blake2b(key=self.key, digest_size=_TAG)
        mac.update(self.number.to_bytes(8, "big") + number.to_bytes(8, "big"))
        mac.update(data)
        return mac.digest()

    def _write(self, data: bytes) -> None:
        assert self.file is not None
        self.file.write(len(data).to_bytes(4, "big") + self._tag(self.blocks, data) + data)
        self.blocks += 1
        self.largest = max(self.largest, len(data))

    def items(self) -> Iterator[bytes]:
        """The run's items in order, each block checked before any of its items is given.
        Raises SpillError when the file was changed, cut or lengthened."""
        f = self.file
        assert f is not None
        try:
            for number in range(self.blocks):
                head = f.read(_HEAD)
                size = int.from_bytes(head[:4], "big") if len(head) == _HEAD else -1
                data = f.read(size) if 0 <= size <= self.largest else b""
                if len(data) != size or not hmac.compare_digest(head[4:], self._tag(number, data)):
                    raise _changed()
                at = 0
                while at < size:
                    length = int.from_bytes(data[at : at + 4], "big")
                    yield data[at + 4 : at + 4 + length]
                    at += 4 + length
            if f.read(1):
                raise _changed()
        except OSError as exc:
            raise SpillError(f"cannot read back the verifier's temporary files in {self.directory}: {exc}") from None
        finally:
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _changed() -> SpillError:
    return SpillError(
        "a temporary file of this verification was changed while it ran (its keyed tag does not "
        "match): no answer can be given"
    )


class Runs:
    """Byte strings added in any order and read back once, sorted (bytewise).

    ``chunk`` items are held before they are sorted and written as a run. Raises SpillError
    (from ``add``, ``flush`` or the iteration of ``sorted``) when a run cannot be written or
    read back intact. Close it (``close``) when done; reading closes the runs it read.
    """

    def __init__(self, chunk: int, directory: str | None = None) -> None:
        self.chunk = max(1, chunk)
        self.directory = directory or spill_directory()
        self.key = secrets.token_bytes(32)
        self.numbered = 0
        self.items: list[bytes] = []
        self.levels: list[list[_Run]] = []
        self.written = 0  # runs written, merges included

    def write(self, items: list[bytes]) -> None:
        """Sort ``items`` (in place) and write them as one run, whatever their number."""
        if items:
            items.sort()
            self._push(0, _Run(self, items))

    def add(self, item: bytes) -> None:
        self.items.append(item)
        if len(self.items) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        """Write the items held as one sorted run."""
        if not self.items:
            return
        self.items.sort()
        run = _Run(self, self.items)
        self.items = []
        self._push(0, run)

    def _push(self, level: int, run: _Run) -> None:
        self.written += 1
        while len(self.levels) <= level:
            self.levels.append([])
        self.levels[level].append(run)
        if len(self.levels[level]) >= FAN_IN:
            runs, self.levels[level] = self.levels[level], []
            merged = _Run(self, heapq.merge(*(r.items() for r in runs)))
            self._push(level + 1, merged)

    def sorted(self) -> Iterator[bytes]:
        """Every item added, in order (equal items side by side)."""
        runs = [run for level in self.levels for run in level]
        if not runs:
            self.items.sort()
            items, self.items = self.items, []
            yield from items
            return
        self.flush()
        runs = [run for level in self.levels for run in level]
        self.levels = []
        try:
            yield from heapq.merge(*(r.items() for r in runs))
        finally:
            for r in runs:
                r.close()

    def close(self) -> None:
        """Drop every run (their files go with them)."""
        for level in self.levels:
            for run in level:
                run.close()
        self.levels = []
        self.items = []
