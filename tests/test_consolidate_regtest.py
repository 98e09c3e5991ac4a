"""Consolidation of many small deposits, against the real regtest node.

The issue asks for 1,000 deposits; 300 here, made by ONE funding transaction with 300 outputs,
keep the suite fast: the coin selection's standardness bound (weight under 400,000, which
binds near 950 inputs of a 2-of-3 p2wsh) is shown on 2,000 coins by tests/test_selftransfer.py.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from bitcoin.core import CMutableTransaction

from custody.bitcoin import psbt as psbt_lib
from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from tests.support import read_psbt
from tests.withdraw_support import Shop

pytestmark = pytest.mark.regtest
DEPOSITS = 300


def test_three_hundred_deposits_consolidated_in_one_self_transfer(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    issued = shop.ok("address", "new", "--account", "acct-1", "--count", str(DEPOSITS))
    payments = {}
    for a in issued:
        decoded = shop.rpc.call("decodescript", a["script_pubkey"])
        payments[decoded.get("address") or decoded["addresses"][0]] = Decimal("0.0001")
    funding = funded_wallet.call("sendmany", "", payments)
    assert len(shop.rpc.call("getrawtransaction", funding, True)["vout"]) == DEPOSITS + 1
    shop.mine(1)
    shop.ok("sync")
    coins = shop.ok("utxo", "list")
    assert len(coins) == DEPOSITS and {c["amount_sat"] for c in coins} == {10_000}
    asset = shop.ok("ledger", "balance", "asset:onchain")["balance_sat"]

    made = shop.ok("utxo", "consolidate", "--max-inputs", "250", "--fee-rate", "1", *shop.as_("carol"))
    cid = made["id"]
    assert made["withdrawal_kind"] == "consol" and len(made["inputs"]) == 250
    assert [o["change"] for o in made["outputs"]] == [True]
    assert {c["reserved_by"] for c in shop.ok("utxo", "list")} == {cid, None}

    for who in ("alice", "bob"):
        assert shop.approve(cid, who).exit_code == 0
    # An insider sends the merged coins elsewhere: the signer re-derives every output, and refuses.
    path = shop.export(cid)
    p = psbt_lib.Psbt.parse(read_psbt(path))
    tx = CMutableTransaction.from_tx(p.tx)
    tx.vout[0].scriptPubKey = bytes.fromhex("0014" + "22" * 20)
    p.tx = tx
    p.outputs[0].bip32_derivations = {}
    forged = tmp_path / "forged.psbt"
    forged.write_text(p.to_base64() + "\n")
    refused = shop.sign(forged, "founder-a")
    assert refused.exit_code != 0 and "change" in refused.stderr, refused.output

    for founder in ("founder-a", "founder-b"):
        out = tmp_path / f"{founder}.psbt"
        assert shop.sign(path, founder, out).exit_code == 0
        shop.ok("withdraw", "import", str(cid), str(out))
    shop.ok("withdraw", "finalize", str(cid))
    txid = shop.ok("withdraw", "broadcast", str(cid))["txid"]
    decoded = shop.rpc.call("getrawtransaction", txid, True)
    assert decoded["weight"] < 400_000 and len(decoded["vin"]) == 250
    shop.mine(1)
    shop.ok("sync")
    assert shop.ok("withdraw", "show", str(cid))["status"] == "confirmed"
    after = shop.ok("utxo", "list")
    assert len(after) == DEPOSITS - 250 + 1 and all(c["reserved_by"] is None for c in after)
    assert shop.ok("ledger", "balance", "asset:onchain")["balance_sat"] == asset - made["fee_sat"]
    assert sum(c["amount_sat"] for c in after) == asset - made["fee_sat"]
    assert shop.cli("audit", "ledger").exit_code == 0
    assert json.loads(shop.c("ledger", "balance", "acct-1", "--json").stdout)["balance_sat"] == DEPOSITS * 10_000
