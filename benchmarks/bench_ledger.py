"""The ledger's sum-to-zero checks as the ledger grows to 1,000,000 entries (SQLite).

* The per-event check (custody.books.ledger.check, and a whole balanced posting through
  custody.books.ledger.post, each in its own transaction) timed at 1k, 100k and 1M entries: it
  reads the running head, so the ratio 1M / 1k should stay near 1.
* ``custody audit ledger`` (custody.books.audit.audit_ledger) over all the entries, beside a floor
  measured in the same run: a bare ``SELECT SUM(amount) FROM ledger_entry``. Target: under
  10 s for 1,000,000 entries.
* The same as a ``custody`` process, with its peak memory (benchmarks/bench_scale.py's
  launcher). Target: under 256 MB at 1,000,000 entries (issue 17).

The ledger is filled in bulk (balanced two-entry deposit postings over --accounts customer
accounts, cached balances and head kept exact, each posting recorded in the hash-chained
audit log as custody.books.ledger.post records it), not event by event.

    .venv/bin/python benchmarks/bench_ledger.py [--entries 1000000] [--accounts 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import run_measured  # noqa: E402
from sqlalchemy import text  # noqa: E402

from custody.bitcoin.network import REGTEST  # noqa: E402
from custody.bitcoin.script import ScriptType  # noqa: E402
from custody.books import (
    audit,  # noqa: E402
    ledger,
)
from custody.config import Settings  # noqa: E402
from custody.control import audit_log  # noqa: E402
from custody.policy.model import make_policy  # noqa: E402
from custody.store.db import Database  # noqa: E402
from tests.support import create_store, founders  # noqa: E402


def fill(db: Database, entries: int, accounts: int, rng: random.Random) -> None:
    """Add balanced deposit postings in bulk until the ledger holds ``entries`` entries."""
    with db.transaction() as s:
        conn = s.connection()
        have = conn.execute(text("SELECT entries, txns FROM ledger_head WHERE id = 1")).one()
        if have.entries >= entries:
            return
        keys = [ledger.ASSET] + [ledger.customer(f"c{i}") for i in range(accounts)]
        ids = {a.key: a.id for a in ledger._accounts(s, keys).values()}
        keys_by_id = {v: k for k, v in ids.items()}
        next_txn = (conn.execute(text("SELECT COALESCE(MAX(id), 0) FROM ledger_txn")).scalar_one() or 0) + 1
        next_entry = (conn.execute(text("SELECT COALESCE(MAX(id), 0) FROM ledger_entry")).scalar_one() or 0) + 1
        head_seq, head_hash = conn.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one()
        at = datetime(2026, 1, 1)
        stamp = audit_log._at(at)
        txns, lines, logged = [], [], []
        deltas: dict[int, int] = {}
        added = 0
        while have.entries + added < entries:
            amount = rng.randint(1_000, 10_000_000)
            who = ids[keys[rng.randint(1, accounts)]]
            txns.append(
                {
                    "id": next_txn,
                    "at": at,
                    "event": "deposit.credited",
                    "ref": f"deposit:{next_txn}:0",
                    "memo": "",
                    "entries": 2,
                    "total": 0,
                }
            )
            lines.append({"i": next_entry, "t": next_txn, "a": ids[ledger.ASSET], "v": amount})
            lines.append({"i": next_entry + 1, "t": next_txn, "a": who, "v": -amount})
            # what ledger.post records in the audit log, hash-chained
            payload = audit_log.canonical(
                {
                    "txn": next_txn,
                    "event": "deposit.credited",
                    "ref": f"deposit:{next_txn}:0",
                    "entries": [[next_entry, ledger.ASSET, amount], [next_entry + 1, keys_by_id[who], -amount]],
                }
            )
            head_seq += 1
            digest = audit_log.entry_hash(head_seq, stamp, ledger.POSTED, "ledger", payload, None, head_hash)
            logged.append(
                {
                    "seq": head_seq,
                    "at": at,
                    "event": ledger.POSTED,
                    "actor": "ledger",
                    "payload": payload,
                    "prev": head_hash,
                    "hash": digest,
                }
            )
            head_hash = digest
            next_entry += 2
            deltas[ids[ledger.ASSET]] = deltas.get(ids[ledger.ASSET], 0) + amount
            deltas[who] = deltas.get(who, 0) - amount
            next_txn += 1
            added += 2
        conn.execute(
            text(
                "INSERT INTO ledger_txn (id, at, event, ref, memo, entries, total) "
                "VALUES (:id, :at, :event, :ref, :memo, :entries, :total)"
            ),
            txns,
        )
        conn.execute(text("INSERT INTO ledger_entry (id, txn_id, account_id, amount) VALUES (:i, :t, :a, :v)"), lines)
        conn.execute(
            text(
                "INSERT INTO audit_log (seq, at, event, actor, payload, signature, prev_hash, hash) "
                "VALUES (:seq, :at, :event, :actor, :payload, NULL, :prev, :hash)"
            ),
            logged,
        )
        conn.execute(
            text("UPDATE audit_head SET seq = :seq, hash = :hash WHERE id = 1"), {"seq": head_seq, "hash": head_hash}
        )
        conn.execute(
            text("UPDATE ledger_account SET balance = balance + :d WHERE id = :i"),
            [{"d": d, "i": i} for i, d in deltas.items()],
        )
        conn.execute(
            text("UPDATE ledger_head SET entries = entries + :n, txns = txns + :t WHERE id = 1"),
            {"n": added, "t": len(txns)},
        )


def per_event(db: Database, runs: int) -> tuple[float, float]:
    """Median seconds of the check alone, and of one balanced posting with its check."""
    checks, posts = [], []
    for i in range(runs):
        start = time.perf_counter()
        with db.transaction() as s:
            ledger.check(s)
        checks.append(time.perf_counter() - start)
        start = time.perf_counter()
        with db.transaction() as s:
            ledger.post(s, "bench", [(ledger.ASSET, 1_000 + i), (ledger.customer("bench"), -(1_000 + i))], ref="b")
        posts.append(time.perf_counter() - start)
    return statistics.median(checks), statistics.median(posts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    rng = random.Random(1)
    fs = founders()
    policy = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in fs])
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.load(home=tmp, env={"CUSTODY_HALT_HOOK": ""})
        db = Database(settings.db_url)
        create_store(db, settings, policy, fs)
        sizes = [n for n in (1_000, 100_000, 1_000_000) if n < args.entries] + [args.entries]
        timings = {}
        for size in sizes:
            fill(db, size, args.accounts, rng)
            check_s, post_s = per_event(db, args.runs)
            timings[size] = (check_s, post_s)
            print(
                f"{size:>9,} entries: per-event check {check_s * 1e6:8.1f} µs, posting + check {post_s * 1e6:8.1f} µs"
            )
        small, big = timings[sizes[0]], timings[sizes[-1]]
        print(
            f"ratio {sizes[-1]:,} / {sizes[0]:,} entries: check x{big[0] / small[0]:.2f}, "
            f"posting x{big[1] / small[1]:.2f} (constant time: near 1)"
        )

        with db.transaction() as s:
            start = time.perf_counter()
            s.connection().execute(text("SELECT SUM(amount) FROM ledger_entry")).one()
            floor = time.perf_counter() - start
        start = time.perf_counter()
        report = audit.audit_ledger(db, settings)
        seconds = time.perf_counter() - start
        assert report["ok"], report["problems"]
        print(
            f"custody audit ledger over {report['entries']:,} entries in {report['transactions']:,} transactions, "
            f"{report['accounts']:,} accounts: {seconds:.2f} s (target < 10 s); "
            f"floor, a bare SUM over them: {floor:.2f} s (x{seconds / floor:.1f})"
        )
        db.dispose()
        env = dict(os.environ, CUSTODY_HOME=tmp, CUSTODY_DB_URL=settings.db_url, CUSTODY_HALT_HOOK="")
        code, secs, peak = run_measured(env, "audit", "ledger", "--json")
        print(f"custody audit ledger --json as a process: exit {code}, {secs:.2f} s, peak {peak:.0f} MB (< 256 MB)")
        print(json.dumps({"load_1min": os.getloadavg()[0], "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
