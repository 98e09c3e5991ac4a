"""One run of a function shared by the concurrent requests that each need a run that began
after they asked.

Used where fifty requests at once each need the same fresh work: the witness check after a
state change (it must begin after the request's commit) and the halt read (it must read the
store after the request came). A caller gets the outcome of a run that began after its call
did, so the answer is as fresh as a run of its own would be; while one run is going, the
callers arriving meanwhile wait for the next one, which serves them all.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import anyio.to_thread

T = TypeVar("T")

_KEPT = 256
"""Runs whose outcome is remembered for callers still to wake up."""


class Coalesced(Generic[T]):
    """``fn`` run for the callers of :meth:`call`, one run at a time (thread-safe)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._cond = threading.Condition()
        self._asked = 0  # tickets given out, one per call
        self._done = 0  # every ticket up to this one was served by a finished run
        self._running = False
        self._outcomes: deque[tuple[int, int, T | None, BaseException | None]] = deque(maxlen=_KEPT)

    def call(self) -> T:
        """The result of a run of ``fn`` that began after this call; raises what that run raised."""
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._done < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._run()
            for first, last, result, error in reversed(self._outcomes):
                if first <= ticket <= last:
                    if error is not None:
                        raise error
                    return cast(T, result)
        return self._fn()  # fallen out of memory (hundreds of runs since): a run of its own

    def _run(self) -> None:
        """Run ``fn`` for every ticket given out so far; called and returning with the lock held."""
        self._running = True
        first, last = self._done + 1, self._asked
        result: T | None = None
        error: BaseException | None = None
        self._cond.release()
        try:
            result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to every caller this run served
            error = exc
        finally:
            self._cond.acquire()
            self._running = False
            self._done = last
            self._outcomes.append((first, last, result, error))
            self._cond.notify_all()


class AsyncCoalesced(Generic[T]):
    """:class:`Coalesced` for the callers on one event loop: ``fn`` runs in a worker thread, one
    run at a time, and every caller awaits the outcome of a run that began after it called
    (callers arriving during a run share the next one): one thread hop a run, not one a caller."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._running = False
        self._next: asyncio.Future[T] | None = None  # the run after the current one, if anyone waits for it
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self) -> T:
        """The result of a run of ``fn`` that began after this call; raises what that run raised."""
        if not self._running:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._start(future)
        else:
            if self._next is None:
                self._next = asyncio.get_running_loop().create_future()
            future = self._next
        return await asyncio.shield(future)  # a caller that goes away cancels nobody else's answer

    def _start(self, future: asyncio.Future[T]) -> None:
        self._running = True
        future.add_done_callback(_retrieved)
        task = asyncio.get_running_loop().create_task(self._run(future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, future: asyncio.Future[T]) -> None:
        try:
            future.set_result(await anyio.to_thread.run_sync(self._fn))
        except BaseException as exc:  # noqa: BLE001 - handed to every caller this run served
            future.set_exception(exc)
        finally:
            self._running = False
            if self._next is not None:
                waiting, self._next = self._next, None
                self._start(waiting)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a run's exception as seen (every caller that awaited it saw it; none may have)."""
    if not future.cancelled():
        future.exception()
