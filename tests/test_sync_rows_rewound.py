"""The red team's attack on sync's settlements: a confirmed withdrawal's (or consolidation's) row
set back to broadcast by SQL (its confirmations zeroed), so that the next sync confirms it
again. Settling twice books its network fee twice (and a customer's payout twice: the hold
driven below zero, the asset account short of the chain); the audit log would show two
confirmations of one transaction, both posted by the tool. Sync must refuse (a ledger halt,
nothing posted) rather than settle again. On the embedded chain, through the CLI.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_withdraw_embedded import OP_TRUE, EmbeddedShop, destination
from tests.withdraw_support import postings


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path, "p2wsh")
    yield s
    s.chain.close()


def _confirmed_then_rewound(shop: EmbeddedShop, wid: int) -> list[str]:
    shop.ok("withdraw", "broadcast", str(wid))
    shop.chain.mine(1, OP_TRUE)
    assert [w["status"] for w in shop.ok("sync") if w["id"] == wid] == ["confirmed"]
    before = postings(shop, wid)
    con = sqlite3.connect(shop.c.home / "custody.db")
    with con:
        con.execute("UPDATE withdrawal SET status = 'broadcast', confirmations = 0 WHERE id = ?", (wid,))
    con.close()
    shop.chain.mine(1, OP_TRUE)
    return before


@pytest.mark.parametrize("kind", ["withdrawal", "consolidation"])
def test_a_confirmed_row_set_back_to_broadcast_is_not_settled_twice(shop: EmbeddedShop, kind: str) -> None:
    if kind == "withdrawal":
        shop.deposit("acct-1", 2)
        to, _ = destination()
        wid = shop.signed(to, "0.01")
    else:
        shop.deposit("acct-1", 3)
        wid = int(shop.ok("utxo", "consolidate", "--max-inputs", "3", *shop.as_("carol"))["id"])
        shop.approved_and_signed(wid)
    before = _confirmed_then_rewound(shop, wid)
    fees = shop.ok("ledger", "balance", "expense:network-fees")["balance_sat"]
    again = shop.c("sync", "--json")
    assert again.exit_code == 3 and "cannot be settled again" in again.output, again.output  # halted
    assert postings(shop, wid) == before, again.output  # nothing settled a second time
    assert shop.ok("ledger", "balance", "expense:network-fees")["balance_sat"] == fees
