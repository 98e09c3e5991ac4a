"""The rulebook as a document and as a judge, each rule at its boundary, with real founders'
signatures. The store and the offline signer both call :func:`judge`; tests/test_rulebook_enforced.py
shows each rule refused by each of them through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custody.bitcoin.message import sign_message
from custody.errors import ApprovalError, InputError
from custody.identity.founders_documents import Founders
from custody.identity.rulebook import (
    DEFAULT_RULES,
    Destination,
    Fees,
    Rulebook,
    Rules,
    Tier,
    Velocity,
    load_rulebook,
    parse_rulebook,
    sign_rulebook,
)
from custody.identity.rulebook_chain import (
    chain_rollback,
    check_chain,
    earliest_effective,
    loosened,
    rulebook_at,
    successor_problems,
)
from custody.identity.rulebook_judge import Counted, Payout, Spend, judge
from tests.support import account_key, founders

BTC = 100_000_000
MANIFEST = "ab" * 32
SPK_A = "0014" + "11" * 20
SPK_B = "0014" + "22" * 20
FS = founders()
FOUNDERS = Founders("regtest", MANIFEST, 2, {f.name: account_key(f).public_key.format() for f in FS})

RULES = replace(
    DEFAULT_RULES,
    tiers=(Tier("standard", BTC, 2), Tier("large", 10 * BTC, 3), Tier("huge", None, 4)),
    max_withdrawal_sat=20 * BTC,
    velocity=(Velocity("day", "global", 144, 30 * BTC), Velocity("acct-day", "account", 144, 12 * BTC)),
    allowlist=(Destination(SPK_A, None, "cold", 1),),
    outside="tier:large",
    cooling_off_blocks=6,
    fees=Fees(100_000, Decimal(50), 100, 150_000),
    loosening_delay_blocks=144,
)


def book(
    rules: Rules, serial: int = 1, previous: Rulebook | None = None, effective: int = 0, proposed: int = 0
) -> Rulebook:
    b = Rulebook("regtest", MANIFEST, serial, previous.digest if previous else None, proposed, effective, rules)
    for f in FS[:2]:
        b = sign_rulebook(b, f.name, account_key(f), FOUNDERS)
    return b


def spend(*payouts: Payout, height: int = 1000, fee: int = 1_000, vsize: int = 200, batch: bool = False) -> Spend:
    return Spend(height, payouts, fee, vsize, batch)


def pay(amount: int, spk: str = SPK_A, account: str = "alice", wid: int = 7, fee: int = 1_000) -> Payout:
    return Payout(wid, account, ((spk, amount),), fee)


def rules_of(v: Any) -> list[str]:
    return [x.rule for x in v.violations]


B1 = book(RULES)
EFFECTIVE = {1: 0}


# ---------------------------------------------------------------- the document


def test_a_rulebook_round_trips_and_is_refused_when_not_canonical() -> None:
    doc = B1.to_document()
    again = parse_rulebook(json.loads(json.dumps(doc)))
    assert again.to_document() == doc and again.digest == B1.digest
    assert B1.message == f"custody rulebook regtest #1 sha256:{B1.digest}"
    shuffled = json.loads(json.dumps(doc))
    tiers = shuffled["rulebook"]["tiers"]
    tiers[0], tiers[1] = tiers[1], tiers[0]
    with pytest.raises(InputError, match="ascending"):
        parse_rulebook(shuffled)
    unsorted = json.loads(json.dumps(doc))
    unsorted["rulebook"]["velocity"].reverse()
    with pytest.raises(InputError, match="canonical"):
        parse_rulebook(unsorted)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("tiers", 0, "approvals"), 1, "from 2"),
        (("tiers", 2, "up_to_sat"), 5, "only the last tier"),
        (("destinations", "outside"), "tier:nope", "does not have"),
        (("destinations", "outside"), "maybe", "refuse, allow or tier"),
        (("destinations", "allowlist", 0, "added_serial"), 2, "from 1 to 1"),
        (("destinations", "allowlist", 0, "label"), "a\nb", "printable"),
        (("fees", "max_fee_rate"), 50, "in a string"),
        (("fees", "max_fee_share_bp"), 10_001, "0 to 10000"),
        (("velocity", 0, "scope"), "planet", "global or account"),
        (("effective_height",), 500_000_000, "0 to 499999999"),
        (("max_withdrawal_sat",), 0, "from 1"),
    ],
)
def test_malformed_rulebooks_are_refused_with_a_reason(path: tuple[Any, ...], value: Any, message: str) -> None:
    doc = json.loads(json.dumps(B1.to_document()))
    target = doc["rulebook"]
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(InputError, match=message):
        parse_rulebook(doc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_byte_edits_of_a_rulebook_are_refused_or_read_as_valid(data: st.DataObject) -> None:
    """Any edit of a signed rulebook file is either refused with InputError or reads as a
    rulebook whose founders' signatures no longer hold (unless the edit changed nothing)."""
    raw = bytearray(json.dumps(B1.to_document()).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        parsed = load_rulebook(bytes(raw))
    except InputError:
        return
    if parsed.digest != B1.digest:
        with pytest.raises(ApprovalError):
            check_chain([parsed], FOUNDERS)


# ---------------------------------------------------------------- the chain and its asymmetry


def test_the_chain_needs_m_founders_and_follows_serials() -> None:
    check_chain([B1], FOUNDERS)
    one = B1.unsigned().with_signature(FS[0].name, B1.signatures[FS[0].name])
    with pytest.raises(ApprovalError, match="1 valid founder signature"):
        check_chain([one], FOUNDERS)
    outsider = founders(tag="outsider")[0]  # named founder-a, like the real one
    forged = one.with_signature(FS[0].name, sign_message(account_key(outsider), B1.message))
    forged = forged.with_signature(FS[1].name, B1.signatures[FS[1].name])
    with pytest.raises(ApprovalError, match="founder-a's signature does not verify"):
        check_chain([forged], FOUNDERS)
    b2 = book(replace(RULES, max_withdrawal_sat=19 * BTC), 2, B1)
    check_chain([B1, b2], FOUNDERS)
    with pytest.raises(ApprovalError, match="it is #2, not #1"):
        check_chain([b2], FOUNDERS)
    skipped = book(RULES, 3, B1)
    with pytest.raises(ApprovalError, match="not #2"):
        check_chain([B1, skipped], FOUNDERS)


def test_what_loosens_is_named_and_tightening_is_not() -> None:
    assert loosened(RULES, RULES) == []
    tighter = replace(
        RULES,
        tiers=(Tier("standard", BTC // 2, 2), Tier("large", 10 * BTC, 3), Tier("huge", None, 5)),
        max_withdrawal_sat=10 * BTC,
        velocity=(Velocity("day", "global", 288, 20 * BTC), Velocity("acct-day", "global", 144, 12 * BTC)),
        allowlist=(),
        outside="refuse",
        cooling_off_blocks=12,
        fees=Fees(50_000, Decimal("20.5"), 50, 100_000),
        loosening_delay_blocks=288,
    )
    assert loosened(RULES, tighter) == []
    cases = {
        "fewer approvals for 100000001 sat": replace(RULES, tiers=(Tier("standard", 2 * BTC, 2), *RULES.tiers[1:])),
        "a higher max_withdrawal_sat": replace(RULES, max_withdrawal_sat=None),
        "velocity limit day raised or removed": replace(RULES, velocity=RULES.velocity[1:]),
        "velocity limit acct-day raised or removed": replace(
            RULES, velocity=(RULES.velocity[0], Velocity("acct-day", "account", 143, 12 * BTC))
        ),
        f"destination {SPK_B} added for bob": replace(
            RULES, allowlist=(*RULES.allowlist, Destination(SPK_B, "bob", "", 2))
        ),
        "destinations outside the allowlist: tier:large -> allow": replace(RULES, outside="allow"),
        "destinations outside the allowlist need fewer approvals": replace(RULES, outside="tier:standard"),
        "a shorter cooling_off_blocks": replace(RULES, cooling_off_blocks=5),
        "a higher fees.max_fee_rate": replace(RULES, fees=replace(RULES.fees, max_fee_rate=Decimal("50.001"))),
        "a higher fees.max_batch_fee_sat": replace(RULES, fees=replace(RULES.fees, max_batch_fee_sat=150_001)),
        "a shorter loosening_delay_blocks": replace(RULES, loosening_delay_blocks=143),
    }
    for expected, looser in cases.items():
        found = loosened(RULES, looser)
        assert any(x.startswith(expected) for x in found), (expected, found)


def test_a_loosening_rulebook_waits_for_the_delay_and_a_tightening_one_does_not() -> None:
    looser = replace(RULES, max_withdrawal_sat=21 * BTC)
    assert earliest_effective(B1, looser, 1000) == 1000 + 144
    early = book(looser, 2, B1, effective=1143, proposed=1000)
    assert any("before 1144" in p for p in successor_problems(B1, early))
    with pytest.raises(ApprovalError, match="it loosens: a higher max_withdrawal_sat"):
        check_chain([B1, early], FOUNDERS)
    check_chain([B1, book(looser, 2, B1, effective=1144, proposed=1000)], FOUNDERS)
    tighter = replace(RULES, max_withdrawal_sat=19 * BTC)
    assert earliest_effective(B1, tighter, 1000) == 0  # at once, even for what is pending
    later = book(RULES, 1, effective=500)
    with pytest.raises(ApprovalError, match="before 500"):  # never before the one it replaces
        check_chain([later, book(tighter, 2, later, effective=499)], FOUNDERS)


def test_an_allowlist_entry_cannot_claim_an_older_rulebook_added_it() -> None:
    """Claiming rulebook #1 added a destination would start its cooling-off long ago."""
    sneaky = replace(RULES, allowlist=(*RULES.allowlist, Destination(SPK_B, None, "", 1)))
    b2 = book(sneaky, 2, B1, effective=2000, proposed=1000)
    assert any("claims rulebook #1 added it" in p for p in successor_problems(B1, b2))


def test_the_rulebook_in_force_and_rollback() -> None:
    b2 = book(replace(RULES, max_withdrawal_sat=21 * BTC), 2, B1, effective=1144, proposed=1000)
    assert rulebook_at([B1, b2], 1143) == B1 and rulebook_at([B1, b2], 1144) == b2
    assert rulebook_at([book(RULES, effective=10)], 9) is None  # the built-in rules
    assert chain_rollback([B1, b2], 2, b2.digest) is None
    assert "older than rulebook #2" in (chain_rollback([B1], 2, b2.digest) or "")
    assert "never rolled back" in (chain_rollback([], 1, B1.digest) or "")
    fork = book(replace(RULES, max_withdrawal_sat=5 * BTC), 2, B1, effective=0)
    assert "two rulebooks with one serial" in (chain_rollback([B1, fork], 2, b2.digest) or "")


# ---------------------------------------------------------------- each rule at its boundary


def test_tiers_at_their_bounds() -> None:
    def need(amount: int) -> tuple[str, int]:
        n = judge(B1, EFFECTIVE, spend(pay(amount)), []).needs[7]
        return n.tier, n.approvals

    assert need(BTC) == ("standard", 2)
    assert need(BTC + 1) == ("large", 3)
    assert need(10 * BTC) == ("large", 3)
    assert need(10 * BTC + 1) == ("huge", 4)
    assert judge(None, {}, spend(pay(10**15)), []).needs[7].approvals == 2  # the built-in rules


def test_the_withdrawal_maximum_at_its_bound() -> None:
    b = book(replace(RULES, velocity=()))
    assert rules_of(judge(b, EFFECTIVE, spend(pay(20 * BTC), fee=1), [])) == []
    assert rules_of(judge(b, EFFECTIVE, spend(pay(20 * BTC + 1), fee=1), [])) == ["max_withdrawal"]


def test_velocity_over_a_rolling_window_of_blocks() -> None:
    history = [Counted(1000 - 143, "bob", 10 * BTC), Counted(1000, "bob", 10 * BTC), Counted(1000 - 144, "bob", BTC)]
    # In the window (856, 1000]: 20 BTC; the one at 856 has left it.
    assert rules_of(judge(B1, EFFECTIVE, spend(pay(10 * BTC, fee=1), fee=1), history)) == []
    assert rules_of(judge(B1, EFFECTIVE, spend(pay(10 * BTC + 1, fee=1), fee=1), history)) == ["velocity:day"]
    # One block later the oldest counted one leaves too.
    later = spend(pay(10 * BTC + 1, fee=1), fee=1, height=1000 + 1)
    assert rules_of(judge(B1, EFFECTIVE, later, history)) == []
    # Per account: alice's own 12 BTC, whatever bob did.
    mine = [Counted(1000, "alice", 11 * BTC)]
    assert rules_of(judge(B1, EFFECTIVE, spend(pay(BTC, fee=1), fee=1), mine)) == []
    assert rules_of(judge(B1, EFFECTIVE, spend(pay(BTC + 1, fee=1), fee=1), mine)) == ["velocity:acct-day"]


def test_destinations_outside_the_list_and_cooling_off() -> None:
    refuse = book(replace(RULES, outside="refuse"))
    effective = {1: 1000}
    assert rules_of(judge(refuse, effective, spend(pay(BTC, SPK_A), height=1005), [])) == ["destinations.cooling_off"]
    assert rules_of(judge(refuse, effective, spend(pay(BTC, SPK_A), height=1006), [])) == []
    assert rules_of(judge(refuse, effective, spend(pay(BTC, SPK_B), height=1006), [])) == ["destinations.outside"]
    # tier:large: an unlisted destination needs the large tier's three approvals, a small amount too.
    n = judge(B1, {1: 0}, spend(pay(1000, SPK_B)), []).needs[7]
    assert (n.tier, n.approvals) == ("large", 3)
    assert judge(B1, {1: 0}, spend(pay(1000, SPK_A)), []).needs[7].approvals == 2
    # An entry for another account is outside for this one.
    theirs = book(replace(RULES, outside="refuse", allowlist=(Destination(SPK_A, "bob", "", 1),)))
    assert rules_of(judge(theirs, {1: 0}, spend(pay(BTC, SPK_A, "alice")), [])) == ["destinations.outside"]


def test_each_fee_cap_at_its_bound() -> None:
    def caps(fee: int, vsize: int = 10_000, amount: int = 100 * BTC) -> list[str]:
        return rules_of(
            judge(
                book(replace(RULES, max_withdrawal_sat=None, velocity=())),
                EFFECTIVE,
                spend(pay(amount, fee=fee), fee=fee, vsize=vsize),
                [],
            )
        )

    assert caps(100_000) == []
    assert caps(100_001) == ["fees.max_fee_sat"]
    assert caps(5_000, vsize=100) == []  # 50 sat/vB exactly
    assert caps(5_001, vsize=100) == ["fees.max_fee_rate"]
    assert caps(10_000, amount=10_000 * 100) == []  # 1% exactly
    assert caps(10_001, amount=10_000 * 100) == ["fees.max_fee_share_bp"]


def test_a_batch_within_each_members_limits_but_not_in_total() -> None:
    members = (pay(6 * BTC, wid=1, fee=1_000), pay(7 * BTC, account="bob", wid=2, fee=1_000))
    ok = judge(B1, EFFECTIVE, spend(*members, fee=150_000, vsize=10_000, batch=True), [])
    assert rules_of(ok) == [] and ok.needs[1].approvals == 3
    fee = judge(B1, EFFECTIVE, spend(*members, fee=150_001, vsize=10_000, batch=True), [])
    assert rules_of(fee) == ["fees.max_batch_fee_sat"]
    # Each member alone fits the 30 BTC a day; the two together after 20 BTC earlier do not.
    history = [Counted(990, "carol", 20 * BTC)]
    assert rules_of(judge(B1, EFFECTIVE, spend(members[0], fee=1_000, vsize=10_000), history)) == []
    assert rules_of(judge(B1, EFFECTIVE, spend(members[1], fee=1_000, vsize=10_000), history)) == []
    together = judge(B1, EFFECTIVE, spend(*members, fee=2_000, vsize=10_000, batch=True), history)
    assert rules_of(together) == ["velocity:day"]


def test_one_withdrawal_id_twice_needs_the_most_approvals_of_either() -> None:
    """A forged batch listing a large payout and a small one under the same id: the small one's
    tier must not stand for the large one's."""
    v = judge(B1, EFFECTIVE, spend(pay(20 * BTC, wid=3), pay(1000, wid=3), fee=1, batch=True), [])
    assert v.needs[3].approvals == 4
    v = judge(B1, EFFECTIVE, spend(pay(1000, wid=3), pay(20 * BTC, wid=3), fee=1, batch=True), [])
    assert v.needs[3].approvals == 4
