"""PostgreSQL issuance, one address per call: 1 process against 4 at once.

Each process calls custody.issuance.issuer.issue_addresses(count=1) in a loop for the same
wall-clock window; the run prints addresses per second in total and the p95 latency of a
call, for 1 and for --procs processes, then checks the store: no index twice, no gap.
Goal (issue 17): 4 concurrent issuers at least as fast in total as one, p95 under 50 ms.

    CUSTODY_TEST_POSTGRES_URL=postgresql://USER@HOST:5432/DB \\
        .venv/bin/python benchmarks/bench_issuance_pg.py [--seconds 10] [--procs 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text  # noqa: E402

from custody.bitcoin.network import REGTEST  # noqa: E402
from custody.bitcoin.script import ScriptType  # noqa: E402
from custody.config import Settings  # noqa: E402
from custody.issuance.issuer import issue_addresses  # noqa: E402
from custody.policy.model import make_policy  # noqa: E402
from custody.store.db import Database, normalize_url  # noqa: E402
from tests.support import create_store, founders  # noqa: E402


def _issuer(url: str, home: str, seconds: float, start_at: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    settings = Settings.load(home=home, db_url=url)
    db = Database(url)
    issue_addresses(db, settings, "warm", 1)  # connections, policy and deriver ready
    latencies = []
    while time.time() < start_at:
        time.sleep(0.001)
    while time.time() < start_at + seconds:
        t = time.perf_counter()
        issue_addresses(db, settings, "bench", 1)
        latencies.append(time.perf_counter() - t)
    out.put(latencies)


def _round(url: str, home: str, procs: int, seconds: float) -> tuple[float, float]:
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 3
    workers = [
        multiprocessing.Process(target=_issuer, args=(url, home, seconds, start_at, queue)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    latencies = [x for _ in workers for x in queue.get()]
    for w in workers:
        w.join()
    return len(latencies) / seconds, statistics.quantiles(latencies, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--procs", type=int, default=4)
    args = parser.parse_args()
    base = os.environ.get("CUSTODY_TEST_POSTGRES_URL")
    if not base:
        raise SystemExit("set CUSTODY_TEST_POSTGRES_URL")
    schema = f"custody_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(base))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    try:
        with tempfile.TemporaryDirectory() as home:
            settings = Settings.load(home=home, db_url=url)
            fs = founders()
            policy = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, f.spec.split("=", 1)[1]) for f in fs])
            create_store(Database(url), settings, policy, fs)
            results = {n: _round(url, home, n, args.seconds) for n in (1, args.procs)}
            with admin.begin() as conn:
                rows = conn.execute(text(f'SELECT idx FROM "{schema}".address WHERE chain = 0 ORDER BY idx')).all()
            indexes = [r[0] for r in rows]
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    one = results[1][0]
    for n, (rate, p95) in results.items():
        print(
            f"{n} process(es): {rate:8.1f} addresses/s in total, p95 {p95 * 1000:6.1f} ms, ratio to 1: {rate / one:.2f}"
        )
    print(f"no index twice, no gap: {indexes == list(range(len(indexes)))} ({len(indexes)} addresses)")
    print(f"load average (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
