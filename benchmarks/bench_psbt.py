"""Benchmark: two founders sign a 500-input (2-of-3 p2wsh), 1,000-output PSBT.

Timed work, as the withdrawal flow does it: serialize -> parse -> sign -> serialize, once per
founder (each in their own PSBT), then parse both, combine, finalize (which checks all 1,000
signatures), extract and serialize.

The floor, measured in the same run on the same transaction: 1,000 raw coincurve ECDSA
signatures plus 1,000 BIP-143 sighashes computed by python-bitcoinlib's ``SignatureHash``.

Run: .venv/bin/python benchmarks/bench_psbt.py [--inputs 500] [--outputs 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import coincurve
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript
from bitcoin.core.script import OP_0, OP_CHECKMULTISIG, SIGHASH_ALL, SIGVERSION_WITNESS_V0, SignatureHash

from custody.bitcoin.psbt import KeyOrigin, Psbt, WitnessUtxo, combine, extract, finalize, sign

TARGET_SECONDS = 5.0
HARDENED = 0x80000000


def build(n_inputs: int, n_outputs: int) -> tuple[Psbt, list[coincurve.PrivateKey], bytes]:
    keys = [coincurve.PrivateKey(hashlib.sha256(f"bench-founder-{n}".encode()).digest()) for n in range(3)]
    pubs = sorted(k.public_key.format() for k in keys)
    # OP_2 <pub_1> <pub_2> <pub_3> OP_3 OP_CHECKMULTISIG
    witness_script = bytes(CScript([2, *pubs, 3, OP_CHECKMULTISIG]))
    spk = bytes(CScript([OP_0, hashlib.sha256(witness_script).digest()]))
    rng = hashlib.sha256(b"bench-prevouts").digest()
    vin = []
    for n in range(n_inputs):
        rng = hashlib.sha256(rng).digest()
        vin.append(CMutableTxIn(COutPoint(rng, n % 4), nSequence=0xFFFFFFFD))
    vout = [
        CMutableTxOut(10_000 + n, CScript(b"\x00\x14" + hashlib.sha256(n.to_bytes(4, "little")).digest()[:20]))
        for n in range(n_outputs)
    ]
    psbt = Psbt.from_unsigned_tx(CMutableTransaction(vin, vout, 0, 2))
    for n, inp in enumerate(psbt.inputs):
        inp.witness_utxo = WitnessUtxo(100_000 + n, spk)
        inp.witness_script = witness_script
        for k, pub in enumerate(pubs):
            path = (48 | HARDENED, 1 | HARDENED, 0 | HARDENED, 2 | HARDENED, 0, n)
            inp.bip32_derivations[pub] = KeyOrigin(bytes([k + 1]) * 4, path)
    return psbt, keys, witness_script


def workflow(unsigned: bytes, founder_a: coincurve.PrivateKey, founder_b: coincurve.PrivateKey) -> bytes:
    signed = []
    for key in (founder_a, founder_b):
        psbt = Psbt.parse(unsigned)
        sign(psbt, {key.public_key.format(): key})
        signed.append(psbt.serialize())
    final = finalize(combine([Psbt.parse(raw) for raw in signed]))
    extract(final).serialize()
    return final.serialize()


def floor(psbt: Psbt, witness_script: bytes, key: coincurve.PrivateKey, count: int) -> tuple[float, float]:
    """Seconds for ``count`` raw signatures and for ``count`` python-bitcoinlib BIP-143 sighashes."""
    digests = [os.urandom(32) for _ in range(count)]
    script = CScript(witness_script)
    n_inputs = len(psbt.tx.vin)
    amounts = [inp.witness_utxo.amount for inp in psbt.inputs if inp.witness_utxo is not None]
    start = time.perf_counter()
    for digest in digests:
        key.sign(digest, hasher=None)
    signed = time.perf_counter()
    for n in range(count):
        i = n % n_inputs
        SignatureHash(script, psbt.tx, i, SIGHASH_ALL, amount=amounts[i], sigversion=SIGVERSION_WITNESS_V0)
    return signed - start, time.perf_counter() - signed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=500)
    parser.add_argument("--outputs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    args = parser.parse_args(argv)

    psbt, keys, witness_script = build(args.inputs, args.outputs)
    unsigned = psbt.serialize()
    n_sigs = 2 * args.inputs

    runs = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        workflow(unsigned, keys[0], keys[2])
        runs.append(time.perf_counter() - start)
    floors = [floor(psbt, witness_script, keys[0], n_sigs) for _ in range(args.repeat)]
    best = min(runs)
    sign_floor, sighash_floor = min(f[0] for f in floors), min(f[1] for f in floors)
    best_floor = sign_floor + sighash_floor

    print(f"PSBT: {args.inputs} inputs (2-of-3 p2wsh), {args.outputs} outputs, {len(unsigned):,} bytes unsigned")
    print(f"workflow (2 x serialize/parse/sign/serialize, combine, finalize, extract): {best:.3f} s")
    print(
        f"floor ({n_sigs} coincurve signatures + {n_sigs} python-bitcoinlib BIP-143 sighashes): {best_floor:.3f} s "
        f"(signatures {sign_floor:.3f} s, sighashes {sighash_floor:.3f} s)"
    )
    print(f"ratio workflow / floor: {best / best_floor:.2f} (workflow / signatures alone: {best / sign_floor:.1f})")
    print(f"target under {TARGET_SECONDS:.0f} s: {'met' if best < TARGET_SECONDS else 'MISSED'}")
    return 0 if best < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
