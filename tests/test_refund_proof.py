"""No refund without proof: a withdrawal carrying founders' signatures, on real regtest nodes.

The harm this guards against: a signed transaction refused by one node (that did not know
its inputs, or was still syncing) was failed and refunded, then confirmed when broadcast
elsewhere: the customer was paid twice. Here the withdrawal stays signed, reserved and held
whatever a node says; it is settled when the chain shows its transaction, and failed and
refunded exactly once when the chain shows another transaction spending one of its inputs
CUSTODY_REFUND_CONFIRMATIONS (6) blocks deep, not one block earlier.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from bitcoin.core import b2lx

from custody.bitcoin import psbt as psbt_lib
from custody.chain.node import connect
from custody.chain.regtest import NodeInfo, start_node, stop_node
from custody.chain.rpc import RpcClient
from custody.chain.types import SpendState
from custody.config import Settings
from custody.store.db import Database
from custody.withdraw import broadcast as wd_broadcast
from custody.withdraw import limits as wd_limits
from tests.withdraw_support import Shop, double_spend, postings, reserved

pytestmark = pytest.mark.regtest

AMOUNT_SAT = 1_500_000


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeInfo]:
    """A second regtest node, never connected to the first: one block of its own, out of
    initial block download, and none of the first node's coins."""
    datadir = tmp_path_factory.mktemp("stranger-node")
    node = start_node(datadir)
    try:
        yield node
    finally:
        stop_node(datadir)


def use_node(shop: Shop, node: NodeInfo) -> None:
    shop.c.env["CUSTODY_NODE_URL"] = node.rpc_url
    shop.c.env["CUSTODY_NODE_COOKIE"] = str(node.cookie_file)


def signed(shop: Shop, founders: tuple[str, ...] = ("founder-a", "founder-b"), finalize: bool = True) -> int:
    """A withdrawal of 0.015 to the node's wallet, approved, signed by ``founders`` and imported."""
    wid = shop.approved("0.015")
    psbt = shop.export(wid)
    for founder in founders:
        out = shop.tmp / f"w{wid}-{founder}.psbt"
        assert shop.sign(psbt, founder, out).exit_code == 0
        shop.ok("withdraw", "import", str(wid), str(out))
    if finalize:
        shop.ok("withdraw", "finalize", str(wid))
    return wid


def store(shop: Shop) -> sqlite3.Connection:
    return sqlite3.connect(shop.c.home / "custody.db")


def final_tx(shop: Shop, wid: int) -> str:
    with store(shop) as db:
        (raw,) = db.execute("SELECT final_tx FROM withdrawal WHERE id = ?", (wid,)).fetchone()
    return str(raw)


def events(shop: Shop, wid: int) -> list[str]:
    return [e["event"] for e in shop.ok("audit", "log") if e["payload"].get("withdrawal_id") == wid]


def balance(shop: Shop, account: str) -> int:
    return int(shop.ok("ledger", "balance", account)["balance_sat"])


@pytest.fixture
def shop(tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient) -> Shop:
    s = Shop(tmp_path, regtest_node, funded_wallet)
    s.deposit("acct-1", "0.3", count=2)
    return s


def test_an_unsynced_node_refunds_nothing_and_the_transaction_confirms_elsewhere_once(
    shop: Shop, stranger: NodeInfo, tmp_path: Path
) -> None:
    before = balance(shop, "acct-1")
    wid = signed(shop)
    fee = shop.ok("withdraw", "show", str(wid))["fee_sat"]
    held = balance(shop, "acct-1")
    assert held == before - AMOUNT_SAT - fee
    inputs = reserved(shop, wid)
    assert inputs

    # A node that never saw the inputs, far behind: the transaction's locktime is the height
    # custody saw, so it says "non-final" before it looks for the inputs. That proves nothing.
    use_node(shop, stranger)
    refused = shop.cli("withdraw", "broadcast", str(wid))
    assert refused.exit_code == 8, refused.output
    assert "(premature): non-final" in refused.stderr and "stays signed" in refused.stderr
    behind = shop.cli("sync")  # far below the blocks custody has seen: behind, or another chain
    assert behind.exit_code == 8 and "behind or follows another chain" in behind.stderr, behind.output
    # A fresh node still in initial block download is refused before it is asked anything.
    fresh_dir = tmp_path / "fresh-node"
    fresh = start_node(fresh_dir, leave_ibd=False)
    try:
        assert fresh.client().call("getblockchaininfo")["initialblockdownload"] is True
        use_node(shop, fresh)
        for args in (("withdraw", "broadcast", str(wid)), ("sync",)):
            result = shop.cli(*args)
            assert result.exit_code == 8 and "initial block download" in result.stderr, (args, result.output)
    finally:
        stop_node(fresh_dir)

    shown = shop.ok("withdraw", "show", str(wid))
    assert shown["status"] == "signed" and shown["reason"].startswith("refused by the node (premature)")
    assert reserved(shop, wid) == inputs
    assert balance(shop, "acct-1") == held and balance(shop, f"held:withdrawal-{wid}") == AMOUNT_SAT + fee
    assert postings(shop, wid) == ["withdrawal.requested"]
    assert events(shop, wid).count("withdrawal.refused") == 1
    # Nothing was released: the same coins cannot go to another withdrawal.
    use_node(shop, shop.node)
    taken = shop.request(shop.destination()[0], "0.4")  # the balance covers it, the unreserved coins do not
    assert taken.exit_code == 2 and "unreserved" in taken.stderr

    # Whoever holds the signed transaction broadcasts it through the first node.
    txid = shop.rpc.call("sendrawtransaction", final_tx(shop, wid))
    shop.mine(1)
    (synced,) = shop.ok("sync")
    assert (synced["id"], synced["status"], synced["txid"]) == (wid, "confirmed", txid)
    assert shop.ok("withdraw", "broadcast", str(wid))["status"] == "confirmed"  # idempotent
    shop.mine(10)
    shop.ok("sync")

    assert postings(shop, wid) == ["withdrawal.requested", "withdrawal.settled"]  # settled once, no refund
    assert balance(shop, "acct-1") == held and balance(shop, f"held:withdrawal-{wid}") == 0
    assert reserved(shop, wid) == []
    with store(shop) as db:
        (destination,) = db.execute("SELECT destination_spk FROM withdrawal WHERE id = ?", (wid,)).fetchone()
    paid = shop.rpc.call("scantxoutset", "start", [f"raw({destination})"])["unspents"]
    assert [(u["txid"], u["amount"]) for u in paid] == [(txid, Decimal("0.015"))]  # paid once
    assert events(shop, wid).count("withdrawal.confirmed") == 1
    told = [e for e in shop.ok("audit", "log") if e["event"] == "withdrawal.broadcast"]
    assert told[-1]["payload"] == {"withdrawal_id": wid, "txid": txid, "seen_on_chain": True}
    assert shop.ok("audit", "ledger")["ok"] is True


def test_a_double_spend_refunds_only_at_depth_and_exactly_once(shop: Shop) -> None:
    before = balance(shop, "acct-1")
    wid = signed(shop)
    held = balance(shop, "acct-1")
    other = double_spend(shop, wid, shop.rpc)

    # In the mempool only: a conflict, not a spend.
    conflict = shop.cli("withdraw", "broadcast", str(wid))
    assert conflict.exit_code == 8 and "(mempool-conflict): txn-mempool-conflict" in conflict.stderr
    assert shop.ok("sync") == []
    for depth in range(1, 6):  # 1 .. 5 confirmations: CUSTODY_REFUND_CONFIRMATIONS - 1 at most
        shop.mine(1)
        assert shop.ok("sync") == [], depth
        assert shop.ok("withdraw", "show", str(wid))["status"] == "signed"
        assert balance(shop, "acct-1") == held and reserved(shop, wid)
    missing = shop.cli("withdraw", "broadcast", str(wid))
    assert missing.exit_code == 8 and "(missing-inputs)" in missing.stderr

    shop.mine(1)  # 6 confirmations: the proof is in
    (failed,) = shop.ok("sync")
    assert failed["id"] == wid and failed["status"] == "failed"
    assert other in failed["reason"] and "6 confirmations" in failed["reason"]
    assert balance(shop, "acct-1") == before and balance(shop, f"held:withdrawal-{wid}") == 0
    assert reserved(shop, wid) == []
    (told,) = [e for e in shop.ok("audit", "log") if e["event"] == "withdrawal.failed"]
    assert told["actor"] == "sync" and told["payload"]["spent_by"] == other
    assert told["payload"]["confirmations"] == 6 and told["payload"]["refunded"] == before - held

    shop.mine(3)
    assert shop.ok("sync") == []
    assert shop.cli("withdraw", "broadcast", str(wid)).exit_code == 6  # failed: nothing to broadcast
    assert postings(shop, wid) == ["withdrawal.requested", "withdrawal.released"]  # refunded exactly once
    assert shop.ok("audit", "ledger")["ok"] is True


def test_partial_signatures_are_held_too(shop: Shop) -> None:
    """One founder's signature imported: a cancel is only a request to double-spend it (no
    refund on an employee's word), no refund on a node's word; the proof (at the configured
    depth) refunds it."""
    before = balance(shop, "acct-1")
    wid = signed(shop, founders=("founder-a",), finalize=False)
    assert shop.ok("withdraw", "show", str(wid))["status"] == "approved"
    cancel = shop.cli("withdraw", "cancel", str(wid), "--reason", "changed my mind", *shop.as_("dave"), "--json")
    assert cancel.exit_code == 0, cancel.stderr
    request = json.loads(cancel.stdout)
    assert request["withdrawal_kind"] == "cancel" and request["status"] == "requested"
    assert shop.ok("withdraw", "show", str(wid))["status"] == "approved"  # still signed, reserved, held
    assert balance(shop, "acct-1") < before
    dropped = shop.cli("withdraw", "cancel", str(request["id"]), "--reason", "not needed", *shop.as_("dave"))
    assert dropped.exit_code == 0, dropped.stderr
    other = double_spend(shop, wid, shop.rpc)
    shop.c.env["CUSTODY_REFUND_CONFIRMATIONS"] = "2"
    shop.mine(1)
    assert shop.ok("sync") == []
    shop.mine(1)
    (failed,) = shop.ok("sync")
    assert failed["status"] == "failed" and other in failed["reason"]
    assert balance(shop, "acct-1") == before
    assert postings(shop, wid) == ["withdrawal.requested", "withdrawal.released"]


@pytest.mark.parametrize("script", ["p2wsh", "p2sh"])
def test_a_transaction_signed_and_sent_elsewhere_is_ours_not_a_conflict(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient, script: str
) -> None:
    """Two founders sign elsewhere and someone broadcasts it; custody only saw one founder's
    signature. It is settled, never refunded. Legacy p2sh: the signatures change the txid,
    so the chain's spender is recognised by what it spends and pays (the approved
    transaction), never taken for a double spend."""
    shop = Shop(tmp_path, regtest_node, funded_wallet, script=script)
    shop.deposit("acct-1", "0.3", count=2)
    held_before = balance(shop, "acct-1")
    wid = signed(shop, founders=("founder-a",), finalize=False)  # only founder-a's imported
    psbt = shop.export(wid)
    parts = []
    for founder in ("founder-b", "founder-c"):  # two founders sign elsewhere and never import
        out = tmp_path / f"elsewhere-{founder}.psbt"
        assert shop.sign(psbt, founder, out).exit_code == 0
        parts.append(psbt_lib.Psbt.parse(out.read_bytes()))  # a .psbt file is binary (BIP-174)
    final = psbt_lib.extract(psbt_lib.finalize(psbt_lib.combine(parts)))
    unsigned = shop.ok("withdraw", "show", str(wid))["unsigned_txid"]
    assert (b2lx(final.GetTxid()) != unsigned) == (script == "p2sh")
    txid = shop.rpc.call("sendrawtransaction", final.serialize().hex())
    shop.mine(7)
    (synced,) = shop.ok("sync")
    assert (synced["status"], synced["txid"]) == ("confirmed", txid)
    assert final_tx(shop, wid) == final.serialize().hex()  # the chain's final transaction, kept
    assert shop.ok("withdraw", "broadcast", str(wid))["status"] == "confirmed"
    assert postings(shop, wid) == ["withdrawal.requested", "withdrawal.settled"]
    fee = synced["fee_sat"]
    assert balance(shop, "acct-1") == held_before - AMOUNT_SAT - fee


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CUSTODY_REFUND_CONFIRMATIONS": "0"}, "must be at least CUSTODY_CONFIRMATIONS"),
        ({"CUSTODY_REFUND_CONFIRMATIONS": "six"}, "whole numbers"),
        ({"CUSTODY_CONFIRMATIONS": "3", "CUSTODY_REFUND_CONFIRMATIONS": "2"}, "(2) must be at least"),
    ],
)
def test_a_refund_depth_below_the_settlement_depth_is_refused(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient, env: dict[str, str], message: str
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.c.env.update(env)
    result = shop.cli("sync")
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_a_node_ahead_that_never_saw_the_inputs_proves_nothing(shop: Shop, stranger: NodeInfo) -> None:
    """The stranger mines past the first node's height: it is synced with its own chain and
    still knows nothing of our inputs. Following withdrawals against it changes nothing."""
    wid = signed(shop)
    held = balance(shop, "acct-1")
    inputs = reserved(shop, wid)
    ahead = shop.rpc.call("getblockcount") + 10 - stranger.client().call("getblockcount")
    stranger.client().call("generatetodescriptor", ahead, "raw(51)")
    backend = connect(stranger.client(), "regtest")
    settings = Settings.load(env=shop.c.env)
    assert wd_broadcast.sync(Database(settings.db_url), backend, wd_limits.Limits(), settings=settings) == []
    outpoints = [(txid, int(vout)) for txid, vout in (i.split(":") for i in inputs)]
    assert [sp.state for sp in backend.spends(outpoints)] == [SpendState.UNKNOWN] * len(inputs)
    shown = shop.ok("withdraw", "show", str(wid))
    assert shown["status"] == "signed" and reserved(shop, wid) == inputs and balance(shop, "acct-1") == held
    assert postings(shop, wid) == ["withdrawal.requested"]
