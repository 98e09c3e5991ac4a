"""The shared run behind the halt read and the witness check of ``custody serve``: a caller
never gets the outcome of a run that began before it called (a halt raised before a request
came must be in its answer), and callers that come together share one run."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from custody.service.coalesce import Coalesced


def test_a_caller_never_gets_a_run_that_began_before_it_called() -> None:
    store = {"halted": False}
    first_run_read = threading.Event()
    release = threading.Event()
    runs = []

    def read() -> bool:
        seen = store["halted"]
        runs.append(seen)
        if len(runs) == 1:
            first_run_read.set()
            assert release.wait(30)
        return seen

    shared = Coalesced(read)
    with ThreadPoolExecutor(8) as pool:
        early = pool.submit(shared.call)
        assert first_run_read.wait(30)  # the first run has read "running" and is still going
        store["halted"] = True  # a halt raised now ...
        late = [pool.submit(shared.call) for _ in range(6)]  # ... before these came
        time.sleep(0.2)  # let them wait behind the first run
        release.set()
        assert early.result(30) is False
        assert [f.result(30) for f in late] == [True] * 6
    # Every later run began after the halt; the six waiting callers shared runs (one, unless the
    # machine was too slow to bring them all in within the 0.2 s).
    assert runs[0] is False and all(runs[1:]) and 2 <= len(runs) < 7, runs


def test_what_a_run_raises_every_caller_it_served_raises() -> None:
    calls = 0

    def fail() -> None:
        nonlocal calls
        calls += 1
        time.sleep(0.05)
        raise RuntimeError(f"run {calls}")

    shared = Coalesced(fail)
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(shared.call) for _ in range(10)]
        for f in futures:
            with pytest.raises(RuntimeError, match="run"):
                f.result(30)
    assert 1 <= calls <= 10
