"""Amounts: exact decimal text to integer satoshis, and fee rates; never through float."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from custody.bitcoin.amounts import (
    MAX_MONEY,
    btc_decimal,
    format_btc,
    parse_btc_amount,
    parse_fee_rate,
    sats_from_btc,
)
from custody.errors import InputError


@pytest.mark.parametrize(
    ("text", "sats"),
    [
        ("0.00000001", 1),
        ("1", 100_000_000),
        ("1.5", 150_000_000),
        ("0.015", 1_500_000),
        ("0.01500000", 1_500_000),
        ("21000000", MAX_MONEY),
        ("20999999.99999999", MAX_MONEY - 1),
        ("007.1", 710_000_000),
    ],
)
def test_parses_exact_amounts(text: str, sats: int) -> None:
    assert parse_btc_amount(text) == sats


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("21000000.00000001", "21,000,000"),
        ("21000001", "21,000,000"),
        ("0.123456789", "more than 8 decimals"),
        ("1e-3", "exponent"),
        ("1E8", "exponent"),
        ("-1", "sign"),
        ("+1", "sign"),
        ("0", "zero"),
        ("0.00000000", "zero"),
        (" 1.5 ", "whitespace"),
        ("1.5\n", "whitespace"),
        ("1,5", "comma"),
        ("1,000", "comma"),
        ("NaN", "not a number"),
        ("Infinity", "not a number"),
        ("inf", "not a number"),
        ("\u0661", "ASCII"),  # ARABIC-INDIC DIGIT ONE
        ("\uff11", "ASCII"),  # FULLWIDTH DIGIT ONE
        (".5", "both sides"),
        ("1.", "both sides"),
        ("1.2.3", "one decimal point"),
        ("0x10", "only digits"),
        ("1 000", "only digits"),
        ("abc", "only digits"),
    ],
)
def test_refuses_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(InputError) as e:
        parse_btc_amount(text)
    assert why in str(e.value)


def test_format_btc() -> None:
    assert format_btc(1_500_000) == "0.01500000"
    assert format_btc(1) == "0.00000001"
    assert format_btc(MAX_MONEY) == "21000000.00000000"
    assert format_btc(0) == "0.00000000"
    assert format_btc(-1) == "-0.00000001"


@given(st.integers(min_value=1, max_value=MAX_MONEY))
def test_format_then_parse_round_trips(sats: int) -> None:
    assert parse_btc_amount(format_btc(sats)) == sats


@given(st.integers(min_value=-MAX_MONEY, max_value=MAX_MONEY))
def test_node_decimals_round_trip(sats: int) -> None:
    assert sats_from_btc(btc_decimal(sats)) == sats
    assert sats_from_btc(Decimal(format_btc(sats))) == sats


def test_node_amounts_are_converted_exactly() -> None:
    # Values that binary floating point cannot hold exactly.
    assert sats_from_btc(Decimal("0.1")) == 10_000_000
    assert sats_from_btc(Decimal("20999999.99999999")) == MAX_MONEY - 1
    assert sats_from_btc(Decimal("50.00000000")) == 5_000_000_000
    assert sats_from_btc(50) == 5_000_000_000
    for bad in (Decimal("0.000000001"), Decimal("NaN"), Decimal("Infinity"), 0.1, True, "1"):
        with pytest.raises(ValueError):
            sats_from_btc(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "rate"), [("1", Decimal(1)), ("12.5", Decimal("12.5")), ("0.001", Decimal("0.001"))])
def test_fee_rate(text: str, rate: Decimal) -> None:
    assert parse_fee_rate(text) == rate
    assert parse_fee_rate("100000") == 100_000


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0", "above 0"),
        ("0.000", "above 0"),
        ("0.0001", "3 decimals"),
        ("100000.001", "limit"),
        ("-1", "sign"),
        ("1e2", "exponent"),
        ("NaN", "not a number"),
        ("", "empty"),
        (" 5", "whitespace"),
    ],
)
def test_fee_rate_refused(text: str, why: str) -> None:
    with pytest.raises(InputError) as e:
        parse_fee_rate(text)
    assert why in str(e.value)
