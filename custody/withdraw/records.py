"""Reading a withdrawal's stored state, judging it by the approvals and the founders' rulebook, and
showing it: what every step of the queue (``custody.withdraw.queue``) re-checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from bitcoin.core import CMutableTransaction, CTransaction, b2lx, x
from sqlmodel import Session, col, select

from custody.bitcoin.amounts import format_btc
from custody.bitcoin.destinations import address_of
from custody.bitcoin.txbuild import Coin, tx_vsize
from custody.clock import iso, now
from custody.control import roster as roster_lib
from custody.control import rulebook as rulebook_lib
from custody.control.roster import store_trust
from custody.errors import (
    ApprovalError,
    Conflict,
    NotFound,
    PolicyViolation,
    StorageError,
    VerificationFailed,
)
from custody.identity.approvals import (
    Approval,
    ApprovalCheck,
    Member,
    TxSummary,
    check_approvals,
    check_batch,
    request_standing,
    summarize,
)
from custody.identity.rulebook_judge import Counted, Need, Payout, Spend, Verdict, judge
from custody.policy.model import CHANGE, Policy
from custody.store.models import AddressRow, ApprovalRow, AuditEntry, ReservedInput, WithdrawalInput, WithdrawalRow
from custody.withdraw import replacements
from custody.withdraw.states import BATCH, BROADCAST, CONFIRMED, FAILED, REQUESTED, SINGLE

CHANGE_ACCOUNT = "custody-change"


# ---------------------------------------------------------------- reading the stored state


def _get(s: Session, withdrawal_id: int, lock: bool = False) -> WithdrawalRow:
    query = select(WithdrawalRow).where(WithdrawalRow.id == withdrawal_id)
    if lock:
        query = query.with_for_update()
    row = s.exec(query).first()
    if row is None:
        raise NotFound(f"no withdrawal #{withdrawal_id}")
    return row


def _inputs(s: Session, withdrawal_id: int) -> list[WithdrawalInput]:
    return list(
        s.exec(
            select(WithdrawalInput)
            .where(WithdrawalInput.withdrawal_id == withdrawal_id)
            .order_by(col(WithdrawalInput.position))
        ).all()
    )


def _tx(row: WithdrawalRow) -> CTransaction:
    return CTransaction.deserialize(x(row.unsigned_tx))


def _summary(policy: Policy, row: WithdrawalRow, inputs: Sequence[WithdrawalInput]) -> TxSummary:
    """The approval statement rebuilt from the stored transaction, checked against the row.

    Raises StorageError when the row disagrees with its own transaction (store tampering).
    """
    tx = _tx(row)
    by_outpoint = {f"{i.txid}:{i.vout}": i.amount for i in inputs}
    try:
        amounts = [by_outpoint[f"{b2lx(v.prevout.hash)}:{v.prevout.n}"] for v in tx.vin]
    except KeyError:
        raise StorageError(f"withdrawal #{row.id}: its transaction spends an input it did not record") from None
    summary = summarize(policy.network.name, row.id or 0, tx, amounts)
    paid = [a for spk, a in summary.outputs if spk == row.destination_spk]
    if row.kind == SINGLE and (not paid or paid[0] != row.amount or summary.fee != row.fee):
        raise StorageError(
            f"withdrawal #{row.id}: destination, amount or fee in the store disagree with its transaction"
        )
    return summary


def _standing(s: Session) -> roster_lib.Standing:
    """The founders' roster in force (checked against the store's founders-signed manifest)."""
    return roster_lib.standing(s, store_trust(s))


def _approvals(s: Session, withdrawal_id: int) -> list[Approval]:
    rows = s.exec(select(ApprovalRow).where(ApprovalRow.withdrawal_id == withdrawal_id).order_by(col(ApprovalRow.id)))
    return [Approval(r.employee, r.pubkey, r.signature) for r in rows]


def _members(s: Session, batch_id: int) -> list[WithdrawalRow]:
    return list(s.exec(select(WithdrawalRow).where(WithdrawalRow.batch_id == batch_id).order_by(col(WithdrawalRow.id))))


def _change_position(s: Session, row: WithdrawalRow) -> int | None:
    """Which output of the transaction pays one of our change addresses, if any."""
    change = {a.script_pubkey for a in s.exec(select(AddressRow).where(AddressRow.chain == CHANGE)).all()}
    for n, out in enumerate(_tx(row).vout):
        if bytes(out.scriptPubKey).hex() in change:
            return n
    return None


def _member(s: Session, policy: Policy, row: WithdrawalRow, need: Need | None) -> Member:
    summary, check = _check(s, policy, row, need)
    return Member(summary, _change_position(s, row), check)


def _check(s: Session, policy: Policy, row: WithdrawalRow, need: Need | None = None) -> tuple[TxSummary, ApprovalCheck]:
    """The approval statement and which approvals count, as many as the rulebook's tier needs
    (``need``: given for a batch's member, judged with its batch); a batch counts its members'."""
    summary = _summary(policy, row, _inputs(s, row.id or 0))
    if row.kind == BATCH:
        needs = _verdict(s, policy, row, history=False).needs
        members = [_member(s, policy, m, needs.get(m.id or 0)) for m in _members(s, row.id or 0)]
        problems = check_batch(summary, _change_position(s, row), members)
        valid = tuple(sorted({name for m in members for name in m.check.valid}))
        rejected = tuple(("batch", p) for p in problems)
        # A batch is approved when check_batch finds nothing wrong: the union then counts.
        return summary, ApprovalCheck(valid if not problems else (), rejected)
    if need is None:
        need = _verdict(s, policy, row, history=False).needs[row.id or 0]
    return summary, check_approvals(
        summary, _approvals(s, row.id or 0), _standing(s).registry("approve"), row.requester, need.approvals, need.tier
    )


def awaiting_request_signature(row: WithdrawalRow) -> bool:
    """True for a request recorded but not yet signed by its requester's security key (the
    console's first step done, not its second): nobody can approve it, and it holds its coins
    and the customer's balance until it is signed or cancelled."""
    return row.kind == SINGLE and row.status == REQUESTED and not row.request_signature


def _refuse_unsigned_request(s: Session, row: WithdrawalRow, summary: TxSummary) -> None:
    """Refuse approvals of a withdrawal whose request does not stand for exactly ``summary`` (not
    yet signed with the requester's security key, or its transaction edited since): the offline
    signer would refuse it too. Raises ApprovalError."""
    if row.kind != SINGLE:
        return
    registry = _standing(s).registry("request")
    problem = request_standing(summary, row.account, row.requester, row.request_signature, registry)
    if problem is not None:
        raise ApprovalError(f"withdrawal #{row.id} cannot be approved: {problem}")


MAX_UNSIGNED_REQUESTS = 3
"""How many withdrawals one requester may have recorded and not yet signed with their security key."""


def _refuse_unsigned_backlog(s: Session, requester: str) -> None:
    """Refuse another request awaiting ``requester``'s security key while they already have
    :data:`MAX_UNSIGNED_REQUESTS` of them: each holds its coins and the customer's balance until
    signed or cancelled. Recording one takes the requester's security key (over the request's
    content), not yet her signature over the exact transaction; the bound keeps a key left in a
    machine, or a requester who never finishes, from holding every coin. The caller holds the
    halt guard's lock, so two recordings, by any instances on the store, count one after the
    other. Raises Conflict."""
    unsigned = select(WithdrawalRow.id).where(
        WithdrawalRow.requester == requester,
        WithdrawalRow.kind == SINGLE,
        WithdrawalRow.status == REQUESTED,
        WithdrawalRow.request_signature == "",
    )
    waiting = sorted(int(i) for i in s.exec(unsigned).all() if i is not None)
    if len(waiting) >= MAX_UNSIGNED_REQUESTS:
        raise Conflict(
            f"{requester} already has {len(waiting)} withdrawal requests awaiting their security key "
            f"(#{', #'.join(map(str, waiting))}): sign or cancel them (`custody withdraw cancel`) first"
        )


# ---------------------------------------------------------------- the rulebook


def _rulebooks(s: Session) -> rulebook_lib.Chain:
    """The applied rulebooks, checked (once per transaction)."""
    cached = s.info.get("custody.rulebooks")
    if not isinstance(cached, rulebook_lib.Chain):
        cached = s.info["custody.rulebooks"] = rulebook_lib.store_chain(s)
    return cached


def _locktime(row: WithdrawalRow) -> int:
    """The height the withdrawal was requested at: its transaction's nLockTime (its last 4 bytes)."""
    return int.from_bytes(bytes.fromhex(row.unsigned_tx[-8:]), "little")


def _payout(s: Session, row: WithdrawalRow) -> Payout:
    change = _change_position(s, row)
    payments = tuple((bytes(o.scriptPubKey).hex(), int(o.nValue)) for n, o in enumerate(_tx(row).vout) if n != change)
    return Payout(row.id or 0, row.account, payments, row.fee)


def _spend(s: Session, policy: Policy, row: WithdrawalRow) -> Spend:
    tx = _tx(row)
    payouts = [_payout(s, m) for m in _members(s, row.id or 0)] if row.kind == BATCH else [_payout(s, row)]
    outputs = [bytes(o.scriptPubKey) for o in tx.vout]
    vsize = tx_vsize(policy.script_type, policy.threshold, policy.n, len(tx.vin), outputs)
    return Spend(tx.nLockTime, tuple(payouts), row.fee, vsize, row.kind == BATCH)


def _history(s: Session, exclude: set[int]) -> list[Counted]:
    """Every withdrawal velocity counts, at the height it was requested: all but the failed ones
    that never carried founders' signatures (a signed transaction may still be broadcast)."""
    rows = s.exec(select(WithdrawalRow).where(WithdrawalRow.kind == SINGLE)).all()
    return [
        Counted(_locktime(r), r.account, r.amount)
        for r in rows
        if r.id not in exclude and (r.status != FAILED or r.psbt is not None or r.final_tx is not None)
    ]


def _judge(s: Session, spend: Spend, exclude: set[int], history: bool = True) -> Verdict:
    books = _rulebooks(s)
    return judge(books.at(spend.height), books.effective, spend, _history(s, exclude) if history else ())


def _verdict(s: Session, policy: Policy, row: WithdrawalRow, history: bool = True) -> Verdict:
    """The rulebook in force at the withdrawal's height, applied to it (to a batch: to its
    members together, in one transaction; a fee bump: by the rulebook's bump rule)."""
    if row.kind == "bump":
        return replacements.bump_verdict(s, policy, row, _tx(row))
    spend = _spend(s, policy, row)
    return _judge(s, spend, {row.id or 0, *(p.withdrawal_id for p in spend.payouts)}, history)


def _refuse_violations(verdict: Verdict, what: str) -> None:
    if verdict.violations:
        book = f"rulebook #{verdict.serial}" if verdict.serial else "the built-in rules (no rulebook signed yet)"
        raise PolicyViolation(f"{what} is refused by {book} at height {verdict.height}: {verdict.explain()}")


def _enforce(s: Session, policy: Policy, row: WithdrawalRow) -> Verdict:
    """Raise PolicyViolation naming every rule the withdrawal (or batch) breaks."""
    verdict = _verdict(s, policy, row)
    _refuse_violations(verdict, f"{'batch' if row.kind == BATCH else 'withdrawal'} #{row.id}")
    return verdict


def _require_approved(s: Session, policy: Policy, row: WithdrawalRow) -> TxSummary:
    summary, check = _check(s, policy, row)
    if not check.enough:
        raise ApprovalError(f"withdrawal #{row.id} is not approved: {check.explain()}")
    return summary


def _logged_approvers(s: Session, withdrawal_id: int) -> set[str]:
    """Who the audit log says approved withdrawal ``withdrawal_id`` (key file, token or security
    key): an approval row deleted by SQL is still there."""
    found = s.exec(
        select(AuditEntry.actor, AuditEntry.payload).where(
            AuditEntry.event == "withdrawal.approved",
            col(AuditEntry.payload).like(f'%"withdrawal_id":{withdrawal_id}%'),
        )
    )
    out = set()
    for actor, payload in found:
        try:
            doc = json.loads(payload)
        except ValueError:
            continue  # a damaged entry: audit log --verify names it
        if type(doc.get("withdrawal_id")) is int and doc["withdrawal_id"] == withdrawal_id:
            out.add(actor)
    return out


def approvals_complete(s: Session, policy: Policy, row: WithdrawalRow) -> bool:
    """Whether a customer's withdrawal (or batch) may carry approvals enough for the offline
    signer, which cannot know it was cancelled: a live authorization until one of its inputs is
    spent by another transaction. Judged so that an insider cannot make it look unapproved: any
    status past ``requested`` (a batch is approved when made), approval rows that count, or as
    many distinct approvers in the audit log as its tier needs (rows deleted or a status set back
    by SQL change nothing); a row that cannot be judged is taken as approved."""
    if row.kind == BATCH or row.status != REQUESTED:
        return True
    try:
        need = _verdict(s, policy, row, history=False).needs[row.id or 0].approvals
        _, check = _check(s, policy, row)
    except Exception:  # noqa: BLE001 - a row rewritten beyond reading: never refunded at once
        return True
    return check.enough or len(_logged_approvers(s, row.id or 0) | set(check.valid)) >= need


def _not_in_batch(row: WithdrawalRow) -> None:
    if row.batch_id is not None:
        raise Conflict(f"withdrawal #{row.id} is part of batch #{row.batch_id}: use the batch's id")


def _input_rows(
    withdrawal_id: int, tx: CMutableTransaction, coins: Sequence[Coin], prev_txs: Mapping[str, str | None]
) -> list[WithdrawalInput]:
    """The rows recording ``tx``'s inputs, in its input order (``prev_txs``: p2sh's previous txs)."""
    by_outpoint = {c.outpoint: c for c in coins}
    rows = []
    for position, vin in enumerate(tx.vin):
        c = by_outpoint[f"{b2lx(vin.prevout.hash)}:{vin.prevout.n}"]
        rows.append(
            WithdrawalInput(
                withdrawal_id=withdrawal_id,
                position=position,
                txid=c.txid,
                vout=c.vout,
                amount=c.amount,
                script_pubkey=c.script_pubkey.hex(),
                chain=c.chain,
                idx=c.index,
                prev_tx=prev_txs.get(c.outpoint),
            )
        )
    return rows


def _touch(s: Session, row: WithdrawalRow, status: str | None = None, reason: str | None = None) -> None:
    """Update a withdrawal; a batch carries its members along (status, txid, depth)."""
    if status:
        row.status = status
    if reason is not None:
        row.reason = reason
    row.updated_at = now()
    s.add(row)
    if row.kind == BATCH and status in (BROADCAST, CONFIRMED, FAILED):
        for m in _members(s, row.id or 0):
            m.status = status
            m.txid = row.txid
            m.confirmations = row.confirmations
            m.block_height = row.block_height
            m.reason = row.reason if status == FAILED else m.reason
            m.updated_at = row.updated_at
            s.add(m)


def _release(s: Session, withdrawal_id: int) -> None:
    for r in s.exec(select(ReservedInput).where(ReservedInput.withdrawal_id == withdrawal_id)).all():
        s.delete(r)


# ---------------------------------------------------------------- views


def view(s: Session, policy: Policy, row: WithdrawalRow) -> dict[str, Any]:
    """A withdrawal as shown by ``withdraw show``/``list`` (approvals re-checked)."""
    digest = None
    try:
        summary, check = _check(s, policy, row)
        digest = summary.digest()
        approvals: dict[str, Any] = {"valid": list(check.valid), "rejected": [list(r) for r in check.rejected]}
    except (StorageError, VerificationFailed) as exc:
        approvals = {"valid": [], "rejected": [], "error": str(exc)}
    return {
        "record": "withdrawal",
        "id": row.id,
        "withdrawal_kind": row.kind,
        "members": [m.id for m in _members(s, row.id or 0)] if row.kind == BATCH else [],
        "status": row.status,
        "account": row.account,
        "requester": row.requester,
        "awaiting_request_signature": awaiting_request_signature(row),
        "destination": row.destination,
        "amount_sat": row.amount,
        "amount": format_btc(row.amount),
        "fee_sat": row.fee,
        "fee_rate": float(row.fee_rate),
        "change_sat": row.change_amount,
        "change_index": row.change_index,
        "inputs": [{"outpoint": f"{i.txid}:{i.vout}", "amount_sat": i.amount} for i in _inputs(s, row.id or 0)],
        "approvals": approvals,
        "unsigned_txid": b2lx(_tx(row).GetTxid()),
        "statement_digest": digest,
        "outputs": _outputs(policy, row, _change_position(s, row)),
        "txid": row.txid,
        "confirmations": row.confirmations,
        "block_height": row.block_height,
        "reason": row.reason,
        "batch_id": row.batch_id,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def _outputs(policy: Policy, row: WithdrawalRow, change: int | None) -> list[dict[str, Any]]:
    """Every output of the transaction as a person checks it: address, amount, ours or not."""
    out = []
    for n, o in enumerate(_tx(row).vout):
        spk = bytes(o.scriptPubKey)
        out.append(
            {
                "n": n,
                "address": address_of(spk, policy.network) or f"script {spk.hex()}",
                "amount_sat": int(o.nValue),
                "change": n == change,
            }
        )
    return out
