"""Load from wrk, with requests signed beforehand, for ``benchmarks/bench_api.py``.

wrk is a load generator in C (one process, an event loop a thread): the clients' own cost
stays out of the server's latencies, where Python clients in threads put their interpreter's
contention into every one of them, the floor's included. custody serve refuses a request whose
nonce it has seen, so each request is signed here, with its own nonce and the current time,
written to a file, and sent once by ``benchmarks/wrk_presigned.lua``; a run in which any answer
is not 200, or that used up its requests before its duration ended, is void (:meth:`WrkRun.problems`).

wrk's percentiles are its own: corrected for coordinated omission (an answer that took k times
the mean cycle of a connection also counts the requests that connection could not send
meanwhile), the same for custody and the floor, so a little above the raw ones in the tail.
"""

from __future__ import annotations

import math
import os
import resource
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from custody.service import auth

LUA = Path(__file__).with_name("wrk_presigned.lua")
HOW_TO_GET = "scripts/install-bench-tools.sh installs it (Debian's package wrk)"


def find_wrk() -> str | None:
    """The wrk binary on PATH, or None."""
    return shutil.which("wrk")


def presign(secret: bytes, method: str, target: str, count: int) -> list[str]:
    """``count`` requests signed now, each with its own nonce, as lines of the Lua script's file."""
    ts = str(int(time.time()))
    lines = []
    for _ in range(count):
        nonce = secrets.token_hex(16)
        sig = auth.sign(secret, method, target, ts, nonce, b"")
        lines.append(f"{method} {target} {auth.TIMESTAMP}:{ts} {auth.NONCE}:{nonce} {auth.SIGNATURE}:{sig}\n")
    return lines


def write_requests(prefix: Path, lines: list[str], threads: int) -> None:
    """The lines dealt round-robin to one file a wrk thread (``prefix-1``, ``prefix-2``, ...)."""
    for n in range(threads):
        Path(f"{prefix}-{n + 1}").write_text("".join(lines[n::threads]))


@dataclass
class WrkRun:
    """One run of wrk over pre-signed requests: what done() wrote, and wrk's own CPU time."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    signed: int
    ran_out: bool
    unexpected: int = 0
    """Answers whose body lacked the ``expect`` text of :func:`run_wrk`."""
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    wrk_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def ran_out_problem(self) -> str:
        return f"the {self.signed} pre-signed requests ran out before the run's end"

    def problems(self) -> list[str]:
        """What voids the run: an answer other than 200 (a 401 is a nonce sent twice or a stale
        timestamp: a bug of the benchmark; a 429 the server's nonce memory full), a socket error
        or an answer slower than wrk's timeout (left out of its percentiles), requests used up
        before the run's end, answers not all counted."""
        found = []
        refused = {status: n for status, n in sorted(self.statuses.items()) if status != 200}
        if refused:
            found.append("answers other than 200: " + ", ".join(f"{n} x {s}" for s, n in refused.items()))
        errors = {name: n for name, n in sorted(self.errors.items()) if n and name != "status"}
        if errors:
            found.append("wrk's socket errors or timeouts: " + ", ".join(f"{name} {n}" for name, n in errors.items()))
        if self.unexpected:
            found.append(f"{self.unexpected} answers without the text expected")
        if self.ran_out:
            found.append(self.ran_out_problem())
        if sum(self.statuses.values()) != self.requests:
            found.append(f"{self.requests} answers, {sum(self.statuses.values())} counted by the script")
        if not self.requests:
            found.append("no answer")
        return found


def run_wrk(
    wrk: str,
    url: str,
    prefix: Path,
    *,
    seconds: int,
    threads: int,
    connections: int,
    expect: str | None = None,
    timeout: int = 10,
) -> WrkRun:
    """wrk with ``threads`` threads and ``connections`` keep-alive connections against ``url``
    for ``seconds``, each thread sending its file of :func:`write_requests` in order; every
    answer's body should hold ``expect`` when given. Raises SystemExit when wrk fails or writes
    no result."""
    result = Path(f"{prefix}-result")
    result.unlink(missing_ok=True)
    env = {**os.environ, "CUSTODY_WRK_REQUESTS": str(prefix), "CUSTODY_WRK_RESULT": str(result)}
    env.pop("CUSTODY_WRK_EXPECT", None)
    if expect is not None:
        env["CUSTODY_WRK_EXPECT"] = expect
    args = [wrk, f"--threads={threads}", f"--connections={connections}", f"--duration={seconds}s"]
    args += [f"--timeout={timeout}s", f"--script={LUA}", url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"wrk failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    values: dict[str, float] = {}
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    signed = unexpected = 0
    ran_out = False
    for line in result.read_text().splitlines():
        key, value = line.split()
        if key.startswith("status_"):
            statuses[int(key[7:])] = statuses.get(int(key[7:]), 0) + int(value)
        elif key.startswith("error_"):
            errors[key[6:]] = int(value)
        elif key == "signed":
            signed += int(value)
        elif key == "unexpected":
            unexpected += int(value)
        elif key == "ran_out":
            ran_out = True
        else:
            values[key] = float(value)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return WrkRun(
        requests=int(values["requests"]),
        seconds=values["duration_us"] / 1e6,
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        signed=signed,
        ran_out=ran_out,
        unexpected=unexpected,
        statuses=statuses,
        errors=errors,
        wrk_cpu=cpu,
    )


def budget(rate: float, seconds: int, headroom: float, threads: int, connections: int) -> int:
    """Requests to sign for a run of ``seconds`` at up to ``headroom`` times ``rate`` a second
    (one more a thread: wrk asks its first thread for one request to check before it starts)."""
    return math.ceil(rate * seconds * headroom) + connections + threads
