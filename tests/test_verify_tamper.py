"""Tampered address sets: each tampering is caught, with its own reason.

The clean sets and every tampered script and address are built by tests/verify_builders.py
(python-bitcoinlib encoders + coincurve), never by custody.verify's own encoders.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from coincurve import PrivateKey, PublicKey
from verify_builders import Wallet, address_for, multisig_script, write_export

from custody.verify import (
    AddressRecord,
    ExportError,
    Manifest,
    Report,
    parse_manifest,
    read_export,
    verify_address,
    verify_export,
    verify_records,
)
from tests.support import force_spilling

Record = dict[str, Any]


def outsider() -> bytes:
    return PrivateKey(os.urandom(32)).public_key.format()


@pytest.fixture(scope="module", params=["p2wsh", "p2sh-p2wsh", "p2sh"])
def wallet(request: pytest.FixtureRequest) -> Wallet:
    return Wallet.random(script_type=request.param)


@pytest.fixture(scope="module")
def p2wsh() -> Wallet:
    return Wallet.random(script_type="p2wsh")


def clean(w: Wallet, n: int = 10) -> list[Record]:
    return [w.record(0, i) for i in range(n)] + [w.record(1, i) for i in range(3)]


def run(tmp_path: Path, w: Wallet, records: list[Record], workers: int = 1) -> Report:
    path = write_export(tmp_path / f"export-{workers}.jsonl", w, records)
    return verify_export(parse_manifest(w.manifest()), path, workers=workers)


@pytest.fixture(params=["in memory", "spilled"])
def keys(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cross-set checks twice: keys in memory, and through the verifier's sorted temporary
    runs (SPILL_AT forced down to 3)."""
    if request.param == "spilled":
        force_spilling(monkeypatch)
    return str(request.param)


def reasons_at(report: Report, chain: int, index: int) -> list[str]:
    return [f.reason for f in report.failures if (f.chain, f.index) == (chain, index)]


# -- the clean set ----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_clean_set_passes(tmp_path: Path, wallet: Wallet, workers: int, keys: str) -> None:
    report = run(tmp_path, wallet, clean(wallet), workers)
    assert report.ok and report.checked == 13 and report.failures == []
    assert report.to_dict() == {
        "ok": True,
        "checked": 13,
        "failed_records": 0,
        "failure_count": 0,
        "omitted": 0,
        "failures": [],
    }


def test_clean_records_without_script_pass(wallet: Wallet) -> None:
    # The CLI builds records from the database, possibly with neither script nor scriptPubKey.
    records = [AddressRecord(r["chain"], r["index"], r["address"]) for r in clean(wallet)]
    assert verify_records(parse_manifest(wallet.manifest()), records, workers=2).ok


# -- tampering, one reason each (all script types) ----------------------------------------------

Tamper = Callable[[Wallet], tuple[Record, list[str]]]


def edited_address(w: Wallet) -> tuple[Record, list[str]]:
    r = w.record(0, 5)
    r["address"] = w.record(0, 50)["address"]  # a real address of the set, elsewhere
    return r, ["address is not the one derived from the founders' keys at 0/5 (expected "]


def outsider_key(w: Wallet) -> tuple[Record, list[str]]:
    keys = w.keys_at(0, 7)
    keys[1] = outsider()
    ordered = sorted(keys)
    position = ordered.index(keys[1]) + 1
    return w.record(0, 7, keys=ordered), [
        f"key {position} is not a founder's child at 0/7 (outsider key)",
        "the script lacks the key of founder founder-b at 0/7",
    ]


def unsorted_keys(w: Wallet) -> tuple[Record, list[str]]:
    keys = sorted(w.keys_at(0, 3), reverse=True)
    return w.record(0, 3, keys=keys), ["keys are not in BIP-67 order (sorted by their bytes)"]


def one_of_three(w: Wallet) -> tuple[Record, list[str]]:
    return w.record(0, 2, m=1), ["script is 1-of-3, manifest says 2-of-3"]


def two_of_two(w: Wallet) -> tuple[Record, list[str]]:
    keys = w.keys_at(0, 2)
    return w.record(0, 2, keys=sorted(keys[:2])), [
        "script is 2-of-2, manifest says 2-of-3",
        "the script lacks the key of founder founder-c at 0/2",
    ]


def three_of_three(w: Wallet) -> tuple[Record, list[str]]:
    return w.record(0, 2, m=3), ["script is 3-of-3, manifest says 2-of-3"]


def repeated_key(w: Wallet) -> tuple[Record, list[str]]:
    k = w.keys_at(0, 4)[0]
    return w.record(0, 4, keys=[k, k, k]), [
        "keys 1, 2 and 3 are the same key",
        "the script lacks the keys of founders founder-b and founder-c at 0/4",
    ]


def wrong_network(w: Wallet) -> tuple[Record, list[str]]:
    r = w.record(0, 1)
    script = bytes.fromhex(r["script"])
    r["address"] = address_for(script, w.script_type, "mainnet")
    return r, ["wrong network: address is for mainnet, manifest says regtest"]


def wrong_script_pubkey(w: Wallet) -> tuple[Record, list[str]]:
    r = w.record(0, 1)
    r["script_pubkey"] = w.record(0, 2)["script_pubkey"]
    return r, ["script_pubkey does not match the address"]


def bytes_around_script(w: Wallet) -> tuple[Record, list[str]]:
    script = multisig_script(2, sorted(w.keys_at(0, 8)))
    return w.record(0, 8, script=b"\x00" + script + b"\x75"), [
        "script has 1 byte before OP_2",
        "script has 1 byte after OP_CHECKMULTISIG",
    ]


def uncompressed_key(w: Wallet) -> tuple[Record, list[str]]:
    keys = sorted(w.keys_at(0, 9))
    full = PublicKey(keys[1]).format(compressed=False)
    return w.record(0, 9, keys=[keys[0], full, keys[2]]), [
        "key 2 is not a compressed public key (65 bytes, prefix 04)",
    ]


TAMPERS: list[Tamper] = [
    edited_address,
    outsider_key,
    unsorted_keys,
    one_of_three,
    two_of_two,
    three_of_three,
    repeated_key,
    wrong_network,
    wrong_script_pubkey,
    bytes_around_script,
    uncompressed_key,
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda t: t.__name__)
def test_tampering_is_caught(tmp_path: Path, wallet: Wallet, tamper: Tamper, workers: int) -> None:
    records = clean(wallet)
    bad, expected = tamper(wallet)
    records = [r for r in records if (r["chain"], r["index"]) != (bad["chain"], bad["index"])]
    records.insert(4, bad)
    report = run(tmp_path, wallet, records, workers)
    assert not report.ok and report.checked == len(records)
    got = reasons_at(report, bad["chain"], bad["index"])
    # Exactly the expected reasons: one per distinct problem, no echoes.
    assert len(got) == len(expected), got
    for want in expected:
        assert any(reason.startswith(want) for reason in got), (want, got)
    assert {(f.chain, f.index) for f in report.failures} == {(bad["chain"], bad["index"])}
    assert all(f.address == bad["address"] for f in report.failures)


def test_tampered_key_caught_even_without_script(wallet: Wallet) -> None:
    # The address alone (what the database may hold) still has to re-derive.
    record, _ = outsider_key(wallet)
    manifest = parse_manifest(wallet.manifest())
    report = verify_records(manifest, [AddressRecord(0, 7, record["address"])])
    assert [f.reason for f in report.failures] == [
        f"address is not the one derived from the founders' keys at 0/7 (expected {wallet.record(0, 7)['address']})"
    ]


# -- address types --------------------------------------------------------------------------------


def test_p2sh_address_where_manifest_says_p2wsh(tmp_path: Path, p2wsh: Wallet) -> None:
    r = p2wsh.record(0, 3)
    r["address"] = address_for(bytes.fromhex(r["script"]), "p2sh", "regtest")
    report = run(tmp_path, p2wsh, [*clean(p2wsh, 3), r])
    assert reasons_at(report, 0, 3) == ["address type p2sh, manifest says p2wsh"]


def test_p2wsh_address_where_manifest_says_p2sh(tmp_path: Path) -> None:
    w = Wallet.random(script_type="p2sh")
    r = w.record(0, 3)
    r["address"] = address_for(bytes.fromhex(r["script"]), "p2wsh", "regtest")
    report = run(tmp_path, w, [*clean(w, 3), r])
    assert "address type p2wsh, manifest says p2sh" in reasons_at(report, 0, 3)


def test_plain_p2sh_address_where_manifest_says_p2sh_p2wsh(tmp_path: Path) -> None:
    w = Wallet.random(script_type="p2sh-p2wsh")
    r = w.record(0, 2)
    r["address"] = address_for(bytes.fromhex(r["script"]), "p2sh", "regtest")
    r.pop("script_pubkey")
    report = run(tmp_path, w, [*clean(w, 2), r])
    assert reasons_at(report, 0, 2) == [
        "address is the p2sh address of the founders' script at 0/2, manifest says p2sh-p2wsh"
    ]


def test_testnet_address_on_regtest(tmp_path: Path, p2wsh: Wallet) -> None:
    r = p2wsh.record(0, 3)
    r["address"] = address_for(bytes.fromhex(r["script"]), "p2wsh", "testnet")
    report = run(tmp_path, p2wsh, [r])
    assert reasons_at(report, 0, 3) == ["wrong network: address is for testnet/signet, manifest says regtest"]


def test_address_with_a_typo(tmp_path: Path, p2wsh: Wallet) -> None:
    r = p2wsh.record(0, 3)
    a = r["address"]
    r["address"] = a[:20] + ("q" if a[20] != "q" else "p") + a[21:]
    report = run(tmp_path, p2wsh, [r])
    assert reasons_at(report, 0, 3) == ["address does not decode: invalid checksum"]


# -- cross-set checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_index_reused(tmp_path: Path, wallet: Wallet, workers: int, keys: str) -> None:
    records = clean(wallet)
    impostor = wallet.record(0, 4, keys=sorted(wallet.keys_at(0, 11)))  # 0/11's script at 0/4
    records.append(impostor)
    report = run(tmp_path, wallet, records, workers)
    first = records[4]["address"]
    got = reasons_at(report, 0, 4)
    assert f"chain/index 0/4 used twice (also by {impostor['address']})" in got
    assert f"chain/index 0/4 used twice (also by {first})" in got
    by_impostor = [f.reason for f in report.failures if f.address == impostor["address"]]
    assert any("not a founder's child at 0/4" in r for r in by_impostor)


@pytest.mark.parametrize("workers", [1, 2])
def test_address_listed_twice(tmp_path: Path, wallet: Wallet, workers: int, keys: str) -> None:
    records = clean(wallet)
    copy = dict(records[3], index=20)  # 0/3's address again, claimed for 0/20
    records.append(copy)
    report = run(tmp_path, wallet, records, workers)
    assert "address listed twice (also at 0/20)" in reasons_at(report, 0, 3)
    assert "address listed twice (also at 0/3)" in reasons_at(report, 0, 20)


def test_exact_duplicate_line(tmp_path: Path, p2wsh: Wallet, keys: str) -> None:
    records = clean(p2wsh, 3)
    records.append(dict(records[1]))
    report = run(tmp_path, p2wsh, records, 2)
    got = reasons_at(report, 0, 1)
    assert got.count("address listed twice (also at 0/1)") == 2
    assert got.count(f"chain/index 0/1 used twice (also by {records[1]['address']})") == 2
    # two lines, two records (as ``checked`` counts them), each failing two checks
    assert report.failed_records == 2 and report.to_dict()["failure_count"] == 4


@pytest.mark.parametrize(
    "chain,index,reason",
    [
        (2, 1, "chain 2 is not 0 (receive) or 1 (change)"),
        (-1, 1, "chain -1 is not 0 (receive) or 1 (change)"),
        (0, 2**31, "index 2147483648 is not in 0..2147483647"),
        (0, -5, "index -5 is not in 0..2147483647"),
    ],
)
def test_chain_and_index_ranges(tmp_path: Path, p2wsh: Wallet, chain: int, index: int, reason: str) -> None:
    r = dict(p2wsh.record(0, 1), chain=chain, index=index)
    report = run(tmp_path, p2wsh, [r])
    assert reasons_at(report, chain, index) == [reason]


# -- broken files (the export tests cover every variant) ---------------------------------------------


def test_truncated_export(tmp_path: Path, p2wsh: Wallet) -> None:
    path = write_export(tmp_path / "e.jsonl", p2wsh, clean(p2wsh), trailer=False)
    with pytest.raises(ExportError, match="truncated"):
        verify_export(parse_manifest(p2wsh.manifest()), path, workers=2)


def test_malformed_export_line(tmp_path: Path, p2wsh: Wallet) -> None:
    path = write_export(tmp_path / "e.jsonl", p2wsh, clean(p2wsh), extra_lines=['{"chain": 0'])
    with pytest.raises(ExportError, match="line 15: not valid JSON"):
        verify_export(parse_manifest(p2wsh.manifest()), path, workers=2)


# -- the API around it -------------------------------------------------------------------------------


def test_bad_records_never_raise(p2wsh: Wallet) -> None:
    manifest = parse_manifest(p2wsh.manifest())
    weird: list[Any] = [
        AddressRecord("0", 1, "x"),  # type: ignore[arg-type]
        AddressRecord(0, None, None),  # type: ignore[arg-type]
        AddressRecord(0, 1, p2wsh.record(0, 1)["address"], script="00"),  # type: ignore[arg-type]
        AddressRecord(0, 1, "bc1qnotanaddress", b"\x52\x00", b"\x00"),
        object(),
    ]
    report = verify_records(manifest, weird, workers=2)
    assert report.checked == 5 and not report.ok
    assert "chain '0' is not 0 (receive) or 1 (change)" in [f.reason for f in report.failures]
    assert any(f.reason == "address is not a string: None" for f in report.failures)
    assert any(f.reason == "script is not bytes" for f in report.failures)
    assert any(f.reason.startswith("address does not decode") for f in report.failures)
    assert any(f.reason.startswith("script is not a multisig script") for f in report.failures)


def test_progress_and_workers(tmp_path: Path, p2wsh: Wallet, monkeypatch: pytest.MonkeyPatch) -> None:
    import custody.verify.parallel as parallel

    monkeypatch.setattr(parallel, "BATCH_BYTES", 2000)
    path = write_export(tmp_path / "e.jsonl", p2wsh, clean(p2wsh, 20))
    seen: list[int] = []
    report = verify_export(parse_manifest(p2wsh.manifest()), path, workers=2, progress=seen.append)
    assert report.ok and seen == sorted(seen) and seen[-1] == 23 and len(seen) > 1
    with pytest.raises(ValueError, match="workers must be at least 1"):
        verify_records(parse_manifest(p2wsh.manifest()), [], workers=0)


def test_empty_export(tmp_path: Path, p2wsh: Wallet) -> None:
    path = write_export(tmp_path / "e.jsonl", p2wsh, [])
    assert verify_export(parse_manifest(p2wsh.manifest()), path).checked == 0


def test_read_export_records_feed_verify_records(tmp_path: Path, wallet: Wallet) -> None:
    path = write_export(tmp_path / "e.jsonl", wallet, clean(wallet))
    _, records = read_export(path)
    assert verify_records(parse_manifest(wallet.manifest()), list(records)).ok


@pytest.fixture(scope="module")
def manifest(wallet: Wallet) -> Manifest:
    return parse_manifest(wallet.manifest())


class TestVerifyAddress:
    """The issuance path: one address, before it is stored."""

    def test_good(self, wallet: Wallet, manifest: Manifest) -> None:
        for chain, index in ((0, 0), (0, 17), (1, 3), (0, 2**31 - 1)):
            assert verify_address(manifest, chain, index, wallet.record(chain, index)["address"]) == []

    def test_wrong_position(self, wallet: Wallet, manifest: Manifest) -> None:
        address = wallet.record(0, 17)["address"]
        assert verify_address(manifest, 0, 18, address) == [
            "address is not the one derived from the founders' keys at 0/18 "
            f"(expected {wallet.record(0, 18)['address']})"
        ]
        assert verify_address(manifest, 1, 17, address)[0].startswith(
            "address is not the one derived from the founders' keys at 1/17"
        )

    def test_garbage(self, manifest: Manifest) -> None:
        assert verify_address(manifest, 0, 1, "")[0].startswith("address does not decode: ")
        assert verify_address(manifest, 5, 1, "x")[0] == "chain 5 is not 0 (receive) or 1 (change)"
