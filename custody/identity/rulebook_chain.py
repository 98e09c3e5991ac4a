"""The chain of founders-signed rulebooks: what loosens a rulebook, from which height its
successor may apply, whether a chain holds, which rulebook is in force at a height, and a
chain rolled back behind what a signer has seen.
"""

from __future__ import annotations

from collections.abc import Sequence

from custody.bitcoin.amounts import MAX_MONEY
from custody.errors import ApprovalError
from custody.identity.founders_documents import Founders, rollback_problem
from custody.identity.governance import Governance, single
from custody.identity.rulebook import DEFAULT_RULES, Rulebook, Rules

# ---------------------------------------------------------------- loosening and the chain


def _required_at(rules: Rules, amount: int) -> int:
    return rules.tier_for(amount).approvals


def loosened(old: Rules, new: Rules) -> list[str]:
    """What ``new`` allows that ``old`` did not (empty: it only tightens or keeps)."""
    out = []
    points = {0, MAX_MONEY} | {
        b + d for t in (*old.tiers, *new.tiers) if (b := t.up_to_sat) is not None for d in (0, 1)
    }
    lower = sorted(a for a in points if _required_at(new, a) < _required_at(old, a))
    if lower:
        out.append(f"fewer approvals for {lower[0]} sat")
    if old.max_withdrawal_sat is not None and (new.max_withdrawal_sat or MAX_MONEY + 1) > old.max_withdrawal_sat:
        out.append("a higher max_withdrawal_sat")
    for v in old.velocity:
        if not any(n.at_least_as_tight_as(v) for n in new.velocity):
            out.append(f"velocity limit {v.name} raised or removed")
    known = {d.key for d in old.allowlist}
    out += [
        f"destination {d.script_pubkey} added for {d.account or 'any account'}"
        for d in new.allowlist
        if d.key not in known
    ]
    out += _outside_loosened(old, new)
    if new.cooling_off_blocks < old.cooling_off_blocks:
        out.append("a shorter cooling_off_blocks")
    for f in ("max_fee_sat", "max_fee_rate", "max_fee_share_bp", "max_batch_fee_sat"):
        if getattr(new.fees, f) > getattr(old.fees, f):
            out.append(f"a higher fees.{f}")
    if new.self_transfer_approvals < old.self_transfer_approvals:
        out.append("fewer self_transfer approvals")
    if new.loosening_delay_blocks < old.loosening_delay_blocks:
        out.append("a shorter loosening_delay_blocks")
    old_bump, new_bump = old.bump_rule(), new.bump_rule()
    if new_bump.approvals < old_bump.approvals:
        out.append("fewer bump approvals")
    out += [
        f"a higher bump.{f}" for f in ("max_fee_sat", "max_fee_rate") if getattr(new_bump, f) > getattr(old_bump, f)
    ]
    return out


def _outside_loosened(old: Rules, new: Rules) -> list[str]:
    rank = {"refuse": 0, "allow": 2}
    a, b = rank.get(old.outside, 1), rank.get(new.outside, 1)
    if b > a:
        return [f"destinations outside the allowlist: {old.outside} -> {new.outside}"]
    if a == b == 1 and (new.outside_approvals() or 0) < (old.outside_approvals() or 0):
        return [f"destinations outside the allowlist need fewer approvals ({old.outside} -> {new.outside})"]
    return []


def earliest_effective(previous: Rulebook | None, rules: Rules, proposed_height: int) -> int:
    """The lowest effective height the next rulebook may have: the previous one's, and when it
    loosens anything, ``proposed_height`` plus the previous rulebook's loosening delay."""
    prev_rules = previous.rules if previous else DEFAULT_RULES
    floor = previous.effective_height if previous else 0
    if loosened(prev_rules, rules):
        floor = max(floor, proposed_height + prev_rules.loosening_delay_blocks)
    return floor


def successor_problems(previous: Rulebook | None, book: Rulebook) -> list[str]:
    """Why ``book`` cannot follow ``previous`` (None: it is the first), beyond signatures."""
    out = []
    if book.serial != (previous.serial + 1 if previous else 1):
        out.append(f"it is #{book.serial}, not #{previous.serial + 1 if previous else 1}")
    if book.previous != (previous.digest if previous else None):
        out.append(f"it does not follow rulebook #{previous.serial if previous else 0}")
    floor = earliest_effective(previous, book.rules, book.proposed_height)
    if book.effective_height < floor:
        what = loosened(previous.rules if previous else DEFAULT_RULES, book.rules)
        out.append(
            f"it takes effect at height {book.effective_height}, before {floor}"
            + (f" (it loosens: {'; '.join(what)})" if what else " (the previous rulebook's)")
        )
    kept = {(d.key, d.added_serial) for d in previous.rules.allowlist} if previous else set()
    for d in book.rules.allowlist:
        if d.added_serial != book.serial and (d.key, d.added_serial) not in kept:
            out.append(f"destination {d.script_pubkey} claims rulebook #{d.added_serial} added it, which it did not")
    return out


def check_chain(chain: Sequence[Rulebook], founders: Founders | Governance) -> None:
    """Every rulebook of ``chain`` (#1 to #N in order) signed by m founders (after a key rotation:
    of its epoch, custody.identity.governance), each following the one before by the rules above.
    Raises ApprovalError naming every problem."""
    governance = single(founders) if isinstance(founders, Founders) else founders
    previous: Rulebook | None = None
    for book in chain:
        problems = governance.problems(book) + successor_problems(previous, book)
        if problems:
            raise ApprovalError(f"rulebook #{book.serial} is not valid: " + "; ".join(problems))
        previous = book


def rulebook_at(chain: Sequence[Rulebook], height: int) -> Rulebook | None:
    """The rulebook in force at ``height``: the newest whose effective height it has reached."""
    return next((b for b in reversed(chain) if b.effective_height <= height), None)


def chain_rollback(chain: Sequence[Rulebook], seen_serial: int, seen_digest: str | None) -> str | None:
    """Why ``chain`` rolls back what a signer has seen (None: it does not)."""
    if seen_digest is not None and not chain:
        return f"no founders-signed rulebook, and this signer has seen rulebook #{seen_serial}: it is never rolled back"
    newest = chain[-1].serial if chain else 0
    return rollback_problem("rulebook", newest, {b.serial: b.digest for b in chain}, seen_serial, seen_digest)
