"""``custody node fund`` and ``custody node mine``: a demo store is no dead end, on the embedded
chain (blocks validated by libbitcoinkernel) and on a node custody started; and the node's own
CLI is reached the way the README says."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from custody.chain.regtest import stop_node
from tests.support import Custody, founders


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Custody]:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    try:
        yield c
    finally:
        stop_node(tmp_path / "home" / "node")


def _fund_and_sync(c: Custody) -> tuple[dict[str, object], str]:
    (issued,) = c.json("address", "new", "--account", "acct-1")
    funded = c.json("node", "fund", issued["address"], "0.25")
    assert funded["amount_sat"] == 25_000_000 and funded["address"] == issued["address"]
    credited = c.json("sync")
    deposit = [d for d in credited if d.get("account") == "acct-1"]
    assert len(deposit) == 1 and deposit[0]["outpoint"].startswith(funded["txid"] + ":")
    balance = c.json("ledger", "balance", "acct-1")
    assert json.dumps(balance).count("25000000") >= 1
    return funded, issued["address"]


def test_fund_and_mine_on_the_embedded_chain(store: Custody) -> None:
    store.env["CUSTODY_CHAIN"] = "embedded"
    _fund_and_sync(store)
    mined = store.json("node", "mine", "3")
    assert len(mined["blocks"]) == 3 and mined["height"] >= 104
    # refusals: a mainnet address, a zero amount, a silly block count
    wrong = store("node", "fund", "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "1")
    assert wrong.exit_code == 2, wrong.output
    assert store("node", "fund", "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080", "0").exit_code == 2
    assert store("node", "mine", "0").exit_code == 2
    # more than the faucet can ever give at once
    assert store("node", "fund", "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080", "5000").exit_code == 2


@pytest.mark.regtest
def test_fund_and_mine_on_the_node_and_its_own_cli(store: Custody) -> None:
    assert store("node", "start").exit_code == 0
    funded, address = _fund_and_sync(store)
    # the node itself, through its own CLI as the README says (custody's -conf, and -datadir)
    datadir = (store.home / "node").resolve()
    binary = shutil.which("litecoin-cli") or shutil.which("bitcoin-cli")
    assert binary is not None
    base = [binary, f"-conf={datadir / 'custody-node.conf'}", f"-datadir={datadir}"]
    tx = json.loads(
        subprocess.run(
            [*base, "getrawtransaction", str(funded["txid"]), "true"], check=True, capture_output=True, text=True
        ).stdout
    )
    assert tx["confirmations"] == 1
    (issued,) = store.json("address", "list")
    paid = [o for o in tx["vout"] if o["scriptPubKey"]["hex"] == issued["script_pubkey"]]
    assert len(paid) == 1 and Decimal(str(paid[0]["value"])) == Decimal("0.25")
    height = int(subprocess.run([*base, "getblockcount"], check=True, capture_output=True, text=True).stdout)
    mined = store.json("node", "mine", "2", "--to", address)
    assert mined["height"] == height + 2
