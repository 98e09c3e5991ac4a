"""Start-up: `custody --help`, `custody --version` and `custody halt status` beside a bare
interpreter (`python -c pass`), measured side by side in interleaved rounds.

What a person feels on every command, and what a trading engine pays on every poll of the
halt. Goals (issue 17): `--help` within 4x and `halt status` within 6x of `python -c pass`.
Each round runs every command once, in a rotated order, so a busy machine slows them all
alike; medians are reported with the 1-minute load average.

Every process runs with its bytecode cached, as an installed custody runs: a
``PYTHONDONTWRITEBYTECODE`` in the environment is dropped, the cache goes to a temporary
``PYTHONPYCACHEPREFIX`` (the tree stays clean), and one round that writes it is not counted.
Without that, each start compiles every module it imports from source: about 90 ms of
``halt status``'s 210 ms on a quiet machine, a cost no deployment pays.

With ``--postgres URL`` (a database the benchmark may make a schema in, dropped at the end)
`halt status` runs on PostgreSQL too, light (the default) and full (CUSTODY_HALT_LIGHT=0),
beside what the PostgreSQL path's imports cost alone: `import psycopg` (the whole driver) and
`psycopg.pq` as the light path loads it (custody.store.light_pg._pq).

    .venv/bin/python benchmarks/bench_startup.py [--rounds 15] [--postgres postgresql://...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOALS = {"--help": 4.0, "--version": 4.0, "halt status": 6.0, "halt status PG": 6.0}


def _store(home: Path, db_url: str | None = None) -> dict[str, str]:
    """A store to read the halt state from, made as the CLI tests make one."""
    from tests.support import Custody, founders

    c = Custody(home, db_url)
    result = c.init(founders())
    if result.exit_code != 0:
        raise SystemExit(f"cannot create the store: {result.output}")
    env = dict(os.environ, **c.env, PYTHONPYCACHEPREFIX=str(home.parent / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--postgres", metavar="URL", help="also `halt status` on PostgreSQL, in a new schema there")
    args = parser.parse_args()
    from benchmarks.bench_api import postgres_schema

    custody = [sys.executable, "-m", "custody_cli"]
    status = [*custody, "halt", "status", "--json"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        env = _store(Path(tmp) / "home")
        cases: dict[str, tuple[list[str], dict[str, str]]] = {
            "python -c pass": ([sys.executable, "-c", "pass"], env),
            "--help": ([*custody, "--help"], env),
            "--version": ([*custody, "--version"], env),
            "halt status": (status, env),
        }
        if args.postgres:
            pg = _store(Path(tmp) / "pg", stack.enter_context(postgres_schema(args.postgres)))
            cases |= {
                "halt status PG": (status, pg),
                "  full path": (status, dict(pg, CUSTODY_HALT_LIGHT="0")),
                "  import psycopg": ([sys.executable, "-c", "import psycopg"], env),
                "  psycopg.pq": ([sys.executable, "-c", "from custody.store.light_pg import _pq; _pq()"], env),
            }
        times: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for case in cases.values():  # writes the bytecode cache: not counted
            _time(*case)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(_time(*cases[name]))
    floor = statistics.median(times["python -c pass"])
    print(f"{'':16}{'median ms':>10}{'ratio':>8}{'goal':>7}")
    for name, samples in times.items():
        median = statistics.median(samples)
        goal = GOALS.get(name)
        verdict = "" if goal is None else ("  met" if median / floor <= goal else "  MISSED")
        print(
            f"{name:16}{median * 1000:10.0f}{median / floor:8.2f}{'' if goal is None else f'{goal:.0f}x':>7}{verdict}"
        )
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
