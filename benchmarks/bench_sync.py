"""Deposit sync throughput: blocks per second over a regtest chain with many transactions,
against stores of 10,000 and 100,000 issued addresses (1,000,000 with --million).

A regtest node of its own is started; a wallet builds ``--blocks`` blocks of ``--txs``
transactions, each paying ``--outputs`` outputs (a few of them to the stores' real deposit
addresses). Every store starts its scan below those blocks, then one ``sync_deposits`` reads
them all. Printed beside each: the floor, measured in the same run (the same blocks fetched
and decoded from the node, nothing matched or stored), and the ratio of each store's cost per
block to the smallest store's: it must stay near 1 however many addresses are issued.

Address tables are filled by the fast path of tests/scan_support.py (real issued addresses,
plus filler rows with distinct scriptPubKeys).

    .venv/bin/python benchmarks/bench_sync.py [--blocks 40] [--txs 25] [--outputs 20] [--million]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from custody.books import deposits  # noqa: E402
from custody.chain.node import RpcBackend, connect  # noqa: E402
from custody.chain.regtest import ensure_wallet, start_node, stop_node  # noqa: E402
from custody.chain.rpc import RpcClient  # noqa: E402
from custody.config import Settings  # noqa: E402
from custody.issuance.issuer import IssuedAddress, issue_addresses  # noqa: E402
from custody.store.db import Database  # noqa: E402
from tests.chain_support import multisig  # noqa: E402
from tests.scan_support import fill_addresses  # noqa: E402
from tests.support import create_store  # noqa: E402

REAL = 20  # real deposit addresses per store, paid in the benchmark's blocks


def make_store(root: Path, size: int, backend: RpcBackend) -> tuple[Database, Settings, list[IssuedAddress]]:
    """A store whose scan starts at the current tip, with ``size`` deposit addresses."""
    settings = Settings.load(home=str(root / f"store-{size}"), env={})
    db = Database(settings.db_url)
    ms = multisig("bench-sync")
    create_store(db, settings, ms.policy, ms.founders)
    deposits.sync_deposits(db, settings, backend, 1)  # no address yet: the scan starts at the tip
    real = issue_addresses(db, settings, "customer", REAL)
    fill_addresses(db, size - REAL)
    return db, settings, real


def build_chain(rpc: RpcClient, wallet: RpcClient, real: list[IssuedAddress], args: argparse.Namespace) -> int:
    """Mine ``args.blocks`` blocks of wallet transactions; how many outputs they pay in all."""
    targets = [wallet.call("getnewaddress") for _ in range(args.outputs)]
    ours = []
    for a in real:
        decoded = rpc.call("decodescript", a.script_pubkey)
        ours.append(decoded.get("address") or decoded["addresses"][0])
    paid = 0
    for b in range(args.blocks):
        for t in range(args.txs):
            amounts = {addr: Decimal("0.0001") for addr in targets}
            if t == 0:
                amounts[ours[b % len(ours)]] = Decimal("0.001")
            wallet.call("sendmany", "", amounts)
            paid += len(amounts) + 1
        rpc.call("generatetodescriptor", 1, "raw(51)")
    return paid


def floor(backend: RpcBackend, first: int, last: int) -> float:
    start = time.perf_counter()
    for height in range(first, last + 1):
        backend.block_at(height)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--txs", type=int, default=25)
    parser.add_argument("--outputs", type=int, default=20)
    parser.add_argument("--million", action="store_true", help="also a store of 1,000,000 addresses")
    args = parser.parse_args()
    sizes = [10_000, 100_000] + ([1_000_000] if args.million else [])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = start_node(root / "node")
        try:
            rpc = node.client(timeout=600)
            wallet = ensure_wallet(rpc, "bench")
            wallet.call("generatetoaddress", 101 + args.blocks, wallet.call("getnewaddress"))
            backend = connect(rpc, "regtest")
            stores = {n: make_store(root, n, backend) for n in sizes}
            first = backend.tip_height() + 1
            outputs = build_chain(rpc, wallet, stores[sizes[0]][2], args)
            last = backend.tip_height()
            blocks = last - first + 1
            floor_s = floor(backend, first, last)
            print(f"{blocks} blocks, {blocks * args.txs} wallet transactions, {outputs} outputs")
            print(f"floor (fetch and decode the blocks, nothing matched): {blocks / floor_s:,.1f} blocks/s")
            per_block: dict[int, float] = {}
            for n, (db, settings, _) in stores.items():
                start = time.perf_counter()
                changed = deposits.sync_deposits(db, settings, backend, 1)
                elapsed = time.perf_counter() - start
                per_block[n] = elapsed / blocks
                credited = sum(1 for d in changed if d["status"] == "credited")
                print(
                    f"{n:>9,} addresses: {blocks / elapsed:,.1f} blocks/s, {credited} deposits credited, "
                    f"{elapsed / floor_s:.2f}x the floor, "
                    f"cost per block {per_block[n] / per_block[sizes[0]]:.2f}x the {sizes[0]:,}-address store's"
                )
                db.dispose()
        finally:
            stop_node(root / "node")


if __name__ == "__main__":
    main()
