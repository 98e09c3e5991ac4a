"""After each state change of ``custody serve``, as after every CLI command: the audit log
checked against the local witness, and its head appended (:func:`custody.control.witness.after_command`).

Under concurrent requests, one check serves every request that committed before it began:
a request returns only after a check that started after its own commit, so what it changed
is witnessed (or its mismatch raised) before it answers, as before, while fifty requests
that commit together cost one or two checks (each reads the witness file's tail, reads the
log and appends one fsynced line), not fifty.
"""

from __future__ import annotations

import threading
from collections import deque

from custody.config import Settings
from custody.control import witness
from custody.store.db import Database

_KEPT = 256
"""Checks whose outcome is remembered for requests still to wake up."""


class Witnessing:
    """Thread-safe; one per process."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings
        self._cond = threading.Condition()
        self._asked = 0  # tickets given out: one per request, after its commit
        self._done = 0  # every ticket up to this one was covered by a finished check
        self._running = False
        self._outcomes: deque[tuple[int, int, BaseException | None]] = deque(maxlen=_KEPT)

    def after_change(self) -> None:
        """Return after a check that began after this call; raise what that check raised
        (WitnessMismatch when the log disagrees with the witness)."""
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._done < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                first, last = self._done + 1, self._asked
                error: BaseException | None = None
                self._cond.release()
                try:
                    witness.after_command(self._db, self._settings)
                except BaseException as exc:  # noqa: BLE001 - handed to every request this check covered
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done = last
                    self._outcomes.append((first, last, error))
                    self._cond.notify_all()
            error = self._outcome(ticket)
        if error is not None:
            raise error

    def _outcome(self, ticket: int) -> BaseException | None:
        for first, last, error in reversed(self._outcomes):
            if first <= ticket <= last:
                return error
        # Fallen out of memory (hundreds of checks since): check again rather than assume.
        self._cond.release()
        try:
            witness.after_command(self._db, self._settings)
        finally:
            self._cond.acquire()
        return None
