"""Following a withdrawal and its replacements (fee bumps, cancels, children paying for a
parent: custody.withdraw.replace makes them) on the chain: ``custody sync``'s part for them.

* Whichever version confirms ``confirmations`` deep settles the withdrawal with that
  transaction's txid and the fee it actually paid, once; a cancel must be
  ``refund_confirmations`` deep, and then fails the withdrawal and gives its customer amount
  and fee back (the cancel's own fee is the house's).
* The versions that lost are failed only once the winner is ``refund_confirmations`` deep:
  until then a reorganisation can still let one of them confirm instead.
* A reorganisation that takes the settled version out of the chain (while the withdrawal is
  shallower than :data:`custody.withdraw.broadcast.REORG_DEPTH`) puts the withdrawal back to
  broadcast, its inputs reserved again and its settlement reversed (the fee that was booked,
  the winner's); whichever version confirms next settles it again, once.
* No version confirmed, and another transaction (none of ours) spends one of its inputs in a
  block ``refund_confirmations`` deep: the withdrawal fails, its customer is refunded once, and
  every version fails with it (the rule custody.withdraw.broadcast applies to a withdrawal
  without replacements).

A reorganisation deeper than ``refund_confirmations`` that undoes a cancel's refund, or lets a
version confirm that was failed, is not followed: that depth is what custody takes as final
(CUSTODY_REFUND_CONFIRMATIONS), as for a refund by proof of a double spend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bitcoin.core import CTransaction, b2lx, b2x, x
from sqlmodel import Session, select

from custody.books import ledger
from custody.chain.types import ChainBackend, OutputSpend, TxStatus
from custody.control import audit_log
from custody.control.epochs import current_policy as policy_from_session
from custody.faults import crash_point
from custody.store.db import Database
from custody.store.models import ReplacementRow, WithdrawalRow
from custody.withdraw import limits as wd_limits
from custody.withdraw import records as wd_records
from custody.withdraw import replacements
from custody.withdraw import selftransfer as st
from custody.withdraw import states as wd_states
from custody.withdraw.broadcast import (
    REORG_DEPTH,
    check_logged,
    final_matches,
    refund,
    refund_reason,
    reserve_again,
    spent_by,
)
from custody.withdraw.replacements import replacements_of
from custody.withdraw.states import Event

CANCEL = st.CANCEL
CPFP = st.CPFP
DONE = (wd_states.CONFIRMED, wd_states.FAILED)


@dataclass(frozen=True)
class _Look:
    """What the chain says of one group: each version's transaction (by row id), the one the
    withdrawal is settled with (when it is), and a foreign spend of its inputs (when no
    version is in a block)."""

    versions: dict[int, TxStatus]
    settled: TxStatus | None = None
    conflict: OutputSpend | None = None
    original: bytes | None = None
    """The original's transaction as the chain has it, when we hold none (approved, then
    cancelled, and signed elsewhere all the same): its status is in ``versions``."""


def _next(row: WithdrawalRow, event: Event) -> str:
    return wd_states.next_state(row.status, event)


def _own_txid(row: WithdrawalRow) -> str | None:
    """The txid of a version's own transaction (the original's ``txid`` column holds the
    winner's once the withdrawal is settled)."""
    if row.final_tx:
        return str(b2lx(CTransaction.deserialize(x(row.final_tx)).GetTxid()))
    return row.txid


def _groups(s: Session, tip: int) -> list[int]:
    """Withdrawals with replacements that are not settled yet, or settled shallow enough for
    a reorganisation to take out."""
    out = set()
    for r in s.exec(select(ReplacementRow)).all():
        original, row = s.get(WithdrawalRow, r.original_id), s.get(WithdrawalRow, r.withdrawal_id)
        if original is None or replacements.dropped(row):
            continue  # the queue's own sync follows the original (replacements.grouped)
        if original.status not in DONE or (row is not None and row.status not in DONE):
            out.add(r.original_id)
        elif original.status == wd_states.CONFIRMED and (
            original.block_height is None or tip - original.block_height < REORG_DEPTH
        ):
            out.add(r.original_id)
    return sorted(out)


def _versions(s: Session, original: WithdrawalRow) -> dict[int, WithdrawalRow]:
    """Row id -> version with a transaction to look for: the original and its replacements
    not failed; a replacement sharing the original's stored txid is that transaction's row."""
    rows = [r for r in replacements_of(s, original.id or 0) if r.status != wd_states.FAILED and r.txid]
    taken = {r.txid for r in rows}
    own = _own_txid(original)
    first = [original] if own and own not in taken else []
    return {r.id or 0: r for r in [*first, *rows]}


def _winner(s: Session, original: WithdrawalRow) -> WithdrawalRow:
    """The version a settled withdrawal was settled with (its ``txid``)."""
    for r in replacements_of(s, original.id or 0):
        if r.txid == original.txid and r.kind != CPFP and r.status != wd_states.FAILED:
            return r
    return original


def _foreign_spend(
    backend: ChainBackend, outpoints: Sequence[tuple[str, int]], ours: Sequence[str]
) -> OutputSpend | None:
    """The deepest spend in a block of one of ``outpoints`` by a transaction that is none of
    ``ours`` (unsigned transactions: any version, whatever its state), or None (also when one
    of ours is in a block: its own status says which)."""
    spend, raw = spent_by(backend, outpoints, ours)
    return None if raw is not None else spend


def _look(db: Database, backend: ChainBackend, wid: int) -> tuple[list[tuple[int, str, str | None]], _Look]:
    """Ask the chain about group ``wid`` (no lock held while asking); with the group's
    fingerprint to compare under the lock."""
    with db.transaction() as s:
        original = wd_records._get(s, wid)
        every = [original, *replacements_of(s, wid)]
        before = [(r.id or 0, r.status, r.txid) for r in every]
        wanted = {rid: _own_txid(r) or "" for rid, r in _versions(s, original).items()}
        settled_txid = original.txid if original.status == wd_states.CONFIRMED else None
        outpoints = [(i.txid, i.vout) for i in wd_records._inputs(s, wid)] if original.batch_id is None else []
        ours = [r.unsigned_tx for r in every]
        open_ = original.status not in DONE
        unseen = open_ and _own_txid(original) is None  # approved, never finalized here
    statuses = {rid: backend.tx_status(txid) for rid, txid in wanted.items()}
    settled = backend.tx_status(settled_txid) if settled_txid else None
    conflict, raw = None, None
    if unseen and outpoints:
        spend, raw = spent_by(backend, outpoints, [ours[0]])
        if raw is not None and spend is not None and spend.spender is not None:
            statuses[wid] = backend.tx_status(spend.spender)
    if open_ and outpoints and not any(v.confirmations > 0 for v in statuses.values()):
        conflict = _foreign_spend(backend, outpoints, ours)
    return before, _Look(statuses, settled, conflict, raw)


def sync_replacements(
    db: Database, backend: ChainBackend, limits: wd_limits.Limits = wd_limits.Limits(), *, settings: Any
) -> list[dict[str, Any]]:
    """Follow every withdrawal that has replacements (see the module's docstring); return the
    rows that changed. Raises NodeError; HaltedError after raising the halt when the ledger
    does not balance."""
    changed: list[dict[str, Any]] = []
    tip = backend.tip_height()
    with db.transaction() as s:
        groups = _groups(s, tip)
    for wid in groups:
        before, look = _look(db, backend, wid)
        with ledger.halting(db, settings), db.transaction() as s:
            policy = policy_from_session(s)
            original = wd_records._get(s, wid, lock=True)
            if [(r.id or 0, r.status, r.txid) for r in [original, *replacements_of(s, wid)]] != before:
                continue  # moved on meanwhile: the next sync looks again
            _check_versions(s, original)
            rows = _follow_group(s, original, look, limits)
            changed += [wd_records.view(s, policy, r) for r in {r.id: r for r in rows}.values()]
    return changed


def _check_versions(s: Session, original: WithdrawalRow) -> None:
    """Raise LedgerImbalance (a halt) unless each version's stored transaction is its own: a
    final transaction that is its approved one with signatures added, and a replacement's
    ``txid`` that final transaction's. Which version the chain shows is judged by them; an
    insider who gave a cancel's row the payment's transaction would have the payment taken for
    the cancel, and the customer refunded while paid."""
    for r in [original, *replacements_of(s, original.id or 0)]:
        try:
            own = bool(r.final_tx) and final_matches(r)
            txid = b2lx(CTransaction.deserialize(x(r.final_tx)).GetTxid()) if own and r.final_tx else None
        except Exception:  # noqa: BLE001 - python-bitcoinlib raises several types for a bad transaction
            own, txid = False, None
        if (r.final_tx and not own) or (r is not original and r.txid and r.txid != txid):
            raise ledger.LedgerImbalance(
                f"withdrawal #{r.id}'s stored transaction is not its approved one (its row was rewritten behind the "
                "tool's back): nothing followed; run `custody audit log --verify`",
                f"the sync of withdrawal #{original.id}",
            )


def _follow_group(s: Session, original: WithdrawalRow, look: _Look, limits: wd_limits.Limits) -> list[WithdrawalRow]:
    """Apply what the chain says to a withdrawal and its replacements (locked)."""
    changed: list[WithdrawalRow] = []
    if look.original is not None and not original.final_tx and wd_states.can(original.status, Event.SEEN_ON_CHAIN):
        changed += _seen(s, original, look)
    if original.status == wd_states.CONFIRMED and look.settled is not None:
        changed += _follow_settled(s, original, look.settled, limits)
    if original.status not in DONE:
        changed += _follow_versions(s, original, look, limits)
    conflict = look.conflict
    if original.status not in DONE and conflict is not None and conflict.confirmations >= limits.refund_confirmations:
        changed += _refunded(s, original, conflict)
    changed += _fail_losers(s, original, look, limits)
    return changed + _follow_children(s, original, look, limits)


def _seen(s: Session, original: WithdrawalRow, look: _Look) -> list[WithdrawalRow]:
    """The original's own transaction is on the chain though nobody finalized it here (an
    approved withdrawal cancelled, whose PSBT founders signed all the same): it is broadcast,
    its final transaction the chain's, and followed as the payment its hold still holds."""
    assert look.original is not None
    original.final_tx = b2x(look.original)
    original.txid = look.versions[original.id or 0].txid
    if not final_matches(original):  # cannot be: the chain's is ours with signatures added
        raise ledger.LedgerImbalance(
            f"withdrawal #{original.id}'s transaction on the chain is not its approved one",
            f"the sync of withdrawal #{original.id}",
        )
    wd_records._touch(s, original, _next(original, Event.SEEN_ON_CHAIN))
    audit_log.append(
        s,
        "withdrawal.broadcast",
        "sync",
        {"withdrawal_id": original.id, "txid": original.txid, "seen_on_chain": True},
    )
    return [original]


def _follow_settled(
    s: Session, original: WithdrawalRow, status: TxStatus, limits: wd_limits.Limits
) -> list[WithdrawalRow]:
    """A settled withdrawal: its depth kept; taken out by a reorganisation, unsettled."""
    winner = _winner(s, original)
    if status.confirmations < limits.confirmations:
        _unsettled(s, original, winner, status)
        return [original, winner]
    if (original.confirmations, original.block_height) == (status.confirmations, status.block_height):
        return []
    for r in {original.id: original, winner.id: winner}.values():
        r.confirmations, r.block_height = status.confirmations, status.block_height
        wd_records._touch(s, r)
    return [original, winner]


def _unsettled(s: Session, original: WithdrawalRow, winner: WithdrawalRow, status: TxStatus) -> None:
    """A reorganisation took the settled version out of the chain: the withdrawal (and that
    version) back to broadcast, its inputs reserved again, the settlement reversed with the
    fee it booked."""
    for r in {original.id: original, winner.id: winner}.values():
        r.confirmations, r.block_height = status.confirmations, status.block_height
        wd_records._touch(s, r, _next(r, Event.REORGED))
    wid = original.id or 0
    reserve_again(s, original)
    txn = ledger.withdrawal_unsettled(s, original, wd_records._members(s, wid), network_fee=winner.fee)
    crash_point("group.reorged")
    audit_log.append(
        s,
        "withdrawal.reorged",
        "sync",
        {
            "withdrawal_id": wid,
            "txid": original.txid,
            "version": winner.id,
            "fee_paid": winner.fee,
            "in_mempool": status.in_mempool,
            "ledger_txn": txn.id,
        },
    )


def _follow_versions(s: Session, original: WithdrawalRow, look: _Look, limits: wd_limits.Limits) -> list[WithdrawalRow]:
    """No version settled yet: the one the chain has, once deep enough; the depth of those on
    their way kept (a reorganisation can take one back to none)."""
    versions = {rid: r for rid, r in _versions(s, original).items() if r.kind != CPFP}
    moved = []
    for rid, r in versions.items():
        seen = look.versions.get(rid)
        if seen is not None and (r.confirmations, r.block_height) != (seen.confirmations, seen.block_height):
            r.confirmations, r.block_height = seen.confirmations, seen.block_height
            wd_records._touch(s, r)
            moved.append(r)
    winner = next((versions[rid] for rid, v in look.versions.items() if rid in versions and v.confirmations > 0), None)
    if winner is None:
        return moved
    status = look.versions[winner.id or 0]
    depth = limits.refund_confirmations if winner.kind == CANCEL else limits.confirmations
    if status.confirmations < depth:
        return moved
    if winner.kind == CANCEL:
        _cancelled(s, original, winner, status)
    else:
        _settled(s, original, winner, status)
    return [original, winner]


def _fail_losers(s: Session, original: WithdrawalRow, look: _Look, limits: wd_limits.Limits) -> list[WithdrawalRow]:
    """Once the winner is ``refund_confirmations`` deep, the versions that lost fail."""
    winner: WithdrawalRow | None
    if original.status == wd_states.CONFIRMED:
        winner, status = _winner(s, original), look.settled
    else:
        winner = next(
            (r for r in replacements_of(s, original.id or 0) if r.kind == CANCEL and r.status == wd_states.CONFIRMED),
            None,
        )
        status = look.versions.get(winner.id or 0) if winner is not None else None
    if winner is None or status is None or status.confirmations < limits.refund_confirmations:
        return []
    losers = [
        r for r in replacements_of(s, original.id or 0) if r.id != winner.id and r.kind != CPFP and r.status not in DONE
    ]
    for r in losers:
        wd_records._touch(
            s, r, _next(r, Event.REPLACED), f"transaction {winner.txid} of #{winner.id} confirmed instead"
        )
        audit_log.append(s, "withdrawal.failed", "sync", {"withdrawal_id": r.id, "replaced_by": winner.txid})
    return losers


def _follow_children(s: Session, original: WithdrawalRow, look: _Look, limits: wd_limits.Limits) -> list[WithdrawalRow]:
    """Children paying for a version: settled when they confirm, back to broadcast (their fee
    no longer booked) when a reorganisation takes them out; failed when the withdrawal failed,
    or when another version than their parent confirmed ``refund_confirmations`` deep (their
    input no longer exists)."""
    changed = []
    deep = original.status == wd_states.CONFIRMED and (
        look.settled is not None and look.settled.confirmations >= limits.refund_confirmations
    )
    live = (wd_states.BROADCAST, wd_states.CONFIRMED)
    for child in (r for r in replacements_of(s, original.id or 0) if r.kind == CPFP and r.status in live):
        status = look.versions.get(child.id or 0)
        if child.status == wd_states.CONFIRMED:
            if status is not None and status.confirmations < limits.confirmations:
                _child_unsettled(s, child, status)
                changed.append(child)
        elif status is not None and status.confirmations >= limits.confirmations:
            st.settle(s, child, status.confirmations, status.block_height)
            changed.append(child)
        elif original.status == wd_states.FAILED or (
            deep and original.txid != wd_records._inputs(s, child.id or 0)[0].txid
        ):
            wd_records._touch(s, child, _next(child, Event.REPLACED), f"its parent was replaced by {original.txid}")
            wd_records._release(s, child.id or 0)
            audit_log.append(s, "withdrawal.failed", "sync", {"withdrawal_id": child.id, "parent_replaced": True})
            changed.append(child)
    return changed


def _child_unsettled(s: Session, child: WithdrawalRow, status: TxStatus) -> None:
    """A reorganisation took a confirmed child out: back to broadcast, its input reserved
    again, its fee no longer booked (it is booked again if it confirms again)."""
    child.confirmations, child.block_height = status.confirmations, status.block_height
    wd_records._touch(s, child, _next(child, Event.REORGED))
    reserve_again(s, child)
    ledger.self_transfer_unsettled(s, child)
    audit_log.append(
        s,
        "withdrawal.reorged",
        "sync",
        {"withdrawal_id": child.id, "txid": child.txid, "fee_paid": child.fee, "in_mempool": status.in_mempool},
    )


def _settled(s: Session, original: WithdrawalRow, winner: WithdrawalRow, status: TxStatus) -> None:
    """The original, or a bump of it, confirmed: the withdrawal is settled with that txid and
    the fee that transaction paid."""
    original.txid = winner.txid
    original.confirmations, original.block_height = status.confirmations, status.block_height
    wd_records._touch(s, original, _next(original, Event.SETTLED))
    wd_records._release(s, original.id or 0)
    ledger.withdrawal_settled(s, original, wd_records._members(s, original.id or 0), network_fee=winner.fee)
    if winner is not original:
        winner.confirmations, winner.block_height = status.confirmations, status.block_height
        wd_records._touch(s, winner, _next(winner, Event.SETTLED))
    audit_log.append(
        s,
        "withdrawal.confirmed",
        "sync",
        {
            "withdrawal_id": original.id,
            "txid": winner.txid,
            "height": status.block_height,
            "fee_paid": winner.fee,
            "version": winner.id,
        },
    )


def _cancelled(s: Session, original: WithdrawalRow, cancel_row: WithdrawalRow, status: TxStatus) -> None:
    """The cancel confirmed deep enough: the withdrawal fails, its customer gets amount and fee
    back; the cancel's own fee is the house's."""
    check_logged(s, original)
    reason = f"cancelled: self-transfer #{cancel_row.id} ({cancel_row.txid}) confirmed at height {status.block_height}"
    members = wd_records._members(s, original.id or 0)
    wd_records._touch(s, original, _next(original, Event.REFUNDED), reason)
    wd_records._release(s, original.id or 0)
    txn = ledger.withdrawal_released(s, original, members, f"refunded: {reason}")
    cancel_row.confirmations, cancel_row.block_height = status.confirmations, status.block_height
    wd_records._touch(s, cancel_row, _next(cancel_row, Event.SETTLED))
    ledger.self_transfer_settled(s, cancel_row)
    audit_log.append(
        s,
        "withdrawal.failed",
        "sync",
        {
            "withdrawal_id": original.id,
            "reason": reason,
            "spent_by": cancel_row.txid,
            "refunded": sum(m.amount + m.fee for m in members or [original]),
            "ledger_txn": txn.id if txn else None,
        },
    )


def _refunded(s: Session, original: WithdrawalRow, conflict: OutputSpend) -> list[WithdrawalRow]:
    """The proof is in: a transaction none of ours spent an input, deep in the chain. Every
    version fails, its reservations released; then the withdrawal, its customer refunded (once:
    failed is final), as custody.withdraw.broadcast.refund does for one without replacements."""
    wid = original.id or 0
    versions = [r for r in replacements_of(s, wid) if r.status not in DONE]
    for r in versions:
        event = Event.REFUNDED if wd_states.can(r.status, Event.REFUNDED) else Event.REPLACED
        wd_records._touch(s, r, _next(r, event), f"withdrawal #{wid}'s {refund_reason(conflict)}")
        wd_records._release(s, r.id or 0)
        audit_log.append(s, "withdrawal.failed", "sync", {"withdrawal_id": r.id, "spent_by": conflict.spender})
    crash_point("group.refunded")
    refund(s, original, conflict, {"versions_failed": [r.id for r in versions]})
    return [original, *versions]
