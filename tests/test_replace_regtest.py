"""Fee bumps (RBF) and cancels of signed withdrawals, against the real regtest node.

One store serves the module (a key ceremony per test would dominate its time); each test makes
its own withdrawals and compares the ledger before and after.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from bitcoin.core import CMutableTransaction

from custody.bitcoin import psbt as psbt_lib
from custody.chain.regtest import NodeInfo, find_node_binary, start_node, stop_node
from custody.config import Settings
from tests.conftest import fund_wallet
from tests.support import read_psbt, run_cli
from tests.withdraw_support import Shop, balance, double_spend, foreign_spend, in_mempool, postings, reserved, synced

pytestmark = pytest.mark.regtest
KILLED = -9
FEES = "expense:network-fees"


@pytest.fixture(scope="module")
def rbf_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeInfo]:
    """A node of its own that relays replacements: Litecoin Core refuses every replacement
    unless -mempoolreplacement=1 (its default is off; Bitcoin Core honours BIP-125 always)."""
    datadir = tmp_path_factory.mktemp("rbf-node")
    node = start_node(
        datadir, binary=find_node_binary(Settings.load().node_binary), extra_args=["-mempoolreplacement=1"]
    )
    try:
        yield node
    finally:
        stop_node(datadir)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, rbf_node: NodeInfo) -> Shop:
    wallet = fund_wallet(rbf_node.client(), "replace")
    s = Shop(tmp_path_factory.mktemp("replace"), rbf_node, wallet)
    s.deposit("acct-1", "0.5", count=12)
    return s


def request(shop: Shop, amount: str, rate: str) -> int:
    to, _ = shop.destination()
    result = shop.c(
        "withdraw", "request", "--account", "acct-1", "--to", to, "--amount", amount, "--fee-rate", rate,
        *shop.as_("carol"), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["id"])


def approve(shop: Shop, wid: int) -> None:
    for who in ("alice", "bob"):
        result = shop.approve(wid, who)
        assert result.exit_code == 0, result.output


def sign(shop: Shop, wid: int) -> dict[str, Any]:
    """Export, two founders sign offline, import both, finalize."""
    psbt = shop.export(wid)
    for founder in ("founder-a", "founder-b"):
        out = shop.tmp / f"w{wid}-{founder}.psbt"
        signed = shop.sign(psbt, founder, out)
        assert signed.exit_code == 0, signed.output
        shop.ok("withdraw", "import", str(wid), str(out))
    return dict(shop.ok("withdraw", "finalize", str(wid)))


def broadcast(shop: Shop, wid: int) -> str:
    sent = shop.ok("withdraw", "broadcast", str(wid))
    assert sent["status"] == "broadcast"
    return str(sent["txid"])


def sent_at_1(shop: Shop, amount: str = "0.01") -> tuple[int, str]:
    """A withdrawal approved, signed and broadcast at 1 sat/vB."""
    wid = request(shop, amount, "1")
    approve(shop, wid)
    sign(shop, wid)
    return wid, broadcast(shop, wid)


def test_a_bump_replaces_the_original_and_the_ledger_charges_one_fee(shop: Shop) -> None:
    settle_others(shop)
    customer, fees = balance(shop, "acct-1"), balance(shop, FEES)
    wid, original_txid = sent_at_1(shop)
    original = shop.ok("withdraw", "show", str(wid))
    assert in_mempool(shop, original_txid)

    bumped = shop.ok("withdraw", "bump", str(wid), "--fee-rate", "6", *shop.as_("dave"))
    bid = bumped["id"]
    assert bumped["withdrawal_kind"] == "bump" and bumped["status"] == "requested"
    assert bumped["fee_sat"] > original["fee_sat"]
    paid = sorted((o["address"], o["amount_sat"]) for o in original["outputs"] if not o["change"])
    assert sorted((o["address"], o["amount_sat"]) for o in bumped["outputs"] if not o["change"]) == paid
    # the requester of the bump never approves it
    assert shop.approve(bid, "dave").exit_code == 4
    approve(shop, bid)
    sign(shop, bid)
    bump_txid = broadcast(shop, bid)

    entry = shop.rpc.call("getmempoolentry", bump_txid)  # the node's own account of the fee
    assert int(Decimal(str(entry["fees"]["base"])) * 100_000_000) == bumped["fee_sat"]
    assert not in_mempool(shop, original_txid)

    shop.mine(1)
    shop.ok("sync")
    shown = shop.ok("withdraw", "show", str(wid))
    assert shown["status"] == "confirmed" and shown["txid"] == bump_txid
    assert shop.ok("withdraw", "show", str(bid))["status"] == "confirmed"
    assert shop.rpc.call("getrawtransaction", bump_txid, True)["confirmations"] == 1
    # the customer pays what they were quoted; the network fee is the one paid, once
    assert balance(shop, "acct-1") == customer - original["amount_sat"] - original["fee_sat"]
    assert balance(shop, FEES) == fees + bumped["fee_sat"]
    shop.ok("sync")  # a second sync posts nothing again
    assert balance(shop, FEES) == fees + bumped["fee_sat"]
    assert shop.cli("audit", "ledger").exit_code == 0


def _rewritten(shop: Shop, bid: int, edit: Any) -> Path:
    """The bump's PSBT, its transaction rewritten by an insider on the online machine."""
    path = shop.export(bid)
    p = psbt_lib.Psbt.parse(read_psbt(path))
    tx = CMutableTransaction.from_tx(p.tx)
    edit(tx)
    p.tx = tx
    path.write_text(p.to_base64() + "\n")
    return path


def _payment(tx: CMutableTransaction, amount: int) -> Any:
    return next(o for o in tx.vout if o.nValue == amount)


def test_the_signer_refuses_a_bump_that_changes_a_destination_or_an_amount(shop: Shop) -> None:
    wid, _ = sent_at_1(shop, "0.02")
    bid = shop.ok("withdraw", "bump", str(wid), "--fee-rate", "4", *shop.as_("dave"))["id"]
    approve(shop, bid)

    def more(tx: CMutableTransaction) -> None:
        change = max(tx.vout, key=lambda o: o.nValue)
        _payment(tx, 2_000_000).nValue += 5000
        change.nValue -= 5000

    def elsewhere(tx: CMutableTransaction) -> None:
        _payment(tx, 2_000_000).scriptPubKey = bytes.fromhex("0014" + "11" * 20)

    # a signer machine whose journal does not hold the original signs no replacement of it
    journal = next(shop.tmp.rglob("signer-journal.jsonl"))
    kept = journal.with_name("journal-elsewhere")
    journal.rename(kept)
    try:
        refused = shop.sign(shop.export(bid), "founder-c")
        assert refused.exit_code == 4 and "never signed transaction" in refused.stderr, refused.output
    finally:
        journal.unlink(missing_ok=True)
        kept.rename(journal)
    for edit in (more, elsewhere):
        refused = shop.sign(_rewritten(shop, bid, edit), "founder-a")
        assert refused.exit_code == 4, refused.output
        assert "does not pay exactly the destinations and amounts" in refused.stderr


def settle_others(shop: Shop) -> None:
    """Earlier tests' withdrawals confirmed and settled, so that the ledger moves only for this one."""
    shop.mine(1)
    shop.ok("sync")


def test_a_cancel_that_confirms_refunds_the_customer(shop: Shop) -> None:
    settle_others(shop)
    customer, fees = balance(shop, "acct-1"), balance(shop, FEES)
    wid, original_txid = sent_at_1(shop, "0.03")
    args = ["withdraw", "cancel", str(wid), "--reason", "customer asked", "--fee-rate", "5", *shop.as_("dave")]
    assert run_cli(shop.c.env, *args, "--json", crash_at="cancel.requested").returncode == KILLED
    assert [w for w in shop.ok("withdraw", "list") if w["withdrawal_kind"] == "cancel"] == []  # nothing half-written
    cancel = shop.ok(*args)
    cid = cancel["id"]
    assert cancel["withdrawal_kind"] == "cancel" and all(o["change"] for o in cancel["outputs"])
    approve(shop, cid)
    sign(shop, cid)
    cancel_txid = broadcast(shop, cid)
    assert in_mempool(shop, cancel_txid) and not in_mempool(shop, original_txid)
    shop.mine(1)
    shop.ok("sync")
    held = shop.ok("withdraw", "show", str(wid))
    assert held["status"] == "broadcast", "the hold stays until the cancel is CUSTODY_REFUND_CONFIRMATIONS deep"
    assert balance(shop, "acct-1") < customer
    shop.mine(5)
    shop.ok("sync")
    assert shop.ok("withdraw", "show", str(wid))["status"] == "failed"
    assert shop.ok("withdraw", "show", str(cid))["status"] == "confirmed"
    assert balance(shop, "acct-1") == customer  # amount and fee back
    assert balance(shop, FEES) == fees + cancel["fee_sat"]  # the cancel's fee is the house's
    assert shop.cli("audit", "ledger").exit_code == 0


def test_a_cancel_that_loses_the_race_refunds_nothing(shop: Shop) -> None:
    settle_others(shop)
    customer, fees = balance(shop, "acct-1"), balance(shop, FEES)
    wid, original_txid = sent_at_1(shop, "0.04")
    original = shop.ok("withdraw", "show", str(wid))
    cid = shop.ok("withdraw", "cancel", str(wid), "--reason", "too late", *shop.as_("dave"))["id"]
    approve(shop, cid)
    sign(shop, cid)
    shop.mine(1)  # the original confirms before the cancel is sent
    late = shop.c("withdraw", "broadcast", str(cid), "--json")
    assert late.exit_code == 8, late.output
    shop.ok("sync")
    assert shop.ok("withdraw", "show", str(wid))["status"] == "confirmed"
    assert shop.ok("withdraw", "show", str(wid))["txid"] == original_txid
    # a reorganisation could still let the cancel confirm: it fails once the original is
    # CUSTODY_REFUND_CONFIRMATIONS deep
    assert shop.ok("withdraw", "show", str(cid))["status"] == "signed"
    shop.mine(4)
    shop.ok("sync")
    assert shop.ok("withdraw", "show", str(cid))["status"] == "signed"
    shop.mine(1)
    shop.ok("sync")
    assert shop.ok("withdraw", "show", str(cid))["status"] == "failed"
    assert balance(shop, "acct-1") == customer - original["amount_sat"] - original["fee_sat"]
    assert balance(shop, FEES) == fees + original["fee_sat"]
    assert shop.cli("audit", "ledger").exit_code == 0


def test_a_bump_killed_midway_loses_nothing_and_pays_once(shop: Shop) -> None:
    settle_others(shop)
    fees = balance(shop, FEES)
    wid, _ = sent_at_1(shop, "0.01")
    env = shop.c.env
    bump = ["withdraw", "bump", str(wid), "--fee-rate", "5", *shop.as_("dave"), "--json"]
    assert run_cli(env, *bump, crash_at="bump.requested").returncode == KILLED
    assert [
        w["id"] for w in shop.ok("withdraw", "list") if w["withdrawal_kind"] == "bump" and w["status"] == "requested"
    ] == []
    done = run_cli(env, *bump)
    assert done.returncode == 0, done.stderr
    bid = json.loads(done.stdout)["id"]
    approve(shop, bid)
    sign(shop, bid)
    # killed after the node took the replacement, before the store recorded it
    assert run_cli(env, "withdraw", "broadcast", str(bid), crash_at="withdrawal.sent").returncode == KILLED
    assert shop.ok("withdraw", "show", str(bid))["status"] == "signed"
    txid = broadcast(shop, bid)  # again: recorded, not sent twice
    shop.mine(1)
    shop.ok("sync")
    shop.ok("sync")
    assert shop.ok("withdraw", "show", str(wid))["txid"] == txid
    assert balance(shop, FEES) == fees + shop.ok("withdraw", "show", str(bid))["fee_sat"]
    assert shop.cli("audit", "ledger").exit_code == 0


def test_a_child_pays_for_its_parent(shop: Shop) -> None:
    settle_others(shop)
    fees = balance(shop, FEES)
    wid, parent_txid = sent_at_1(shop, "0.01")
    parent = shop.ok("withdraw", "show", str(wid))
    child = shop.ok("withdraw", "cpfp", str(wid), "--fee-rate", "10", *shop.as_("dave"))
    assert child["withdrawal_kind"] == "cpfp" and all(o["change"] for o in child["outputs"])
    assert [i["outpoint"].split(":")[0] for i in child["inputs"]] == [parent_txid]
    approve(shop, child["id"])
    sign(shop, child["id"])
    child_txid = broadcast(shop, child["id"])
    entry = shop.rpc.call("getmempoolentry", child_txid)
    assert entry["depends"] == [parent_txid]
    package = Decimal(str(entry["fees"]["ancestor"])) * 100_000_000 / entry["ancestorsize"]
    assert package >= Decimal("9.9")  # the pair pays about the rate asked (sizes are estimated)
    shop.mine(1)
    shop.ok("sync")
    shown = shop.ok("withdraw", "show", str(wid))
    assert shown["status"] == "confirmed" and shown["txid"] == parent_txid
    assert shop.ok("withdraw", "show", str(child["id"]))["status"] == "confirmed"
    assert balance(shop, FEES) == fees + parent["fee_sat"] + child["fee_sat"]
    assert shop.cli("audit", "ledger").exit_code == 0


def test_a_bump_without_enough_change_points_to_cpfp(shop: Shop) -> None:
    wid, _ = sent_at_1(shop, "0.4999")  # from a coin of 0.5: about 9,800 sat of change
    refused = shop.c("withdraw", "bump", str(wid), "--fee-rate", "100", *shop.as_("dave"), "--json")
    assert refused.exit_code == 2 and "withdraw cpfp" in refused.stderr, refused.output


def show(shop: Shop, wid: int) -> dict[str, Any]:
    return dict(shop.ok("withdraw", "show", str(wid)))


def test_a_replaced_withdrawal_double_spent_by_a_foreign_transaction_is_refunded_once_at_depth(shop: Shop) -> None:
    settle_others(shop)
    customer, fees = balance(shop, "acct-1"), balance(shop, FEES)
    wid, original_txid = sent_at_1(shop, "0.05")
    original = show(shop, wid)
    bid = shop.ok("withdraw", "bump", str(wid), "--fee-rate", "4", *shop.as_("dave"))["id"]
    approve(shop, bid)
    sign(shop, bid)  # signed, never sent
    cid = shop.ok("withdraw", "cancel", str(wid), "--reason", "customer asked", *shop.as_("dave"))["id"]
    group = {wid, bid, cid}
    held = balance(shop, "acct-1")
    assert held == customer - original["amount_sat"] - original["fee_sat"]

    foreign = double_spend(shop, wid, shop.rpc)  # none of the group's versions: it outbids the original
    assert in_mempool(shop, foreign) and not in_mempool(shop, original_txid)
    assert synced(shop, group) == []  # in the mempool only: no proof
    for depth in range(1, 6):  # 1 .. CUSTODY_REFUND_CONFIRMATIONS - 1
        shop.mine(1)
        assert synced(shop, group) == [], depth
        assert [show(shop, i)["status"] for i in (wid, bid, cid)] == ["broadcast", "signed", "requested"]
        assert balance(shop, "acct-1") == held and reserved(shop, wid)

    shop.mine(1)  # 6 deep: the proof is in
    killed = run_cli(shop.c.env, "sync", "--json", crash_at="group.refunded")
    assert killed.returncode == KILLED
    assert [show(shop, i)["status"] for i in (wid, bid, cid)] == ["broadcast", "signed", "requested"]
    assert balance(shop, "acct-1") == held and postings(shop, wid) == ["withdrawal.requested"]

    # two syncs at once: one refunds, the other finds it done
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: run_cli(shop.c.env, "sync", "--json"), range(2)))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    told_by = [
        (c["id"], c["status"])
        for r in runs
        for c in json.loads(r.stdout)
        if c.get("record") == "withdrawal" and c["id"] in group
    ]
    assert sorted(told_by) == sorted((i, "failed") for i in group)
    failed = show(shop, wid)
    assert foreign in failed["reason"] and "6 confirmations" in failed["reason"]
    assert balance(shop, "acct-1") == customer and balance(shop, f"held:withdrawal-{wid}") == 0
    assert balance(shop, FEES) == fees  # no fee of ours was paid
    assert reserved(shop, wid) == []
    told = [
        e
        for e in shop.ok("audit", "log")
        if e["event"] == "withdrawal.failed" and e["payload"].get("withdrawal_id") == wid
    ]
    assert len(told) == 1 and told[0]["actor"] == "sync"
    assert told[0]["payload"]["spent_by"] == foreign and told[0]["payload"]["confirmations"] == 6
    assert told[0]["payload"]["refunded"] == customer - held
    assert sorted(told[0]["payload"]["versions_failed"]) == sorted([bid, cid])

    shop.mine(2)
    assert synced(shop, group) == []
    assert postings(shop, wid) == ["withdrawal.requested", "withdrawal.released"]  # refunded exactly once
    assert shop.ok("audit", "ledger")["ok"] is True


def test_a_reorg_after_a_replaced_withdrawal_settled_is_followed(shop: Shop) -> None:
    settle_others(shop)
    customer, fees = balance(shop, "acct-1"), balance(shop, FEES)
    wid, original_txid = sent_at_1(shop, "0.06")
    original = show(shop, wid)
    charged = customer - original["amount_sat"] - original["fee_sat"]
    bumped = shop.ok("withdraw", "bump", str(wid), "--fee-rate", "8", *shop.as_("dave"))
    bid = bumped["id"]
    approve(shop, bid)
    sign(shop, bid)  # signed, not sent: the original confirms first
    shop.mine(1)
    shop.ok("sync")
    assert show(shop, wid)["status"] == "confirmed" and show(shop, wid)["txid"] == original_txid
    assert show(shop, bid)["status"] == "signed", "a rival fails only once the winner is refund-deep"
    assert balance(shop, FEES) == fees + original["fee_sat"]
    block = shop.rpc.call("getrawtransaction", original_txid, True)["blockhash"]

    # the block goes; nothing else confirms; then it comes back: settled again, once
    shop.rpc.call("invalidateblock", block)
    assert run_cli(shop.c.env, "sync", "--json", crash_at="group.reorged").returncode == KILLED
    assert show(shop, wid)["status"] == "confirmed" and balance(shop, FEES) == fees + original["fee_sat"]
    assert (wid, "broadcast") in synced(shop, {wid})
    assert show(shop, wid)["status"] == "broadcast" and reserved(shop, wid)
    assert balance(shop, FEES) == fees and balance(shop, "acct-1") == charged  # the hold is back
    assert synced(shop, {wid, bid}) == []  # reversed once, not on every sync
    assert balance(shop, FEES) == fees
    shop.rpc.call("reconsiderblock", block)
    assert (wid, "confirmed") in synced(shop, {wid})
    assert balance(shop, FEES) == fees + original["fee_sat"] and reserved(shop, wid) == []

    # the block goes again, and the bump confirms instead: the fee booked is the bump's, once
    shop.rpc.call("invalidateblock", block)
    shop.ok("sync")
    assert show(shop, wid)["status"] == "broadcast"
    bump_txid = broadcast(shop, bid)
    assert not in_mempool(shop, original_txid)
    shop.mine(1)
    shop.ok("sync")
    shop.ok("sync")
    shown = show(shop, wid)
    assert shown["status"] == "confirmed" and shown["txid"] == bump_txid
    assert show(shop, bid)["status"] == "confirmed"
    assert balance(shop, FEES) == fees + bumped["fee_sat"]
    assert balance(shop, "acct-1") == charged  # the customer pays what they were quoted, once
    assert postings(shop, wid) == [
        "withdrawal.requested",
        "withdrawal.settled",
        "withdrawal.unsettled",
        "withdrawal.settled",
        "withdrawal.unsettled",
        "withdrawal.settled",
    ]
    reorged = [e["payload"] for e in shop.ok("audit", "log") if e["event"] == "withdrawal.reorged"]
    assert [(p["withdrawal_id"], p["fee_paid"]) for p in reorged[-2:]] == [(wid, original["fee_sat"])] * 2
    assert shop.ok("audit", "ledger")["ok"] is True


def test_a_reorg_takes_a_settled_child_and_its_parent_back_and_their_fees_once(shop: Shop) -> None:
    settle_others(shop)
    fees = balance(shop, FEES)
    wid, parent_txid = sent_at_1(shop, "0.01")
    parent = show(shop, wid)
    child = shop.ok("withdraw", "cpfp", str(wid), "--fee-rate", "10", *shop.as_("dave"))
    cid = child["id"]
    approve(shop, cid)
    sign(shop, cid)
    broadcast(shop, cid)
    shop.mine(1)
    shop.ok("sync")
    assert [show(shop, i)["status"] for i in (wid, cid)] == ["confirmed", "confirmed"]
    assert balance(shop, FEES) == fees + parent["fee_sat"] + child["fee_sat"]
    block = shop.rpc.call("getrawtransaction", parent_txid, True)["blockhash"]

    shop.rpc.call("invalidateblock", block)  # parent and child back in the mempool
    assert sorted(synced(shop, {wid, cid})) == [(wid, "broadcast"), (cid, "broadcast")]
    assert balance(shop, FEES) == fees and reserved(shop, cid)
    assert synced(shop, {wid, cid}) == []
    assert balance(shop, FEES) == fees
    shop.rpc.call("reconsiderblock", block)
    assert sorted(synced(shop, {wid, cid})) == [(wid, "confirmed"), (cid, "confirmed")]
    assert balance(shop, FEES) == fees + parent["fee_sat"] + child["fee_sat"]
    assert postings(shop, cid) == ["selftransfer.settled", "selftransfer.unsettled", "selftransfer.settled"]
    assert shop.ok("audit", "ledger")["ok"] is True


def test_a_withdrawal_reorged_out_and_double_spent_in_the_new_chain_is_refunded_once(shop: Shop) -> None:
    """The node still knows its transaction from the block the chain left (txindex): that is no
    reason to stop looking at what spends its inputs (without replacements: the queue's sync)."""
    settle_others(shop)
    customer, fees = balance(shop, "acct-1"), balance(shop, FEES)
    wid, txid = sent_at_1(shop, "0.07")
    shop.mine(1)
    assert synced(shop, {wid}) == [(wid, "confirmed")]
    block = shop.rpc.call("getrawtransaction", txid, True)["blockhash"]

    shop.rpc.call("invalidateblock", block)
    shop.rpc.call("generateblock", shop.wallet.call("getnewaddress", "", "bech32"), [foreign_spend(shop, wid)])
    assert not in_mempool(shop, txid) and shop.rpc.call("getrawtransaction", txid, True)["blockhash"] == block
    assert synced(shop, {wid}) == [(wid, "broadcast")]
    shop.mine(4)
    assert synced(shop, {wid}) == []  # 5 deep: no proof yet
    shop.mine(1)
    assert synced(shop, {wid}) == [(wid, "failed")]
    assert balance(shop, "acct-1") == customer and balance(shop, FEES) == fees and reserved(shop, wid) == []
    assert postings(shop, wid) == [
        "withdrawal.requested",
        "withdrawal.settled",
        "withdrawal.unsettled",
        "withdrawal.released",
    ]
    assert synced(shop, {wid}) == []
    assert shop.ok("audit", "ledger")["ok"] is True


def test_a_bump_above_the_rulebook_bump_rule_is_refused(shop: Shop, tmp_path: Path) -> None:
    """Last in the module: the rulebook it applies stays."""
    wid, _ = sent_at_1(shop, "0.01")
    # Founders cap bumps at 3 sat/vB (and ask three approvers for one).
    changes = tmp_path / "changes.json"
    changes.write_text(json.dumps({"bump": {"approvals": 3, "max_fee_sat": 50_000, "max_fee_rate": "3"}}))
    proposed = shop.c("rules", "propose", str(changes), "--json")
    assert proposed.exit_code == 0, proposed.output
    doc = tmp_path / "rulebook.json"
    assert shop.c("rules", "export", "--out", str(doc)).exit_code == 0
    for founder in ("founder-a", "founder-b"):
        assert shop.c("rules", "sign", str(doc), "--key", str(shop.founder_keys[founder]), "--yes").exit_code == 0
    assert shop.c("rules", "apply", str(doc)).exit_code == 0, "a tightening rulebook applies at once"

    refused = shop.c("withdraw", "bump", str(wid), "--fee-rate", "10", *shop.as_("dave"), "--json")
    assert refused.exit_code == 4 and "bump.max_fee_rate" in refused.stderr
    bid = shop.ok("withdraw", "bump", str(wid), "--fee-rate", "3", *shop.as_("dave"))["id"]
    approve(shop, bid)
    assert shop.ok("withdraw", "show", str(bid))["status"] == "requested"  # two of the three needed
    assert shop.approve(bid, "carol").exit_code == 0
    assert shop.ok("withdraw", "show", str(bid))["status"] == "approved"
