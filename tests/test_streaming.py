"""Bounded memory: listing addresses and verifying the audit log stream, whatever the size.

Each command runs in a subprocess over a small store and over one 30x larger; its peak
resident memory may grow by a few megabytes, not with the rows (a command that loads them
all grows by tens). No timing: benchmarks/bench_scale.py measures time and memory at scale.
The large stores are filled by SQL in bulk, rows as the tool writes them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from custody.control import audit_log
from tests.support import Custody, founders

SMALL, LARGE = 1_000, 30_000
GROWTH_MB = 25  # what loading 30,000 rows costs is several times this


_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024)
"""


def _peak_mb(c: Custody, *args: str) -> tuple[int, float]:
    """Run ``custody ARGS`` (stdout discarded); its exit code and peak RSS in MB.

    Started by a small launcher: a child's peak RSS counts the pages of the process it was
    forked from (Linux keeps the forked image's high-water mark at exec), and pytest's own
    would hide the command's."""
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "custody_cli", *args],
        env=dict(os.environ, **c.env),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]), float(out[1])


def _fill(c: Custody, n: int) -> None:
    """``n`` address rows and ``n`` hash-chained audit entries appended by SQL."""
    db = sqlite3.connect(c.home / "custody.db")
    seq, prev = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    at = datetime(2026, 1, 1)
    stamp = audit_log._at(at)
    stored = "2026-01-01 00:00:00.000000"  # as SQLAlchemy stores a datetime in SQLite
    entries = []
    for _ in range(n):
        seq += 1
        payload = audit_log.canonical({"n": seq})
        digest = audit_log.entry_hash(seq, stamp, "bench.entry", "test", payload, None, prev)
        entries.append((seq, stored, "bench.entry", "test", payload, None, prev, digest))
        prev = digest
    db.executemany(
        "INSERT INTO audit_log (seq, at, event, actor, payload, signature, prev_hash, hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        entries,
    )
    db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
    first = db.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM address WHERE chain = 1").fetchone()[0]
    db.executemany(
        "INSERT INTO address (chain, idx, account, address, script_pubkey, script, created_at) "
        "VALUES (1, ?, 'bulk', ?, '00', '00', ?)",
        [(i, f"rltc1qbulk{i:012d}", stored) for i in range(first, first + n)],
    )
    db.commit()
    db.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Custody]:
    made = {}
    for n in (SMALL, LARGE):
        c = Custody(tmp_path_factory.mktemp(f"stream{n}") / "home")
        assert c.init(founders()).exit_code == 0
        _fill(c, n)
        made[n] = c
    return made


def test_audit_log_verification_streams(stores: dict[int, Custody]) -> None:
    peaks = {}
    for n, c in stores.items():
        # The bulk rows have no issuance entries: the row check fails (exit 3), the chain
        # check has read every entry all the same. --json: the report, not the rows.
        code, peaks[n] = _peak_mb(c, "audit", "log", "--verify", "--json")
        assert code == 3
    assert peaks[LARGE] - peaks[SMALL] < GROWTH_MB, peaks


def test_address_list_streams(stores: dict[int, Custody]) -> None:
    peaks = {}
    for n, c in stores.items():
        for fmt in ("--json", "--csv"):
            code, peak = _peak_mb(c, "address", "list", fmt)
            assert code == 0
            peaks[(n, fmt)] = peak
    for fmt in ("--json", "--csv"):
        assert peaks[(LARGE, fmt)] - peaks[(SMALL, fmt)] < GROWTH_MB, peaks


def test_address_list_pages(stores: dict[int, Custody]) -> None:
    c = stores[SMALL]
    page = json.loads(c("address", "list", "--offset", "10", "--limit", "5", "--json").stdout)
    assert [a["index"] for a in page] == list(range(10, 15))
    everything = json.loads(c("address", "list", "--json").stdout)
    assert [a["index"] for a in everything] == list(range(SMALL))
    assert json.loads(c("address", "list", "--offset", str(SMALL), "--json").stdout) == []


def test_chunked_issuance_leaves_no_gap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An issuance over several chunks commits each with its own audit entry: indexes
    consecutive, the log's issuances covering every row, the log intact."""
    from custody.issuance import issuer

    monkeypatch.setattr(issuer, "ISSUE_CHUNK", 7)
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    issued = json.loads(c("address", "new", "--account", "a", "--count", "30", "--json").stdout)
    assert [a["index"] for a in issued] == list(range(30))
    report = json.loads(c("audit", "log", "--verify", "--json").stdout)
    assert report["ok"], report
    log = json.loads(c("audit", "log", "--json").stdout)
    counts = [e["payload"]["count"] for e in log if e["event"] == "address.issued"]
    assert counts == [7, 7, 7, 7, 2]
