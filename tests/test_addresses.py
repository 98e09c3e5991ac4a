"""Multisig scripts and output scripts against BIP-67 (fixtures/bip67.json), BIP-383 and
Bitcoin Core's descriptor tests (fixtures/descriptor_addresses.json) and Core's key_io
vectors (fixtures/base58.json); the policy's AddressDeriver against the same pieces."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from custody.bitcoin.bech32 import decode_segwit, encode_segwit
from custody.bitcoin.descriptors import check_checksum
from custody.bitcoin.keys import (
    HARDENED,
    b58check_decode,
    b58check_encode,
    parse_path,
    parse_xprv,
    parse_xpub,
    split_origin,
)
from custody.bitcoin.network import MAINNET, NETWORKS, REGTEST, Network
from custody.bitcoin.script import ScriptType
from custody.errors import InputError
from custody.policy.generator import AddressDeriver, multisig_script, script_pubkey_for
from custody.policy.model import Policy, make_policy

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BIP67: dict[str, Any] = json.loads((FIXTURES / "bip67.json").read_text())
DESCRIPTORS: dict[str, Any] = json.loads((FIXTURES / "descriptor_addresses.json").read_text())
BASE58: dict[str, Any] = json.loads((FIXTURES / "base58.json").read_text())
BIP32: dict[str, Any] = json.loads((FIXTURES / "bip32.json").read_text())


# ---------------------------------------------------------------- BIP-67


@pytest.mark.parametrize("case", BIP67["vectors"], ids=lambda c: c["name"])
def test_bip67_sorting(case: dict[str, Any]) -> None:
    keys = [bytes.fromhex(k) for k in case["pubkeys"]]
    assert [k.hex() for k in sorted(keys)] == case["sorted"]


@pytest.mark.parametrize("case", BIP67["vectors"], ids=lambda c: c["name"])
def test_bip67_script(case: dict[str, Any]) -> None:
    keys = [bytes.fromhex(k) for k in case["sorted"]]
    assert multisig_script(case["threshold"], keys).hex() == case["script"]


@pytest.mark.parametrize("case", BIP67["vectors"], ids=lambda c: c["name"])
def test_bip67_p2sh_address(case: dict[str, Any]) -> None:
    script = bytes.fromhex(case["script"])
    spk = script_pubkey_for(ScriptType.P2SH, script)
    # OP_HASH160 <20 bytes> OP_EQUAL
    assert spk[:2] == bytes.fromhex("a914") and spk[22:] == bytes.fromhex("87") and len(spk) == 23
    assert b58check_encode(bytes([MAINNET.p2sh_version]) + spk[2:22]) == case["address"]
    assert b58check_decode(case["address"]) == bytes([0x05]) + spk[2:22]


# ---------------------------------------------------------------- network address parameters


def _base58_cases(kind: str) -> list[dict[str, str]]:
    return [c for c in BASE58["valid"] if c["type"] == kind]


@pytest.mark.parametrize("case", _base58_cases("p2sh"), ids=lambda c: c["address"])
def test_p2sh_version_of_each_network(case: dict[str, str]) -> None:
    spk = bytes.fromhex(case["script_pubkey"])
    network = NETWORKS[case["network"]]
    assert b58check_encode(bytes([network.p2sh_version]) + spk[2:22]) == case["address"]


@pytest.mark.parametrize("case", _base58_cases("p2wsh"), ids=lambda c: c["address"])
def test_bech32_prefix_of_each_network(case: dict[str, str]) -> None:
    spk = bytes.fromhex(case["script_pubkey"])
    network = NETWORKS[case["network"]]
    assert encode_segwit(network.bech32_hrp, 0, spk[2:]) == case["address"].lower()


def test_network_parameter_cases_cover_every_network_but_signet() -> None:
    networks = {c["network"] for c in _base58_cases("p2sh")} & {c["network"] for c in _base58_cases("p2wsh")}
    assert networks == {"mainnet", "testnet", "regtest"}


# ---------------------------------------------------------------- descriptors, parsed in the test
#
# A deliberately small reader for the multisig descriptors of the fixture: an optional
# sh( / wsh( / sh(wsh( wrapper around multi( or sortedmulti(, a threshold, and key
# expressions that are hex public keys or [origin]xpub/xprv with a derivation suffix
# ending in an optional /* (or /*' on private keys). Keys are derived with custody.bitcoin.keys,
# whose derivation is checked against BIP-32's vectors in test_keys.py.

_DESCRIPTOR_RE = re.compile(
    r"^(?P<wrap>sh\(wsh\(|wsh\(|sh\(|)(?P<kind>sortedmulti|multi)\((?P<args>[^()]*)\)(?P<close>\)*)$"
)
_KEY_RE = re.compile(
    r"^(?P<key>[0-9a-f]{66}|04[0-9a-f]{128}|xpub[1-9A-HJ-NP-Za-km-z]+|xprv[1-9A-HJ-NP-Za-km-z]+)"
    r"(?P<path>(?:/[0-9]+['h]?)*)(?P<range>/\*['h]?)?$"
)
_WRAPPERS = {
    "": None,  # bare: the output script is the multisig script itself
    "sh(": ScriptType.P2SH,
    "wsh(": ScriptType.P2WSH,
    "sh(wsh(": ScriptType.P2SH_P2WSH,
}


@dataclass(frozen=True)
class Key:
    origin: str | None
    text: str
    path: tuple[int, ...]
    ranged: str | None  # None, "*" or "*'"

    def public_key(self, index: int) -> bytes:
        if len(self.text) in (66, 130):
            return bytes.fromhex(self.text)
        steps = self.path
        if self.ranged is not None:
            steps += (index + (HARDENED if self.ranged != "*" else 0),)
        if self.text.startswith("xprv"):
            return parse_xprv(self.text, MAINNET).derive(steps).neuter().public_key
        return parse_xpub(self.text, MAINNET).derive(steps).public_key


@dataclass(frozen=True)
class Descriptor:
    script_type: ScriptType | None
    kind: str
    threshold: int
    keys: tuple[Key, ...]

    def script(self, index: int) -> bytes:
        keys = [k.public_key(index) for k in self.keys]
        if self.kind == "sortedmulti":
            keys.sort()
        return multisig_script(self.threshold, keys)

    def script_pubkey(self, index: int) -> bytes:
        script = self.script(index)
        return script if self.script_type is None else script_pubkey_for(self.script_type, script)


def parse_descriptor(text: str) -> Descriptor | None:
    """The descriptor, or None when it is outside what this reader handles."""
    if "#" in text:
        text = check_checksum(text)
    m = _DESCRIPTOR_RE.match(text)
    if not m or m.group("close") != ")" * m.group("wrap").count("("):
        return None
    threshold, *expressions = m.group("args").split(",")
    keys = []
    for expression in expressions:
        origin, rest = split_origin(expression)
        k = _KEY_RE.match(rest)
        if not k:
            return None  # WIF keys, multipath <a;b>, anything else
        path = parse_path(k.group("path"))
        ranged = k.group("range")
        hardened = any(s >= HARDENED for s in path) or (ranged is not None and ranged != "/*")
        if hardened and not k.group("key").startswith("xprv"):
            return None  # hardened steps below an xpub: needs the private form
        keys.append(Key(str(origin) if origin else None, k.group("key"), path, ranged and ranged[1:]))
    return Descriptor(_WRAPPERS[m.group("wrap")], m.group("kind"), int(threshold), tuple(keys))


def _descriptor_cases() -> list[tuple[str, str, dict[str, Any], Descriptor]]:
    cases = []
    for n, vector in enumerate(DESCRIPTORS["vectors"]):
        for form in ("descriptor", "descriptor_private"):
            text = vector.get(form)
            if text is None:
                continue
            parsed = parse_descriptor(text)
            if parsed is not None:
                cases.append((f"{n}:{form}:{text[:30]}", text, vector, parsed))
    return cases


DESCRIPTOR_CASES = _descriptor_cases()


def test_the_descriptor_reader_handles_most_vectors() -> None:
    vectors_handled = {case[2]["descriptor"] for case in DESCRIPTOR_CASES}
    assert len(vectors_handled) >= 17  # all of them, in the public or private form
    assert len(DESCRIPTOR_CASES) >= 24
    kinds = {(c[3].script_type, c[3].kind) for c in DESCRIPTOR_CASES}
    assert (ScriptType.P2SH, "multi") in kinds
    assert (ScriptType.P2WSH, "multi") in kinds
    assert (ScriptType.P2SH_P2WSH, "multi") in kinds
    assert (None, "sortedmulti") in kinds


@pytest.mark.parametrize(("name", "text", "vector", "parsed"), DESCRIPTOR_CASES, ids=[c[0] for c in DESCRIPTOR_CASES])
def test_descriptor_script_pubkeys(name: str, text: str, vector: dict[str, Any], parsed: Descriptor) -> None:
    expected_type = {"bare": None, **{t.value: t for t in ScriptType}}[vector["script_type"]]
    assert parsed.script_type is expected_type
    if vector["ranged"]:
        first = vector["index"]
        got = [parsed.script_pubkey(first + i).hex() for i in range(len(vector["script_pubkeys"]))]
        assert got == vector["script_pubkeys"]
    else:
        for index in (0, 1, 2):  # Core evaluates fixed descriptors at 0, 1, 2: same script
            assert parsed.script_pubkey(index).hex() == vector["script_pubkeys"][0]


def test_the_reader_refuses_what_it_cannot_derive() -> None:
    # a guard for the reader itself: a hardened step below an xpub is not derivable publicly
    wsh = next(v for v in DESCRIPTORS["vectors"] if v.get("requires_private_keys"))
    assert parse_descriptor(wsh["descriptor"]) is None
    assert parse_descriptor("tr(" + wsh["descriptor"] + ")") is None


# ---------------------------------------------------------------- the policy's addresses
#
# No vector in descriptor_addresses.json is a sortedmulti whose every key ends in /0/* (or
# /1/*): the one ranged sortedmulti has xpub/* and xpub/0/0/* and is bare. So the policy's
# addresses are checked against this file's descriptor reader, itself checked above against
# Core's scripts, reading the policy's own descriptor; the derivation paths differ (ParentKey
# in AddressDeriver, ExtendedPublicKey.derive in the reader).

_V = BIP32["vectors"]


def _founders(network: Network) -> list[tuple[str, str]]:
    """Three founders with BIP-32 vector keys and origins that match their depths."""
    picks = [(_V[0], "m/0H"), (_V[2], "m/0H"), (_V[3], "m/0H/1H")]
    founders = []
    for n, (vector, path) in enumerate(picks):
        chain = next(c for c in vector["chains"] if c["path"] == path)
        master = parse_xpub(vector["chains"][0]["xpub"], MAINNET)
        xpub = dataclasses.replace(parse_xpub(chain["xpub"], MAINNET), network=network)
        steps = "/".join(s.replace("H", "'") for s in path.split("/")[1:])
        founders.append((f"founder-{n}", f"[{master.fingerprint.hex()}/{steps}]{xpub}"))
    return founders


POLICY_CASES = [
    (network, script_type, chain) for network in (MAINNET, REGTEST) for script_type in ScriptType for chain in (0, 1)
]


@pytest.mark.parametrize(
    ("network", "script_type", "chain"),
    POLICY_CASES,
    ids=[f"{n.name}-{t.value}-{c}" for n, t, c in POLICY_CASES],
)
def test_policy_addresses_agree_with_the_policy_descriptor(
    network: Network, script_type: ScriptType, chain: int
) -> None:
    founders = _founders(network)
    policy = make_policy(network, 2, script_type, founders)
    descriptor = policy.descriptor(chain)
    body = check_checksum(descriptor)

    # shape: wrapper(sortedmulti(2,[origin]xpub/chain/*,...)), keys in the founders' order
    expected_body = script_type.wrap("sortedmulti(2," + ",".join(f"{text}/{chain}/*" for _, text in founders) + ")")
    assert body == expected_body
    # the reader knows mainnet keys only; scripts do not depend on the network, so it reads
    # the descriptor of the same policy over the same keys on mainnet
    twin = policy if network is MAINNET else make_policy(MAINNET, 2, script_type, _founders(MAINNET))
    parsed = parse_descriptor(check_checksum(twin.descriptor(chain)))
    assert parsed is not None
    assert parsed.script_type is script_type and parsed.kind == "sortedmulti"
    assert parsed.threshold == 2
    assert [k.origin for k in parsed.keys] == [t[: t.index("]") + 1] for _, t in founders]
    assert all(k.path == (chain,) and k.ranged == "*" for k in parsed.keys)

    deriver = AddressDeriver(policy)
    for index in (0, 1, 2, 1000, HARDENED - 1):
        got = deriver.derive(chain, index)
        assert (got.chain, got.index) == (chain, index)
        assert got.script == parsed.script(index)
        assert got.script_pubkey == parsed.script_pubkey(index)
        assert list(got.keys) == sorted(got.keys)
        _check_address(got.address, got.script_pubkey, script_type, network)


def _check_address(address: str, script_pubkey: bytes, script_type: ScriptType, network: Network) -> None:
    if script_type is ScriptType.P2WSH:
        assert address.startswith(network.bech32_hrp + "1")
        assert decode_segwit(network.bech32_hrp, address) == (0, script_pubkey[2:])
    else:
        assert b58check_decode(address) == bytes([network.p2sh_version]) + script_pubkey[2:22]
        assert address[0] == ("3" if network is MAINNET else "2")


def test_receive_and_change_differ() -> None:
    policy = make_policy(MAINNET, 2, ScriptType.P2WSH, _founders(MAINNET))
    deriver = AddressDeriver(policy)
    assert deriver.derive(0, 0).address != deriver.derive(1, 0).address
    assert deriver.derive(0, 0).address != deriver.derive(0, 1).address


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda d: d.derive(2, 0), "chain"),
        (lambda d: d.derive(-1, 0), "chain"),
        (lambda d: d.derive(0, -1), "out of range"),
        (lambda d: d.derive(0, HARDENED), "out of range"),
    ],
    ids=["chain-2", "chain-minus-1", "index-minus-1", "index-hardened"],
)
def test_derive_refuses_bad_chain_or_index(call: Callable[[AddressDeriver], object], match: str) -> None:
    deriver = AddressDeriver(make_policy(MAINNET, 1, ScriptType.P2WSH, _founders(MAINNET)[:1]))
    with pytest.raises(InputError, match=match):
        call(deriver)


def test_descriptor_refuses_a_bad_chain() -> None:
    policy: Policy = make_policy(MAINNET, 1, ScriptType.P2WSH, _founders(MAINNET)[:1])
    with pytest.raises(InputError, match="chain"):
        policy.descriptor(2)
