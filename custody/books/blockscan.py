"""Where the sync's observations come from: each new block read once, matched against our scripts.

Cost. A sync reads the blocks above its cursor (``block_at``: one ``getblockhash`` and one
``getblock`` each on a node) and looks each output's scriptPubKey up in the address table
by its index (:data:`custody.store.models.ADDRESS_SCRIPT_INDEX`), in chunks of LOOKUP_CHUNK:
the work per block follows the block's size, never the number of issued addresses, and
memory holds one block. Outputs paying us are kept in ``scan_output`` with the block that
spent them, if one did; the unspent ones are what the deposit sync follows
(:func:`custody.books.deposits.sync_deposits`, whose transitions are unchanged).

Cursor and reorganisations. ``scan_block`` keeps the hash of every block read. Before
reading on, the block at the cursor is compared with the chain's; while they differ the
cursor steps down to the highest block both agree on (the fork), and everything scanned
above it is undone: outputs made there are forgotten, spends made there are unmarked. A
block whose previous hash is not the cursor's (the chain moved while we read) does the same.
The deposit sync then sees a deposit whose transaction left the best chain and reverses it
as before.

Seeding. The first sync of a store that already has addresses (one upgraded from
version 4) reads the unspent outputs of all of them once (``unspent_at``, the old way) and
starts the cursor at that block; a store without addresses starts at the tip. The hashes of
the SEED_HISTORY blocks below are kept too, so that a reorganisation across the first
sync's block is followed like any other. An output
paying an address before the address was issued is not seen (nobody was given it yet).

Mempool. Transactions in the mempool not examined before are read once each
(``mempool_tx``), at most MEMPOOL_LIMIT per sync; their outputs paying a deposit address
that has no deposit yet are shown as unconfirmed (height None), never credited: only a block
at depth credits.

Trust. The tables are the online machine's, which an insider may edit. A row that could
lead to a credit (its deposit not credited yet) is checked against the chain's block at its
height before it is handed on; one the chain does not have is returned as ``forged``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, func, update
from sqlmodel import Session, col, select

from custody.chain.types import ChainBackend, ChainBlock, Snapshot, Utxo
from custody.errors import InputError, NodeError
from custody.issuance.issuer import iter_addresses
from custody.issuance.record import StoredRow
from custody.policy.model import RECEIVE
from custody.store.db import Database
from custody.store.models import AddressRow, DepositRow, ScanBlockRow, ScanMempoolRow, ScanOutputRow

LOOKUP_CHUNK = 500
"""Scripts or outpoints per ``IN (...)`` query."""

MEMPOOL_LIMIT = 5000
"""The most new mempool transactions one sync reads; the rest wait for the next sync (or a block)."""

COMMIT_BLOCKS = 20
"""Blocks recorded per database transaction: a sync far behind commits every so often, and a
crash loses at most that much reading (the cursor moves with what was recorded)."""

STORE_CHUNK = 5000
"""Address rows whose unspent outputs are asked for at once when every address is (the first
sync, the reserves): memory stays bounded at any number of addresses."""
SEED_HISTORY = 100
"""Blocks below the first sync's block whose hashes are kept too (the deposits' FINAL_DEPTH)."""

CREDITED = "credited"
MOVED = "moved"
SHORTER = "shorter"


@dataclass
class Observation:
    """What the chain showed this sync.

    ``utxos``: outpoint -> output paying a deposit address, unspent in the best chain
    (``height`` set) or new in the mempool (``height`` None). ``forged``: scanned rows the
    chain does not have (outpoint -> why). ``blocks_read`` and ``rolled_back`` count blocks.
    """

    tip: int
    utxos: dict[str, Utxo] = field(default_factory=dict)
    forged: dict[str, str] = field(default_factory=dict)
    blocks_read: int = 0
    rolled_back: int = 0


def observe(
    db: Database, backend: ChainBackend, tip: int, progress: Callable[[int, int], None] | None = None
) -> Observation:
    """Bring the scan up to ``tip`` and say what pays our deposit addresses.

    ``progress`` is called with the blocks read so far and the blocks to read in all, before
    the first and after each block (the total grows when a reorganisation makes blocks to
    read again). Raises NodeError (the chain cannot be asked, or reorganised below the
    scan's first block), StorageError.
    """
    seen = Observation(tip)
    fresh: set[str] = set()  # outpoints recorded from blocks read in this very sync
    height = _cursor(db, backend, tip)
    fork = _fork(db, backend, min(height, tip))
    if fork < height:
        _undo_above(db, fork)
        seen.rolled_back += height - fork
        height = fork
    if progress is not None:
        progress(0, max(tip - height, 0))
    while height < tip:
        height, stop = _read_run(db, backend, height, tip, seen, fresh, progress)
        if stop == MOVED:  # a block whose previous hash is not ours: the chain moved while we read
            fork = _fork(db, backend, height)
            _undo_above(db, fork)
            seen.rolled_back += height - fork
            height = fork
            fresh.clear()
        elif stop == SHORTER:
            break  # the chain got shorter while we read: the next sync goes on from here
    unspent = _unspent_receive(db)
    seen.forged = _check_rows(db, backend, [r for r in unspent if r.outpoint not in fresh])
    seen.utxos = {
        r.outpoint: Utxo(r.txid, r.vout, r.amount, bytes.fromhex(r.script_pubkey), r.height)
        for r in unspent
        if r.outpoint not in seen.forged
    }
    seen.utxos.update(_mempool(db, backend))
    return seen


def _read_run(
    db: Database,
    backend: ChainBackend,
    height: int,
    tip: int,
    seen: Observation,
    fresh: set[str],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, str | None]:
    """Read and record up to COMMIT_BLOCKS blocks above ``height`` in one transaction (one
    commit for several blocks; each block is dropped once recorded). Returns the height
    reached and why it stopped short: MOVED (a block did not follow the one below it),
    SHORTER (no block at the next height any more), or None."""
    prev = _hash_at(db, height)
    with db.transaction() as s:
        for _ in range(COMMIT_BLOCKS):
            if height >= tip:
                break
            try:
                block = backend.block_at(height + 1)
            except InputError:
                return height, SHORTER
            if block.prev != prev:
                return height, MOVED
            fresh |= _record(s, block)
            seen.blocks_read += 1
            height, prev = height + 1, block.hash
            if progress is not None:
                progress(seen.blocks_read, seen.blocks_read + tip - height)
    return height, None


def receive_addresses(db: Database, scripts: Iterable[str]) -> dict[str, AddressRow]:
    """The deposit address rows paying each of ``scripts`` (hex), looked up by the index."""
    with db.transaction() as s:
        return {a.script_pubkey: a for a in _addresses(s, sorted(set(scripts))) if a.chain == RECEIVE}


def cursor(db: Database) -> ScanBlockRow | None:
    """The highest block scanned, or None before the first sync."""
    with db.transaction() as s:
        return s.exec(select(ScanBlockRow).order_by(col(ScanBlockRow.height).desc())).first()


# ---------------------------------------------------------------- cursor, reorganisations


def _cursor(db: Database, backend: ChainBackend, tip: int) -> int:
    """The scanned height; seeds the scan on the first sync (see the module's docstring)."""
    with db.transaction() as s:
        top = s.exec(select(func.max(ScanBlockRow.height))).one()
        if top is not None:
            return int(top)
        any_address = s.exec(select(AddressRow.id).limit(1)).first()
    if any_address is None:
        with db.transaction() as s:
            _seed_history(s, backend, tip, backend.block_hash(tip))
        return tip
    with db.transaction(read_only=True) as s:
        snapshot, holding = unspent_of_store(s, backend)
    chains = {a.script_pubkey: a.chain for a in holding}
    with db.transaction() as s:
        for u in snapshot.utxos:
            spk = u.script_pubkey.hex()
            if spk in chains and u.height is not None:
                s.merge(_output_row(u.txid, u.vout, u.amount, spk, chains[spk], u.height))
        _seed_history(s, backend, snapshot.height, snapshot.block_hash)
    return snapshot.height


def unspent_of_store(s: Session, backend: ChainBackend, height: int | None = None) -> tuple[Snapshot, list[StoredRow]]:
    """The unspent outputs paying any stored address just after block ``height`` (the tip when
    None), and the address rows they pay (those holding none are not kept).

    The rows are read in the caller's transaction (one snapshot) :data:`STORE_CHUNK` at a
    time, and each chunk's outputs asked for at the same height: memory is bounded by the
    chunk and the addresses holding coins, not by the addresses. Raises NodeError when the
    chain reorganised at that height meanwhile, InputError for a height off the chain.
    """
    at = backend.tip_height() if height is None else height
    block_hash: str | None = None
    utxos: list[Utxo] = []
    holding: list[StoredRow] = []
    chunk: list[StoredRow] = []

    def ask() -> None:
        nonlocal block_hash
        part = backend.unspent_at([bytes.fromhex(a.script_pubkey) for a in chunk], at)
        if block_hash is not None and part.block_hash != block_hash:
            raise NodeError(f"the chain reorganised at height {at} while its unspent outputs were read; try again")
        block_hash = part.block_hash
        paid = {u.script_pubkey.hex() for u in part.utxos}
        utxos.extend(part.utxos)
        holding.extend(a for a in chunk if a.script_pubkey in paid)
        chunk.clear()

    for row in iter_addresses(s):
        chunk.append(row)
        if len(chunk) >= STORE_CHUNK:
            ask()
    if chunk or block_hash is None:
        ask()
    assert block_hash is not None
    return Snapshot(at, block_hash, sorted(utxos, key=lambda u: (u.height or 0, u.txid, u.vout))), holding


def _seed_history(s: Session, backend: ChainBackend, height: int, block_hash: str) -> None:
    """The seed block and the hashes of the SEED_HISTORY blocks below it, so that a
    reorganisation just below the first sync's block is still found (and followed)."""
    for at in range(max(0, height - SEED_HISTORY), height):
        s.add(ScanBlockRow(height=at, hash=backend.block_hash(at)))
    s.add(ScanBlockRow(height=height, hash=block_hash))


def _hash_at(db: Database, height: int) -> str | None:
    with db.transaction() as s:
        row = s.get(ScanBlockRow, height)
        return row.hash if row is not None else None


def _fork(db: Database, backend: ChainBackend, height: int) -> int:
    """The highest scanned block at or below ``height`` that is still in the best chain."""
    with db.transaction() as s:
        rows = s.exec(
            select(ScanBlockRow.height, ScanBlockRow.hash)
            .where(ScanBlockRow.height <= height)
            .order_by(col(ScanBlockRow.height).desc())
        )
        for at, block_hash in rows:
            if backend.block_hash(at) == block_hash:
                return int(at)
    raise NodeError(
        f"the chain reorganised below the first block this store scanned (height {height} or lower): "
        "its deposits cannot be followed across it"
    )


def _undo_above(db: Database, fork: int) -> None:
    """Forget what blocks above ``fork`` made and spent (one transaction)."""
    with db.transaction() as s:
        s.exec(delete(ScanOutputRow).where(col(ScanOutputRow.height) > fork))
        s.exec(
            update(ScanOutputRow).where(col(ScanOutputRow.spent_height) > fork).values(spent_height=None, spent_by=None)
        )
        s.exec(delete(ScanBlockRow).where(col(ScanBlockRow.height) > fork))
        s.exec(delete(ScanMempoolRow))  # what left the blocks is examined again


# ---------------------------------------------------------------- one block


def _record(s: Session, block: ChainBlock) -> set[str]:
    """Keep ``block``'s outputs paying us and mark the outputs of ours it spends, with its hash;
    the outpoints kept."""
    scripts = sorted({spk.hex() for tx in block.txs for _, _, spk in tx.outputs})
    chains = {a.script_pubkey: a.chain for a in _addresses(s, scripts)}
    kept: set[str] = set()
    for tx in block.txs:
        for vout, amount, spk in tx.outputs:
            chain = chains.get(spk.hex())
            if chain is not None:
                kept.add(s.merge(_output_row(tx.txid, vout, amount, spk.hex(), chain, block.height)).outpoint)
    s.flush()
    spender = {f"{t}:{v}": tx.txid for tx in block.txs for t, v in tx.spends}
    for row in _outputs(s, sorted(spender)):
        if row.spent_height is None:
            row.spent_height, row.spent_by = block.height, spender[row.outpoint]
            s.add(row)
    s.merge(ScanBlockRow(height=block.height, hash=block.hash))  # a concurrent sync may have read it too
    s.flush()
    return kept


def _output_row(txid: str, vout: int, amount: int, spk: str, chain: int, height: int) -> ScanOutputRow:
    return ScanOutputRow(
        outpoint=f"{txid}:{vout}", txid=txid, vout=vout, amount=amount, script_pubkey=spk, chain=chain, height=height
    )


def _addresses(s: Session, scripts: Sequence[str]) -> list[AddressRow]:
    found: list[AddressRow] = []
    for start in range(0, len(scripts), LOOKUP_CHUNK):
        chunk = scripts[start : start + LOOKUP_CHUNK]
        found += s.exec(select(AddressRow).where(col(AddressRow.script_pubkey).in_(chunk))).all()
    return found


def _outputs(s: Session, outpoints: Sequence[str]) -> list[ScanOutputRow]:
    found: list[ScanOutputRow] = []
    for start in range(0, len(outpoints), LOOKUP_CHUNK):
        chunk = outpoints[start : start + LOOKUP_CHUNK]
        found += s.exec(select(ScanOutputRow).where(col(ScanOutputRow.outpoint).in_(chunk))).all()
    return found


# ---------------------------------------------------------------- what the sync is handed


def _unspent_receive(db: Database) -> list[ScanOutputRow]:
    with db.transaction() as s:
        return list(
            s.exec(
                select(ScanOutputRow)
                .where(ScanOutputRow.chain == RECEIVE, col(ScanOutputRow.spent_height).is_(None))
                .order_by(col(ScanOutputRow.height), col(ScanOutputRow.outpoint))
            ).all()
        )


def _check_rows(db: Database, backend: ChainBackend, rows: Sequence[ScanOutputRow]) -> dict[str, str]:
    """Rows that could lead to a credit, checked against the chain's block at their height:
    the outpoint -> why, for each the chain does not have (one block read per height)."""
    with db.transaction() as s:
        credited = {
            o
            for chunk in _chunks([r.outpoint for r in rows])
            for o in s.exec(
                select(DepositRow.outpoint).where(col(DepositRow.outpoint).in_(chunk), DepositRow.status == CREDITED)
            ).all()
        }
    forged: dict[str, str] = {}
    blocks: dict[int, dict[tuple[str, int], tuple[int, bytes]]] = {}
    for r in rows:
        if r.outpoint in credited:
            continue
        if r.height not in blocks:
            try:
                block = backend.block_at(r.height)
            except InputError:
                block = None
            blocks[r.height] = (
                {} if block is None else {(tx.txid, v): (a, spk) for tx in block.txs for v, a, spk in tx.outputs}
            )
        out = blocks[r.height].get((r.txid, r.vout))
        if out != (r.amount, bytes.fromhex(r.script_pubkey)) or r.outpoint != f"{r.txid}:{r.vout}":
            forged[r.outpoint] = f"the chain's block at height {r.height} has no such output paying this script"
    return forged


def _mempool(db: Database, backend: ChainBackend) -> dict[str, Utxo]:
    """New mempool outputs paying a deposit address that has no deposit yet (height None)."""
    txids = backend.mempool_txids()
    current = set(txids)
    with db.transaction() as s:
        examined = set(s.exec(select(ScanMempoolRow.txid)).all())
        gone = sorted(examined - current)
        for chunk in _chunks(gone):
            s.exec(delete(ScanMempoolRow).where(col(ScanMempoolRow.txid).in_(chunk)))
    fresh = [t for t in txids if t not in examined][:MEMPOOL_LIMIT]
    paying: list[Utxo] = []
    for txid in fresh:
        tx = backend.mempool_tx(txid)
        if tx is not None:
            paying += [Utxo(tx.txid, v, a, spk, None) for v, a, spk in tx.outputs]
    with db.transaction() as s:
        for txid in fresh:
            s.merge(ScanMempoolRow(txid=txid))
        ours = {
            a.script_pubkey
            for a in _addresses(s, sorted({u.script_pubkey.hex() for u in paying}))
            if a.chain == RECEIVE
        }
        candidates = {f"{u.txid}:{u.vout}": u for u in paying if u.script_pubkey.hex() in ours}
        known = {
            o
            for chunk in _chunks(sorted(candidates))
            for o in s.exec(select(DepositRow.outpoint).where(col(DepositRow.outpoint).in_(chunk))).all()
        }
    return {o: u for o, u in candidates.items() if o not in known}


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), LOOKUP_CHUNK):
        yield items[start : start + LOOKUP_CHUNK]
