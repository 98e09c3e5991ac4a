"""Time and peak memory at growing n: `address list --json`, `address new --count n --json`
and `audit log --verify`, each a real `custody` process, with the audit log's verification
rate beside its floor measured in the same run (hashing the same entries in a bare loop).

Goals (issue 17): memory bounded by a constant (under 256 MB at 1,000,000), time linear in
n, `audit log --verify` at 100,000 entries/s or more. The stores are filled by SQL in bulk
(rows and hash-chained entries as the tool writes them); `address new` issues for real.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10000,100000,1000000] [--issue-sizes 2000,20000]
    .venv/bin/python benchmarks/bench_scale.py --sizes '' --issue-sizes 100000,1000000   # `address new` only
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from custody.control import audit_log  # noqa: E402
from tests.support import Custody, founders  # noqa: E402

STORED = "2026-01-01 00:00:00.000000"  # a datetime as SQLAlchemy stores it in SQLite


def _run(env: dict[str, str], *args: str) -> tuple[int, float, float]:
    """``custody ARGS`` with stdout discarded: exit code, seconds, peak RSS (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "custody_cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024


def _fill(home: Path, n: int) -> list[tuple[object, ...]]:
    """``n`` address rows and ``n`` audit entries appended by SQL; the entries returned."""
    db = sqlite3.connect(home / "custody.db")
    seq, prev = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    stamp = audit_log._at(datetime(2026, 1, 1))
    entries = []
    for _ in range(n):
        seq += 1
        payload = audit_log.canonical({"n": seq, "account": f"c{seq % 1000}"})
        digest = audit_log.entry_hash(seq, stamp, "bench.entry", "bench", payload, None, prev)
        entries.append((seq, STORED, "bench.entry", "bench", payload, None, prev, digest))
        prev = digest
    db.executemany("INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)", entries)
    db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
    db.executemany(
        "INSERT INTO address (chain, idx, account, address, script_pubkey, script, created_at) "
        "VALUES (1, ?, 'bulk', ?, ?, ?, ?)",
        [(i, f"rltc1qbulk{i:040d}", "00" * 34, "00" * 105, STORED) for i in range(n)],
    )
    db.commit()
    db.close()
    return entries


def _floor(entries: list[tuple[object, ...]], stamp: str) -> float:
    """Seconds to hash the same entries in a bare loop (the chain check's floor)."""
    start = time.perf_counter()
    for seq, _, event, actor, payload, signature, prev, _digest in entries:
        audit_log.entry_hash(seq, stamp, event, actor, payload, signature, prev)  # type: ignore[arg-type]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,300000")
    parser.add_argument("--issue-sizes", default="2000,20000")
    args = parser.parse_args()
    print(f"{'what':28}{'n':>10}{'seconds':>9}{'per s':>11}{'peak MB':>9}{'floor s':>9}{'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",") if x):
            c = Custody(Path(tmp) / f"s{n}")
            assert c.init(founders()).exit_code == 0
            env = dict(os.environ, **c.env)
            entries = _fill(c.home, n)
            floor = _floor(entries, audit_log._at(datetime(2026, 1, 1)))
            del entries
            _, secs, peak = _run(env, "audit", "log", "--verify", "--json")  # exit 3: bulk rows unrecorded
            print(
                f"{'audit log --verify':28}{n:10,}{secs:9.2f}{n / secs:11,.0f}{peak:9.0f}"
                f"{floor:9.2f}{secs / floor:7.1f}"
            )
            code, secs, peak = _run(env, "address", "list", "--json")
            print(f"{'address list --json':28}{n:10,}{secs:9.2f}{n / secs:11,.0f}{peak:9.0f}")
            code, secs, peak = _run(env, "address", "list", "--csv")
            print(f"{'address list --csv':28}{n:10,}{secs:9.2f}{n / secs:11,.0f}{peak:9.0f}")
        for n in (int(x) for x in args.issue_sizes.split(",") if x):
            c = Custody(Path(tmp) / f"i{n}")
            assert c.init(founders()).exit_code == 0
            code, secs, peak = _run(
                dict(os.environ, **c.env), "address", "new", "--account", "a", "--count", str(n), "--json"
            )
            assert code == 0
            print(f"{'address new --count n --json':28}{n:10,}{secs:9.2f}{n / secs:11,.0f}{peak:9.0f}")
    print(json.dumps({"load_1min": os.getloadavg()[0], "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
