"""The chain interface the rest of custody uses, and the values it returns.

Everything is said in scriptPubKeys and raw transactions, never in address strings: a
backend may be Litecoin Core (regtest in the tests), whose address prefixes differ from
Bitcoin's, while its script and transaction rules are the same. Amounts are integer satoshis.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from custody.errors import InputError, NodeError

MAX_MINE = 10_000
"""The most blocks one ``mine`` call makes."""


@dataclass(frozen=True)
class Utxo:
    """A confirmed unspent output. ``amount`` in satoshis; ``height`` of its block."""

    txid: str
    vout: int
    amount: int
    script_pubkey: bytes
    height: int | None


@dataclass(frozen=True)
class Snapshot:
    """The confirmed unspent outputs paying some scripts as the chain stood after one block."""

    height: int
    block_hash: str
    utxos: list[Utxo]


@dataclass(frozen=True)
class TxStatus:
    """What the node knows of a transaction. ``confirmations`` is 0 unless it is in a block."""

    txid: str
    known: bool
    in_mempool: bool
    confirmations: int
    block_height: int | None


class Refusal(enum.Enum):
    """Why a chain refused a transaction, by Bitcoin Core's reject reason (see REJECT_REASONS).

    What a refusal proves is small: MISSING_INPUTS is said alike by a node that saw the
    inputs spent and by one that never saw them (not synced, another chain); a
    MEMPOOL_CONFLICT is a transaction in a mempool, which blocks may never take. Neither
    ever fails a signed withdrawal: only the chain's blocks can (custody.withdraw.broadcast).
    """

    MISSING_INPUTS = "missing-inputs"
    """An input is not in the node's unspent set: spent, or never seen by this node."""
    MEMPOOL_CONFLICT = "mempool-conflict"
    """A transaction in the node's mempool spends an input (not a block: not spent)."""
    REPLACEMENT_REFUSED = "replacement-refused"
    """It conflicts with replaceable mempool transactions and does not pay enough to replace them."""
    ALREADY_KNOWN = "already-known"
    """The node has this very transaction, in its mempool or in a block."""
    FEE_TOO_LOW = "fee-too-low"
    """Below the node's minimum relay fee or its mempool's minimum fee (or the mempool is full)."""
    FEE_TOO_HIGH = "fee-too-high"
    """Above the fee cap given to the node (maxfeerate)."""
    PREMATURE = "premature"
    """Not valid yet: a locktime, a relative locktime (BIP-68) or an immature coinbase input."""
    NON_STANDARD = "non-standard"
    """Valid by consensus, but outside the node's relay policy."""
    MEMPOOL_POLICY = "mempool-policy"
    """Refused by a limit of the mempool (chain of unconfirmed ancestors too long)."""
    INVALID = "invalid"
    """Invalid by consensus: no node will ever take it as it is."""
    UNDECODABLE = "undecodable"
    """Not a transaction the node can decode."""
    UNKNOWN = "unknown"
    """A reason not in REJECT_REASONS (another node version): assumed to prove nothing."""


# Bitcoin Core 0.21's reject reasons (Litecoin Core 0.21 uses the same), by where they are
# raised: src/validation.cpp (MemPoolAccept::PreChecks, PolicyScriptChecks, ...),
# src/policy/policy.cpp (IsStandardTx), src/consensus/tx_check.cpp (CheckTransaction),
# src/consensus/tx_verify.cpp (CheckTxInputs), src/rpc/rawtransaction.cpp
# (testmempoolaccept's "missing-inputs" and "max-fee-exceeded") and src/util/error.cpp
# (TransactionErrorString, what sendrawtransaction says when no state is given).
REJECT_REASONS: Mapping[str, Refusal] = {
    "missing-inputs": Refusal.MISSING_INPUTS,
    "bad-txns-inputs-missingorspent": Refusal.MISSING_INPUTS,
    "Inputs missing or spent": Refusal.MISSING_INPUTS,
    "txn-mempool-conflict": Refusal.MEMPOOL_CONFLICT,
    "insufficient fee": Refusal.REPLACEMENT_REFUSED,
    "too many potential replacements": Refusal.REPLACEMENT_REFUSED,
    "replacement-adds-unconfirmed": Refusal.REPLACEMENT_REFUSED,
    "bad-txns-spends-conflicting-tx": Refusal.REPLACEMENT_REFUSED,
    "txn-already-in-mempool": Refusal.ALREADY_KNOWN,
    "txn-already-known": Refusal.ALREADY_KNOWN,
    "Transaction already in block chain": Refusal.ALREADY_KNOWN,
    "min relay fee not met": Refusal.FEE_TOO_LOW,
    "mempool min fee not met": Refusal.FEE_TOO_LOW,
    "mempool full": Refusal.FEE_TOO_LOW,
    "max-fee-exceeded": Refusal.FEE_TOO_HIGH,
    "absurdly-high-fee": Refusal.FEE_TOO_HIGH,
    "Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)": Refusal.FEE_TOO_HIGH,
    "non-final": Refusal.PREMATURE,
    "non-BIP68-final": Refusal.PREMATURE,
    "bad-txns-premature-spend-of-coinbase": Refusal.PREMATURE,
    "version": Refusal.NON_STANDARD,
    "tx-size": Refusal.NON_STANDARD,
    "tx-size-small": Refusal.NON_STANDARD,
    "scriptsig-size": Refusal.NON_STANDARD,
    "scriptsig-not-pushonly": Refusal.NON_STANDARD,
    "scriptpubkey": Refusal.NON_STANDARD,
    "bare-multisig": Refusal.NON_STANDARD,
    "dust": Refusal.NON_STANDARD,
    "multi-op-return": Refusal.NON_STANDARD,
    "bad-txns-nonstandard-inputs": Refusal.NON_STANDARD,
    "bad-witness-nonstandard": Refusal.NON_STANDARD,
    "bad-txns-too-many-sigops": Refusal.NON_STANDARD,
    "non-mandatory-script-verify-flag": Refusal.NON_STANDARD,
    "too-long-mempool-chain": Refusal.MEMPOOL_POLICY,
    "mandatory-script-verify-flag-failed": Refusal.INVALID,
    "coinbase": Refusal.INVALID,
    "bad-txns-vin-empty": Refusal.INVALID,
    "bad-txns-vout-empty": Refusal.INVALID,
    "bad-txns-oversize": Refusal.INVALID,
    "bad-txns-vout-negative": Refusal.INVALID,
    "bad-txns-vout-toolarge": Refusal.INVALID,
    "bad-txns-txouttotal-toolarge": Refusal.INVALID,
    "bad-txns-inputs-duplicate": Refusal.INVALID,
    "bad-txns-prevout-null": Refusal.INVALID,
    "bad-txns-inputvalues-outofrange": Refusal.INVALID,
    "bad-txns-in-belowout": Refusal.INVALID,
    "bad-txns-fee-outofrange": Refusal.INVALID,
}

_REJECT_CODE = re.compile(r"(\d{1,2}): (.*)", re.DOTALL)
_BIP61_CODES = frozenset({1, 16, 17, 18, 64, 65, 66, 67})
"""REJECT_MALFORMED, _INVALID, _OBSOLETE, _DUPLICATE, _NONSTANDARD, _DUST, _INSUFFICIENTFEE, _CHECKPOINT."""


def classify(reason: str) -> Refusal:
    """The Refusal of a node's reject reason, read as Core writes it, never by substring.

    ``reason`` is a ``testmempoolaccept`` reject-reason or a ``sendrawtransaction`` error
    message. Core writes a reason alone (``txn-mempool-conflict``), with its debug message
    after a comma (``min relay fee not met, 110 < 141``), or with a script error in
    parentheses (``non-mandatory-script-verify-flag (Non-canonical DER signature)``); nodes
    before 0.20 put the BIP-61 reject code first (``18: txn-mempool-conflict``). The
    reason itself is then looked up exactly in REJECT_REASONS; anything else is UNKNOWN.
    """
    text = reason.strip()
    coded = _REJECT_CODE.fullmatch(text)
    if coded is not None and int(coded.group(1)) in _BIP61_CODES:
        text = coded.group(2)
    for candidate in (text, text.partition(", ")[0], text.partition(" (")[0]):
        found = REJECT_REASONS.get(candidate)
        if found is not None:
            return found
    return Refusal.UNKNOWN


@dataclass(frozen=True)
class AcceptResult:
    """Whether the node would accept a transaction into its mempool, and if not, why.

    ``refusal`` classifies ``reason`` (None when allowed). ``txid`` is empty when the node
    could not even decode the transaction.
    """

    allowed: bool
    reason: str | None
    txid: str
    refusal: Refusal | None = None


class TransactionRefused(NodeError):
    """The chain refused to take a transaction (exit code 8, like every NodeError)."""

    def __init__(self, message: str, refusal: Refusal, reason: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.reason = reason


class SpendState(enum.Enum):
    """Where one output stands on a chain (see OutputSpend)."""

    UNKNOWN = "unknown"
    """The chain has no such output in a block of its best chain: it never saw it (not
    synced, another chain, a transaction it never got) or dropped it in a reorganisation."""
    UNSPENT = "unspent"
    IN_MEMPOOL = "in-mempool"
    """Unspent in the blocks; a mempool transaction spends it (which no block may ever take)."""
    SPENT = "spent"
    """Spent by a transaction in a block of the best chain."""


@dataclass(frozen=True)
class OutputSpend:
    """What spends output ``txid:vout``. ``spender`` is the spending transaction when the
    chain says (always when SPENT); ``confirmations`` and ``block_height`` are its block's,
    0 and None unless SPENT."""

    txid: str
    vout: int
    state: SpendState
    spender: str | None = None
    confirmations: int = 0
    block_height: int | None = None


@dataclass(frozen=True)
class ChainTx:
    """A transaction as the block scanner reads it: what it spends and what it pays.

    ``spends`` are the (txid, vout) outpoints of its inputs (none for a coinbase);
    ``outputs`` are (vout, amount in satoshis, scriptPubKey).
    """

    txid: str
    spends: tuple[tuple[str, int], ...]
    outputs: tuple[tuple[int, int, bytes], ...]


@dataclass(frozen=True)
class ChainBlock:
    """One block of the best chain: its height, hash, previous block's hash and transactions."""

    height: int
    hash: str
    prev: str
    txs: tuple[ChainTx, ...]


class ChainBackend(Protocol):
    """A view of one chain. Every method raises NodeError when the chain cannot be asked."""

    network_name: str

    def tip_height(self) -> int:
        """Height of the best block."""
        ...

    def unspent(self, script_pubkeys: Sequence[bytes]) -> list[Utxo]:
        """Confirmed unspent outputs paying any of ``script_pubkeys`` (coinbase outputs included)."""
        ...

    def unspent_at(self, script_pubkeys: Sequence[bytes], height: int | None = None) -> Snapshot:
        """The outputs paying any of ``script_pubkeys`` that were unspent just after block ``height``.

        ``None`` means the tip; the snapshot names the block it is of. Raises InputError for
        a height above the tip or below zero.
        """
        ...

    def raw_transaction(self, txid: str) -> bytes:
        """The serialized transaction ``txid`` (for a p2sh input's non_witness_utxo)."""
        ...

    def test_accept(self, raw_tx: bytes) -> AcceptResult:
        """Whether the node's mempool would accept ``raw_tx`` now; nothing is broadcast."""
        ...

    def broadcast(self, raw_tx: bytes) -> str:
        """Broadcast ``raw_tx`` and return its txid; a transaction already known is no error.

        Raises TransactionRefused (with its Refusal) when the chain refuses it."""
        ...

    def tx_status(self, txid: str) -> TxStatus:
        """Whether ``txid`` is unknown, in the mempool, or confirmed (and how deep)."""
        ...

    def spends(self, outpoints: Sequence[tuple[str, int]]) -> list[OutputSpend]:
        """What spends each of ``outpoints`` (txid, vout), in the same order."""
        ...

    def mine(self, blocks: int, script_pubkey: bytes) -> list[str]:
        """Mine ``blocks`` blocks paying ``script_pubkey`` (regtest only); their hashes."""
        ...

    def block_hash(self, height: int) -> str:
        """The hash of the best chain's block at ``height``. Raises InputError above the tip."""
        ...

    def block_at(self, height: int) -> ChainBlock:
        """The best chain's block at ``height``, read once. Raises InputError above the tip."""
        ...

    def mempool_txids(self) -> list[str]:
        """The txids in the mempool."""
        ...

    def mempool_tx(self, txid: str) -> ChainTx | None:
        """Mempool transaction ``txid``; None when it is no longer in the mempool."""
        ...


def lookup_scripts(script_pubkeys: Sequence[bytes]) -> list[bytes]:
    """The scripts an outputs lookup asks for, each once, in their order. Raises InputError for
    an empty one."""
    wanted: dict[bytes, None] = {}
    for spk in script_pubkeys:
        if not spk:
            raise InputError("cannot look up outputs of an empty scriptPubKey")
        wanted[bytes(spk)] = None
    return list(wanted)
