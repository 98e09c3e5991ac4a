"""Issuance throughput: addresses derived, verified and stored per second (SQLite).

Prints the rate beside a floor measured in the same run: three BIP-32 child derivations
with libsecp256k1 plus the script hash, per address, nothing else. Target: 100,000
addresses issued into SQLite in under 20 s on a 2-core machine.

    .venv/bin/python benchmarks/bench_issuance.py [--count 100000] [--batch 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from custody.bitcoin.keys import ParentKey  # noqa: E402
from custody.bitcoin.network import REGTEST  # noqa: E402
from custody.bitcoin.script import ScriptType  # noqa: E402
from custody.config import Settings  # noqa: E402
from custody.issuance.issuer import issue_addresses  # noqa: E402
from custody.policy.model import make_policy  # noqa: E402
from custody.store.db import Database  # noqa: E402
from tests.support import create_store, founders  # noqa: E402


def floor(policy_keys: list[ParentKey], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        keys = sorted(k.child(i) for k in policy_keys)
        hashlib.sha256(b"".join(keys)).digest()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--script", default="p2wsh", choices=[t.value for t in ScriptType])
    args = parser.parse_args()

    fs = founders()
    policy = make_policy(REGTEST, 2, ScriptType(args.script), [(f.name, str(f.account)) for f in fs])
    parents = []
    for f in policy.founders:
        k = f.key.xpub.child(0)
        parents.append(ParentKey(k.public_key, k.chain_code))
    floor_n = min(args.count, 20_000)
    floor_s = floor(parents, floor_n) * args.count / floor_n

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

    print(
        f"issued {done} {args.script} addresses into SQLite in {elapsed:.2f} s "
        f"({done / elapsed:,.0f}/s; target 100,000 in < 20 s)"
    )
    print(f"floor (3 child derivations + hash per address, one core): {floor_s:.2f} s ({args.count / floor_s:,.0f}/s)")
    print(f"ratio to floor: {elapsed / floor_s:.2f}x")


if __name__ == "__main__":
    main()
