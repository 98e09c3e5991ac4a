"""What the audit log says was issued: the truth the address rows are checked against.

Every issuance appends one ``address.issued`` entry to the hash-chained audit log, in the
transaction that stores the rows: the chain, the first index, the count, the account and
``rows_sha256``, a digest of every issued row (index, account, address, scriptPubKey,
script; :func:`row_line`). The ``address`` table is a copy the tool reads quickly; the log
is what it was.

* :func:`check_rows` walks every address row beside the log's issuances (one ordered pass,
  constant memory) and names a row whose account was changed, a row deleted or inserted
  outside the tool, an address or script edited, and a counter set back.
* :class:`LogAccounts` answers "whose is chain/index?" from the log alone, for crediting
  deposits (custody.books.deposits).

Edits to the log itself are the chain check's and the witnesses' (custody.control.witness).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from array import array
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlmodel import Session, select

from custody import verify
from custody.control import audit_log
from custody.control.wallet import COUNTER_NAMES
from custody.store.models import Counter
from custody.store.sorted_runs import SortedRuns

ISSUED = "address.issued"
SHOWN = 20
LISTED = 1000
"""Failures :func:`check_rows` lists at most; the rest are counted (memory stays bounded when
every row of a million differs)."""
LOG = "(audit log)"


def row_line(chain: int, index: int, account: str, address: str, script_pubkey: str, script: str) -> bytes:
    """One issued row as ``rows_sha256`` hashes it (hex scripts, one line each)."""
    return f"{chain}/{index} {account} {address} {script_pubkey} {script}\n".encode()


class StoredRow(NamedTuple):
    """One address row as read in bulk (custody.issuance.issuer.iter_addresses): a plain
    tuple, no ORM object kept or tracked."""

    chain: int
    idx: int
    account: str
    address: str
    script_pubkey: str
    script: str
    created_at: datetime | str  # as the driver gives it: custody.issuance.issuer.stored_at


@dataclass(frozen=True)
class Issuance:
    """One ``address.issued`` entry: indexes ``first`` .. ``first + count - 1`` of ``chain``."""

    seq: int
    chain: int
    first: int
    count: int
    account: str
    rows_sha256: str | None  # None in entries written before it was recorded
    addresses_sha256: str

    @property
    def end(self) -> int:
        return self.first + self.count


ISSUED_CHUNK = 50_000
"""Issuances read per query and sorted in memory at once (custody.store.sorted_runs)."""


def _issued(s: Session, bad: list[verify.Failure], chunk: int | None = None) -> Iterator[Issuance]:
    """The log's issuances in (chain, first index) order, streamed: read ``chunk`` at a time in
    the log's order and sorted through temporary files beyond one chunk. An entry that does not
    match its own hash (an edit; a consistent rewrite of the chain is the witnesses' to catch)
    or does not read is appended to ``bad`` instead, as the entries are read (before the first
    issuance is given)."""
    chunk = chunk or ISSUED_CHUNK
    with ExitStack() as stack:
        found = SortedRuns(chunk, stack)
        page: list[tuple[int, int, int, int, str, str | None, str]] = []
        for row in audit_log.iter_event(s, ISSUED, chunk):
            seq, payload = row[0], row[4]
            if not audit_log.row_intact(row):
                bad.append(verify.Failure(LOG, -1, -1, f"audit log entry {seq} (address.issued) was edited"))
                continue
            try:
                doc = json.loads(payload)
                page.append(
                    (
                        int(doc["chain"]),
                        int(doc["first_index"]),
                        seq,
                        int(doc["count"]),
                        str(doc["account"]),
                        str(doc["rows_sha256"]) if "rows_sha256" in doc else None,
                        str(doc["addresses_sha256"]),
                    )
                )
            except (ValueError, TypeError, KeyError):
                bad.append(verify.Failure(LOG, -1, -1, f"audit log entry {seq} is not a readable issuance"))
                continue
            if len(page) >= chunk:
                found.extend(page)
                page = []
        found.extend(page)
        for block in found.blocks():
            for chain, first, seq, count, account, rows_sha256, addresses_sha256 in block:
                yield Issuance(seq, chain, first, count, account, rows_sha256, addresses_sha256)


class LogAccounts:
    """Whose each issued index is, by the audit log alone: the issuances of one chain streamed
    once (:func:`_issued`) into three compact arrays, bisected. No object is kept per issuance:
    20 bytes each and one string per distinct account (a million one-address issuances were a
    million objects with their digests, hundreds of megabytes)."""

    def __init__(self, s: Session, chain: int) -> None:
        self.chain = chain
        self.problems: list[verify.Failure] = []
        self._starts = array("q")
        self._ends = array("q")
        self._owners = array("I")
        self._accounts: list[str] = []
        numbers: dict[str, int] = {}
        for r in _issued(s, self.problems):
            if r.chain != chain:
                continue
            number = numbers.setdefault(r.account, len(self._accounts))
            if number == len(self._accounts):
                self._accounts.append(r.account)
            self._starts.append(r.first)
            self._ends.append(r.end)
            self._owners.append(number)

    def account_of(self, index: int) -> str | None:
        """The account the log issued ``index`` to; None when the log never issued it."""
        at = bisect.bisect_right(self._starts, index) - 1
        if at >= 0 and self._starts[at] <= index < self._ends[at]:
            return self._accounts[self._owners[at]]
        return None


class _Walk:
    """The rows of one issuance as they come, against what the log recorded."""

    def __init__(self, record: Issuance) -> None:
        self.record = record
        self.rows = hashlib.sha256()
        self.addresses = hashlib.sha256()
        self.seen = 0
        self.next = record.first
        self.accounts_ok = True

    def add(self, row: StoredRow, failures: list[verify.Failure]) -> None:
        r = self.record
        chain, idx, account, address, script_pubkey, script = row[:6]
        if idx > self.next:
            self.missing(self.next, idx, failures)
        self.next = idx + 1
        if account != r.account:
            self.accounts_ok = False
            failures.append(
                verify.Failure(
                    address,
                    chain,
                    idx,
                    f"the store says account {account!r}; the audit log issued it to {r.account!r} "
                    f"(entry {r.seq}): changed outside the tool",
                )
            )
        if r.rows_sha256 is not None:  # row_line, written out: it runs once per address
            self.rows.update(f"{chain}/{idx} {r.account} {address} {script_pubkey} {script}\n".encode())
        else:  # an entry from before rows_sha256: only the addresses were recorded
            self.addresses.update((b"\n" if self.seen else b"") + address.encode())
        self.seen += 1

    def missing(self, start: int, stop: int, failures: list[verify.Failure]) -> None:
        r = self.record
        for index in range(start, min(stop, start + SHOWN)):
            failures.append(
                verify.Failure(
                    "(missing)",
                    r.chain,
                    index,
                    f"issued to {r.account!r} by audit log entry {r.seq}, not in the store: deleted outside the tool",
                )
            )
        if stop - start > SHOWN:
            failures.append(
                verify.Failure(
                    LOG, r.chain, start, f"{stop - start - SHOWN} more addresses of entry {r.seq} are missing"
                )
            )

    def finish(self, failures: list[verify.Failure]) -> None:
        r = self.record
        if self.next < r.end:
            self.missing(self.next, r.end, failures)
        if self.seen != r.count or not self.accounts_ok:
            return  # named row by row above
        if r.rows_sha256 is not None:
            same = self.rows.hexdigest() == r.rows_sha256
        else:
            same = self.addresses.hexdigest() == r.addresses_sha256
        if not same:
            failures.append(
                verify.Failure(
                    LOG,
                    r.chain,
                    r.first,
                    f"the {r.count} address row(s) {r.chain}/{r.first}..{r.end - 1} are not what audit log entry "
                    f"{r.seq} recorded (an address or script edited outside the tool)",
                )
            )


class _Bounded(list[verify.Failure]):
    """A list of failures that keeps the first ``LISTED`` and counts the rest."""

    def __init__(self, first: list[verify.Failure]) -> None:
        super().__init__(first[:LISTED])
        self.more = max(0, len(first) - LISTED)

    def append(self, failure: verify.Failure) -> None:
        if len(self) < LISTED:
            super().append(failure)
        else:
            self.more += 1

    def listed(self) -> list[verify.Failure]:
        out = list(self)
        if self.more:
            out.append(
                verify.Failure(
                    LOG, -1, -1, f"{self.more} more differences between the address rows and the audit log (not listed)"
                )
            )
        return out


def _span(record: Issuance | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """A record's last (chain, index) and its first."""
    return ((record.chain, record.end - 1), (record.chain, record.first)) if record else ((0, 0), (0, 0))


class _Records:
    """The issuances as they come, each checked against the one before (the same indexes issued
    twice), and the end of each chain's issued indexes so far."""

    def __init__(self, records: Iterator[Issuance], failures: list[verify.Failure]) -> None:
        self.records = records
        self.failures = failures
        self.before: Issuance | None = None
        self.ends: dict[int, int] = {}

    def next(self) -> Issuance | None:
        r = next(self.records, None)
        if r is None:
            return None
        a = self.before
        if a is not None and a.chain == r.chain and r.first < a.end:
            self.failures.append(
                verify.Failure(LOG, r.chain, r.first, f"audit log entries {a.seq} and {r.seq} issue the same indexes")
            )
        self.ends[r.chain] = max(self.ends.get(r.chain, 0), r.end)
        self.before = r
        return r


def check_rows(s: Session, rows: Iterable[StoredRow], chunk: int | None = None) -> list[verify.Failure]:
    """Every address row against the log's issuances (``rows`` in (chain, index) order).

    Returns what differs, empty when the store's addresses are exactly what was issued: the
    first :data:`LISTED` differences, then one that counts the rest. The issuances are
    streamed (:func:`_issued`, ``chunk`` at a time): memory is bounded at any number of them.
    """
    failures = _Bounded([])
    issued = _Records(_issued(s, failures, chunk), failures)
    walk: _Walk | None = None
    record = issued.next()
    last, start = _span(record)
    for row in rows:
        key = (row[0], row[1])
        while record is not None and last < key:  # every record wholly before this row: done
            if walk is None or walk.record is not record:
                walk = _Walk(record)
            walk.finish(failures)
            walk = None
            record = issued.next()
            last, start = _span(record)
        if record is None or key < start:
            failures.append(
                verify.Failure(
                    row.address,
                    row.chain,
                    row.idx,
                    f"in the store (account {row.account!r}), never issued in the audit log: inserted outside the tool",
                )
            )
            continue
        if walk is None or walk.record is not record:
            walk = _Walk(record)
        walk.add(row, failures)
    while record is not None:
        if walk is None or walk.record is not record:
            walk = _Walk(record)
        walk.finish(failures)
        walk = None
        record = issued.next()
    ends = issued.ends
    for counter in s.exec(select(Counter)).all():
        chain = next((c for c, name in COUNTER_NAMES.items() if name == counter.name), None)
        if chain is not None and counter.next_value != ends.get(chain, 0):
            failures.append(
                verify.Failure(
                    LOG,
                    chain,
                    counter.next_value,
                    f"the next index of chain {chain} is {counter.next_value}; the audit log issued "
                    f"{ends.get(chain, 0)}: the counter was changed outside the tool",
                )
            )
    return failures.listed()
