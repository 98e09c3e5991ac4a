"""The verifier's duplicate checks beyond SPILL_AT records: sorted runs in temporary files.

An insider who lists an address twice or uses a chain/index twice, in the store (by SQL) or in
an export, is caught when the keys go through the temporary files exactly as when they are in
memory, and the duplicate still halts trading. A run that cannot be written (no such
directory, a file where the directory should be, a disk that refuses to grow a file) or that
comes back changed gives no answer: exit 9, never a pass. Every export is built by
tests/verify_builders.py (python-bitcoinlib encoders + coincurve), never by custody.verify's.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from verify_builders import Wallet, write_export

from custody.verify import SpillError, parse_manifest, verify_export
from custody.verify import spill as spill_module
from custody.verify.spill import Runs
from tests.support import Custody, force_spilling, founders

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wallet() -> Wallet:
    return Wallet.random(script_type="p2wsh")


def records_with_duplicates(w: Wallet) -> list[dict[str, Any]]:
    """0/0..0/11 honest; then 0/3's address again claimed for 0/20, and 0/7's line twice."""
    records = [w.record(0, i) for i in range(12)]
    records.append(dict(records[3], index=20))
    records.append(dict(records[7]))
    return records


def reasons(report: Any) -> list[tuple[int, int, str]]:
    return [(f.chain, f.index, f.reason) for f in report.failures]


def check_duplicates_found(report: Any, records: list[dict[str, Any]]) -> None:
    """What the duplicates above must cause, whichever path found them."""
    got = reasons(report)
    assert (0, 3, "address listed twice (also at 0/20)") in got
    assert (0, 20, "address listed twice (also at 0/3)") in got
    assert got.count((0, 7, "address listed twice (also at 0/7)")) == 2
    assert got.count((0, 7, f"chain/index 0/7 used twice (also by {records[7]['address']})")) == 2
    # six cross-set failures; 0/20 also fails its own checks (0/3's address and script are not
    # 0/20's); four records in all
    own = [r for c, i, r in got if (c, i) == (0, 20) and "listed twice" not in r]
    assert own and all("0/20" in r for r in own)
    assert (report.checked, report.failure_count, report.failed_records) == (14, 6 + len(own), 4)


# -- the sorter -------------------------------------------------------------------------------------


def test_runs_give_every_item_back_in_order_through_levels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Items of every length (empty, one byte, longer than a block) with many repeats, in runs of
    7 merged three at a time: level upon level of merged runs; Python's own sort is the oracle."""
    monkeypatch.setattr(spill_module, "FAN_IN", 3)
    monkeypatch.setattr(spill_module, "BLOCK_BYTES", 64)
    rng = random.Random(7)
    items = [rng.randbytes(rng.choice([0, 1, 2, 9, 100])) for _ in range(400)]
    items += items[:50] + [b"\x00" * 200] * 3
    runs = Runs(7, str(tmp_path))
    for item in items:
        runs.add(item)
    assert runs.written > 70 and len(runs.levels) >= 4  # 65 runs of 7 and their merges, 3 a level
    assert list(runs.sorted()) == sorted(items)


# -- duplicates, found through the runs ---------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_duplicates_in_an_export_are_found_through_the_runs(tmp_path: Path, wallet: Wallet, workers: int) -> None:
    """The same export verified in memory and with its keys spilled after every 2 records: the
    same duplicates each time. The spilled run cannot have fallen back to memory: given nowhere
    to write, the same run fails."""
    records = records_with_duplicates(wallet)
    path = write_export(tmp_path / "e.jsonl", wallet, records)
    manifest = parse_manifest(wallet.manifest())
    check_duplicates_found(verify_export(manifest, path, workers=workers), records)
    (tmp_path / "spill").mkdir()
    spilled = verify_export(manifest, path, workers=workers, spill_at=2, spill_dir=str(tmp_path / "spill"))
    check_duplicates_found(spilled, records)
    with pytest.raises(SpillError, match="cannot write the verifier's temporary files"):
        verify_export(manifest, path, workers=workers, spill_at=2, spill_dir=str(path))


def test_no_duplicate_no_failure_when_spilled(tmp_path: Path, wallet: Wallet) -> None:
    """Spilling invents nothing: an honest export passes with its keys in a hundred runs."""
    path = write_export(tmp_path / "e.jsonl", wallet, [wallet.record(c, i) for c in (0, 1) for i in range(100)])
    report = verify_export(parse_manifest(wallet.manifest()), path, spill_at=2, spill_dir=str(tmp_path))
    assert report.ok and report.checked == 200


def _export_with_a_duplicate_line(c: Custody) -> Path:
    out = c.home / "export.jsonl"
    assert c("address", "export", str(out)).exit_code == 0
    lines = out.read_text().splitlines()
    body = lines[1:-1]
    body.insert(5, body[2])  # 0/2's line twice
    trailer = json.dumps({"end": True, "count": len(body)})
    out.write_text("\n".join([lines[0], *body, trailer]) + "\n")
    return out


def _store_with_duplicate_rows(c: Custody) -> None:
    """As the insider: the address table rebuilt without its unique constraints (SQLite keeps
    them otherwise) but the one on (chain, idx), which the store's reads page by (a store
    without it is refused before any row is read: tests/test_attack_paged_duplicates.py), then
    0/4's address given to a new row 0/9."""
    db = sqlite3.connect(c.home / "custody.db")
    with db:
        db.executescript(
            "CREATE TABLE address_copy (id INTEGER PRIMARY KEY, chain INTEGER NOT NULL, idx BIGINT NOT NULL,"
            " account, address, script_pubkey, script, created_at);"
            "INSERT INTO address_copy SELECT * FROM address;"
            "DROP TABLE address;"
            "ALTER TABLE address_copy RENAME TO address;"
            "CREATE UNIQUE INDEX uq_address_chain_idx ON address (chain, idx);"
            "INSERT INTO address SELECT id + 200, chain, 9, account, address, script_pubkey, script, created_at"
            " FROM address WHERE chain = 0 AND idx = 4;"
        )
    db.close()


def _verification_runs(c: Custody) -> list[dict[str, Any]]:
    db = sqlite3.connect(c.home / "custody.db")
    try:
        rows = db.execute("SELECT payload FROM audit_log WHERE event = 'verification.run' ORDER BY seq").fetchall()
    finally:
        db.close()
    return [json.loads(p) for (p,) in rows]


@pytest.mark.parametrize("source", ["store", "export"])
def test_the_insiders_duplicates_halt_trading_when_spilled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """Duplicate rows put in the store by SQL, or a duplicate line in an export, with the keys
    spilled every 3 records: found, exit 3, trading halted. First with TMPDIR naming a file:
    exit 9 and no answer (nothing recorded as verified, no halt: the disk, not the addresses),
    which also shows the spilling path is the one that ran."""
    force_spilling(monkeypatch)
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "alice", "--count", "8").exit_code == 0
    manifest = str(c.home / "founders-manifest.json")
    args = ["verify", "addresses", "--manifest", manifest, "--json"]
    if source == "export":
        args += ["--export", str(_export_with_a_duplicate_line(c))]
    else:
        _store_with_duplicate_rows(c)

    c.env["TMPDIR"] = str(c.home / "custody.db")  # a file, not a directory
    result = c(*args)
    assert result.exit_code == 9, result.output
    assert "cannot write the verifier's temporary files" in result.stderr and "Not a directory" in result.stderr
    assert c("halt", "status").exit_code == 0 and _verification_runs(c) == []

    (tmp_path / "spill").mkdir()
    c.env["TMPDIR"] = str(tmp_path / "spill")
    result = c(*args)
    assert result.exit_code == 3, result.output
    data = json.loads(result.stdout)
    got = [(f["chain"], f["index"], f["reason"]) for f in data["failures"]]
    if source == "export":
        assert got.count((0, 2, "address listed twice (also at 0/2)")) == 2
        assert sum(1 for g in got if g[:2] == (0, 2) and g[2].startswith("chain/index 0/2 used twice")) == 2
    else:
        assert (0, 4, "address listed twice (also at 0/9)") in got
        assert (0, 9, "address listed twice (also at 0/4)") in got
    assert data["halt_id"] is not None
    assert c("halt", "status").exit_code == 3
    assert [r["failures"] for r in _verification_runs(c)] == [data["failure_count"]]


# -- no room, or a run changed: no answer ----------------------------------------------------------


def test_a_missing_spill_directory_is_an_error_not_a_fall_back(tmp_path: Path, wallet: Wallet) -> None:
    path = write_export(tmp_path / "e.jsonl", wallet, records_with_duplicates(wallet))
    manifest = parse_manifest(wallet.manifest())
    with pytest.raises(SpillError, match=r"temporary files in .*nowhere: No such file or directory; set TMPDIR"):
        verify_export(manifest, path, spill_at=2, spill_dir=str(tmp_path / "nowhere"))


_FULL_DISK = """
import resource, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from custody.verify import SpillError, parse_manifest, verify_export
import json
manifest = parse_manifest(json.load(open(sys.argv[2])))
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
try:
    report = verify_export(manifest, sys.argv[3], spill_at=500, spill_dir=sys.argv[4])
except SpillError as exc:
    print("SpillError:", exc)
    sys.exit(9)
print("answered", report.ok)
"""


def test_a_disk_that_refuses_to_grow_a_run_gives_no_answer(tmp_path: Path, wallet: Wallet) -> None:
    """The runs hit a limit on a file's size mid-run (as a full disk refuses a write): the
    verification raises SpillError, it does not answer. A process of its own, so that the limit
    (RLIMIT_FSIZE; Python ignores SIGXFSZ) binds no one else."""
    records = [wallet.record(0, i) for i in range(1200)]
    path = write_export(tmp_path / "e.jsonl", wallet, records)
    (tmp_path / "m.json").write_text(json.dumps(wallet.manifest()))
    (tmp_path / "spill").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(ROOT), str(tmp_path / "m.json"), str(path), str(tmp_path / "spill")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 9, done.stdout + done.stderr
    assert "cannot write the verifier's temporary files" in done.stdout and "File too large" in done.stdout


def _spilled_files(directory: Path) -> Iterator[int]:
    """This process's file descriptors open on regular files in ``directory`` (the runs: no name
    left, or never one)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)) and stat.S_ISREG(os.stat(f"/proc/self/fd/{fd}").st_mode):
                yield int(fd)
        except OSError:
            continue


def test_a_run_rewritten_to_hide_a_duplicate_gives_no_answer(tmp_path: Path, wallet: Wallet) -> None:
    """The insider (the same user, through /proc/PID/fd) rewrites the first copy of the listed-twice
    address in the spilled runs, so the two no longer compare equal, after the runs are written
    and before they are merged: without the runs' keyed tags the duplicate would vanish."""
    records = records_with_duplicates(wallet)
    path = write_export(tmp_path / "e.jsonl", wallet, records)
    spill = tmp_path / "spill"
    spill.mkdir()
    address = records[3]["address"].encode()
    other = address[:-1] + (b"q" if address[-1:] != b"q" else b"p")
    rewritten: list[int] = []

    def attacker(checked: int) -> None:
        if checked < len(records) or rewritten:
            return
        for fd in _spilled_files(spill):
            handle = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                data = os.pread(handle, 1 << 20, 0)
                if address in data:
                    os.pwrite(handle, data.replace(address, other, 1), 0)
                    rewritten.append(fd)
                    return
            finally:
                os.close(handle)

    with pytest.raises(SpillError, match="changed while it ran"):
        verify_export(parse_manifest(wallet.manifest()), path, spill_at=2, spill_dir=str(spill), progress=attacker)
    assert len(rewritten) == 1  # the attack reached a run that held the address
