"""Benchmark: two founders sign a 500-input (2-of-3 p2wsh), 1,000-output PSBT.

Timed work, as the withdrawal flow does it: serialize -> parse -> sign -> serialize, once per
founder (each in their own PSBT), then parse both, combine, finalize (which checks all 1,000
signatures), extract and serialize.

The floor, measured in the same run on the same transaction: the cryptography the workflow
cannot avoid, done bare. 1,000 coincurve ECDSA signatures (two founders x 500 inputs), 1,000
coincurve verifications of them (finalize checks every signature), and 1,500 BIP-143 digests
(each founder's 500 and finalize's 500) with the transaction-wide hashes (hashPrevouts,
hashSequence, hashOutputs) computed once, as BIP-143 intends: only the per-input preimage is
hashed each time. (python-bitcoinlib's ``SignatureHash``, the floor before, re-hashes every
output per call: it was slower than our own code, so no floor at all.) Goal (issue 17): the
workflow within 2x this floor.

Run: .venv/bin/python benchmarks/bench_psbt.py [--inputs 500] [--outputs 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import coincurve
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript
from bitcoin.core.script import OP_0, OP_CHECKMULTISIG

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


def _sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def _bip143_digests(psbt: Psbt, witness_script: bytes, count: int) -> list[bytes]:
    """``count`` BIP-143 digests over the inputs (round robin), the shared hashes made once."""
    tx = psbt.tx
    hash_prevouts = _sha256d(b"".join(txin.prevout.serialize() for txin in tx.vin))
    hash_sequence = _sha256d(b"".join(txin.nSequence.to_bytes(4, "little") for txin in tx.vin))
    hash_outputs = _sha256d(b"".join(txout.serialize() for txout in tx.vout))
    head = tx.nVersion.to_bytes(4, "little") + hash_prevouts + hash_sequence
    tail = hash_outputs + tx.nLockTime.to_bytes(4, "little") + (1).to_bytes(4, "little")
    script_code = bytes([len(witness_script)]) + witness_script  # a 105-byte script: one length byte
    amounts = [inp.witness_utxo.amount for inp in psbt.inputs if inp.witness_utxo is not None]
    n = len(tx.vin)
    out = []
    for k in range(count):
        i = k % n
        txin = tx.vin[i]
        out.append(
            _sha256d(
                head
                + txin.prevout.serialize()
                + script_code
                + amounts[i].to_bytes(8, "little")
                + txin.nSequence.to_bytes(4, "little")
                + tail
            )
        )
    return out


def floor(psbt: Psbt, witness_script: bytes, key: coincurve.PrivateKey, n_sigs: int) -> tuple[float, float, float]:
    """Seconds for ``n_sigs`` signatures, ``n_sigs`` verifications and 1.5 x ``n_sigs``
    cached BIP-143 digests."""
    start = time.perf_counter()
    digests = _bip143_digests(psbt, witness_script, n_sigs * 3 // 2)
    hashed = time.perf_counter()
    sigs = [key.sign(d, hasher=None) for d in digests[:n_sigs]]
    signed = time.perf_counter()
    pub = key.public_key
    for sig, d in zip(sigs, digests, strict=False):
        pub.verify(sig, d, hasher=None)
    return signed - hashed, time.perf_counter() - signed, hashed - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=500)
    parser.add_argument("--outputs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each, interleaved; the best is reported")
    args = parser.parse_args(argv)

    psbt, keys, witness_script = build(args.inputs, args.outputs)
    unsigned = psbt.serialize()
    n_sigs = 2 * args.inputs

    runs, floors, cpu_runs, cpu_floors = [], [], [], []
    for _ in range(args.repeat):  # interleaved: a change of the machine's load touches both alike
        start, cpu = time.perf_counter(), time.process_time()
        workflow(unsigned, keys[0], keys[2])
        runs.append(time.perf_counter() - start)
        cpu_runs.append(time.process_time() - cpu)
        cpu = time.process_time()
        floors.append(floor(psbt, witness_script, keys[0], n_sigs))
        cpu_floors.append(time.process_time() - cpu)
    best = min(runs)
    sign_floor, verify_floor, digest_floor = (min(f[k] for f in floors) for k in range(3))
    best_floor = sign_floor + verify_floor + digest_floor

    print(f"PSBT: {args.inputs} inputs (2-of-3 p2wsh), {args.outputs} outputs, {len(unsigned):,} bytes unsigned")
    print(f"workflow (2 x serialize/parse/sign/serialize, combine, finalize, extract): {best:.3f} s")
    print(
        f"floor ({n_sigs} signatures + {n_sigs} verifications + {n_sigs * 3 // 2} cached BIP-143 digests): "
        f"{best_floor:.3f} s (signatures {sign_floor:.3f} s, verifications {verify_floor:.3f} s, "
        f"digests {digest_floor:.3f} s)"
    )
    ratio = best / best_floor
    print(f"ratio workflow / floor: {ratio:.2f} (goal within 2x: {'met' if ratio <= 2 else 'MISSED'})")
    # CPU time leaves out the time other processes held the cores: on a shared, loaded machine
    # the wall-clock best of a 0.1 s floor finds a quiet moment more often than the workflow's.
    cpu_ratio = min(cpu_runs) / min(cpu_floors)
    print(
        f"CPU time of this process: workflow {min(cpu_runs):.3f} s, floor {min(cpu_floors):.3f} s, "
        f"ratio {cpu_ratio:.2f} (goal within 2x: {'met' if cpu_ratio <= 2 else 'MISSED'})"
    )
    print(f"target under {TARGET_SECONDS:.0f} s: {'met' if best < TARGET_SECONDS else 'MISSED'}")
    print(f"load average (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0 if best < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
