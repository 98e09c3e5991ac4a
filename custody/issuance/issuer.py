"""Issuing deposit (and change) addresses: allocate indexes, derive, verify, store.

Each index is used exactly once: the chain's counter row is bumped with
``UPDATE ... RETURNING`` inside the same transaction that stores the addresses, so two
processes (PostgreSQL row lock, SQLite write lock) get disjoint ranges, and a failed
issuance rolls its range back (no gaps). The addresses are derived and verified before any
lock is taken, at the index the counter says then, and again if the allocation under the
lock gives another: the locks are held only for the halt's check of what changed since,
the allocation and the insert (:func:`issue_in_session`).

Every new address is checked by the independent verifier against the pinned founders'
manifest before it is stored or shown; a mismatch raises the trading halt and nothing is
returned.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from itertools import repeat
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text, tuple_
from sqlmodel import Session, col, func, select

from custody import verify
from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log, epochs, halt
from custody.control.wallet import COUNTER_NAMES
from custody.errors import Conflict, InputError, NotFound, VerificationFailed
from custody.faults import crash_point, pause_point
from custody.issuance.record import ISSUED, StoredRow, row_line
from custody.policy.generator import AddressDeriver, DerivedAddress
from custody.policy.manifest import SignedManifest
from custody.policy.model import RECEIVE, Policy
from custody.store.db import Database, plain_rows, require_paged_keys
from custody.store.models import AddressRow

MAX_BATCH = 1_000_000


@dataclass(frozen=True)
class IssuedAddress:
    chain: int
    index: int
    account: str
    address: str
    script_pubkey: str
    script: str
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "chain": self.chain,
            "index": self.index,
            "account": self.account,
            "address": self.address,
            "script_pubkey": self.script_pubkey,
            "script": self.script,
            "created_at": iso(self.created_at),
        }


def check_account(account: str) -> str:
    """Raises InputError for an empty, over-long or non-printable account name."""
    if not account or len(account) > 128 or not account.isprintable() or account != account.strip():
        raise InputError("account must be 1 to 128 printable characters without leading or trailing spaces")
    return account


def _row_to_issued(row: AddressRow | StoredRow) -> IssuedAddress:
    at = row.created_at if isinstance(row, AddressRow) else stored_at(row.created_at)
    return IssuedAddress(row.chain, row.idx, row.account, row.address, row.script_pubkey, row.script, at)


def load_manifest(settings: Settings) -> verify.Manifest:
    """The newest founders-signed manifest pinned on this machine (the first one, or the newest
    rotation pinned beside it: custody.control.epochs), as the independent verifier reads it:
    what every issued address is verified against.

    Raises StorageError when none is pinned, VerificationFailed when it is not signed by every
    founder (or a rotation by too few of its predecessor's): issuing unverified addresses is
    never an option.
    """
    return _verifier_manifest(epochs.pinned_chain(settings)[-1])


_parsed: dict[str, verify.Manifest] = {}


def _verifier_manifest(newest: SignedManifest) -> verify.Manifest:
    """The verifier's reading of ``newest``, once per process per manifest (its digest covers
    every byte of the body the verifier reads)."""
    manifest = _parsed.get(newest.digest)
    if manifest is None:
        try:
            manifest = verify.parse_manifest(newest.body)
        except verify.ManifestError as exc:
            raise VerificationFailed(f"the pinned founders' manifest is unusable: {exc}") from None
        if len(_parsed) >= 8:
            _parsed.clear()
        _parsed[newest.digest] = manifest
    return manifest


def load_manifest_or_halt(db: Database, settings: Settings) -> verify.Manifest:
    """:func:`load_manifest`; a pinned manifest the founders' signatures do not cover halts
    trading before the error is raised (someone edited or replaced it)."""
    manifest, pinned = _pinned_or_halt(db, settings)
    with db.transaction() as s:
        _not_behind(pinned, epochs.store_epochs(s))
    return manifest


def _pinned_or_halt(db: Database, settings: Settings) -> tuple[verify.Manifest, list[str]]:
    """The verifier's manifest and the digests of the chain pinned here; halts as
    :func:`load_manifest_or_halt`."""
    try:
        chain = epochs.pinned_chain(settings)
        manifest = _verifier_manifest(chain[-1])
    except VerificationFailed as exc:
        halt.raise_halt(db, settings, reason=str(exc), source="verification", actor="address-issuance")
        raise VerificationFailed(f"{exc} — trading is halted") from None
    return manifest, [m.digest for m in chain]


def _not_behind(pinned: list[str], store: list[epochs.Epoch]) -> None:
    """Refuse (Conflict, nothing halted) while a rotation is pinned here but not yet in the store:
    `custody rotate apply` stopped between its two steps. Anything else that differs is left to
    the verification of every issued address, which halts."""
    stored = [e.manifest.digest for e in store]
    if len(pinned) > len(stored) and pinned[: len(stored)] == stored:
        raise Conflict(
            f"a rotation is pinned on this machine but not applied to the store: run `custody rotate apply` "
            f"with it again ({len(pinned) - len(stored)} pending)"
        )


class RotatedMeanwhile(Conflict):
    """A rotation was applied after this issuance read the policy and before it took the locks:
    what it derived belongs to the old policy, whose indexes ended where the new epoch began."""


_NEWEST_EPOCH = text("SELECT MAX(epoch) FROM policy_epoch")


def _same_epoch(s: Session, read: epochs.Epoch) -> None:
    """Raise RotatedMeanwhile unless ``read`` is still the newest epoch. Called under the audit
    head's lock, which a rotation holds from its check to its commit: one that committed before
    is seen here (PostgreSQL reads each statement anew), none can commit before this issuance
    does. Without it, an issuer that read the epochs just before a rotation committed would
    allocate indexes of the new epoch and store the old policy's addresses at them."""
    if int(s.execute(_NEWEST_EPOCH).scalar() or 0) != read.number:
        raise RotatedMeanwhile("a key rotation was applied while these addresses were being issued: issue them again")


def _peek(s: Session, chain: int) -> int:
    """The next index of ``chain`` as last committed, without a lock: a prediction only."""
    value = s.execute(
        text("SELECT next_value FROM counter WHERE name = :name"), {"name": COUNTER_NAMES[chain]}
    ).scalar()
    return int(value or 0)


Checked = tuple[list[DerivedAddress], list[tuple[DerivedAddress, list[str]]]]
PARALLEL_MIN = 5000  # below this a batch is derived in this process
_CHUNK = 2500
_pool: ProcessPoolExecutor | None = None


def _derive_range(policy: Policy, manifest: verify.Manifest, chain: int, first: int, count: int) -> Checked:
    """Derive ``count`` addresses from ``first`` and have the verifier check each one."""
    deriver = _deriver(policy)
    good: list[DerivedAddress] = []
    bad: list[tuple[DerivedAddress, list[str]]] = []
    for index in range(first, first + count):
        derived = deriver.derive(chain, index)
        reasons = verify.verify_address(manifest, chain, index, derived.address)
        if reasons:
            bad.append((derived, reasons))
        else:
            good.append(derived)
    return good, bad


@functools.lru_cache(maxsize=4)
def _deriver(policy: Policy) -> AddressDeriver:
    """One deriver (its founders' chain-level keys derived once) per policy per process."""
    return AddressDeriver(policy)


def _workers() -> ProcessPoolExecutor:
    """One pool per process, started on first use from a clean forkserver (it inherits no
    database connection, unlike a plain fork inside the issuing transaction)."""
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=get_context("forkserver"))
        atexit.register(_pool.shutdown)
    return _pool


def _derive_checked(
    policy: Policy,
    manifest: verify.Manifest,
    chain: int,
    first: int,
    count: int,
    progress: Callable[[int], None] | None = None,
) -> Checked:
    """Derive and verify a range, on every core for a large batch; results in index order.
    ``progress`` is called with the number derived and verified so far, every _CHUNK."""
    starts = range(first, first + count, _CHUNK)
    sizes = [min(_CHUNK, first + count - start) for start in starts]
    if count < PARALLEL_MIN or (os.cpu_count() or 1) < 2:
        if progress is None:
            return _derive_range(policy, manifest, chain, first, count)
        parts: Iterable[Checked] = map(_derive_range, repeat(policy), repeat(manifest), repeat(chain), starts, sizes)
    else:
        parts = _workers().map(_derive_range, repeat(policy), repeat(manifest), repeat(chain), starts, sizes)
    good: list[DerivedAddress] = []
    bad: list[tuple[DerivedAddress, list[str]]] = []
    for chunk_good, chunk_bad in parts:
        good.extend(chunk_good)
        bad.extend(chunk_bad)
        if progress is not None:
            progress(len(good) + len(bad))
    return good, bad


class AddressMismatch(VerificationFailed):
    """A freshly derived address did not verify; raised inside the issuing transaction."""

    def __init__(self, derived: DerivedAddress, reasons: list[str]) -> None:
        self.derived = derived
        self.reasons = reasons
        super().__init__(
            f"issued address {derived.address} at {derived.chain}/{derived.index} failed verification "
            f"against the founders' manifest: {'; '.join(reasons)}"
        )


def issue_in_session(
    s: Session,
    manifest: verify.Manifest,
    account: str,
    count: int = 1,
    chain: int = RECEIVE,
    actor: str = "operator",
    *,
    pinned: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[IssuedAddress]:
    """Issue addresses inside the caller's transaction (see :func:`issue_addresses`);
    ``pinned``: the digests of the chain pinned here, to refuse while a rotation is pinned but
    not applied (:func:`load_manifest_or_halt` checks that for the other callers);
    ``progress``: called with how many of ``count`` are derived and verified so far (the work
    before the lock), for a long batch on a terminal.

    Raises HaltedError, InputError, Conflict, AddressMismatch (the caller must roll back, then
    raise the halt with :func:`halt_for_mismatch`), StorageError.
    """
    check_account(account)
    if not 1 <= count <= MAX_BATCH:
        raise InputError(f"count must be between 1 and {MAX_BATCH}")
    store = epochs.store_epochs(s)
    if pinned is not None:
        _not_behind(pinned, store)
    policy = store[-1].policy  # the newest: old policies' addresses are never issued again
    seen = halt.guard(s, lock=False)  # refused before any work; the locked part below is short
    # Derived and verified before any lock, at the index the counter says now: with one issuer
    # that is the index it gets; another that allocated meanwhile makes it derive again below.
    # Nothing of this is stored or shown unless the allocation under the lock confirms it.
    predicted = _peek(s, chain)
    good, failure = _derive_checked(policy, manifest, chain, predicted, count, progress)
    if failure:
        raise AddressMismatch(*failure[0])
    pause_point("issuance.derived")
    # The serialized section: the halt's guard takes the audit head's row lock, which every
    # other writer (a halt, a withdrawal, a rotation, another issuer) needs, and looks at what
    # was appended since the full check above; then the counter's row lock. The halt wins every
    # race: one raised before this point is seen here, one raised after waits for this commit;
    # nothing is shown before the commit. Lock order: the head, then a counter, for every
    # writer (withdrawals and rotations too): no cycle.
    locked = halt.guard_since(s, seen, (COUNTER_NAMES[chain], count))  # the head, then the counter
    _same_epoch(s, store[-1])  # a rotation committed since the epochs were read: refuse (rolled back)
    first = locked.first if locked.first is not None else predicted
    crash_point("issuance.allocated")
    pause_point("issuance.allocated")
    if first != predicted:
        good, failure = _derive_checked(policy, manifest, chain, first, count)
        if failure:
            raise AddressMismatch(*failure[0])
    return _store(s, locked.head, good, account, chain, first, actor)


_ROWS_PG = (
    "INSERT INTO address (chain, idx, account, address, script_pubkey, script, created_at) "
    "SELECT :chain, r.idx, :account, r.address, r.spk, r.script, :created_at FROM unnest("
    "CAST(:idxs AS BIGINT[]), CAST(:addresses AS TEXT[]), CAST(:spks AS TEXT[]), CAST(:scripts AS TEXT[])"
    ") AS r(idx, address, spk, script)"
)
"""The issued rows as one statement of one shape for any count (prepared once, no parameter
per row): on PostgreSQL it runs inside the audit entry's statement (one round trip)."""


def _store(
    s: Session, head: tuple[int, str], good: list[DerivedAddress], account: str, chain: int, first: int, actor: str
) -> list[IssuedAddress]:
    """Insert the issued rows and their ``address.issued`` entry after ``head`` (its row lock
    held): fixed statements, no ORM object; on PostgreSQL one round trip for rows and entry."""
    at = now()
    issued = [
        IssuedAddress(d.chain, d.index, account, d.address, d.script_pubkey.hex(), d.script.hex(), at) for d in good
    ]
    along = None
    if s.connection().dialect.name == "postgresql":
        along = (
            _ROWS_PG,
            {
                "chain": chain,
                "account": account,
                "created_at": at,
                "idxs": [a.index for a in issued],
                "addresses": [a.address for a in issued],
                "spks": [a.script_pubkey for a in issued],
                "scripts": [a.script for a in issued],
            },
        )
    else:
        rows = [
            {
                "chain": a.chain,
                "idx": a.index,
                "account": a.account,
                "address": a.address,
                "script_pubkey": a.script_pubkey,
                "script": a.script,
                "created_at": at,
            }
            for a in issued
        ]
        s.connection().execute(insert(AddressRow.metadata.tables["address"]), rows)  # executemany, no ORM
    digest = hashlib.sha256("\n".join(a.address for a in issued).encode()).hexdigest()
    rows_digest = hashlib.sha256()
    for a in issued:
        rows_digest.update(row_line(a.chain, a.index, a.account, a.address, a.script_pubkey, a.script))
    audit_log.append_locked(
        s,
        head,
        ISSUED,
        actor,
        {
            "account": account,
            "chain": chain,
            "first_index": first,
            "count": len(issued),
            "addresses_sha256": digest,
            "rows_sha256": rows_digest.hexdigest(),
            "first_address": issued[0].address,
        },
        along=along,
    )
    return issued


def halt_for_mismatch(db: Database, settings: Settings, exc: AddressMismatch) -> VerificationFailed:
    """Raise the trading halt for a mismatch (after its transaction rolled back)."""
    halt.raise_halt(db, settings, reason=str(exc), source="verification", actor="address-issuance")
    return VerificationFailed(f"{exc} — trading is halted")


ISSUE_CHUNK = 10_000
"""Addresses committed per transaction by a large issuance: the write lock is held for one
chunk at a time (other writers, such as a halt, get in between) and memory stays bounded."""


def _shifted(progress: Callable[[int], None] | None, done: int) -> Callable[[int], None] | None:
    """``progress`` of a chunk counted after the ``done`` issued before it."""
    if progress is None:
        return None
    report = progress
    return lambda n: report(done + n)


def issue_chunks(
    db: Database,
    settings: Settings,
    account: str,
    count: int = 1,
    chain: int = RECEIVE,
    actor: str = "operator",
    chunk: int | None = None,
    *,
    within: Callable[[Session], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[list[IssuedAddress]]:
    """Issue the next ``count`` addresses of ``chain`` for ``account``, committed and yielded
    ``chunk`` at a time (each chunk its own transaction and audit entry, no gap between them).
    ``within`` runs first in the first chunk's transaction (``custody serve`` records the
    request's nonce there: one commit for both, and neither without the other). ``progress``
    is called with how many of ``count`` are derived and verified so far, as the work goes.

    The halt is checked in every chunk: a halt raised meanwhile stops the rest. Raises as
    :func:`issue_addresses`; the chunks yielded before an error stay issued.
    """
    check_account(account)
    if not 1 <= count <= MAX_BATCH:
        raise InputError(f"count must be between 1 and {MAX_BATCH}")
    manifest, pinned = _pinned_or_halt(db, settings)
    chunk = chunk or ISSUE_CHUNK
    left = count
    retried = False
    while left:
        size = min(chunk, left)
        try:
            with db.transaction() as s:
                if within is not None and left == count:
                    within(s)
                on_part = _shifted(progress, count - left)
                issued = issue_in_session(s, manifest, account, size, chain, actor, pinned=pinned, progress=on_part)
            crash_point("issuance.committed")
        except AddressMismatch as exc:  # the chunk's transaction rolled back: nothing of it stored
            raise halt_for_mismatch(db, settings, exc) from None
        except RotatedMeanwhile:  # rolled back too: once more, against the chain pinned now
            if retried:
                raise
            retried = True
            manifest, pinned = _pinned_or_halt(db, settings)
            continue
        yield issued
        left -= size


def issue_addresses(
    db: Database,
    settings: Settings,
    account: str,
    count: int = 1,
    chain: int = RECEIVE,
    actor: str = "operator",
    *,
    within: Callable[[Session], None] | None = None,
) -> list[IssuedAddress]:
    """Issue the next ``count`` addresses of ``chain`` for ``account`` (:func:`issue_chunks`,
    gathered: for small batches; a large one streams through :func:`issue_chunks`).

    Raises HaltedError while trading is halted, InputError for a bad account or count,
    VerificationFailed (after raising the halt) when a derived address does not verify
    against the pinned manifest, StorageError.
    """
    return [a for part in issue_chunks(db, settings, account, count, chain, actor, within=within) for a in part]


def iter_issued(
    db: Database,
    account: str | None = None,
    chain: int | None = None,
    *,
    offset: int = 0,
    limit: int | None = None,
    batch: int | None = None,
) -> Iterator[IssuedAddress]:
    """Issued addresses in (chain, index) order, optionally of one account or chain, from the
    ``offset``-th, at most ``limit``: read ``batch`` at a time, each batch its own read
    transaction (bounded memory; no snapshot held while the caller writes them out)."""
    db.check_schema()
    batch = batch or ADDRESS_BATCH
    last: tuple[int, int] | None = None
    left = limit
    while left is None or left > 0:
        query = select(AddressRow)
        if account is not None:
            query = query.where(AddressRow.account == account)
        if chain is not None:
            query = query.where(AddressRow.chain == chain)
        if last is not None:  # a row value: answered from the unique index, not a scan from the start
            query = query.where(tuple_(col(AddressRow.chain), col(AddressRow.idx)) > tuple_(last[0], last[1]))
        else:
            query = query.offset(offset)
        size = batch if left is None else min(batch, left)
        with db.transaction(read_only=True) as s:
            rows = s.exec(query.order_by(col(AddressRow.chain), col(AddressRow.idx)).limit(size)).all()
            issued = [_row_to_issued(r) for r in rows]
        if not issued:
            return
        yield from issued
        last = (issued[-1].chain, issued[-1].index)
        if left is not None:
            left -= len(issued)


def list_addresses(db: Database, account: str | None = None, chain: int | None = None) -> list[IssuedAddress]:
    """Issued addresses in index order, optionally of one account or chain (all in memory:
    :func:`iter_issued` streams them)."""
    return list(iter_issued(db, account, chain))


def get_address(db: Database, address: str) -> IssuedAddress:
    """Raises NotFound when ``address`` was not issued by this store."""
    if not address.strip().isascii() or not address.strip().isprintable():
        # No address has such characters (a lone surrogate could not even be sent to the store).
        raise NotFound(f"address {ascii(address)[:100]} was not issued by this store")
    db.check_schema()
    with db.transaction(read_only=True) as s:
        row = s.exec(select(AddressRow).where(AddressRow.address == address.strip())).first()
        if row is None:
            raise NotFound(f"address {address} was not issued by this store")
        return _row_to_issued(row)


ADDRESS_BATCH = 5000
"""Address rows read per query by the streaming reads (listing, export, verification, audits)."""

_ADDRESS_PAGE = text(
    "SELECT chain, idx, account, address, script_pubkey, script, created_at FROM address "
    "WHERE (chain, idx) > (:chain, :idx) ORDER BY chain, idx LIMIT :n"
)


def iter_addresses(s: Session, batch: int | None = None) -> Iterator[StoredRow]:
    """Every issued address in (chain, index) order, read ``batch`` (:data:`ADDRESS_BATCH`) at
    a time by key (a row-value comparison both databases answer from the unique index) in the
    caller's transaction: constant memory, and one snapshot when the caller's transaction is
    a read transaction (custody.store.db). Plain rows: ``created_at`` is as the driver gives
    it (:func:`stored_at`)."""
    batch = batch or ADDRESS_BATCH
    last = (-1, -1)
    make = StoredRow._make
    require_paged_keys(s)  # (chain, idx) unique: no second row of a page's last key goes unread
    while True:
        rows = plain_rows(s, _ADDRESS_PAGE, {"chain": last[0], "idx": last[1], "n": batch})
        if not rows:
            return
        for row in rows:
            yield make(row)
        last = (rows[-1][0], rows[-1][1])


def stored_at(value: datetime | str) -> datetime:
    """A stored ``created_at`` as a datetime (SQLite's driver gives the text SQLAlchemy wrote)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def count_addresses(s: Session) -> int:
    return int(s.exec(select(func.count()).select_from(AddressRow)).one())


def export_addresses(db: Database, path: Path, progress: Callable[[int], None] | None = None) -> int:
    """Write the auditors' export (JSON Lines, docs/FORMATS.md) atomically; return the count.

    ``progress`` is called with the count written so far, every 500 addresses and at the end.
    """
    db.check_schema()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with db.transaction(read_only=True) as s, open(tmp, "w", encoding="utf-8") as fh:
            every = epochs.store_epochs(s)
            policy = every[-1].policy  # the newest; each address belongs to the policy of its epoch
            header: dict[str, Any] = {
                "format": "custody-address-export",
                "version": 1,
                "network": policy.network.name,
                "threshold": policy.threshold,
                "script_type": policy.script_type.value,
                "descriptors": policy.descriptors(),
                "exported_at": iso(now()),
            }
            if len(every) > 1:
                header["epochs"] = [
                    {"manifest_digest": e.manifest.digest, "receive_from": e.receive_from, "change_from": e.change_from}
                    for e in every
                ]
            fh.write(json.dumps(header) + "\n")
            for row in iter_addresses(s):
                fh.write(json.dumps(_row_to_issued(row).to_dict()) + "\n")
                count += 1
                if progress is not None and count % 500 == 0:
                    progress(count)
            if progress is not None:
                progress(count)
            fh.write(json.dumps({"end": True, "count": count}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count
