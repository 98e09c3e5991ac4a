"""An insider with the store's SQL against ``custody sync``'s refund by proof of a double spend.

A withdrawal is paid: its transaction, signed by the founders, is in a block. Sync knows the
withdrawal's transaction by the store's row (``unsigned_tx``, ``txid``, ``final_tx``). The
insider rewrites those columns to another transaction: the chain then shows the withdrawal's
inputs spent by a transaction that is "not ours", and at refund depth sync would fail the
withdrawal and give the customer the amount back, while the payment stands on the chain: the
customer is paid twice, with a well-formed ledger posting and a ``withdrawal.failed`` entry.

The audit log recorded the transaction at the request (``unsigned_txid``, in the request's
signed entry). A refund whose rows no longer carry that transaction is refused: nothing
refunded, trading halted, exit 3.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from bitcoin.core import CMutableTransaction, CTransaction, b2lx, b2x, x

from tests.test_withdraw_embedded import OP_TRUE, EmbeddedShop, destination


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path, "p2wsh")
    s.deposit("acct-1")
    yield s
    s.chain.close()


def _balance(shop: EmbeddedShop, account: str) -> int:
    return int(shop.ok("ledger", "balance", account)["balance_sat"])


def test_a_paid_withdrawal_relabelled_by_sql_is_not_refunded(shop: EmbeddedShop) -> None:
    before = _balance(shop, "acct-1")
    to, spk = destination()
    wid = shop.signed(to, "0.015")
    sent = shop.ok("withdraw", "broadcast", str(wid))
    held = _balance(shop, "acct-1")
    assert held < before

    # The insider: the row now names another transaction (the same one with another locktime).
    db = sqlite3.connect(shop.c.home / "custody.db")
    with db:
        (unsigned,) = db.execute("SELECT unsigned_tx FROM withdrawal WHERE id = ?", (wid,)).fetchone()
        other = CMutableTransaction.from_tx(CTransaction.deserialize(x(unsigned)))
        other.nLockTime += 1
        forged = CTransaction.from_tx(other)
        db.execute(
            "UPDATE withdrawal SET unsigned_tx = ?, txid = ?, final_tx = NULL WHERE id = ?",
            (b2x(forged.serialize()), b2lx(forged.GetTxid()), wid),
        )
    db.close()

    shop.chain.mine(6, OP_TRUE)  # the real payment, CUSTODY_REFUND_CONFIRMATIONS deep
    assert [u.amount for u in shop.chain.unspent([spk])] == [1_500_000]  # paid on the chain
    synced = shop.c("sync", "--json")
    assert synced.exit_code == 3, synced.output
    assert f"withdrawal #{wid}" in synced.output and "audit log" in synced.output, synced.output

    assert _balance(shop, "acct-1") == held  # not refunded
    assert shop.ok("withdraw", "show", str(wid))["status"] != "failed"
    events = [e["event"] for e in shop.ok("audit", "log")]
    assert "withdrawal.failed" not in events
    assert shop.c("halt", "status").exit_code == 3  # and trading is halted
    assert json.loads(shop.c("halt", "status", "--json").stdout)["halts"][0]["source"] == "ledger"
    assert sent["txid"]


def test_a_paid_withdrawal_whose_cancel_is_relabelled_as_the_payment_is_not_refunded(shop: EmbeddedShop) -> None:
    """The same harm through a cancel: an employee asks to cancel the broadcast withdrawal (a
    self-transfer of its inputs, only requested); the insider gives the cancel's row the
    payment's transaction (``txid``, ``final_tx``, status broadcast). Sync would take the
    payment, deep in the chain, for the cancel that confirmed, and refund the customer."""
    to, spk = destination()
    wid = shop.signed(to, "0.015")
    shop.ok("withdraw", "broadcast", str(wid))
    held = _balance(shop, "acct-1")
    cancel = shop.ok("withdraw", "cancel", str(wid), "--reason", "customer asked", *shop.as_("carol"))
    cid = int(cancel["id"])
    db = sqlite3.connect(shop.c.home / "custody.db")
    with db:
        txid, final = db.execute("SELECT txid, final_tx FROM withdrawal WHERE id = ?", (wid,)).fetchone()
        db.execute(
            "UPDATE withdrawal SET txid = ?, final_tx = ?, status = 'broadcast' WHERE id = ?", (txid, final, cid)
        )
    db.close()

    shop.chain.mine(6, OP_TRUE)
    assert [u.amount for u in shop.chain.unspent([spk])] == [1_500_000]  # paid on the chain
    synced = shop.c("sync", "--json")
    assert _balance(shop, "acct-1") == held, synced.output  # not refunded
    assert shop.ok("withdraw", "show", str(wid))["status"] != "failed", synced.output
    assert synced.exit_code == 3 and f"#{cid}" in synced.output, synced.output
