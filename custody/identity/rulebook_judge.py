"""Judging one transaction by the rulebook in force: the approvals it needs and the rules it
breaks (amount, destinations, fees, velocity). The store and the offline signer call
:func:`judge` with their own history and their own idea of the height.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from custody.identity.rulebook import DEFAULT_RULES, LOCKTIME_THRESHOLD, MIN_APPROVALS, Fees, Rulebook, Rules, rate_text

# ---------------------------------------------------------------- judging a transaction


@dataclass(frozen=True)
class Payout:
    """One customer withdrawal: a transaction of its own, or a member of a batch."""

    withdrawal_id: int
    account: str
    payments: tuple[tuple[str, int], ...]  # (scriptPubKey hex, amount): every output but change
    fee: int

    @property
    def amount(self) -> int:
        return sum(a for _, a in self.payments)

    @property
    def label(self) -> str:
        return f"withdrawal #{self.withdrawal_id}" if self.withdrawal_id else "this withdrawal"


@dataclass(frozen=True)
class Counted:
    """An earlier withdrawal, as velocity counts it."""

    height: int
    account: str
    amount: int


@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"rule {self.rule}: {self.detail}"


@dataclass(frozen=True)
class Need:
    """Which tier a withdrawal falls under and how many approvals it needs."""

    tier: str
    approvals: int
    why: str


@dataclass(frozen=True)
class Verdict:
    serial: int  # the rulebook applied (0: the built-in defaults)
    height: int
    needs: Mapping[int, Need]  # withdrawal id -> need
    violations: tuple[Violation, ...]

    def required(self, withdrawal_id: int) -> int:
        need = self.needs.get(withdrawal_id)
        return need.approvals if need else MIN_APPROVALS

    def explain(self) -> str:
        return "; ".join(str(v) for v in self.violations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rulebook": self.serial,
            "height": self.height,
            "needs": {str(k): {"tier": n.tier, "approvals": n.approvals, "why": n.why} for k, n in self.needs.items()},
            "violations": [{"rule": v.rule, "detail": v.detail} for v in self.violations],
        }


@dataclass(frozen=True)
class Spend:
    """A transaction as the rules see it."""

    height: int
    payouts: tuple[Payout, ...]
    fee: int
    vsize: int
    batch: bool = False


def _destination_need(
    rules: Rules, effective: Mapping[int, int], height: int, p: Payout, spk: str
) -> tuple[int | None, Violation | None]:
    """(approvals a destination outside the allowlist needs, or a refusal) for one payment."""
    listed = [d for d in rules.allowlist if d.script_pubkey == spk and d.account in (None, p.account)]
    usable = [
        d for d in listed if effective.get(d.added_serial, LOCKTIME_THRESHOLD) + rules.cooling_off_blocks <= height
    ]
    if usable or rules.outside == "allow":
        return None, None
    if rules.outside == "refuse":
        if listed:
            start = min(effective.get(d.added_serial, LOCKTIME_THRESHOLD) for d in listed) + rules.cooling_off_blocks
            return None, Violation(
                "destinations.cooling_off",
                f"{p.label}: destination {spk} is allowlisted but usable only from height {start} (now {height})",
            )
        return None, Violation("destinations.outside", f"{p.label}: destination {spk} is not on the allowlist")
    return rules.outside_approvals(), None


def _payout_rules(rules: Rules, effective: Mapping[int, int], spend: Spend, p: Payout) -> tuple[Need, list[Violation]]:
    bad = []
    amount = p.amount
    if rules.max_withdrawal_sat is not None and amount > rules.max_withdrawal_sat:
        bad.append(
            Violation(
                "max_withdrawal",
                f"{p.label} pays {amount} sat, above the maximum of {rules.max_withdrawal_sat} sat",
            )
        )
    if not p.payments:
        need = Need("self_transfer", rules.self_transfer_approvals, "pays only custody")
    else:
        tier = rules.tier_for(amount)
        need = Need(tier.name, tier.approvals, f"{amount} sat")
    for spk, _ in p.payments:
        outside, refused = _destination_need(rules, effective, spend.height, p, spk)
        if refused:
            bad.append(refused)
        elif outside is not None and outside > need.approvals:
            need = Need(rules.outside[5:], outside, f"destination {spk[:16]}... is outside the allowlist")
    fee = p.fee if not spend.batch else None
    if fee is not None and fee > rules.fees.max_fee_sat:
        bad.append(
            Violation("fees.max_fee_sat", f"a fee of {fee} sat is above the cap of {rules.fees.max_fee_sat} sat")
        )
    return need, bad


def _fee_rules(fees: Fees, spend: Spend) -> list[Violation]:
    bad = []
    if spend.batch and spend.fee > fees.max_batch_fee_sat:
        bad.append(
            Violation(
                "fees.max_batch_fee_sat",
                f"the batch's fee of {spend.fee} sat is above the cap of {fees.max_batch_fee_sat} sat",
            )
        )
    if spend.vsize > 0 and Decimal(spend.fee) > fees.max_fee_rate * spend.vsize:
        rate = Decimal(spend.fee) / spend.vsize
        bad.append(
            Violation(
                "fees.max_fee_rate",
                f"a fee rate of {rate:.2f} sat/vB is above the cap of {rate_text(fees.max_fee_rate)} sat/vB",
            )
        )
    amount = sum(p.amount for p in spend.payouts)
    if amount > 0 and spend.fee * 10_000 > fees.max_fee_share_bp * amount:
        bad.append(
            Violation(
                "fees.max_fee_share_bp",
                f"a fee of {spend.fee} sat is {spend.fee * 100 / amount:.2f}% of the {amount} sat paid, above "
                f"{fees.max_fee_share_bp / 100:.2f}%",
            )
        )
    return bad


def _velocity_rules(rules: Rules, spend: Spend, history: Iterable[Counted]) -> list[Violation]:
    bad = []
    past = list(history)
    for v in rules.velocity:
        start = spend.height - v.window_blocks  # the window is (start, height]
        window = [c for c in past if start < c.height <= spend.height]
        if v.scope == "global":
            groups = {"": (sum(c.amount for c in window), sum(p.amount for p in spend.payouts))}
        else:
            groups = {
                acct: (
                    sum(c.amount for c in window if c.account == acct),
                    sum(p.amount for p in spend.payouts if p.account == acct),
                )
                for acct in sorted({p.account for p in spend.payouts})
            }
        for acct, (before, now) in groups.items():
            if now and before + now > v.max_sat:
                whose = f"account {acct}'s" if acct else "all"
                bad.append(
                    Violation(
                        f"velocity:{v.name}",
                        f"{whose} withdrawals in the {v.window_blocks} blocks to height {spend.height} would be "
                        f"{before + now} sat ({before} sat before this), above {v.max_sat} sat",
                    )
                )
    return bad


def judge(book: Rulebook | None, effective: Mapping[int, int], spend: Spend, history: Iterable[Counted]) -> Verdict:
    """Apply ``book`` (None: the built-in defaults) to ``spend``.

    ``effective``: every rulebook's effective height by serial (an allowlisted destination's
    cooling-off counts from the one that added it); ``history``: earlier withdrawals for velocity
    (never ``spend``'s own).
    """
    rules = book.rules if book else DEFAULT_RULES
    needs: dict[int, Need] = {}
    bad: list[Violation] = []
    for p in spend.payouts:
        need, found = _payout_rules(rules, effective, spend, p)
        if p.withdrawal_id not in needs or need.approvals > needs[p.withdrawal_id].approvals:
            needs[p.withdrawal_id] = need  # one id twice (a forged batch) needs the most of either
        bad += found
    bad += _fee_rules(rules.fees, spend)
    bad += _velocity_rules(rules, spend, history)
    return Verdict(book.serial if book else 0, spend.height, needs, tuple(bad))
