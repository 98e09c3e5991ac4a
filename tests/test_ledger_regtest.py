"""The ledger, deposits and the audits against the real regtest node, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import coincurve
import pytest
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, b2x, lx

from custody.bitcoin import psbt as psbt_lib
from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from custody.identity.keyfile import open_founder_key
from tests.support import PASSPHRASE
from tests.withdraw_support import Shop

pytestmark = pytest.mark.regtest


def _balance(shop: Shop, account: str) -> int:
    return int(shop.ok("ledger", "balance", account)["balance_sat"])


def _totals(shop: Shop) -> dict[str, int]:
    return dict(shop.ok("ledger", "balance")["totals"])


def _audited(shop: Shop) -> dict[str, Any]:
    report = shop.ok("audit", "ledger")
    assert report["ok"] and report["total_sat"] == 0, report["problems"]
    return dict(report)


def _requested(shop: Shop, amount: str, account: str = "acct-1") -> dict[str, Any]:
    result = shop.request(shop.destination()[0], amount, account=account)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def _approve(shop: Shop, wid: int) -> None:
    assert shop.approve(wid, "alice").exit_code == 0
    assert shop.approve(wid, "bob").exit_code == 0


def _sign_and_send(shop: Shop, wid: int) -> dict[str, Any]:
    psbt = shop.tmp / f"w{wid}.psbt"
    assert shop.cli("withdraw", "export", str(wid), str(psbt)).exit_code == 0
    for founder in ("founder-a", "founder-b"):
        out = shop.tmp / f"w{wid}-{founder}.psbt"
        assert shop.sign(psbt, founder, out).exit_code == 0
        shop.ok("withdraw", "import", str(wid), str(out))
    shop.ok("withdraw", "finalize", str(wid))
    return dict(shop.ok("withdraw", "broadcast", str(wid)))


def test_every_withdrawal_flow_posts_balanced_entries(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.2", count=4)
    shop.deposit("acct-2", "0.1")
    assert (_balance(shop, "acct-1"), _balance(shop, "acct-2")) == (80_000_000, 10_000_000)
    assert _totals(shop)["asset_sat"] == 90_000_000
    _audited(shop)

    # requested: amount + fee held; cancelled: released
    w = _requested(shop, "0.01")
    held = f"held:withdrawal-{w['id']}"
    assert _balance(shop, "acct-1") == 80_000_000 - 1_000_000 - w["fee_sat"]
    assert _balance(shop, held) == 1_000_000 + w["fee_sat"]
    _audited(shop)
    assert shop.cli("withdraw", "cancel", str(w["id"]), "--reason", "test", *shop.as_("alice")).exit_code == 0
    assert (_balance(shop, "acct-1"), _balance(shop, held)) == (80_000_000, 0)
    _audited(shop)

    # a single withdrawal to confirmation: broadcast moves nothing, confirmation settles
    w = _requested(shop, "0.015")
    _approve(shop, w["id"])
    before = _totals(shop)
    assert _sign_and_send(shop, w["id"])["status"] == "broadcast"
    assert _totals(shop) == before
    shop.mine(1)
    assert [s["status"] for s in shop.ok("sync")] == ["confirmed"]
    totals = _totals(shop)
    assert totals["asset_sat"] == 90_000_000 - 1_500_000 - w["fee_sat"]
    assert totals["held_sat"] == 0 and totals["network_fees_sat"] == totals["fee_income_sat"] == w["fee_sat"]
    assert _balance(shop, "acct-1") == 80_000_000 - 1_500_000 - w["fee_sat"]
    _audited(shop)

    # a batch: created moves the holds, settled pays less fee (a batch's cancel is a double-spend:
    # tests/test_attack_cancel_approved.py)
    members = [_requested(shop, "0.01"), _requested(shop, "0.02"), _requested(shop, "0.03", account="acct-2")]
    for m in members:
        _approve(shop, m["id"])
    customers = _totals(shop)["customers_sat"]
    batch = shop.ok("withdraw", "batch", *shop.as_("dave"))
    charged = sum(m["amount_sat"] + m["fee_sat"] for m in members)
    assert _balance(shop, f"held:withdrawal-{batch['id']}") == charged
    assert all(_balance(shop, f"held:withdrawal-{m['id']}") == 0 for m in members)
    _audited(shop)
    _sign_and_send(shop, batch["id"])
    shop.mine(1)
    shop.ok("sync")
    totals = _totals(shop)
    assert totals["customers_sat"] == customers and totals["held_sat"] == 0
    saved = sum(m["fee_sat"] for m in members) - batch["fee_sat"]
    assert saved > 0 and totals["fee_savings_sat"] == saved
    report = _audited(shop)
    assert report["transactions"] == 5 + 2 + 2 + 3 + 1 + 1  # credits, cancel, single, batch...

    # everything synced: the ledger's coins are the chain's, and the surplus is what batching saved
    reserves = shop.ok("audit", "reserves")
    assert reserves["ok"] and reserves["reserves_sat"] == totals["asset_sat"]
    assert reserves["liabilities_sat"] == totals["liabilities_sat"] and reserves["difference_sat"] == saved
    entries = shop.ok("ledger", "entries", "--account", f"held:withdrawal-{batch['id']}")
    assert [e["event"] for e in entries] == ["batch.created", "withdrawal.settled"]


def test_a_withdrawal_above_the_customers_balance_is_refused(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.1")
    shop.deposit("acct-2", "0.5")  # the coins would cover it; acct-1's balance does not
    refused = shop.request(shop.destination()[0], "0.2", account="acct-1")
    assert refused.exit_code == 2
    assert "'acct-1' has a balance of 0.10000000 BTC (10000000 sat)" in refused.stderr
    assert "withdrawing 0.20000000 BTC (20000000 sat) plus the fee of" in refused.stderr
    exact = shop.request(shop.destination()[0], "0.1", account="acct-1")  # the fee does not fit either
    assert exact.exit_code == 2 and "plus the fee of" in exact.stderr
    assert shop.ok("withdraw", "list") == []
    assert _balance(shop, "acct-1") == 10_000_000
    assert _requested(shop, "0.09", account="acct-1")["status"] == "requested"


def test_deposits_are_credited_at_the_confirmation_depth(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.c.env["CUSTODY_DEPOSIT_CONFIRMATIONS"] = "3"
    shop.deposit("acct-1", "0.25")  # mined one block deep, synced
    (dep,) = shop.ok("ledger", "deposits")
    assert dep["status"] == "pending" and dep["confirmations"] == 1
    assert _balance(shop, "acct-1") == 0
    refused = shop.request(shop.destination()[0], "0.01")
    assert refused.exit_code == 2 and "balance of 0" in refused.stderr
    shop.mine(1)
    assert shop.ok("sync") == [] and _balance(shop, "acct-1") == 0
    shop.mine(1)
    (credited,) = shop.ok("sync")
    assert credited["record"] == "deposit" and credited["status"] == "credited" and credited["confirmations"] == 3
    assert _balance(shop, "acct-1") == 25_000_000
    shop.mine(1)
    assert shop.ok("sync") == [] and _balance(shop, "acct-1") == 25_000_000
    _audited(shop)
    # sync no longer rewrites a credited row, yet the views count from the tip sync last read
    shop.mine(2)
    assert shop.ok("sync") == []
    tip = shop.rpc.call("getblockcount")
    (now,) = shop.ok("ledger", "deposits")
    assert now["confirmations"] == tip - now["height"] + 1 == 6


def test_a_reorg_reverses_a_credited_deposit_and_halts_when_it_leaves_the_customer_owing(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.3")
    (dep,) = shop.ok("ledger", "deposits")
    w = _requested(shop, "0.25")  # held: the customer has 0.05 - fee left
    txid = dep["outpoint"].split(":")[0]
    block = shop.rpc.call("getrawtransaction", txid, True)["blockhash"]
    shop.rpc.call("invalidateblock", block)
    try:
        assert txid in shop.rpc.call("getrawmempool")
        synced = shop.cli("sync", "--json")
        assert synced.exit_code == 3, synced.output  # recorded, and trading halted
        (reversed_,) = [d for d in json.loads(synced.stdout) if d["record"] == "deposit"]
        assert reversed_["status"] == "reversed" and reversed_["halt_id"]
        assert "'acct-1' went negative" in synced.stderr
        owed = 30_000_000 - 25_000_000 - w["fee_sat"] - 30_000_000
        assert _balance(shop, "acct-1") == owed < 0
        status = shop.cli("halt", "status", "--json")
        assert status.exit_code == 3
        (halt,) = json.loads(status.stdout)["halts"]
        assert halt["source"] == "ledger" and "'acct-1'" in halt["reason"]
        entries = shop.ok("ledger", "entries", "--account", "acct-1")
        assert [(e["event"], e["debit_sat"]) for e in entries][-1] == ("deposit.reversed", 30_000_000)
        report = _audited(shop)  # balanced: the reversal is in the books, not hidden
        assert report["warnings"] == [f"account 'acct-1' is negative: {owed} sat"]
    finally:
        shop.rpc.call("reconsiderblock", block)
    assert txid not in shop.rpc.call("getrawmempool")
    again = [d for d in shop.ok("sync") if d["record"] == "deposit"]
    assert [(d["status"], d["change"]) for d in again] == [("credited", "credited")]
    assert _balance(shop, "acct-1") == 30_000_000 - 25_000_000 - w["fee_sat"]
    _audited(shop)


def test_reserves_short_after_an_outside_spend_halt_trading(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    (issued,) = shop.deposit("acct-1", "0.2")
    (dep,) = shop.ok("ledger", "deposits")
    reserves = shop.ok("audit", "reserves")
    assert reserves["ok"] and reserves["reserves_sat"] == reserves["liabilities_sat"] == 20_000_000
    assert reserves["difference_sat"] == 0 and reserves["tip_height"] == shop.rpc.call("getblockcount")

    # two founders sign a spend of the deposit outside custody (no request, no approvals)
    txid, vout = dep["outpoint"].split(":")
    _, node_address = shop.destination()
    dest = bytes.fromhex(shop.wallet.call("getaddressinfo", node_address)["scriptPubKey"])
    tx = CMutableTransaction([CMutableTxIn(COutPoint(lx(txid), int(vout)))], [CMutableTxOut(19_990_000, dest)])
    p = psbt_lib.Psbt.from_unsigned_tx(tx)
    p.inputs[0].witness_utxo = psbt_lib.WitnessUtxo(20_000_000, bytes.fromhex(issued["script_pubkey"]))
    p.inputs[0].witness_script = bytes.fromhex(issued["script"])
    keys = {}
    for name in ("founder-a", "founder-b"):
        founder = open_founder_key(shop.founder_keys[name], PASSPHRASE)
        secret = founder.master.derive((*founder.account_path, 0, issued["index"])).secret
        key = coincurve.PrivateKey(secret)
        keys[key.public_key.format(compressed=True)] = key
    assert psbt_lib.sign(p, keys) == 2
    final = psbt_lib.extract(psbt_lib.finalize(p))
    shop.rpc.call("sendrawtransaction", b2x(final.serialize()))
    shop.mine(1)

    assert shop.ok("sync") == []  # spent while confirmed: neither reversed nor credited again
    assert _balance(shop, "acct-1") == 20_000_000
    short = shop.cli("audit", "reserves", "--json")
    assert short.exit_code == 3, short.output
    report = json.loads(short.stdout)
    assert not report["ok"] and report["reserves_sat"] == 0 and report["difference_sat"] == -20_000_000
    assert "short of liabilities by 20000000 sat" in short.stderr and "trading is halted" in short.stderr
    status = shop.cli("halt", "status", "--json")
    assert status.exit_code == 3
    (halt,) = json.loads(status.stdout)["halts"]
    assert halt["source"] == "reserves" and "reserves short by 20000000 sat" in halt["reason"]
    assert shop.request(shop.destination()[0], "0.01").exit_code == 3


def test_a_withdrawal_against_a_ledger_that_does_not_sum_to_zero_is_refused_and_halts(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    import sqlite3

    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.1")
    con = sqlite3.connect(shop.c.home / "custody.db")
    with con:
        con.execute("UPDATE ledger_head SET total = total - 3")
    con.close()
    refused = shop.request(shop.destination()[0], "0.01")
    assert refused.exit_code == 3, refused.output
    assert "ledger imbalance in the posting of withdrawal.requested for withdrawal:1" in refused.stderr
    assert "trading is halted" in refused.stderr
    assert shop.ok("withdraw", "list") == []  # the event rolled back
    status = shop.cli("halt", "status", "--json")
    assert status.exit_code == 3 and json.loads(status.stdout)["halts"][0]["source"] == "ledger"
