"""Segwit addresses against BIP-173's and BIP-350's test vectors (fixtures/bech32.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from custody.bitcoin.bech32 import decode_segwit, encode_segwit
from custody.errors import InputError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VECTORS: dict[str, Any] = json.loads((FIXTURES / "bech32.json").read_text())
HRP = {"mainnet": "bc", "testnet": "tb"}


def _script_pubkey(version: int, program: bytes) -> bytes:
    """OP_0 or OP_1..OP_16, then a push of the program."""
    return bytes([0 if version == 0 else 0x50 + version, len(program)]) + program


def _own_hrp(text: str) -> str | None:
    pos = text.rfind("1")
    return text[:pos].lower() if pos >= 1 else None


@pytest.mark.parametrize("case", VECTORS["valid_addresses"], ids=lambda c: c["address"])
def test_valid_address_decodes_to_its_script(case: dict[str, str]) -> None:
    hrp = HRP[case["network"]]
    version, program = decode_segwit(hrp, case["address"])
    assert _script_pubkey(version, program).hex() == case["script_pubkey"]


@pytest.mark.parametrize("case", VECTORS["valid_addresses"], ids=lambda c: c["address"])
def test_valid_address_reencodes(case: dict[str, str]) -> None:
    hrp = HRP[case["network"]]
    version, program = decode_segwit(hrp, case["address"])
    assert encode_segwit(hrp, version, program) == case["address"].lower()


@pytest.mark.parametrize("case", VECTORS["valid_addresses"], ids=lambda c: c["address"])
def test_valid_address_encodes_from_its_script(case: dict[str, str]) -> None:
    spk = bytes.fromhex(case["script_pubkey"])
    version = 0 if spk[0] == 0 else spk[0] - 0x50
    assert spk[1] == len(spk) - 2
    assert encode_segwit(HRP[case["network"]], version, spk[2:]) == case["address"].lower()


@pytest.mark.parametrize("case", VECTORS["valid_addresses"], ids=lambda c: c["address"])
def test_valid_address_of_the_other_network_is_refused(case: dict[str, str]) -> None:
    other = "tb" if HRP[case["network"]] == "bc" else "bc"
    with pytest.raises(InputError, match="another network"):
        decode_segwit(other, case["address"])


def _invalid_cases() -> list[tuple[str, str, str]]:
    """(address, hrp to decode with, reason) -- BIP-350 and BIP-173 invalid addresses, and
    BIP-173's v1+ addresses with a Bech32 checksum, which BIP-350 makes invalid.

    Each address is tried with its own prefix, so that the decoder has to find the fault
    past the prefix check -- except where the prefix is the fault ("tc"): those are
    well-formed for "tc" and are tried with "bc" and "tb", for which the fixture says every
    invalid address is invalid."""
    cases = []
    entries = [(c["address"], c["reason"]) for c in VECTORS["invalid_addresses"]] + [
        (c["address"], "Bech32 checksum on v1+ (superseded BIP-173 vector)")
        for c in VECTORS["superseded_bip173_addresses"]
    ]
    for address, reason in entries:
        own = _own_hrp(address)
        hrps = ["bc", "tb"]
        if own is not None and "human-readable part" not in reason and own not in hrps:
            hrps.append(own)
        for hrp in hrps:
            cases.append((address, hrp, reason))
    return cases


INVALID = _invalid_cases()


@pytest.mark.parametrize(("address", "hrp", "reason"), INVALID, ids=[f"{h}:{r}:{a}" for a, h, r in INVALID])
def test_invalid_address_is_refused(address: str, hrp: str, reason: str) -> None:
    with pytest.raises(InputError):
        decode_segwit(hrp, address)


def test_every_invalid_address_was_tried_with_its_own_prefix_where_that_is_not_the_fault() -> None:
    own_tried = {a for a, h, _ in INVALID if h == _own_hrp(a)}
    wrong_prefix = {c["address"] for c in VECTORS["invalid_addresses"] if "human-readable" in c["reason"]}
    everything = {c["address"] for c in VECTORS["invalid_addresses"]} | {
        c["address"] for c in VECTORS["superseded_bip173_addresses"]
    }
    assert len(everything) == 26
    assert own_tried == everything - wrong_prefix


@pytest.mark.parametrize(
    "case",
    VECTORS["invalid_bech32"] + VECTORS["invalid_bech32m"],
    ids=lambda c: f"{c['reason']}:{c['string']!r}",
)
def test_invalid_bech32_strings_are_not_addresses(case: dict[str, str]) -> None:
    # BIP-173/350's generic invalid strings cannot be segwit addresses under any prefix:
    # decode with the string's own prefix (or bc when it has none).
    text = case["string"]
    with pytest.raises(InputError):
        decode_segwit(_own_hrp(text) or "bc", text)


def test_upper_case_is_accepted_and_mixed_case_refused() -> None:
    address = "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"  # BIP-173's first valid address
    assert decode_segwit("bc", address.upper()) == decode_segwit("bc", address)
    with pytest.raises(InputError, match="case"):
        decode_segwit("bc", address[:10] + address[10:].upper())


def test_too_long_is_refused() -> None:
    with pytest.raises(InputError, match="90"):
        decode_segwit("bc", "bc1" + "q" * 88)
