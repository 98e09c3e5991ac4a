"""Items too many to hold, sorted through temporary files: sorted runs, merged as they are read.

The audits that compare what the audit log recorded with the rows beside it (the ledger's
postings, the address issuances) read the log in its order, which need not be the rows'
order; :class:`SortedRuns` gives the log's items back in the rows' order in bounded memory.
"""

from __future__ import annotations

import heapq
import itertools
import marshal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from typing import IO, Any

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
        self.runs: list[IO[bytes]] = []
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
        for start in range(0, len(self.items), BLOCK):
            data = marshal.dumps(self.items[start : start + BLOCK])
            run.write(len(data).to_bytes(8, "little") + data)
        run.seek(0)
        self.runs.append(run)
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
            for run in self.runs:
                yield from _read(run)
            return
        merged = heapq.merge(*(_items(run) for run in self.runs))
        while block := list(itertools.islice(merged, BLOCK)):
            yield block


def _read(run: IO[bytes]) -> Iterator[list[tuple[Any, ...]]]:
    """The blocks of a run, as SortedRuns._spill wrote them (a length, then the block marshalled;
    marshal.load on the file itself reads in small pieces, several times slower)."""
    while size := int.from_bytes(run.read(8), "little"):
        yield marshal.loads(run.read(size))


def _items(run: IO[bytes]) -> Iterator[tuple[Any, ...]]:
    for block in _read(run):
        yield from block
