"""The red team's cancelled approved withdrawal: paid twice by one insider.

Two employees approve a withdrawal; each approval signs its exact unsigned transaction, and
the requester's signature covers it too. The offline signer checks those signatures against
the roster and the rulebook pinned on it: nothing there says the withdrawal was cancelled
since. Until one of its inputs is spent by another transaction, an approved withdrawal is a
live authorization. An insider (one employee who owns the online machine) exports its PSBT
while it is approved (an ordinary step), has it cancelled (which refunded the customer at
once), and later presents the PSBT to the founders: they see an ordinary, well-approved
withdrawal and sign; the customer is refunded and paid on chain.

Now a cancel of an approved withdrawal is a cancel by double-spend: its hold stays, and
nobody is refunded until a self-transfer of its inputs (or any other spend of one of them)
is ``CUSTODY_REFUND_CONFIRMATIONS`` deep. If the founders sign the insider's PSBT all the
same, ``custody sync`` follows that transaction as the payment its hold holds, once.
A withdrawal still short of approvals is cancelled and refunded at once, as before: the
offline signer refuses its PSBT. On the embedded chain, through the CLI.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from custody.bitcoin import psbt as psbt_lib
from custody.control.epochs import current_policy
from custody.store.db import Database
from custody.withdraw.psbt_io import build_psbt
from custody.withdraw.records import _get
from tests.test_withdraw_embedded import OP_TRUE, EmbeddedShop, destination
from tests.withdraw_support import postings


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path, "p2wsh")
    s.deposit("acct-1")
    yield s
    s.chain.close()


def _balance(shop: EmbeddedShop) -> int:
    return int(shop.ok("ledger", "balance", "acct-1")["balance_sat"])


def _approved_and_exported(shop: EmbeddedShop, to: str, amount: str) -> tuple[int, Path]:
    """A withdrawal requested by carol, approved by alice and bob, its PSBT exported (what the
    insider keeps): (its id, the PSBT file)."""
    w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", amount, *shop.as_("carol"))
    wid = int(w["id"])
    for who in ("alice", "bob"):
        shop.ok("withdraw", "approve", str(wid), *shop.as_(who), "--yes")
    psbt = shop.tmp / f"insider-{wid}.psbt"
    exported = shop.c("withdraw", "export", str(wid), str(psbt))
    assert exported.exit_code == 0, exported.output
    return wid, psbt


def _founders_sign(shop: EmbeddedShop, psbt: Path) -> bytes:
    """Two founders sign the PSBT the insider presents at their offline signers; the insider
    combines and finalizes it: the signed transaction."""
    signed = []
    for founder in ("founder-a", "founder-b"):
        out = shop.tmp / f"{psbt.stem}-{founder}.psbt"
        result = shop.c("sign", str(psbt), "--key", str(shop.founder_keys[founder]), "--out", str(out), "--yes")
        assert result.exit_code == 0, result.output  # the signer cannot know of the cancel
        signed.append(psbt_lib.Psbt.parse(out.read_bytes()))
    return bytes(psbt_lib.extract(psbt_lib.finalize(psbt_lib.combine(signed))).serialize())


def test_a_cancelled_approved_withdrawal_keeps_its_hold_and_its_signed_psbt_pays_it_once(
    shop: EmbeddedShop,
) -> None:
    before = _balance(shop)
    to, spk = destination()
    wid, psbt = _approved_and_exported(shop, to, "0.015")
    held = _balance(shop)
    assert held < before

    cancel = shop.ok("withdraw", "cancel", str(wid), "--reason", "customer asked", *shop.as_("alice"))
    assert cancel["id"] != wid and cancel["withdrawal_kind"] == "cancel"  # a cancel by double-spend, requested
    # (a) nobody refunded: the coins and the customer's balance stay held
    assert _balance(shop) == held
    assert shop.ok("withdraw", "show", str(wid))["status"] == "approved"
    assert postings(shop, wid) == ["withdrawal.requested"]

    # (b) the insider presents the PSBT; the founders sign it; it is sent and confirms
    txid = shop.chain.broadcast(_founders_sign(shop, psbt))
    shop.chain.mine(6, OP_TRUE)
    shop.ok("sync")
    shop.ok("sync")
    shown = shop.ok("withdraw", "show", str(wid))
    assert shown["status"] == "confirmed" and shown["txid"] == txid
    assert [u.amount for u in shop.chain.unspent([spk])] == [1_500_000]  # paid once
    assert _balance(shop) == held  # and never refunded
    assert postings(shop, wid) == ["withdrawal.requested", "withdrawal.settled"]
    assert shop.ok("withdraw", "show", str(cancel["id"]))["status"] == "failed"  # lost the race
    assert shop.c("audit", "ledger").exit_code == 0
    shop.chain.audit()


def test_a_cancelled_approved_withdrawal_is_refunded_once_its_cancel_confirms(shop: EmbeddedShop) -> None:
    before = _balance(shop)
    to, spk = destination()
    wid, psbt = _approved_and_exported(shop, to, "0.015")
    cid = int(shop.ok("withdraw", "cancel", str(wid), "--reason", "customer asked", *shop.as_("carol"))["id"])
    assert _balance(shop) < before

    # (c) the founders sign the cancel, it is sent and CUSTODY_REFUND_CONFIRMATIONS deep
    shop.approved_and_signed(cid)
    shop.ok("withdraw", "broadcast", str(cid))
    shop.chain.mine(6, OP_TRUE)
    shop.ok("sync")
    assert shop.ok("withdraw", "show", str(wid))["status"] == "failed"
    assert _balance(shop) == before  # refunded
    shop.ok("sync")
    assert _balance(shop) == before  # once
    assert postings(shop, wid) == ["withdrawal.requested", "withdrawal.released"]

    # the insider's PSBT still signs, but its inputs are gone: it can never pay
    raw = _founders_sign(shop, psbt)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the chain's refusal (missing inputs)
        shop.chain.broadcast(raw)
    assert shop.chain.unspent([spk]) == []
    shop.chain.audit()


def test_a_cancelled_approved_withdrawal_set_back_by_sql_is_not_refunded_at_once(shop: EmbeddedShop) -> None:
    """The insider deletes the approval rows and sets the row back to requested before the
    cancel: the audit log still names both approvers, so no refund at once."""
    to, _ = destination()
    wid, _psbt = _approved_and_exported(shop, to, "0.015")
    held = _balance(shop)
    with sqlite3.connect(shop.c.home / "custody.db") as db:
        db.execute("DELETE FROM approval WHERE withdrawal_id = ?", (wid,))
        db.execute("UPDATE withdrawal SET status = 'requested' WHERE id = ?", (wid,))
    cancelled = shop.c("withdraw", "cancel", str(wid), "--reason", "customer asked", *shop.as_("alice"))
    assert cancelled.exit_code == 6, cancelled.output  # a conflict: neither released nor replaced
    assert _balance(shop) == held
    assert postings(shop, wid) == ["withdrawal.requested"]


def test_a_withdrawal_short_of_approvals_is_refunded_at_once_and_the_signer_refuses_it(
    shop: EmbeddedShop,
) -> None:
    before = _balance(shop)
    to, _ = destination()
    w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.015", *shop.as_("carol"))
    wid = int(w["id"])
    shop.ok("withdraw", "approve", str(wid), *shop.as_("alice"), "--yes")
    db = Database(f"sqlite:///{shop.c.home / 'custody.db'}")  # the insider builds its PSBT from the rows
    with db.transaction() as s:
        psbt = build_psbt(s, current_policy(s), _get(s, wid))
    path = shop.tmp / "one-approval.psbt"
    path.write_text(psbt.to_base64())

    failed = shop.ok("withdraw", "cancel", str(wid), "--reason", "customer asked", *shop.as_("bob"))
    assert failed["id"] == wid and failed["status"] == "failed"
    assert _balance(shop) == before  # refunded at once, as before
    refused = shop.c("sign", str(path), "--key", str(shop.founder_keys["founder-a"]), "--out", str(path) + ".s")
    assert refused.exit_code == 4 and "approv" in refused.output, refused.output  # one of the two its tier needs
    assert not Path(str(path) + ".s").exists()


def _batch(shop: EmbeddedShop, to: str) -> tuple[int, list[int], Path]:
    """Two withdrawals approved by alice and bob, batched, the batch's PSBT exported (what the
    insider keeps): (batch id, member ids, the PSBT file)."""
    members = []
    for amount in ("0.001", "0.002"):
        w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", amount, *shop.as_("carol"))
        for who in ("alice", "bob"):
            shop.ok("withdraw", "approve", str(w["id"]), *shop.as_(who), "--yes")
        members.append(int(w["id"]))
    bid = int(shop.ok("withdraw", "batch", *shop.as_("carol"))["id"])
    psbt = shop.tmp / f"insider-b{bid}.psbt"
    assert shop.c("withdraw", "export", str(bid), str(psbt)).exit_code == 0
    return bid, members, psbt


def test_a_cancelled_batch_keeps_its_members_held_and_its_signed_psbt_pays_them_once(shop: EmbeddedShop) -> None:
    """The same through a batch: its members' approvals are its approvals, so a batch is a live
    authorization from the moment it is made. Dissolved at once (members back in the queue,
    still approved), the batch's PSBT signed all the same spends their inputs: a member's
    cancel then found its input spent by "another transaction" and refunded it, paid twice."""
    shop.deposit("acct-1")  # a second coin: one per member
    before = _balance(shop)
    to, spk = destination()
    bid, members, psbt = _batch(shop, to)
    held = _balance(shop)

    cancel = shop.ok("withdraw", "cancel", str(bid), "--reason", "redo", *shop.as_("alice"))
    assert cancel["id"] != bid and cancel["withdrawal_kind"] == "cancel"  # not dissolved
    assert {shop.ok("withdraw", "show", str(m))["batch_id"] for m in members} == {bid}

    txid = shop.chain.broadcast(_founders_sign(shop, psbt))
    shop.chain.mine(6, OP_TRUE)
    for m in members:  # an employee cancels a member: nothing to release, it is the batch's
        assert shop.c("withdraw", "cancel", str(m), "--reason", "again", *shop.as_("alice")).exit_code == 6
    shop.ok("sync")
    shop.ok("sync")
    assert shop.ok("withdraw", "show", str(bid))["status"] == "confirmed"
    assert shop.ok("withdraw", "show", str(bid))["txid"] == txid
    assert sorted(u.amount for u in shop.chain.unspent([spk])) == [100_000, 200_000]  # paid once
    assert _balance(shop) == held < before  # nobody refunded
    assert shop.c("audit", "ledger").exit_code == 0


def test_a_cancelled_batch_is_refunded_once_its_cancel_confirms(shop: EmbeddedShop) -> None:
    shop.deposit("acct-1")  # a second coin: one per member
    before = _balance(shop)
    to, spk = destination()
    bid, members, _psbt = _batch(shop, to)
    cid = int(shop.ok("withdraw", "cancel", str(bid), "--reason", "redo", *shop.as_("carol"))["id"])
    shop.approved_and_signed(cid)
    shop.ok("withdraw", "broadcast", str(cid))
    shop.chain.mine(6, OP_TRUE)
    shop.ok("sync")
    shop.ok("sync")
    assert {shop.ok("withdraw", "show", str(w))["status"] for w in [bid, *members]} == {"failed"}
    assert _balance(shop) == before  # every member refunded, once
    assert shop.chain.unspent([spk]) == []
    assert shop.c("audit", "ledger").exit_code == 0


def test_a_dropped_approved_bump_signed_all_the_same_gets_nobody_refunded(shop: EmbeddedShop) -> None:
    """A fee bump pays the same payment: dropping it once approved moves no money, but the
    offline signer still signs it (the transaction it replaces is in its journal). Confirmed,
    it spends the original's inputs: sync must not take that for a double spend and refund."""
    to, spk = destination()
    wid = shop.signed(to, "0.015")
    held = _balance(shop)
    bid = int(shop.ok("withdraw", "bump", str(wid), "--fee-rate", "6", *shop.as_("carol"))["id"])
    for who in ("alice", "bob"):
        shop.ok("withdraw", "approve", str(bid), *shop.as_(who), "--yes")
    psbt = shop.tmp / f"insider-bump-{bid}.psbt"
    assert shop.c("withdraw", "export", str(bid), str(psbt)).exit_code == 0
    dropped = shop.ok("withdraw", "cancel", str(bid), "--reason", "not needed", *shop.as_("alice"))
    assert dropped["id"] == bid and dropped["status"] == "failed"

    shop.chain.broadcast(_founders_sign(shop, psbt))
    shop.chain.mine(6, OP_TRUE)
    shop.ok("sync")
    shop.ok("sync")
    assert [u.amount for u in shop.chain.unspent([spk])] == [1_500_000]  # paid, by the bump
    assert _balance(shop) == held  # and not refunded
    assert shop.ok("withdraw", "show", str(wid))["status"] != "failed"
