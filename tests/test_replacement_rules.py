"""The rulebook's bump section and its verdict on a fee-only replacement."""

from __future__ import annotations

from decimal import Decimal

import pytest

from custody.errors import InputError
from custody.identity.replacement_rules import bump_fee_floor, judge_bump
from custody.identity.rulebook import DEFAULT_RULES, BumpRule, parse_rules
from custody.identity.rulebook_chain import loosened


def test_a_rulebook_without_a_bump_section_keeps_its_bytes_and_uses_the_fee_caps() -> None:
    rules = parse_rules(DEFAULT_RULES.to_dict(), 1)
    assert "bump" not in rules.to_dict()  # a rulebook signed before the section re-serializes unchanged
    assert rules.bump_rule() == BumpRule(2, DEFAULT_RULES.fees.max_fee_sat, DEFAULT_RULES.fees.max_fee_rate)


def test_the_bump_section_is_read_and_checked() -> None:
    rules = parse_rules(
        DEFAULT_RULES.to_dict() | {"bump": {"approvals": 3, "max_fee_sat": 9000, "max_fee_rate": "5"}}, 1
    )
    assert rules.bump_rule() == BumpRule(3, 9000, Decimal(5))
    assert rules.to_dict()["bump"] == {"approvals": 3, "max_fee_sat": 9000, "max_fee_rate": "5"}
    for bad in (
        {"approvals": 1, "max_fee_sat": 9000, "max_fee_rate": "5"},  # one approver is nobody's second pair of eyes
        {"approvals": 2, "max_fee_sat": -1, "max_fee_rate": "5"},
        {"approvals": 2, "max_fee_sat": 9000, "max_fee_rate": 5},
        {"approvals": 2, "max_fee_sat": 9000},
    ):
        with pytest.raises(InputError):
            parse_rules(DEFAULT_RULES.to_dict() | {"bump": bad}, 1)


def test_loosening_a_bump_is_named() -> None:
    tight = parse_rules(
        DEFAULT_RULES.to_dict() | {"bump": {"approvals": 3, "max_fee_sat": 9000, "max_fee_rate": "5"}}, 1
    )
    looser = parse_rules(
        DEFAULT_RULES.to_dict() | {"bump": {"approvals": 2, "max_fee_sat": 9001, "max_fee_rate": "6"}}, 1
    )
    assert loosened(tight, looser) == [
        "fewer bump approvals",
        "a higher bump.max_fee_sat",
        "a higher bump.max_fee_rate",
    ]
    assert loosened(looser, tight) == []


def test_judging_a_bump() -> None:
    book = None  # the built-in rules: two approvals, the default fee caps
    ok = judge_bump(book, 7, 100, fee=2000, vsize=200, old_fee=200)
    assert ok.violations == () and ok.needs[7].tier == "bump" and ok.needs[7].approvals == 2
    assert bump_fee_floor(200, 200) == 400
    short = judge_bump(book, 7, 100, fee=399, vsize=200, old_fee=200)
    assert [v.rule for v in short.violations] == ["bump.bip125"]
    dear = judge_bump(book, 7, 100, fee=200 * 501, vsize=200, old_fee=200)
    assert [v.rule for v in dear.violations] == ["bump.max_fee_rate"]
