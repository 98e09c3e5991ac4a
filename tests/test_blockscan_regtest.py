"""The block scanner against a real node: a sync over 100,000 issued addresses asks the node
per block and per mempool transaction, never per address; a reorganisation (``invalidateblock``)
is rolled back; a mempool deposit is shown unconfirmed, then credited once mined.

The store is made by the library (the founders' manifest). Its paid addresses are issued by
``issue_addresses`` (the real generator, verified, in the audit log); the documented fast path
of tests/scan_support.py fills the address table to 100,000 rows, as big as a real store's,
which is what a per-address scan would pay for. Every node call goes through a client that
counts them by method.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import select

from custody.books import blockscan, deposits, ledger
from custody.chain.node import RpcBackend, connect
from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from custody.config import Settings
from custody.errors import VerificationFailed
from custody.issuance.issuer import issue_addresses
from custody.store.db import Database
from custody.store.models import AddressRow, ScanBlockRow, ScanOutputRow
from tests.chain_support import multisig
from tests.scan_support import fill_addresses
from tests.support import create_store

pytestmark = pytest.mark.regtest

ISSUED = 100_000
REAL = 8  # issued by the real path, one account each


class CountingClient(RpcClient):
    """The real client, counting each call by method."""

    def __init__(self, node: NodeInfo) -> None:
        super().__init__(node.rpc_url, cookie_file=node.cookie_file, timeout=120)
        self.calls: Counter[str] = Counter()

    def call(self, method: str, *params: Any) -> Any:
        self.calls[method] += 1
        return super().call(method, *params)


@dataclass
class Store:
    db: Database
    settings: Settings
    home: Path
    client: CountingClient
    backend: RpcBackend
    addresses: list[Any]

    def sync(self) -> list[dict[str, Any]]:
        self.client.calls.clear()
        return deposits.sync_deposits(self.db, self.settings, self.backend, 1)

    def balance(self, account: str) -> int:
        with self.db.transaction() as s:
            return ledger.customer_balance(s, account)

    def deposit(self, wallet: RpcClient, index: int, btc: str) -> str:
        """Pay real address ``index`` from the node's wallet; the txid. The node names our
        script in its own address format (rltc on Litecoin's regtest)."""
        decoded = self.client.call("decodescript", self.addresses[index].script_pubkey)
        target = decoded.get("address") or decoded["addresses"][0]
        return str(wallet.call("sendtoaddress", target, Decimal(btc)))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, regtest_node: NodeInfo) -> Iterator[Store]:
    home = tmp_path_factory.mktemp("blockscan")
    settings = Settings.load(home=str(home), env={})
    db = Database(settings.db_url)
    ms = multisig("blockscan")
    create_store(db, settings, ms.policy, ms.founders)
    client = CountingClient(regtest_node)
    store = Store(db, settings, home, client, connect(client, "regtest"), [])
    store.sync()  # the scan starts here, before any address: nothing to seed
    for n in range(REAL):
        store.addresses += issue_addresses(db, settings, f"acct-{n}", 1)
    fill_addresses(db, ISSUED - REAL)
    yield store
    db.dispose()


def test_a_sync_over_100k_addresses_makes_no_per_address_node_call(big: Store, funded_wallet: RpcClient) -> None:
    with big.db.transaction() as s:
        assert s.exec(select(func.count()).select_from(AddressRow)).one() == ISSUED
    picked = (0, 1, 2)
    txids = {big.deposit(funded_wallet, i, "0.02") for i in picked}
    mined = 3
    funded_wallet.call("generatetoaddress", mined, funded_wallet.call("getnewaddress"))
    before = blockscan.cursor(big.db)
    assert before is not None

    changed = big.sync()

    credited = sorted((d["account"], d["address"], d["status"]) for d in changed)
    assert credited == sorted((big.addresses[i].account, big.addresses[i].address, "credited") for i in picked)
    assert {d["outpoint"].split(":")[0] for d in changed} == txids
    calls = big.client.calls
    blocks = big.client.call("getblockcount") - before.height
    assert "scantxoutset" not in calls  # the UTXO set is never walked per address
    assert calls["getblock"] == blocks  # each new block read once
    mempool = len(big.client.call("getrawmempool"))
    # A bounded number of calls per block and per deposit, none per address:
    assert sum(calls.values()) <= 4 * blocks + mempool + 4 * len(picked) + 5, calls


def test_a_mempool_deposit_is_shown_unconfirmed_then_credited(big: Store, funded_wallet: RpcClient) -> None:
    index = 3
    account = big.addresses[index].account
    start = big.balance(account)
    txid = big.deposit(funded_wallet, index, "0.03")

    (seen,) = [d for d in big.sync() if d["outpoint"].startswith(txid)]
    assert (seen["status"], seen["change"], seen["height"], seen["confirmations"]) == ("pending", "seen", None, 0)
    assert big.balance(account) == start  # never credited from the mempool
    assert big.sync() == [] and big.balance(account) == start

    funded_wallet.call("generatetoaddress", 1, funded_wallet.call("getnewaddress"))
    (credited,) = [d for d in big.sync() if d["outpoint"].startswith(txid)]
    assert (credited["status"], credited["confirmations"]) == ("credited", 1)
    assert big.balance(account) == start + 3_000_000


def test_a_reorg_is_rolled_back_and_followed_on_the_real_node(big: Store, funded_wallet: RpcClient) -> None:
    index = 4
    account = big.addresses[index].account
    start = big.balance(account)
    txid = big.deposit(funded_wallet, index, "0.04")
    (block,) = funded_wallet.call("generatetoaddress", 1, funded_wallet.call("getnewaddress"))
    assert [d["change"] for d in big.sync()] == ["credited"]
    height = big.client.call("getblockcount")
    assert big.balance(account) == start + 4_000_000

    big.client.call("invalidateblock", block)
    try:
        assert txid in big.client.call("getrawmempool")
        reversed_ = big.sync()
        assert [(d["status"], d["change"]) for d in reversed_] == [("reversed", "reversed")]
        assert big.balance(account) == start
        with big.db.transaction() as s:
            assert s.get(ScanBlockRow, height) is None  # the cursor went back below the lost block
            assert s.get(ScanOutputRow, f"{txid}:0") is None and s.get(ScanOutputRow, f"{txid}:1") is None
        # Another block at the same height takes the deposit back: credited again.
        (other,) = funded_wallet.call("generatetoaddress", 1, funded_wallet.call("getnewaddress"))
        assert other != block
        again = big.sync()
        assert [(d["status"], d["change"], d["height"]) for d in again] == [("credited", "credited", height)]
        assert big.balance(account) == start + 4_000_000
        with big.db.transaction() as s:
            assert s.get(ScanBlockRow, height).hash == other  # type: ignore[union-attr]
    finally:
        big.client.call("reconsiderblock", block)


def test_a_scanned_output_written_by_hand_is_not_credited_and_halts(big: Store, funded_wallet: RpcClient) -> None:
    """An insider inserts a scanned output for an issued address: the chain has no such output."""
    index = 5
    account = big.addresses[index].account
    start = big.balance(account)
    big.sync()  # the scan is at the tip; the row goes below it
    height = big.client.call("getblockcount") - 1
    fake = "ab" * 32
    con = sqlite3.connect(big.home / "custody.db")
    with con:
        con.execute(
            "INSERT INTO scan_output (outpoint, txid, vout, amount, script_pubkey, chain, height) "
            "VALUES (?, ?, 0, 500000000, ?, 0, ?)",
            (f"{fake}:0", fake, big.addresses[index].script_pubkey, height),
        )
    con.close()
    with pytest.raises(VerificationFailed, match=f"{fake}:0 is not on the chain"):
        big.sync()
    assert big.balance(account) == start
    assert deposits.list_deposits(big.db, account=account) == []
