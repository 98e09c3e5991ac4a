"""Outside test vectors for the verifier's own encoders and BIP-32 (fixtures/*.json).

Every expected value comes from a BIP or Bitcoin Core (see each fixture's "source").
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from verify_builders import ckd as builder_ckd

from custody.verify.base58 import b58check_decode, b58check_encode, b58decode, b58encode
from custody.verify.bech32 import (
    Encoding,
    P2WSHEncoder,
    bech32_decode,
    decode_segwit_address,
    encode_segwit_address,
)
from custody.verify.bip32 import (
    HARDENED,
    ChildDeriver,
    ckd_pub,
    hash160,
    parse_extended_public_key,
)
from custody.verify.core import classify_address
from custody.verify.errors import DecodeError
from custody.verify.script import build_multisig, parse_multisig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


BIP32 = load("bip32.json")
BECH32 = load("bech32.json")
BASE58 = load("base58.json")
BIP67 = load("bip67.json")
DESCRIPTORS = load("descriptor_addresses.json")


# -- BIP-32 -------------------------------------------------------------------------------


def _public_steps() -> list[tuple[str, str, int, str]]:
    """(parent path, parent xpub, index, child xpub) for every non-hardened step."""
    steps = []
    for vector in BIP32["vectors"]:
        chains = vector["chains"]
        for parent, child in zip(chains, chains[1:], strict=False):
            last = child["path"].rsplit("/", 1)[1]
            if child["path"].rsplit("/", 1)[0] == parent["path"] and not last.endswith("H"):
                steps.append((parent["path"], parent["xpub"], int(last), child["xpub"]))
    return steps


PUBLIC_STEPS = _public_steps()


def test_bip32_has_public_steps() -> None:
    assert len(PUBLIC_STEPS) >= 5


@pytest.mark.parametrize("parent_path,parent,index,child", PUBLIC_STEPS)
def test_bip32_ckd_pub_matches_vectors(parent_path: str, parent: str, index: int, child: str) -> None:
    p = parse_extended_public_key(parent)
    c = parse_extended_public_key(child)
    assert ckd_pub(p.key, p.chain_code, index) == (c.key, c.chain_code)
    assert ChildDeriver([(p.key, p.chain_code)]).children(index) == [c.key]
    assert c.parent_fingerprint == p.fingerprint
    assert c.child_number == index and c.depth == p.depth + 1


@pytest.mark.parametrize("parent_path,parent,index,child", PUBLIC_STEPS)
def test_test_builder_ckd_matches_vectors(parent_path: str, parent: str, index: int, child: str) -> None:
    # The tests' independent builder is itself held to the BIP's values.
    p = parse_extended_public_key(parent)
    c = parse_extended_public_key(child)
    assert builder_ckd(p.key, p.chain_code, index) == (c.key, c.chain_code)


@pytest.mark.parametrize("chain", [c for v in BIP32["vectors"] for c in v["chains"]], ids=lambda c: c["path"])
def test_bip32_vector_xpubs_parse_and_xprvs_are_refused(chain: dict[str, str]) -> None:
    key = parse_extended_public_key(chain["xpub"])
    assert key.depth == chain["path"].count("/")
    last = chain["path"].rsplit("/", 1)[-1]
    if last != "m":
        assert key.child_number == int(last.rstrip("H")) + (HARDENED if last.endswith("H") else 0)
    with pytest.raises(DecodeError, match="private"):
        parse_extended_public_key(chain["xprv"])


@pytest.mark.parametrize("case", BIP32["invalid"], ids=lambda c: c["reason"])
def test_bip32_vector5_invalid_keys_are_refused(case: dict[str, str]) -> None:
    with pytest.raises(DecodeError) as err:
        parse_extended_public_key(case["key"])
    message = str(err.value)
    reason = case["reason"]
    if case["key"].startswith(("xprv", "tprv")) and "checksum" not in reason:
        assert "private" in message  # never parsed further, never echoed
    elif "checksum" in reason:
        assert "invalid checksum" in message
    elif reason.startswith("unknown extended key version"):
        assert "unknown extended key version" in message
    elif reason.startswith("invalid pubkey prefix"):
        assert f"prefix {reason[-2:]}" in message
    elif reason.startswith("invalid pubkey 02"):
        assert "not on the curve" in message
    elif reason.startswith("pubkey version / prvkey"):
        assert "private key data" in message
    else:
        assert reason in message


# -- bech32 / bech32m -----------------------------------------------------------------------


@pytest.mark.parametrize("case", BECH32["valid_bech32"], ids=lambda c: c["string"][:20])
def test_valid_bech32(case: dict[str, str]) -> None:
    assert bech32_decode(case["string"])[2] is Encoding.BECH32


@pytest.mark.parametrize("case", BECH32["valid_bech32m"], ids=lambda c: c["string"][:20])
def test_valid_bech32m(case: dict[str, str]) -> None:
    assert bech32_decode(case["string"])[2] is Encoding.BECH32M


@pytest.mark.parametrize(
    "case,wanted",
    [(c, Encoding.BECH32) for c in BECH32["invalid_bech32"]]
    + [(c, Encoding.BECH32M) for c in BECH32["invalid_bech32m"]],
    ids=lambda c: c["reason"] if isinstance(c, dict) else "",
)
def test_invalid_bech32_strings(case: dict[str, str], wanted: Encoding) -> None:
    try:
        _, _, spec = bech32_decode(case["string"])
    except DecodeError:
        return
    assert spec is not wanted, f"{case['string']!r} accepted ({case['reason']})"


def _script_pubkey(version: int, program: bytes) -> bytes:
    return bytes([version + 0x50 if version else 0, len(program)]) + program


@pytest.mark.parametrize("case", BECH32["valid_addresses"], ids=lambda c: c["address"][:24])
def test_valid_segwit_addresses(case: dict[str, str]) -> None:
    hrp, version, program = decode_segwit_address(case["address"])
    assert _script_pubkey(version, program).hex() == case["script_pubkey"]
    assert encode_segwit_address(hrp, version, program) == case["address"].lower()
    networks, _, _ = classify_address(case["address"])
    assert case["network"] in networks
    if version == 0 and len(program) == 32:
        assert P2WSHEncoder(hrp).encode(program) == case["address"].lower()


@pytest.mark.parametrize(
    "case",
    BECH32["invalid_addresses"] + BECH32["superseded_bip173_addresses"],
    ids=lambda c: c["address"][:24],
)
def test_invalid_segwit_addresses(case: dict[str, str]) -> None:
    try:
        hrp, _, _ = decode_segwit_address(case["address"])
    except DecodeError:
        return
    # Only a foreign human-readable part may decode; no network of ours takes it.
    assert hrp not in ("bc", "tb", "bcrt"), case


# -- base58 --------------------------------------------------------------------------------


def test_base58_basics() -> None:
    # Leading zero bytes are '1's (base58 definition in Bitcoin Core's base58.cpp).
    assert b58encode(b"\0\0\x01") == "112"
    assert b58decode("112") == b"\0\0\x01"
    assert b58encode(b"") == "" and b58decode("") == b""


@pytest.mark.parametrize("case", BASE58["valid"], ids=lambda c: c["address"][:24])
def test_base58_and_address_vectors(case: dict[str, str]) -> None:
    networks, kind, payload = classify_address(case["address"])
    assert case["network"] in networks
    spk = bytes.fromhex(case["script_pubkey"])
    if kind == "p2pkh":
        assert spk == b"\x76\xa9\x14" + payload + b"\x88\xac"
    elif kind == "p2sh":
        assert spk == b"\xa9\x14" + payload + b"\x87"
    else:
        assert spk[2:] == payload
    if not case["address"].lower().startswith(("bc1", "tb1", "bcrt1")):
        raw = b58check_decode(case["address"])
        assert b58check_encode(raw) == case["address"]


@pytest.mark.parametrize("text", BASE58["invalid"], ids=lambda t: t[:24] or "empty")
def test_invalid_address_strings(text: str) -> None:
    try:
        networks, kind, _ = classify_address(text)
    except DecodeError:
        return
    assert not networks, f"{text!r} accepted as {kind} on {networks}"


# -- BIP-67 and the script template ------------------------------------------------------------


@pytest.mark.parametrize("case", BIP67["vectors"], ids=lambda c: c["name"])
def test_bip67_sorting_script_and_address(case: dict[str, Any]) -> None:
    keys = [bytes.fromhex(k) for k in case["pubkeys"]]
    ordered = sorted(keys)
    assert [k.hex() for k in ordered] == case["sorted"]
    script = build_multisig(case["threshold"], ordered)
    assert script.hex() == case["script"]
    assert b58check_encode(b"\x05" + hash160(script)) == case["address"]
    parsed = parse_multisig(script)
    assert (parsed.m, parsed.n, list(parsed.keys)) == (case["threshold"], len(keys), ordered)


# -- whole derivations: Bitcoin Core's and BIP-383's descriptor vectors ----------------------------

_KEY = re.compile(r"^(?:\[[0-9a-fA-F]{8}[^\]]*\])?(xpub[1-9A-HJ-NP-Za-km-z]+)((?:/[0-9]+)*)(/\*)?$")


def _descriptor_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for v in DESCRIPTORS["vectors"]:
        d = v["descriptor"].split("#")[0]
        m = re.fullmatch(r"(sh\(|wsh\(|sh\(wsh\()?(sortedmulti|multi)\((.*?)\)\)*", d)
        if not m or "xpub" not in d:
            continue
        args = m.group(3).split(",")
        if int(args[0]) > 16 or len(args) - 1 > 16:
            continue
        if not all(_KEY.match(a) for a in args[1:]):
            continue  # hardened steps after the xpub, or a plain hex key
        cases.append((d[:60], v))
    return cases


DESCRIPTOR_CASES = _descriptor_cases()


def test_descriptor_vectors_selected() -> None:
    assert len(DESCRIPTOR_CASES) >= 5


@pytest.mark.parametrize("name,vector", DESCRIPTOR_CASES, ids=[c[0] for c in DESCRIPTOR_CASES])
def test_descriptor_scripts(name: str, vector: dict[str, Any]) -> None:
    d = vector["descriptor"].split("#")[0]
    m = re.fullmatch(r"(sh\(|wsh\(|sh\(wsh\()?(sortedmulti|multi)\((.*?)\)\)*", d)
    assert m is not None
    wrapper, kind, body = m.groups()
    args = body.split(",")
    threshold = int(args[0])
    first = vector["index"] or 0
    for offset, expected in enumerate(vector["script_pubkeys"]):
        keys = []
        for arg in args[1:]:
            km = _KEY.match(arg)
            assert km is not None
            xpub = parse_extended_public_key(km.group(1))
            key, chain_code = xpub.key, xpub.chain_code
            path = [int(s) for s in km.group(2).split("/")[1:]]
            if km.group(3):
                path.append(first + offset)
            for step in path:
                key, chain_code = ckd_pub(key, chain_code, step)
            keys.append(key)
        if kind == "sortedmulti":
            keys.sort()
        script = build_multisig(threshold, keys)
        if wrapper is None:
            spk = script
        elif wrapper == "sh(":
            spk = b"\xa9\x14" + hash160(script) + b"\x87"
        elif wrapper == "wsh(":
            spk = b"\x00\x20" + hashlib.sha256(script).digest()
        else:
            spk = b"\xa9\x14" + hash160(b"\x00\x20" + hashlib.sha256(script).digest()) + b"\x87"
        assert spk.hex() == expected
