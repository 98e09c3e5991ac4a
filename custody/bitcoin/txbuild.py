"""Sizing, coin selection and building of withdrawal transactions (python-bitcoinlib).

Sizes are worst-case estimates (73-byte signatures) so the fee rate paid is never below the
one asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, lx

from custody.bitcoin.encoding import compact_size_len
from custody.bitcoin.script import ScriptType
from custody.errors import InputError

SIG_SIZE = 73  # DER signature (at most 72 bytes) plus the sighash byte
SEQUENCE = 0xFFFFFFFD  # final for locktime purposes, signals replace-by-fee


def _push_size(n: int) -> int:
    return n + (1 if n < 0x4C else 2 if n <= 0xFF else 3)


def input_vsize(script_type: ScriptType, threshold: int, n: int) -> float:
    """Virtual size of one m-of-n multisig input, signatures at their largest."""
    script_len = 3 + 34 * n if n <= 16 else 4 + 34 * n
    base = 32 + 4 + 4  # outpoint, sequence
    if script_type is ScriptType.P2SH:
        script_sig = 1 + threshold * (1 + SIG_SIZE) + _push_size(script_len)
        return base + compact_size_len(script_sig) + script_sig
    witness = (
        compact_size_len(threshold + 2) + 1 + threshold * (1 + SIG_SIZE) + compact_size_len(script_len) + script_len
    )
    script_sig = 0 if script_type is ScriptType.P2WSH else 35  # push of 0x0020<32 bytes>
    return base + 1 + script_sig + witness / 4


def output_vsize(script_pubkey: bytes) -> int:
    return 8 + compact_size_len(len(script_pubkey)) + len(script_pubkey)


def tx_vsize(script_type: ScriptType, threshold: int, n: int, inputs: int, outputs: Sequence[bytes]) -> int:
    overhead = 4 + 4 + compact_size_len(inputs) + compact_size_len(len(outputs))
    segwit = 0.5 if script_type is not ScriptType.P2SH else 0.0  # marker and flag
    size = overhead + segwit + inputs * input_vsize(script_type, threshold, n) + sum(output_vsize(o) for o in outputs)
    return math.ceil(size)


def fee_for(vsize: int, fee_rate: Decimal) -> int:
    return math.ceil(Decimal(vsize) * fee_rate)


@dataclass(frozen=True)
class Coin:
    txid: str
    vout: int
    amount: int
    script_pubkey: bytes
    chain: int
    index: int

    @property
    def outpoint(self) -> str:
        return f"{self.txid}:{self.vout}"


@dataclass(frozen=True)
class Selection:
    coins: tuple[Coin, ...]
    fee: int
    change: int  # 0 when there is no change output
    vsize: int


def select_coins(
    coins: Sequence[Coin],
    payments: Sequence[tuple[bytes, int]],
    change_script: bytes,
    change_dust: int,
    script_type: ScriptType,
    threshold: int,
    n: int,
    fee_rate: Decimal,
) -> Selection:
    """Largest coins first until the payments and the fee are covered.

    Change below ``change_dust`` goes to the fee. Raises InputError when the coins cannot
    cover the payments.
    """
    pay = sum(a for _, a in payments)
    outs = [spk for spk, _ in payments]
    chosen: list[Coin] = []
    total = 0
    for coin in sorted(coins, key=lambda c: (-c.amount, c.txid, c.vout)):
        chosen.append(coin)
        total += coin.amount
        with_change = fee_for(tx_vsize(script_type, threshold, n, len(chosen), [*outs, change_script]), fee_rate)
        if total >= pay + with_change + change_dust:
            vsize = tx_vsize(script_type, threshold, n, len(chosen), [*outs, change_script])
            return Selection(tuple(chosen), with_change, total - pay - with_change, vsize)
        without = fee_for(tx_vsize(script_type, threshold, n, len(chosen), outs), fee_rate)
        if total >= pay + without:
            vsize = tx_vsize(script_type, threshold, n, len(chosen), outs)
            return Selection(tuple(chosen), total - pay, 0, vsize)
    available = sum(c.amount for c in coins)
    raise InputError(
        f"custody holds {available} sat in spendable, unreserved coins; {pay} sat plus the fee is more than that"
    )


def build_transaction(
    coins: Sequence[Coin], outputs: Sequence[tuple[bytes, int]], locktime: int = 0
) -> CMutableTransaction:
    """Version 2, inputs and outputs in BIP-69 order. ``locktime``: the chain's tip height, as
    Bitcoin Core's wallet sets it (anti-fee-sniping); the offline signer reads it as "now"."""
    vin = [
        CMutableTxIn(COutPoint(lx(c.txid), c.vout), nSequence=SEQUENCE)
        for c in sorted(coins, key=lambda c: (bytes.fromhex(c.txid)[::-1], c.vout))
    ]
    vout = [CMutableTxOut(amount, spk) for spk, amount in sorted(outputs, key=lambda o: (o[1], o[0]))]
    return CMutableTransaction(vin, vout, nLockTime=locktime, nVersion=2)
