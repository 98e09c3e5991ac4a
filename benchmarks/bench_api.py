"""``custody serve`` under 50 concurrent clients on loopback, beside floors measured in the same run.

* Halt-state read (``GET /v1/halt``, signed): p50 and p99 latency and requests a second, beside
  a bare endpoint of the same framework and server (FastAPI on uvicorn) returning a constant,
  read the same way, in alternating rounds. Target: p99 under 50 ms.
* Deposit-address issuance (``POST /v1/accounts/A/addresses``, one address a request): requests
  per second, beside the library's own rate (``issue_addresses`` one at a time, in process).
  Target: within 2x of the library.
* Nothing lost or duplicated: every answer's index is unique, the store holds exactly the
  addresses answered, and the receive indexes have no gap.

Each server is a subprocess. The reads come from wrk (benchmarks/wrk_load.py): a load generator
in C, 2 threads and 50 keep-alive connections by default, sending requests signed here
beforehand, each once (benchmarks/wrk_presigned.lua); a run with any answer but 200 is void
(one that used up its signed requests runs again with four times as many).
The floor gets the same requests, headers and all, at its own path. Without wrk (or with
``--thread-clients``) the reads come from Python clients in threads of this process, as the
issuance requests always do (each thread one keep-alive connection, signing every request as
the README says): those share the server's cores and their own interpreter, and that
contention is in every latency they measure, the floor's included.

    .venv/bin/python benchmarks/bench_api.py [--clients 50] [--seconds 5] [--wrk-threads 2]
        [--issues 20] [--workers 1] [--postgres URL] [--thread-clients [--reads 40]]

With ``--postgres URL`` the store (and the library's floor) is a fresh schema on that server,
dropped afterwards; SQLite in a temporary directory otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if TYPE_CHECKING:
    from benchmarks.wrk_load import WrkRun

SECRET = b"benchmark-shared-secret-0123456789"
ROUNDS = 4
"""The halt reads and the floor's alternate in this many rounds."""
WINDOW_SECONDS = 240
"""A round's longest: its requests, signed before it, stay within the server's window (300 s)."""
NOT_HALTED = '"halted":false'
"""In every answer of either side (compact JSON): a halt read that failed answers halted (fail closed)."""
ENV: dict[str, str] = {}
"""The store's settings (CUSTODY_DB_URL with --postgres), for this process and the servers."""


def serve(home: str, port: int, bare: bool, workers: int) -> None:
    """The server subprocess: custody's app on the store in ``home``, or a bare FastAPI app,
    in ``workers`` processes as ``custody serve --workers`` runs them."""
    import coincurve
    from fastapi import FastAPI

    from custody.config import Settings
    from custody.identity.employee_keys import FileSigner
    from custody.identity.keyfile import EmployeeKey
    from custody.service import workers as workers_lib
    from custody.service.api import ServiceConfig, create_app
    from custody.store.db import Database

    settings = Settings.load(home=home, env=ENV)
    db = Database(settings.db_url)
    key = FileSigner(EmployeeKey("bench-svc", coincurve.PrivateKey()))
    config = ServiceConfig(settings, db, SECRET, "bench-svc", key)

    def make_app() -> object:
        if not bare:
            return create_app(config)
        app = FastAPI()

        @app.get("/bare")
        def constant() -> dict[str, bool]:
            return {"halted": False}

        return app

    workers_lib.serve(make_app, db, host="127.0.0.1", port=port, workers=workers, log_level="warning")


class Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: bytes = b"", signed: bool = True) -> tuple[int, bytes, float]:
        from custody.service import auth

        headers = {"Content-Type": "application/json"} if body else {}
        start = time.perf_counter()
        if signed:
            ts, nonce = str(int(time.time())), secrets.token_hex(16)
            headers |= {auth.TIMESTAMP: ts, auth.NONCE: nonce}
            headers[auth.SIGNATURE] = auth.sign(SECRET, method, path, ts, nonce, body)
        self.conn.request(method, path, body=body or None, headers=headers)
        r = self.conn.getresponse()
        data = r.read()
        return r.status, data, time.perf_counter() - start


def start_server(home: str, bare: bool, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    from tests.service_support import free_port

    port = free_port()
    args = [sys.executable, __file__, "--serve", home, "--port", str(port), "--workers", str(workers)]
    args += ["--bare"] if bare else []
    if "CUSTODY_DB_URL" in ENV:
        args += ["--db-url", ENV["CUSTODY_DB_URL"]]
    proc = subprocess.Popen(args)
    deadline = time.monotonic() + 60
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/openapi.json")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.1)


def hammer(port: int, clients: int, per_client: int, request: Callable[[Client, int, int], float]) -> list[float]:
    """``clients`` threads, each making ``per_client`` requests; every request's latency."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def run(n: int) -> None:
        c = Client(port)
        barrier.wait()
        mine = [request(c, n, i) for i in range(per_client)]
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` and of its live descendants (the workers),
    from /proc: what the server spent, whatever the shared machine's load made the clock say."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return total


def percentiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return q[49] * 1000, q[98] * 1000


def library_rate(count: int) -> tuple[float, float]:
    """Addresses a second, and CPU seconds an address, of the library in process."""
    from custody.bitcoin.network import REGTEST
    from custody.bitcoin.script import ScriptType
    from custody.config import Settings
    from custody.issuance.issuer import issue_addresses
    from custody.policy.model import make_policy
    from custody.store.db import Database
    from tests.support import create_store, founders

    fs = founders()
    policy = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in fs])
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.load(home=tmp, env=ENV)
        db = Database(settings.db_url)
        create_store(db, settings, policy, fs)
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(count):
            issue_addresses(db, settings, f"lib-{i % 50}", 1)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        db.dispose()
    return count / elapsed, cpu / count


def make_store(home: str) -> None:
    from custody.bitcoin.network import REGTEST
    from custody.bitcoin.script import ScriptType
    from custody.config import Settings
    from custody.policy.model import make_policy
    from custody.store.db import Database
    from tests.support import create_store, founders

    fs = founders()
    policy = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in fs])
    settings = Settings.load(home=home, env=ENV)
    db = Database(settings.db_url)
    create_store(db, settings, policy, fs)
    db.dispose()


def check_store(home: str, answered: list[int]) -> str:
    """Every answered index unique and stored, the store holding nothing else, no gap."""
    from sqlmodel import select

    from custody.config import Settings
    from custody.policy.model import RECEIVE
    from custody.store.db import Database
    from custody.store.models import AddressRow

    settings = Settings.load(home=home, env=ENV)
    db = Database(settings.db_url)
    with db.transaction() as s:
        stored = sorted(s.exec(select(AddressRow.idx).where(AddressRow.chain == RECEIVE)).all())
    db.dispose()
    problems = []
    if len(set(answered)) != len(answered):
        problems.append(f"{len(answered) - len(set(answered))} index(es) answered twice")
    if sorted(answered) != stored:
        problems.append(f"answered {len(answered)} addresses, the store holds {len(stored)} others or more")
    if stored and stored != list(range(stored[0], stored[0] + len(stored))):
        problems.append("the stored receive indexes have a gap")
    return "; ".join(problems) or f"{len(answered)} addresses: unique, all stored, no gap"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (wrk's connections)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds of a wrk round (4 rounds a side)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk's threads (they share --clients)")
    parser.add_argument(
        "--headroom",
        type=float,
        default=3.0,
        help="requests signed for a round: this many times the fastest rate seen (a round that runs out runs again)",
    )
    parser.add_argument(
        "--max-rate", type=float, default=20_000, help="requests a second to sign for the 1 s warm-up of a side"
    )
    parser.add_argument("--thread-clients", action="store_true", help="the reads from Python threads, not wrk")
    parser.add_argument("--reads", type=int, default=40, help="halt reads per client (--thread-clients)")
    parser.add_argument("--issues", type=int, default=20, help="issuance requests per client")
    parser.add_argument("--workers", type=int, default=1, help="server processes (custody serve --workers)")
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL server to run on (a fresh schema)")
    parser.add_argument("--db-url", help=argparse.SUPPRESS)
    parser.add_argument("--serve", metavar="HOME", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.db_url:
        ENV["CUSTODY_DB_URL"] = args.db_url
    if args.serve is not None:
        serve(args.serve, args.port, args.bare, args.workers)
        return
    if args.clients % args.wrk_threads:
        parser.error("--clients must be a multiple of --wrk-threads (wrk gives each thread as many)")
    if not 1 <= args.seconds <= WINDOW_SECONDS:
        parser.error(f"--seconds must be 1 to {WINDOW_SECONDS}: the requests are signed before the round")
    if args.postgres:
        with postgres_schema(args.postgres) as url:
            ENV["CUSTODY_DB_URL"] = url
            run(args)
    else:
        run(args)


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema on the server at ``url`` (dropped afterwards), as the URL to use it."""
    from sqlalchemy import create_engine, text

    schema = f"custody_bench_{secrets.token_hex(5)}"
    admin = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@dataclass
class Reads:
    """One side of the read measurement (custody's halt read or the floor) over every round."""

    p50: list[float] = field(default_factory=list)
    """ms, one a round (wrk) or one for all rounds (thread clients)."""
    p99: list[float] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0

    def add(self, requests: int, seconds: float, server_cpu: float, client_cpu: float = 0.0) -> None:
        self.requests += requests
        self.seconds += seconds
        self.server_cpu += server_cpu
        self.client_cpu += client_cpu

    def latency(self) -> tuple[float, float]:
        """p50 and p99 in ms (the median of the rounds' with wrk)."""
        return statistics.median(self.p50), statistics.median(self.p99)

    def summary(self) -> str:
        p50, p99 = self.latency()
        spread = f" (median of {len(self.p99)} rounds; p99 {min(self.p99):.1f}-{max(self.p99):.1f})"
        return (
            f"{self.requests:,} requests: p50 {p50:.1f} ms, p99 {p99:.1f} ms{spread if len(self.p99) > 1 else ''}, "
            f"{self.requests / self.seconds:,.0f} requests/s"
        )


RETRIES = 3
"""Times a round that used up its signed requests is run again with four times as many."""


def reads_with_wrk(
    args: argparse.Namespace, wrk: str, tmp: Path, sides: list[tuple[str, int, int, str]]
) -> dict[str, Reads]:
    """``sides``: name, server pid, port, path. A warm-up run of each (which also tells how
    many requests to sign for a round), then ROUNDS rounds alternating between them."""
    reads = {name: Reads() for name, *_ in sides}
    rate = {name: args.max_rate for name, *_ in sides}
    for round_ in range(ROUNDS + 1):
        warm_up = round_ == 0
        for name, pid, port, path in sides:
            run, cpu = wrk_round(args, wrk, tmp / f"{name}-{round_}", name, pid, port, path, rate, warm_up)
            if not warm_up:
                reads[name].p50.append(run.p50_ms)
                reads[name].p99.append(run.p99_ms)
                reads[name].add(run.requests, run.seconds, cpu, run.wrk_cpu)
    return reads


def wrk_round(
    args: argparse.Namespace,
    wrk: str,
    prefix: Path,
    name: str,
    pid: int,
    port: int,
    path: str,
    rate: dict[str, float],
    warm_up: bool,
) -> tuple[WrkRun, float]:
    """One wrk run at a side, and the server's CPU seconds in it: signed for ``rate[name]``
    (which it raises to the rate seen), run again with more when its requests ran out (a warm-up
    on a cold server can see a third of the rate), void (SystemExit) for anything else."""
    from benchmarks.wrk_load import budget, presign, run_wrk, write_requests

    seconds = 1 if warm_up else args.seconds
    threads, connections = args.wrk_threads, args.clients
    for attempt in range(RETRIES + 1):
        headroom = 1.0 if warm_up else args.headroom
        signed = presign(SECRET, "GET", path, budget(rate[name], seconds, headroom, threads, connections))
        write_requests(prefix, signed, threads)
        cpu = cpu_seconds(pid)
        url, how = f"http://127.0.0.1:{port}/", {"threads": threads, "connections": connections}
        run = run_wrk(wrk, url, prefix, seconds=seconds, expect=NOT_HALTED, **how)
        cpu = cpu_seconds(pid) - cpu
        problems = run.problems()
        if problems == [run.ran_out_problem()] and attempt < RETRIES:
            print(f"bench_api: {problems[0]}: the {name} round again with 4x as many", file=sys.stderr)
            rate[name] *= 4
            continue
        if problems:
            raise SystemExit(f"bench_api: the {name} run is void: " + "; ".join(problems))
        rate[name] = run.rate if warm_up else max(rate[name], run.rate)
        return run, cpu
    raise AssertionError("unreachable")


def reads_with_threads(args: argparse.Namespace, sides: list[tuple[str, int, int, str]]) -> dict[str, Reads]:
    """The same rounds from ``args.clients`` Python threads of this process, ``args.reads``
    requests each over all rounds."""

    def read(path: str) -> Callable[[Client, int, int], float]:
        def one(c: Client, n: int, i: int) -> float:
            status, body, t = c.call("GET", path, signed=True)
            assert status == 200 and json.loads(body)["halted"] is False, body
            return t

        return one

    reads = {name: Reads() for name, *_ in sides}
    latencies: dict[str, list[float]] = {name: [] for name, *_ in sides}
    for _, _, port, path in sides:  # warm both up
        hammer(port, args.clients, 5, read(path))
    for _ in range(ROUNDS):  # interleaved: a change of the shared machine's load falls on both
        for name, pid, port, path in sides:
            cpu, start = cpu_seconds(pid), time.perf_counter()
            round_latencies = hammer(port, args.clients, args.reads // ROUNDS, read(path))
            reads[name].add(len(round_latencies), time.perf_counter() - start, cpu_seconds(pid) - cpu)
            latencies[name] += round_latencies
    for name, xs in latencies.items():
        p50, p99 = percentiles(xs)
        reads[name].p50.append(p50)
        reads[name].p99.append(p99)
    return reads


def run(args: argparse.Namespace) -> None:
    """The measurements (see the module's docstring)."""
    from benchmarks.wrk_load import HOW_TO_GET, find_wrk

    wrk = None if args.thread_clients else find_wrk()
    if wrk is None and not args.thread_clients:
        print(
            f"bench_api: wrk is not installed: {HOW_TO_GET}. Measuring the reads with Python clients in "
            "threads of this process instead: they share the server's cores and their own interpreter, "
            "and that contention is in every latency below, the floor's included.",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory() as home:
        make_store(home)
        bare, bare_port = start_server(home, bare=True, workers=args.workers)
        custody, port = start_server(home, bare=False, workers=args.workers)
        answered: list[int] = []
        answered_lock = threading.Lock()
        try:
            # The floor gets the same signed requests (it checks nothing) at its own path.
            sides = [("floor", bare.pid, bare_port, "/bare"), ("custody", custody.pid, port, "/v1/halt")]
            if wrk is not None:
                reads = reads_with_wrk(args, wrk, Path(home), sides)
            else:
                reads = reads_with_threads(args, sides)

            def issue(c: Client, n: int, i: int) -> float:
                status, body, t = c.call("POST", f"/v1/accounts/acct-{n}/addresses", b'{"count": 1}')
                assert status == 201, body
                with answered_lock:
                    answered.extend(a["index"] for a in json.loads(body))
                return t

            start, cpu = time.perf_counter(), cpu_seconds(custody.pid)
            hammer(port, args.clients, args.issues, issue)
            api_rate = len(answered) / (time.perf_counter() - start)
            api_cpu = (cpu_seconds(custody.pid) - cpu) / max(len(answered), 1)
        finally:
            for proc in (bare, custody):
                proc.terminate()
                proc.wait(20)
        verdict = check_store(home, answered)
    if args.postgres:  # the library's floor on a schema of its own
        with postgres_schema(args.postgres) as url:
            ENV["CUSTODY_DB_URL"] = url
            lib_rate, lib_cpu = library_rate(min(len(answered), 500))
    else:
        lib_rate, lib_cpu = library_rate(min(len(answered), 500))
    report(args, wrk, reads, verdict, api_rate, api_cpu, lib_rate, lib_cpu)


def report(
    args: argparse.Namespace,
    wrk: str | None,
    reads: dict[str, Reads],
    verdict: str,
    api_rate: float,
    api_cpu: float,
    lib_rate: float,
    lib_cpu: float,
) -> None:
    store = "PostgreSQL" if args.postgres else "SQLite"
    halt, floor = reads["custody"], reads["floor"]
    (p50, p99), (floor_p50, floor_p99) = halt.latency(), floor.latency()
    print(f"{args.clients} concurrent clients on loopback, the store on {store}, {args.workers} server process(es)")
    if wrk is not None:
        print(
            f"reads from wrk ({wrk}): {args.wrk_threads} threads, {args.clients} connections, {ROUNDS} rounds "
            f"of {args.seconds} s a side, alternating, after 1 s of warm-up each; each request signed "
            f"beforehand and sent once, every answer 200; wrk's CPU a request: "
            f"{(halt.client_cpu + floor.client_cpu) / (halt.requests + floor.requests) * 1000:.3f} ms; "
            "percentiles as wrk gives them (corrected for coordinated omission)"
        )
    else:
        print(f"reads from {args.clients} Python threads of this process, {ROUNDS} rounds alternating")
    print(f"halt read (signed), {halt.summary()} (target p99 < 50 ms)")
    print(f"floor: a bare FastAPI endpoint returning a constant, {floor.summary()}")
    print(f"ratio to floor: p50 {p50 / floor_p50:.2f}x, p99 {p99 / floor_p99:.2f}x")
    print(
        f"server CPU a read: {halt.server_cpu / halt.requests * 1000:.2f} ms; "
        f"the floor's: {floor.server_cpu / floor.requests * 1000:.2f} ms"
    )
    print(f"issuance through the API (Python clients in threads): {api_rate:,.0f} requests/s (one address each)")
    print(f"floor: the library's issue_addresses, one at a time in process: {lib_rate:,.0f}/s")
    print(f"ratio: the library is {lib_rate / api_rate:.2f}x the API's rate (target <= 2x)")
    print(f"CPU an issuance: the server's {api_cpu * 1000:.1f} ms, the library's {lib_cpu * 1000:.1f} ms")
    print(f"load: {os.getloadavg()[0]:.1f} (1-minute average, {os.cpu_count()} cores)")
    print(f"nothing lost or duplicated: {verdict}")


if __name__ == "__main__":
    main()
