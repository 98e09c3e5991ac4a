"""Reading the address export: streaming, and refusing truncated or malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from verify_builders import Wallet, write_export

import custody.verify.parallel as parallel
from custody.verify import (
    AddressRecord,
    ExportError,
    check_header,
    parse_manifest,
    read_export,
    verify_export,
    verify_records,
)


@pytest.fixture(scope="module")
def wallet() -> Wallet:
    return Wallet.random()


@pytest.fixture(scope="module")
def records(wallet: Wallet) -> list[dict[str, object]]:
    return [wallet.record(0, i) for i in range(12)] + [wallet.record(1, i) for i in range(3)]


@pytest.fixture(autouse=True)
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several batches even for a small file, so batch boundaries are exercised.
    monkeypatch.setattr(parallel, "BATCH_BYTES", 1500)
    monkeypatch.setattr(parallel, "BATCH_RECORDS", 4)


def test_read_export_streams_records(tmp_path: Path, wallet: Wallet, records: list) -> None:
    header, it = read_export(write_export(tmp_path / "e.jsonl", wallet, records))
    assert (header.network, header.threshold, header.script_type) == ("regtest", 2, "p2wsh")
    got = list(it)
    assert len(got) == 15 and isinstance(got[0], AddressRecord)
    assert got[0] == AddressRecord(
        0,
        0,
        records[0]["address"],  # type: ignore[arg-type]
        bytes.fromhex(records[0]["script"]),  # type: ignore[arg-type]
        bytes.fromhex(records[0]["script_pubkey"]),  # type: ignore[arg-type]
        "alice",
    )


def _read_all(path: Path, how: str, wallet: Wallet) -> None:
    if how == "iterator":
        list(read_export(path)[1])
    else:
        verify_export(parse_manifest(wallet.manifest()), path, workers=int(how[-1]))


HOW = ["iterator", "workers=1", "workers=2"]


@pytest.mark.parametrize("how", HOW)
def test_truncated_export_refused(tmp_path: Path, wallet: Wallet, records: list, how: str) -> None:
    path = write_export(tmp_path / "e.jsonl", wallet, records, trailer=False)
    with pytest.raises(ExportError, match=r"line 16: the file ends without its trailer \(truncated"):
        _read_all(path, how, wallet)


@pytest.mark.parametrize("how", HOW)
def test_cut_mid_line_refused(tmp_path: Path, wallet: Wallet, records: list, how: str) -> None:
    path = write_export(tmp_path / "e.jsonl", wallet, records)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ExportError, match=r"line \d+: not valid JSON"):
        _read_all(path, how, wallet)


@pytest.mark.parametrize("how", HOW)
def test_count_mismatch_refused(tmp_path: Path, wallet: Wallet, records: list, how: str) -> None:
    path = write_export(tmp_path / "e.jsonl", wallet, records, count=16)
    with pytest.raises(ExportError, match="line 17: the trailer says 16 addresses, the file has 15"):
        _read_all(path, how, wallet)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    "line,message",
    [
        ('{"chain": 0, "index": 1, "address": ', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ("", "empty line"),
        ('{"chain": "0", "index": 1, "address": "x"}', "'chain' must be an integer"),
        ('{"chain": 0, "index": 1.5, "address": "x"}', "'index' must be an integer"),
        ('{"chain": 0, "index": 1}', "'address' must be a string"),
        ('{"chain": 0, "index": 1, "address": "x", "script": "zz"}', "'script' is not valid hex"),
        ('{"chain": 0, "index": 1, "address": "x", "script_pubkey": 5}', "'script_pubkey' must be a hex string"),
        ('{"chain": 0, "index": 1, "address": "x", "account": 7}', "'account' must be a string"),
        ('{"end": "yes", "count": 1}', "malformed trailer"),
    ],
)
def test_malformed_line_refused_with_its_number(
    tmp_path: Path, wallet: Wallet, records: list, how: str, line: str, message: str
) -> None:
    path = write_export(tmp_path / "e.jsonl", wallet, records)
    lines = path.read_text().split("\n")
    lines.insert(8, line)  # becomes line 9 of the file
    path.write_text("\n".join(lines))
    with pytest.raises(ExportError, match=f"line 9: {message}"):
        _read_all(path, how, wallet)


@pytest.mark.parametrize("how", HOW)
def test_data_after_trailer_refused(tmp_path: Path, wallet: Wallet, records: list, how: str) -> None:
    path = write_export(tmp_path / "e.jsonl", wallet, records)
    path.write_text(path.read_text() + json.dumps(records[0]) + "\n")
    with pytest.raises(ExportError, match="line 18: data after the trailer"):
        _read_all(path, how, wallet)


@pytest.mark.parametrize("how", HOW)
def test_no_final_newline_and_blank_lines_after_trailer_are_fine(
    tmp_path: Path, wallet: Wallet, records: list, how: str
) -> None:
    path = write_export(tmp_path / "e.jsonl", wallet, records)
    path.write_text(path.read_text().rstrip("\n"))
    _read_all(path, how, wallet)
    path.write_text(path.read_text() + "\n\n  \n")
    _read_all(path, how, wallet)


@pytest.mark.parametrize(
    "header,message",
    [
        ("", "the file is empty"),
        ("not json", "header is not valid JSON"),
        ('{"format": "custody-founders-manifest", "version": 1}', "not an address export"),
        ('{"format": "custody-address-export", "version": 2}', "newer than this verifier"),
        ('{"format": "custody-address-export", "version": 1, "network": "x"}', "unknown network"),
    ],
)
def test_bad_header_refused(tmp_path: Path, header: str, message: str) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text(header + ("\n" if header else ""))
    with pytest.raises(ExportError, match=f"line 1: .*{message}"):
        read_export(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot read export"):
        read_export(tmp_path / "nope.jsonl")


def test_header_must_match_manifest(tmp_path: Path, wallet: Wallet, records: list) -> None:
    other = Wallet(network="testnet", threshold=3, script_type="p2sh", founders=wallet.founders)
    path = write_export(tmp_path / "e.jsonl", other, records)
    header, _ = read_export(path)
    manifest = parse_manifest(wallet.manifest())
    message = (
        "network is testnet, manifest says regtest; threshold is 3, manifest says 2; "
        "script_type is p2sh, manifest says p2wsh"
    )
    with pytest.raises(ExportError, match=message):
        check_header(manifest, header)
    with pytest.raises(ExportError, match="does not match the manifest"):
        verify_export(manifest, path)


def test_partly_consumed_iterator_is_finished_by_verify_records(tmp_path: Path, wallet: Wallet, records: list) -> None:
    path = write_export(tmp_path / "e.jsonl", wallet, records)
    _, it = read_export(path)
    next(it)
    report = verify_records(parse_manifest(wallet.manifest()), it, workers=2)
    assert report.ok and report.checked == 14
