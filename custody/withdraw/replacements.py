"""Replacements as the queue sees them: which rows replace (or settle) which withdrawal, what
a replacement's PSBT says about the transaction it replaces, and how a bump is judged.

The commands that make replacements and follow them on the chain are in
:mod:`custody.withdraw.replace`; this module is what :mod:`custody.withdraw.queue` needs of
them (it imports nothing of the queue).
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from custody.bitcoin.txbuild import tx_vsize
from custody.control import rulebook as rulebook_lib
from custody.errors import StorageError
from custody.identity.replacement_rules import judge_bump
from custody.identity.rulebook_judge import Verdict
from custody.policy.model import Policy
from custody.store.models import ReplacementRow, WithdrawalRow
from custody.withdraw.replace_check import BUMP, REPLACEMENT_KINDS
from custody.withdraw.states import CONSOLIDATE

SETTLED = ("confirmed", "failed")


def link(s: Session, withdrawal_id: int) -> ReplacementRow | None:
    """The replacement record of row ``withdrawal_id`` (None: not a replacement)."""
    return s.get(ReplacementRow, withdrawal_id)


def replacements_of(s: Session, original_id: int) -> list[WithdrawalRow]:
    """Every replacement made for withdrawal ``original_id``, oldest first."""
    ids = [r.withdrawal_id for r in s.exec(select(ReplacementRow).where(ReplacementRow.original_id == original_id))]
    if not ids:
        return []
    return list(s.exec(select(WithdrawalRow).where(col(WithdrawalRow.id).in_(ids)).order_by(col(WithdrawalRow.id))))


def dropped(row: WithdrawalRow | None) -> bool:
    """A replacement failed before it had a final transaction (dropped while requested or
    approved): nothing of it can be on the chain, so it changes nothing of how its original is
    followed."""
    return row is None or (row.status == "failed" and not row.txid)


def grouped(s: Session) -> set[int]:
    """Rows the queue's own sync leaves to :func:`custody.withdraw.replace_sync.sync_replacements`:
    every replacement, and every withdrawal that has one that was not dropped before it had a
    transaction (a withdrawal whose only cancel was dropped is the queue's again: its refund
    by proof of a double spend included). A consolidation is the queue's, as a sweep is: it is
    one transaction that nothing replaces (custody.withdraw.replace refuses to bump, cancel or
    pay for anything but a customer's withdrawal)."""
    out: set[int] = set()
    for r in s.exec(select(ReplacementRow)).all():
        out.add(r.withdrawal_id)
        if not dropped(s.get(WithdrawalRow, r.withdrawal_id)):
            out.add(r.original_id)
    kinds = sorted(REPLACEMENT_KINDS - {CONSOLIDATE})
    rows = s.exec(select(WithdrawalRow.id).where(col(WithdrawalRow.kind).in_(kinds)))
    return out | {i for i in rows.all() if i is not None}


def _replaced(s: Session, row: WithdrawalRow) -> WithdrawalRow:
    r = link(s, row.id or 0)
    replaced = s.get(WithdrawalRow, r.replaces_id) if r is not None else None
    if replaced is None:
        raise StorageError(f"withdrawal #{row.id} is a {row.kind} of no recorded withdrawal")
    return replaced


def psbt_meta(s: Session, row: WithdrawalRow) -> dict[str, Any]:
    """What a replacement's PSBT adds to its metadata: its kind and, for a bump, the unsigned
    transaction it replaces (the signer looks its txid up in its own journal)."""
    if row.kind not in REPLACEMENT_KINDS:
        return {}
    meta: dict[str, Any] = {"kind": row.kind}
    r = link(s, row.id or 0)
    if r is not None:
        replaced = _replaced(s, row)
        meta["replaces"] = {"withdrawal_id": replaced.id, "unsigned_tx": replaced.unsigned_tx}
    return meta


def bump_verdict(s: Session, policy: Policy, row: WithdrawalRow, tx: Any) -> Verdict:
    """A bump judged by the rulebook's ``bump`` rule in force at its height (its locktime)."""
    assert row.kind == BUMP
    books = rulebook_lib.store_chain(s)
    outputs = [bytes(o.scriptPubKey) for o in tx.vout]
    vsize = tx_vsize(policy.script_type, policy.threshold, policy.n, len(tx.vin), outputs)
    height = int(tx.nLockTime)
    return judge_bump(books.at(height), row.id or 0, height, row.fee, vsize, _replaced(s, row).fee)
