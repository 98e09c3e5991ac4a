"""``custody utxo list|consolidate``: custody's coins on the chain, and many small ones merged
into one by an approved, signed self-transfer (:mod:`custody.withdraw.selftransfer`)."""

from __future__ import annotations

from typing import Any

from bitcoin.core import b2x
from sqlmodel import select

from custody.bitcoin.amounts import parse_fee_rate
from custody.bitcoin.txbuild import fee_for
from custody.books import ledger
from custody.chain.types import ChainBackend
from custody.config import Settings
from custody.control import halt
from custody.control.epochs import current_policy as policy_from_session
from custody.control.roster import authenticate, check_pinned, load_trust
from custody.errors import InputError
from custody.identity.employee_keys import EmployeeSigner
from custody.issuance.issuer import AddressMismatch, halt_for_mismatch, load_manifest_or_halt
from custody.store.db import Database
from custody.store.models import AddressRow, ReservedInput
from custody.withdraw import limits as wd_limits
from custody.withdraw import queue as q
from custody.withdraw import records as wd_records
from custody.withdraw import selftransfer as st

DEFAULT_LIMITS = wd_limits.Limits()


def list_utxos(db: Database, backend: ChainBackend) -> list[dict[str, Any]]:
    """Every confirmed unspent output at custody's addresses, smallest first, with the
    withdrawal (or self-transfer) that holds it, if any. Raises NodeError."""
    db.check_schema()
    with db.transaction() as s:
        addresses = {bytes.fromhex(a.script_pubkey): a for a in s.exec(select(AddressRow)).all()}
        held = {r.outpoint: r.withdrawal_id for r in s.exec(select(ReservedInput)).all()}
    if not addresses:
        return []
    out = []
    for u in backend.unspent(list(addresses)):
        a = addresses.get(u.script_pubkey)
        if a is None:
            continue
        outpoint = f"{u.txid}:{u.vout}"
        out.append(
            {
                "outpoint": outpoint,
                "amount_sat": u.amount,
                "address": a.address,
                "chain": a.chain,
                "index": a.idx,
                "account": a.account,
                "reserved_by": held.get(outpoint),
            }
        )
    return sorted(out, key=lambda r: (r["amount_sat"], r["outpoint"]))


def consolidate(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    *,
    fee_rate: str | None,
    max_inputs: int,
    actor: str,
    key: EmployeeSigner,
    limits: wd_limits.Limits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Request a consolidation: up to ``max_inputs`` unreserved coins (smallest first, each
    worth more than its spending costs) into one fresh change address, the transaction's weight
    under 400,000 and its fee within CUSTODY_MAX_FEE and the rulebook's caps. It is approved
    under the rulebook's ``self_transfer`` rule and signed like a withdrawal.

    Raises HaltedError, InputError (fee rate, nothing to consolidate), PolicyViolation,
    ApprovalError, VerificationFailed (change address, after raising the halt), NodeError.
    """
    if max_inputs < 2:
        raise InputError("a consolidation spends at least two coins (--max-inputs)")
    manifest = load_manifest_or_halt(db, settings)
    rate = parse_fee_rate(fee_rate) if fee_rate is not None else limits.default_fee_rate
    if rate > limits.max_fee_rate:
        raise InputError(f"fee rate {rate} sat/vB is above the cap of {limits.max_fee_rate} sat/vB")
    tip = backend.tip_height()
    try:
        with ledger.halting(db, settings), db.transaction() as s:
            halt.guard(s)  # also takes the audit head's lock: reading then reserving coins is serial
            policy = policy_from_session(s)
            authenticate(s, check_pinned(s, load_trust(settings)), actor, key, "request")
            coins = q._spendable(s, backend, policy)
            probe = next(iter(s.exec(select(AddressRow)).all()), None)
            rules = wd_records._rulebooks(s).at(tip)
            cap = min(limits.max_fee, rules.rules.fees.max_fee_sat if rules else limits.max_fee)
            shape = (policy.script_type, policy.threshold, policy.n)
            chosen = st.choose_coins(
                coins, shape, bytes.fromhex(probe.script_pubkey) if probe else b"", rate, cap, max_inputs
            )
            prev = {c.outpoint: b2x(backend.raw_transaction(c.txid)) for c in chosen}
            plan = st.Plan(st.CONSOLIDATE, chosen, prev, lambda vsize: fee_for(vsize, rate), tip, rate)
            row = st.record(s, manifest, policy, plan, actor=actor, key=key, limits=limits)
            st.audit_requested(
                s,
                "withdrawal.consolidation_requested",
                actor,
                row,
                inputs=len(chosen),
                amount=sum(c.amount for c in chosen),
            )
            return wd_records.view(s, policy, row)
    except AddressMismatch as exc:
        raise halt_for_mismatch(db, settings, exc) from None
