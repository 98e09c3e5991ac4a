"""The whole withdrawal flow against the real regtest node, for all three script types."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from tests.support import psbt_b64, read_psbt
from tests.withdraw_support import Shop

pytestmark = pytest.mark.regtest


@pytest.mark.parametrize("script", ["p2wsh", "p2sh-p2wsh", "p2sh"])
def test_full_flow_confirms_and_pays_exactly(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient, script: str
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet, script)
    shop.deposit("acct-1", "0.5", count=2)
    to, node_address = shop.destination()

    requested = shop.request(to, "0.015")
    assert requested.exit_code == 0, requested.output
    w = json.loads(requested.stdout)
    wid = w["id"]
    assert w["status"] == "requested" and w["amount_sat"] == 1_500_000
    assert w["change_sat"] > 0 and w["change_index"] == 0

    assert json.loads(shop.approve(wid, "alice").stdout)["status"] == "requested"
    assert json.loads(shop.approve(wid, "bob").stdout)["status"] == "approved"

    psbt = tmp_path / "w.psbt"
    assert shop.cli("withdraw", "export", str(wid), str(psbt)).exit_code == 0
    b64 = psbt_b64(psbt)
    decoded = shop.rpc.call("decodepsbt", b64)  # the node reads our PSBT
    assert len(decoded["inputs"]) == len(w["inputs"])
    assert all(i.get("witness_utxo") or i.get("non_witness_utxo") for i in decoded["inputs"])
    analyzed = shop.rpc.call("analyzepsbt", b64)
    assert analyzed["next"] == "signer"
    assert Decimal(str(analyzed["fee"])) * 100_000_000 == w["fee_sat"]

    signed_a = shop.sign(psbt, "founder-a", tmp_path / "a.psbt")
    assert signed_a.exit_code == 0, signed_a.output
    signed_b = shop.sign(psbt, "founder-b", tmp_path / "b.psbt")
    assert signed_b.exit_code == 0, signed_b.output
    imported = shop.ok("withdraw", "import", str(wid), str(tmp_path / "a.psbt"))
    assert imported["founders_signed"] == ["founder-a"] and imported["status"] == "approved"
    imported = shop.ok("withdraw", "import", str(wid), str(tmp_path / "b.psbt"))
    assert imported["founders_signed"] == ["founder-a", "founder-b"] and imported["status"] == "signed"

    final = shop.ok("withdraw", "finalize", str(wid))
    assert final["txid"]
    sent = shop.ok("withdraw", "broadcast", str(wid))
    assert sent["status"] == "broadcast"
    again = shop.ok("withdraw", "broadcast", str(wid))  # idempotent: the same txid, nothing new
    assert again["txid"] == sent["txid"]
    shop.mine(1)
    synced = shop.ok("sync")
    assert [s["id"] for s in synced] == [wid] and synced[0]["status"] == "confirmed"

    tx = shop.rpc.call("getrawtransaction", sent["txid"], True)
    assert tx["confirmations"] >= 1
    dest_spk = shop.wallet.call("getaddressinfo", node_address)["scriptPubKey"]
    paid = [o for o in tx["vout"] if o["scriptPubKey"]["hex"] == dest_spk]
    assert len(paid) == 1 and Decimal(str(paid[0]["value"])) == Decimal("0.015")
    assert shop.wallet.call("getreceivedbyaddress", node_address) == Decimal("0.015")


def test_psbt_signed_by_the_node_wallet_imports(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    """A founder's key held by the node's own wallet signs our PSBT; the signatures import."""
    from custody.bitcoin.keys import b58check_encode
    from custody.identity.keyfile import open_founder_key
    from tests.support import PASSPHRASE

    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.2")
    to, _ = shop.destination()
    wid = json.loads(shop.request(to, "0.05").stdout)["id"]
    shop.approve(wid, "alice")
    shop.approve(wid, "bob")
    psbt = tmp_path / "w.psbt"
    assert shop.cli("withdraw", "export", str(wid), str(psbt)).exit_code == 0
    founder = open_founder_key(shop.founder_keys["founder-c"], PASSPHRASE)
    from custody.chain.regtest import ensure_wallet

    signer = ensure_wallet(shop.rpc, f"founder-c-{tmp_path.name}"[:60])
    decoded = shop.rpc.call("decodepsbt", psbt_b64(psbt))
    for inp in decoded["inputs"]:
        for d in inp["bip32_derivs"]:
            if d["master_fingerprint"] == founder.master.fingerprint.hex():
                path = tuple(
                    int(p.rstrip("'h")) + (0x80000000 if p[-1] in "'h" else 0) for p in d["path"].split("/")[1:]
                )
                secret = founder.master.derive(path).secret
                wif = b58check_encode(b"\xef" + secret + b"\x01")
                signer.call("importprivkey", wif, "", False)
    processed = signer.call("walletprocesspsbt", psbt_b64(psbt), True, "ALL", True)
    assert processed["complete"] is False  # one founder of two: partial, not finalized
    node_signed = tmp_path / "node-signed.psbt"
    node_signed.write_text(processed["psbt"] + "\n")
    imported = shop.ok("withdraw", "import", str(wid), str(node_signed))
    assert imported["founders_signed"] == ["founder-c"]
    assert shop.sign(psbt, "founder-a", tmp_path / "a.psbt").exit_code == 0
    imported = shop.ok("withdraw", "import", str(wid), str(tmp_path / "a.psbt"))
    assert imported["founders_signed"] == ["founder-a", "founder-c"] and imported["status"] == "signed"
    shop.ok("withdraw", "finalize", str(wid))
    assert shop.ok("withdraw", "broadcast", str(wid))["status"] == "broadcast"


def test_daily_batch_pays_every_member_in_one_transaction(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.2", count=4)  # each request reserves a coin of its own
    members = []
    for amount in ("0.01", "0.02", "0.03"):
        to, node_address = shop.destination()
        wid = json.loads(shop.request(to, amount).stdout)["id"]
        shop.approve(wid, "alice")
        shop.approve(wid, "bob")
        members.append((wid, node_address, Decimal(amount)))
    unapproved = json.loads(shop.request(shop.destination()[0], "0.001").stdout)["id"]
    batch = shop.ok("withdraw", "batch", *shop.as_("dave"))
    assert batch["withdrawal_kind"] == "batch" and sorted(batch["members"]) == [m[0] for m in members]
    assert unapproved not in batch["members"]
    assert batch["fee_sat"] <= sum(shop.ok("withdraw", "show", str(m[0]))["fee_sat"] for m in members)
    bid = batch["id"]
    # a member is handled through its batch now
    assert shop.cli("withdraw", "export", str(members[0][0]), str(tmp_path / "m.psbt")).exit_code == 6
    psbt = tmp_path / "batch.psbt"
    assert shop.cli("withdraw", "export", str(bid), str(psbt)).exit_code == 0
    for founder in ("founder-b", "founder-c"):
        signed = tmp_path / f"{founder}.psbt"
        assert shop.sign(psbt, founder, signed).exit_code == 0
        shop.ok("withdraw", "import", str(bid), str(signed))
    shop.ok("withdraw", "finalize", str(bid))
    sent = shop.ok("withdraw", "broadcast", str(bid))
    shop.mine(1)
    shop.ok("sync")
    for wid, node_address, amount in members:
        member = shop.ok("withdraw", "show", str(wid))
        assert member["status"] == "confirmed" and member["txid"] == sent["txid"]
        assert shop.wallet.call("getreceivedbyaddress", node_address) == amount
    assert shop.ok("withdraw", "show", str(unapproved))["status"] == "requested"


def test_signer_refuses_a_batch_that_pays_differently(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    from bitcoin.core import CMutableTransaction

    from custody.bitcoin import psbt as psbt_lib

    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.2", count=2)
    for amount in ("0.01", "0.02"):
        wid = json.loads(shop.request(shop.destination()[0], amount).stdout)["id"]
        shop.approve(wid, "alice")
        shop.approve(wid, "bob")
    bid = shop.ok("withdraw", "batch", *shop.as_("dave"))["id"]
    path = tmp_path / "batch.psbt"
    assert shop.cli("withdraw", "export", str(bid), str(path)).exit_code == 0
    p = psbt_lib.Psbt.parse(read_psbt(path))
    tx = CMutableTransaction.from_tx(p.tx)
    paid = next(o for o in tx.vout if o.nValue == 1_000_000)
    change = max(tx.vout, key=lambda o: o.nValue)
    paid.nValue += 1000
    change.nValue -= 1000
    p.tx = tx
    path.write_text(p.to_base64() + "\n")
    result = shop.sign(path, "founder-a")
    assert result.exit_code == 4 and "does not pay exactly its members' payments" in result.stderr


def test_a_reorg_that_unconfirms_a_withdrawal_is_followed(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.2")
    to, _ = shop.destination()
    wid = str(json.loads(shop.request(to, "0.05").stdout)["id"])
    shop.approve(int(wid), "alice")
    shop.approve(int(wid), "bob")
    psbt = tmp_path / "w.psbt"
    assert shop.cli("withdraw", "export", wid, str(psbt)).exit_code == 0
    for founder in ("founder-a", "founder-b"):
        assert shop.sign(psbt, founder, tmp_path / f"{founder}.psbt").exit_code == 0
        shop.ok("withdraw", "import", wid, str(tmp_path / f"{founder}.psbt"))
    shop.ok("withdraw", "finalize", wid)
    txid = shop.ok("withdraw", "broadcast", wid)["txid"]
    shop.mine(1)
    shop.ok("sync")
    assert shop.ok("withdraw", "show", wid)["status"] == "confirmed"
    balance = shop.ok("ledger", "balance", "acct-1")["balance_sat"]

    block = shop.rpc.call("getrawtransaction", txid, True)["blockhash"]
    shop.rpc.call("invalidateblock", block)  # the withdrawal is back in the mempool
    changed = shop.ok("sync")
    assert [c["id"] for c in changed if c["record"] == "withdrawal"] == [int(wid)]
    shown = shop.ok("withdraw", "show", wid)
    assert shown["status"] == "broadcast" and shown["confirmations"] == 0
    assert shop.cli("audit", "ledger").exit_code == 0  # the settlement was reversed, still balanced
    assert shop.ok("ledger", "balance", "acct-1")["balance_sat"] == balance  # the customer is not charged twice
    events = [e["event"] for e in shop.ok("audit", "log")]
    assert "withdrawal.reorged" in events
    # its coins stay reserved: a new request cannot spend them while it may confirm again
    again = shop.request(to, "0.05")
    assert again.exit_code == 2 and "unreserved" in again.stderr

    shop.rpc.call("reconsiderblock", block)
    shop.ok("sync")
    assert shop.ok("withdraw", "show", wid)["status"] == "confirmed"
    assert shop.cli("audit", "ledger").exit_code == 0
    assert shop.ok("ledger", "balance", "acct-1")["balance_sat"] == balance
