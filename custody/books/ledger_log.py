"""The ledger's rows against the postings the audit log recorded, in bounded memory.

Every posting appends one ``ledger.posted`` entry naming its transaction and each of its
entries (id, account key, amount; custody.books.ledger.post). :func:`log_problems` reads
both sides in chunks and walks them side by side in id order:

* the rows (``ledger_entry`` joined to its account, ``ledger_txn``) come sorted from the
  database, a page of ``chunk`` rows at a time;
* the log's postings come in the log's order, which need not be id order (on PostgreSQL two
  postings may take their ids in one order and the audit head's lock in the other): each
  chunk of them is sorted and, when there is more than one, written to a temporary file as
  a sorted run; the runs are merged as they are read (custody.store.sorted_runs). Memory holds one
  chunk while reading and one block of each run while merging, at any size of the ledger.

Edits to the log itself are for the chain check (custody.control.audit_log.verify_chain).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from operator import itemgetter
from typing import Any

from sqlalchemy import text
from sqlmodel import Session

from custody.books.ledger import POSTED
from custody.store.db import plain_rows, require_paged_keys
from custody.store.sorted_runs import SortedRuns

CHUNK = 50_000
"""Log entries, and rows, read per query; also the most postings' entries sorted in memory
at once before they are spilled to a temporary file as a sorted run."""

_STRETCH = 256  # items compared at once where the log and the rows agree

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


def _pages(s: Session, query: Any, chunk: int) -> Iterator[list[tuple[Any, ...]]]:
    """Every row of ``query`` (keyed on its first column, which it is ordered by), ``chunk`` at a time."""
    last: Any = -1
    require_paged_keys(s)
    while True:
        rows = plain_rows(s, query, {"last": last, "n": chunk})
        if not rows:
            return
        yield rows
        last = rows[-1][0]


def _typed(entries: list[Posted], txns: list[Txn]) -> bool:
    """Whether postings' fields have the types the tool writes (ints, strings): anything else was
    written by hand, and would not sort beside the rest. Field by field, in C."""
    return all(
        set(map(type, map(itemgetter(k), items))) <= {kind}
        for items, kinds in ((entries, (int, int, str, int)), (txns, (int, str, str)))
        for k, kind in enumerate(kinds)
    )


def _read_log(s: Session, chunk: int, logged: SortedRuns, txns: SortedRuns, problems: list[str]) -> None:
    """Every ``ledger.posted`` entry into ``logged`` and ``txns``; an unreadable one named in ``problems``."""
    for page in _pages(s, _LOGGED, chunk):
        _parse(page, logged, txns, problems)


def _parse(page: list[tuple[int, str]], logged: SortedRuns, txns: SortedRuns, problems: list[str]) -> None:
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
    collecting = gc.isenabled()
    gc.disable()  # a chunk's parsed postings all stay alive while read: the collector would only rescan them
    with ExitStack() as stack:
        if collecting:
            stack.callback(gc.enable)
        logged, txns = SortedRuns(chunk, stack), SortedRuns(chunk, stack)
        _read_log(s, chunk, logged, txns, problems)
        problems += _differences(logged.blocks(), _pages(s, _ENTRY_ROWS, chunk), shown, _entry_difference)
        problems += _differences(txns.blocks(), _pages(s, _TXN_ROWS, chunk), shown, _txn_difference)
    return problems


def _differences(
    logged: Iterator[list[tuple[Any, ...]]],
    rows: Iterator[list[tuple[Any, ...]]],
    shown: int,
    describe: Callable[[Any, Any], str],
) -> list[str]:
    """Walk two streams of blocks sorted by their first field (the id) and name what differs:
    the first ``shown``, then how many more. Where both agree, a stretch of up to _STRETCH items
    is compared at once (in C); at a difference, item by item."""
    found: list[str] = []
    count = 0
    a: list[tuple[Any, ...]] = []
    b: list[tuple[Any, ...]] = []
    i = j = 0
    while True:
        if i == len(a):
            a, i = next(logged, []), 0
        if j == len(b):
            b, j = next(rows, []), 0
        if not a and not b:
            break
        n = min(len(a) - i, len(b) - j, _STRETCH)
        if n and a[i : i + n] == b[j : j + n]:
            i, j = i + n, j + n
            continue
        want = a[i] if a else None
        have = b[j] if b else None
        message: str | None
        if want is not None and (have is None or want[0] < have[0]):
            message, i = describe(want, None), i + 1
        elif have is not None and (want is None or have[0] < want[0]):
            message, j = describe(None, have), j + 1
        else:
            message = describe(want, have) if want != have else None
            i, j = i + 1, j + 1
        if message is None:
            continue
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
