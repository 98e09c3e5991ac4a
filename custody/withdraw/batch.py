"""The daily batch: approved single withdrawals merged into one transaction. Its members'
approvals are its approvals, so a batch is approved when made and stays a live authorization
until one of its inputs is spent elsewhere: it is cancelled by double-spend
(custody.withdraw.replace.cancel), never dissolved back into the queue while its transaction
could still confirm.
"""

# size(create_batch): the daily batch's steps (members re-checked, one transaction built, inputs
#   reserved, recorded) in one database transaction; split once the replacements' work settles

from __future__ import annotations

from typing import Any

from bitcoin.core import b2lx, b2x
from sqlmodel import col, select

from custody.bitcoin.amounts import parse_fee_rate
from custody.bitcoin.destinations import dust_limit
from custody.bitcoin.txbuild import Coin, build_transaction, fee_for, tx_vsize
from custody.books import ledger
from custody.chain.types import (
    ChainBackend,
)
from custody.clock import now
from custody.config import Settings
from custody.control import audit_log, halt
from custody.control.epochs import current_policy as policy_from_session
from custody.control.roster import authenticate, check_pinned, load_trust
from custody.errors import (
    Conflict,
    InputError,
    StorageError,
)
from custody.identity.approvals import (
    sign_request,
)
from custody.identity.employee_keys import EmployeeSigner
from custody.issuance.issuer import AddressMismatch, halt_for_mismatch, issue_in_session, load_manifest_or_halt
from custody.policy.model import CHANGE
from custody.store.db import Database
from custody.store.models import ReservedInput, WithdrawalRow
from custody.withdraw.limits import Limits
from custody.withdraw.records import (
    CHANGE_ACCOUNT,
    _check,
    _enforce,
    _input_rows,
    _inputs,
    _require_approved,
    _summary,
    view,
)
from custody.withdraw.states import APPROVED, BATCH, SINGLE


def create_batch(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    *,
    actor: str,
    key: EmployeeSigner,
    fee_rate: str | None = None,
    limits: Limits = Limits(),
) -> dict[str, Any]:
    """Put every approved, unsigned withdrawal into one transaction (a daily batch).

    The batch spends exactly its members' inputs, pays every member's destination, sends
    one change output to a fresh verified change address, and pays no more fee than its
    members together; its approvals are the union of its members'.
    Raises HaltedError, Conflict (fewer than two approved withdrawals), InputError (fee),
    ApprovalError, PolicyViolation (the batch, its members together, breaks a rule of the
    rulebook), VerificationFailed (change address, after raising the halt).
    """
    manifest = load_manifest_or_halt(db, settings)
    rate = parse_fee_rate(fee_rate) if fee_rate is not None else limits.default_fee_rate
    tip = backend.tip_height()
    try:
        with db.transaction() as s:
            halt.guard(s)  # also takes the audit head's lock: reading then reserving coins is serial
            policy = policy_from_session(s)
            authenticate(s, check_pinned(s, load_trust(settings)), actor, key, "request")
            candidates = s.exec(
                select(WithdrawalRow)
                .where(WithdrawalRow.status == APPROVED, WithdrawalRow.kind == SINGLE)
                .where(col(WithdrawalRow.batch_id).is_(None), col(WithdrawalRow.psbt).is_(None))
                .order_by(col(WithdrawalRow.id))
            ).all()
            members = []
            for row in candidates:
                _, check = _check(s, policy, row)
                if check.enough:
                    members.append(row)
            if len(members) < 2:
                raise Conflict(f"{len(members)} approved, unsigned withdrawal(s): a batch needs at least two")
            coins = [
                Coin(i.txid, i.vout, i.amount, bytes.fromhex(i.script_pubkey), i.chain, i.idx)
                for m in members
                for i in _inputs(s, m.id or 0)
            ]
            payments = [(bytes.fromhex(m.destination_spk), m.amount) for m in members]
            change = issue_in_session(s, manifest, CHANGE_ACCOUNT, 1, CHANGE, actor=actor)[0]
            change_spk = bytes.fromhex(change.script_pubkey)
            vsize = tx_vsize(
                policy.script_type, policy.threshold, policy.n, len(coins), [*(p for p, _ in payments), change_spk]
            )
            fee = fee_for(vsize, rate)
            members_fee = sum(m.fee for m in members)
            if fee > members_fee or fee > limits.max_fee:
                raise InputError(f"the batch fee {fee} sat is above its members' fees ({members_fee} sat) or the cap")
            change_amount = sum(c.amount for c in coins) - sum(a for _, a in payments) - fee
            outputs = list(payments)
            if change_amount >= dust_limit(change_spk):
                outputs.append((change_spk, change_amount))
            else:
                fee += change_amount
                change_amount = 0
            tx = build_transaction(coins, outputs, tip)
            stamp = now()
            total = sum(m.amount for m in members)
            batch = WithdrawalRow(
                kind=BATCH,
                account="(batch)",
                requester=actor,
                request_signature="",  # signed below, once the batch has its id
                destination=f"(batch of {len(members)})",
                destination_spk="",
                amount=total,
                fee=fee,
                fee_rate=str(rate),
                change_index=change.index if change_amount else None,
                change_amount=change_amount,
                status=APPROVED,
                unsigned_tx=b2x(tx.serialize()),
                created_at=stamp,
                updated_at=stamp,
            )
            s.add(batch)
            s.flush()
            bid = batch.id or 0
            prev = {f"{i.txid}:{i.vout}": i.prev_tx for m in members for i in _inputs(s, m.id or 0)}
            for rec in _input_rows(bid, tx, coins, prev):
                s.add(rec)
                op = f"{rec.txid}:{rec.vout}"
                held = s.get(ReservedInput, op)
                if held is None:
                    raise StorageError(f"input {op} of a batched withdrawal is not reserved")
                held.withdrawal_id = bid
                s.add(held)
            for m in members:
                m.batch_id = bid
                m.updated_at = stamp
                s.add(m)
            s.flush()
            batch.request_signature = sign_request(key, _summary(policy, batch, _inputs(s, bid)), batch.account)
            s.add(batch)
            ledger.batch_created(s, batch, members)
            _require_approved(s, policy, batch)  # the batch as stored passes its own check
            _enforce(s, policy, batch)  # and the rulebook, its members together
            audit_log.append(
                s,
                "withdrawal.batched",
                actor,
                {"batch_id": bid, "members": [m.id for m in members], "fee": fee, "unsigned_txid": b2lx(tx.GetTxid())},
                batch.request_signature,
            )
            result = view(s, policy, batch)
            result["members"] = [m.id for m in members]
            return result
    except AddressMismatch as exc:
        raise halt_for_mismatch(db, settings, exc) from None
    except ledger.LedgerImbalance as exc:
        raise ledger.halt_for_imbalance(db, settings, exc) from None
