"""Items too many to hold, sorted through temporary files: sorted runs, merged as they are read.

The audits that compare what the audit log recorded with the rows beside it (the ledger's
postings, the address issuances) read the log in its order, which need not be the rows'
order; :class:`SortedRuns` gives the log's items back in the rows' order in bounded memory.

A run's file is the online machine's, as its database is: an insider who can open it
(``/proc/PID/fd/N`` as the same user, or the file by name where the temporary directory has
no O_TMPFILE) could rewrite what the log recorded between its write and its read, and hide an
edited row. So each block's digest stays in memory and is checked before the block is read
back (as are the number of blocks): a rewritten run is a StorageError, never an answer.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import marshal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from typing import IO, Any

from custody.errors import StorageError

BLOCK = 4096
"""Items per marshalled block of a run: what the merge holds of each run."""


class SortedRuns:
    """Items added in any order, read back sorted in blocks: up to ``chunk`` are sorted in
    memory; beyond that each full chunk is sorted and written to a temporary file (marshal, in
    blocks) as a run, and reading merges the runs, or reads them one after the other when each
    began after the one before ended (the log in id order: the usual case). Every item must be
    a tuple that compares with every other (ints and strings in the same places; the caller
    checks the types), of values marshal writes."""

    def __init__(self, chunk: int, stack: ExitStack) -> None:
        self.chunk = chunk
        self.items: list[tuple[Any, ...]] = []
        self.runs: list[tuple[IO[bytes], list[bytes]]] = []
        self.stack = stack
        self.last: tuple[Any, ...] | None = None
        self.ordered = True

    def extend(self, items: Iterable[tuple[Any, ...]]) -> None:
        self.items.extend(items)
        if len(self.items) >= self.chunk:
            self._spill()

    def _spill(self) -> None:
        self.items.sort()
        if self.last is not None and self.items[0] < self.last:
            self.ordered = False
        self.last = self.items[-1]
        run = self.stack.enter_context(tempfile.TemporaryFile())
        digests = []
        for start in range(0, len(self.items), BLOCK):
            data = marshal.dumps(self.items[start : start + BLOCK])
            digests.append(_digest(data))
            run.write(len(data).to_bytes(8, "little") + data)
        run.seek(0)
        self.runs.append((run, digests))
        self.items = []

    def blocks(self) -> Iterator[list[tuple[Any, ...]]]:
        if not self.runs:
            self.items.sort()
            if self.items:
                yield self.items
            return
        if self.items:
            self._spill()
        if self.ordered:
            for run, digests in self.runs:
                yield from _read(run, digests)
            return
        merged = heapq.merge(*(_items(run, digests) for run, digests in self.runs))
        while block := list(itertools.islice(merged, BLOCK)):
            yield block


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _read(run: IO[bytes], digests: list[bytes]) -> Iterator[list[tuple[Any, ...]]]:
    """The blocks of a run, as SortedRuns._spill wrote them (a length, then the block marshalled;
    marshal.load on the file itself reads in small pieces, several times slower), each checked
    against the digest kept when it was written before it is unmarshalled. Raises StorageError."""
    for digest in digests:
        data = run.read(int.from_bytes(run.read(8), "little"))
        if _digest(data) != digest:
            raise StorageError("a temporary file of this run was changed while it ran: its answer cannot be given")
        yield marshal.loads(data)
    if run.read(1):
        raise StorageError("a temporary file of this run was changed while it ran: its answer cannot be given")


def _items(run: IO[bytes], digests: list[bytes]) -> Iterator[tuple[Any, ...]]:
    for block in _read(run, digests):
        yield from block
