"""The withdrawal queue's fee caps and confirmation depths, from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from custody.bitcoin.amounts import parse_fee_rate
from custody.config import Settings
from custody.errors import (
    InputError,
)


@dataclass(frozen=True)
class Limits:
    """Fee caps and confirmation depth; from CUSTODY_* settings."""

    default_fee_rate: Decimal = Decimal(2)
    max_fee_rate: Decimal = Decimal(500)  # sat/vB
    max_fee: int = 1_000_000  # satoshis, absolute
    confirmations: int = 1
    refund_confirmations: int = 6
    """How deep in the chain another transaction spending a signed withdrawal's input must
    be before the withdrawal is failed and its customer refunded (CUSTODY_REFUND_CONFIRMATIONS)."""


def limits_from_settings(settings: Settings) -> Limits:
    """Limits from CUSTODY_FEE_RATE, CUSTODY_MAX_FEE_RATE (sat/vB), CUSTODY_MAX_FEE (sat),
    CUSTODY_CONFIRMATIONS, CUSTODY_REFUND_CONFIRMATIONS, as the settings hold them. Raises
    InputError for a malformed value, or a refund depth below the confirmation depth."""
    base = Limits()
    try:
        max_fee = int(settings.max_fee if settings.max_fee is not None else base.max_fee)
        confirmations = int(settings.confirmations if settings.confirmations is not None else base.confirmations)
        refund = settings.refund_confirmations
        refund_confirmations = int(refund if refund is not None else base.refund_confirmations)
    except ValueError:
        raise InputError(
            "CUSTODY_MAX_FEE, CUSTODY_CONFIRMATIONS and CUSTODY_REFUND_CONFIRMATIONS take whole numbers"
        ) from None
    if max_fee < 0 or confirmations < 1:
        raise InputError("CUSTODY_MAX_FEE must be >= 0 and CUSTODY_CONFIRMATIONS >= 1")
    if refund_confirmations < confirmations:
        raise InputError(
            f"CUSTODY_REFUND_CONFIRMATIONS ({refund_confirmations}) must be at least CUSTODY_CONFIRMATIONS "
            f"({confirmations}): a refund needs at least the proof a settlement needs"
        )
    return Limits(
        default_fee_rate=parse_fee_rate(settings.fee_rate) if settings.fee_rate else base.default_fee_rate,
        max_fee_rate=parse_fee_rate(settings.max_fee_rate) if settings.max_fee_rate else base.max_fee_rate,
        max_fee=max_fee,
        confirmations=confirmations,
        refund_confirmations=refund_confirmations,
    )
