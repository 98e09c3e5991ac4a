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
* ``export`` writes a PSBT for the offline signer (``custody.withdraw.signer``), ``import_psbt``
  merges founders' signatures, ``finalize`` builds the final transaction, ``broadcast``
  test-accepts it first, ``sync`` follows it to confirmation.
* Once founders' signatures exist, nobody's word fails a withdrawal: not a node's refusal,
  not a mempool conflict, not an operator's cancel. Its inputs stay reserved and its hold
  stays until the chain settles it (its transaction confirms) or proves it void (another
  transaction spends one of its inputs ``refund_confirmations`` blocks deep).

Every step refuses while trading is halted and is idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from bitcoin.core import CMutableTransaction, CTransaction, b2lx, b2x, x
from sqlmodel import Session, col, select

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.amounts import format_btc, parse_btc_amount, parse_fee_rate
from custody.bitcoin.destinations import address_of, dust_limit, parse_destination
from custody.bitcoin.keys import b58check_decode
from custody.bitcoin.script import ScriptType
from custody.bitcoin.txbuild import Coin, build_transaction, fee_for, select_coins, tx_vsize
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
from custody.clock import iso, now
from custody.config import Settings

# Withdrawals spend and change to the newest policy only; after a key rotation the older
# policies' coins move by the sweep (custody.control.epochs).
from custody.control import audit_log, epochs, halt
from custody.control import roster as roster_lib
from custody.control import rulebook as rulebook_lib
from custody.control.epochs import current_policy as policy_from_session
from custody.control.epochs import newest_only
from custody.control.roster import authenticate, check_pinned, load_trust, store_trust
from custody.errors import (
    ApprovalError,
    Conflict,
    InputError,
    NotFound,
    PolicyViolation,
    StorageError,
    VerificationFailed,
)
from custody.faults import crash_point
from custody.identity.approvals import (
    Approval,
    ApprovalCheck,
    Member,
    TxSummary,
    check_approvals,
    check_batch,
    sign_approval,
    sign_request,
    summarize,
)
from custody.identity.employee_keys import EmployeeSigner
from custody.identity.rulebook import Counted, Need, Payout, Spend, Verdict, judge
from custody.issuance.issuer import AddressMismatch, halt_for_mismatch, issue_in_session, load_manifest_or_halt
from custody.policy.model import CHANGE, Policy
from custody.store.db import Database
from custody.store.models import AddressRow, ApprovalRow, ReservedInput, RosterRow, WithdrawalInput, WithdrawalRow
from custody.withdraw import replacements
from custody.withdraw.signer import (
    PROP_APPROVALS,
    PROP_META,
    PROP_ROSTER,
    PROP_RULEBOOKS,
    PROP_SUSPENSIONS,
    PROPRIETARY_ID,
)

REQUESTED = "requested"
APPROVED = "approved"
SIGNED = "signed"
BROADCAST = "broadcast"
CONFIRMED = "confirmed"
FAILED = "failed"
PENDING = (REQUESTED, APPROVED, SIGNED)
CHANGE_ACCOUNT = "custody-change"
SINGLE = "single"
BATCH = "batch"
SWEEP = "sweep"  # custody.withdraw.sweep: an older policy's coins to the newest policy


@dataclass(frozen=True)
class Limits:
    """Fee caps and confirmation depth; from CUSTODY_* settings."""

    default_fee_rate: Decimal = Decimal(2)
    max_fee_rate: Decimal = Decimal(500)  # sat/vB
    max_fee: int = 1_000_000  # satoshis, absolute
    confirmations: int = 1
    refund_confirmations: int = 6
    """How deep in the chain another transaction spending a signed withdrawal's input must
    be before the withdrawal is failed and its customer refunded (CUSTODY_REFUND_CONFIRMATIONS)."""


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
        "id": row.id,
        "kind": row.kind,
        "members": [m.id for m in _members(s, row.id or 0)] if row.kind == BATCH else [],
        "status": row.status,
        "account": row.account,
        "requester": row.requester,
        "destination": row.destination,
        "amount_sat": row.amount,
        "amount": format_btc(row.amount),
        "fee_sat": row.fee,
        "fee_rate": row.fee_rate,
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
            "kind": row.kind,
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
    key: EmployeeSigner,
    limits: Limits = Limits(),
) -> dict[str, Any]:
    """Record a withdrawal request with its unsigned transaction; reserve its inputs.

    The requester must hold the request role in the founders' roster; they sign the exact
    transaction and the account, and that signature travels to the offline signer.

    Raises HaltedError, InputError (destination, amount, dust, fee cap, not enough coins),
    NotFound/ApprovalError (requester), PolicyViolation (a rule of the rulebook in force at the
    chain's tip, named), VerificationFailed (change address mismatch, after raising the halt),
    NodeError, StorageError.
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
            authenticate(s, check_pinned(s, pinned), requester, key, "request")
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
            row.request_signature = sign_request(key, _summary(policy, row, _inputs(s, wid)), account)
            s.add(row)
            s.flush()
            crash_point("withdrawal.requested")
            audit_log.append(
                s,
                "withdrawal.requested",
                requester,
                {
                    "withdrawal_id": wid,
                    "account": account,
                    "destination": dest.address,
                    "amount": sats,
                    "fee": selection.fee,
                    "unsigned_txid": b2lx(tx.GetTxid()),
                },
                row.request_signature,
            )
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
        if check.enough and row.status == REQUESTED:
            _touch(s, row, APPROVED)
        result = view(s, policy, row)
    crash_point("withdrawal.approved")
    return result


# ---------------------------------------------------------------- 3. export (PSBT)


def _origin_of(policy: Policy, founder_index: int) -> tuple[bytes, tuple[int, ...]]:
    key = policy.founders[founder_index].key
    if key.origin is not None:
        return key.origin.fingerprint, key.origin.path
    return key.xpub.fingerprint, ()


def _derivations(policy: Policy, chain: int, index: int) -> dict[bytes, psbt_lib.KeyOrigin]:
    out = {}
    for i, f in enumerate(policy.founders):
        fp, path = _origin_of(policy, i)
        pub = f.key.xpub.derive((chain, index)).public_key
        out[pub] = psbt_lib.KeyOrigin(fp, (*path, chain, index))
    return out


def _scripts(policy: Policy, script: bytes) -> tuple[bytes | None, bytes | None]:
    """(redeem script, witness script) for a multisig script of the policy's type."""
    import hashlib

    if policy.script_type is ScriptType.P2SH:
        return script, None
    if policy.script_type is ScriptType.P2SH_P2WSH:
        return b"\x00\x20" + hashlib.sha256(script).digest(), script
    return None, script


def _prop(subtype: int) -> psbt_lib.ProprietaryKey:
    return psbt_lib.ProprietaryKey(PROPRIETARY_ID, subtype, b"")


def _previous_tx(wid: int, rec: WithdrawalInput) -> CTransaction:
    """The stored previous transaction of an input, checked against its outpoint and output.

    Raises StorageError when it is missing (a withdrawal requested before every input kept its
    previous transaction: cancel it and request it again) or disagrees with the input's record.
    """
    if not rec.prev_tx:
        raise StorageError(
            f"withdrawal #{wid}: input {rec.txid}:{rec.vout} has no previous transaction recorded "
            "(requested by an older custody): cancel the withdrawal and request it again"
        )
    try:
        prev = CTransaction.deserialize(x(rec.prev_tx))
    except Exception:  # noqa: BLE001 - python-bitcoinlib raises several kinds on bad bytes
        raise StorageError(f"withdrawal #{wid}: input {rec.txid}:{rec.vout}: previous transaction unreadable") from None
    if (
        b2lx(prev.GetTxid()) != rec.txid
        or rec.vout >= len(prev.vout)
        or (int(prev.vout[rec.vout].nValue), bytes(prev.vout[rec.vout].scriptPubKey).hex())
        != (rec.amount, rec.script_pubkey)
    ):
        raise StorageError(
            f"withdrawal #{wid}: the previous transaction stored for input {rec.txid}:{rec.vout} is not the one spent"
        )
    return prev


def _spent_policy(s: Session, row: WithdrawalRow) -> Policy:
    """The policy whose coins the withdrawal spends: the newest, but an older one for a sweep."""
    first = _inputs(s, row.id or 0)[:1]
    every = epochs.store_epochs(s)
    return epochs.epoch_of(every, first[0].chain, first[0].idx).policy if first else every[-1].policy


def build_psbt(s: Session, policy: Policy, row: WithdrawalRow) -> psbt_lib.Psbt:
    """The PSBT an offline signer needs, with the approval bundle in proprietary fields. Each
    input and change output carries the scripts and derivations of its own epoch's policy."""
    wid = row.id or 0
    tx = _tx(row)
    derivers = epochs.Derivers(epochs.store_epochs(s))
    policy = _spent_policy(s, row)
    p = psbt_lib.Psbt.from_unsigned_tx(CMutableTransaction.from_tx(tx))
    inputs = {f"{i.txid}:{i.vout}": i for i in _inputs(s, wid)}
    scripts = {a.script_pubkey: a for a in s.exec(select(AddressRow)).all()}
    for n, vin in enumerate(tx.vin):
        rec = inputs[f"{b2lx(vin.prevout.hash)}:{vin.prevout.n}"]
        addr = scripts[rec.script_pubkey]
        pin = p.inputs[n]
        pin.non_witness_utxo = _previous_tx(wid, rec)  # every input, segwit too
        if policy.script_type is not ScriptType.P2SH:
            pin.witness_utxo = psbt_lib.WitnessUtxo(rec.amount, bytes.fromhex(rec.script_pubkey))
        pin.redeem_script, pin.witness_script = _scripts(policy, bytes.fromhex(addr.script))
        pin.bip32_derivations = _derivations(policy, addr.chain, addr.idx)
        pin.sighash_type = 1
    change_output = None
    for n, vout in enumerate(tx.vout):
        ours = scripts.get(bytes(vout.scriptPubKey).hex())
        if ours is not None and ours.chain == CHANGE:
            change_output = n
            own = derivers.policy(ours.chain, ours.idx)
            p.outputs[n].redeem_script, p.outputs[n].witness_script = _scripts(own, bytes.fromhex(ours.script))
            p.outputs[n].bip32_derivations = _derivations(own, ours.chain, ours.idx)
    for i, f in enumerate(policy.founders):
        p.xpubs[b58check_decode(f.key.xpub.serialize())] = psbt_lib.KeyOrigin(*_origin_of(policy, i))
    meta = {
        "version": 1,
        "network": policy.network.name,
        "withdrawal_id": wid,
        "requester": row.requester,
        "request_signature": row.request_signature,
        "account": row.account,
        "destination": row.destination,
        "amount": row.amount,
        "change_output": change_output,
        "policy": policy.to_manifest(),
    } | replacements.psbt_meta(s, row)
    if row.kind == SWEEP:
        meta["kind"] = SWEEP
    if row.kind == BATCH:
        meta["kind"] = BATCH
        meta["members"] = [
            {
                "withdrawal_id": m.id,
                "requester": m.requester,
                "request_signature": m.request_signature,
                "account": m.account,
                "unsigned_tx": m.unsigned_tx,
                "amounts": [a for _, a in _summary(policy, m, _inputs(s, m.id or 0)).inputs],
                "change_output": _change_position(s, m),
                "approvals": [a.to_dict() for a in _approvals(s, m.id or 0)],
            }
            for m in _members(s, wid)
        ]
    p.proprietary[_prop(PROP_META)] = json.dumps(meta, sort_keys=True).encode()
    p.proprietary[_prop(PROP_APPROVALS)] = json.dumps([a.to_dict() for a in _approvals(s, wid)]).encode()
    newest = s.exec(select(RosterRow).order_by(col(RosterRow.serial).desc())).first()
    if newest is None:
        raise ApprovalError("there is no founders-signed roster: the offline signer would refuse this PSBT")
    p.proprietary[_prop(PROP_ROSTER)] = newest.document.encode()
    p.proprietary[_prop(PROP_SUSPENSIONS)] = json.dumps(roster_lib.suspension_documents(s)).encode()
    p.proprietary[_prop(PROP_RULEBOOKS)] = json.dumps(rulebook_lib.chain_documents(s)).encode()
    return p


def export_psbt(db: Database, withdrawal_id: int) -> psbt_lib.Psbt:
    """The PSBT of an approved withdrawal, carrying the signatures merged so far.

    Raises HaltedError, NotFound, ApprovalError (fewer valid approvals than its tier needs),
    PolicyViolation (a rule of the rulebook), Conflict (already broadcast or failed).
    """
    with db.transaction() as s:
        halt.guard(s)
        policy = policy_from_session(s)
        row = _get(s, withdrawal_id)
        _not_in_batch(row)
        if row.status not in (APPROVED, SIGNED):
            if row.status == REQUESTED:
                _require_approved(s, policy, row)
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status}; nothing to sign")
        _require_approved(s, policy, row)
        _enforce(s, policy, row)
        fresh = build_psbt(s, policy, row)
        if row.psbt:
            fresh = psbt_lib.combine([fresh, _signatures_only(psbt_lib.Psbt.from_base64(row.psbt))])
        audit_log.append(s, "withdrawal.exported", "operator", {"withdrawal_id": withdrawal_id})
        return fresh


def _signatures_only(p: psbt_lib.Psbt) -> psbt_lib.Psbt:
    out = psbt_lib.Psbt.from_unsigned_tx(p.tx)
    for mine, theirs in zip(out.inputs, p.inputs, strict=True):
        mine.partial_sigs = dict(theirs.partial_sigs)
    return out


# ---------------------------------------------------------------- 5. import, finalize, broadcast


def _founders_signed(policy: Policy, p: psbt_lib.Psbt, valid: list[set[bytes]]) -> list[str]:
    """Founders with a valid signature (``valid``: psbt.valid_signers) on every input."""
    names = []
    for i, f in enumerate(policy.founders):
        fingerprint = _origin_of(policy, i)[0]
        if all(
            any(origin.fingerprint == fingerprint and pub in valid[n] for pub, origin in pin.bip32_derivations.items())
            for n, pin in enumerate(p.inputs)
        ):
            names.append(f.name)
    return names


def import_psbt(db: Database, withdrawal_id: int, data: bytes) -> dict[str, Any]:
    """Merge a signed PSBT's signatures into the withdrawal, those of inputs another signer has
    finalized included (read out of their final scripts and checked, never dropped).

    Raises HaltedError, NotFound, InputError (another transaction, bad signatures, a final
    script that is not this input's multisig spend),
    ApprovalError, Conflict.
    """
    incoming = psbt_lib.Psbt.parse(data)
    with db.transaction() as s:
        halt.guard(s)
        row = _get(s, withdrawal_id, lock=True)
        policy = _spent_policy(s, row)
        _not_in_batch(row)
        if row.status not in (APPROVED, SIGNED):
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status}; signatures cannot be imported")
        _require_approved(s, policy, row)
        if incoming.unsigned_tx_bytes() != x(row.unsigned_tx):
            raise InputError(f"this PSBT is for another transaction than withdrawal #{withdrawal_id}'s")
        base = build_psbt(s, policy, row)
        theirs = _signatures_only(incoming)
        for n, pin in enumerate(incoming.inputs):
            if pin.is_finalized:  # another finalizer (the node's walletprocesspsbt) put them in its final scripts
                theirs.inputs[n].partial_sigs.update(psbt_lib.final_signatures(base, n, pin))
        parts = [base, theirs]
        if row.psbt:
            parts.append(_signatures_only(psbt_lib.Psbt.from_base64(row.psbt)))
        merged = psbt_lib.combine(parts)
        valid = psbt_lib.valid_signers(merged)
        for n, pin in enumerate(merged.inputs):
            for pub in pin.partial_sigs:
                if pub not in pin.bip32_derivations or pub not in valid[n]:
                    raise InputError(f"input {n}: a signature is not a valid founder signature of this transaction")
        signers = _founders_signed(policy, merged, valid)
        row.psbt = _signatures_only(merged).to_base64()
        if len(signers) >= policy.threshold and row.status == APPROVED:
            _touch(s, row, SIGNED)
        else:
            _touch(s, row)
        audit_log.append(
            s, "withdrawal.signatures_imported", "operator", {"withdrawal_id": withdrawal_id, "founders": signers}
        )
        result = view(s, policy, row)
        result["founders_signed"] = signers
    crash_point("withdrawal.imported")
    return result


def finalize(db: Database, withdrawal_id: int) -> dict[str, Any]:
    """Build the final transaction from the merged signatures.

    Raises HaltedError, NotFound, ApprovalError (approvals, or fewer than m founders),
    Conflict.
    """
    with db.transaction() as s:
        halt.guard(s)
        row = _get(s, withdrawal_id, lock=True)
        policy = _spent_policy(s, row)
        _not_in_batch(row)
        if row.final_tx and row.status in (SIGNED, BROADCAST, CONFIRMED):
            return view(s, policy, row)  # idempotent
        if row.status != SIGNED:
            raise ApprovalError(
                f"withdrawal #{withdrawal_id} is {row.status}: it needs {policy.threshold} founders' signatures"
            )
        _require_approved(s, policy, row)
        merged = psbt_lib.combine([build_psbt(s, policy, row), psbt_lib.Psbt.from_base64(row.psbt or "")])
        signers = _founders_signed(policy, merged, psbt_lib.valid_signers(merged))
        if len(signers) < policy.threshold:
            raise ApprovalError(
                f"withdrawal #{withdrawal_id} has {len(signers)} founders' signatures "
                f"({', '.join(signers) or 'none'}); {policy.threshold} are needed"
            )
        final = psbt_lib.extract(psbt_lib.finalize(merged))
        row.final_tx = b2x(final.serialize())
        row.txid = b2lx(final.GetTxid())
        _touch(s, row)
        audit_log.append(s, "withdrawal.finalized", "operator", {"withdrawal_id": withdrawal_id, "txid": row.txid})
        result = view(s, policy, row)
    crash_point("withdrawal.finalized")
    return result


def _stripped(raw: bytes) -> bytes:
    """A transaction without its scriptSigs and witnesses: what the approvals cover."""
    tx = CMutableTransaction.from_tx(CTransaction.deserialize(raw))
    for vin in tx.vin:
        vin.scriptSig = b""
    return bytes(CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion).serialize())


def _final_matches(row: WithdrawalRow) -> bool:
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
        if not _final_matches(row):
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
        if row.status == SIGNED:
            row.txid = txid
            row.reason = None  # a refusal before this one stays in the audit log
            _touch(s, row, BROADCAST)
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
    backend: ChainBackend, txid: str, unsigned_tx: str, outpoints: Sequence[tuple[str, int]], need_raw: bool
) -> _Seen:
    """Ask the chain about a withdrawal: its transaction (and, with ``need_raw``, its bytes
    as the chain has them), else what spent its inputs.

    An input the chain shows spent by a transaction that is the approved one with
    signatures (a p2sh spend's txid is only known once signed) is ours, not a conflict.
    A node's refusal, a mempool conflict and an input the node does not know are no
    conflicts: only a spend in a block is.
    """
    status = backend.tx_status(txid)
    if status.known:
        if need_raw:  # signed elsewhere: keep the final transaction the chain has
            try:
                raw = backend.raw_transaction(txid)
            except NotFound:
                return _Seen(status)
            return _Seen(status, raw if _ours(raw, unsigned_tx) else None)
        return _Seen(status)
    if not outpoints:
        return _Seen(status)
    conflict = None
    for spend in backend.spends(outpoints):
        if spend.state is not SpendState.SPENT or spend.spender is None:
            continue
        try:
            raw = backend.raw_transaction(spend.spender)
        except NotFound:
            continue  # the chain cannot show what spent it: no proof either way
        if _ours(raw, unsigned_tx):
            return _Seen(backend.tx_status(spend.spender), raw)
        if conflict is None or spend.confirmations > conflict.confirmations:
            conflict = spend
    return _Seen(status, None, conflict)


def _watched(s: Session, tip: int) -> list[int]:
    """Withdrawals sync follows: broadcast; confirmed but shallow enough for a
    reorganisation to take out (a batch speaks for its members); and those that carry
    founders' signatures but were not broadcast by us (refused by a node, or not sent yet)."""
    rows = s.exec(select(WithdrawalRow).where(col(WithdrawalRow.status).in_((APPROVED, SIGNED, BROADCAST, CONFIRMED))))
    ids = []
    theirs = replacements.grouped(s)  # followed by custody.withdraw.replace.sync_replacements
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
        seen = _look(backend, txid, unsigned, outpoints, need_raw)  # no lock held while the chain is asked
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
    if status.known and row.status in (APPROVED, SIGNED):
        # Its transaction is on the chain though we did not send it: signed elsewhere, or
        # sent through another node after ours refused it. It is broadcast, never refunded.
        if seen.raw is not None and (row.final_tx is None or x(row.final_tx) != seen.raw):
            row.final_tx = b2x(seen.raw)
        row.txid = status.txid
        row.reason = None
        _touch(s, row, BROADCAST)
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
        if status.confirmations >= limits.confirmations and row.status == BROADCAST:
            _touch(s, row, CONFIRMED)
            _release(s, wid)
            if row.batch_id is None:  # a batch settles for its members
                ledger.withdrawal_settled(s, row, _members(s, wid))
            audit_log.append(
                s,
                "withdrawal.confirmed",
                "sync",
                {"withdrawal_id": wid, "txid": row.txid, "height": status.block_height},
            )
        elif row.status == CONFIRMED and status.confirmations < limits.confirmations:
            _reorged(s, row, status.in_mempool)
        else:
            _touch(s, row)
    conflict = seen.conflict
    if (
        conflict is not None
        and conflict.confirmations >= limits.refund_confirmations
        and row.status in (APPROVED, SIGNED, BROADCAST)
        and row.batch_id is None
    ):
        _refund(s, row, conflict)
        changed = True
    return changed


def _refund(s: Session, row: WithdrawalRow, conflict: OutputSpend) -> None:
    """The proof is in: another transaction spent an input, deep in the chain. Fail the
    withdrawal, release its inputs and give each member's amount and fee back."""
    wid = row.id or 0
    reason = (
        f"input {conflict.txid}:{conflict.vout} spent by another transaction {conflict.spender} "
        f"at height {conflict.block_height} ({conflict.confirmations} confirmations)"
    )
    members = _members(s, wid)
    _touch(s, row, FAILED, reason)
    _release(s, wid)
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
            "refunded": sum(m.amount + m.fee for m in members or [row]),
            "ledger_txn": txn.id if txn else None,
        },
    )


REORG_DEPTH = 100
"""Confirmed withdrawals shallower than this are re-checked by every sync."""


def _reorged(s: Session, row: WithdrawalRow, in_mempool: bool) -> None:
    """A reorganisation took a confirmed withdrawal out of the chain: back to broadcast, its
    inputs reserved again (the transaction may confirm again), its settlement reversed."""
    _touch(s, row, BROADCAST)
    for i in _inputs(s, row.id or 0):
        if s.get(ReservedInput, f"{i.txid}:{i.vout}") is None:
            s.add(ReservedInput(outpoint=f"{i.txid}:{i.vout}", withdrawal_id=row.id or 0))
    ledger.withdrawal_unsettled(s, row, _members(s, row.id or 0))
    audit_log.append(
        s,
        "withdrawal.reorged",
        "sync",
        {"withdrawal_id": row.id, "txid": row.txid, "in_mempool": in_mempool},
    )


def cancel(
    db: Database, withdrawal_id: int, name: str, key: EmployeeSigner, reason: str, *, settings: Settings
) -> dict[str, Any]:
    """Fail a withdrawal that was not broadcast and release its inputs (and its customer's hold)."""
    with ledger.halting(db, settings), db.transaction() as s:
        policy = policy_from_session(s)
        row = _get(s, withdrawal_id, lock=True)
        _not_in_batch(row)
        authenticate(s, check_pinned(s, load_trust(settings)), name, key, None)
        if row.status not in PENDING:
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status}; only pending ones can be cancelled")
        if row.psbt is not None or row.final_tx is not None:
            raise Conflict(
                f"withdrawal #{withdrawal_id} carries founders' signatures: a signed transaction could still be "
                "broadcast, so its inputs stay reserved until it confirms, or until `custody sync` sees another "
                "transaction spend one of them CUSTODY_REFUND_CONFIRMATIONS blocks deep (then it is refunded)"
            )
        if row.kind == BATCH:
            ledger.batch_dissolved(s, row, _members(s, withdrawal_id))  # members stay held, queued again
            _dissolve(s, row)
        else:
            ledger.withdrawal_released(s, row, [], f"cancelled by {name}: {reason}")
        _touch(s, row, FAILED, f"cancelled by {name}: {reason}")
        _release(s, withdrawal_id)
        audit_log.append(s, "withdrawal.failed", name, {"withdrawal_id": withdrawal_id, "reason": reason})
        return view(s, policy, row)


def _dissolve(s: Session, batch: WithdrawalRow) -> None:
    """Give a cancelled batch's members (and their inputs) back to the queue."""
    for m in _members(s, batch.id or 0):
        for i in _inputs(s, m.id or 0):
            held = s.get(ReservedInput, f"{i.txid}:{i.vout}")
            if held is not None:
                held.withdrawal_id = m.id or 0
                s.add(held)
        m.batch_id = None
        m.updated_at = now()
        s.add(m)
    s.flush()


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


def limits_from_settings(settings: Settings) -> Limits:
    """Limits from CUSTODY_FEE_RATE, CUSTODY_MAX_FEE_RATE (sat/vB), CUSTODY_MAX_FEE (sat),
    CUSTODY_CONFIRMATIONS, CUSTODY_REFUND_CONFIRMATIONS, as the settings hold them. Raises
    InputError for a malformed value, or a refund depth below the confirmation depth."""
    base = Limits()
    try:
        max_fee = int(settings.max_fee if settings.max_fee is not None else base.max_fee)
        confirmations = int(settings.confirmations if settings.confirmations is not None else base.confirmations)
        refund = settings.refund_confirmations
        refund_confirmations = int(refund if refund is not None else base.refund_confirmations)
    except ValueError:
        raise InputError(
            "CUSTODY_MAX_FEE, CUSTODY_CONFIRMATIONS and CUSTODY_REFUND_CONFIRMATIONS take whole numbers"
        ) from None
    if max_fee < 0 or confirmations < 1:
        raise InputError("CUSTODY_MAX_FEE must be >= 0 and CUSTODY_CONFIRMATIONS >= 1")
    if refund_confirmations < confirmations:
        raise InputError(
            f"CUSTODY_REFUND_CONFIRMATIONS ({refund_confirmations}) must be at least CUSTODY_CONFIRMATIONS "
            f"({confirmations}): a refund needs at least the proof a settlement needs"
        )
    return Limits(
        default_fee_rate=parse_fee_rate(settings.fee_rate) if settings.fee_rate else base.default_fee_rate,
        max_fee_rate=parse_fee_rate(settings.max_fee_rate) if settings.max_fee_rate else base.max_fee_rate,
        max_fee=max_fee,
        confirmations=confirmations,
        refund_confirmations=refund_confirmations,
    )
