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
import hmac
import json
import marshal
import os
import secrets
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, NamedTuple

from sqlalchemy import text
from sqlmodel import Session, select

from custody import verify
from custody.control import audit_log
from custody.control.wallet import COUNTER_NAMES
from custody.errors import StorageError
from custody.store.db import plain_rows, require_paged_keys
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


ROW_BATCH = 5000
"""Address rows read per query by :func:`iter_address_rows`."""

_ROW_PAGE = text(
    "SELECT chain, idx, account, address, script_pubkey, script FROM address "
    "WHERE (chain, idx) > (:chain, :idx) ORDER BY chain, idx LIMIT :n"
)


def iter_address_rows(s: Session, batch: int | None = None) -> Iterator[tuple[Any, ...]]:
    """custody.issuance.issuer.iter_addresses as the driver's own tuples ``(chain, idx, account, address,
    script_pubkey, script)``: no ``created_at``, no object per row, for the rows' checks
    (:func:`check_rows`), which read nothing else."""
    require_paged_keys(s)  # (chain, idx) unique: no second row of a page's last key goes unread
    batch = batch or ROW_BATCH
    last = (-1, -1)
    while True:
        rows = plain_rows(s, _ROW_PAGE, {"chain": last[0], "idx": last[1], "n": batch})
        if not rows:
            return
        yield from rows
        last = (rows[-1][0], rows[-1][1])


ISSUED_CHUNK = 50_000
"""Issuances read per query and sorted in memory at once (custody.store.sorted_runs)."""


def _issued(s: Session, bad: list[verify.Failure], chunk: int | None = None, seen: Any = None) -> Iterator[Issuance]:
    """The log's issuances in (chain, first index) order, streamed: read ``chunk`` at a time in
    the log's order and sorted through temporary files beyond one chunk. An entry that does not
    match its own hash (an edit; a consistent rewrite of the chain is the witnesses' to catch)
    or does not read is appended to ``bad`` instead, as the entries are read (before the first
    issuance is given). ``seen``, a hash object, is updated with every entry read
    (audit_log.entry_mark), edited or not."""
    chunk = chunk or ISSUED_CHUNK
    with ExitStack() as stack:
        found = SortedRuns(chunk, stack)
        page: list[tuple[int, int, int, int, str, str | None, str]] = []
        for row in audit_log.iter_event(s, ISSUED, chunk):
            seq, payload = row[0], row[4]
            if seen is not None:
                seen.update(audit_log.entry_mark(seq, row[7]))
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


ACCOUNTS_BLOCK = 512
"""Issuances per block of :class:`LogAccounts`' temporary file (a lookup reads one block)."""


class LogAccounts:
    """Whose each issued index is, by the audit log alone: the issuances of one chain streamed
    once (:func:`_issued`, in index order) into a temporary file, in blocks of
    :data:`ACCOUNTS_BLOCK` (first index, end, account); memory keeps each block's first index
    and place (16 bytes a block: 32 KB at a million one-address issuances) and the last block
    read. Neither the issuances nor the accounts' names are kept (a million customers with an
    address each were a million names in memory, tens of megabytes).

    The file is the online machine's, as the database is: each block carries a keyed BLAKE2b
    tag (its number and its bytes, under a key only this process's memory holds), checked
    before the block is used. Raises StorageError when the file cannot be written, or from
    :meth:`account_of` when a block was changed: no answer rather than another account's."""

    def __init__(self, s: Session, chain: int, block: int | None = None) -> None:
        self.chain = chain
        self.problems: list[verify.Failure] = []
        self._key = secrets.token_bytes(32)
        self._firsts = array("q")  # each block's first index
        self._places = array("q")  # where each block begins in the file
        self._cached: tuple[int, list[tuple[int, int, str]]] | None = None
        self._file: IO[bytes] | None = None
        size = block or ACCOUNTS_BLOCK
        try:
            self._file = tempfile.TemporaryFile()
            page: list[tuple[int, int, str]] = []
            for r in _issued(s, self.problems):
                if r.chain != chain:
                    continue
                page.append((r.first, r.end, r.account))
                if len(page) >= size:
                    self._write(page)
                    page = []
            self._write(page)
            self._file.flush()
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot write the issuances' temporary file: {exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise

    def _tag(self, number: int, data: bytes) -> bytes:
        return hashlib.blake2b(number.to_bytes(8, "big") + data, key=self._key, digest_size=16).digest()

    def _write(self, page: list[tuple[int, int, str]]) -> None:
        if not page:
            return
        assert self._file is not None
        data = marshal.dumps(page)
        self._firsts.append(page[0][0])
        self._places.append(self._file.tell())
        self._file.write(len(data).to_bytes(8, "big") + self._tag(len(self._places) - 1, data) + data)

    def _read(self, number: int) -> list[tuple[int, int, str]]:
        if self._cached is not None and self._cached[0] == number:
            return self._cached[1]
        if self._file is None:
            raise StorageError("the issuances' temporary file is closed")
        fd = self._file.fileno()
        end = self._places[number + 1] if number + 1 < len(self._places) else os.fstat(fd).st_size
        raw = os.pread(fd, end - self._places[number], self._places[number])
        data = raw[24:]
        if int.from_bytes(raw[:8], "big") != len(data) or not hmac.compare_digest(raw[8:24], self._tag(number, data)):
            raise StorageError(
                "the issuances' temporary file was changed while it was in use: whose an index is cannot be answered"
            )
        page: list[tuple[int, int, str]] = marshal.loads(data)
        self._cached = (number, page)
        return page

    def account_of(self, index: int) -> str | None:
        """The account the log issued ``index`` to; None when the log never issued it.
        Raises StorageError when the temporary file was changed."""
        number = bisect.bisect_right(self._firsts, index) - 1
        if number < 0:
            return None
        page = self._read(number)
        at = bisect.bisect_right(page, index, key=lambda item: item[0]) - 1
        if at >= 0 and page[at][0] <= index < page[at][1]:
            return page[at][2]
        return None

    def close(self) -> None:
        """Drop the temporary file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class _Walk:
    """The rows of one issuance as they come, against what the log recorded."""

    def __init__(self, record: Issuance) -> None:
        self.record = record
        self.rows = hashlib.sha256()
        self.addresses = hashlib.sha256()
        self.seen = 0
        self.next = record.first
        self.accounts_ok = True

    def add(self, row: tuple[Any, ...], failures: list[verify.Failure]) -> None:
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


def problem(f: verify.Failure) -> str:
    """A row's failure as ``custody audit log --verify`` names it."""
    return f"address {f.address} ({f.chain}/{f.index}): {f.reason}"


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


def check_rows(
    s: Session, rows: Iterable[tuple[Any, ...]], chunk: int | None = None, seen: Any = None
) -> list[verify.Failure]:
    """Every address row against the log's issuances (``rows`` in (chain, index) order: each
    ``(chain, idx, account, address, script_pubkey, script, ...)``, a StoredRow or a plain tuple).

    Returns what differs, empty when the store's addresses are exactly what was issued: the
    first :data:`LISTED` differences, then one that counts the rest. The issuances are
    streamed (:func:`_issued`, ``chunk`` at a time): memory is bounded at any number of them.
    ``seen``: a hash object updated with every ``address.issued`` entry read (:func:`_issued`).
    """
    failures = _Bounded([])
    issued = _Records(_issued(s, failures, chunk, seen), failures)
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
                    row[3],
                    row[0],
                    row[1],
                    f"in the store (account {row[2]!r}), never issued in the audit log: inserted outside the tool",
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
