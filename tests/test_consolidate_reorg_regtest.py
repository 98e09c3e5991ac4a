"""A consolidation followed through the chain's reorganisations and a foreign double spend,
against the real regtest node, with the sync killed at its worst moments.

A consolidation spends custody's own coins into one fresh change address: nothing is held from
a customer, so its only ledger posting is its network fee (booked when it confirms, reversed
when a reorganisation takes it out). What the chain shows of its coins must match the ledger
at every step: the coins it spent are neither counted twice nor lost.

One store serves the module; each test deposits coins smaller than any earlier one, so that
``utxo consolidate`` picks exactly them.
"""

from __future__ import annotations

from typing import Any

import pytest

from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from tests.support import run_cli
from tests.withdraw_support import Shop, balance, double_spend, foreign_spend, in_mempool, postings, reserved, synced

pytestmark = pytest.mark.regtest
KILLED = -9
FEES = "expense:network-fees"
ASSET = "asset:onchain"


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, regtest_node: NodeInfo, funded_wallet: RpcClient) -> Shop:
    return Shop(tmp_path_factory.mktemp("consolidate-reorg"), regtest_node, funded_wallet)


def signed_consolidation(shop: Shop, btc: str) -> dict[str, Any]:
    """Three fresh deposits of ``btc`` each, consolidated: requested, approved, signed by two
    founders offline, imported and finalized (not broadcast)."""
    shop.deposit("acct-c", btc, count=3)
    made = shop.ok("utxo", "consolidate", "--max-inputs", "3", "--fee-rate", "1", *shop.as_("carol"))
    cid = made["id"]
    for who in ("alice", "bob"):
        assert shop.approve(cid, who).exit_code == 0
    path = shop.export(cid)
    for founder in ("founder-a", "founder-b"):
        out = shop.tmp / f"c{cid}-{founder}.psbt"
        assert shop.sign(path, founder, out).exit_code == 0
        shop.ok("withdraw", "import", str(cid), str(out))
    shop.ok("withdraw", "finalize", str(cid))
    return dict(made)


def status(shop: Shop, cid: int) -> str:
    return str(shop.ok("withdraw", "show", str(cid))["status"])


def coins(shop: Shop) -> dict[str, Any]:
    """The chain's unspent outputs at custody's addresses: outpoint -> who holds it."""
    return {c["outpoint"]: c["reserved_by"] for c in shop.ok("utxo", "list")}


def on_chain(shop: Shop) -> int:
    return sum(c["amount_sat"] for c in shop.ok("utxo", "list"))


FOLLOWED = ("withdrawal.broadcast", "withdrawal.confirmed", "withdrawal.reorged", "withdrawal.failed")


def events(shop: Shop, cid: int) -> list[tuple[str, str]]:
    """The audit log's entries of the consolidation on the chain: (event, actor)."""
    log = shop.ok("audit", "log")
    return [
        (e["event"], e["actor"]) for e in log if e["payload"].get("withdrawal_id") == cid and e["event"] in FOLLOWED
    ]


def spender(shop: Shop, outpoints: set[str]) -> str:
    """The node's mempool transaction that spends ``outpoints`` (asked of the node, not of us)."""
    for txid in shop.rpc.call("getrawmempool"):
        vin = shop.rpc.call("getrawtransaction", txid, True)["vin"]
        if {f"{i['txid']}:{i['vout']}" for i in vin} == outpoints:
            return str(txid)
    raise AssertionError("no transaction in the mempool spends them")


def test_a_consolidation_is_followed_through_a_reorg_and_its_fee_booked_once(shop: Shop) -> None:
    made = signed_consolidation(shop, "0.001")
    cid, fee = made["id"], made["fee_sat"]
    spent = {i["outpoint"] for i in made["inputs"]}
    fees = balance(shop, FEES)
    assert balance(shop, ASSET) == on_chain(shop), "this store's asset is what the chain shows it holds"

    # killed after the node took it, before the store recorded it: the next sync alone records it
    killed = run_cli(shop.c.env, "withdraw", "broadcast", str(cid), crash_at="withdrawal.sent")
    assert killed.returncode == KILLED
    assert status(shop, cid) == "signed"
    txid = spender(shop, spent)
    assert synced(shop, {cid}) == [(cid, "broadcast")]
    assert shop.ok("withdraw", "show", str(cid))["txid"] == txid

    shop.mine(1)
    killed = run_cli(shop.c.env, "sync", "--json", crash_at="sync.settled")
    assert killed.returncode == KILLED
    assert status(shop, cid) == "broadcast" and sorted(reserved(shop, cid)) == sorted(spent)
    assert balance(shop, FEES) == fees and postings(shop, cid) == []  # nothing half-written
    assert synced(shop, {cid}) == [(cid, "confirmed")]
    assert balance(shop, FEES) == fees + fee and reserved(shop, cid) == []
    held = coins(shop)
    assert not spent & set(held) and f"{txid}:0" in held
    assert balance(shop, ASSET) == on_chain(shop)

    block = shop.rpc.call("getrawtransaction", txid, True)["blockhash"]
    shop.rpc.call("invalidateblock", block)  # the consolidation is back in the mempool
    assert in_mempool(shop, txid)
    killed = run_cli(shop.c.env, "sync", "--json", crash_at="sync.reorged")
    assert killed.returncode == KILLED
    assert status(shop, cid) == "confirmed" and balance(shop, FEES) == fees + fee and reserved(shop, cid) == []
    assert synced(shop, {cid}) == [(cid, "broadcast")]
    # its coins are the chain's again, held by it (it may confirm again): once each, none lost
    assert sorted(reserved(shop, cid)) == sorted(spent)
    assert {o: coins(shop).get(o) for o in spent} == dict.fromkeys(spent, cid) and f"{txid}:0" not in coins(shop)
    assert balance(shop, FEES) == fees and balance(shop, ASSET) == on_chain(shop)
    assert shop.ok("audit", "ledger")["ok"] is True
    assert synced(shop, {cid}) == []  # reversed once, not on every sync

    shop.rpc.call("reconsiderblock", block)
    assert synced(shop, {cid}) == [(cid, "confirmed")]
    assert balance(shop, FEES) == fees + fee and balance(shop, ASSET) == on_chain(shop)
    assert postings(shop, cid) == ["selftransfer.settled", "selftransfer.unsettled", "selftransfer.settled"]
    assert events(shop, cid) == [  # each step once, by the sync that did it
        ("withdrawal.broadcast", "sync"),
        ("withdrawal.confirmed", "sync"),
        ("withdrawal.reorged", "sync"),
        ("withdrawal.confirmed", "sync"),
    ]
    assert shop.ok("audit", "ledger")["ok"] is True


def test_a_signed_consolidation_double_spent_by_a_foreign_transaction_fails_at_depth(shop: Shop) -> None:
    made = signed_consolidation(shop, "0.0005")
    cid = made["id"]
    spent = [i["outpoint"] for i in made["inputs"]]
    fees, asset = balance(shop, FEES), balance(shop, ASSET)

    foreign = double_spend(shop, cid, shop.rpc)  # an insider with two founders' keys takes its first coin
    refused = shop.c("withdraw", "broadcast", str(cid), "--json")
    assert refused.exit_code != 0 and status(shop, cid) == "signed", refused.output
    assert synced(shop, {cid}) == []  # in the mempool only: no proof
    for depth in range(1, 6):  # 1 .. CUSTODY_REFUND_CONFIRMATIONS - 1: a reorg could still undo it
        shop.mine(1)
        assert synced(shop, {cid}) == [], depth
        assert status(shop, cid) == "signed" and sorted(reserved(shop, cid)) == sorted(spent)

    shop.mine(1)  # 6 deep: the proof is in
    killed = run_cli(shop.c.env, "sync", "--json", crash_at="sync.refunded")
    assert killed.returncode == KILLED
    assert status(shop, cid) == "signed" and sorted(reserved(shop, cid)) == sorted(spent)
    assert ("withdrawal.failed", "sync") not in events(shop, cid)
    assert synced(shop, {cid}) == [(cid, "failed")]
    failed = shop.ok("withdraw", "show", str(cid))
    assert foreign in failed["reason"] and "6 confirmations" in failed["reason"]
    # the inputs' true state is the chain's: the one it took is gone, the others free again
    held = coins(shop)
    assert spent[0] not in held and {o: held.get(o, "gone") for o in spent[1:]} == dict.fromkeys(spent[1:])
    assert reserved(shop, cid) == []
    told = [e for e in shop.ok("audit", "log") if e["event"] == "withdrawal.failed"][-1]
    assert told["actor"] == "sync" and told["payload"]["withdrawal_id"] == cid
    assert told["payload"]["spent_by"] == foreign and told["payload"]["refunded"] == 0
    assert postings(shop, cid) == []  # it held nothing, and paid no fee of ours
    assert balance(shop, FEES) == fees and balance(shop, ASSET) == asset
    shop.mine(1)
    assert synced(shop, {cid}) == []  # failed is final: once
    assert shop.ok("audit", "ledger")["ok"] is True


def test_a_reorg_then_a_foreign_spend_in_the_new_chain_fails_the_consolidation_once(shop: Shop) -> None:
    made = signed_consolidation(shop, "0.0002")
    cid, fee = made["id"], made["fee_sat"]
    spent = [i["outpoint"] for i in made["inputs"]]
    txid = shop.ok("withdraw", "broadcast", str(cid))["txid"]
    shop.mine(1)
    assert synced(shop, {cid}) == [(cid, "confirmed")]
    fees = balance(shop, FEES)
    block = shop.rpc.call("getrawtransaction", txid, True)["blockhash"]

    # the block goes; the chain that replaces it carries another spend of its first coin
    shop.rpc.call("invalidateblock", block)
    to = shop.wallet.call("getnewaddress", "", "bech32")
    shop.rpc.call("generateblock", to, [foreign_spend(shop, cid)])
    assert not in_mempool(shop, txid)
    assert synced(shop, {cid}) == [(cid, "broadcast")]
    assert balance(shop, FEES) == fees - fee and sorted(reserved(shop, cid)) == sorted(spent)
    shop.mine(4)
    assert synced(shop, {cid}) == []
    shop.mine(1)
    assert synced(shop, {cid}) == [(cid, "failed")]
    held = coins(shop)
    assert spent[0] not in held and {o: held.get(o, "gone") for o in spent[1:]} == dict.fromkeys(spent[1:])
    assert f"{txid}:0" not in held
    assert postings(shop, cid) == ["selftransfer.settled", "selftransfer.unsettled"]
    assert balance(shop, FEES) == fees - fee
    assert [e for e, _ in events(shop, cid)] == [
        "withdrawal.broadcast",
        "withdrawal.confirmed",
        "withdrawal.reorged",
        "withdrawal.failed",
    ]
    assert shop.ok("audit", "ledger")["ok"] is True
