"""The founders' manifest: what the verifier accepts and what it refuses, and why."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from verify_builders import NETS, Wallet, b58check, random_founder, serialize_xpub

from custody.verify import ManifestError, load_manifest, parse_manifest
from custody.verify.bip32 import HARDENED

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BIP32 = json.loads((FIXTURES / "bip32.json").read_text())


def manifest(**changes: Any) -> dict[str, Any]:
    base = Wallet.random(network="regtest").manifest()
    base.update(changes)
    return base


@pytest.mark.parametrize("network", ["mainnet", "testnet", "signet", "regtest"])
@pytest.mark.parametrize("script_type", ["p2wsh", "p2sh-p2wsh", "p2sh"])
def test_valid_manifest(network: str, script_type: str) -> None:
    w = Wallet.random(network=network, script_type=script_type)
    m = parse_manifest(w.manifest())
    assert (m.network, m.threshold, m.script_type, m.n) == (network, 2, script_type, 3)
    assert [f.key.key for f in m.founders] == [f.key for f in w.founders]
    assert [f.key.chain_code for f in m.founders] == [f.chain_code for f in w.founders]
    coin = 0 if network == "mainnet" else 1
    origin = m.founders[0].origin
    assert origin is not None
    assert origin.path == (48 + HARDENED, coin + HARDENED, HARDENED, 2 + HARDENED)


def test_key_origin_with_h_and_without_origin() -> None:
    obj = manifest()
    obj["founders"][0]["xpub"] = obj["founders"][0]["xpub"].replace("'", "h")
    obj["founders"][1]["xpub"] = obj["founders"][1]["xpub"].split("]")[1]
    m = parse_manifest(obj)
    assert m.founders[0].origin is not None and m.founders[0].origin.path[0] == 48 + HARDENED
    assert m.founders[1].origin is None
    assert str(m.founders[0].origin).endswith("/48'/1'/0'/2']")


def test_load_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest()))
    assert load_manifest(path).n == 3
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "missing.json")


def _founders(n: int, network: str = "regtest") -> list[dict[str, str]]:
    return [{"name": f"f{i}", "xpub": random_founder(f"f{i}", network).xpub} for i in range(n)]


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"format": "something-else"}, "not a founders' manifest"),
        ({"version": 2}, "newer than this verifier"),
        ({"version": "1"}, "'version' must be an integer"),
        ({"network": "litecoin"}, "unknown network"),
        ({"threshold": 0}, r"threshold 0 is not in 1\.\.3"),
        ({"threshold": 4}, r"threshold 4 is not in 1\.\.3"),
        ({"threshold": True}, "'threshold' must be an integer"),
        ({"script_type": "p2tr"}, "unknown script_type"),
        ({"founders": []}, "non-empty list"),
        ({"script_type": "p2sh", "founders": _founders(16)}, "p2sh allows at most 15"),
        ({"script_type": "p2wsh", "founders": _founders(21)}, "p2wsh allows at most 20"),
        ({"script_type": "p2sh-p2wsh", "founders": _founders(21)}, "p2sh-p2wsh allows at most 20"),
    ],
)
def test_invalid_manifest_fields(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(manifest(**changes))


def test_limits_are_inclusive() -> None:
    assert parse_manifest(manifest(script_type="p2sh", founders=_founders(15))).n == 15
    assert parse_manifest(manifest(script_type="p2wsh", founders=_founders(20))).n == 20
    assert parse_manifest(manifest(threshold=1)).threshold == 1
    assert parse_manifest(manifest(threshold=3)).threshold == 3


def test_other_network_key_refused() -> None:
    obj = manifest(network="mainnet")  # the founders hold tpubs
    with pytest.raises(ManifestError, match=r"tpub \(test networks\) key, but the manifest's network is mainnet"):
        parse_manifest(obj)
    obj = manifest(network="regtest", founders=_founders(3, "mainnet"))
    with pytest.raises(ManifestError, match="xpub .mainnet. key"):
        parse_manifest(obj)


def test_private_key_refused_without_echoing_it() -> None:
    xprv = BIP32["vectors"][0]["chains"][1]["xprv"]
    obj = manifest(network="mainnet", founders=_founders(2, "mainnet"))
    obj["founders"].append({"name": "careless", "xpub": xprv})
    with pytest.raises(ManifestError, match="private extended key .xprv.") as err:
        parse_manifest(obj)
    assert xprv not in str(err.value) and xprv[4:20] not in str(err.value)
    assert "careless" in str(err.value)
    # and a tprv with the same payload
    raw = bytes.fromhex(NETS["regtest"]["xprv"]) + bytes(74)
    tprv = b58check(raw[:45] + b"\x00" + bytes(range(1, 33)))
    obj = manifest(founders=[*_founders(2), {"name": "t", "xpub": tprv}])
    with pytest.raises(ManifestError, match="private extended key .tprv."):
        parse_manifest(obj)


def test_bad_checksum_refused() -> None:
    obj = manifest()
    xpub = obj["founders"][0]["xpub"]
    last = xpub[-1]
    obj["founders"][0]["xpub"] = xpub[:-1] + ("2" if last != "2" else "3")
    with pytest.raises(ManifestError, match="invalid checksum"):
        parse_manifest(obj)


def test_pubkey_not_on_curve_refused() -> None:
    bad = bytes.fromhex("02" + "00" * 31 + "07")  # BIP-32 vector 5's off-curve key
    xpub = serialize_xpub(NETS["regtest"]["xpub"], 4, b"\1\2\3\4", HARDENED + 2, bytes(32), bad)
    obj = manifest(founders=[*_founders(2), {"name": "off", "xpub": xpub}])
    with pytest.raises(ManifestError, match="not on the curve"):
        parse_manifest(obj)


def test_duplicate_founder_key_refused() -> None:
    obj = manifest()
    obj["founders"][2]["xpub"] = obj["founders"][0]["xpub"].split("]")[1]  # same key, no origin
    with pytest.raises(ManifestError, match="same key as founder 'founder-a'"):
        parse_manifest(obj)


def test_same_pubkey_other_chain_code_is_distinct() -> None:
    # FORMATS.md: keys are compared by (public key, chain code).
    w = Wallet.random()
    f = w.founders[0]
    twin = serialize_xpub(NETS["regtest"]["xpub"], 4, b"\1\2\3\4", HARDENED + 2, bytes(32), f.key)
    obj = w.manifest()
    obj["founders"][2]["xpub"] = twin
    assert parse_manifest(obj).n == 3


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda f: f.update(name="founder-a"), "listed twice"),
        (lambda f: f.update(name=""), "has no name"),
        (lambda f: f.pop("xpub"), "has no xpub"),
        (lambda f: f.update(xpub="[5c9e228/48'/1'/0'/2']" + f["xpub"].split("]")[1]), "malformed key origin"),
        (lambda f: f.update(xpub="[5c9e228d/48x/1]" + f["xpub"].split("]")[1]), "malformed key origin"),
        (lambda f: f.update(xpub="tpubnotakey"), "invalid extended public key"),
    ],
)
def test_invalid_founder_entries(mutate: Any, message: str) -> None:
    obj = copy.deepcopy(manifest())
    mutate(obj["founders"][1])
    with pytest.raises(ManifestError, match=message):
        parse_manifest(obj)


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)
    with pytest.raises(ValueError):
        parse_manifest({"format": "x"})
