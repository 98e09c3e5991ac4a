"""The double-entry ledger, in integer satoshis, and its cheap sum-to-zero check.

BitMEX's rule: after every deposit and withdrawal all accounts sum to zero; if they do
not, trading halts. Every custody event that moves money posts one balanced transaction
here, in the same database transaction as the event and its audit-log entry.

Sign convention
---------------
Each entry is a signed number of satoshis: a debit is positive, a credit negative. A
posting balances when its entries sum to zero, and the whole ledger sums to zero after
every posting. Balances shown to people are on the account's normal side: debit minus
credit for asset and expense accounts, credit minus debit for customer, held and income
accounts (what is owed, what was earned).

Chart of accounts
-----------------
========================  =========  ================================================================
account                   kind       what its balance is
========================  =========  ================================================================
``asset:onchain``         asset      coins at our addresses the ledger recognizes: credited deposits
                                     less what settled withdrawals sent away (payments and fees)
``customer:ACCT``         customer   what the exchange owes customer ACCT (the ``--account`` of its
                                     deposit addresses); never silently negative
``held:withdrawal-ID``    held       amount + fee of withdrawal ID between its request and its
                                     settlement; a batch's account holds its members' sums
``expense:network-fees``  expense    fees our confirmed transactions paid to miners
``income:withdrawal-fees`` income    fees charged to customers, earned when their withdrawal settles;
                                     less ``expense:network-fees``: what batching saved
========================  =========  ================================================================

Customer liabilities are the customer and held accounts together; ``custody audit
reserves`` compares them with the coins on chain.

Postings (Dr = debit, Cr = credit; A = amount, F = fee charged, P = fee paid on chain)
-----------------------------------------------------------------------------------------
* deposit credited (at CUSTODY_DEPOSIT_CONFIRMATIONS): Dr asset:onchain A, Cr customer A.
* deposit reversed by a reorganisation: Dr customer A, Cr asset:onchain A (posted even when
  the customer's balance goes negative; the trading halt is raised naming the account).
* withdrawal requested: Dr customer A+F, Cr held:withdrawal-ID A+F (refused beyond the
  customer's balance).
* batch created: for each member Dr held:withdrawal-MEMBER A+F, Cr held:withdrawal-BATCH.
  A cancelled batch posts the reverse (its members return to the queue, still held).
* broadcast: nothing moves; the coins leave when the transaction confirms.
* confirmed (settled): Dr held (sum of A+F), Cr asset:onchain (sum of A), Cr
  income:withdrawal-fees (sum of F), Dr expense:network-fees P, Cr asset:onchain P.
* failed or cancelled: Dr held, Cr each member's customer A+F.

The per-event check
-------------------
``ledger_head`` keeps the running total and count of all entries, updated with every
posting under its row lock. :func:`post` refuses a posting whose entries do not sum to zero
and a ledger whose running total is not zero; both checks read this one row and the
posting's own lines, so they cost the same at any ledger size. The refusal is
:class:`LedgerImbalance`: the event's transaction rolls back, then :func:`halting` raises
the trading halt (source ``ledger``) in a transaction of its own. ``custody audit ledger``
recomputes everything from the entries (custody.books.audit).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from custody.bitcoin.amounts import format_btc
from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log, halt
from custody.errors import HaltedError, InputError, NotFound, StorageError
from custody.store.db import Database
from custody.store.models import (
    AddressRow,
    AuditHead,
    DepositRow,
    LedgerAccount,
    LedgerEntry,
    LedgerHead,
    LedgerTxn,
    WithdrawalRow,
)

ASSET = "asset:onchain"
NETWORK_FEES = "expense:network-fees"
FEE_INCOME = "income:withdrawal-fees"

NORMAL_SIGN = {"asset": 1, "expense": 1, "customer": -1, "held": -1, "income": -1}
"""Multiply a raw (debit-positive) sum by this to get the balance on the account's normal side."""

LIABILITY_KINDS = ("customer", "held")

POSTED = "ledger.posted"
"""The audit event of every posting: its transaction, event, reference and entries (id, account, amount)."""


def customer(account: str) -> str:
    """The ledger account of customer ``account``."""
    return f"customer:{account}"


def held(withdrawal_id: int) -> str:
    """The ledger account holding withdrawal ``withdrawal_id``'s amount and fee in flight."""
    return f"held:withdrawal-{withdrawal_id}"


def _kind_and_name(key: str) -> tuple[str, str]:
    kind, sep, name = key.partition(":")
    if not sep or kind not in NORMAL_SIGN or not name:
        raise StorageError(f"{key!r} is not an account of the chart")
    return kind, name


class LedgerImbalance(HaltedError):
    """A posting or the ledger does not sum to zero; raised inside the event's transaction."""

    def __init__(self, reason: str, txn: str) -> None:
        self.reason = reason
        self.txn = txn
        super().__init__(f"ledger imbalance in {txn}: {reason}")


def halt_for_imbalance(db: Database, settings: Settings, exc: LedgerImbalance) -> HaltedError:
    """Raise the trading halt for an imbalance (after the event's transaction rolled back)."""
    raised = halt.raise_halt(db, settings, reason=str(exc), source="ledger", actor="ledger")
    return HaltedError(f"{exc} — the event was not recorded and trading is halted (halt #{raised.id})")


@contextmanager
def halting(db: Database, settings: Settings) -> Iterator[None]:
    """Turn a LedgerImbalance into the trading halt once the transaction inside rolled back.

    Use it outside the transaction: ``with ledger.halting(db, settings), db.transaction() as s:``.
    """
    try:
        yield
    except LedgerImbalance as exc:
        raise halt_for_imbalance(db, settings, exc) from None


# ---------------------------------------------------------------- posting


def _head(s: Session) -> LedgerHead:
    # Lock order as everywhere else: the audit head first (halt.guard, audit_log.append), then ours.
    s.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()
    head = s.exec(select(LedgerHead).where(LedgerHead.id == 1).with_for_update()).first()
    if head is None:
        raise StorageError("the store has no ledger head: run `custody init`")
    return head


def check(s: Session) -> LedgerHead:
    """The per-event check: the ledger's running total is zero. Constant time (one row).

    Raises LedgerImbalance when it is not; StorageError without a ledger head.
    """
    head = _head(s)
    if head.total != 0:
        raise LedgerImbalance(
            f"all accounts sum to {head.total} sat, not zero, over {head.entries} entries", "the ledger head"
        )
    return head


def _accounts(s: Session, keys: Sequence[str]) -> dict[str, LedgerAccount]:
    """The accounts named, created (at zero) where missing; the caller holds the head lock."""
    wanted = sorted(set(keys))
    found = {a.key: a for a in s.exec(select(LedgerAccount).where(col(LedgerAccount.key).in_(wanted))).all()}
    for key in wanted:
        if key not in found:
            kind, name = _kind_and_name(key)
            account = LedgerAccount(key=key, kind=kind, name=name, balance=0, created_at=now())
            s.add(account)
            found[key] = account
    s.flush()
    return found


def post(s: Session, event: str, lines: Sequence[tuple[str, int]], *, ref: str, memo: str = "") -> LedgerTxn:
    """Post one balanced transaction of ``lines`` (account key, debit-positive satoshis).

    Inside the caller's transaction: the entries, the cached balances and the running head
    change together. Raises LedgerImbalance when the lines do not sum to zero or the ledger
    did not sum to zero before (the caller rolls back and halts, see :func:`halting`);
    StorageError for an account outside the chart.
    """
    lines = [(key, int(amount)) for key, amount in lines if amount != 0]
    txn_name = f"the posting of {event} for {ref}"
    if not lines:
        raise LedgerImbalance("it has no entries", txn_name)
    total = sum(amount for _, amount in lines)
    if total != 0:
        raise LedgerImbalance(f"its {len(lines)} entries sum to {total} sat, not zero", txn_name)
    head = _head(s)
    if head.total != 0:
        raise LedgerImbalance(f"all accounts summed to {head.total} sat before it, not zero", txn_name)
    accounts = _accounts(s, [key for key, _ in lines])
    txn = LedgerTxn(at=now(), event=event, ref=ref, memo=memo, entries=len(lines), total=total)
    s.add(txn)
    s.flush()
    rows = []
    for key, amount in lines:
        account = accounts[key]
        row = LedgerEntry(txn_id=txn.id or 0, account_id=account.id or 0, amount=amount)
        s.add(row)
        rows.append((row, key))
        account.balance += amount
        s.add(account)
    head.total += total
    head.entries += len(lines)
    head.txns += 1
    s.add(head)
    s.flush()
    if head.total != 0:  # the check after the event: still zero
        raise LedgerImbalance(f"all accounts sum to {head.total} sat after it", txn_name)
    # The log is the truth: the posting, line by line, joins the hash chain in this same
    # transaction; the audits compare every entry row with it.
    audit_log.append(
        s,
        POSTED,
        "ledger",
        {"txn": txn.id, "event": event, "ref": ref, "entries": [[e.id, key, e.amount] for e, key in rows]},
    )
    return txn


# ---------------------------------------------------------------- balances


def raw_balance(s: Session, key: str) -> int:
    """The cached debit-positive sum of account ``key`` (0 when it has no entries)."""
    account = s.exec(select(LedgerAccount).where(LedgerAccount.key == key)).first()
    return account.balance if account is not None else 0


def customer_balance(s: Session, account: str) -> int:
    """What the exchange owes customer ``account``, in satoshis (may be negative after a reorg)."""
    return -raw_balance(s, customer(account))


def _btc(sats: int) -> str:
    return f"-{format_btc(-sats)}" if sats < 0 else format_btc(sats)


def _ref(row: WithdrawalRow) -> str:
    return f"withdrawal:{row.id}"


def withdrawal_requested(s: Session, row: WithdrawalRow) -> LedgerTxn:
    """Hold the amount and fee of a new withdrawal from its customer's balance.

    Raises InputError (exit 2) when the customer's balance does not cover amount + fee.
    """
    need = row.amount + row.fee
    have = customer_balance(s, row.account)
    if have < need:
        raise InputError(
            f"account {row.account!r} has a balance of {_btc(have)} BTC ({have} sat); withdrawing "
            f"{_btc(row.amount)} BTC ({row.amount} sat) plus the fee of {row.fee} sat needs {need} sat"
        )
    return post(
        s,
        "withdrawal.requested",
        [(customer(row.account), need), (held(row.id or 0), -need)],
        ref=_ref(row),
        memo=f"{row.amount} sat to {row.destination}, fee {row.fee} sat",
    )


SWEEP = "sweep"  # custody.withdraw.sweep: a self-transfer to the newest policy, no customer's
CONSOLIDATION = "consol"  # custody.withdraw.utxo.consolidate: many coins into one, no customer's
"""The two self-transfers that custody.withdraw.broadcast.sync follows as it follows a withdrawal
(a cancel and a child paying for its parent are followed with the withdrawal they are for)."""


def holding(s: Session, withdrawal_id: int) -> int:
    """What withdrawal ``withdrawal_id``'s hold account holds now, summed from its entries (not
    the cached balance, which an SQL edit may fix up): its amount and fee while it is held, 0
    once released, settled or moved into a batch."""
    from sqlalchemy import func

    total = s.exec(
        select(func.sum(LedgerEntry.amount))
        .join(LedgerAccount, col(LedgerAccount.id) == col(LedgerEntry.account_id))
        .where(LedgerAccount.key == held(withdrawal_id))
    ).one()
    return -int(total or 0)


def withdrawal_released(s: Session, row: WithdrawalRow, members: Sequence[WithdrawalRow], why: str) -> LedgerTxn | None:
    """A failed or cancelled withdrawal (or batch): each member's amount + fee back to its customer.
    A sweep or a consolidation held nothing: nothing is posted (None)."""
    if row.kind in (SWEEP, CONSOLIDATION):
        return None
    members = members or [row]
    lines: list[tuple[str, int]] = [(held(row.id or 0), sum(m.amount + m.fee for m in members))]
    lines += [(customer(m.account), -(m.amount + m.fee)) for m in members]
    return post(s, "withdrawal.released", lines, ref=_ref(row), memo=why)


def batch_created(s: Session, batch: WithdrawalRow, members: Sequence[WithdrawalRow]) -> LedgerTxn:
    """Move the members' holds into the batch's."""
    lines = [(held(m.id or 0), m.amount + m.fee) for m in members]
    lines.append((held(batch.id or 0), -sum(m.amount + m.fee for m in members)))
    return post(s, "batch.created", lines, ref=_ref(batch), memo=f"members {', '.join(str(m.id) for m in members)}")


def batch_dissolved(s: Session, batch: WithdrawalRow, members: Sequence[WithdrawalRow]) -> LedgerTxn:
    """A cancelled batch gives its members their holds back (they return to the queue). The tool
    no longer posts it (a batch is a live authorization: it is cancelled by double-spend, its
    members refunded when that confirms); kept for what stores from before carry."""
    lines = [(held(m.id or 0), -(m.amount + m.fee)) for m in members]
    lines.append((held(batch.id or 0), sum(m.amount + m.fee for m in members)))
    return post(s, "batch.dissolved", lines, ref=_ref(batch), memo=f"members {', '.join(str(m.id) for m in members)}")


SETTLED_EVENTS = ("withdrawal.settled", "sweep.settled", "selftransfer.settled")
UNSETTLED_EVENTS = ("withdrawal.unsettled", "sweep.unsettled", "selftransfer.unsettled")
"""A settlement's postings and their reversals': per withdrawal, the first less the second is 0 or 1
(checked as each is posted, and by ``custody audit ledger``)."""


def _settles_once(s: Session, row: WithdrawalRow, settling: bool) -> None:
    """Refuse a settlement of ``row`` the ledger already holds (or a reversal of one it does not):
    its settlements less their reversals are 0 or 1. A confirmed row set back to broadcast by SQL
    would otherwise be confirmed by the next sync again: its fee (and a customer's payout) booked
    twice, by postings the audit log records as the tool's. Raises LedgerImbalance (a halt)."""
    from sqlalchemy import func

    def count(events: tuple[str, ...]) -> int:
        found = select(func.count()).where(LedgerTxn.ref == _ref(row), col(LedgerTxn.event).in_(events))
        return int(s.exec(found).one())

    standing = count(SETTLED_EVENTS) - count(UNSETTLED_EVENTS)
    if standing != (0 if settling else 1):
        what = "settled" if settling else "unsettled"
        raise LedgerImbalance(
            f"withdrawal #{row.id} has {standing} settlement(s) in the ledger standing: it cannot be {what} again "
            "(its row was set back behind the tool's back?); run `custody audit ledger`",
            f"the settlement of withdrawal #{row.id}",
        )


def withdrawal_settled(
    s: Session, row: WithdrawalRow, members: Sequence[WithdrawalRow], network_fee: int | None = None
) -> LedgerTxn:
    """A confirmed withdrawal (or batch): the hold leaves the asset account; fees booked.

    ``row.fee`` is what the transaction paid, unless ``network_fee`` says otherwise (a fee bump
    confirmed: the replacement's); the members' fees are what they were charged. A sweep moves
    coins between custody's own addresses: only its network fee leaves the asset; so does a
    consolidation (posted as every self-transfer is: :func:`self_transfer_settled`).
    """
    if row.kind == CONSOLIDATION:
        return self_transfer_settled(s, row)
    _settles_once(s, row, True)
    if row.kind == SWEEP:
        return post(
            s, "sweep.settled", [(NETWORK_FEES, row.fee), (ASSET, -row.fee)], ref=_ref(row), memo=f"txid {row.txid}"
        )
    members = members or [row]
    paid_out = sum(m.amount for m in members)
    charged = sum(m.fee for m in members)
    paid_fee = row.fee if network_fee is None else network_fee
    lines = [
        (held(row.id or 0), paid_out + charged),
        (ASSET, -paid_out),
        (FEE_INCOME, -charged),
        (NETWORK_FEES, paid_fee),
        (ASSET, -paid_fee),
    ]
    return post(s, "withdrawal.settled", lines, ref=_ref(row), memo=f"txid {row.txid}")


def withdrawal_unsettled(
    s: Session, row: WithdrawalRow, members: Sequence[WithdrawalRow], network_fee: int | None = None
) -> LedgerTxn:
    """A confirmed withdrawal a reorganisation took out of the chain: its settlement reversed,
    the hold back in place until it confirms again. ``network_fee``: the fee its settlement
    booked, when not ``row.fee`` (a fee bump had confirmed). A consolidation's fee no longer
    booked (:func:`self_transfer_unsettled`)."""
    if row.kind == CONSOLIDATION:
        return self_transfer_unsettled(s, row)
    _settles_once(s, row, False)
    if row.kind == SWEEP:
        return post(
            s, "sweep.unsettled", [(NETWORK_FEES, -row.fee), (ASSET, row.fee)], ref=_ref(row), memo=f"txid {row.txid}"
        )
    members = members or [row]
    paid_out = sum(m.amount for m in members)
    charged = sum(m.fee for m in members)
    paid_fee = row.fee if network_fee is None else network_fee
    lines = [
        (held(row.id or 0), -(paid_out + charged)),
        (ASSET, paid_out),
        (FEE_INCOME, charged),
        (NETWORK_FEES, -paid_fee),
        (ASSET, paid_fee),
    ]
    return post(s, "withdrawal.unsettled", lines, ref=_ref(row), memo=f"txid {row.txid} no longer confirmed")


def self_transfer_settled(s: Session, row: WithdrawalRow) -> LedgerTxn:
    """A confirmed self-transfer (a cancel, a child paying for its parent, a consolidation): its
    coins stay custody's; only its network fee leaves the asset account, at the house's cost."""
    _settles_once(s, row, True)
    return post(
        s,
        "selftransfer.settled",
        [(NETWORK_FEES, row.fee), (ASSET, -row.fee)],
        ref=_ref(row),
        memo=f"{row.kind} txid {row.txid}",
    )


def self_transfer_unsettled(s: Session, row: WithdrawalRow) -> LedgerTxn:
    """A confirmed self-transfer a reorganisation took out of the chain: its fee no longer
    booked until it confirms again."""
    _settles_once(s, row, False)
    return post(
        s,
        "selftransfer.unsettled",
        [(NETWORK_FEES, -row.fee), (ASSET, row.fee)],
        ref=_ref(row),
        memo=f"{row.kind} txid {row.txid} no longer confirmed",
    )


def deposit_credited(s: Session, dep: DepositRow) -> LedgerTxn:
    return post(
        s,
        "deposit.credited",
        [(ASSET, dep.amount), (customer(dep.account), -dep.amount)],
        ref=f"deposit:{dep.outpoint}",
        memo=f"{dep.address} at height {dep.height}",
    )


def deposit_reversed(s: Session, dep: DepositRow) -> LedgerTxn:
    return post(
        s,
        "deposit.reversed",
        [(customer(dep.account), dep.amount), (ASSET, -dep.amount)],
        ref=f"deposit:{dep.outpoint}",
        memo=f"{dep.address}: no longer confirmed (chain reorganisation)",
    )


# ---------------------------------------------------------------- views


def _account_dict(a: LedgerAccount) -> dict[str, Any]:
    balance = a.balance * NORMAL_SIGN.get(a.kind, 1)
    return {
        "account": a.key,
        "kind": a.kind,
        "name": a.name,
        "balance_sat": balance,
        "balance": _btc(balance),
        "raw_sat": a.balance,
        "normal_side": "debit" if NORMAL_SIGN.get(a.kind, 1) == 1 else "credit",
    }


def resolve(s: Session, account: str) -> str:
    """An account key from what a person typed: an account key, else a customer account."""
    if s.exec(select(LedgerAccount.id).where(LedgerAccount.key == account)).first() is not None:
        return account
    return customer(account)


def balances(db: Database, account: str | None = None) -> dict[str, Any]:
    """Every account's balance with the totals, or one account's.

    Raises NotFound for an account that has neither entries nor deposit addresses.
    """
    db.check_schema()
    with db.transaction() as s:
        head = s.get(LedgerHead, 1)
        if account is not None:
            key = resolve(s, account)
            row = s.exec(select(LedgerAccount).where(LedgerAccount.key == key)).first()
            if row is not None:
                return _account_dict(row)
            if s.exec(select(AddressRow.id).where(AddressRow.account == account)).first() is None:
                raise NotFound(f"no ledger account {account!r} (and no customer account of that name)")
            return _account_dict(LedgerAccount(key=key, kind="customer", name=account, balance=0, created_at=now()))
        rows = [_account_dict(a) for a in s.exec(select(LedgerAccount).order_by(col(LedgerAccount.key))).all()]
    by_kind: dict[str, int] = {}
    for r in rows:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + r["balance_sat"]
    customers, held_total = by_kind.get("customer", 0), by_kind.get("held", 0)
    return {
        "accounts": rows,
        "totals": {
            "sum_sat": sum(r["raw_sat"] for r in rows),
            "asset_sat": by_kind.get("asset", 0),
            "customers_sat": customers,
            "held_sat": held_total,
            "liabilities_sat": customers + held_total,
            "network_fees_sat": by_kind.get("expense", 0),
            "fee_income_sat": by_kind.get("income", 0),
            "fee_savings_sat": by_kind.get("income", 0) - by_kind.get("expense", 0),
        },
        "head": {"total_sat": head.total, "entries": head.entries, "txns": head.txns} if head else None,
    }


ENTRY_COLUMNS = ("entry", "txn", "at", "event", "ref", "account", "debit_sat", "credit_sat", "memo")


def iter_entries(db: Database, account: str | None = None, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """Ledger entries in posting order (optionally of one account), read in batches.

    Raises NotFound for an account with no ledger entries at all.
    """
    db.check_schema()
    with db.transaction() as s:
        account_id = None
        if account is not None:
            key = resolve(s, account)
            account_id = s.exec(select(LedgerAccount.id).where(LedgerAccount.key == key)).first()
            if account_id is None:
                raise NotFound(f"no ledger account {account!r}")
        keys = {a.id: a.key for a in s.exec(select(LedgerAccount)).all()}
    last = 0
    while True:
        with db.transaction() as s:
            query = (
                select(LedgerEntry, LedgerTxn)
                .join(LedgerTxn, col(LedgerTxn.id) == col(LedgerEntry.txn_id))
                .where(col(LedgerEntry.id) > last)
            )
            if account_id is not None:
                query = query.where(LedgerEntry.account_id == account_id)
            rows = s.exec(query.order_by(col(LedgerEntry.id)).limit(batch)).all()
        if not rows:
            return
        for e, t in rows:
            yield {
                "entry": e.id,
                "txn": t.id,
                "at": iso(t.at),
                "event": t.event,
                "ref": t.ref,
                "account": keys.get(e.account_id, f"#{e.account_id}"),
                "debit_sat": e.amount if e.amount > 0 else 0,
                "credit_sat": -e.amount if e.amount < 0 else 0,
                "memo": t.memo,
            }
        last = rows[-1][0].id or last


@dataclass(frozen=True)
class Totals:
    """What the reserves audit compares with the chain."""

    customers: int
    held: int
    asset: int

    @property
    def liabilities(self) -> int:
        return self.customers + self.held


def totals(s: Session) -> Totals:
    """Customer and held liabilities and the recognized assets, from the cached balances."""
    from sqlalchemy import func

    sums = dict(s.exec(select(LedgerAccount.kind, func.sum(LedgerAccount.balance)).group_by(LedgerAccount.kind)).all())
    return Totals(
        customers=-int(sums.get("customer") or 0),
        held=-int(sums.get("held") or 0),
        asset=int(sums.get("asset") or 0),
    )
