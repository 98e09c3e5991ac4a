"""Deposits read from the chain and credited to customers in the ledger.

``sync_deposits`` takes the unspent outputs paying our deposit addresses (chain 0) from the
block scanner (:mod:`custody.books.blockscan`: each new block read once, whatever the number
of addresses) and follows each one:

* unconfirmed (``pending`` at height None): seen in the mempool; never credited there.
* ``pending``: seen in a block, not yet deep enough; credited at CUSTODY_DEPOSIT_CONFIRMATIONS
  (default 1) confirmations: Dr asset:onchain, Cr customer (custody.books.ledger), once per outpoint.
* ``credited``: in the customer's balance. It stays credited when it leaves the unspent set
  while its transaction stays confirmed (spent, by our withdrawal or otherwise: the reserves
  audit notices a spend that is not ours). When its transaction is no longer confirmed (the
  node does not know it, or it is back in the mempool: a reorganisation) the credit is
  reversed by a visible posting and an audit-log entry; a balance this takes below zero is
  posted all the same and raises the trading halt naming the account.
* ``reversed`` / ``dropped``: no longer (or never) credited; credited again when the output
  is confirmed again.

Deposits buried FINAL_DEPTH blocks deep are no longer re-checked, so that a sync costs the
same however long the history: unspent outputs come from the scanned blocks; only deposits that left
the unspent set within the last FINAL_DEPTH blocks are asked about one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlmodel import Session, col, select

from custody.bitcoin.amounts import format_btc
from custody.books import blockscan, ledger
from custody.books.deposit_states import (
    CREDITED,
    DROPPED,
    PENDING,
    REVERSED,
    WATCHED,
    Observation,
    next_state,
    observe,
)
from custody.chain.types import ChainBackend, Utxo
from custody.clock import iso, now
from custody.config import Settings
from custody.control import audit_log, epochs, halt
from custody.errors import InputError, NodeError, NotFound, VerificationFailed
from custody.issuance import record
from custody.policy.model import RECEIVE
from custody.store.db import Database
from custody.store.models import AddressRow, DepositRow, ScanBlockRow, WithdrawalInput, WithdrawalRow

FINAL_DEPTH = 100
"""Confirmations after which a deposit is final: deeper reorganisations are not followed."""

_CHUNK = 500

TIP_DROP_ALLOWED = 6
"""How far below the highest block custody recorded a chain's tip may be (a reorganisation
onto a shorter chain) before the chain is taken for one that is behind or another chain."""


def check_not_behind(db: Database, tip: int) -> None:
    """Refuse a chain whose tip is well below blocks custody already recorded from it.

    A node that stopped syncing, was restored from an old copy or follows another chain
    does not know recent deposits and withdrawals; acting on its word would reverse them
    (and unsettle withdrawals). Raises NodeError (exit 8) when ``tip`` is more than
    TIP_DROP_ALLOWED blocks below the highest deposit or withdrawal block recorded.
    """
    from sqlalchemy import func

    with db.transaction() as s:
        deposit = s.exec(select(func.max(DepositRow.height))).one()
        withdrawal = s.exec(select(func.max(WithdrawalRow.block_height))).one()
    seen = max((h for h in (deposit, withdrawal) if h is not None), default=None)
    if seen is not None and tip < seen - TIP_DROP_ALLOWED:
        raise NodeError(
            f"the chain's tip is at height {tip}, yet custody recorded blocks up to height {seen} from it: "
            "the node is behind or follows another chain; nothing it says is acted on"
        )


def deposit_confirmations(settings: Settings) -> int:
    """CUSTODY_DEPOSIT_CONFIRMATIONS (default 1). Raises InputError for a malformed value."""
    text = settings.deposit_confirmations or "1"
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"CUSTODY_DEPOSIT_CONFIRMATIONS takes a whole number, not {text!r}") from None
    if not 1 <= value <= FINAL_DEPTH:
        raise InputError(f"CUSTODY_DEPOSIT_CONFIRMATIONS must be 1..{FINAL_DEPTH}, not {value}")
    return value


def depth(dep: DepositRow, tip: int | None) -> int:
    """A deposit's confirmations below ``tip``, the highest block custody has read.

    The stored count is frozen once sync stops re-checking a credited deposit, so the views
    count from the tip instead; without a tip (no sync yet), out of a block, or at a height
    above ``tip`` (a reorganisation sync has not finished), the stored count stands.
    """
    if tip is None or dep.height is None or dep.height > tip:
        return dep.confirmations
    return tip - dep.height + 1


def known_tip(s: Session) -> int | None:
    """The highest block the last ``custody sync`` read (the scan cursor), or None."""
    from sqlalchemy import func

    top: int | None = s.exec(select(func.max(ScanBlockRow.height))).one()
    return top


def view(dep: DepositRow, change: str | None = None, tip: int | None = None) -> dict[str, Any]:
    """A deposit as ``custody sync`` and ``custody ledger deposits`` show it; confirmations
    counted below ``tip`` when given (see ``depth``)."""
    return {
        "record": "deposit",
        "id": dep.id,
        "outpoint": dep.outpoint,
        "account": dep.account,
        "address": dep.address,
        "amount_sat": dep.amount,
        "amount": format_btc(dep.amount),
        "status": dep.status,
        "height": dep.height,
        "confirmations": depth(dep, tip),
        "spent": dep.spent,
        "change": change,
        "first_seen_at": iso(dep.first_seen_at),
        "updated_at": iso(dep.updated_at),
    }


def list_deposits(db: Database, account: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
    db.check_schema()
    with db.transaction() as s:
        query = select(DepositRow)
        if account is not None:
            query = query.where(DepositRow.account == account)
        if status is not None:
            query = query.where(DepositRow.status == status)
        tip = known_tip(s)
        return [view(d, tip=tip) for d in s.exec(query.order_by(col(DepositRow.id))).all()]


@dataclass(frozen=True)
class _Seen:
    """Where the chain says a deposit's transaction is: confirmations, 0 when not in a block."""

    confirmations: int
    height: int | None
    known: bool


class OwnerMismatch(VerificationFailed):
    """A deposit address whose owner the store and the audit log (or its derivation) disagree on;
    raised inside the deposit's transaction, which rolls back: nothing recorded or credited."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"deposit address {address}: {reason}")


class _Owners:
    """Whose each deposit address is: the account the audit log issued its index to, and the
    address that index derives to from the policy. Built once per sync; the address rows are
    only a way to find the index."""

    def __init__(self) -> None:
        self._log: record.LogAccounts | None = None
        self._deriver: epochs.Derivers | None = None

    def close(self) -> None:
        """Drop what the first check read (the issuances' temporary file)."""
        if self._log is not None:
            self._log.close()

    def check(self, s: Session, index: int, account: str, address: str, script_pubkey: str | None = None) -> None:
        """Raises OwnerMismatch unless the log issued ``index`` to ``account`` and it derives to ``address``.

        The log's issuances are read at the first check of a sync (through ``s``), so a sync
        with no deposit to record or credit does not read them."""
        if self._log is None or self._deriver is None:
            self._log = record.LogAccounts(s, RECEIVE)
            self._deriver = epochs.Derivers(epochs.store_epochs(s))  # every policy: old addresses stay ours
        logged = self._log.account_of(index)
        if logged is None:
            raise OwnerMismatch(address, f"index 0/{index} was never issued in the audit log")
        if logged != account:
            raise OwnerMismatch(address, f"the store says account {account!r}; the audit log issued it to {logged!r}")
        derived = self._deriver.derive(RECEIVE, index)
        if derived.address != address or (script_pubkey is not None and derived.script_pubkey.hex() != script_pubkey):
            raise OwnerMismatch(address, f"index 0/{index} derives to {derived.address}, not to this address")


def _credit(s: Session, dep: DepositRow, actor: str, owners: _Owners, again: bool) -> None:
    """Enter ``credited``: Dr asset:onchain, Cr the customer, once per entry into the state."""
    owners.check(s, dep.address_index, dep.account, dep.address)
    txn = ledger.deposit_credited(s, dep)
    dep.status = CREDITED
    dep.credit_txn = txn.id
    audit_log.append(
        s,
        "deposit.credited",
        actor,
        {
            "outpoint": dep.outpoint,
            "account": dep.account,
            "amount": dep.amount,
            "height": dep.height,
            "ledger_txn": txn.id,
            "again": again,
        },
    )


def _reverse(s: Session, dep: DepositRow, owners: _Owners, negative: list[tuple[str, str, int]]) -> None:
    """Leave ``credited``: the credit reversed by a visible posting; a balance this takes below
    zero is noted in ``negative`` (the caller raises the halt)."""
    owners.check(s, dep.address_index, dep.account, dep.address)
    txn = ledger.deposit_reversed(s, dep)
    dep.status, dep.confirmations, dep.height = REVERSED, 0, None
    balance = ledger.customer_balance(s, dep.account)
    audit_log.append(
        s,
        "deposit.reversed",
        "sync",
        {
            "outpoint": dep.outpoint,
            "account": dep.account,
            "amount": dep.amount,
            "reason": "its transaction is no longer confirmed (chain reorganisation)",
            "ledger_txn": txn.id,
            "balance_after": balance,
        },
    )
    if balance < 0:
        negative.append((dep.account, dep.outpoint, balance))


def _by_outpoint(s: Session, outpoints: Sequence[str]) -> dict[str, DepositRow]:
    found: dict[str, DepositRow] = {}
    for start in range(0, len(outpoints), _CHUNK):
        chunk = outpoints[start : start + _CHUNK]
        found.update({d.outpoint: d for d in s.exec(select(DepositRow).where(col(DepositRow.outpoint).in_(chunk)))})
    return found


def _spending_withdrawal_txid(s: Session, dep: DepositRow) -> str | None:
    """The txid of our broadcast or confirmed withdrawal spending this deposit, if any."""
    row = s.exec(
        select(WithdrawalRow.txid)
        .join(WithdrawalInput, col(WithdrawalInput.withdrawal_id) == col(WithdrawalRow.id))
        .where(WithdrawalInput.txid == dep.txid, WithdrawalInput.vout == dep.vout)
        .where(col(WithdrawalRow.status).in_(("broadcast", "confirmed")), col(WithdrawalRow.txid).is_not(None))
    ).first()
    return row


def _where(backend: ChainBackend, dep: DepositRow, spender: str | None) -> _Seen:
    """Whether a deposit that left the unspent set is still confirmed."""
    status = backend.tx_status(dep.txid)
    if status.known and status.confirmations > 0:
        return _Seen(status.confirmations, status.block_height, True)
    if spender:  # a node without txindex knows ours: a confirmed spend proves its input confirmed
        spent_by = backend.tx_status(spender)
        if spent_by.confirmations > 0:
            return _Seen(max(spent_by.confirmations, dep.confirmations), dep.height, True)
    return _Seen(0, None, status.known)


def _follow_unspent(
    s: Session,
    owners: _Owners,
    addresses: Mapping[str, AddressRow],
    outpoint: str,
    u: Utxo,
    depth: int,
    confirmations: int,
) -> dict[str, Any] | None:
    """Record or update one unspent deposit; credit it once deep enough. Its view when it changed.

    Raises OwnerMismatch (the caller's transaction rolls back) when the store and the audit
    log disagree on whose address it pays.
    """
    dep = s.exec(select(DepositRow).where(DepositRow.outpoint == outpoint).with_for_update()).first()
    stamp = now()
    change = None
    if dep is None:
        a = addresses[u.script_pubkey.hex()]
        owners.check(s, a.idx, a.account, a.address, u.script_pubkey.hex())
        dep = DepositRow(
            outpoint=outpoint,
            txid=u.txid,
            vout=u.vout,
            amount=u.amount,
            account=a.account,
            address=a.address,
            address_index=a.idx,
            status=PENDING,
            first_seen_at=stamp,
            updated_at=stamp,
        )
        s.add(dep)
        s.flush()
        audit_log.append(
            s,
            "deposit.seen",
            "sync",
            {"outpoint": outpoint, "account": a.account, "amount": u.amount, "height": u.height},
        )
        change = "seen"
    dep.height, dep.confirmations, dep.spent, dep.updated_at = u.height, depth, False, stamp
    old = dep.status
    # An unspent output is in a block (the backend's unspent() lists confirmed outputs only).
    new = next_state(old, Observation.DEEP if depth >= confirmations else Observation.SHALLOW)
    if new == CREDITED and old != CREDITED:
        _credit(s, dep, "sync", owners, again=old in (REVERSED, DROPPED))
        change = "credited"
    elif new != old:
        dep.status = new
        change = "seen again"
    if dep.status == CREDITED and depth >= FINAL_DEPTH:
        dep.final = True
    s.add(dep)
    return view(dep, change) if change is not None else None


@dataclass
class _Run:
    """What one sync changed, and what it must raise the halt for once it is done."""

    changed: list[dict[str, Any]] = field(default_factory=list)
    negative: list[tuple[str, str, int]] = field(default_factory=list)
    mismatches: list[OwnerMismatch] = field(default_factory=list)

    def step(self, db: Database, settings: Settings, follow: Callable[[Session], dict[str, Any] | None]) -> None:
        """One deposit in its own database transaction; an owner mismatch rolls it back."""
        try:
            with ledger.halting(db, settings), db.transaction() as s:
                item = follow(s)
        except OwnerMismatch as exc:  # rolled back: not recorded, not credited
            self.mismatches.append(exc)
            return
        if item is not None:
            self.changed.append(item)


def sync_deposits(
    db: Database,
    settings: Settings,
    backend: ChainBackend,
    confirmations: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Record new deposits, credit those ``confirmations`` deep, reverse those a reorg removed.

    ``progress`` follows the blocks read (custody.books.blockscan.observe's).

    Each deposit moves by custody.books.deposit_states' table. Runs while trading is halted
    too (it records what the chain says). Returns the deposits that changed. Raises NodeError,
    StorageError; HaltedError after raising the halt when the ledger does not balance;
    IllegalTransition for a deposit in a state the table does not know. A reversal that leaves
    a customer's balance negative raises the halt and is reported (``"halt_id"``), not raised.
    """
    db.check_schema()
    owners = _Owners()
    try:
        with db.transaction() as s:
            watched = [
                d.outpoint
                for d in s.exec(
                    select(DepositRow).where(col(DepositRow.status).in_(WATCHED), col(DepositRow.final).is_(False))
                ).all()
            ]
        tip = backend.tip_height()
        check_not_behind(db, tip)
        observed = blockscan.observe(db, backend, tip, progress)  # each new block read once (custody.books.blockscan)
        if observed.forged:
            _halt_for_forged(db, settings, observed.forged)
        utxos = observed.utxos
        addresses = blockscan.receive_addresses(db, (u.script_pubkey.hex() for u in utxos.values()))
        run = _Run()
        with db.transaction() as s:
            known = _by_outpoint(s, sorted(set(utxos) | set(watched)))
        for outpoint, u in sorted(utxos.items(), key=lambda kv: ((kv[1].height or 0), kv[0])):
            depth = tip - u.height + 1 if u.height is not None else 0
            prior = known.get(outpoint)
            if prior is None or _needs_update(prior, u, depth, confirmations):
                run.step(
                    db,
                    settings,
                    partial(
                        _follow_unspent,
                        owners=owners,
                        addresses=addresses,
                        outpoint=outpoint,
                        u=u,
                        depth=depth,
                        confirmations=confirmations,
                    ),
                )
        for outpoint in watched:
            if outpoint not in utxos:
                _sync_left(db, settings, backend, run, owners, outpoint, confirmations)
        _raise_halts(db, settings, run)
        return run.changed
    finally:
        owners.close()  # the issuances' temporary file (custody.issuance.record.LogAccounts)


def _sync_left(
    db: Database, settings: Settings, backend: ChainBackend, run: _Run, owners: _Owners, outpoint: str, required: int
) -> None:
    """Ask the chain about a watched deposit that left the unspent set, and follow its answer."""
    with db.transaction() as s:
        snapshot = s.exec(select(DepositRow).where(DepositRow.outpoint == outpoint)).first()
        spender = _spending_withdrawal_txid(s, snapshot) if snapshot is not None else None
    if snapshot is None or snapshot.status not in WATCHED:
        return
    seen = _where(backend, snapshot, spender)

    def follow(s: Session) -> dict[str, Any] | None:
        dep = s.exec(select(DepositRow).where(DepositRow.outpoint == outpoint).with_for_update()).first()
        if dep is None or dep.status not in WATCHED:
            return None
        change = _follow_left(s, dep, seen, required, owners, run.negative)
        dep.updated_at = now()
        s.add(dep)
        return view(dep, change) if change is not None else None

    run.step(db, settings, follow)


def _follow_left(
    s: Session, dep: DepositRow, seen: _Seen, required: int, owners: _Owners, negative: list[tuple[str, str, int]]
) -> str | None:
    """Apply what the chain says of a deposit that left the unspent set; the change, if any."""
    old = dep.status
    new = next_state(old, observe(seen.confirmations, seen.known, required))
    if seen.confirmations > 0 and (not dep.spent or dep.confirmations != seen.confirmations):
        # spent while its transaction stays confirmed: recorded, no ledger change
        dep.spent, dep.confirmations = True, seen.confirmations
        dep.height = seen.height if seen.height is not None else dep.height
    change = None
    if new == CREDITED and old != CREDITED:
        _credit(s, dep, "sync", owners, again=old in (REVERSED, DROPPED))
        change = "credited"
    elif old == CREDITED and new != CREDITED:
        _reverse(s, dep, owners, negative)
        return "reversed"
    elif seen.confirmations == 0 and (new != old or dep.confirmations or dep.height is not None):
        # pending and no longer in a block: back in the mempool, or gone
        dep.status, dep.confirmations, dep.height = new, 0, None
        return "unconfirmed" if new == PENDING else "dropped"
    if dep.status == CREDITED and seen.confirmations >= FINAL_DEPTH:
        dep.final = True
    return change


def _raise_halts(db: Database, settings: Settings, run: _Run) -> None:
    """The halts a sync owes: a balance a reversal took below zero; deposits not credited
    because their address's owner is in doubt (then VerificationFailed)."""
    for account, outpoint, balance in run.negative:
        raised = halt.raise_halt(
            db,
            settings,
            reason=(
                f"account {account!r} is negative ({balance} sat) after deposit {outpoint} was reversed "
                "by a chain reorganisation"
            ),
            source="ledger",
            actor="sync",
        )
        for item in run.changed:
            if item["outpoint"] == outpoint:
                item["halt_id"] = raised.id
    if run.mismatches:
        first = run.mismatches[0]
        more = f" (and {len(run.mismatches) - 1} more)" if len(run.mismatches) > 1 else ""
        halt.raise_halt(
            db,
            settings,
            reason=f"deposit not credited: {first}{more}",
            source="verification",
            actor="sync",
        )
        raise VerificationFailed(f"{len(run.mismatches)} deposit(s) not credited: {first}{more}; trading is halted")


def _halt_for_forged(db: Database, settings: Settings, forged: Mapping[str, str]) -> None:
    """Scanned rows the chain does not have: someone wrote them. Halt, credit nothing (raises)."""
    (first, why), more = next(iter(forged.items())), len(forged) - 1
    reason = f"scanned output {first} is not on the chain ({why})" + (f" (and {more} more)" if more else "")
    halt.raise_halt(db, settings, reason=f"deposit not credited: {reason}", source="verification", actor="sync")
    raise VerificationFailed(f"{len(forged)} deposit(s) not credited: {reason}; trading is halted")


def _needs_update(dep: DepositRow, u: Utxo, depth: int, confirmations: int) -> bool:
    """Whether an unspent deposit's row must change (kept cheap: most rows need nothing)."""
    if dep.status != CREDITED:
        return True  # pending: its depth grows until it is credited; reversed, dropped: seen again
    if dep.final:
        return False
    return dep.height != u.height or dep.spent or depth >= FINAL_DEPTH


def deposit(db: Database, outpoint: str) -> dict[str, Any]:
    """One deposit by outpoint. Raises NotFound."""
    db.check_schema()
    with db.transaction() as s:
        dep = s.exec(select(DepositRow).where(DepositRow.outpoint == outpoint)).first()
        if dep is None:
            raise NotFound(f"no deposit {outpoint}")
        return view(dep, tip=known_tip(s))
