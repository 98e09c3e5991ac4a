"""Test-accept on the embedded chain (``custody.chain.embedded``): what a node's mempool would check,
short of package and replacement rules, with Bitcoin Core's reject reasons in Core's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bitcoin.core import b2lx

from custody.bitcoin.encoding import MAX_MONEY
from custody.chain.consensus import script_problem, standardness_problem
from custody.chain.kernel import (
    COINBASE_MATURITY,
    LOCKTIME_THRESHOLD,
    MAX_BLOCK_WEIGHT,
    MIN_RELAY_FEE,
    SEQUENCE_FINAL,
    SEQUENCE_LOCKTIME_DISABLE,
    SEQUENCE_LOCKTIME_GRANULARITY,
    SEQUENCE_LOCKTIME_MASK,
    SEQUENCE_LOCKTIME_TYPE,
    _weight,
)
from custody.chain.types import Refusal

if TYPE_CHECKING:
    from custody.chain.embedded import EmbeddedBackend, _Coin


def refusal(chain: EmbeddedBackend, tx: Any, raw: bytes) -> tuple[tuple[Refusal, str] | None, int]:  # noqa: C901 - Bitcoin Core's mempool reject reasons, in Core's order
    """Why the mempool would refuse ``tx`` now, as (class, Bitcoin Core's reject reason
    with the detail after it), or None; and its fee."""
    txid: str = b2lx(tx.GetTxid())
    if tx.is_coinbase():
        return (Refusal.INVALID, "coinbase"), 0
    outpoints = [(b2lx(i.prevout.hash), i.prevout.n) for i in tx.vin]
    if len(set(outpoints)) != len(outpoints):
        return (Refusal.INVALID, "bad-txns-inputs-duplicate"), 0
    if any(not 0 <= o.nValue <= MAX_MONEY for o in tx.vout):
        return (Refusal.INVALID, "bad-txns-vout-toolarge"), 0
    paid = sum(o.nValue for o in tx.vout)
    if paid > MAX_MONEY:
        return (Refusal.INVALID, "bad-txns-txouttotal-toolarge"), 0
    if _weight(tx) > MAX_BLOCK_WEIGHT:
        return (Refusal.INVALID, "bad-txns-oversize"), 0
    if txid in chain._mempool:
        return (Refusal.ALREADY_KNOWN, "txn-already-in-mempool"), 0
    if chain._db.execute("SELECT 1 FROM txs WHERE txid = ?", (txid,)).fetchone():
        return (Refusal.ALREADY_KNOWN, "txn-already-known"), 0
    tip = chain._tip()
    coins: list[_Coin] = []
    for n, (prev_txid, vout) in enumerate(outpoints):
        if (prev_txid, vout) in chain._mempool_spends:
            spender = chain._mempool_spends[(prev_txid, vout)]
            return (Refusal.MEMPOOL_CONFLICT, f"txn-mempool-conflict (input {n} is spent by {spender})"), 0
        coin = chain._coin(prev_txid, vout)
        if coin is None:
            return (Refusal.MISSING_INPUTS, f"bad-txns-inputs-missingorspent (input {n}: {prev_txid}:{vout})"), 0
        if coin.coinbase and tip + 1 - coin.height < COINBASE_MATURITY:
            depth = tip + 1 - coin.height
            return (Refusal.PREMATURE, f"bad-txns-premature-spend-of-coinbase (input {n}, depth {depth})"), 0
        coins.append(coin)
    value_in = sum(c.amount for c in coins)
    if value_in > MAX_MONEY:
        return (Refusal.INVALID, "bad-txns-inputvalues-outofrange"), 0
    if value_in < paid:
        return (Refusal.INVALID, f"bad-txns-in-belowout ({value_in} < {paid})"), 0
    fee = value_in - paid
    if not _final(chain, tx, tip):
        return (Refusal.PREMATURE, "non-final"), fee
    if not _sequence_locks_met(chain, tx, coins, tip):
        return (Refusal.PREMATURE, "non-BIP68-final"), fee
    spent = [(c.amount, c.script_pubkey) for c in coins]
    problem = standardness_problem(tx, spent)
    if problem is not None:
        return (Refusal.NON_STANDARD, f"non-standard: {problem}"), fee
    vsize = (_weight(tx) + 3) // 4
    if fee < vsize * MIN_RELAY_FEE:
        return (Refusal.FEE_TOO_LOW, f"min relay fee not met ({fee} < {vsize * MIN_RELAY_FEE} sat)"), fee
    problem = script_problem(raw, spent)
    if problem is not None:
        return (Refusal.INVALID, f"mandatory-script-verify-flag-failed ({problem})"), fee
    return None, fee


def _final(chain: EmbeddedBackend, tx: Any, tip: int) -> bool:
    """Core's IsFinalTx for the next block."""
    if tx.nLockTime == 0:
        return True
    cutoff = tip + 1 if tx.nLockTime < LOCKTIME_THRESHOLD else chain._median_time_past(tip)
    if tx.nLockTime < cutoff:
        return True
    return all(i.nSequence == SEQUENCE_FINAL for i in tx.vin)


def _sequence_locks_met(chain: EmbeddedBackend, tx: Any, coins: Sequence[_Coin], tip: int) -> bool:
    """BIP-68 relative locktimes for the next block."""
    if tx.nVersion < 2:
        return True
    min_height, min_time = -1, -1
    for txin, coin in zip(tx.vin, coins, strict=True):
        seq = txin.nSequence
        if seq & SEQUENCE_LOCKTIME_DISABLE:
            continue
        if seq & SEQUENCE_LOCKTIME_TYPE:
            coin_time = chain._median_time_past(max(coin.height - 1, 0))
            min_time = max(min_time, coin_time + ((seq & SEQUENCE_LOCKTIME_MASK) << SEQUENCE_LOCKTIME_GRANULARITY) - 1)
        else:
            min_height = max(min_height, coin.height + (seq & SEQUENCE_LOCKTIME_MASK) - 1)
    return min_height < tip + 1 and min_time < chain._median_time_past(tip)
