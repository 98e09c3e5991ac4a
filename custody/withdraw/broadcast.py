"""Broadcasting a signed withdrawal (test-accepted first) and following it on the chain to
confirmation, a refund (a conflict buried ``refund_confirmations`` deep) or back (a reorg).

Once founders' signatures exist, only the chain's blocks fail a withdrawal.

The same follower serves the two self-transfers that are one transaction nothing replaces: a
sweep (custody.withdraw.sweep) and a consolidation (custody.withdraw.utxo.consolidate). Their
ledger postings differ (custody.books.ledger dispatches on the kind: only the network fee is
booked, and a failure gives nothing back because nothing was held); their states, their
reservations and their audit events are a withdrawal's. A withdrawal with replacements is
followed by custody.withdraw.replace_sync, which uses :func:`refund`, :func:`reserve_again` and
:func:`spent_by` from here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bitcoin.core import CMutableTransaction, CTransaction, b2lx, b2x, x
from sqlmodel import Session, col, select

from custody.books import deposits, ledger
from custody.chain.consensus import check_before_broadcast
from custody.chain.types import (
    AcceptResult,
    ChainBackend,
    OutputSpend,
    Refusal,
    SpendState,
    TransactionRefused,
    TxStatus,
)
from custody.config import Settings
from custody.control import audit_log, halt
from custody.control.epochs import current_policy as policy_from_session
from custody.errors import (
    Conflict,
    NotFound,
    StorageError,
)
from custody.faults import crash_point
from custody.store.db import Database
from custody.store.models import AuditEntry, ReservedInput, WithdrawalRow
from custody.withdraw import replacements
from custody.withdraw.limits import Limits
from custody.withdraw.records import (
    _get,
    _inputs,
    _members,
    _not_in_batch,
    _release,
    _require_approved,
    _touch,
    _tx,
    view,
)
from custody.withdraw.states import APPROVED, BATCH, BROADCAST, CONFIRMED, SIGNED, SINGLE, Event, can, next_state


def _stripped(raw: bytes) -> bytes:
    """A transaction without its scriptSigs and witnesses: what the approvals cover."""
    tx = CMutableTransaction.from_tx(CTransaction.deserialize(raw))
    for vin in tx.vin:
        vin.scriptSig = b""
    return bytes(CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion).serialize())


def final_matches(row: WithdrawalRow) -> bool:
    """The final transaction is the approved one with signatures added, nothing else."""
    return _stripped(x(row.final_tx or "")) == bytes(x(row.unsigned_tx))


def _consensus_refusal(raw: bytes, spent: Sequence[tuple[int, bytes]]) -> AcceptResult | None:
    """The pre-broadcast consensus and standardness check's refusal (as a test-accept's), or None."""
    try:
        check_before_broadcast(raw, spent)
    except TransactionRefused as exc:
        return AcceptResult(False, f"pre-broadcast consensus check: {exc}", "", exc.refusal)
    return None


def _record_refusal(db: Database, withdrawal_id: int, refusal: Refusal, reason: str) -> None:
    """Write down a refusal of a signed withdrawal's transaction; change nothing else.

    The withdrawal stays signed, its inputs reserved and its hold in place: a signed
    transaction stays valid whatever one node says, and anyone holding it can broadcast it.
    """
    with db.transaction() as s:
        row = _get(s, withdrawal_id, lock=True)
        if row.status != SIGNED:
            return
        _touch(s, row, reason=f"refused by the node ({refusal.value}): {reason}")
        audit_log.append(
            s,
            "withdrawal.refused",
            "operator",
            {"withdrawal_id": withdrawal_id, "txid": row.txid, "refusal": refusal.value, "reason": reason},
        )


def _refused(withdrawal_id: int, refusal: Refusal, reason: str) -> TransactionRefused:
    return TransactionRefused(
        f"the node refused withdrawal #{withdrawal_id}'s transaction ({refusal.value}): {reason}. "
        "It stays signed, its inputs reserved and its hold in place: it is settled once the chain shows it "
        "confirmed, and failed and refunded only once the chain shows its inputs spent by another transaction "
        "CUSTODY_REFUND_CONFIRMATIONS blocks deep (custody sync)",
        refusal,
        reason,
    )


def broadcast(db: Database, backend: ChainBackend, withdrawal_id: int, *, settings: Settings) -> dict[str, Any]:
    """Test-accept, then broadcast the final transaction; idempotent.

    A refusal (by the pre-broadcast check or the node) is recorded in the audit log
    (``withdrawal.refused``) and changes nothing else: the withdrawal stays signed, its
    inputs reserved and its customer's hold in place (see :func:`sync` for what fails it).
    Raises HaltedError, NotFound, ApprovalError, Conflict, StorageError, TransactionRefused
    (a NodeError, with its Refusal), NodeError.
    """
    with db.transaction() as s:
        halt.guard(s)
        policy = policy_from_session(s)
        row = _get(s, withdrawal_id, lock=True)
        _not_in_batch(row)
        if row.status in (BROADCAST, CONFIRMED):
            if row.final_tx:
                backend.broadcast(x(row.final_tx))  # the node already has it: same txid
            return view(s, policy, row)
        if row.status != SIGNED or not row.final_tx:
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status}: finalize it first")
        _require_approved(s, policy, row)
        if not final_matches(row):
            raise StorageError(f"withdrawal #{withdrawal_id}: the final transaction is not the approved one")
        raw = x(row.final_tx)
        spent = [(i.amount, bytes.fromhex(i.script_pubkey)) for i in _inputs(s, withdrawal_id)]
    txid = b2lx(CTransaction.deserialize(raw).GetTxid())
    # Broadcast before a crash, recorded after it: the node has it, so record it.
    if not backend.tx_status(txid).known:
        accept = _consensus_refusal(raw, spent) or backend.test_accept(raw)
        if not accept.allowed and accept.refusal is not Refusal.ALREADY_KNOWN:
            refusal, reason = accept.refusal or Refusal.UNKNOWN, accept.reason or "no reason given"
            _record_refusal(db, withdrawal_id, refusal, reason)
            raise _refused(withdrawal_id, refusal, reason)
        try:
            txid = backend.broadcast(raw)
        except TransactionRefused as exc:  # the chain moved between the test and the broadcast
            _record_refusal(db, withdrawal_id, exc.refusal, exc.reason)
            raise _refused(withdrawal_id, exc.refusal, exc.reason) from None
    crash_point("withdrawal.sent")
    with db.transaction() as s:
        policy = policy_from_session(s)
        row = _get(s, withdrawal_id, lock=True)
        if can(row.status, Event.BROADCAST):
            row.txid = txid
            row.reason = None  # a refusal before this one stays in the audit log
            _touch(s, row, next_state(row.status, Event.BROADCAST))
            audit_log.append(s, "withdrawal.broadcast", "operator", {"withdrawal_id": withdrawal_id, "txid": txid})
        result = view(s, policy, row)
    crash_point("withdrawal.broadcast")
    return result


@dataclass(frozen=True)
class _Seen:
    """What the chain says of a withdrawal carrying founders' signatures.

    ``status``: its own transaction's (unknown when the chain does not have it); ``raw``:
    that transaction as the chain has it, when the store lacks it; ``conflict``: the
    deepest input spent by another transaction in a block, if any.
    """

    status: TxStatus
    raw: bytes | None = None
    conflict: OutputSpend | None = None


def _ours(raw: bytes, unsigned_tx: str) -> bool:
    try:
        return _stripped(raw) == bytes(x(unsigned_tx))
    except Exception:  # python-bitcoinlib raises several unrelated types for a bad transaction
        return False


def _look(
    backend: ChainBackend,
    txid: str,
    unsigned_tx: str,
    outpoints: Sequence[tuple[str, int]],
    need_raw: bool,
    versions: Sequence[str] = (),
) -> _Seen:
    """Ask the chain about a withdrawal: its transaction (and, with ``need_raw``, its bytes
    as the chain has them), else what spent its inputs.

    An input the chain shows spent by a transaction that is the approved one with
    signatures (a p2sh spend's txid is only known once signed) is ours, not a conflict.
    A node's refusal, a mempool conflict and an input the node does not know are no
    conflicts: only a spend in a block is. A transaction the node knows only from a block the
    chain left (a reorganisation, then another spend of its input in the new chain) is looked
    for as one it does not know: its inputs' spends say whether it can still confirm.
    """
    status = backend.tx_status(txid)
    seen = _Seen(status)
    if status.known and need_raw:  # signed elsewhere: keep the final transaction the chain has
        try:
            raw = backend.raw_transaction(txid)
        except NotFound:
            raw = None
        seen = _Seen(status, raw if raw is not None and _ours(raw, unsigned_tx) else None)
    if (status.known and (status.in_mempool or status.confirmations > 0)) or not outpoints:
        return seen
    spend, mine = spent_by(backend, outpoints, [unsigned_tx, *versions])
    if mine is not None and spend is not None and spend.spender is not None:
        if not _ours(mine, unsigned_tx):  # a replacement dropped once approved, signed all the same
            return _Seen(status, seen.raw)  # it pays this very withdrawal: no double spend
        return _Seen(backend.tx_status(spend.spender), mine)
    return _Seen(status, seen.raw, spend)


def spent_by(
    backend: ChainBackend, outpoints: Sequence[tuple[str, int]], ours: Sequence[str]
) -> tuple[OutputSpend | None, bytes | None]:
    """What spends ``outpoints`` in a block: the first spend by one of ``ours`` (unsigned
    transactions: the spender is one of them with signatures added) and that transaction;
    else the deepest spend by another transaction (a conflict) and None; else (None, None).
    A spender the chain cannot show proves nothing either way."""
    conflict = None
    for spend in backend.spends(outpoints):
        if spend.state is not SpendState.SPENT or spend.spender is None:
            continue
        try:
            raw = backend.raw_transaction(spend.spender)
        except NotFound:
            continue
        if any(_ours(raw, unsigned) for unsigned in ours):
            return spend, raw
        if conflict is None or spend.confirmations > conflict.confirmations:
            conflict = spend
    return conflict, None


def _watched(s: Session, tip: int) -> list[int]:
    """Withdrawals sync follows: broadcast; confirmed but shallow enough for a
    reorganisation to take out (a batch speaks for its members); and those that carry
    founders' signatures but were not broadcast by us (refused by a node, or not sent yet)."""
    rows = s.exec(select(WithdrawalRow).where(col(WithdrawalRow.status).in_((APPROVED, SIGNED, BROADCAST, CONFIRMED))))
    ids = []
    theirs = replacements.grouped(s)  # followed by custody.withdraw.replace_sync.sync_replacements
    for r in rows.all():
        if r.id in theirs:
            continue
        if r.status == BROADCAST:
            ids.append(r.id or 0)
        elif r.batch_id is not None:
            continue
        elif r.status == CONFIRMED:
            if r.block_height is None or tip - r.block_height < REORG_DEPTH:
                ids.append(r.id or 0)
        elif r.status == SIGNED or r.psbt is not None:
            ids.append(r.id or 0)
    return sorted(ids)


def sync(db: Database, backend: ChainBackend, limits: Limits = Limits(), *, settings: Settings) -> list[dict[str, Any]]:
    """Follow withdrawals on the chain (and settle them in the ledger); return those that changed.

    * Broadcast: confirmed at ``limits.confirmations`` and settled; a confirmed one a
      reorganisation took out goes back to broadcast, its settlement reversed.
    * Carrying founders' signatures but not broadcast by us (refused by a node, or signed
      and not sent): broadcast once the chain shows its transaction, wherever it came from.
    * Failed, its inputs released and its customer refunded, only when the chain shows one
      of its inputs spent by another transaction in a block ``limits.refund_confirmations``
      deep; the audit log's ``withdrawal.failed`` names that transaction. Nothing else
      fails a withdrawal that carries founders' signatures.

    Raises NodeError (also for a chain whose tip is well below what custody recorded from
    it: see custody.books.deposits.check_not_behind); HaltedError after raising the halt
    when the ledger does not balance.
    """
    changed = []
    tip = backend.tip_height()
    deposits.check_not_behind(db, tip)
    with db.transaction() as s:
        ids = _watched(s, tip)
    for wid in ids:
        with db.transaction() as s:
            row = _get(s, wid)
            before = (row.status, row.txid)
            txid = row.txid or b2lx(_tx(row).GetTxid())
            unsigned = row.unsigned_tx
            outpoints = [(i.txid, i.vout) for i in _inputs(s, wid)] if row.batch_id is None else []
            need_raw = row.final_tx is None and row.batch_id is None
            # Its dropped replacements (a bump dropped once approved can still be signed offline): a
            # spend by one of them pays this withdrawal, it proves no double spend.
            versions = [r.unsigned_tx for r in replacements.replacements_of(s, wid)]
        seen = _look(backend, txid, unsigned, outpoints, need_raw, versions)  # no lock held while the chain is asked
        with ledger.halting(db, settings), db.transaction() as s:
            policy = policy_from_session(s)
            row = _get(s, wid, lock=True)
            if (row.status, row.txid) != before:
                continue  # moved on meanwhile (a broadcast, another sync): the next sync looks again
            if _follow(s, row, seen, limits):
                changed.append(view(s, policy, row))
    return changed


def _follow(s: Session, row: WithdrawalRow, seen: _Seen, limits: Limits) -> bool:
    """Apply what the chain says to one withdrawal (locked); whether anything changed."""
    wid = row.id or 0
    status = seen.status
    changed = False
    if status.known and can(row.status, Event.SEEN_ON_CHAIN):
        # Its transaction is on the chain though we did not send it: signed elsewhere, or
        # sent through another node after ours refused it. It is broadcast, never refunded.
        if seen.raw is not None and (row.final_tx is None or x(row.final_tx) != seen.raw):
            row.final_tx = b2x(seen.raw)
        row.txid = status.txid
        row.reason = None
        _touch(s, row, next_state(row.status, Event.SEEN_ON_CHAIN))
        audit_log.append(
            s, "withdrawal.broadcast", "sync", {"withdrawal_id": wid, "txid": status.txid, "seen_on_chain": True}
        )
        changed = True
    if row.status in (BROADCAST, CONFIRMED) and (
        status.confirmations != row.confirmations or status.block_height != row.block_height
    ):
        changed = True
        row.confirmations = status.confirmations
        row.block_height = status.block_height
        if status.confirmations >= limits.confirmations and can(row.status, Event.CONFIRMED):
            _touch(s, row, next_state(row.status, Event.CONFIRMED))
            _release(s, wid)
            crash_point("sync.settled")
            if row.batch_id is None:  # a batch settles for its members
                ledger.withdrawal_settled(s, row, _members(s, wid))
            audit_log.append(
                s,
                "withdrawal.confirmed",
                "sync",
                {"withdrawal_id": wid, "txid": row.txid, "height": status.block_height},
            )
        elif can(row.status, Event.REORGED) and status.confirmations < limits.confirmations:
            _reorged(s, row, status.in_mempool)
        else:
            _touch(s, row)
    conflict = seen.conflict
    if (
        conflict is not None
        and conflict.confirmations >= limits.refund_confirmations
        and can(row.status, Event.REFUNDED)
        and row.batch_id is None
    ):
        refund(s, row, conflict)
        changed = True
    return changed


def refund_reason(conflict: OutputSpend) -> str:
    """Why a withdrawal is failed and refunded: the spend that proves it."""
    return (
        f"input {conflict.txid}:{conflict.vout} spent by another transaction {conflict.spender} "
        f"at height {conflict.block_height} ({conflict.confirmations} confirmations)"
    )


def refund(s: Session, row: WithdrawalRow, conflict: OutputSpend, note: dict[str, Any] | None = None) -> None:
    """The proof is in: another transaction spent an input, deep in the chain. Fail the
    withdrawal, release its inputs and give each member's amount and fee back (``note``:
    more for the audit event)."""
    wid = row.id or 0
    check_logged(s, row)
    _proves_double_spend(s, row, conflict)
    members = _members(s, wid)
    _holds_what_it_gives_back(s, row, members)
    reason = refund_reason(conflict)
    _touch(s, row, next_state(row.status, Event.REFUNDED), reason)
    _release(s, wid)
    crash_point("sync.refunded")
    txn = ledger.withdrawal_released(s, row, members, f"refunded: {reason}")
    audit_log.append(
        s,
        "withdrawal.failed",
        "sync",
        {
            "withdrawal_id": wid,
            "reason": reason,
            "spent_by": conflict.spender,
            "outpoint": f"{conflict.txid}:{conflict.vout}",
            "height": conflict.block_height,
            "confirmations": conflict.confirmations,
            "refunded": sum(m.amount + m.fee for m in members or [row]) if txn else 0,  # a self-transfer held none
            "ledger_txn": txn.id if txn else None,
            **(note or {}),
        },
    )


def check_logged(s: Session, row: WithdrawalRow) -> None:
    """Raise LedgerImbalance (a halt) unless every transaction the audit log recorded for
    withdrawal ``row`` (the ``unsigned_txid`` of its request and of each replacement's) is one
    of its rows' still. Which spend of its inputs is "ours" and which proves a double spend is
    judged by those rows; an insider who rewrote them (or unlinked a replacement) would make
    the withdrawal's own payment look like another transaction and have it refunded."""
    wid = row.id or 0
    have = set()
    for r in [row, *replacements.replacements_of(s, wid)]:
        try:
            have.add(b2lx(_tx(r).GetTxid()))
        except Exception:  # noqa: BLE001 - python-bitcoinlib raises several types; unreadable is not ours
            continue
    missing = sorted(_logged_txids(s, wid) - have)
    if missing:
        raise ledger.LedgerImbalance(
            f"withdrawal #{wid}'s transaction {missing[0]}, recorded in the audit log at its request, is in none of "
            "its rows (rewritten behind the tool's back): not refunded; run `custody audit log --verify`",
            f"the refund of withdrawal #{wid}",
        )


_OWN = ("withdrawal_id", "batch_id")
"""How an audit entry names the row whose request it records (a batch's: ``withdrawal.batched``)."""


def _logged_txids(s: Session, wid: int, keys: tuple[str, ...] = (*_OWN, "original_id")) -> set[str]:
    """The ``unsigned_txid`` of every audit entry of withdrawal (or batch) ``wid`` or of a
    replacement of it; ``keys``: which of an entry's ids name ``wid`` (``_OWN``: its own request only)."""
    found = s.exec(
        select(AuditEntry.payload).where(
            col(AuditEntry.payload).like('%"unsigned_txid":%'), col(AuditEntry.payload).like(f'%_id":{wid}%')
        )
    )
    out = set()
    for payload in found:
        try:
            doc = json.loads(payload)
        except ValueError:
            continue  # a damaged entry: audit log --verify names it
        if any(type(doc.get(k)) is int and doc.get(k) == wid for k in keys) and isinstance(
            doc.get("unsigned_txid"), str
        ):
            out.add(doc["unsigned_txid"])
    return out


def _proves_double_spend(s: Session, row: WithdrawalRow, conflict: OutputSpend) -> None:
    """Raise LedgerImbalance (a halt) unless ``conflict`` spends an input of the transaction the
    audit log recorded at ``row``'s request. The outpoints sync asks the chain about are the
    ``withdrawal_input`` rows, which nothing else ties to the transaction: a row planted by SQL
    naming an outpoint any other transaction spent long ago would "prove" a double spend of a
    signed withdrawal, whose still valid transaction then pays the refunded customer again."""
    wid = row.id or 0
    try:
        tx = _tx(row)
        spent = {(b2lx(v.prevout.hash), int(v.prevout.n)) for v in tx.vin}
        txid = b2lx(tx.GetTxid())
    except Exception:  # noqa: BLE001 - python-bitcoinlib raises several types; unreadable proves nothing
        spent, txid = set(), ""
    if txid not in _logged_txids(s, wid, _OWN) or (conflict.txid, conflict.vout) not in spent:
        raise ledger.LedgerImbalance(
            f"withdrawal #{wid}: the spend of {conflict.txid}:{conflict.vout} by {conflict.spender} spends no input of "
            "the transaction the audit log recorded at its request (its rows rewritten behind the tool's back?): "
            "not refunded; run `custody audit log --verify`",
            f"the refund of withdrawal #{wid}",
        )


def _holds_what_it_gives_back(s: Session, row: WithdrawalRow, members: Sequence[WithdrawalRow]) -> None:
    """Raise LedgerImbalance (a halt) unless a customer's withdrawal (or batch) still holds, by
    the ledger's entries, the amounts and fees a refund gives back: one refunded already and set
    back by SQL would be refunded by the next sync again (failed is final only in its row)."""
    if row.kind not in (SINGLE, BATCH):
        return  # a sweep or consolidation holds no customer's money
    owed = sum(m.amount + m.fee for m in members or [row])
    if (holding := ledger.holding(s, row.id or 0)) != owed:
        raise ledger.LedgerImbalance(
            f"withdrawal #{row.id} holds {holding} sat in the ledger, not the {owed} sat a refund gives back: "
            "released already (its row set back behind the tool's back?); not refunded again",
            f"the refund of withdrawal #{row.id}",
        )


REORG_DEPTH = 100
"""Confirmed withdrawals shallower than this are re-checked by every sync."""


def _reorged(s: Session, row: WithdrawalRow, in_mempool: bool) -> None:
    """A reorganisation took a confirmed withdrawal out of the chain: back to broadcast, its
    inputs reserved again (the transaction may confirm again), its settlement reversed."""
    _touch(s, row, next_state(row.status, Event.REORGED))
    reserve_again(s, row)
    ledger.withdrawal_unsettled(s, row, _members(s, row.id or 0))
    crash_point("sync.reorged")
    audit_log.append(
        s,
        "withdrawal.reorged",
        "sync",
        {"withdrawal_id": row.id, "txid": row.txid, "in_mempool": in_mempool},
    )


def reserve_again(s: Session, row: WithdrawalRow) -> None:
    """A reorganisation took ``row``'s transaction out: its inputs reserved again (it may
    confirm again), those nobody else holds."""
    for i in _inputs(s, row.id or 0):
        if s.get(ReservedInput, f"{i.txid}:{i.vout}") is None:
            s.add(ReservedInput(outpoint=f"{i.txid}:{i.vout}", withdrawal_id=row.id or 0))
