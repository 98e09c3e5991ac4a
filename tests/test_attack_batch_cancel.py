"""A dissolved batch set back by SQL and cancelled again must move nothing.

Cancelling a batch gives each member its hold back from the batch's hold (the members return to
the queue). An insider with SQL and any employee's key sets the cancelled batch back to pending
and its members back into it, then cancels it again: without a check, the members' holds were
doubled and the batch's hold driven below zero (the ledger still summing to zero), so that
cancelling a member afterwards credited its customer twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_withdraw_embedded import EmbeddedShop, destination


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path, "p2wsh")
    s.deposit("acct-1", coins=2)
    yield s


def _held(shop: EmbeddedShop, wid: int) -> int:
    """What withdrawal ``wid``'s hold account holds, from the ledger's entries."""
    with sqlite3.connect(shop.c.home / "custody.db") as db:
        (total,) = db.execute(
            "SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entry e JOIN ledger_account a ON a.id = e.account_id "
            "WHERE a.key = ?",
            (f"held:withdrawal-{wid}",),
        ).fetchone()
    return -int(total)


def test_a_dissolved_batch_reset_by_sql_and_cancelled_again_moves_nothing(shop: EmbeddedShop) -> None:
    to, _ = destination()
    members = []
    for amount in ("0.001", "0.002"):
        w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", amount, *shop.as_("carol"))
        for who in ("alice", "bob"):
            shop.ok("withdraw", "approve", str(w["id"]), *shop.as_(who), "--yes")
        members.append(int(w["id"]))
    batch = shop.ok("withdraw", "batch", *shop.as_("carol"))
    bid, status = int(batch["id"]), batch["status"]
    holds = {m: _held(shop, m) for m in members}
    shown = [shop.ok("withdraw", "show", str(m)) for m in members]
    assert not any(holds.values()) and _held(shop, bid) == sum(w["amount_sat"] + w["fee_sat"] for w in shown)
    shop.ok("withdraw", "cancel", str(bid), "--reason", "drill", *shop.as_("alice"))
    back = {m: _held(shop, m) for m in members}
    assert all(back.values()) and _held(shop, bid) == 0
    balance = shop.ok("ledger", "balance", "acct-1")["balance_sat"]
    log = len(shop.ok("audit", "log"))

    with sqlite3.connect(shop.c.home / "custody.db") as db:  # the insider: the batch as it was
        db.execute("UPDATE withdrawal SET status = ? WHERE id = ?", (status, bid))
        db.execute(f"UPDATE withdrawal SET batch_id = ? WHERE id IN ({','.join('?' * len(members))})", (bid, *members))
    again = shop.c("withdraw", "cancel", str(bid), "--reason", "again", *shop.as_("alice"))
    assert again.exit_code == 6, again.output  # Conflict: nothing is released again
    assert {m: _held(shop, m) for m in members} == back and _held(shop, bid) == 0
    assert shop.ok("ledger", "balance", "acct-1")["balance_sat"] == balance
    assert len(shop.ok("audit", "log")) == log
