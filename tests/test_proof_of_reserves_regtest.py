"""``custody audit reserves --proof`` against a real node: the proof at a past height is what
the node itself scans there, and BitMEX's ``validate_reserves.py`` proves its amount.

These tests rewind their node (``invalidateblock``), as BitMEX's validator does, so they run
a node of their own rather than the session's. BitMEX's validator runs when
``BITMEX_POR_DIR`` names a checkout of ``BitMEX/proof-of-reserves-liabilities`` and
``BITMEX_PYTHON`` a Python with its requirements (scripts/bitmex-validators.sh says how).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from custody.bitcoin.amounts import sats_from_btc
from custody.chain.regtest import NodeInfo, start_node, stop_node
from custody.chain.rpc import RpcClient
from custody.errors import CustodyError
from tests.conftest import fund_wallet
from tests.withdraw_support import Shop

pytestmark = pytest.mark.regtest

BITMEX = os.environ.get("BITMEX_POR_DIR")
BITMEX_PYTHON = os.environ.get("BITMEX_PYTHON")


@pytest.fixture(scope="module")
def own_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeInfo]:
    datadir = tmp_path_factory.mktemp("reserves-node")
    try:
        node = start_node(datadir)
    except CustodyError as e:
        pytest.fail(f"the regtest node could not start: {e}", pytrace=False)
    try:
        yield node
    finally:
        stop_node(datadir)


@pytest.fixture(scope="module")
def own_wallet(own_node: NodeInfo) -> RpcClient:
    return fund_wallet(own_node.client(), "reserves")


def _send(shop: Shop, amount: str) -> int:
    """A withdrawal requested, approved, signed by two founders and broadcast; its id."""
    wid = shop.approved(amount)
    psbt = shop.export(wid)
    for founder in ("founder-a", "founder-b"):
        out = shop.tmp / f"w{wid}-{founder}.psbt"
        shop.sign(psbt, founder, out)
        shop.ok("withdraw", "import", str(wid), str(out))
    shop.ok("withdraw", "finalize", str(wid))
    shop.ok("withdraw", "broadcast", str(wid))
    return wid


def _scan(rpc: RpcClient, descriptors: list[Any]) -> dict[str, Any]:
    result = rpc.call("scantxoutset", "start", descriptors)
    assert result["success"] is True
    return dict(result)


class Rewound:
    """The node's chain cut back to ``height`` (its later blocks invalidated), then restored."""

    def __init__(self, rpc: RpcClient, height: int) -> None:
        self.rpc, self.height = rpc, height
        self.tip = rpc.call("getblockcount")
        self.next = rpc.call("getblockhash", height + 1)

    def __enter__(self) -> Rewound:
        self.rpc.call("invalidateblock", self.next)
        assert self.rpc.call("getblockcount") == self.height
        return self

    def __exit__(self, *exc: object) -> None:
        self.rpc.call("reconsiderblock", self.next)
        assert self.rpc.call("getblockcount") == self.tip


def _bitmex_reserves(node: NodeInfo, proof: Path) -> tuple[int, str]:
    """Run BitMEX's validate_reserves.py on ``proof`` against the node; (exit code, its output)."""
    assert BITMEX and BITMEX_PYTHON
    cookie = node.cookie_file.read_text().strip()
    url = f"regtest://{cookie}@127.0.0.1:{node.rpc_port}"
    script = str(Path(BITMEX) / "validate_reserves.py")
    run = subprocess.run(
        [BITMEX_PYTHON, script, "--proof", str(proof), "--bitcoin", url], capture_output=True, text=True, timeout=300
    )
    back = subprocess.run(
        [BITMEX_PYTHON, script, "--reconsider", "--bitcoin", url], capture_output=True, text=True, timeout=300
    )
    assert back.returncode == 0, back.stderr
    return run.returncode, run.stdout + run.stderr


@pytest.mark.parametrize("script", ["p2wsh", "p2sh-p2wsh", "p2sh"])
def test_the_reserves_proof_at_a_past_height_is_what_the_node_scans_there(
    tmp_path: Path, own_node: NodeInfo, own_wallet: RpcClient, script: str
) -> None:
    shop = Shop(tmp_path, own_node, own_wallet, script=script)
    rpc = shop.rpc
    shop.deposit("acct-1", "0.2", count=3)
    shop.deposit("acct-2", "0.1")
    _send(shop, "0.05")  # spends some of ours, pays change to a change address
    shop.mine(1)
    shop.ok("sync")
    height = rpc.call("getblockcount")
    published = shop.ok("audit", "liabilities", "--out", str(tmp_path / "l.txt"), "--nonces", str(tmp_path / "n"))
    assert published["height"] == height
    at_tip = shop.ok("audit", "reserves", "--proof", str(tmp_path / "tip.yaml"))
    assert at_tip["ok"] and at_tip["height"] == height

    # after the height: more of ours spent, a new deposit, more blocks
    _send(shop, "0.12")
    shop.mine(1)
    shop.ok("sync")
    shop.deposit("acct-3", "0.05")
    shop.mine(3)
    proof = tmp_path / "reserves.yaml"
    past = shop.ok("audit", "reserves", "--proof", str(proof), "--height", str(height))
    assert past["ok"] and past["height"] == height and past["tip_height"] == height + 5
    assert past["block_hash"] == rpc.call("getblockhash", height)
    assert past["reserves_sat"] == at_tip["reserves_sat"] and past["liabilities_sat"] == published["root"]["value_sat"]
    doc = json.loads(proof.read_text())
    assert doc == json.loads((tmp_path / "tip.yaml").read_text())  # the same proof as made at the time
    assert shop.ok("audit", "reserves")["reserves_sat"] != past["reserves_sat"]  # the tip holds other coins
    assert doc["chain"] == "regtest" and doc["claim"] == {"m": 2, "n": 3} and doc["height"] == height
    assert doc["total"] == sum(a["balance"] for a in doc["address"]) == past["reserves_sat"]
    founders = shop.ok("policy", "show")["founders"]
    assert sorted(doc["xpub"]) == sorted(f["xpub"].split("]")[-1] for f in founders)
    kind = {"p2wsh": "multisig_wsh", "p2sh-p2wsh": "multisig_sh_wsh", "p2sh": "multisig_sh"}[script]
    assert {a["addr_type"] for a in doc["address"]} == {kind} and len(doc["address"]) >= 4
    manifest = shop.c.home / "founders-manifest.json"
    assert shop.ok("verify", "reserves", str(proof), "--manifest", str(manifest))["total_sat"] == doc["total"]

    with Rewound(rpc, height):
        for entry in doc["address"]:  # each descriptor, as the node derives and scans it
            found = _scan(rpc, [entry["script"]])
            assert found["bestblock"] == doc["block_hash"] and found["height"] == height
            assert sats_from_btc(found["total_amount"]) == entry["balance"] > 0
            derived = rpc.call("deriveaddresses", entry["script"])
            spk = rpc.call("validateaddress", derived[0])["scriptPubKey"]
            assert len(derived) == 1 and {u["scriptPubKey"] for u in found["unspents"]} == {spk}
        whole = _scan(rpc, [a["script"] for a in doc["address"]])
        assert sats_from_btc(whole["total_amount"]) == doc["total"]
        # nothing of ours is missing: every address of both ranged descriptors, scanned at the height
        ranged = shop.ok("policy", "descriptors")
        everything = _scan(rpc, [{"desc": d, "range": 50} for d in (ranged["receive"], ranged["change"])])
        assert sats_from_btc(everything["total_amount"]) == doc["total"]

    if BITMEX and BITMEX_PYTHON:
        code, said = _bitmex_reserves(own_node, proof)
        print(said)
        assert code == 0, said
        proven = re.search(r"Proven amount\(sats\): (\d+)", said)
        assert proven and int(proven.group(1)) == doc["total"], said
        assert f"Block proven against: {doc['block_hash']}" in said
        assert rpc.call("getblockcount") == height + 5


def test_an_address_row_pointed_at_someone_elses_coins_is_not_counted(
    tmp_path: Path, own_node: NodeInfo, own_wallet: RpcClient
) -> None:
    """An insider points a stored address (no coins) at a script of the node's wallet holding 1 coin."""
    shop = Shop(tmp_path, own_node, own_wallet)
    shop.deposit("acct-1", "0.2")
    (spare,) = shop.ok("address", "new", "--account", "acct-1")
    theirs = own_wallet.call("getnewaddress", "", "bech32")
    foreign = own_wallet.call("getaddressinfo", theirs)["scriptPubKey"]
    own_wallet.call("sendtoaddress", theirs, Decimal("1"))
    shop.mine(1)
    con = sqlite3.connect(shop.c.home / "custody.db")
    with con:
        con.execute("UPDATE address SET script_pubkey = ? WHERE address = ?", (foreign, spare["address"]))
    con.close()
    proof = tmp_path / "reserves.yaml"
    result = shop.cli("audit", "reserves", "--proof", str(proof), "--json")
    assert result.exit_code == 3 and "not the policy's" in result.stderr
    report = json.loads(result.stdout)
    assert report["reserves_sat"] == 20_000_000 and len(report["unproven"]) == 1
    assert spare["address"] in report["unproven"][0] and "100000000 sat are not counted" in report["unproven"][0]
    assert [a["balance"] for a in json.loads(proof.read_text())["address"]] == [20_000_000]
    assert shop.cli("halt", "status").exit_code == 3


def test_a_past_height_compares_with_the_liabilities_published_there(
    tmp_path: Path, own_node: NodeInfo, own_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, own_node, own_wallet)
    shop.deposit("acct-1", "0.2")
    height = shop.rpc.call("getblockcount")
    shop.mine(2)
    nothing = shop.cli("audit", "reserves", "--height", str(height))
    assert nothing.exit_code == 2 and f"no liabilities were published at height {height}" in nothing.stderr
    above = shop.cli("audit", "reserves", "--height", str(height + 100))
    assert above.exit_code == 2 and "is not on the chain" in above.stderr
    # liabilities published (at the tip) that the coins at that height do not cover
    con = sqlite3.connect(shop.c.home / "custody.db")
    with con:
        con.execute("UPDATE ledger_account SET balance = balance - 5 WHERE key = 'customer:acct-1'")
    con.close()
    tip = shop.rpc.call("getblockcount")
    published = shop.ok("audit", "liabilities", "--out", str(tmp_path / "l.txt"), "--nonces", str(tmp_path / "n"))
    assert published["root"]["value_sat"] == 20_000_005 and published["height"] == tip
    shop.mine(3)
    short = shop.cli("audit", "reserves", "--height", str(tip), "--json")
    assert short.exit_code == 3 and "short of liabilities by 5 sat" in short.stderr
    report = json.loads(short.stdout)
    assert (
        report["liabilities_sat"] == 20_000_005 and report["published_liabilities"][0]["root_value_sat"] == 20_000_005
    )
    assert report["ledger_liabilities_sat"] is None  # below the tip, only what was published counts
