"""Fee bumps (RBF), cancels and children paying for their parent (CPFP) of withdrawals that
carry founders' signatures.

* ``bump``: a replacement paying exactly the same destinations and amounts, its extra fee taken
  from change (BIP-125: a higher absolute fee, at least the old fee plus 1 sat/vB of its own
  size). It is a withdrawal row of kind ``bump``, requested, approved (the rulebook's ``bump``
  rule: how many approvers, up to what fee and fee rate), exported, signed (the offline signer
  checks it replaces a transaction in its own journal, fee only), imported, finalized and
  broadcast like any other.
* ``cancel``: a self-transfer spending every input of the withdrawal back to a fresh change
  address of the policy, at a higher fee (BIP-125); approved as a self-transfer (the rulebook's
  ``self_transfer`` rule), signed (the signer checks every output re-derives from the policy).
* Following them on the chain (which version settles the withdrawal, a reorganisation, a
  foreign double spend) is :mod:`custody.withdraw.replace_sync`'s.

Every step respects the halt and writes its audit event in the same transaction.
"""

# size(bump): a fee bump's steps in one database transaction, as helper bump wrote it; split with
#   the replacements' next change

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from bitcoin.core import b2x
from sqlmodel import Session

from custody.bitcoin.amounts import parse_fee_rate
from custody.bitcoin.destinations import dust_limit
from custody.bitcoin.txbuild import Coin, build_transaction, fee_for, tx_vsize
from custody.books import ledger
from custody.chain.types import ChainBackend
from custody.clock import now
from custody.config import Settings
from custody.control import audit_log, halt
from custody.control.epochs import current_policy as policy_from_session
from custody.control.roster import authenticate, check_pinned, load_trust
from custody.errors import Conflict, InputError
from custody.faults import crash_point
from custody.identity.employee_keys import EmployeeSigner
from custody.identity.replacement_rules import bump_fee_floor
from custody.issuance.issuer import AddressMismatch, halt_for_mismatch, load_manifest_or_halt
from custody.policy.model import CHANGE, Policy
from custody.store.db import Database
from custody.store.models import WithdrawalRow
from custody.withdraw import limits as wd_limits
from custody.withdraw import queue as q
from custody.withdraw import records as wd_records
from custody.withdraw import selftransfer as st
from custody.withdraw import states as wd_states
from custody.withdraw.replace_check import BUMP
from custody.withdraw.replacements import replacements_of
from custody.withdraw.states import Event

CANCEL = st.CANCEL
CPFP = st.CPFP
OPEN = (wd_states.REQUESTED, wd_states.APPROVED)
LIVE = (wd_states.SIGNED, wd_states.BROADCAST)
DEFAULT_LIMITS = wd_limits.Limits()


def _next(row: WithdrawalRow, event: Event) -> str:
    """The state ``event`` moves ``row`` to (custody.withdraw.states); IllegalTransition if none."""
    return wd_states.next_state(row.status, event)


def _signed(row: WithdrawalRow) -> bool:
    return row.psbt is not None or row.final_tx is not None


def _live(s: Session, policy: Policy, row: WithdrawalRow) -> bool:
    """Whether founders' signatures exist or can still be made for ``row``: it carries some, or
    (a customer's withdrawal, or a batch: always) its approvals are complete, which the offline signer accepts
    whatever became of the row since (custody.withdraw.records.approvals_complete)."""
    customer = row.kind in (wd_states.SINGLE, wd_states.BATCH)
    return _signed(row) or (customer and wd_records.approvals_complete(s, policy, row))


def _original(s: Session, withdrawal_id: int, policy: Policy | None = None) -> WithdrawalRow:
    """A customer withdrawal (or batch) carrying founders' signatures, not settled, locked; with
    ``policy`` (a cancel), also an approved one nobody signed yet (:func:`_live`)."""
    row = wd_records._get(s, withdrawal_id, lock=True)
    wd_records._not_in_batch(row)
    if row.kind not in (wd_states.SINGLE, wd_states.BATCH):
        raise Conflict(f"#{withdrawal_id} is a {row.kind}: bump or cancel the withdrawal it is for")
    live = _live(s, policy, row) if policy is not None else _signed(row)
    if row.status not in (wd_states.APPROVED, *LIVE) or not live:
        raise Conflict(
            f"withdrawal #{withdrawal_id} is {row.status}: only a withdrawal carrying founders' signatures that has "
            "not confirmed can be replaced"
        )
    for r in replacements_of(s, withdrawal_id):
        if r.status in OPEN:
            raise Conflict(f"{r.kind} #{r.id} of withdrawal #{withdrawal_id} awaits approval already")
        if r.kind == CANCEL and r.status in LIVE:
            raise Conflict(f"withdrawal #{withdrawal_id} is being cancelled by #{r.id}")
    return row


def _latest(s: Session, original: WithdrawalRow) -> WithdrawalRow:
    """The version a bump replaces: the signed one paying the most fee."""
    versions = [original] + [r for r in replacements_of(s, original.id or 0) if r.kind == BUMP and r.status in LIVE]
    return max(versions, key=lambda r: r.fee)


def _coins(s: Session, row: WithdrawalRow) -> tuple[list[Coin], dict[str, str | None]]:
    inputs = wd_records._inputs(s, row.id or 0)
    coins = [Coin(i.txid, i.vout, i.amount, bytes.fromhex(i.script_pubkey), i.chain, i.idx) for i in inputs]
    return coins, {f"{i.txid}:{i.vout}": i.prev_tx for i in inputs}


@contextmanager
def _requesting(
    db: Database, settings: Settings, withdrawal_id: int, actor: str, key: EmployeeSigner, *, approved: bool = False
) -> Iterator[tuple[Session, Policy, WithdrawalRow]]:
    """A replacement's request transaction: the halt respected, the ledger checked, the
    requester authenticated (request role), the withdrawal it is for locked (``approved``: a
    cancel, for which an approved withdrawal nobody signed yet is live too)."""
    with ledger.halting(db, settings), db.transaction() as s:
        halt.guard(s)
        policy = policy_from_session(s)
        authenticate(s, check_pinned(s, load_trust(settings)), actor, key, "request")
        yield s, policy, _original(s, withdrawal_id, policy if approved else None)


def _rate(fee_rate: str, limits: wd_limits.Limits) -> Decimal:
    rate = parse_fee_rate(fee_rate)
    if rate > limits.max_fee_rate:
        raise InputError(f"fee rate {rate} sat/vB is above the cap of {limits.max_fee_rate} sat/vB")
    return rate


def bump(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    withdrawal_id: int,
    *,
    fee_rate: str,
    actor: str,
    key: EmployeeSigner,
    limits: wd_limits.Limits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Request a fee-only replacement of a signed withdrawal's transaction at ``fee_rate``.

    Raises HaltedError, NotFound, Conflict (not signed, settled, or a replacement pending),
    InputError (no change, or too little to pay the extra fee: use CPFP; above the fee cap),
    PolicyViolation (the rulebook's bump rule), ApprovalError (requester).
    """
    rate = _rate(fee_rate, limits)
    tip = backend.tip_height()
    with _requesting(db, settings, withdrawal_id, actor, key) as (s, policy, original):
        replaced = _latest(s, original)
        old = wd_records._tx(replaced)
        change = wd_records._change_position(s, replaced)
        outputs = [(bytes(o.scriptPubKey), int(o.nValue)) for o in old.vout]
        vsize = tx_vsize(policy.script_type, policy.threshold, policy.n, len(old.vin), [spk for spk, _ in outputs])
        fee = max(fee_for(vsize, rate), bump_fee_floor(replaced.fee, vsize))
        if change is None or outputs[change][1] - (fee - replaced.fee) < dust_limit(outputs[change][0]):
            have = outputs[change][1] if change is not None else 0
            raise InputError(
                f"withdrawal #{withdrawal_id}'s change ({have} sat) cannot pay the extra {fee - replaced.fee} sat "
                f"a fee of {fee} sat needs and stay above dust: a bump takes its fee from change only. Pay it from "
                f"a child instead: custody withdraw cpfp {withdrawal_id} --fee-rate R"
            )
        if fee > limits.max_fee:
            raise InputError(f"the fee of {fee} sat is above the cap of {limits.max_fee} sat (CUSTODY_MAX_FEE)")
        outputs[change] = (outputs[change][0], outputs[change][1] - (fee - replaced.fee))
        coins, prev = _coins(s, replaced)
        tx = build_transaction(coins, outputs, max(tip, int(old.nLockTime)))
        stamp = now()
        row = WithdrawalRow(
            kind=BUMP,
            account=original.account,
            requester=actor,
            request_signature="",
            destination=original.destination,
            destination_spk=original.destination_spk,
            amount=original.amount,
            fee=fee,
            fee_rate=str(rate),
            change_index=replaced.change_index,
            change_amount=outputs[change][1],
            status=wd_states.REQUESTED,
            unsigned_tx=b2x(tx.serialize()),
            created_at=stamp,
            updated_at=stamp,
        )
        st.store(s, policy, row, coins, prev, key, reserve=False, link=(original, replaced))
        wd_records._enforce(s, policy, row)
        crash_point("bump.requested")
        st.audit_requested(
            s,
            "withdrawal.bump_requested",
            actor,
            row,
            original_id=withdrawal_id,
            replaces_id=replaced.id,
            replaced_fee=replaced.fee,
        )
        return wd_records.view(s, policy, row)


def cancel(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    withdrawal_id: int,
    *,
    reason: str,
    fee_rate: str | None,
    actor: str,
    key: EmployeeSigner,
    limits: wd_limits.Limits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Request a self-transfer double-spending every input of a signed withdrawal back to a
    fresh change address of the policy. So too for a customer's withdrawal whose approvals are
    complete though nobody signed it yet: the offline signer would still sign it (it cannot know
    of a cancel), so its hold stays until the chain shows one of its inputs spent elsewhere. One
    still awaiting approvals (or a bump or self-transfer nobody signed) is simply cancelled:
    :func:`custody.withdraw.queue.cancel`.

    Raises HaltedError, NotFound, Conflict, InputError (fee), PolicyViolation, ApprovalError,
    VerificationFailed (change address, after raising the halt).
    """
    with db.transaction() as s:
        row = wd_records._get(s, withdrawal_id)
        unsigned = row.status in wd_states.PENDING and not _live(s, policy_from_session(s), row)
        customer = row.kind in (wd_states.SINGLE, wd_states.BATCH)
    if unsigned and customer:
        return q.cancel(db, withdrawal_id, actor, key, reason, settings=settings)
    if unsigned:
        return _drop(db, withdrawal_id, actor, key, reason, settings)
    manifest = load_manifest_or_halt(db, settings)
    rate = _rate(fee_rate, limits) if fee_rate is not None else limits.default_fee_rate
    tip = backend.tip_height()
    try:
        with _requesting(db, settings, withdrawal_id, actor, key, approved=True) as (s, policy, original):
            rid = _request_cancel(s, manifest, policy, original, rate, tip, actor, key, limits)
            row = wd_records._get(s, rid)
            st.audit_requested(s, "withdrawal.cancel_requested", actor, row, original_id=withdrawal_id, reason=reason)
            return wd_records.view(s, policy, row)
    except AddressMismatch as exc:
        raise halt_for_mismatch(db, settings, exc) from None


def _drop(
    db: Database, withdrawal_id: int, actor: str, key: EmployeeSigner, reason: str, settings: Settings
) -> dict[str, Any]:
    """Fail a bump or self-transfer nobody signed yet: it holds no customer's money, only
    (a consolidation, a child) its own inputs' reservations."""
    with db.transaction() as s:
        halt.guard(s)
        policy = policy_from_session(s)
        authenticate(s, check_pinned(s, load_trust(settings)), actor, key, None)
        row = wd_records._get(s, withdrawal_id, lock=True)
        if row.status not in wd_states.PENDING or _signed(row):
            raise Conflict(f"#{withdrawal_id} is {row.status}: it can no longer be dropped")
        wd_records._touch(s, row, _next(row, Event.CANCELLED), f"cancelled by {actor}: {reason}")
        wd_records._release(s, withdrawal_id)
        audit_log.append(s, "withdrawal.failed", actor, {"withdrawal_id": withdrawal_id, "reason": reason})
        return wd_records.view(s, policy, row)


def _request_cancel(
    s: Session,
    manifest: Any,
    policy: Policy,
    original: WithdrawalRow,
    rate: Decimal,
    tip: int,
    actor: str,
    key: EmployeeSigner,
    limits: wd_limits.Limits,
) -> int:
    coins, prev = _coins(s, original)
    replaced = _latest(s, original)
    plan = st.Plan(
        CANCEL,
        coins,
        prev,
        lambda vsize: max(fee_for(vsize, rate), bump_fee_floor(replaced.fee, vsize)),
        max(tip, int(wd_records._tx(original).nLockTime)),
        rate,
        reserve=False,  # they stay the withdrawal's until the chain decides
        link=(original, replaced),
    )
    row = st.record(s, manifest, policy, plan, actor=actor, key=key, limits=limits)
    crash_point("cancel.requested")
    return row.id or 0


def cpfp(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    withdrawal_id: int,
    *,
    fee_rate: str,
    actor: str,
    key: EmployeeSigner,
    limits: wd_limits.Limits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Request a child paying for a broadcast withdrawal: a self-transfer of its change output
    (unconfirmed) to a fresh change address, whose fee lifts the pair to ``fee_rate``.

    Raises HaltedError, NotFound, Conflict (not broadcast, or no change output), InputError
    (fee), PolicyViolation, ApprovalError, VerificationFailed (after raising the halt).
    """
    manifest = load_manifest_or_halt(db, settings)
    rate = _rate(fee_rate, limits)
    tip = backend.tip_height()
    try:
        with _requesting(db, settings, withdrawal_id, actor, key) as (s, policy, original):
            parent = _latest(s, original)
            plan = _child_plan(s, policy, original, parent, rate, tip)
            row = st.record(s, manifest, policy, plan, actor=actor, key=key, limits=limits)
            audit_log.append(
                s,
                "withdrawal.cpfp_requested",
                actor,
                {"withdrawal_id": row.id, "original_id": withdrawal_id, "parent_txid": parent.txid, "fee": row.fee},
                row.request_signature,
            )
            return wd_records.view(s, policy, row)
    except AddressMismatch as exc:
        raise halt_for_mismatch(db, settings, exc) from None


def _child_plan(
    s: Session, policy: Policy, original: WithdrawalRow, parent: WithdrawalRow, rate: Decimal, tip: int
) -> st.Plan:
    """Spend ``parent``'s change so that parent and child together pay ``rate``."""
    change = wd_records._change_position(s, parent)
    if parent.status != wd_states.BROADCAST or not parent.final_tx or not parent.txid or change is None:
        raise Conflict(
            f"withdrawal #{original.id}: a child pays from the change of a broadcast transaction, and "
            f"#{parent.id} is {parent.status}{' with no change output' if change is None else ''}"
        )
    out = wd_records._tx(parent).vout[change]
    spk = bytes(out.scriptPubKey)
    coin = Coin(parent.txid, change, int(out.nValue), spk, CHANGE, parent.change_index or 0)
    parent_vsize = tx_vsize(
        policy.script_type,
        policy.threshold,
        policy.n,
        len(wd_records._tx(parent).vin),
        [bytes(o.scriptPubKey) for o in wd_records._tx(parent).vout],
    )

    def fee(vsize: int) -> int:  # the package's rate, and at least 1 sat/vB of the child's own
        return max(fee_for(parent_vsize + vsize, rate) - parent.fee, bump_fee_floor(0, vsize))

    return st.Plan(
        CPFP,
        [coin],
        {coin.outpoint: parent.final_tx},
        fee,
        max(tip, int(wd_records._tx(parent).nLockTime)),
        rate,
        link=(original, parent),
    )
