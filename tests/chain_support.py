"""Multisig spends for the chain tests: built and signed with custody.bitcoin.psbt, then tampered with."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bitcoin.core import CTransaction

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.network import get_network
from custody.bitcoin.script import ScriptType
from custody.bitcoin.txbuild import Coin, build_transaction
from custody.chain.types import Utxo
from custody.policy.generator import AddressDeriver, DerivedAddress
from custody.policy.model import Policy, make_policy
from tests.support import TestFounder, founders

Tamper = Callable[[tuple[bytes, ...]], tuple[bytes, ...]]
"""A change to a witness stack."""


SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
FEE = 10_000


@dataclass
class Multisig:
    """A 2-of-3 p2wsh policy of the test founders and its addresses."""

    founders: list[TestFounder]
    policy: Policy
    deriver: AddressDeriver

    def address(self, index: int) -> DerivedAddress:
        return self.deriver.derive(0, index)

    def fresh(self) -> DerivedAddress:
        """An address at a random index: nobody else on a shared node pays it."""
        return self.address(int.from_bytes(os.urandom(3), "big"))


def multisig(tag: str = "chain", script_type: ScriptType = ScriptType.P2WSH) -> Multisig:
    fs = founders(tag=tag)
    policy = make_policy(get_network("regtest"), 2, script_type, [(f.name, str(f.account)) for f in fs])
    return Multisig(fs, policy, AddressDeriver(policy))


def fresh_script() -> bytes:
    """A p2wpkh scriptPubKey nobody else pays (a destination)."""
    return b"\x00\x14" + hashlib.sha256(os.urandom(32)).digest()[:20]


def signed_psbt(
    ms: Multisig,
    coins: Sequence[tuple[Utxo, DerivedAddress]],
    outputs: Sequence[tuple[bytes, int]],
    signers: Sequence[int] = (0, 1),
) -> psbt_lib.Psbt:
    """A finalized PSBT spending ``coins`` (each with the address it pays) to ``outputs``."""
    by_outpoint = {f"{u.txid}:{u.vout}": (u, a) for u, a in coins}
    tx = build_transaction([Coin(u.txid, u.vout, u.amount, u.script_pubkey, 0, a.index) for u, a in coins], outputs)
    p = psbt_lib.Psbt.from_unsigned_tx(tx)
    for n, txin in enumerate(p.tx.vin):
        u, a = by_outpoint[f"{txin.prevout.hash[::-1].hex()}:{txin.prevout.n}"]
        p.inputs[n].witness_utxo = psbt_lib.WitnessUtxo(u.amount, u.script_pubkey)
        p.inputs[n].witness_script = a.script
        for i in signers:
            f = ms.founders[i]
            assert psbt_lib.sign_input(p, n, f.master.derive(f.path + (a.chain, a.index)).private_key())
    return psbt_lib.finalize(p)


def spend(
    ms: Multisig,
    coins: Sequence[tuple[Utxo, DerivedAddress]],
    outputs: Sequence[tuple[bytes, int]] | None = None,
    tamper: Callable[[tuple[bytes, ...]], tuple[bytes, ...]] | None = None,
) -> bytes:
    """The raw signed transaction; ``tamper`` rewrites the first input's witness stack."""
    if outputs is None:
        outputs = [(fresh_script(), sum(u.amount for u, _ in coins) - FEE)]
    p = signed_psbt(ms, coins, outputs)
    if tamper is not None:
        p.inputs[0].final_script_witness = tamper(p.inputs[0].final_script_witness or ())
    return bytes(psbt_lib.extract(p).serialize())


def spent_outputs(coins: Sequence[tuple[Utxo, DerivedAddress]], raw: bytes) -> list[tuple[int, bytes]]:
    """(amount, scriptPubKey) of each input of ``raw``, in input order."""
    by_outpoint = {(u.txid, u.vout): u for u, _ in coins}
    tx = CTransaction.deserialize(raw)
    out = []
    for txin in tx.vin:
        u = by_outpoint[(txin.prevout.hash[::-1].hex(), txin.prevout.n)]
        out.append((u.amount, u.script_pubkey))
    return out


# --------------------------------------------------------------------------- tampering


def _der_parts(sig: bytes) -> tuple[int, int, int]:
    len_r = sig[3]
    r = int.from_bytes(sig[4 : 4 + len_r], "big")
    s = int.from_bytes(sig[6 + len_r : -1], "big")
    return r, s, sig[-1]


def _der(r: int, s: int, hashtype: int) -> bytes:
    def enc(v: int) -> bytes:
        b = v.to_bytes((v.bit_length() + 7) // 8 or 1, "big")
        return b"\x00" + b if b[0] & 0x80 else b

    body = b"\x02" + bytes([len(enc(r))]) + enc(r) + b"\x02" + bytes([len(enc(s))]) + enc(s)
    return b"\x30" + bytes([len(body)]) + body + bytes([hashtype])


def corrupt_signature(stack: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The first signature with one bit of R flipped: still strict DER, no longer valid."""
    r, s, hashtype = _der_parts(stack[1])
    return (stack[0], _der(r ^ 1, s, hashtype), *stack[2:])


def high_s(stack: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The first signature with S replaced by n - S: valid by consensus, not standard."""
    r, s, hashtype = _der_parts(stack[1])
    assert s <= SECP256K1_ORDER // 2
    return (stack[0], _der(r, SECP256K1_ORDER - s, hashtype), *stack[2:])


def non_empty_dummy(stack: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The CHECKMULTISIG dummy element set to 0x01 (NULLDUMMY, BIP-147)."""
    return (b"\x01", *stack[1:])
