"""An embedded Bitcoin regtest chain, validated by Bitcoin Core's own code (libbitcoinkernel).

No node to install or run: custody builds and mines the blocks itself and hands each one to
libbitcoinkernel (through ``py-bitcoinkernel``), which validates it with Bitcoin Core's
consensus code and keeps the block files and the chainstate. Beside the kernel, custody
keeps an index of its own for what the kernel cannot answer: outputs by scriptPubKey,
transactions by txid, and a mempool.

Data directory::

    kernel/          libbitcoinkernel's block files and chainstate (exclusive to one process)
    index.sqlite     blocks (raw), transactions, every output by scriptPubKey, the mempool

Consistency. The kernel flushes its block index and chainstate only now and then (and when
it is closed): a process killed between blocks can reopen with a kernel that lost its last
blocks, or an index that lost the last block the kernel took. Opening reconciles the two
(:meth:`EmbeddedBackend._reconcile`): blocks the index holds and the kernel lost are handed
back to the kernel; blocks the kernel has and the index lacks are read from the kernel;
index blocks the kernel will not take back are removed from the index (their transactions
return to the mempool). Each block enters the index in one SQLite transaction, after the
kernel connected it. After opening, the index claims exactly the kernel's active chain.

Mining. Regtest difficulty (``0x207fffff``) is trivial: the nonce is ground in Python, about
two hashes a block. A block's coinbase carries its height (BIP-34), pays the subsidy (halving
every 150 blocks on regtest) plus fees, and commits to the witnesses (BIP-141) when a
transaction has one. ``process_block`` returns true even for a block the kernel rejects:
acceptance is read from the active chain's tip, the reason from the validation callback.

Test-accept checks what a node's mempool would, short of package and replacement rules:
inputs exist and are unspent (chain and mempool), no conflict within the mempool, amounts,
coinbase maturity (100), locktime and BIP-68 sequence locks, the 1 sat/vB minimum relay fee,
relay standardness and every input's script under all consensus flags
(:mod:`custody.chain.consensus`); those checks are in :mod:`custody.chain.accept`. Regtest's
constants, blocks and the kernel's chainstate manager are in :mod:`custody.chain.kernel`.

The kernel needs exclusive use of its directory: use :func:`open_chain`, which shares one
open chain per directory within the process, and :meth:`EmbeddedBackend.close`.
"""

# size(module): one class, the backend, whose methods share one lock, one SQLite index and the
#   kernel; what needs none of them is in custody.chain.kernel (blocks, the kernel) and
#   custody.chain.accept (test-accept)

from __future__ import annotations

import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitcoin.core import (
    CMutableTxIn,
    CMutableTxOut,
    COutPoint,
    CScript,
    CScriptWitness,
    CTransaction,
    CTxInWitness,
    CTxWitness,
    b2lx,
)

from custody.bitcoin.encoding import ser_compact_size, sha256d
from custody.chain import accept
from custody.chain.consensus import (
    decode_transaction,
)
from custody.chain.kernel import (
    BLOCK_TX_WEIGHT,
    BLOCK_VERSION,
    NETWORK,
    OP_RETURN,
    REGTEST_BITS,
    REGTEST_GENESIS,
    REGTEST_TARGET,
    SEQUENCE_FINAL,
    WITNESS_MAGIC,
    WITNESS_RESERVED,
    _Block,
    _chain_tx,
    _has_witness,
    _Kernel,
    _merkle_root,
    _parse_block,
    _spendable,
    _weight,
    subsidy,
)
from custody.chain.types import (
    MAX_MINE,
    AcceptResult,
    ChainBlock,
    ChainTx,
    OutputSpend,
    Refusal,
    Snapshot,
    SpendState,
    TransactionRefused,
    TxStatus,
    Utxo,
    lookup_scripts,
)
from custody.errors import InputError, NodeError, NotFound, StorageError

SCHEMA_VERSION = 1
QUERY_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, time INTEGER NOT NULL, raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS txs (
    txid TEXT PRIMARY KEY, height INTEGER NOT NULL, position INTEGER NOT NULL, raw BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS txs_height ON txs (height);
CREATE TABLE IF NOT EXISTS outputs (
    txid TEXT NOT NULL, vout INTEGER NOT NULL, amount INTEGER NOT NULL, script_pubkey BLOB NOT NULL,
    height INTEGER NOT NULL, coinbase INTEGER NOT NULL, spent_height INTEGER, spent_by TEXT,
    PRIMARY KEY (txid, vout));
CREATE INDEX IF NOT EXISTS outputs_script ON outputs (script_pubkey);
CREATE INDEX IF NOT EXISTS outputs_height ON outputs (height);
CREATE INDEX IF NOT EXISTS outputs_spent_height ON outputs (spent_height);
CREATE TABLE IF NOT EXISTS mempool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, txid TEXT NOT NULL UNIQUE, raw BLOB NOT NULL);
"""

_open_chains: dict[Path, EmbeddedBackend] = {}
_open_lock = threading.Lock()


def open_chain(datadir: Path) -> EmbeddedBackend:
    """The embedded chain in ``datadir`` (created when new), shared within this process.

    The first call opens and reconciles it; later calls return the same open chain until
    it is closed. Raises NodeError when the kernel cannot open it (another process uses
    it, or it is damaged), StorageError when the index is unreadable or newer than this tool.
    """
    key = Path(datadir).expanduser().resolve()
    with _open_lock:
        chain = _open_chains.get(key)
        if chain is None or chain.closed:
            chain = EmbeddedBackend(key)
            _open_chains[key] = chain
        return chain


# --------------------------------------------------------------------------- the backend


@dataclass(frozen=True)
class Reconciled:
    """What opening did to make index and kernel agree (all zero after a clean close)."""

    kernel_height: int  # the kernel's tip as it opened
    index_height: int  # the index's tip as it opened
    handed_back: int  # index blocks the kernel had lost and took back
    removed: int  # index blocks the kernel would not take back, removed from the index
    recorded: int  # kernel blocks the index lacked, recorded


@dataclass(frozen=True)
class _Coin:
    amount: int
    script_pubkey: bytes
    height: int  # the next block's height for a mempool output
    coinbase: bool


@dataclass(frozen=True)
class _Entry:
    """A mempool transaction."""

    txid: str
    raw: bytes
    tx: Any
    fee: int
    weight: int


class EmbeddedBackend:
    """A ChainBackend on an embedded regtest chain (see the module's docstring).

    Use :func:`open_chain` rather than the constructor: the kernel allows one open chain per
    directory. Every method raises NodeError once the chain is closed.
    """

    network_name = NETWORK

    def __init__(self, datadir: Path) -> None:
        self.datadir = Path(datadir)
        self.closed = False
        self.evicted: list[tuple[str, str]] = []
        """(txid, reason) of mempool transactions dropped because a block with them was refused."""
        self._lock = threading.RLock()
        self._mempool: dict[str, _Entry] = {}  # in acceptance order: parents before children
        self._mempool_spends: dict[tuple[str, int], str] = {}
        self.datadir.mkdir(parents=True, exist_ok=True)
        self._kernel = _Kernel(self.datadir / "kernel")
        try:
            self._db = self._open_index(self.datadir / "index.sqlite")
            self._reconcile()
        except BaseException:
            self._kernel.close()
            raise

    # ------------------------------------------------------------------ opening, closing

    def _open_index(self, path: Path) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # atomic across crashes; reconcile covers the rest
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageError(f"chain index {path} has schema {row[0]}, newer than this tool's {SCHEMA_VERSION}")
        except (sqlite3.Error, ValueError) as e:
            raise StorageError(f"chain index {path} is unreadable: {e}") from None
        return db

    def close(self) -> None:
        """Flush and close the kernel and the index; idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._kernel.close()
            self._db.close()

    def __enter__(self) -> EmbeddedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _open(self) -> Iterator[None]:
        with self._lock:
            if self.closed:
                raise NodeError(f"the embedded chain in {self.datadir} is closed")
            try:
                yield
            except sqlite3.Error as e:
                raise StorageError(f"chain index in {self.datadir}: {e}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ reconciling with the kernel

    def _index_height(self) -> int:
        row = self._db.execute("SELECT MAX(height) FROM blocks").fetchone()
        return -1 if row[0] is None else int(row[0])

    def _index_hash(self, height: int) -> str | None:
        row = self._db.execute("SELECT hash FROM blocks WHERE height = ?", (height,)).fetchone()
        return None if row is None else str(row[0])

    def _common_height(self) -> int:
        height = min(self._kernel.height(), self._index_height())
        while height > 0 and self._index_hash(height) != self._kernel.hash_at(height):
            height -= 1
        return height

    def _reconcile(self) -> None:
        """Make the index claim exactly the kernel's active chain (see the module docstring)."""
        if self._kernel.hash_at(0) != REGTEST_GENESIS:
            raise NodeError(f"the chain in {self.datadir} is not Bitcoin's regtest chain")
        if self._index_height() < 0:
            genesis = _parse_block(self._kernel.block_at(0))
            with self._write() as db:
                db.execute(
                    "INSERT INTO blocks (height, hash, time, raw) VALUES (0, ?, ?, ?)",
                    (genesis.hash, genesis.time, genesis.raw),
                )
        elif self._index_hash(0) != REGTEST_GENESIS:
            raise StorageError(f"the chain index in {self.datadir} is not of Bitcoin's regtest chain")
        kernel_height, index_height = self._kernel.height(), self._index_height()
        common = self._common_height()
        handed_back = 0
        if index_height > common:
            # Blocks the kernel lost (killed before it flushed): hand them back, in order.
            for height in range(common + 1, index_height + 1):
                raw, block_hash = self._db.execute(
                    "SELECT raw, hash FROM blocks WHERE height = ?", (height,)
                ).fetchone()
                if self._kernel.submit(bytes(raw), str(block_hash)) is not None:
                    break
                handed_back += 1
            common = self._common_height()
        returned: list[_Entry] = []
        removed = self._index_height() - common
        for height in range(self._index_height(), common, -1):
            returned[:0] = self._disconnect(height)
        recorded = self._kernel.height() - common
        for height in range(common + 1, self._kernel.height() + 1):
            self._connect(_parse_block(self._kernel.block_at(height)), height)
        self._load_mempool(returned)
        self.reconciled = Reconciled(kernel_height, index_height, handed_back, removed, recorded)

    def _load_mempool(self, first: Sequence[_Entry] = ()) -> None:
        """Rebuild the mempool from ``first`` and the stored one, keeping what is still valid."""
        stored = [(str(t), bytes(r)) for t, r in self._db.execute("SELECT txid, raw FROM mempool ORDER BY seq")]
        candidates = [(e.txid, e.raw) for e in first] + stored
        self._mempool.clear()
        self._mempool_spends.clear()
        with self._write() as db:
            db.execute("DELETE FROM mempool")
            for txid, raw in candidates:
                if txid in self._mempool:
                    continue
                try:
                    tx = decode_transaction(raw)
                except InputError:
                    continue
                refusal, fee = accept.refusal(self, tx, raw)
                if refusal is None:
                    self._add_to_mempool(db, txid, raw, tx, fee)

    # ------------------------------------------------------------------ the index

    def _connect(self, block: _Block, height: int) -> None:
        """Record a block the kernel connected at ``height``; drop its transactions from the mempool."""
        with self._write() as db:
            db.execute(
                "INSERT INTO blocks (height, hash, time, raw) VALUES (?, ?, ?, ?)",
                (height, block.hash, block.time, block.raw),
            )
            for position, (txid, raw, tx) in enumerate(block.txs):
                db.execute(
                    "INSERT INTO txs (txid, height, position, raw) VALUES (?, ?, ?, ?)", (txid, height, position, raw)
                )
                if position > 0:
                    for txin in tx.vin:
                        prev = (b2lx(txin.prevout.hash), txin.prevout.n)
                        spent = db.execute(
                            "UPDATE outputs SET spent_height = ?, spent_by = ? "
                            "WHERE txid = ? AND vout = ? AND spent_height IS NULL",
                            (height, txid, *prev),
                        )
                        if spent.rowcount != 1:
                            raise StorageError(
                                f"chain index in {self.datadir}: block {block.hash} spends {prev[0]}:{prev[1]}, "
                                "which the index does not hold unspent"
                            )
                for vout, out in enumerate(tx.vout):
                    spk = bytes(out.scriptPubKey)
                    if _spendable(spk):
                        db.execute(
                            "INSERT INTO outputs (txid, vout, amount, script_pubkey, height, coinbase) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (txid, vout, out.nValue, spk, height, int(position == 0)),
                        )
            self._prune_mempool(db, block)

    def _disconnect(self, height: int) -> list[_Entry]:
        """Remove the index's block at ``height`` (its tip); return its non-coinbase transactions."""
        rows = self._db.execute("SELECT txid, raw FROM txs WHERE height = ? ORDER BY position", (height,)).fetchall()
        with self._write() as db:
            db.execute("DELETE FROM outputs WHERE height = ?", (height,))
            db.execute("UPDATE outputs SET spent_height = NULL, spent_by = NULL WHERE spent_height = ?", (height,))
            db.execute("DELETE FROM txs WHERE height = ?", (height,))
            db.execute("DELETE FROM blocks WHERE height = ?", (height,))
        return [_Entry(str(txid), bytes(raw), None, 0, 0) for txid, raw in rows[1:]]

    def _add_to_mempool(self, db: sqlite3.Connection, txid: str, raw: bytes, tx: Any, fee: int) -> None:
        db.execute("INSERT INTO mempool (txid, raw) VALUES (?, ?)", (txid, raw))
        self._mempool[txid] = _Entry(txid, raw, tx, fee, _weight(tx))
        for txin in tx.vin:
            self._mempool_spends[(b2lx(txin.prevout.hash), txin.prevout.n)] = txid

    def _prune_mempool(self, db: sqlite3.Connection, block: _Block) -> None:
        """Drop what the block confirmed, and what conflicts with it (with descendants)."""
        confirmed = {txid for txid, _, _ in block.txs}
        spent = {(b2lx(i.prevout.hash), i.prevout.n) for _, _, tx in block.txs[1:] for i in tx.vin}
        dropped: set[str] = set()
        for txid, entry in list(self._mempool.items()):
            inputs = [(b2lx(i.prevout.hash), i.prevout.n) for i in entry.tx.vin]
            if txid in confirmed:
                dropped.add(txid)
            elif any(p in spent or p[0] in dropped - confirmed for p in inputs):
                dropped.add(txid)  # double-spent by the block, or a descendant of such
        self._drop(db, dropped)

    def _drop(self, db: sqlite3.Connection, txids: set[str]) -> None:
        for txid in txids:
            entry = self._mempool.pop(txid, None)
            if entry is None:
                continue
            db.execute("DELETE FROM mempool WHERE txid = ?", (txid,))
            for txin in entry.tx.vin:
                self._mempool_spends.pop((b2lx(txin.prevout.hash), txin.prevout.n), None)

    def _coin(self, txid: str, vout: int) -> _Coin | None:
        """An unspent output: confirmed (and unspent in the chain) or made by a mempool transaction."""
        entry = self._mempool.get(txid)
        if entry is not None:
            if vout >= len(entry.tx.vout):
                return None
            out = entry.tx.vout[vout]
            return _Coin(out.nValue, bytes(out.scriptPubKey), self._tip() + 1, False)
        row = self._db.execute(
            "SELECT amount, script_pubkey, height, coinbase FROM outputs "
            "WHERE txid = ? AND vout = ? AND spent_height IS NULL",
            (txid, vout),
        ).fetchone()
        return None if row is None else _Coin(int(row[0]), bytes(row[1]), int(row[2]), bool(row[3]))

    def _tip(self) -> int:
        return self._index_height()

    def _median_time_past(self, height: int) -> int:
        rows = self._db.execute(
            "SELECT time FROM blocks WHERE height BETWEEN ? AND ?", (max(0, height - 10), height)
        ).fetchall()
        times = sorted(int(r[0]) for r in rows)
        return times[len(times) // 2]  # Core's GetMedianTimePast: the upper median of an even count

    # ------------------------------------------------------------------ blocks

    def _build(self, entries: Sequence[_Entry], script_pubkey: bytes, raws: Sequence[bytes] = ()) -> _Block:
        """A mined block on the tip: coinbase paying ``script_pubkey``, then the transactions."""
        txs = [e.tx for e in entries] + [decode_transaction(r) for r in raws]
        height = self._tip() + 1
        fees = sum(e.fee for e in entries)
        script_sig = CScript([height, b"custody"])  # BIP-34: the height first, as CScript() << height
        vout = [CMutableTxOut(subsidy(height) + fees, script_pubkey)]
        witness = CTxWitness()
        if any(_has_witness(tx) for tx in txs):
            # BIP-141: OP_RETURN <0xaa21a9ed || sha256d(witness merkle root || reserved value)>
            wtxids = [bytes(32)] + [tx.GetHash() for tx in txs]
            commitment = sha256d(_merkle_root(wtxids) + WITNESS_RESERVED)
            vout.append(CMutableTxOut(0, bytes([OP_RETURN, 0x24]) + WITNESS_MAGIC + commitment))
            witness = CTxWitness([CTxInWitness(CScriptWitness([WITNESS_RESERVED]))])
        coinbase = CTransaction([CMutableTxIn(COutPoint(), script_sig, SEQUENCE_FINAL)], vout, 0, 2, witness)
        all_txs = [coinbase, *txs]
        merkle = _merkle_root([tx.GetTxid() for tx in all_txs])
        tip_hash = self._index_hash(height - 1) or ""
        block_time = max(int(time.time()), self._median_time_past(height - 1) + 1)
        head = struct.pack("<i", BLOCK_VERSION) + bytes.fromhex(tip_hash)[::-1] + merkle
        for nonce in range(1 << 32):
            header = head + struct.pack("<III", block_time, REGTEST_BITS, nonce)
            if int.from_bytes(sha256d(header), "little") <= REGTEST_TARGET:
                break
        body = ser_compact_size(len(all_txs)) + b"".join(tx.serialize() for tx in all_txs)
        return _parse_block(header + body)

    def _submit(self, block: _Block) -> str | None:
        """Hand ``block`` to the kernel; on acceptance record it. None, or why it was refused."""
        height = self._tip() + 1
        if block.prev != self._index_hash(height - 1):
            return f"it does not extend the tip (its parent is {block.prev})"
        refusal = self._kernel.submit(block.raw, block.hash)
        if refusal is None:
            self._connect(block, height)
        return refusal

    def _candidates(self) -> list[_Entry]:
        """The mempool's transactions that fit one block, in order (parents before children)."""
        chosen, weight = [], 0
        for entry in self._mempool.values():
            if weight + entry.weight > BLOCK_TX_WEIGHT:
                break
            chosen.append(entry)
            weight += entry.weight
        return chosen

    # ------------------------------------------------------------------ ChainBackend

    def tip_height(self) -> int:
        """Height of the best block."""
        with self._open():
            return self._tip()

    def unspent(self, script_pubkeys: Sequence[bytes]) -> list[Utxo]:
        """Confirmed unspent outputs paying any of ``script_pubkeys``, by height, txid, vout.

        Coinbase outputs are included, mature or not. Raises InputError for an empty script.
        """
        scripts = lookup_scripts(script_pubkeys)
        found: list[Utxo] = []
        with self._open():
            for start in range(0, len(scripts), QUERY_CHUNK):
                chunk = scripts[start : start + QUERY_CHUNK]
                rows = self._db.execute(
                    "SELECT txid, vout, amount, script_pubkey, height FROM outputs "
                    f"WHERE spent_height IS NULL AND script_pubkey IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                found += [Utxo(str(t), int(v), int(a), bytes(s), int(h)) for t, v, a, s, h in rows]
        return sorted(found, key=lambda u: (u.height or 0, u.txid, u.vout))

    def unspent_at(self, script_pubkeys: Sequence[bytes], height: int | None = None) -> Snapshot:
        """The outputs paying any of ``script_pubkeys`` unspent just after block ``height`` (the tip
        when None): made at or below it and not spent at or below it.

        Raises InputError for an empty script or a height outside 0..tip.
        """
        scripts = lookup_scripts(script_pubkeys)
        found: list[Utxo] = []
        with self._open():
            tip = self._tip()
            at = tip if height is None else height
            if not 0 <= at <= tip:
                raise InputError(f"height {at} is not on the chain (its tip is at {tip})")
            block_hash = self._index_hash(at) or ""
            for start in range(0, len(scripts), QUERY_CHUNK):
                chunk = scripts[start : start + QUERY_CHUNK]
                rows = self._db.execute(
                    "SELECT txid, vout, amount, script_pubkey, height FROM outputs "
                    "WHERE height <= ? AND (spent_height IS NULL OR spent_height > ?) "
                    f"AND script_pubkey IN ({', '.join('?' * len(chunk))})",
                    (at, at, *chunk),
                )
                found += [Utxo(str(t), int(v), int(a), bytes(s), int(h)) for t, v, a, s, h in rows]
        return Snapshot(at, block_hash, sorted(found, key=lambda u: (u.height or 0, u.txid, u.vout)))

    def raw_transaction(self, txid: str) -> bytes:
        """The serialized transaction ``txid`` (confirmed or in the mempool).

        Raises InputError for a malformed txid, NotFound for an unknown one.
        """
        txid = _check_txid(txid)
        with self._open():
            entry = self._mempool.get(txid)
            if entry is not None:
                return entry.raw
            row = self._db.execute("SELECT raw FROM txs WHERE txid = ?", (txid,)).fetchone()
        if row is None:
            raise NotFound(f"transaction {txid} is not known to the embedded chain")
        return bytes(row[0])

    def test_accept(self, raw_tx: bytes) -> AcceptResult:
        """Whether the mempool would accept ``raw_tx`` now (see the module docstring)."""
        try:
            tx = decode_transaction(raw_tx)
        except InputError as e:
            return AcceptResult(False, str(e), "", Refusal.UNDECODABLE)
        with self._open():
            refusal, _ = accept.refusal(self, tx, bytes(raw_tx))
        if refusal is None:
            return AcceptResult(True, None, b2lx(tx.GetTxid()))
        return AcceptResult(False, refusal[1], b2lx(tx.GetTxid()), refusal[0])

    def broadcast(self, raw_tx: bytes) -> str:
        """Add ``raw_tx`` to the mempool and return its txid; one already known is no error.

        Raises TransactionRefused with the class and the reason when the transaction is refused.
        """
        raw = bytes(raw_tx)
        try:
            tx = decode_transaction(raw)
        except InputError as e:
            raise TransactionRefused(
                f"the embedded chain refused the transaction: {e}", Refusal.UNDECODABLE, str(e)
            ) from None
        txid: str = b2lx(tx.GetTxid())
        with self._open():
            if txid in self._mempool or self._db.execute("SELECT 1 FROM txs WHERE txid = ?", (txid,)).fetchone():
                return txid
            refusal, fee = accept.refusal(self, tx, raw)
            if refusal is not None:
                raise TransactionRefused(
                    f"the embedded chain refused transaction {txid} ({refusal[0].value}): {refusal[1]}", *refusal
                )
            with self._write() as db:
                self._add_to_mempool(db, txid, raw, tx, fee)
        return txid

    def tx_status(self, txid: str) -> TxStatus:
        """Whether ``txid`` is unknown, in the mempool, or confirmed (and how deep)."""
        txid = _check_txid(txid)
        with self._open():
            if txid in self._mempool:
                return TxStatus(txid, known=True, in_mempool=True, confirmations=0, block_height=None)
            row = self._db.execute("SELECT height FROM txs WHERE txid = ?", (txid,)).fetchone()
            tip = self._tip()
        if row is None:
            return TxStatus(txid, known=False, in_mempool=False, confirmations=0, block_height=None)
        height = int(row[0])
        return TxStatus(txid, known=True, in_mempool=False, confirmations=tip - height + 1, block_height=height)

    def spends(self, outpoints: Sequence[tuple[str, int]]) -> list[OutputSpend]:
        """What spends each output: the index's record of the spending block, or the mempool."""
        found = []
        with self._open():
            tip = self._tip()
            for txid, vout in outpoints:
                row = self._db.execute(
                    "SELECT spent_height, spent_by FROM outputs WHERE txid = ? AND vout = ?", (_check_txid(txid), vout)
                ).fetchone()
                if row is None:
                    found.append(OutputSpend(txid, vout, SpendState.UNKNOWN))
                elif row[0] is not None:
                    height = int(row[0])
                    found.append(OutputSpend(txid, vout, SpendState.SPENT, str(row[1]), tip - height + 1, height))
                elif (txid, vout) in self._mempool_spends:
                    found.append(OutputSpend(txid, vout, SpendState.IN_MEMPOOL, self._mempool_spends[(txid, vout)]))
                else:
                    found.append(OutputSpend(txid, vout, SpendState.UNSPENT))
        return found

    def mine(self, blocks: int, script_pubkey: bytes) -> list[str]:
        """Mine ``blocks`` blocks paying ``script_pubkey``, with the mempool; their hashes.

        Each block takes as much of the mempool as fits. Should the kernel refuse a block with
        mempool transactions (a rule test-accept missed), the block is retried with half of
        them, down to one, which is then evicted (listed in :attr:`evicted`).
        Raises InputError for a count outside 1..10000 or an empty script, NodeError when the
        kernel refuses a block without transactions.
        """
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= MAX_MINE:
            raise InputError(f"number of blocks to mine must be 1..{MAX_MINE}, not {blocks}")
        if not script_pubkey:
            raise InputError("cannot mine to an empty scriptPubKey")
        hashes: list[str] = []
        with self._open():
            for _ in range(blocks):
                entries = self._candidates()
                while True:
                    block = self._build(entries, bytes(script_pubkey))
                    refusal = self._submit(block)
                    if refusal is None:
                        break
                    if not entries:
                        raise NodeError(f"libbitcoinkernel refused a block custody built: {refusal}")
                    if len(entries) == 1:
                        self.evicted.append((entries[0].txid, refusal))
                        with self._write() as db:
                            self._drop(db, {entries[0].txid})
                        self._load_mempool()  # its descendants go too
                        entries = []
                    else:
                        entries = entries[: len(entries) // 2]
                hashes.append(block.hash)
        return hashes

    # ------------------------------------------------------------------ beyond the protocol

    def make_block(self, raw_txs: Sequence[bytes], script_pubkey: bytes) -> bytes:
        """A block on the tip with ``raw_txs`` unchecked (for tests of the kernel's rules).

        Its coinbase pays only the subsidy. Raises InputError for a transaction that does not
        decode.
        """
        with self._open():
            return self._build([], bytes(script_pubkey), raws=raw_txs).raw

    def submit_block(self, raw_block: bytes) -> str:
        """Hand a block on the tip to the kernel and, once connected, to the index; its hash.

        Raises InputError when it is no block, NodeError with the reason when it is refused
        (the tip and the index are then unchanged).
        """
        block = _parse_block(bytes(raw_block))
        with self._open():
            refusal = self._submit(block)
        if refusal is not None:
            raise NodeError(f"block {block.hash} refused: {refusal}")
        return block.hash

    def mempool(self) -> list[str]:
        """Txids in the mempool, in acceptance order."""
        with self._open():
            return list(self._mempool)

    def block_hash(self, height: int) -> str:
        """The hash of the block at ``height``; InputError above the tip or below zero."""
        with self._open():
            found = self._index_hash(height) if 0 <= height else None
        if found is None:
            raise InputError(f"height {height} is not on the chain")
        return found

    def block_at(self, height: int) -> ChainBlock:
        """The block at ``height``, from the index; InputError above the tip or below zero."""
        with self._open():
            row = self._db.execute("SELECT raw FROM blocks WHERE height = ?", (height,)).fetchone()
        if row is None or height < 0:
            raise InputError(f"height {height} is not on the chain")
        block = _parse_block(bytes(row[0]))
        return ChainBlock(height, block.hash, block.prev, tuple(_chain_tx(txid, tx) for txid, _, tx in block.txs))

    def mempool_txids(self) -> list[str]:
        """Txids in the mempool, in acceptance order."""
        return self.mempool()

    def mempool_tx(self, txid: str) -> ChainTx | None:
        """The mempool transaction ``txid``, or None when it is not in the mempool."""
        with self._open():
            entry = self._mempool.get(_check_txid(txid))
        return None if entry is None else _chain_tx(entry.txid, entry.tx)

    def audit(self) -> None:
        """Check the index against the kernel: the same block at every height, and the same
        unspent outputs as replaying the kernel's blocks gives. Raises StorageError on a
        difference."""
        with self._open():
            height = self._kernel.height()
            if self._tip() != height:
                raise StorageError(f"chain index at height {self._tip()}, the kernel at {height}")
            utxos: dict[tuple[str, int], tuple[int, bytes]] = {}
            for h in range(1, height + 1):
                if self._index_hash(h) != self._kernel.hash_at(h):
                    raise StorageError(f"chain index and kernel differ at height {h}")
                for position, (txid, _, tx) in enumerate(_parse_block(self._kernel.block_at(h)).txs):
                    if position > 0:
                        for txin in tx.vin:
                            utxos.pop((b2lx(txin.prevout.hash), txin.prevout.n))
                    for vout, out in enumerate(tx.vout):
                        if _spendable(bytes(out.scriptPubKey)):
                            utxos[(txid, vout)] = (out.nValue, bytes(out.scriptPubKey))
            rows = self._db.execute(
                "SELECT txid, vout, amount, script_pubkey FROM outputs WHERE spent_height IS NULL"
            ).fetchall()
            indexed = {(str(t), int(v)): (int(a), bytes(s)) for t, v, a, s in rows}
            if indexed != utxos:
                raise StorageError(
                    f"chain index holds {len(indexed)} unspent outputs, the kernel's blocks give {len(utxos)} "
                    f"({len(indexed.keys() ^ utxos.keys())} differ)"
                )


def _check_txid(txid: str) -> str:
    if not isinstance(txid, str) or len(txid) != 64 or any(c not in "0123456789abcdef" for c in txid):
        raise InputError(f"{txid!r} is not a txid (64 lower-case hex digits)")
    return txid
