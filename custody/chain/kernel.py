"""Regtest's consensus constants, blocks as the embedded chain (``custody.chain.embedded``) builds and
parses them, and libbitcoinkernel's chainstate manager (through ``py-bitcoinkernel``), which
validates each block with Bitcoin Core's own code.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pbk
from bitcoin.core import (
    CTransaction,
    b2lx,
)

from custody.bitcoin.encoding import read_compact_size, sha256d
from custody.chain.types import ChainTx
from custody.errors import InputError, NodeError

NETWORK = "regtest"
REGTEST_GENESIS = "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"
REGTEST_BITS = 0x207FFFFF
REGTEST_TARGET = 0x7FFFFF << (8 * (0x20 - 3))
BLOCK_VERSION = 0x20000000  # BIP-9 top bits, no deployment signalled
COINBASE_MATURITY = 100
HALVING_INTERVAL = 150  # regtest's nSubsidyHalvingInterval
INITIAL_SUBSIDY = 50 * 100_000_000
MAX_BLOCK_WEIGHT = 4_000_000
BLOCK_TX_WEIGHT = 3_990_000  # for the mempool's transactions: room for header and coinbase
MIN_RELAY_FEE = 1  # sat/vB, Bitcoin Core's default -minrelaytxfee (1,000 sat/kvB)
LOCKTIME_THRESHOLD = 500_000_000
SEQUENCE_FINAL = 0xFFFFFFFF
SEQUENCE_LOCKTIME_DISABLE = 1 << 31
SEQUENCE_LOCKTIME_TYPE = 1 << 22
SEQUENCE_LOCKTIME_MASK = 0xFFFF
SEQUENCE_LOCKTIME_GRANULARITY = 9
WITNESS_MAGIC = b"\xaa\x21\xa9\xed"
WITNESS_RESERVED = bytes(32)
OP_RETURN = 0x6A
MAX_SCRIPT_SIZE = 10_000


# --------------------------------------------------------------------------- serialization


def _merkle_root(leaves: list[bytes]) -> bytes:
    level = list(leaves)
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [sha256d(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def _weight(tx: Any) -> int:
    base = len(CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion).serialize())
    return 3 * base + len(tx.serialize())


def _has_witness(tx: Any) -> bool:
    return not tx.wit.is_null()


@dataclass(frozen=True)
class _Block:
    """A block split into its parts: header, hash (display order), time, transactions."""

    raw: bytes
    hash: str
    prev: str
    time: int
    txs: list[tuple[str, bytes, Any]]  # (txid, raw, CTransaction)


def _parse_block(raw: bytes) -> _Block:
    """Split a serialized block; InputError when it is not one."""
    try:
        f = io.BytesIO(raw)
        header = f.read(80)
        if len(header) != 80:
            raise ValueError("truncated header")
        count = read_compact_size(f)
        txs = []
        for _ in range(count):
            start = f.tell()
            tx = CTransaction.stream_deserialize(f)
            end = f.tell()
            txs.append((b2lx(tx.GetTxid()), raw[start:end], tx))
        if f.read(1):
            raise ValueError("data after the last transaction")
    except Exception as e:  # python-bitcoinlib raises several unrelated types
        raise InputError(f"not a block: {e}") from None
    return _Block(
        raw=raw,
        hash=sha256d(header)[::-1].hex(),
        prev=header[4:36][::-1].hex(),
        time=struct.unpack("<I", header[68:72])[0],
        txs=txs,
    )


def _chain_tx(txid: str, tx: Any) -> ChainTx:
    spends = () if tx.is_coinbase() else tuple((b2lx(i.prevout.hash), int(i.prevout.n)) for i in tx.vin)
    outputs = tuple((n, int(o.nValue), bytes(o.scriptPubKey)) for n, o in enumerate(tx.vout))
    return ChainTx(txid, spends, outputs)


def subsidy(height: int) -> int:
    """The block subsidy at ``height`` on regtest, in satoshis."""
    halvings = height // HALVING_INTERVAL
    return 0 if halvings >= 64 else INITIAL_SUBSIDY >> halvings


def _spendable(spk: bytes) -> bool:
    """Whether an output enters the UTXO set (Core's CScript::IsUnspendable, negated)."""
    return not (spk[:1] == bytes([OP_RETURN]) or len(spk) > MAX_SCRIPT_SIZE)


# --------------------------------------------------------------------------- kernel


class _Kernel:
    """libbitcoinkernel's chainstate manager on one directory, and its block callback."""

    def __init__(self, directory: Path) -> None:
        self.checked: dict[str, tuple[str, str]] = {}
        callbacks = pbk.ValidationInterfaceCallbacks(block_checked=self._block_checked)
        try:
            self.chainman: Any = pbk.load_chainman(directory, pbk.ChainType.REGTEST, validation_callbacks=callbacks)
        except RuntimeError:
            raise NodeError(
                f"libbitcoinkernel cannot open the chain in {directory}: another process is using it, or it is damaged"
            ) from None

    def _block_checked(self, user_data: Any, block: Any, state: Any) -> None:
        # Called synchronously inside process_block; must not raise.
        try:
            self.checked[str(block.block_hash)] = (state.validation_mode.name, state.block_validation_result.name)
        except Exception:  # an exception here would only be printed by ctypes
            pass

    def height(self) -> int:
        return int(self.chainman.get_active_chain().height)

    def hash_at(self, height: int) -> str:
        chain = self.chainman.get_active_chain()
        return str(chain.block_tree_entries[height].block_hash)

    def block_at(self, height: int) -> bytes:
        entry = self.chainman.get_active_chain().block_tree_entries[height]
        return bytes(self.chainman.blocks[entry])

    def submit(self, raw: bytes, block_hash: str) -> str | None:
        """Hand a block to the kernel; None when it is on the active chain, else the reason."""
        self.checked.pop(block_hash, None)
        try:
            block = pbk.Block(raw)
        except RuntimeError:
            return "libbitcoinkernel cannot parse the block"
        try:
            self.chainman.process_block(block)
        except pbk.ProcessBlockException as e:
            refused: str | None = f"process_block failed with code {e.code} (a duplicate of an invalid block?)"
        else:
            refused = None
        # process_block returns true for a block it rejected: only the active chain tells.
        height = self.height()
        if height > 0 and self.hash_at(height) == block_hash:
            return None
        entries = self.chainman.block_tree_entries
        key = pbk.BlockHash(bytes.fromhex(block_hash)[::-1])
        if key in entries:
            entry = entries[key]
            if entry.height <= height and self.hash_at(entry.height) == block_hash:
                return None  # known already, on the active chain below its tip
        state = self.checked.get(block_hash)
        if state is not None and state[0] != "VALID":
            return f"libbitcoinkernel rejected it: {state[0].lower()}, {state[1].lower()}"
        return refused or "libbitcoinkernel did not connect it to the active chain"

    def close(self) -> None:
        self.chainman.__exit__(None, None, None)  # destroys the chainstate manager: flushes to disk
