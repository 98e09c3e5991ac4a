"""Withdrawal destinations against outside vectors (Bitcoin Core's key_io, BIP-173/350)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from custody.bitcoin.destinations import dust_limit, parse_destination
from custody.bitcoin.network import MAINNET, NETWORKS, REGTEST, TESTNET, Network
from custody.errors import InputError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE58 = json.loads((FIXTURES / "base58.json").read_text())
BECH32 = json.loads((FIXTURES / "bech32.json").read_text())
SUPPORTED = {"p2pkh", "p2sh", "p2wpkh", "p2wsh", "p2tr"}


def _kind(script_pubkey: str) -> str:
    """The kind of a vector's scriptPubKey, by its layout (the vectors give only scripts)."""
    spk = bytes.fromhex(script_pubkey)
    if len(spk) == 25 and spk[:3] == b"\x76\xa9\x14" and spk[-2:] == b"\x88\xac":
        return "p2pkh"
    if len(spk) == 23 and spk[:2] == b"\xa9\x14" and spk[-1] == 0x87:
        return "p2sh"
    if spk[:2] == b"\x00\x14":
        return "p2wpkh"
    if spk[:2] == b"\x00\x20":
        return "p2wsh"
    if spk[:2] == b"\x51\x20":
        return "p2tr"
    return "other"


def _segwit(address: str) -> bool:
    return address.lower().startswith(("bc1", "tb1", "bcrt1"))


def _same_encoding(a: Network, b: Network, address: str) -> bool:
    """Whether ``address`` reads the same on networks a and b (testnet, signet and regtest share some)."""
    if _segwit(address):
        return a.bech32_hrp == b.bech32_hrp
    return (a.p2pkh_version, a.p2sh_version) == (b.p2pkh_version, b.p2sh_version)


VALID: list[dict[str, Any]] = [
    {"address": v["address"], "script_pubkey": v["script_pubkey"], "network": v["network"]}
    for v in BASE58["valid"] + BECH32["valid_addresses"]
]


@pytest.mark.parametrize("vector", VALID, ids=[v["address"][:24] for v in VALID])
def test_valid_addresses_give_their_script_or_are_unsupported(vector: dict[str, Any]) -> None:
    network = NETWORKS[vector["network"]]
    kind = _kind(vector["script_pubkey"])
    variants = [vector["address"]]
    if _segwit(vector["address"]):  # key_io's tryCaseFlip: either case reads the same
        variants += [vector["address"].upper(), vector["address"].lower()]
    for address in variants:
        if kind in SUPPORTED:
            dest = parse_destination(address, network)
            assert dest.script_pubkey.hex() == vector["script_pubkey"]
            assert dest.kind == kind
            assert dest.address == (address.lower() if _segwit(address) else address)
        else:
            with pytest.raises(InputError, match="unsupported destination"):
                parse_destination(address, network)


@pytest.mark.parametrize("vector", VALID, ids=[v["address"][:24] for v in VALID])
def test_valid_addresses_are_refused_on_other_networks(vector: dict[str, Any]) -> None:
    own = NETWORKS[vector["network"]]
    others = [n for n in NETWORKS.values() if not _same_encoding(own, n, vector["address"])]
    assert others
    for network in others:
        with pytest.raises(InputError, match="for another network"):
            parse_destination(vector["address"], network)


INVALID = BASE58["invalid"] + [v["address"] for v in BECH32["invalid_addresses"]]
INVALID += [v["address"] for v in BECH32["superseded_bip173_addresses"]]


@pytest.mark.parametrize("address", INVALID)
def test_invalid_addresses_are_refused_on_every_network(address: str) -> None:
    for network in NETWORKS.values():
        with pytest.raises(InputError):
            parse_destination(address, network)


def test_bip350_reasons_come_through() -> None:
    reasons = {v["address"]: v["reason"] for v in BECH32["invalid_addresses"]}
    for address, reason in reasons.items():
        network = TESTNET if address.lower().startswith("tb") else MAINNET
        with pytest.raises(InputError) as e:
            parse_destination(address, network)
        message = str(e.value)
        if reason == "Mixed case":
            assert "mixes upper and lower case" in message
        elif reason.startswith("Invalid checksum ("):
            assert "checksum variant" in message
        elif reason == "Invalid checksum":
            assert "mistyped" in message


def _flip(address: str, position: int) -> str:
    c = address[position]
    alphabet = (
        "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
        if _segwit(address)
        else "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    )
    return address[:position] + alphabet[(alphabet.index(c) + 1) % len(alphabet)] + address[position + 1 :]


@pytest.mark.parametrize(
    "vector", [v for v in BASE58["valid"] if v["network"] == "regtest" and _kind(v["script_pubkey"]) in SUPPORTED]
)
def test_a_mistyped_address_is_called_mistyped(vector: dict[str, Any]) -> None:
    for position in (len(vector["address"]) // 2, -2):
        with pytest.raises(InputError, match="mistyped"):
            parse_destination(_flip(vector["address"], position), REGTEST)


def test_whitespace_is_stripped_and_mixed_case_refused() -> None:
    vector = next(v for v in BASE58["valid"] if v["network"] == "regtest" and _kind(v["script_pubkey"]) == "p2wpkh")
    dest = parse_destination(f"  {vector['address']}\n", REGTEST)
    assert dest.script_pubkey.hex() == vector["script_pubkey"]
    mixed = vector["address"][:6] + vector["address"][6:].upper()
    with pytest.raises(InputError, match="mixes upper and lower case"):
        parse_destination(mixed, REGTEST)


@pytest.mark.parametrize("text", ["", "   ", "not an address", "bcrt1", "bc1\u00e9", "1\x00"])
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(InputError):
        parse_destination(text, REGTEST)


def test_another_network_names_it() -> None:
    mainnet_p2pkh = next(
        v for v in BASE58["valid"] if v["network"] == "mainnet" and _kind(v["script_pubkey"]) == "p2pkh"
    )
    with pytest.raises(InputError, match=r"another network \(mainnet\), not regtest"):
        parse_destination(mainnet_p2pkh["address"], REGTEST)
    testnet_p2wsh = next(
        v for v in BASE58["valid"] if v["network"] == "testnet" and _kind(v["script_pubkey"]) == "p2wsh"
    )
    with pytest.raises(InputError, match=r"another network \(testnet or signet\), not regtest"):
        parse_destination(testnet_p2wsh["address"], REGTEST)


# Bitcoin Core's documented dust thresholds at the default -dustrelayfee of 3000 sat/kvB
# (src/policy/policy.cpp, GetDustThreshold: "546 satoshis" for p2pkh, "294 satoshis" for p2wpkh).
DUST = {"p2pkh": 546, "p2sh": 540, "p2wpkh": 294, "p2wsh": 330, "p2tr": 330}


@pytest.mark.parametrize("vector", [v for v in BASE58["valid"] if _kind(v["script_pubkey"]) in SUPPORTED])
def test_dust_limit(vector: dict[str, Any]) -> None:
    assert dust_limit(bytes.fromhex(vector["script_pubkey"])) == DUST[_kind(vector["script_pubkey"])]


def test_unspendable_outputs_have_no_dust_limit() -> None:
    assert dust_limit(bytes.fromhex("6a04deadbeef")) == 0  # OP_RETURN <data>
