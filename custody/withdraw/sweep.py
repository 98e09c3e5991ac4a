"""``custody rotate sweep``: an older policy's coins moved to the newest policy after a key rotation.

A sweep is a self-transfer recorded as a withdrawal of kind ``sweep`` (account
``custody-sweep``): the oldest policy that still holds coins, all its confirmed unspent outputs
(up to :data:`MAX_INPUTS`) in, one output out to a fresh change address of the NEWEST policy,
minus the network fee. From there it takes the withdrawal's path unchanged: two employees
approve the exact transaction (`withdraw approve`; the rulebook's ``self_transfer`` tier, its
fee caps), m founders of the OLD policy sign it offline (`sign`: the signer refuses unless every
output re-derives from the newest policy pinned on its own machine), then `withdraw import`,
`finalize`, `broadcast`, and `sync` follows it. Nothing is held from any customer; when it
confirms, the ledger books its network fee, once (custody.books.ledger).

The sweep is recorded as every self-transfer is (custody.withdraw.selftransfer.record): its
own here are which coins it takes and its audit event.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from bitcoin.core import b2x
from sqlmodel import Session, col, select

from custody.bitcoin.amounts import parse_fee_rate
from custody.bitcoin.txbuild import Coin, fee_for
from custody.chain.types import ChainBackend
from custody.config import Settings
from custody.control import epochs, halt
from custody.control.roster import authenticate, check_pinned, load_trust
from custody.errors import Conflict, InputError
from custody.faults import crash_point
from custody.identity.employee_keys import EmployeeSigner
from custody.issuance.issuer import AddressMismatch, halt_for_mismatch, load_manifest_or_halt
from custody.store.db import Database
from custody.store.models import AddressRow, ReservedInput, WithdrawalRow
from custody.withdraw import limits as wd_limits
from custody.withdraw import records
from custody.withdraw import selftransfer as st
from custody.withdraw import states as wd_states

SWEEP = wd_states.SWEEP
ACCOUNT = "custody-sweep"
MAX_INPUTS = 250  # a p2sh 2-of-3 input weighs ~1,200 WU: 250 stay well under 400,000
_OPEN = (*wd_states.PENDING, wd_states.BROADCAST)
_DEFAULT_LIMITS = wd_limits.Limits()


def _old_coins(s: Session, backend: ChainBackend) -> tuple[epochs.Epoch, list[Coin]]:
    """The oldest policy that still holds coins, and its confirmed unspent outputs, unreserved."""
    every = epochs.store_epochs(s)
    if len(every) == 1:
        raise InputError("nothing to sweep: the store never rotated its keys (`custody rotate apply`)")
    rows = s.exec(select(AddressRow).order_by(col(AddressRow.chain), col(AddressRow.idx))).all()
    reserved = {r.outpoint for r in s.exec(select(ReservedInput)).all()}
    for epoch in every[:-1]:
        mine = {bytes.fromhex(a.script_pubkey): a for a in rows if epochs.epoch_of(every, a.chain, a.idx) is epoch}
        coins = [
            Coin(u.txid, u.vout, u.amount, u.script_pubkey, mine[u.script_pubkey].chain, mine[u.script_pubkey].idx)
            for u in (backend.unspent(list(mine)) if mine else [])
            if u.script_pubkey in mine and f"{u.txid}:{u.vout}" not in reserved
        ]
        if coins:
            coins.sort(key=lambda c: (-c.amount, c.txid, c.vout))
            return epoch, coins[:MAX_INPUTS]
    raise InputError("nothing to sweep: no older policy's address holds a confirmed, unreserved coin")


def propose_sweep(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    *,
    requester: str,
    key: EmployeeSigner,
    fee_rate: str | None,
    limits: wd_limits.Limits = _DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Record the next sweep (see the module's docstring) as requested by ``requester`` (request
    role); its inputs are reserved in the same transaction, audited as ``sweep.requested``.

    Raises HaltedError, InputError (nothing to sweep, a fee above the cap or leaving dust),
    Conflict (a sweep is already between request and confirmation), ApprovalError, NodeError,
    VerificationFailed (the new address, after raising the halt), StorageError.
    """
    manifest = load_manifest_or_halt(db, settings)
    pinned = load_trust(settings)
    tip = backend.tip_height()
    rate = parse_fee_rate(fee_rate) if fee_rate is not None else limits.default_fee_rate
    if rate > limits.max_fee_rate:
        raise InputError(f"fee rate {rate} sat/vB is above the cap of {limits.max_fee_rate} sat/vB")
    try:
        with db.transaction() as s:
            halt.guard(s)
            open_sweep = s.exec(
                select(WithdrawalRow).where(WithdrawalRow.kind == SWEEP, col(WithdrawalRow.status).in_(_OPEN))
            ).first()
            if open_sweep is not None:
                raise Conflict(f"sweep #{open_sweep.id} is {open_sweep.status}: one sweep at a time")
            authenticate(s, check_pinned(s, pinned), requester, key, "request")
            return _record(s, backend, manifest, requester, key, tip, rate, limits)
    except AddressMismatch as exc:
        raise halt_for_mismatch(db, settings, exc) from None


def _record(
    s: Session,
    backend: ChainBackend,
    manifest: Any,
    requester: str,
    key: EmployeeSigner,
    tip: int,
    rate: Decimal,
    limits: wd_limits.Limits,
) -> dict[str, Any]:
    epoch, coins = _old_coins(s, backend)
    prev: dict[str, str | None] = {c.outpoint: b2x(backend.raw_transaction(c.txid)) for c in coins}
    plan = st.Plan(
        SWEEP, coins, prev, lambda vsize: fee_for(vsize, rate), tip, rate, account=ACCOUNT, moves=True, judge=False
    )
    row = st.record(s, manifest, epoch.policy, plan, actor=requester, key=key, limits=limits)
    crash_point("sweep.requested")
    st.audit_requested(
        s,
        "sweep.requested",
        requester,
        row,
        from_epoch=epoch.number,
        to_epoch=epochs.store_epochs(s)[-1].number,
        inputs=len(coins),
        swept=sum(c.amount for c in coins),
        destination=row.destination,
    )
    return records.view(s, epoch.policy, row)
