"""The shared run behind the halt read and the witness check of ``custody serve``: a caller
never gets the outcome of a run that began before it called (a halt raised before a request
came must be in its answer), and callers that come together share one run."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from custody.service.coalesce import AsyncCoalesced, Coalesced


class HeldStore:
    """A store whose first read holds until released, remembering what each read saw."""

    def __init__(self) -> None:
        self.halted = False
        self.first_run_read = threading.Event()
        self.release = threading.Event()
        self.runs: list[bool] = []

    def read(self) -> bool:
        seen = self.halted
        self.runs.append(seen)
        if len(self.runs) == 1:
            self.first_run_read.set()
            assert self.release.wait(30)
        return seen


def test_a_caller_never_gets_a_run_that_began_before_it_called() -> None:
    store = HeldStore()
    first_run_read, release, runs = store.first_run_read, store.release, store.runs
    shared = Coalesced(store.read)
    with ThreadPoolExecutor(8) as pool:
        early = pool.submit(shared.call)
        assert first_run_read.wait(30)  # the first run has read "running" and is still going
        store.halted = True  # a halt raised now ...
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


def test_an_awaiting_caller_never_gets_a_run_that_began_before_it_called() -> None:
    """AsyncCoalesced (the halt read on the event loop): as Coalesced, one thread hop a run."""
    store = HeldStore()
    first_run_read, release, runs = store.first_run_read, store.release, store.runs

    async def scenario() -> tuple[bool, list[bool]]:
        shared = AsyncCoalesced(store.read)
        early = asyncio.ensure_future(shared.call())
        assert await asyncio.to_thread(first_run_read.wait, 30)  # the first run read "running", still going
        store.halted = True  # a halt raised now ...
        late = [asyncio.ensure_future(shared.call()) for _ in range(6)]  # ... before these came
        await asyncio.sleep(0.1)
        abandoned = asyncio.ensure_future(shared.call())  # a caller that goes away ...
        await asyncio.sleep(0)
        abandoned.cancel()  # ... cancels nobody else's answer
        release.set()
        return await early, list(await asyncio.gather(*late))

    early, late = asyncio.run(scenario())
    assert early is False and late == [True] * 6
    assert runs == [False, True], runs  # the six (and the one gone) shared the second run


def test_what_an_awaited_run_raises_every_caller_it_served_raises() -> None:
    def fail() -> None:
        time.sleep(0.05)
        raise RuntimeError("unreadable")

    async def scenario() -> list[BaseException | None]:
        shared = AsyncCoalesced(fail)
        return list(await asyncio.gather(*(shared.call() for _ in range(10)), return_exceptions=True))

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
