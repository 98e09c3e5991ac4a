"""BIP-380 descriptor checksums against BIP-380's and Bitcoin Core's vectors
(fixtures/bip380_checksums.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from custody.bitcoin.descriptors import add_checksum, check_checksum, descriptor_checksum
from custody.errors import InputError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VECTORS: dict[str, Any] = json.loads((FIXTURES / "bip380_checksums.json").read_text())


def _short(case: dict[str, str]) -> str:
    text = case.get("descriptor") or case["descriptor_with_checksum"]
    return f"{text[:18]}..{text[-12:]}"


@pytest.mark.parametrize("case", VECTORS["valid"], ids=_short)
def test_every_valid_checksum_computes(case: dict[str, str]) -> None:
    assert descriptor_checksum(case["descriptor"]) == case["checksum"]


@pytest.mark.parametrize("case", VECTORS["valid"], ids=_short)
def test_every_valid_checksum_is_accepted(case: dict[str, str]) -> None:
    full = f"{case['descriptor']}#{case['checksum']}"
    assert add_checksum(case["descriptor"]) == full
    assert check_checksum(full) == case["descriptor"]


# Every invalid vector in the fixture is a checksum error (missing, too long or short, wrong,
# several '#', a character outside the descriptor set): each reason below says so.
_CHECKSUM_REASONS = (
    "checksum",
    "Invalid characters in payload",
    "Multiple '#' symbols",
    "Error in payload",
)


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: f"{c['reason']}: {_short(c)}")
def test_every_invalid_checksum_is_refused(case: dict[str, str]) -> None:
    assert any(word in case["reason"] for word in _CHECKSUM_REASONS), case["reason"]
    with pytest.raises(InputError):
        check_checksum(case["descriptor_with_checksum"])


def test_all_invalid_vectors_are_used() -> None:
    assert len(VECTORS["invalid"]) == 20


def test_a_descriptor_without_checksum_is_refused_by_check_checksum() -> None:
    # BIP-380 calls the checksum optional; custody's check_checksum demands one.
    (case,) = VECTORS["no_checksum"]
    with pytest.raises(InputError, match="no checksum"):
        check_checksum(case["descriptor"])


def test_payload_characters_outside_the_descriptor_set_are_refused() -> None:
    with pytest.raises(InputError, match="not allowed"):
        descriptor_checksum("raw(\u00dc)")
    with pytest.raises(InputError, match="not allowed"):
        descriptor_checksum("raw(dead\nbeef)")


def test_a_checksum_over_a_second_hash_sign_is_still_refused() -> None:
    # Core: "Multiple '#' symbols" is an error whatever follows the last '#', even a
    # checksum that is right for everything before it.
    (first, *_) = VECTORS["valid"]
    inner = f"{first['descriptor']}#{first['checksum']}"
    crafted = f"{inner}#{descriptor_checksum(inner)}"
    with pytest.raises(InputError, match="more than one '#'"):
        check_checksum(crafted)


@pytest.mark.parametrize("position", range(8))
def test_any_single_changed_checksum_character_is_refused(position: int) -> None:
    # BCH code: every one-character error is detected.
    case = VECTORS["valid"][0]  # raw(deadbeef)#89f8spxm, BIP-380's own vector
    checksum = case["checksum"]
    for replacement in "qpzry9x8gf2tvdw0s3jn54khce6mua7l":
        if replacement == checksum[position]:
            continue
        bad = checksum[:position] + replacement + checksum[position + 1 :]
        with pytest.raises(InputError, match="mismatch"):
            check_checksum(f"{case['descriptor']}#{bad}")
