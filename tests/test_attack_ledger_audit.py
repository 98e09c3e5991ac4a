"""The red team against the checks that stop a release or a settlement from being posted twice:
they read ledger rows (entries, transactions), which the insider can edit for a moment and put
back. While the edit stands the tool posts a second time; once it is put back every row is
what the audit log recorded, both postings are the tool's, the ledger sums to zero, and
``audit ledger`` found nothing. It now checks what must hold after any such run:

* a hold is filled once and emptied once: no hold holds less than nothing, and a failed
  (as a confirmed) withdrawal's hold is empty;
* a withdrawal (or self-transfer) is settled at most once more than its settlement was reversed.

Each attack ends in ``audit ledger`` halting trading (exit 3), naming the account or withdrawal.
On the embedded chain, through the CLI.
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


def _found_by_the_audit(shop: EmbeddedShop, what: str) -> None:
    audit = shop.c("audit", "ledger", "--json")
    assert audit.exit_code == 3, audit.output
    assert what in audit.output, audit.output
    assert shop.c("halt", "status").exit_code == 3


def test_a_hold_released_twice_behind_a_rewritten_entry_is_found_by_the_ledger_audit(shop: EmbeddedShop) -> None:
    """The cancel releases "only a hold the ledger's entries still hold": the insider zeroes the
    first release's entry on the hold (the cached balances and the head untouched, so no
    posting notices), sets the request back to ``requested``, cancels it again with her own
    employee key, and puts the entry back. The customer is credited twice."""
    shop.deposit("acct-1")
    before = shop.ok("ledger", "balance", "acct-1")["balance_sat"]
    to, _ = destination()
    w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.01", *shop.as_("carol"))
    wid, owed = int(w["id"]), w["amount_sat"] + w["fee_sat"]
    shop.ok("withdraw", "cancel", str(wid), "--reason", "customer asked", *shop.as_("alice"))
    assert shop.ok("ledger", "balance", "acct-1")["balance_sat"] == before

    db = sqlite3.connect(shop.c.home / "custody.db")
    (entry,) = db.execute(
        "SELECT e.id FROM ledger_entry e JOIN ledger_txn t ON t.id = e.txn_id "
        "JOIN ledger_account a ON a.id = e.account_id "
        "WHERE t.event = 'withdrawal.released' AND t.ref = ? AND a.key = ?",
        (f"withdrawal:{wid}", f"held:withdrawal-{wid}"),
    ).fetchone()
    with db:  # the insider: the release's entry on the hold, gone for a moment; the request back
        db.execute("UPDATE ledger_entry SET amount = 0 WHERE id = ?", (entry,))
        db.execute("UPDATE withdrawal SET status = 'requested', reason = NULL WHERE id = ?", (wid,))
    shop.ok("withdraw", "cancel", str(wid), "--reason", "again", *shop.as_("alice"))
    with db:  # and back: every row as the audit log recorded it
        db.execute("UPDATE ledger_entry SET amount = ? WHERE id = ?", (owed, entry))
    db.close()
    assert shop.ok("ledger", "balance", "acct-1")["balance_sat"] == before + owed  # credited twice

    _found_by_the_audit(shop, f"held:withdrawal-{wid}")


def test_a_consolidation_settled_twice_behind_a_renamed_posting_is_found_by_the_ledger_audit(
    shop: EmbeddedShop,
) -> None:
    """Sync settles "once" by counting the ledger's settlement transactions for the row: the
    insider re-labels the first one's reference for a moment, sets the confirmed consolidation
    back to broadcast, lets sync settle it again, and puts the reference back. Its network fee
    is booked twice (the asset account short of the chain by it), and a consolidation has no
    hold to show it."""
    shop.deposit("acct-1", 3)
    cid = int(shop.ok("utxo", "consolidate", "--max-inputs", "3", *shop.as_("carol"))["id"])
    shop.approved_and_signed(cid)
    shop.ok("withdraw", "broadcast", str(cid))
    shop.chain.mine(1, OP_TRUE)
    shop.ok("sync")
    assert postings(shop, cid) == ["selftransfer.settled"]

    db = sqlite3.connect(shop.c.home / "custody.db")
    (txn,) = db.execute(
        "SELECT id FROM ledger_txn WHERE event = 'selftransfer.settled' AND ref = ?", (f"withdrawal:{cid}",)
    ).fetchone()
    with db:  # the insider: the settlement is someone else's for a moment; the row back
        db.execute("UPDATE ledger_txn SET ref = 'withdrawal:0' WHERE id = ?", (txn,))
        db.execute("UPDATE withdrawal SET status = 'broadcast', confirmations = 0 WHERE id = ?", (cid,))
    shop.chain.mine(1, OP_TRUE)
    assert [w["id"] for w in shop.ok("sync")] == [cid]  # settled again
    with db:
        db.execute("UPDATE ledger_txn SET ref = ? WHERE id = ?", (f"withdrawal:{cid}", txn))
    db.close()
    assert postings(shop, cid) == ["selftransfer.settled", "selftransfer.settled"]

    _found_by_the_audit(shop, f"withdrawal:{cid}")
