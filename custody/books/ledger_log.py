"""The ledger's rows against the postings the audit log recorded, in bounded memory.

Every posting appends one ``ledger.posted`` entry naming its transaction and each of its
entries (id, account key, amount; custody.books.ledger.post). :func:`log_problems` reads
both sides in chunks and walks them side by side in id order:

* the rows (``ledger_entry`` joined to its account, ``ledger_txn``) come sorted from the
  database, a page of ``chunk`` rows at a time;
* the log's postings come in the log's order, which need not be id order (on PostgreSQL two
  postings may take their ids in one order and the audit head's lock in the other): each
  chunk of them is sorted and, when there is more than one, written to a temporary file as
  a sorted run; the runs are merged as they are read (:class:`_Sorted`). Memory holds one
  chunk while reading and one block of each run while merging, at any size of the ledger.

Edits to the log itself are for the chain check (custody.control.audit_log.verify_chain).
"""

from __future__ import annotations

import heapq
import json
import marshal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import IO, Any

from sqlalchemy import text
from sqlmodel import Session

from custody.books.ledger import POSTED
from custody.store.db import plain_rows

CHUNK = 100_000
"""Log entries, and rows, read per query; also the most postings' entries sorted in memory
at once before they are spilled to a temporary file as a sorted run."""

_BLOCK = 4096  # items per marshalled block of a run: what the merge holds of each run

_LOGGED = text(f"SELECT seq, payload FROM audit_log WHERE event = '{POSTED}' AND seq > :last ORDER BY seq LIMIT :n")
_ENTRY_ROWS = text(
    "SELECT e.id, e.txn_id, a.key, e.amount FROM ledger_entry AS e "
    "LEFT JOIN ledger_account AS a ON a.id = e.account_id WHERE e.id > :last ORDER BY e.id LIMIT :n"
)
_TXN_ROWS = text("SELECT id, event, ref FROM ledger_txn WHERE id > :last ORDER BY id LIMIT :n")

Posted = tuple[int, int, str, int]
"""One entry as the log recorded it and as its row says: (entry id, transaction id, account key, amount)."""
Txn = tuple[int, str, str]
"""One transaction as the log recorded it and as its row says: (id, event, ref)."""


class _Sorted:
    """Items added in any order, read back sorted: up to ``chunk`` are sorted in memory; beyond
    that each full chunk is sorted and written to a temporary file (marshal, in blocks), and
    reading merges the runs. Every item must be a tuple of ints and strings in the same places
    (comparable with every other): the caller checks the types."""

    def __init__(self, chunk: int, stack: ExitStack) -> None:
        self.chunk = chunk
        self.items: list[tuple[Any, ...]] = []
        self.runs: list[IO[bytes]] = []
        self.stack = stack

    def extend(self, items: Iterable[tuple[Any, ...]]) -> None:
        self.items.extend(items)
        if len(self.items) >= self.chunk:
            self._spill()

    def _spill(self) -> None:
        self.items.sort()
        run = self.stack.enter_context(tempfile.TemporaryFile())
        for start in range(0, len(self.items), _BLOCK):
            marshal.dump(self.items[start : start + _BLOCK], run)
        run.seek(0)
        self.runs.append(run)
        self.items = []

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if not self.runs:
            self.items.sort()
            return iter(self.items)
        if self.items:
            self._spill()
        return heapq.merge(*(_read(run) for run in self.runs))


def _read(run: IO[bytes]) -> Iterator[tuple[Any, ...]]:
    while True:
        try:
            block = marshal.load(run)
        except EOFError:
            return
        yield from block


def _pages(s: Session, query: Any, chunk: int) -> Iterator[tuple[Any, ...]]:
    """Every row of ``query`` (keyed on its first column, which it is ordered by), ``chunk`` at a time."""
    last: Any = -1
    while True:
        rows = plain_rows(s, query, {"last": last, "n": chunk})
        if not rows:
            return
        yield from rows
        last = rows[-1][0]


def _typed(entries: list[Posted], txns: list[Txn]) -> bool:
    """Whether postings' fields have the types the tool writes (ints, strings): anything else was
    written by hand, and would not sort beside the rest."""
    return all(type(i) is int and type(v) is str and type(r) is str for i, v, r in txns) and all(
        type(e) is int and type(t) is int and type(k) is str and type(a) is int for e, t, k, a in entries
    )


def _read_log(s: Session, chunk: int, logged: _Sorted, txns: _Sorted, problems: list[str]) -> None:
    """Every ``ledger.posted`` entry into ``logged`` and ``txns``; an unreadable one named in ``problems``."""
    page: list[tuple[int, str]] = []
    for record in _pages(s, _LOGGED, chunk):
        page.append(record)
        if len(page) >= chunk:
            _parse(page, logged, txns, problems)
            page = []
    _parse(page, logged, txns, problems)


def _parse(page: list[tuple[int, str]], logged: _Sorted, txns: _Sorted, problems: list[str]) -> None:
    try:  # one parse of the page, then plain tuples: the fast path
        docs = json.loads("[" + ",".join(payload for _, payload in page) + "]")
        if len(docs) != len(page):
            raise ValueError("a payload is not one JSON value")
        entries: list[Posted] = [(e, d["txn"], k, a) for d in docs for e, k, a in d["entries"]]
        found: list[Txn] = [(d["txn"], d["event"], d["ref"]) for d in docs]
        if not _typed(entries, found):
            raise TypeError("a field of another type")
    except (ValueError, TypeError, KeyError):  # one by one, naming the entry that does not read
        entries, found = [], []
        for seq, payload in page:
            try:
                d = json.loads(payload)
                mine = [(e, d["txn"], k, a) for e, k, a in d["entries"]]
                txn = (d["txn"], d["event"], d["ref"])
                if not _typed(mine, [txn]):
                    raise TypeError("a field of another type")
            except (ValueError, TypeError, KeyError):
                problems.append(f"audit log entry {seq} is not a readable posting record")
                continue
            entries += mine
            found.append(txn)
    logged.extend(entries)
    txns.extend(found)


def log_problems(s: Session, shown: int = 20, chunk: int | None = None) -> list[str]:
    """Compare every ledger entry and transaction row with the postings the audit log recorded.

    Finds an entry re-pointed to another account (the cached balances fixed up or not), an
    amount changed, an entry or a transaction deleted or inserted outside the tool; names the
    first ``shown`` differences of each kind and counts the rest. Reads ``chunk`` rows (default
    :data:`CHUNK`) at a time: linear time, memory bounded at any size of the ledger.
    """
    chunk = chunk or CHUNK
    problems: list[str] = []
    with ExitStack() as stack:
        logged, txns = _Sorted(chunk, stack), _Sorted(chunk, stack)
        _read_log(s, chunk, logged, txns, problems)
        problems += _differences(iter(logged), _pages(s, _ENTRY_ROWS, chunk), shown, _entry_difference)
        problems += _differences(iter(txns), _pages(s, _TXN_ROWS, chunk), shown, _txn_difference)
    return problems


def _differences(
    logged: Iterator[tuple[Any, ...]],
    rows: Iterator[tuple[Any, ...]],
    shown: int,
    describe: Callable[[Any, Any], str],
) -> list[str]:
    """Walk two streams sorted by their first field (the id) and name what differs: the first
    ``shown``, then how many more."""
    found: list[str] = []
    count = 0
    want = next(logged, None)
    have = next(rows, None)
    while want is not None or have is not None:
        if want == have:
            want, have = next(logged, None), next(rows, None)
            continue
        if want is not None and (have is None or want[0] < have[0]):
            message, want = describe(want, None), next(logged, None)
        elif have is not None and (want is None or have[0] < want[0]):
            message, have = describe(None, have), next(rows, None)
        else:
            message = describe(want, have)
            want, have = next(logged, None), next(rows, None)
        count += 1
        if len(found) < shown:
            found.append(message)
    if count > len(found):
        found[-1] += f" (and {count - len(found)} more differences from the audit log)"
    return found


def _entry_difference(want: Posted | None, have: Posted | None) -> str:
    if have is None:
        assert want is not None
        return (
            f"ledger entry #{want[0]} ({want[2]} {want[3]} sat in transaction #{want[1]}) is in the audit log "
            "but not in the ledger: deleted outside the tool"
        )
    if want is None:
        return (
            f"ledger entry #{have[0]} ({have[2]} {have[3]} sat in transaction #{have[1]}) is not in the audit "
            "log: inserted outside the tool"
        )
    return (
        f"ledger entry #{have[0]} says {have[2]} {have[3]} sat in transaction #{have[1]}; the audit log recorded "
        f"{want[2]} {want[3]} sat in transaction #{want[1]}: changed outside the tool"
    )


def _txn_difference(want: Txn | None, have: Txn | None) -> str:
    if have is None:
        assert want is not None
        return f"ledger transaction #{want[0]} ({want[1]} for {want[2]}) is in the audit log but not in the ledger"
    if want is None:
        return f"ledger transaction #{have[0]} ({have[1]} for {have[2]}) is not in the audit log: inserted outside"
    return f"ledger transaction #{have[0]} says {have[1]} for {have[2]}; the audit log recorded {want[1]} for {want[2]}"
