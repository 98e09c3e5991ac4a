"""The red team against ``custody sync``'s refund by proof of a double spend, where the last
session's check (``check_logged``: the transactions the audit log recorded must still be the
rows') does not look.

* A batch's request entry names its transaction under ``batch_id``: the check found no
  transaction logged for a batch and passed. An insider who relabels a paid batch's row has
  every member refunded while the batch's payment stands on the chain.
* The outpoints whose spends are looked at come from the ``withdrawal_input`` rows, which no
  check ties to the transaction. An insider plants a row naming an outpoint that any other
  transaction spent long ago: sync takes it for a double spend of a signed withdrawal and
  refunds the customer; the founders' signed transaction is still valid, and the insider
  broadcasts it. Paid twice.
* A refund does not ask whether the withdrawal's hold still holds what it gives back. A
  withdrawal refunded for a real double spend, set back to ``signed`` by SQL, is refunded
  again by the next sync: the customer credited twice by postings the log records as the
  tool's, and ``audit ledger`` found nothing (a failed withdrawal's hold below zero was not
  one of its checks).

Each is refused: nothing refunded, trading halted (exit 3). On the embedded chain, through
the CLI.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitcoin.core import CMutableTransaction, CTransaction, b2lx, b2x, x

from tests.chain_support import fresh_script
from tests.test_withdraw_embedded import OP_TRUE, EmbeddedShop, destination
from tests.withdraw_support import foreign_spend, postings


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path, "p2wsh")
    yield s
    s.chain.close()


def _balance(shop: EmbeddedShop, account: str) -> int:
    return int(shop.ok("ledger", "balance", account)["balance_sat"])


def _store(shop: EmbeddedShop) -> sqlite3.Connection:
    return sqlite3.connect(shop.c.home / "custody.db")


def _refused(shop: EmbeddedShop, wid: int) -> None:
    """Sync refuses to refund ``wid``: exit 3, the ledger's halt raised, nothing failed."""
    synced = shop.c("sync", "--json")
    assert synced.exit_code == 3, synced.output
    assert f"withdrawal #{wid}" in synced.output, synced.output
    assert shop.c("halt", "status").exit_code == 3


def _signed_batch(shop: EmbeddedShop, to: str) -> tuple[int, list[int]]:
    """Two withdrawals of acct-1, approved, batched, the batch signed by two founders and
    finalized: (batch id, member ids)."""
    members = []
    for amount in ("0.001", "0.002"):
        w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", amount, *shop.as_("carol"))
        for who in ("alice", "bob"):
            shop.ok("withdraw", "approve", str(w["id"]), *shop.as_(who), "--yes")
        members.append(int(w["id"]))
    bid = int(shop.ok("withdraw", "batch", *shop.as_("carol"))["id"])
    psbt = shop.tmp / f"b{bid}.psbt"
    assert shop.c("withdraw", "export", str(bid), str(psbt)).exit_code == 0
    for founder in ("founder-a", "founder-b"):
        out = shop.tmp / f"b{bid}-{founder}.psbt"
        signed = shop.c("sign", str(psbt), "--key", str(shop.founder_keys[founder]), "--out", str(out), "--yes")
        assert signed.exit_code == 0, signed.output
        shop.ok("withdraw", "import", str(bid), str(out))
    shop.ok("withdraw", "finalize", str(bid))
    return bid, members


def test_a_paid_batch_relabelled_by_sql_is_not_refunded(shop: EmbeddedShop) -> None:
    shop.deposit("acct-1", coins=2)
    to, spk = destination()
    bid, members = _signed_batch(shop, to)
    shop.ok("withdraw", "broadcast", str(bid))
    held = _balance(shop, "acct-1")

    with _store(shop) as db:  # the insider: the batch's row names another transaction
        (unsigned,) = db.execute("SELECT unsigned_tx FROM withdrawal WHERE id = ?", (bid,)).fetchone()
        other = CMutableTransaction.from_tx(CTransaction.deserialize(x(unsigned)))
        other.nLockTime += 1
        forged = CTransaction.from_tx(other)
        db.execute(
            "UPDATE withdrawal SET unsigned_tx = ?, txid = ?, final_tx = NULL WHERE id = ?",
            (b2x(forged.serialize()), b2lx(forged.GetTxid()), bid),
        )

    shop.chain.mine(6, OP_TRUE)  # the batch's real payment, CUSTODY_REFUND_CONFIRMATIONS deep
    assert sorted(u.amount for u in shop.chain.unspent([spk])) == [100_000, 200_000]  # both paid
    _refused(shop, bid)
    assert _balance(shop, "acct-1") == held  # no member refunded
    assert "failed" not in [shop.ok("withdraw", "show", str(m))["status"] for m in members]
    assert "withdrawal.failed" not in [e["event"] for e in shop.ok("audit", "log")]


def test_an_input_row_planted_by_sql_proves_no_double_spend(shop: EmbeddedShop) -> None:
    shop.deposit("acct-1", coins=2)
    to, _ = destination()
    paid = shop.signed(to, "0.001")  # an earlier withdrawal, paid and deep in the chain
    shop.ok("withdraw", "broadcast", str(paid))
    shop.chain.mine(6, OP_TRUE)
    shop.ok("sync")
    wid = shop.signed(to, "0.002")  # signed by the founders, not broadcast yet
    held = _balance(shop, "acct-1")

    with _store(shop) as db:  # the insider: "wid spends" the paid withdrawal's input too
        row = db.execute(
            "SELECT txid, vout, amount, script_pubkey, chain, idx, prev_tx FROM withdrawal_input "
            "WHERE withdrawal_id = ?",
            (paid,),
        ).fetchone()
        db.execute(
            "INSERT INTO withdrawal_input (withdrawal_id, position, txid, vout, amount, script_pubkey, chain, idx, "
            "prev_tx) VALUES (?, 99, ?, ?, ?, ?, ?, ?, ?)",
            (wid, *row),
        )

    _refused(shop, wid)
    assert _balance(shop, "acct-1") == held  # not refunded
    assert shop.ok("withdraw", "show", str(wid))["status"] == "signed"
    assert postings(shop, wid) == ["withdrawal.requested"]


def _double_spend(shop: EmbeddedShop, wid: int) -> str:
    """Withdrawal ``wid``'s first input spent elsewhere by two founders (a p2wsh store), sent
    to the chain: another transaction than any custody recorded. Its txid."""
    return shop.chain.broadcast(bytes.fromhex(foreign_spend(shop, wid, to=fresh_script())))


def test_a_refunded_withdrawal_set_back_by_sql_is_not_refunded_again(shop: EmbeddedShop) -> None:
    shop.deposit("acct-1")
    before = _balance(shop, "acct-1")
    to, _ = destination()
    wid = shop.signed(to, "0.015")
    other = _double_spend(shop, wid)
    shop.chain.mine(6, OP_TRUE)
    (failed,) = shop.ok("sync")  # the real double spend, deep enough: refunded once
    assert failed["status"] == "failed" and other in failed["reason"]
    assert _balance(shop, "acct-1") == before

    with _store(shop) as db:  # the insider: the withdrawal as it stood before the proof
        db.execute("UPDATE withdrawal SET status = 'signed', reason = NULL WHERE id = ?", (wid,))

    _refused(shop, wid)
    assert _balance(shop, "acct-1") == before  # not credited a second time
    assert postings(shop, wid) == ["withdrawal.requested", "withdrawal.released"]
