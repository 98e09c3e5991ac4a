"""Self-transfers: transactions that pay only custody (every output a fresh change address
of the policy, which the offline signer re-derives before it signs).

One mechanism serves a cancel (its inputs are a signed withdrawal's), a child paying for its
parent (its input is a withdrawal's unconfirmed change), a consolidation (many small
coins into one) and the rotation's sweep (custody.withdraw.sweep: an older policy's coins to
the newest policy): :func:`record` stores the row (kind ``cancel``, ``cpfp``, ``consol``,
account ``(self-transfer)``, amount 0; or kind ``sweep``, account ``custody-sweep``, the
amount moved), its inputs, optionally their reservation and its
link to the withdrawal it is for, and has the requester sign it; it is then approved under the
rulebook's ``self_transfer`` rule, exported, signed, imported, finalized and broadcast like a
withdrawal. When it confirms, its fee is the house's network fee
(:func:`custody.books.ledger.self_transfer_settled`); nothing else moves in the ledger.

:func:`choose_coins` picks a consolidation's coins: smallest first, each worth more than the
fee of spending it, while the transaction stays standard (weight under 400,000) and its fee
within the caps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from bitcoin.core import b2lx, b2x
from sqlmodel import Session

from custody.bitcoin.destinations import dust_limit
from custody.bitcoin.script import ScriptType
from custody.bitcoin.txbuild import Coin, build_transaction, fee_for, input_vsize, tx_vsize
from custody.books import ledger
from custody.clock import now
from custody.control import audit_log
from custody.errors import InputError
from custody.identity.approvals import sign_request
from custody.identity.employee_keys import EmployeeSigner
from custody.issuance.issuer import issue_in_session
from custody.policy.model import CHANGE, Policy
from custody.store.models import ReplacementRow, ReservedInput, WithdrawalRow
from custody.withdraw import limits as wd_limits
from custody.withdraw import records as wd_records
from custody.withdraw import states as wd_states

SELF_ACCOUNT = "(self-transfer)"
CANCEL = "cancel"
CPFP = "cpfp"
CONSOLIDATE = wd_states.CONSOLIDATE
MAX_STANDARD_WEIGHT = 400_000
"""Bitcoin Core's MAX_STANDARD_TX_WEIGHT: a heavier transaction is not relayed."""


@dataclass(frozen=True)
class Plan:
    """What a self-transfer spends and how its fee is found from its size."""

    kind: str
    coins: Sequence[Coin]
    prev: dict[str, str | None]  # outpoint -> previous transaction (hex)
    fee: Callable[[int], int]  # vsize -> fee
    locktime: int
    rate: Decimal
    reserve: bool = True  # reserve its inputs (a cancel's stay the withdrawal's)
    link: tuple[WithdrawalRow, WithdrawalRow] | None = None  # (withdrawal it is for, version it replaces)
    account: str = SELF_ACCOUNT
    moves: bool = False  # its amount column shows the value moved (a sweep), not 0
    judge: bool = True  # judged by the rulebook when requested (a sweep is judged when approved)


def record(
    s: Session, manifest: Any, policy: Policy, plan: Plan, *, actor: str, key: EmployeeSigner, limits: wd_limits.Limits
) -> WithdrawalRow:
    """Store a requested self-transfer (see the module's docstring) and judge it by the rulebook.
    ``policy`` is the one whose coins it spends (the fee is for its inputs' size; the requester
    signs the summary made with it); its output is a change address of the newest.

    Raises InputError (fee above the cap, or more than the inputs), PolicyViolation,
    AddressMismatch (the change address: the caller rolls back and halts).
    """
    change = issue_in_session(s, manifest, wd_records.CHANGE_ACCOUNT, 1, CHANGE, actor=actor)[0]
    spk = bytes.fromhex(change.script_pubkey)
    vsize = tx_vsize(policy.script_type, policy.threshold, policy.n, len(plan.coins), [spk])
    fee = plan.fee(vsize)
    value = sum(c.amount for c in plan.coins) - fee
    if fee > limits.max_fee or value < dust_limit(spk):
        raise InputError(
            f"a {plan.kind} of {sum(c.amount for c in plan.coins)} sat would pay a fee of {fee} sat: above the cap "
            f"of {limits.max_fee} sat (CUSTODY_MAX_FEE), or leaving less than dust"
        )
    tx = build_transaction(plan.coins, [(spk, value)], plan.locktime)
    stamp = now()
    row = WithdrawalRow(
        kind=plan.kind,
        account=plan.account,
        requester=actor,
        request_signature="",
        destination=change.address,
        destination_spk=change.script_pubkey,
        amount=value if plan.moves else 0,
        fee=fee,
        fee_rate=str(plan.rate),
        change_index=change.index,
        change_amount=value,
        status=wd_states.REQUESTED,
        unsigned_tx=b2x(tx.serialize()),
        created_at=stamp,
        updated_at=stamp,
    )
    store(s, policy, row, plan.coins, plan.prev, key, reserve=plan.reserve, link=plan.link)
    if plan.judge:
        wd_records._enforce(s, policy, row)
    return row


def store(
    s: Session,
    policy: Policy,
    row: WithdrawalRow,
    coins: Sequence[Coin],
    prev: dict[str, str | None],
    key: EmployeeSigner,
    *,
    reserve: bool,
    link: tuple[WithdrawalRow, WithdrawalRow] | None,
) -> int:
    """Store a requested row (a self-transfer, a fee bump), its inputs (reserved with
    ``reserve``) and its ``link`` (the withdrawal it is for, the version it replaces); the
    requester signs it. Returns its id."""
    s.add(row)
    s.flush()
    rid = row.id or 0
    for rec in wd_records._input_rows(rid, wd_records._tx(row), coins, prev):
        s.add(rec)
        if reserve:
            s.add(ReservedInput(outpoint=f"{rec.txid}:{rec.vout}", withdrawal_id=rid))
    if link is not None:
        original, replaced = link
        s.add(
            ReplacementRow(withdrawal_id=rid, original_id=original.id or 0, replaces_id=replaced.id or 0, kind=row.kind)
        )
    s.flush()
    row.request_signature = sign_request(key, wd_records._summary(policy, row, wd_records._inputs(s, rid)), row.account)
    s.add(row)
    return rid


def audit_requested(s: Session, event: str, actor: str, row: WithdrawalRow, **fields: Any) -> None:
    """A requested row's audit event (a bump, a cancel, a consolidation, a sweep), signed by its
    requester: its id, fee and unsigned txid, and ``fields``."""
    payload = {"withdrawal_id": row.id, "fee": row.fee, "unsigned_txid": b2lx(wd_records._tx(row).GetTxid()), **fields}
    audit_log.append(s, event, actor, payload, row.request_signature)


def choose_coins(
    coins: Sequence[Coin],
    shape: tuple[ScriptType, int, int],
    out_spk: bytes,
    rate: Decimal,
    max_fee: int,
    max_inputs: int,
) -> list[Coin]:
    """A consolidation's coins: smallest first, each worth more than the fee of spending it,
    as many as ``max_inputs`` while the transaction's weight stays under 400,000 and its fee at
    most ``max_fee``. Raises InputError when fewer than two qualify."""
    script_type, threshold, n = shape
    cost = fee_for(int(input_vsize(script_type, threshold, n)) + 1, rate)
    chosen: list[Coin] = []
    for c in sorted((c for c in coins if c.amount > cost), key=lambda c: (c.amount, c.txid, c.vout)):
        if len(chosen) >= max_inputs:
            break
        vsize = tx_vsize(script_type, threshold, n, len(chosen) + 1, [out_spk])
        if vsize * 4 >= MAX_STANDARD_WEIGHT or fee_for(vsize, rate) > max_fee:
            break
        chosen.append(c)
    if len(chosen) < 2:
        raise InputError(
            f"{len(chosen)} coin(s) worth more than the {cost} sat their spending costs at {rate} sat/vB: "
            "nothing to consolidate"
        )
    return chosen


def settle(s: Session, row: WithdrawalRow, confirmations: int, height: int | None) -> None:
    """A self-transfer confirmed deep enough: its fee booked, its own reservations released."""
    row.confirmations, row.block_height = confirmations, height
    wd_records._touch(s, row, wd_states.next_state(row.status, wd_states.Event.CONFIRMED))
    wd_records._release(s, row.id or 0)
    ledger.self_transfer_settled(s, row)
    audit_log.append(
        s, "withdrawal.confirmed", "sync", {"withdrawal_id": row.id, "txid": row.txid, "height": height, "fee": row.fee}
    )
