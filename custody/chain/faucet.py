"""A regtest faucet for trials and demos, on any chain backend (the node or the embedded chain).

Blocks are mined to the faucet's script, a P2WSH of ``OP_TRUE`` that anyone can spend with the
witness ``[OP_TRUE]`` (no key: regtest coins are worth nothing). ``fund`` pays an exact amount
from its mature coins to any address and mines one block, so the payment is confirmed and a
coinbase matures for the next one. Only the :class:`~custody.chain.types.ChainBackend` protocol
is used: ``unspent``, ``mine``, ``broadcast``, ``tip_height``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness, b2lx, lx
from bitcoin.core.script import CScript, CScriptWitness

from custody.chain.types import ChainBackend, Utxo
from custody.errors import InputError

OP_TRUE = b"\x51"
FAUCET_SCRIPT = b"\x00\x20" + hashlib.sha256(OP_TRUE).digest()  # OP_0 <sha256(OP_TRUE)>: P2WSH
COINBASE_MATURITY = 100
FEE_RATE = 20  # sat/vB: above litecoind's 10 sat/vB relay floor and bitcoind's 1
MAX_FUND = 1_000 * 100_000_000  # satoshis, per call


@dataclass(frozen=True)
class Funded:
    txid: str
    amount: int
    fee: int
    block: str  # the block that confirmed it


def _mature(backend: ChainBackend) -> list[Utxo]:
    """The faucet's outputs old enough to spend even if they are coinbases."""
    tip = backend.tip_height()
    return [
        u for u in backend.unspent([FAUCET_SCRIPT]) if u.height is not None and tip + 1 - u.height >= COINBASE_MATURITY
    ]


def _spend(coins: list[Utxo], pay_to: bytes, amount: int, change: int) -> CTransaction:
    # each input: empty scriptSig, witness [OP_TRUE] (the witness script itself, no arguments)
    vin = [CTxIn(COutPoint(lx(c.txid), c.vout), CScript(), 0xFFFFFFFD) for c in coins]
    vout = [CTxOut(amount, CScript(pay_to))]
    if change > 0:
        vout.append(CTxOut(change, CScript(FAUCET_SCRIPT)))
    witness = CTxWitness([CTxInWitness(CScriptWitness([OP_TRUE])) for _ in coins])
    return CTransaction(vin, vout, 0, 2, witness)


def fund(backend: ChainBackend, script_pubkey: bytes, amount: int) -> Funded:
    """Pay ``amount`` satoshis to ``script_pubkey`` from the faucet, then mine one block.

    Mines 101 blocks to the faucet first when its mature coins do not cover the amount (once).
    Raises InputError (amount out of range, more than the faucet can give), NodeError (the
    backend refused, or is not on regtest).
    """
    if not 0 < amount <= MAX_FUND:
        raise InputError(f"a faucet payment is 1 sat to {MAX_FUND} sat, not {amount}")
    if not script_pubkey:
        raise InputError("cannot pay an empty scriptPubKey")
    for attempt in range(2):
        coins: list[Utxo] = []
        total = 0
        for c in _mature(backend):
            coins.append(c)
            total += c.amount
            if total >= amount + FEE_RATE * (60 + 45 * len(coins)):
                break
        else:
            if attempt == 0:
                backend.mine(COINBASE_MATURITY + 1, FAUCET_SCRIPT)
                continue
            raise InputError(f"the faucet holds {total} sat in mature coins; {amount} sat is more")
        draft = _spend(coins, script_pubkey, amount, total - amount)
        weight = 3 * len(draft.serialize(params={"include_witness": False})) + len(draft.serialize())
        fee = FEE_RATE * -(-weight // 4)
        change = total - amount - fee
        if 0 < change < 1_000:  # no dust change: it goes to the fee
            fee, change = fee + change, 0
        tx = _spend(coins, script_pubkey, amount, change)
        txid = backend.broadcast(tx.serialize())
        (block,) = backend.mine(1, FAUCET_SCRIPT)
        return Funded(txid or b2lx(tx.GetTxid()), amount, fee, block)
    raise AssertionError("unreachable")  # pragma: no cover


def mine(backend: ChainBackend, blocks: int, script_pubkey: bytes | None = None) -> list[str]:
    """Mine ``blocks`` blocks paying ``script_pubkey`` (default: the faucet); their hashes.

    Raises InputError (count), NodeError (not regtest, refused).
    """
    return backend.mine(blocks, script_pubkey or FAUCET_SCRIPT)
