"""Amounts as integer satoshis, parsed from exact decimal text; never through float.

Bitcoin amounts are typed by people (``--amount 0.015``) and answered by nodes (JSON
numbers, which the RPC client reads as :class:`~decimal.Decimal`). Both are converted here
to integer satoshis by digit arithmetic, so that no value is ever rounded.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from custody.bitcoin import encoding
from custody.errors import InputError

SATS_PER_BTC = 100_000_000
MAX_MONEY = encoding.MAX_MONEY
"""Bitcoin Core's MAX_MONEY: no amount above it is valid anywhere."""

MAX_FEE_RATE = Decimal(100_000)
"""The highest fee rate accepted, in sat/vB (far above any real one; catches unit mistakes)."""

# ASCII digits only: Python's \d also matches other scripts' digits ("١").
_AMOUNT_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_RATE_RE = _AMOUNT_RE


def parse_btc_amount(text: str) -> int:
    """Parse an amount in BTC written as plain decimal text (``"0.015"``) into satoshis.

    Accepted: ASCII digits with at most one decimal point and at most 8 decimals, between
    1 satoshi and 21,000,000 BTC. Everything else is refused rather than guessed at: signs,
    exponents, commas, whitespace, NaN and Infinity, other scripts' digits.

    Raises InputError saying why the text is not an amount.
    """
    if not isinstance(text, str) or text == "":
        raise InputError("amount is empty: give it in BTC, e.g. 0.015")
    if text != text.strip():
        raise InputError(f"amount {text!r} has leading or trailing whitespace")
    if not _AMOUNT_RE.fullmatch(text):
        raise InputError(f"amount {text!r} is not a plain decimal number of BTC: {_why_not_decimal(text)}")
    whole, _, fraction = text.partition(".")
    if len(fraction) > 8:
        raise InputError(f"amount {_short(text)} has more than 8 decimals (1 satoshi is 0.00000001 BTC)")
    if len(whole.lstrip("0")) > 8:  # 100,000,000 BTC or more; also keeps int() below its digit limit
        raise InputError(f"amount {_short(text)} BTC is more than the 21,000,000 BTC that can ever exist")
    sats = int(whole.lstrip("0") or "0") * SATS_PER_BTC + int(fraction.ljust(8, "0"))
    if sats == 0:
        raise InputError("amount is zero")
    if sats > MAX_MONEY:
        raise InputError(f"amount {text} BTC is more than the 21,000,000 BTC that can ever exist")
    return sats


def _short(text: str) -> str:
    """``text`` for a message: quoted, and cut to 40 characters."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def _why_not_decimal(text: str) -> str:
    if text.startswith(("-", "+")):
        return "no sign allowed (amounts are positive)"
    if text.lower().lstrip("+-") in ("nan", "snan", "inf", "infinity"):
        return "not a number"
    if "e" in text.lower():
        return "no exponent notation"
    if "," in text:
        return "use a decimal point, not a comma, and no thousands separators"
    if not text.isascii():
        return "only the ASCII digits 0-9 are allowed"
    if text.startswith(".") or text.endswith("."):
        return "write digits on both sides of the decimal point"
    return "only digits and one decimal point are allowed"


def format_btc(sats: int) -> str:
    """Satoshis as BTC with exactly 8 decimals: ``1_500_000`` -> ``"0.01500000"``."""
    sign = "-" if sats < 0 else ""
    whole, fraction = divmod(abs(sats), SATS_PER_BTC)
    return f"{sign}{whole}.{fraction:08d}"


def btc_decimal(sats: int) -> Decimal:
    """Satoshis as an exact Decimal of BTC, the form the node's JSON-RPC takes."""
    return Decimal(sats).scaleb(-8)


def sats_from_btc(value: Decimal | int) -> int:
    """An exact amount of BTC (a node's Decimal or int) as integer satoshis.

    Raises ValueError when the value is not a finite number or has a fraction of a
    satoshi (the caller turns it into the error of its context).
    """
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise ValueError(f"amount {value!r} is not an exact number")
    if isinstance(value, int):
        return value * SATS_PER_BTC
    if not value.is_finite():
        raise ValueError(f"amount {value} is not a finite number")
    scaled = value.scaleb(8)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"amount {value} has a fraction of a satoshi")
    return int(scaled)


def parse_fee_rate(text: str) -> Decimal:
    """Parse a fee rate in sat/vB (``"12"``, ``"1.5"``) into an exact Decimal.

    Accepted: plain decimal text with at most 3 decimals (Core's precision for sat/vB),
    above 0 and at most 100,000 sat/vB.
    Raises InputError saying why the text is not a fee rate.
    """
    if not isinstance(text, str) or text == "":
        raise InputError("fee rate is empty: give it in sat/vB, e.g. 12")
    if text != text.strip():
        raise InputError(f"fee rate {text!r} has leading or trailing whitespace")
    if not _RATE_RE.fullmatch(text):
        raise InputError(f"fee rate {text!r} is not a plain decimal number of sat/vB: {_why_not_decimal(text)}")
    if len(text.partition(".")[2]) > 3:
        raise InputError(f"fee rate {text!r} has more than 3 decimals (sat/vB is precise to 0.001)")
    try:
        rate = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        raise InputError(f"fee rate {text!r} is not a number") from None
    if rate <= 0:
        raise InputError("fee rate must be above 0 sat/vB")
    if rate > MAX_FEE_RATE:
        raise InputError(f"fee rate {text} sat/vB is above the limit of {MAX_FEE_RATE} sat/vB (a unit mistake?)")
    return rate
