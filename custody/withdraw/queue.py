"""The withdrawal queue: requested -> approved -> signed -> broadcast -> confirmed (or failed).

* A request selects coins among unspent outputs of our verified addresses, adds change
  to a fresh, verified change address (``/1/i``), caps the fee and records the unsigned
  transaction. Its inputs are reserved: the ``reserved_input`` primary key lets no other
  pending withdrawal take them.
* Distinct employees, never the requester, approve the exact transaction: as many as the
  founders' rulebook's tier for its amount asks (two at least). Approvals are re-checked
  against the transaction and the current roster at every later step; any change to the
  transaction voids them. Request, approval, export and batch refuse what the rulebook in
  force at the transaction's height (its locktime, the tip when requested) forbids.
* ``custody.withdraw.psbt_io``: ``export_psbt`` writes a PSBT for the offline signer
  (``custody.withdraw.signer``), ``import_psbt`` merges founders' signatures, ``finalize``
  builds the final transaction; ``custody.withdraw.broadcast``: ``broadcast`` test-accepts
  it first, ``sync`` follows it to confirmation; ``custody.withdraw.batch``: the daily batch.
* Once founders' signatures exist, nobody's word fails a withdrawal: not a node's refusal,
  not a mempool conflict, not an operator's cancel. Its inputs stay reserved and its hold
  stays until the chain settles it (its transaction confirms) or proves it void (another
  transaction spends one of its inputs ``refund_confirmations`` blocks deep).

This module: listing, showing, requesting, approving and cancelling. Every step refuses while
trading is halted and is idempotent.
"""

# size(request_withdrawal): a request's steps (destination, rulebook, coin selection, change
#   address, fee cap, reservation) in one database transaction; split once the replacements' work
#   settles

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bitcoin.core import b2lx, b2x
from sqlmodel import Session, col, select

from custody.bitcoin.amounts import parse_btc_amount, parse_fee_rate
from custody.bitcoin.destinations import dust_limit, parse_destination
from custody.bitcoin.txbuild import Coin, build_transaction, select_coins
from custody.books import ledger
from custody.chain.types import (
    ChainBackend,
)
from custody.clock import now
from custody.config import Settings

# Withdrawals spend and change to the newest policy only; after a key rotation the older
# policies' coins move by the sweep (custody.control.epochs).
from custody.control import audit_log, halt
from custody.control.epochs import current_policy as policy_from_session
from custody.control.epochs import newest_only
from custody.control.roster import Trust, authenticate, check_pinned, load_trust
from custody.errors import (
    ApprovalError,
    Conflict,
    InputError,
)
from custody.faults import crash_point, pause_point
from custody.identity.approvals import (
    sign_approval,
    sign_request,
)
from custody.identity.employee_keys import EmployeeSigner
from custody.identity.rulebook_judge import Payout, Spend
from custody.issuance.issuer import AddressMismatch, halt_for_mismatch, issue_in_session, load_manifest_or_halt
from custody.policy.model import CHANGE, Policy
from custody.store.db import Database
from custody.store.models import AddressRow, ApprovalRow, ReservedInput, WithdrawalRow
from custody.withdraw.limits import Limits
from custody.withdraw.records import (
    CHANGE_ACCOUNT,
    _check,
    _enforce,
    _get,
    _input_rows,
    _inputs,
    _judge,
    _members,
    _not_in_batch,
    _refuse_unsigned_backlog,
    _refuse_unsigned_request,
    _refuse_violations,
    _release,
    _summary,
    _touch,
    _verdict,
    approvals_complete,
    view,
)
from custody.withdraw.states import APPROVED, BATCH, PENDING, REQUESTED, SINGLE, Event, can, next_state


def list_withdrawals(db: Database, status: str | None = None) -> list[dict[str, Any]]:
    db.check_schema()
    with db.transaction() as s:
        policy = policy_from_session(s)
        query = select(WithdrawalRow)
        if status:
            query = query.where(WithdrawalRow.status == status)
        return [view(s, policy, r) for r in s.exec(query.order_by(col(WithdrawalRow.id))).all()]


def show_withdrawal(db: Database, withdrawal_id: int) -> dict[str, Any]:
    db.check_schema()
    with db.transaction() as s:
        return view(s, policy_from_session(s), _get(s, withdrawal_id))


def final_transaction(db: Database, withdrawal_id: int) -> str:
    """The final (signed) transaction of a withdrawal, hex. Raises NotFound, Conflict (not finalized)."""
    db.check_schema()
    with db.transaction() as s:
        row = _get(s, withdrawal_id)
        if not row.final_tx:
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status} and not finalized: no final transaction yet")
        return row.final_tx


def rule_check(db: Database, withdrawal_id: int) -> dict[str, Any]:
    """Which rulebook and tier a withdrawal falls under, the approvals it has and still needs,
    and every rule it breaks (``custody rules check``). Raises NotFound, VerificationFailed."""
    db.check_schema()
    with db.transaction() as s:
        policy = policy_from_session(s)
        row = _get(s, withdrawal_id)
        verdict = _verdict(s, policy, row)
        _, check = _check(s, policy, row)
        members = {m.id or 0: m for m in _members(s, withdrawal_id)} if row.kind == BATCH else {row.id or 0: row}
        approvals = {
            wid: (check if row.kind != BATCH else _check(s, policy, m, verdict.needs.get(wid))[1])
            for wid, m in members.items()
        }
        return {
            "withdrawal_id": withdrawal_id,
            "withdrawal_kind": row.kind,
            "status": row.status,
            "height": verdict.height,
            "rulebook": verdict.serial,
            "withdrawals": [
                {
                    "withdrawal_id": wid,
                    "tier": need.tier,
                    "why": need.why,
                    "approvals_needed": need.approvals,
                    "approved_by": list(approvals[wid].valid),
                    "still_needed": max(0, need.approvals - len(approvals[wid].valid)),
                }
                for wid, need in sorted(verdict.needs.items())
            ],
            "violations": [{"rule": v.rule, "detail": v.detail} for v in verdict.violations],
            "allowed": not verdict.violations and check.enough,
        }


# ---------------------------------------------------------------- 1. request


RequestProof = Callable[[Session, Trust], tuple[str, dict[str, Any]]]
"""Who requests, proved otherwise than by a key file or token (the console's security key over
the request's content, :func:`custody.withdraw.webauthn_request.record_with_security_key`):
checked in the request's transaction under the halt guard's lock, before anything is counted
or reserved; raises to refuse, or returns the signature the ``withdrawal.requested`` entry
keeps and what its payload adds."""


def _spendable(s: Session, backend: ChainBackend, policy: Policy) -> list[Coin]:
    """Confirmed unspent outputs at our verified addresses that no pending withdrawal holds."""
    addresses = {bytes.fromhex(a.script_pubkey): a for a in newest_only(s, s.exec(select(AddressRow)).all())}
    if not addresses:
        return []
    reserved = {r.outpoint for r in s.exec(select(ReservedInput)).all()}
    coins = []
    for u in backend.unspent(list(addresses)):
        a = addresses.get(u.script_pubkey)
        if a is None or f"{u.txid}:{u.vout}" in reserved:
            continue
        coins.append(Coin(u.txid, u.vout, u.amount, u.script_pubkey, a.chain, a.idx))
    return coins


def request_withdrawal(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    *,
    account: str,
    destination: str,
    amount: str,
    fee_rate: str | None,
    requester: str,
    key: EmployeeSigner | RequestProof,
    limits: Limits = Limits(),
) -> dict[str, Any]:
    """Record a withdrawal request with its unsigned transaction; reserve its inputs.

    The requester must hold the request role in the founders' roster; they sign the exact
    transaction and the account, and that signature travels to the offline signer. With a
    :data:`RequestProof` (the console's security key over the request's content) the
    requester signs the exact transaction next (:mod:`custody.withdraw.webauthn_request`):
    until then nobody can approve it, and she holds at most
    :data:`custody.withdraw.records.MAX_UNSIGNED_REQUESTS` such requests at once.

    Raises HaltedError, InputError (destination, amount, dust, fee cap, not enough coins),
    NotFound/ApprovalError (requester, or what the proof raises), Conflict (too many unsigned),
    PolicyViolation (a rule of the rulebook in force at the chain's tip, named),
    VerificationFailed (change address mismatch, after raising the halt), NodeError, StorageError.
    """
    manifest = load_manifest_or_halt(db, settings)
    pinned = load_trust(settings)
    tip = backend.tip_height()  # the transaction's locktime: the signers' "now"
    sats = parse_btc_amount(amount)
    rate = parse_fee_rate(fee_rate) if fee_rate is not None else limits.default_fee_rate
    if rate > limits.max_fee_rate:
        raise InputError(f"fee rate {rate} sat/vB is above the cap of {limits.max_fee_rate} sat/vB")
    try:
        with db.transaction() as s:
            halt.guard(s)  # also takes the audit head's lock: reading then reserving coins is serial
            policy = policy_from_session(s)
            dest = parse_destination(destination, policy.network)
            if sats < dust_limit(dest.script_pubkey):
                raise InputError(f"{sats} sat is below the dust limit of {dust_limit(dest.script_pubkey)} sat")
            proved: tuple[str, dict[str, Any]] | None = None
            if isinstance(key, EmployeeSigner):
                authenticate(s, check_pinned(s, pinned), requester, key, "request")
            else:
                proved = key(s, check_pinned(s, pinned))  # the requester's security key, or nothing
                _refuse_unsigned_backlog(s, requester)
                pause_point("withdrawal.request_counted")
            coins = _spendable(s, backend, policy)
            own = {bytes.fromhex(a.script_pubkey) for a in s.exec(select(AddressRow)).all()}
            if dest.script_pubkey in own:
                raise InputError("the destination is one of custody's own addresses")
            # A change script of the right shape, for sizing; the real one is issued below.
            probe = bytes.fromhex(next(iter(s.exec(select(AddressRow)).all())).script_pubkey) if own else b""
            selection = select_coins(
                coins,
                [(dest.script_pubkey, sats)],
                probe,
                dust_limit(probe) if probe else 546,
                policy.script_type,
                policy.threshold,
                policy.n,
                rate,
            )
            if selection.fee > limits.max_fee:
                raise InputError(f"the fee of {selection.fee} sat is above the cap of {limits.max_fee} sat")
            payout = Payout(0, account, ((dest.script_pubkey.hex(), sats),), selection.fee)
            _refuse_violations(
                _judge(s, Spend(tip, (payout,), selection.fee, selection.vsize), set()), "the withdrawal"
            )
            outputs: list[tuple[bytes, int]] = [(dest.script_pubkey, sats)]
            change_index = None
            if selection.change:
                change = issue_in_session(s, manifest, CHANGE_ACCOUNT, 1, CHANGE, actor=requester)[0]
                change_index = change.index
                outputs.append((bytes.fromhex(change.script_pubkey), selection.change))
            tx = build_transaction(selection.coins, outputs, tip)
            stamp = now()
            row = WithdrawalRow(
                account=account,
                requester=requester,
                request_signature="",
                destination=dest.address,
                destination_spk=dest.script_pubkey.hex(),
                amount=sats,
                fee=selection.fee,
                fee_rate=str(rate),
                change_index=change_index,
                change_amount=selection.change,
                status=REQUESTED,
                unsigned_tx=b2x(tx.serialize()),
                created_at=stamp,
                updated_at=stamp,
            )
            s.add(row)
            s.flush()
            wid = row.id or 0
            ledger.withdrawal_requested(s, row)  # refuses beyond the customer's balance
            # Every input's previous transaction, segwit too: signers check amounts against it
            # (Trezor and BitBox02 refuse segwit inputs without it since the 2020 fee attack).
            prev: dict[str, str | None] = {c.outpoint: b2x(backend.raw_transaction(c.txid)) for c in selection.coins}
            for rec in _input_rows(wid, tx, selection.coins, prev):
                s.add(rec)
                s.add(ReservedInput(outpoint=f"{rec.txid}:{rec.vout}", withdrawal_id=wid))
            if isinstance(key, EmployeeSigner):
                row.request_signature = sign_request(key, _summary(policy, row, _inputs(s, wid)), account)
            s.add(row)
            s.flush()
            crash_point("withdrawal.requested")
            payload: dict[str, Any] = {
                "withdrawal_id": wid,
                "account": account,
                "destination": dest.address,
                "amount": sats,
                "fee": selection.fee,
                "unsigned_txid": b2lx(tx.GetTxid()),
            }
            signature = row.request_signature or None
            if proved is not None:
                signature, recorded_by = proved
                payload |= {**recorded_by, "signed_next_by": "security key"}
            audit_log.append(s, "withdrawal.requested", requester, payload, signature)
            return view(s, policy, row)
    except AddressMismatch as exc:
        raise halt_for_mismatch(db, settings, exc) from None
    except ledger.LedgerImbalance as exc:
        raise ledger.halt_for_imbalance(db, settings, exc) from None


# ---------------------------------------------------------------- 2. approve


def approve(
    db: Database,
    withdrawal_id: int,
    name: str,
    key: EmployeeSigner,
    *,
    settings: Settings,
    expect_digest: str | None = None,
) -> dict[str, Any]:
    """Sign the exact transaction of ``withdrawal_id`` as employee ``name`` (approve role in the
    founders' roster). With ``expect_digest``: only if the statement's digest starts with it (what
    the approver was shown).

    Raises HaltedError, NotFound, ApprovalError (self-approval, disabled, suspended, no role,
    wrong key, another digest), PolicyViolation (a rule of the rulebook in force at its height),
    Conflict (not awaiting approval), VerificationFailed.
    """
    pinned = load_trust(settings)
    with db.transaction() as s:
        halt.guard(s)
        policy = policy_from_session(s)
        row = _get(s, withdrawal_id, lock=True)
        _not_in_batch(row)
        if row.kind == BATCH:
            raise Conflict(f"#{withdrawal_id} is a batch: its members' approvals are its approvals")
        if row.status not in (REQUESTED, APPROVED):
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status}; approvals are closed")
        authenticate(s, check_pinned(s, pinned), name, key, "approve")
        pubkey = key.public_key.hex()
        if name == row.requester:
            raise ApprovalError(f"{name} requested withdrawal #{withdrawal_id} and cannot approve it")
        summary = _summary(policy, row, _inputs(s, withdrawal_id))
        _refuse_unsigned_request(s, row, summary)
        _enforce(s, policy, row)
        if expect_digest is not None and not summary.digest().startswith(expect_digest.lower().replace("-", "")):
            raise ApprovalError(
                f"withdrawal #{withdrawal_id}'s statement digest is {summary.digest()[:16]}, not the {expect_digest} "
                "you reviewed: it changed since; review it again"
            )
        existing = s.exec(
            select(ApprovalRow).where(ApprovalRow.withdrawal_id == withdrawal_id, ApprovalRow.employee == name)
        ).first()
        if existing is None or existing.digest != summary.digest():
            if existing is not None:
                s.delete(existing)  # an approval of an older transaction counts for nothing
                s.flush()
            signature = sign_approval(key, summary)
            s.add(
                ApprovalRow(
                    withdrawal_id=withdrawal_id,
                    employee=name,
                    pubkey=pubkey,
                    digest=summary.digest(),
                    signature=signature,
                    at=now(),
                )
            )
            s.flush()
            audit_log.append(
                s, "withdrawal.approved", name, {"withdrawal_id": withdrawal_id, "digest": summary.digest()}, signature
            )
        _, check = _check(s, policy, row)
        if check.enough and can(row.status, Event.APPROVED):
            _touch(s, row, next_state(row.status, Event.APPROVED))
        result = view(s, policy, row)
    crash_point("withdrawal.approved")
    return result


CancelProof = Callable[[Session, Trust, WithdrawalRow], str]
"""Who cancels, proved otherwise than by a key file or token: checked in the cancel's
transaction with the row locked; raises to refuse, or returns the signature the audit entry keeps."""


def _still_held(s: Session, row: WithdrawalRow) -> None:
    """Refuse to release a customer's withdrawal whose hold the ledger no longer holds: a row
    set back to pending by SQL after its cancel (or its refund), cancelled again, by any key or
    by the requester's cancel assertion replayed from the audit log, would credit the customer
    the amount and fee twice. Raises Conflict."""
    owed = row.amount + row.fee
    if (holding := ledger.holding(s, row.id or 0)) != owed:
        raise Conflict(
            f"withdrawal #{row.id} holds {holding} sat in the ledger, not the {owed} sat it owes back: released "
            "already (its rows edited outside the tool?); nothing is released again"
        )


def cancel(
    db: Database, withdrawal_id: int, name: str, key: EmployeeSigner | CancelProof, reason: str, *, settings: Settings
) -> dict[str, Any]:
    """Fail a withdrawal still short of its approvals and release its inputs (and its customer's
    hold); an approved one (or a batch) is refused: it is cancelled by double-spend
    (:func:`custody.withdraw.replace.cancel`). ``key``: ``name``'s key (file or token), or a proof
    (:data:`CancelProof`: the console's security key). Raises NotFound, ApprovalError, Conflict,
    HaltedError (the ledger does not balance)."""
    with ledger.halting(db, settings), db.transaction() as s:
        policy = policy_from_session(s)
        row = _get(s, withdrawal_id, lock=True)
        _not_in_batch(row)
        if row.kind not in (SINGLE, BATCH):  # read again, locked: the caller chose this path on an earlier read
            raise Conflict(
                f"#{withdrawal_id} is a {row.kind}: it holds no customer's money and is dropped, never released "
                "(`custody withdraw cancel` does so)"
            )
        trust = check_pinned(s, load_trust(settings))
        signature = None
        if isinstance(key, EmployeeSigner):
            authenticate(s, trust, name, key, None)
        else:
            signature = key(s, trust, row)
        if row.status not in PENDING:
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status}; only pending ones can be cancelled")
        if approvals_complete(s, policy, row):  # a batch is approved when made
            raise Conflict(
                f"withdrawal #{withdrawal_id} is approved: its approvals let founders sign it offline until one of "
                "its inputs is spent by another transaction, so its hold is not released at once; `custody withdraw "
                "cancel` requests a cancel by double-spend (a self-transfer of its inputs), and the hold is released "
                "once that confirms CUSTODY_REFUND_CONFIRMATIONS blocks deep (custody sync)"
            )
        if row.psbt is not None or row.final_tx is not None:
            raise Conflict(
                f"withdrawal #{withdrawal_id} carries founders' signatures: a signed transaction could still be "
                "broadcast, so its inputs stay reserved until it confirms, or until `custody sync` sees another "
                "transaction spend one of them CUSTODY_REFUND_CONFIRMATIONS blocks deep (then it is refunded)"
            )
        _still_held(s, row)
        ledger.withdrawal_released(s, row, [], f"cancelled by {name}: {reason}")
        _touch(s, row, next_state(row.status, Event.CANCELLED), f"cancelled by {name}: {reason}")
        _release(s, withdrawal_id)
        audit_log.append(s, "withdrawal.failed", name, {"withdrawal_id": withdrawal_id, "reason": reason}, signature)
        return view(s, policy, row)
