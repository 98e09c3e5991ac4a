"""The verifier's memory does not grow with the failures: an insider who rewrote every row gets
exact counts, the first LISTED failures in record order, and how many were left unlisted.

Every export is built by tests/verify_builders.py (python-bitcoinlib encoders + coincurve), never
by custody.verify's own encoders; the expected counts follow from how the export was tampered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from verify_builders import Wallet, write_export

from custody.verify import parse_manifest, verify_export
from custody.verify.core import LISTED
from tests.support import Custody, force_spilling, founders

EXTRA = 200  # records beyond the bound


@pytest.fixture(scope="module")
def wallet() -> Wallet:
    return Wallet.random(script_type="p2wsh")


@pytest.fixture(params=["in memory", "spilled"])
def keys(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test below twice: the cross-set checks' keys in memory, and beyond SPILL_AT (forced
    down to 3) through the verifier's sorted temporary runs, merged over several levels."""
    if request.param == "spilled":
        force_spilling(monkeypatch)
    return str(request.param)


@pytest.fixture(scope="module")
def honest(wallet: Wallet) -> list[dict[str, Any]]:
    return [wallet.record(0, i) for i in range(LISTED + EXTRA + 1)]


def shifted(honest: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Records 0/0..0/n-1, each carrying the next index's (real, founders') address: every row
    rewritten, each wrong exactly once (its script and script_pubkey are still honest)."""
    return [dict(honest[i], address=honest[i + 1]["address"]) for i in range(n)]


def test_more_failures_than_the_bound_are_counted_exactly(
    tmp_path: Path, wallet: Wallet, honest: list, keys: str
) -> None:
    n = LISTED + EXTRA
    records = shifted(honest, n)
    report = verify_export(parse_manifest(wallet.manifest()), write_export(tmp_path / "e.jsonl", wallet, records))
    assert not report.ok and report.checked == n
    assert (report.failure_count, report.failed_records, report.omitted) == (n, n, EXTRA)
    assert [(f.chain, f.index, f.address) for f in report.failures] == [
        (0, i, records[i]["address"]) for i in range(LISTED)
    ]
    assert all(f"(expected {honest[f.index]['address']})" in f.reason for f in report.failures)
    data = report.to_dict()
    assert (data["failure_count"], data["omitted"], len(data["failures"])) == (n, EXTRA, LISTED)


def test_a_record_failing_several_checks_is_one_record(tmp_path: Path, wallet: Wallet, honest: list, keys: str) -> None:
    """Record 1 is wrong, listed twice (its address and its chain/index each used twice): six
    failures, two records; the cross-set failures of records 1 and 2 come before record 3's
    own, so they are listed and a late per-record failure is what is left out."""
    n = LISTED + EXTRA
    records = shifted(honest, n)
    records.insert(2, dict(records[1]))
    report = verify_export(parse_manifest(wallet.manifest()), write_export(tmp_path / "e.jsonl", wallet, records))
    assert report.checked == n + 1
    assert (report.failure_count, report.failed_records) == (n + 1 + 4, n + 1)
    assert report.omitted == n + 5 - LISTED
    at_1 = [f.reason for f in report.failures[1:7]]
    assert [f.index for f in report.failures[:8]] == [0, 1, 1, 1, 1, 1, 1, 2]
    assert sum(r == "address listed twice (also at 0/1)" for r in at_1) == 2
    assert sum(r.startswith("chain/index 0/1 used twice") for r in at_1) == 2
    assert report.failures[-1].index == LISTED - 6  # 0/0, 0/1 and its copy listed with 7 failures


def test_a_duplicate_beyond_the_bound_is_counted_not_listed(
    tmp_path: Path, wallet: Wallet, honest: list, keys: str
) -> None:
    """The same honest change address at the end, twice: two records, two address and two
    position failures, none of them among the first LISTED."""
    n = LISTED + EXTRA
    records = shifted(honest, n) + [wallet.record(1, 0)] * 2
    report = verify_export(parse_manifest(wallet.manifest()), write_export(tmp_path / "e.jsonl", wallet, records))
    assert (report.failure_count, report.failed_records, report.omitted) == (n + 4, n + 2, EXTRA + 4)
    assert [(f.chain, f.index) for f in report.failures] == [(0, i) for i in range(LISTED)]


def test_one_address_everywhere_names_a_few_others(tmp_path: Path, wallet: Wallet, honest: list, keys: str) -> None:
    """A million rows of one address must not each name the million others."""
    n = LISTED + EXTRA
    records = [dict(honest[i], address=honest[0]["address"]) for i in range(n)]
    report = verify_export(parse_manifest(wallet.manifest()), write_export(tmp_path / "e.jsonl", wallet, records))
    # record 0 is honest but listed n times; every other one is also wrong at its position
    assert (report.failure_count, report.failed_records) == (2 * n - 1, n)
    assert report.failures[0].reason == f"address listed {n} times (also at 0/1, 0/2, 0/3, 0/4, 0/5 and {n - 6} more)"
    assert [f.index for f in report.failures[:5]] == [0, 1, 1, 2, 2]


def test_the_cli_says_how_many_were_omitted_and_halts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: str
) -> None:
    monkeypatch.setattr("custody.verify.core.LISTED", 10)
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "alice", "--count", "30").exit_code == 0
    out = c.home / "export.jsonl"
    assert c("address", "export", str(out)).exit_code == 0
    lines = out.read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:-1]]
    addresses = [row["address"] for row in rows]
    for row, address in zip(rows, addresses[1:] + addresses[:1], strict=True):  # every address rotated by one
        row["address"] = address
    out.write_text("\n".join([lines[0], *map(json.dumps, rows), lines[-1]]) + "\n")
    manifest = str(c.home / "founders-manifest.json")

    result = c("verify", "addresses", "--manifest", manifest, "--export", str(out), "--no-halt", "--json")
    assert result.exit_code == 3
    data = json.loads(result.stdout)
    assert (data["checked"], data["failed_records"], data["failure_count"], data["omitted"]) == (30, 30, 30, 20)
    assert [f["index"] for f in data["failures"]] == list(range(10))

    result = c("verify", "addresses", "--manifest", manifest, "--export", str(out))
    assert result.exit_code == 3
    assert result.stdout.count("FAIL ") == 10 and "and 20 more failures not listed" in result.stdout
    assert "30 verification failures in 30 addresses of 30 addresses checked" in result.stderr
    status = c("halt", "status", "--json")
    assert status.exit_code == 3 and "30 problem(s) in 30 record(s)" in json.loads(status.stdout)["halts"][0]["reason"]


def test_log_accounts_answer_from_the_log_not_the_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whose an index is, as the issuances were made (alice 3, bob 2, alice 1, change to bob),
    read in chunks of two and sorted through temporary runs; a row given to another account by
    SQL changes no answer; an issuance entry edited by SQL owns nothing (and is named)."""
    from custody.issuance import record
    from custody.store.db import Database

    monkeypatch.setattr(record, "ISSUED_CHUNK", 2)
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    for account, count in (("alice", 3), ("bob", 2), ("alice", 1)):
        assert c("address", "new", "--account", account, "--count", str(count)).exit_code == 0
    db = Database(c.env["CUSTODY_DB_URL"])
    try:
        with db.transaction() as s:
            s.connection().exec_driver_sql("UPDATE address SET account = 'mallory' WHERE chain = 0 AND idx = 0")
        for block in (None, 1, 2):  # the issuances in one block of the temporary file, or across several
            with db.transaction(read_only=True) as s:
                accounts = record.LogAccounts(s, 0, block)
            answers = [accounts.account_of(i) for i in range(-1, 7)]
            assert answers == [None, *["alice"] * 3, "bob", "bob", "alice", None], block
            assert accounts.problems == []
            accounts.close()
        with db.transaction() as s:
            s.connection().exec_driver_sql(
                "UPDATE audit_log SET payload = replace(payload, '\"bob\"', '\"mallory\"') "
                "WHERE event = 'address.issued'"
            )
        with db.transaction(read_only=True) as s:
            accounts = record.LogAccounts(s, 0)
        assert [accounts.account_of(i) for i in range(6)] == [*["alice"] * 3, None, None, "alice"]
        assert [p.reason.endswith("(address.issued) was edited") for p in accounts.problems] == [True]
        accounts.close()
    finally:
        db.dispose()


def test_log_accounts_file_rewritten_gives_no_answer(tmp_path: Path) -> None:
    """The insider (the same user, through /proc/PID/fd) rewrites bob's issuance to eve's in the
    issuances' temporary file a sync reads its owners from: without the blocks' keyed tags eve's
    account would be credited with bob's deposit; with them there is no answer (StorageError)."""
    import os
    import stat

    from custody.errors import StorageError
    from custody.issuance import record
    from custody.store.db import Database

    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    for account, count in (("alice", 2), ("bob", 2)):
        assert c("address", "new", "--account", account, "--count", str(count)).exit_code == 0
    db = Database(c.env["CUSTODY_DB_URL"])
    try:
        with db.transaction(read_only=True) as s:
            accounts = record.LogAccounts(s, 0, 1)
        rewritten = 0
        for fd in os.listdir("/proc/self/fd"):
            path = f"/proc/self/fd/{fd}"
            try:
                if not (stat.S_ISREG(os.stat(path).st_mode) and os.readlink(path).endswith("(deleted)")):
                    continue
                handle = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                data = os.pread(handle, 1 << 20, 0)
                if b"bob" in data:
                    os.pwrite(handle, data.replace(b"bob", b"eve"), 0)
                    rewritten += 1
            finally:
                os.close(handle)
        assert rewritten == 1
        assert accounts.account_of(0) == "alice"  # its block is intact
        with pytest.raises(StorageError, match="changed while it was in use"):
            accounts.account_of(2)
        accounts.close()
    finally:
        db.dispose()
