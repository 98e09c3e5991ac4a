"""A batch's cancel releases nothing, however often it is asked for.

A batch's members' approvals are its approvals: it is a live authorization from the moment it
is made (tests/test_attack_cancel_approved.py shows the payment twice a dissolution allowed).
Cancelling it requests a cancel by double-spend and moves no hold. An insider with SQL and any
employee's key who drops that cancel and asks again, or sets the batch back as it was, gets
another request at most: the members' holds, the customer's balance stay where they were.
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


def test_a_batch_cancelled_again_after_sql_edits_releases_nothing(shop: EmbeddedShop) -> None:
    to, _ = destination()
    members = []
    for amount in ("0.001", "0.002"):
        w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", amount, *shop.as_("carol"))
        for who in ("alice", "bob"):
            shop.ok("withdraw", "approve", str(w["id"]), *shop.as_(who), "--yes")
        members.append(int(w["id"]))
    batch = shop.ok("withdraw", "batch", *shop.as_("carol"))
    bid = int(batch["id"])
    shown = [shop.ok("withdraw", "show", str(m)) for m in members]
    owed = sum(w["amount_sat"] + w["fee_sat"] for w in shown)
    balance = shop.ok("ledger", "balance", "acct-1")["balance_sat"]
    assert not any(_held(shop, m) for m in members) and _held(shop, bid) == owed

    first = shop.ok("withdraw", "cancel", str(bid), "--reason", "drill", *shop.as_("alice"))
    assert first["withdrawal_kind"] == "cancel"  # requested; nothing released
    again = shop.c("withdraw", "cancel", str(bid), "--reason", "again", *shop.as_("alice"))
    assert again.exit_code == 6, again.output  # its cancel awaits approval already

    with sqlite3.connect(shop.c.home / "custody.db") as db:  # the insider: that cancel dropped
        db.execute("UPDATE withdrawal SET status = 'failed' WHERE id = ?", (first["id"],))
    second = shop.ok("withdraw", "cancel", str(bid), "--reason", "again", *shop.as_("alice"))
    assert second["withdrawal_kind"] == "cancel" and second["id"] != first["id"]
    assert not any(_held(shop, m) for m in members) and _held(shop, bid) == owed
    assert shop.ok("ledger", "balance", "acct-1")["balance_sat"] == balance
    assert {shop.ok("withdraw", "show", str(m))["batch_id"] for m in members} == {bid}
