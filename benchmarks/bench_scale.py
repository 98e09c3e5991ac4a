"""Time and peak memory at growing n of every command that reads the whole store: listing
(`address list --json/--csv`), the auditors' export, `verify addresses` (over the store, over
the export, and over the export with every address rewritten: n failures, exit 3 shown as 0),
`audit log --verify`, the first `sync` of the embedded chain, `audit reserves` and `audit
ledger`; and `address new --count n --json`. Each is a real `custody`
process; its peak RSS is the kernel's (``wait4``). The audit log's verification rate is
printed beside its floor measured in the same run (hashing the same entries in a bare loop).

Goals (issue 17): memory bounded by a constant (under 256 MB at 1,000,000), time linear in
n, `audit log --verify` at 100,000 entries/s or more.

The stores are filled by SQL in bulk, as the tool would have written them: n real addresses
of the test founders' policy (derived once on every core and cached in the temporary
directory, or in ``--cache``), one ``address.issued`` entry per 10,000 with their digests,
and n more entries in the hash-chained audit log; two of the addresses are funded on the
embedded chain. Every command must exit 0 on such a store; one that does not is printed as
``exit N``. `address new` issues for real.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10000,100000,1000000] [--issue-sizes 2000,20000]
    .venv/bin/python benchmarks/bench_scale.py --sizes '' --issue-sizes 100000,1000000   # `address new` only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from custody.control import audit_log  # noqa: E402
from custody.issuance.record import ISSUED, row_line  # noqa: E402
from custody.issuance.verification import load_auditor_manifest  # noqa: E402
from custody.verify.core import checker_for  # noqa: E402
from tests.support import Custody, founders  # noqa: E402

STORED = "2026-01-01 00:00:00.000000"  # a datetime as SQLAlchemy stores it in SQLite
STAMP = audit_log._at(datetime(2026, 1, 1))
ISSUE = 10_000  # addresses per address.issued entry, as `address new` commits them
ORIGIN = audit_log.canonical({"host": "bench", "user": "bench"})


_LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024,
      usage.ru_utime + usage.ru_stime)
"""


_CACHED = {"PYTHONPYCACHEPREFIX": os.path.join(tempfile.gettempdir(), f"custody-bench-pycache-{os.getuid()}")}


CPU: dict[str, float] = {}
"""The CPU seconds (user and system) of the last measured command, its own and its children's
(a worker process included), by command: under load, wall clock says more about the machine."""


def run_measured(env: dict[str, str], *args: str) -> tuple[int, float, float]:
    """``custody ARGS`` with stdout discarded: exit code, seconds, peak RSS (MB; the largest of
    the process and its children, not their sum). Its CPU seconds go into :data:`CPU`.

    Started by a small launcher process, not by this one: a child's peak RSS counts the pages
    of the process it was forked from (Linux records the forked image's high-water mark at
    exec), and this process holds the fill's data; the launcher holds a few megabytes."""
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "custody_cli", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    CPU[" ".join(args)] = float(out[3])
    return int(out[0]), float(out[1]), float(out[2])


def _derive(job: tuple[str, int, int]) -> str:
    manifest, start, size = job
    checker = checker_for(load_auditor_manifest(Path(manifest)))
    lines = []
    for index in range(start, start + size):
        e = checker.expected(0, index)
        lines.append(f"{e.address} {e.script_pubkey.hex()} {e.script.hex()}\n")
    return "".join(lines)


def _addresses(manifest: Path, n: int, cache: Path) -> Path:
    """A file of the first ``n`` receive addresses (address, scriptPubKey, script), derived once."""
    have = cache / f"addresses-{hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]}.txt"
    count = sum(1 for _ in have.open()) if have.exists() else 0
    if count < n:
        with Pool(os.cpu_count() or 1) as pool, have.open("a") as fh:
            jobs = [(str(manifest), s, min(ISSUE, n - s)) for s in range(count, n, ISSUE)]
            for text in pool.imap(_derive, jobs):
                fh.write(text)
    return have


def _entries(db: sqlite3.Connection, issued: Iterator[tuple[str, str, str]], n: int) -> list[tuple[str, str, str]]:
    """Append the address rows, their issuances and ``n`` more entries; return the hashes' inputs
    (the floor's work)."""
    seq, prev = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    bodies: list[tuple[str, str, str]] = []

    def append(event: str, actor: str, payload: str) -> None:
        nonlocal seq, prev
        seq += 1
        digest = audit_log.entry_hash(seq, STAMP, event, actor, payload, None, prev, ORIGIN)
        db.execute(
            "INSERT INTO audit_log (seq, at, event, actor, payload, signature, prev_hash, hash, origin) "
            "VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?)",
            (seq, STORED, event, actor, payload, prev, digest, ORIGIN),
        )
        bodies.append((event, actor, payload))
        prev = digest

    for first in range(0, n, ISSUE):
        account = f"acct{first // ISSUE}"
        rows = [(first + k, *next(issued)) for k in range(min(ISSUE, n - first))]
        db.executemany(
            "INSERT INTO address (chain, idx, account, address, script_pubkey, script, created_at) "
            f"VALUES (0, ?, '{account}', ?, ?, ?, '{STORED}')",
            rows,
        )
        digest = hashlib.sha256()
        for index, address, spk, script in rows:
            digest.update(row_line(0, index, account, address, spk, script))
        payload = {
            "account": account,
            "chain": 0,
            "first_index": first,
            "count": len(rows),
            "addresses_sha256": hashlib.sha256("\n".join(r[1] for r in rows).encode()).hexdigest(),
            "rows_sha256": digest.hexdigest(),
            "first_address": rows[0][1],
        }
        append(ISSUED, "operator", audit_log.canonical(payload))
    for k in range(n):
        append("bench.entry", "bench", audit_log.canonical({"n": k, "account": f"c{k % 1000}"}))
    db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
    db.execute("UPDATE counter SET next_value = ? WHERE name = 'receive'", (n,))
    return bodies


def _fill(c: Custody, n: int, cache: Path) -> tuple[float, float, int]:
    """Fill the store; return the floor (seconds to hash its entries in a bare loop, by wall
    clock and by CPU) and how many entries the log holds."""
    addresses = _addresses(c.home / "founders-manifest.json", n, cache)
    db = sqlite3.connect(c.home / "custody.db")
    with addresses.open() as fh:
        issued = (tuple(line.split()) for line in fh)
        first_seq = db.execute("SELECT seq FROM audit_head").fetchone()[0] + 1
        bodies = _entries(db, issued, n)  # type: ignore[arg-type]
    db.commit()
    db.close()
    prev = "0" * 64
    start, cpu = time.perf_counter(), time.process_time()
    for k, (event, actor, payload) in enumerate(bodies):
        prev = audit_log.entry_hash(first_seq + k, STAMP, event, actor, payload, None, prev, ORIGIN)
    return time.perf_counter() - start, time.process_time() - cpu, first_seq - 1 + len(bodies)


def _fund(c: Custody, env: dict[str, str], n: int) -> None:
    """Two of the addresses paid on the embedded chain (the first and the last), one block mined."""
    db = sqlite3.connect(c.home / "custody.db")
    for index in (0, n - 1):
        (address,) = db.execute("SELECT address FROM address WHERE chain = 0 AND idx = ?", (index,)).fetchone()
        subprocess.run(
            [sys.executable, "-m", "custody_cli", "node", "fund", address, "0.5"],
            env=env,
            check=True,
            capture_output=True,
        )
    db.close()
    subprocess.run([sys.executable, "-m", "custody_cli", "node", "mine", "1"], env=env, check=True, capture_output=True)


def _rotated(export: Path) -> str:
    """``export`` with every record carrying the next record's address (the last the first's):
    an insider who rewrote every row; every record fails, none is a duplicate. Streamed."""
    out = export.with_name("export-rotated.jsonl")
    with export.open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        dst.write(next(src))
        held: dict[str, object] | None = None
        first = ""
        for line in src:
            row = json.loads(line)
            if "address" not in row:  # the trailer
                assert held is not None
                held["address"] = first
                dst.write(json.dumps(held) + "\n" + line)
                break
            if held is None:
                first = row["address"]
            else:
                held["address"] = row["address"]
                dst.write(json.dumps(held) + "\n")
            held = row
    return str(out)


def _row(what: str, n: int, code: int, secs: float, peak: float, floor: float | None = None) -> None:
    ratio = f"{floor:9.2f}{secs / floor:7.1f}" if floor else ""
    status = "" if code == 0 else f"  exit {code}"
    print(f"{what:30}{n:10,}{secs:9.2f}{n / secs:11,.0f}{peak:9.0f}{ratio}{status}", flush=True)


def _wanted(what: str, only: str | None) -> bool:
    return only is None or what.startswith(only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--issue-sizes", default="2000,20000")
    parser.add_argument("--cache", type=Path, help="Keep the derived addresses here between runs.")
    parser.add_argument(
        "--verify-sizes", help="The sizes at which to run `verify addresses` (default: every size; it is the slowest)."
    )
    parser.add_argument("--only", help="Run only the commands whose name starts with this (e.g. 'audit').")
    args = parser.parse_args()
    verify_sizes = {int(v) for v in (args.verify_sizes or args.sizes).split(",") if v}
    print(f"{'what':30}{'n':>10}{'seconds':>9}{'per s':>11}{'peak MB':>9}{'floor s':>9}{'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        for n in (int(v) for v in args.sizes.split(",") if v):
            c = Custody(Path(tmp) / f"s{n}")
            assert c.init(founders()).exit_code == 0
            env = dict(os.environ, **c.env, CUSTODY_CHAIN="embedded")
            manifest = str(c.home / "founders-manifest.json")
            export = str(c.home / "export.jsonl")
            floor, floor_cpu, entries = _fill(c, n, cache)
            if _wanted("audit log --verify", args.only):
                code, secs, peak = run_measured(env, "audit", "log", "--verify", "--json")
                _row("audit log --verify", entries, code, secs, peak, floor)
                cpu = CPU["audit log --verify --json"]
                print(
                    f"{'  by CPU (with its worker)':30}{entries:10,}{cpu:9.2f}{entries / cpu:11,.0f}{'':9}"
                    f"{floor_cpu:9.2f}{cpu / floor_cpu:7.1f}",
                    flush=True,
                )
            for what, command in (
                ("address list --json", ["address", "list", "--json"]),
                ("address list --csv", ["address", "list", "--csv"]),
                ("address export", ["address", "export", export]),
                ("verify addresses (store)", ["verify", "addresses", "--manifest", manifest]),
                ("verify addresses --export", ["verify", "addresses", "--manifest", manifest, "--export", export]),
            ):
                if what.startswith("verify") and n not in verify_sizes or not _wanted(what, args.only):
                    continue
                if what.endswith("--export") and not Path(export).exists():  # `address export` not run
                    assert c("address", "export", export).exit_code == 0
                _row(what, n, *run_measured(env, *command))
            wrong = "verify --export, all wrong"
            if n in verify_sizes and _wanted(wrong, args.only):
                if not Path(export).exists():
                    assert c("address", "export", export).exit_code == 0
                code, secs, peak = run_measured(
                    env, "verify", "addresses", "--manifest", manifest, "--export", _rotated(Path(export)), "--no-halt"
                )
                _row(wrong, n, 0 if code == 3 else code, secs, peak)  # exit 3 is what it must say
            if any(_wanted(w, args.only) for w in ("sync", "audit reserves", "audit ledger")):
                _fund(c, env, n)
            for what, command in (
                ("sync (embedded, first)", ["sync", "--json"]),
                ("audit reserves", ["audit", "reserves", "--json"]),
                ("audit ledger", ["audit", "ledger", "--json"]),
            ):
                if _wanted(what, args.only):
                    _row(what, n, *run_measured(env, *command))
        for n in (int(v) for v in args.issue_sizes.split(",") if v):
            c = Custody(Path(tmp) / f"i{n}")
            assert c.init(founders()).exit_code == 0
            code, secs, peak = run_measured(
                dict(os.environ, **c.env), "address", "new", "--account", "a", "--count", str(n), "--json"
            )
            _row("address new --count n --json", n, code, secs, peak)
    print(json.dumps({"load_1min": os.getloadavg()[0], "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
