"""make_policy: what it refuses and what it accepts. Keys are BIP-32 test-vector keys
(fixtures/bip32.json) and their children; the key-count limits are BIP-383's and Core's
(fixtures/descriptor_addresses.json: 16 keys in sh(multi) invalid, 20 in wsh(multi) valid)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from custody.bitcoin.keys import parse_xpub
from custody.bitcoin.network import MAINNET, REGTEST, TESTNET, Network
from custody.bitcoin.script import ScriptType, parse_script_type
from custody.errors import InputError
from custody.policy.generator import AddressDeriver
from custody.policy.model import make_policy

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BIP32: dict[str, Any] = json.loads((FIXTURES / "bip32.json").read_text())
DESCRIPTORS: dict[str, Any] = json.loads((FIXTURES / "descriptor_addresses.json").read_text())

V1 = BIP32["vectors"][0]["chains"]
V1_MASTER = parse_xpub(V1[0]["xpub"], MAINNET)
# m/0H of test vector 1, depth 1, and its non-hardened children: as many distinct keys as needed
ACCOUNT = parse_xpub(V1[1]["xpub"], MAINNET)
KEYS = [ACCOUNT.child(i).serialize() for i in range(22)]  # depth 2


def founders(n: int, keys: list[str] = KEYS) -> list[tuple[str, str]]:
    return [(f"f{i}", keys[i]) for i in range(n)]


# ---------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    ("threshold", "n", "script_type"),
    [
        (1, 1, ScriptType.P2WSH),
        (1, 1, ScriptType.P2SH),
        (2, 3, ScriptType.P2WSH),
        (2, 3, ScriptType.P2SH_P2WSH),
        (2, 3, ScriptType.P2SH),
        (15, 15, ScriptType.P2SH),
        (20, 20, ScriptType.P2WSH),
        (20, 20, ScriptType.P2SH_P2WSH),
    ],
    ids=lambda v: v.value if isinstance(v, ScriptType) else str(v),
)
def test_valid_policies(threshold: int, n: int, script_type: ScriptType) -> None:
    policy = make_policy(MAINNET, threshold, script_type, founders(n))
    assert policy.threshold == threshold
    assert policy.n == n
    assert policy.script_type is script_type
    assert [f.name for f in policy.founders] == [f"f{i}" for i in range(n)]
    assert [f.key.xpub.serialize() for f in policy.founders] == KEYS[:n]
    address = AddressDeriver(policy).derive(0, 0)
    assert len(address.keys) == n
    if script_type is ScriptType.P2SH:
        assert len(address.script) <= 520  # consensus limit on a P2SH redeem script


def test_key_origins_are_kept() -> None:
    origin = f"[{V1_MASTER.fingerprint.hex()}/0h]"
    policy = make_policy(MAINNET, 1, ScriptType.P2WSH, [("alice", origin + V1[1]["xpub"])])
    (founder,) = policy.founders
    assert str(founder.key) == f"[{V1_MASTER.fingerprint.hex()}/0']" + V1[1]["xpub"]


def test_regtest_policy_from_tpubs() -> None:
    tpubs = [dataclasses.replace(parse_xpub(k, MAINNET), network=REGTEST).serialize() for k in KEYS[:3]]
    policy = make_policy(REGTEST, 2, ScriptType.P2WSH, founders(3, tpubs))
    assert policy.network is REGTEST
    assert AddressDeriver(policy).derive(0, 0).address.startswith("bcrt1q")


def test_names_are_trimmed() -> None:
    policy = make_policy(MAINNET, 1, ScriptType.P2WSH, [("  alice ", KEYS[0])])
    assert policy.founders[0].name == "alice"


# ---------------------------------------------------------------- refused


def _refused(match: str, *args: Any) -> None:
    with pytest.raises(InputError, match=match):
        make_policy(*args)


def test_the_same_key_twice() -> None:
    _refused("same key", MAINNET, 1, ScriptType.P2WSH, [("a", KEYS[0]), ("b", KEYS[0])])


def test_the_same_key_twice_with_different_origins() -> None:
    key = V1[1]["xpub"]  # depth 1
    fp = V1_MASTER.fingerprint.hex()
    _refused(
        "same key",
        MAINNET,
        1,
        ScriptType.P2WSH,
        [("a", key), ("b", f"[{fp}/0']{key}"), ("c", KEYS[1])],
    )
    _refused("same key", MAINNET, 1, ScriptType.P2WSH, [("a", f"[{fp}/0h]{key}"), ("b", f"[deadbeef/7]{key}")])


def test_the_same_key_under_another_serialization() -> None:
    # same public key and chain code, another parent fingerprint and index: another string
    xpub = parse_xpub(KEYS[0], MAINNET)
    disguised = dataclasses.replace(xpub, parent_fingerprint=b"\x01\x02\x03\x04", child_number=9)
    assert disguised.serialize() != KEYS[0]
    _refused("same key", MAINNET, 1, ScriptType.P2WSH, [("a", KEYS[0]), ("b", disguised.serialize())])


def test_the_same_public_key_with_another_chain_code() -> None:
    xpub = parse_xpub(KEYS[0], MAINNET)
    other = dataclasses.replace(xpub, chain_code=bytes(32))
    _refused("public key", MAINNET, 1, ScriptType.P2WSH, [("a", KEYS[0]), ("b", other.serialize())])


@pytest.mark.parametrize("network", [TESTNET, REGTEST], ids=lambda n: n.name)
def test_an_xpub_on_a_test_network(network: Network) -> None:
    _refused("another network", network, 1, ScriptType.P2WSH, founders(1))


def test_a_tpub_on_mainnet() -> None:
    tpub = dataclasses.replace(parse_xpub(KEYS[1], MAINNET), network=TESTNET).serialize()
    _refused("another network", MAINNET, 1, ScriptType.P2WSH, [("a", KEYS[0]), ("b", tpub)])


def test_a_bad_checksum() -> None:
    key = KEYS[0]
    bad = key[:-1] + ("2" if key[-1] != "2" else "3")
    _refused("checksum", MAINNET, 1, ScriptType.P2WSH, [("a", bad)])


def test_a_private_key() -> None:
    _refused("private", MAINNET, 1, ScriptType.P2WSH, [("a", KEYS[0]), ("b", V1[2]["xprv"])])


def test_the_error_names_the_founder() -> None:
    _refused("founder bob", MAINNET, 1, ScriptType.P2WSH, [("alice", KEYS[0]), ("bob", V1[2]["xprv"])])


@pytest.mark.parametrize("threshold", [0, -1])
def test_threshold_below_one(threshold: int) -> None:
    _refused("threshold", MAINNET, threshold, ScriptType.P2WSH, founders(3))


@pytest.mark.parametrize(("threshold", "n"), [(2, 1), (4, 3), (16, 15)])
def test_threshold_above_n(threshold: int, n: int) -> None:
    _refused("threshold", MAINNET, threshold, ScriptType.P2WSH, founders(n))


def test_sixteen_keys_in_p2sh() -> None:
    # BIP-383: "More than 15 keys in P2SH multisig" is an invalid descriptor
    assert any("More than 15 keys in P2SH" in v["reason"] for v in DESCRIPTORS["invalid"])
    _refused("limit of 15", MAINNET, 1, ScriptType.P2SH, founders(16))


@pytest.mark.parametrize("script_type", [ScriptType.P2WSH, ScriptType.P2SH_P2WSH])
def test_twenty_one_keys_in_segwit(script_type: ScriptType) -> None:
    _refused("limit of 20", MAINNET, 1, script_type, founders(21))


def test_no_founders() -> None:
    _refused("at least one", MAINNET, 1, ScriptType.P2WSH, [])


def test_duplicate_founder_names() -> None:
    _refused("same name", MAINNET, 1, ScriptType.P2WSH, [("alice", KEYS[0]), ("alice", KEYS[1])])
    _refused("same name", MAINNET, 1, ScriptType.P2WSH, [("alice", KEYS[0]), (" alice", KEYS[1])])


@pytest.mark.parametrize(
    "name", ["", "   ", "al ice", "al\tice", "a,b", "a=b", "a[b", "a]b", "a(b", "a)b", "a#b", "x" * 65]
)
def test_bad_founder_names(name: str) -> None:
    _refused("bad name", MAINNET, 1, ScriptType.P2WSH, [(name, KEYS[0])])


def test_a_malformed_origin() -> None:
    _refused("origin", MAINNET, 1, ScriptType.P2WSH, [("a", f"[deadbeef/0H]{V1[1]['xpub']}")])
    _refused("depth", MAINNET, 1, ScriptType.P2WSH, [("a", f"[deadbeef/0'/1]{V1[1]['xpub']}")])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("p2wsh", ScriptType.P2WSH), (" P2SH-P2WSH ", ScriptType.P2SH_P2WSH), ("p2sh", ScriptType.P2SH)],
)
def test_parse_script_type(text: str, expected: ScriptType) -> None:
    assert parse_script_type(text) is expected


def test_parse_script_type_refuses() -> None:
    with pytest.raises(InputError, match="unknown script type"):
        parse_script_type("p2tr")
