"""benchmarks/bench_api.py's reads: requests signed beforehand in Python (benchmarks/wrk_load.py),
sent by wrk through benchmarks/wrk_presigned.lua to a real ``custody serve``.

No timing here (benchmarks/ measures). What is checked is that the benchmark measures what it
says: every request it sends is accepted by the server, and a run that any answer but 200 came
back in (a nonce sent twice: a bug of the benchmark, whose requests would then be cheap
refusals, not reads), or that used up its requests before its end (idle connections measured),
is void rather than reported. wrk comes from scripts/install-bench-tools.sh (scripts/test.sh
runs it); without wrk these tests skip, saying so.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.bench_api import NOT_HALTED
from benchmarks.wrk_load import HOW_TO_GET, find_wrk, presign, run_wrk, write_requests
from tests.service_support import SECRET, Server
from tests.support import Custody, founders

WRK = find_wrk()
pytestmark = pytest.mark.skipif(WRK is None, reason=f"wrk is not installed: {HOW_TO_GET}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("wrk")
    c = Custody(tmp / "home")
    assert c.init(founders()).exit_code == 0
    server = Server(c.env, tmp, "svc", c.employee("svc", roles="request"))
    yield server
    assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()


def test_each_presigned_read_is_accepted_and_the_same_set_sent_again_voids_the_run(
    server: Server, tmp_path: Path
) -> None:
    assert WRK is not None
    prefix = tmp_path / "reads"
    # Far more than a second of reads can use on this machine: the run must not run out.
    write_requests(prefix, presign(SECRET, "GET", "/v1/halt", 20_000), threads=2)
    first = run_wrk(WRK, server.url + "/", prefix, seconds=1, threads=2, connections=4, expect=NOT_HALTED)
    assert first.requests > 0 and first.statuses == {200: first.requests} and not first.unexpected, first
    assert first.problems() == [], first

    # The same file again: the nonces the first run used are spent, the server refuses them.
    again = run_wrk(WRK, server.url + "/", prefix, seconds=1, threads=2, connections=4)
    assert again.statuses.get(401, 0) > 0, again
    assert any("other than 200" in p and "x 401" in p for p in again.problems()), again.problems()


def test_a_set_used_up_before_the_end_voids_the_run(server: Server, tmp_path: Path) -> None:
    assert WRK is not None
    prefix = tmp_path / "few"
    write_requests(prefix, presign(SECRET, "GET", "/v1/halt", 10), threads=2)
    run = run_wrk(WRK, server.url + "/", prefix, seconds=1, threads=2, connections=4)
    assert run.ran_out and 0 < run.requests <= 10 and run.statuses == {200: run.requests}, run
    assert any("ran out" in p for p in run.problems()), run.problems()
