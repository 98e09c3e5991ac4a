"""A consolidation's coin selection: standard weight and the fee cap bound it."""

from __future__ import annotations

from decimal import Decimal

import pytest

from custody.bitcoin.script import ScriptType
from custody.bitcoin.txbuild import Coin, fee_for, tx_vsize
from custody.errors import InputError
from custody.withdraw.selftransfer import MAX_STANDARD_WEIGHT, choose_coins

SHAPE = (ScriptType.P2WSH, 2, 3)
OUT = bytes.fromhex("0020" + "33" * 32)


def coins(count: int, amount: int = 10_000) -> list[Coin]:
    return [Coin(f"{i:064x}", i % 3, amount + i, b"\x00\x20" + b"\x44" * 32, 0, i) for i in range(count)]


def test_two_thousand_coins_stop_below_the_standard_weight() -> None:
    chosen = choose_coins(coins(2000), SHAPE, OUT, Decimal(1), 10**8, 5000)
    vsize = tx_vsize(*SHAPE, len(chosen), [OUT])
    assert vsize * 4 < MAX_STANDARD_WEIGHT
    assert tx_vsize(*SHAPE, len(chosen) + 1, [OUT]) * 4 >= MAX_STANDARD_WEIGHT  # one more would not be standard
    assert [c.amount for c in chosen] == sorted(c.amount for c in chosen)  # the smallest first


def test_the_fee_cap_binds_before_the_weight() -> None:
    chosen = choose_coins(coins(500), SHAPE, OUT, Decimal(10), 20_000, 500)
    assert fee_for(tx_vsize(*SHAPE, len(chosen), [OUT]), Decimal(10)) <= 20_000
    assert fee_for(tx_vsize(*SHAPE, len(chosen) + 1, [OUT]), Decimal(10)) > 20_000


def test_coins_worth_less_than_their_spending_are_left_alone() -> None:
    with pytest.raises(InputError, match="nothing to consolidate"):
        choose_coins(coins(50, amount=100), SHAPE, OUT, Decimal(5), 10**8, 50)
