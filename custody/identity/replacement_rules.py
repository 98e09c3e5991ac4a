"""The rulebook's ``bump`` rule applied to a fee-only replacement (RBF) of a signed withdrawal.

A bump pays exactly what the transaction it replaces paid (its destinations and amounts were
judged, approved and counted for velocity then); what changes is its fee, taken from change.
So it is judged on its fee alone: by the ``bump`` section of the rulebook in force at its
height (who approves, the most fee and fee rate), and by BIP-125's rules 3 and 4 (a higher
absolute fee, and enough more to pay for its own relay at the incremental relay fee). The store
and the offline signer call :func:`judge_bump` with their own idea of the fee replaced.
"""

from __future__ import annotations

from decimal import Decimal

from custody.identity.rulebook import DEFAULT_RULES, Rulebook, rate_text
from custody.identity.rulebook_judge import Need, Verdict, Violation

INCREMENTAL_RELAY_RATE = 1
"""sat/vB: Bitcoin Core's (and Litecoin Core's) default -incrementalrelayfee, per BIP-125 rule 4."""


def bump_fee_floor(old_fee: int, vsize: int) -> int:
    """The least fee a replacement of ``vsize`` vbytes may pay (BIP-125 rules 3 and 4)."""
    return old_fee + INCREMENTAL_RELAY_RATE * vsize


def judge_bump(book: Rulebook | None, withdrawal_id: int, height: int, fee: int, vsize: int, old_fee: int) -> Verdict:
    """The verdict on a replacement of ``vsize`` vbytes paying ``fee`` instead of ``old_fee``."""
    rule = (book.rules if book else DEFAULT_RULES).bump_rule()
    bad = []
    floor = bump_fee_floor(old_fee, vsize)
    if fee < floor:
        bad.append(
            Violation(
                "bump.bip125",
                f"a fee of {fee} sat does not replace one of {old_fee} sat: BIP-125 needs at least {floor} sat "
                f"(the old fee plus {INCREMENTAL_RELAY_RATE} sat/vB of its own {vsize} vB)",
            )
        )
    if fee > rule.max_fee_sat:
        bad.append(Violation("bump.max_fee_sat", f"a fee of {fee} sat is above the cap of {rule.max_fee_sat} sat"))
    if vsize > 0 and Decimal(fee) > rule.max_fee_rate * vsize:
        bad.append(
            Violation(
                "bump.max_fee_rate",
                f"a fee rate of {Decimal(fee) / vsize:.2f} sat/vB is above the cap of "
                f"{rate_text(rule.max_fee_rate)} sat/vB",
            )
        )
    need = Need("bump", rule.approvals, f"fee-only replacement: {old_fee} -> {fee} sat")
    return Verdict(book.serial if book else 0, height, {withdrawal_id: need}, tuple(bad))
