"""BIP-32 extended keys against the BIP's own test vectors (fixtures/bip32.json) and
BIP-380's key-expression vectors (fixtures/bip380_checksums.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from custody.bitcoin.keys import (
    HARDENED,
    ExtendedPrivateKey,
    ParentKey,
    b58check_decode,
    b58check_encode,
    parse_origin_xpub,
    parse_path,
    parse_xprv,
    parse_xpub,
    split_origin,
)
from custody.bitcoin.network import MAINNET, REGTEST, TESTNET, Network
from custody.errors import InputError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BIP32: dict[str, Any] = json.loads((FIXTURES / "bip32.json").read_text())
KEY_EXPRESSIONS: dict[str, Any] = json.loads((FIXTURES / "bip380_checksums.json").read_text())["key_expressions"]

# (vector number, seed, chain) for every chain of BIP-32 test vectors 1-4
CHAINS = [
    (n, vector["seed"], chain) for n, vector in enumerate(BIP32["vectors"], start=1) for chain in vector["chains"]
]


def _chain_id(case: tuple[int, str, dict[str, str]]) -> str:
    return f"v{case[0]}:{case[2]['path']}"


def _public_steps() -> list[tuple[str, dict[str, str], dict[str, str], tuple[int, ...]]]:
    """(id, ancestor chain, chain, steps) where the steps from ancestor to chain are all
    non-hardened, so the chain's xpub follows from the ancestor's xpub alone."""
    out = []
    for vector_no, vector in enumerate(BIP32["vectors"], start=1):
        chains = vector["chains"]
        for chain in chains:
            path = parse_path(chain["path"])
            for ancestor in chains:
                base = parse_path(ancestor["path"])
                rest = path[len(base) :]
                if path[: len(base)] == base and rest and all(s < HARDENED for s in rest):
                    out.append((f"v{vector_no}:{ancestor['path']}->{chain['path']}", ancestor, chain, rest))
    return out


PUBLIC_STEPS = _public_steps()


def test_the_fixture_has_four_vectors_seventeen_chains_and_public_steps() -> None:
    assert len(BIP32["vectors"]) == 4
    assert len(CHAINS) == 17
    # v1: m/0H->m/0H/1, m/0H/1/2H->.../2, ->.../2/1000000000, .../2->.../1000000000;
    # v2: m->m/0, m/0/2147483647H->.../1
    assert len(PUBLIC_STEPS) >= 6


# ---------------------------------------------------------------- private derivation


@pytest.mark.parametrize("case", CHAINS, ids=_chain_id)
def test_private_derivation_from_the_seed(case: tuple[int, str, dict[str, str]]) -> None:
    _, seed, chain = case
    master = ExtendedPrivateKey.from_seed(bytes.fromhex(seed), MAINNET)
    key = master.derive(parse_path(chain["path"]))
    assert key.serialize() == chain["xprv"]
    assert key.neuter().serialize() == chain["xpub"]


@pytest.mark.parametrize("case", CHAINS, ids=_chain_id)
def test_vector_keys_parse_to_what_they_encode(case: tuple[int, str, dict[str, str]]) -> None:
    _, _, chain = case
    path = parse_path(chain["path"])
    xpub = parse_xpub(chain["xpub"], MAINNET)
    xprv = parse_xprv(chain["xprv"], MAINNET)
    assert xpub.depth == xprv.depth == len(path)
    assert xpub.child_number == xprv.child_number == (path[-1] if path else 0)
    # the vector's xprv neuters to the vector's xpub
    assert xprv.neuter().serialize() == chain["xpub"]
    assert xprv.public_key == xpub.public_key
    # round trips
    assert xpub.serialize() == chain["xpub"]
    assert xprv.serialize() == chain["xprv"]


PARENT_CHILD = [
    (f"v{n}:{parent['path']}->{child['path']}", parent, child)
    for n, vector in enumerate(BIP32["vectors"], start=1)
    for parent, child in zip(vector["chains"], vector["chains"][1:], strict=False)
]


@pytest.mark.parametrize(("name", "parent", "child"), PARENT_CHILD, ids=[p[0] for p in PARENT_CHILD])
def test_each_childs_parent_fingerprint_is_its_parents(
    name: str, parent: dict[str, str], child: dict[str, str]
) -> None:
    assert parse_path(child["path"])[:-1] == parse_path(parent["path"])
    assert parse_xpub(child["xpub"], MAINNET).parent_fingerprint == (parse_xpub(parent["xpub"], MAINNET).fingerprint)
    assert parse_xprv(child["xprv"], MAINNET).parent_fingerprint == (parse_xprv(parent["xprv"], MAINNET).fingerprint)


# ---------------------------------------------------------------- public derivation


@pytest.mark.parametrize(("name", "ancestor", "chain", "steps"), PUBLIC_STEPS, ids=[p[0] for p in PUBLIC_STEPS])
def test_public_derivation_matches_the_vector(
    name: str, ancestor: dict[str, str], chain: dict[str, str], steps: tuple[int, ...]
) -> None:
    parent = parse_xpub(ancestor["xpub"], MAINNET)
    assert parent.derive(steps).serialize() == chain["xpub"]
    key = parent
    for step in steps:
        key = key.child(step)
    assert key.serialize() == chain["xpub"]


@pytest.mark.parametrize(("name", "ancestor", "chain", "steps"), PUBLIC_STEPS, ids=[p[0] for p in PUBLIC_STEPS])
def test_parent_key_child_matches_the_vector(
    name: str, ancestor: dict[str, str], chain: dict[str, str], steps: tuple[int, ...]
) -> None:
    expected = parse_xpub(chain["xpub"], MAINNET).public_key
    parent = parse_xpub(ancestor["xpub"], MAINNET)
    # ParentKey derives one level; go down to the last step's parent with the vector's keys
    for step in steps[:-1]:
        parent = parent.child(step)
    fast = ParentKey(parent.public_key, parent.chain_code)
    assert fast.child(steps[-1]) == expected
    # deriving twice from the same ParentKey must not disturb its parsed point
    assert fast.child(steps[-1]) == expected


def test_public_derivation_refuses_a_hardened_step() -> None:
    xpub = parse_xpub(BIP32["vectors"][0]["chains"][0]["xpub"], MAINNET)
    with pytest.raises(InputError, match="hardened"):
        xpub.child(HARDENED)
    with pytest.raises(InputError, match="hardened"):
        xpub.derive((0, HARDENED + 1))


def test_parent_key_refuses_an_invalid_point() -> None:
    with pytest.raises(InputError):
        ParentKey(bytes.fromhex("02" + "00" * 31 + "07"), b"\x00" * 32)


# ---------------------------------------------------------------- test vector 5: invalid keys


def _expected_words(key: str, reason: str) -> str:
    """What the prefix's own parser must name when it refuses the key (regex)."""
    if "checksum" in reason:
        return "checksum"
    if "unknown" in reason:
        return "version"
    if "zero depth" in reason:
        return "depth"
    if "not in 1..n-1" in reason:
        return "out of range"
    if reason.startswith("invalid pubkey 02"):
        return "not on the curve"
    if "pubkey" in reason and key.startswith("xpub"):
        return "public key"
    if "prvkey" in reason and key.startswith("xprv"):
        return "private key"
    raise AssertionError(f"no expectation for {reason!r}")


@pytest.mark.parametrize("case", BIP32["invalid"], ids=lambda c: c["reason"])
def test_vector_5_keys_are_refused(case: dict[str, str]) -> None:
    key, reason = case["key"], case["reason"]
    if key.startswith("xpub"):
        own, other = parse_xpub, parse_xprv
    elif key.startswith("xprv"):
        own, other = parse_xprv, parse_xpub
    else:  # an unknown version: neither parser may take it
        own, other = parse_xpub, parse_xprv
    with pytest.raises(InputError, match=_expected_words(key, reason)):
        own(key, MAINNET)
    # every vector-5 key is invalid as any extended key, so the other parser refuses it too
    with pytest.raises(InputError):
        other(key, MAINNET)


def test_vector_5_is_complete() -> None:
    assert len(BIP32["invalid"]) == 16


# ---------------------------------------------------------------- wrong kind, network, checksum

V1_MASTER = BIP32["vectors"][0]["chains"][0]
V1_CHILD = BIP32["vectors"][0]["chains"][1]


def _on(network_key: str, network: Network) -> str:
    """The same vector key re-encoded with another network's version bytes."""
    if network_key.startswith("xprv"):
        return dataclasses.replace(parse_xprv(network_key, MAINNET), network=network).serialize()
    return dataclasses.replace(parse_xpub(network_key, MAINNET), network=network).serialize()


def test_a_private_key_given_for_a_public_one_is_refused() -> None:
    with pytest.raises(InputError, match="private"):
        parse_xpub(V1_CHILD["xprv"], MAINNET)
    with pytest.raises(InputError, match="private"):
        parse_xpub(_on(V1_CHILD["xprv"], REGTEST), REGTEST)


def test_a_public_key_given_for_a_private_one_is_refused() -> None:
    with pytest.raises(InputError, match="public"):
        parse_xprv(V1_CHILD["xpub"], MAINNET)


def test_a_tpub_on_mainnet_is_of_another_network() -> None:
    tpub = _on(V1_CHILD["xpub"], TESTNET)
    assert tpub.startswith("tpub")
    with pytest.raises(InputError, match="another network"):
        parse_xpub(tpub, MAINNET)
    # and it is accepted where it belongs, as the same key
    assert parse_xpub(tpub, REGTEST).public_key == parse_xpub(V1_CHILD["xpub"], MAINNET).public_key


@pytest.mark.parametrize("network", [REGTEST, TESTNET], ids=lambda n: n.name)
def test_an_xpub_on_a_test_network_is_of_another_network(network: Network) -> None:
    with pytest.raises(InputError, match="another network"):
        parse_xpub(V1_CHILD["xpub"], network)


def test_a_tprv_on_mainnet_is_of_another_network() -> None:
    tprv = _on(V1_CHILD["xprv"], TESTNET)
    assert tprv.startswith("tprv")
    with pytest.raises(InputError, match="another network"):
        parse_xprv(tprv, MAINNET)


def test_a_mistyped_character_breaks_the_checksum() -> None:
    good = V1_CHILD["xpub"]
    i = 40
    bad = good[:i] + ("2" if good[i] != "2" else "3") + good[i + 1 :]
    with pytest.raises(InputError, match="checksum"):
        parse_xpub(bad, MAINNET)
    with pytest.raises(InputError, match="checksum"):
        b58check_decode(bad)


@pytest.mark.parametrize("text", ["", "0OIl", "xpub!", "1111"])
def test_not_base58_or_too_short_is_refused(text: str) -> None:
    with pytest.raises(InputError):
        parse_xpub(text, MAINNET)


def test_a_payload_of_the_wrong_length_is_refused() -> None:
    payload = b58check_decode(V1_CHILD["xpub"])
    with pytest.raises(InputError, match="78 bytes"):
        parse_xpub(b58check_encode(payload[:-1]), MAINNET)
    with pytest.raises(InputError, match="78 bytes"):
        parse_xprv(b58check_encode(payload + b"\x00"), MAINNET)


@pytest.mark.parametrize("length", [15, 65])
def test_from_seed_refuses_a_seed_of_the_wrong_length(length: int) -> None:
    with pytest.raises(InputError, match="16 to 64"):
        ExtendedPrivateKey.from_seed(b"\x01" * length, MAINNET)


def test_the_private_key_stays_out_of_its_repr() -> None:
    key = parse_xprv(V1_MASTER["xprv"], MAINNET)
    assert key.secret.hex() not in repr(key)
    assert key.secret.hex() not in str(key)
    assert V1_MASTER["xprv"] not in repr(key)


# ---------------------------------------------------------------- paths and key origins


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m", ()),
        ("", ()),
        ("m/0", (0,)),
        ("m/48'/1'/0h/2H", (48 + HARDENED, 1 + HARDENED, HARDENED, 2 + HARDENED)),
        ("0/2147483647'", (0, 2147483647 + HARDENED)),
        # BIP-380 key-expression vectors' derivation suffixes
        ("3/4/5", (3, 4, 5)),
        ("3h/4h/5h", (3 + HARDENED, 4 + HARDENED, 5 + HARDENED)),
        ("2147483647'/0", (2147483647 + HARDENED, 0)),
    ],
)
def test_parse_path(text: str, expected: tuple[int, ...]) -> None:
    assert parse_path(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2147483648",  # BIP-380: derivation index out of range
        "1aa",  # BIP-380: invalid derivation index
        "m/0f",
        "m/-0",
        "m/0/",
        "m//0",
        "m/0''",
        "m/*",
        "m/1/x",
    ],
)
def test_parse_path_refuses(text: str) -> None:
    with pytest.raises(InputError):
        parse_path(text)


def _origin_vectors() -> list[dict[str, str]]:
    return [v for v in KEY_EXPRESSIONS["valid"] if v["key"].startswith("[")]


@pytest.mark.parametrize("case", _origin_vectors(), ids=lambda c: c["name"])
def test_split_origin_of_bip380_valid_key_expressions(case: dict[str, str]) -> None:
    origin, key = split_origin(case["key"])
    assert origin is not None
    assert origin.fingerprint == bytes.fromhex("deadbeef")
    written = case["key"][1 : case["key"].index("]")].split("/")[1:]
    expected = tuple(int(step.rstrip("h'")) + (HARDENED if step[-1] in "h'" else 0) for step in written)
    assert origin.path == expected
    assert key == case["key"][case["key"].index("]") + 1 :]


def test_split_origin_without_origin() -> None:
    for case in KEY_EXPRESSIONS["valid"]:
        if not case["key"].startswith("["):
            assert split_origin(case["key"]) == (None, case["key"])


# BIP-380's invalid key expressions whose fault is in the key origin itself. (The others are
# WIF keys with derivation, out-of-range or malformed derivation steps -- see test_parse_path_refuses
# -- and "multiple key origins" / "missing key origin start", whose fault shows only when the
# key text after the origin is parsed.)
_ORIGIN_FAULTS = (
    "Children indicator in key origin",
    "Trailing slash in key origin",
    "Too short fingerprint",
    "Too long fingerprint",
    "Invalid hardened indicators",
    "Non hex fingerprint",
    "Key origin with no public key",
)


@pytest.mark.parametrize(
    "case",
    [v for v in KEY_EXPRESSIONS["invalid"] if v["name"] in _ORIGIN_FAULTS],
    ids=lambda c: f"{c['name']}: {c['key'][:24]}",
)
def test_split_origin_refuses_bip380_invalid_origins(case: dict[str, str]) -> None:
    with pytest.raises(InputError):
        split_origin(case["key"])


def test_origin_fault_vectors_are_all_there() -> None:
    assert len([v for v in KEY_EXPRESSIONS["invalid"] if v["name"] in _ORIGIN_FAULTS]) == 9


def test_parse_origin_xpub_with_a_consistent_origin() -> None:
    chain = BIP32["vectors"][0]["chains"][3]  # m/0H/1/2H, depth 3
    assert chain["path"] == "m/0H/1/2H"
    fingerprint = parse_xpub(V1_MASTER["xpub"], MAINNET).fingerprint.hex()
    key = parse_origin_xpub(f"[{fingerprint}/0'/1/2h]{chain['xpub']}", MAINNET)
    assert key.origin is not None
    assert key.origin.fingerprint.hex() == fingerprint
    assert key.origin.path == parse_path(chain["path"])
    assert key.xpub.serialize() == chain["xpub"]
    # written back in the descriptor form, hardened steps with '
    assert str(key) == f"[{fingerprint}/0'/1/2']{chain['xpub']}"
    plain = parse_origin_xpub(chain["xpub"], MAINNET)
    assert plain.origin is None
    assert str(plain) == chain["xpub"]


def test_parse_origin_xpub_refuses_an_origin_longer_or_shorter_than_the_depth() -> None:
    chain = BIP32["vectors"][0]["chains"][3]  # depth 3
    with pytest.raises(InputError, match="depth"):
        parse_origin_xpub(f"[00000000/0'/1]{chain['xpub']}", MAINNET)
    with pytest.raises(InputError, match="depth"):
        parse_origin_xpub(f"[00000000/0'/1/2'/3]{chain['xpub']}", MAINNET)


def test_parse_origin_xpub_refuses_a_private_key_and_another_network() -> None:
    with pytest.raises(InputError, match="private"):
        parse_origin_xpub(f"[00000000/0']{V1_CHILD['xprv']}", MAINNET)
    with pytest.raises(InputError, match="another network"):
        parse_origin_xpub(f"[00000000/0']{V1_CHILD['xpub']}", REGTEST)
