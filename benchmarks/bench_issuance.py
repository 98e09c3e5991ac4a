"""Issuance throughput: addresses derived, verified and stored per second (SQLite).

Prints the rate beside a floor measured in the same run, on the same cores as the issuance:
per address, three BIP-32 child derivations with libsecp256k1 plus the script hash, and the
independent verifier's check of the address (what issuance must do before it stores one),
spread over every core, nothing else. Target (issue 17): 100,000 addresses issued into
SQLite in under 20 s on a 2-core machine, within 2x that floor.

    .venv/bin/python benchmarks/bench_issuance.py [--count 100000] [--batch 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from custody import verify  # noqa: E402
from custody.bitcoin.keys import ParentKey  # noqa: E402
from custody.bitcoin.network import REGTEST  # noqa: E402
from custody.bitcoin.script import ScriptType  # noqa: E402
from custody.config import Settings  # noqa: E402
from custody.issuance.issuer import issue_addresses  # noqa: E402
from custody.policy.generator import AddressDeriver  # noqa: E402
from custody.policy.model import Policy, make_policy  # noqa: E402
from custody.store.db import Database  # noqa: E402
from tests.support import create_store, founders  # noqa: E402


def _floor_part(policy: Policy, addresses: list[str], first: int) -> float:
    """One core's share of the floor: seconds for its addresses."""
    parents = []
    for f in policy.founders:
        k = f.key.xpub.child(0)
        parents.append(ParentKey(k.public_key, k.chain_code))
    manifest = verify.parse_manifest(policy.to_manifest())  # the body founders sign, as issuance reads it
    verify.verify_address(manifest, 0, first, addresses[0])  # the verifier's set-up, once, as issuance's
    start = time.perf_counter()
    for i, address in enumerate(addresses, first):
        keys = sorted(k.child(i) for k in parents)
        hashlib.sha256(b"".join(keys)).digest()
        assert not verify.verify_address(manifest, 0, i, address)
    return time.perf_counter() - start


def floor(policy: Policy, count: int) -> float:
    """Wall-clock seconds for ``count`` addresses' floor work split over every core."""
    deriver = AddressDeriver(policy)
    addresses = [deriver.derive(0, i).address for i in range(count)]  # what the verifier checks, untimed
    cores = os.cpu_count() or 1
    step = -(-count // cores)
    with ProcessPoolExecutor(max_workers=cores, mp_context=get_context("forkserver")) as pool:
        list(pool.map(_floor_part, [policy] * cores, [addresses[:1]] * cores, [0] * cores))  # workers up
        start = time.perf_counter()
        list(
            pool.map(
                _floor_part,
                [policy] * cores,
                [addresses[i : i + step] for i in range(0, count, step)],
                range(0, count, step),
            )
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--script", default="p2wsh", choices=[t.value for t in ScriptType])
    args = parser.parse_args()

    fs = founders()
    policy = make_policy(REGTEST, 2, ScriptType(args.script), [(f.name, str(f.account)) for f in fs])
    floor_n = min(args.count, 20_000)
    before = floor(policy, floor_n) * args.count / floor_n

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.load(home=tmp, env={})
        db = Database(settings.db_url)
        create_store(db, settings, policy, fs)
        start = time.perf_counter()
        done = 0
        while done < args.count:
            n = min(args.batch, args.count - done)
            done += len(issue_addresses(db, settings, "bench", n))
        elapsed = time.perf_counter() - start
        db.dispose()
    after = floor(policy, floor_n) * args.count / floor_n  # before and after: the machine's load drifts
    floor_s = (before + after) / 2

    print(
        f"issued {done} {args.script} addresses into SQLite in {elapsed:.2f} s "
        f"({done / elapsed:,.0f}/s; target 100,000 in < 20 s)"
    )
    print(
        f"floor (3 child derivations + hash + the verifier's check per address, {os.cpu_count()} cores): "
        f"{floor_s:.2f} s ({args.count / floor_s:,.0f}/s; {before:.2f} s before the run, {after:.2f} s after)"
    )
    print(f"ratio to floor: {elapsed / floor_s:.2f}x (goal: within 2x)")
    print(f"load average (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
