"""The chain interface the rest of custody uses, and the values it returns.

Everything is said in scriptPubKeys and raw transactions, never in address strings: a
backend may be Litecoin Core (regtest in the tests), whose address prefixes differ from
Bitcoin's, while its script and transaction rules are the same. Amounts are integer satoshis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True)
class AcceptResult:
    """Whether the node would accept a transaction into its mempool, and if not, why.

    ``txid`` is empty when the node could not even decode the transaction.
    """

    allowed: bool
    reason: str | None
    txid: str


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
        """Broadcast ``raw_tx`` and return its txid; a transaction already known is no error."""
        ...

    def tx_status(self, txid: str) -> TxStatus:
        """Whether ``txid`` is unknown, in the mempool, or confirmed (and how deep)."""
        ...

    def mine(self, blocks: int, script_pubkey: bytes) -> list[str]:
        """Mine ``blocks`` blocks paying ``script_pubkey`` (regtest only); their hashes."""
        ...
