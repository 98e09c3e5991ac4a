"""The address rows' check (:func:`custody.issuance.record.check_rows`) in a second process,
beside the chain's check: ``custody audit log --verify`` spends about as long walking the
address rows against the log's issuances as re-hashing the chain, and on two cores both run
at once.

The worker (``python -m custody.issuance.row_check``, its request on stdin: the store's URL
never shows in a process listing) opens its own read transaction, so its snapshot begins a
moment after the caller's. It hashes the sequence and stored hash of every ``address.issued``
entry it judged the rows by (:func:`custody.control.audit_log.entry_mark`, in log order), and
the caller compares that with the same digest taken over the chain it verified itself
(:func:`custody.control.audit_log.verify_chain_counted`'s ``tally``). Equal, the rows were
judged against exactly the entries the chain check verified (each re-hashed by the worker
too), and a row that moved between the two snapshots is judged as it stood in the worker's,
later one. Different (an issuance committed between the two snapshots, or an entry edited
meanwhile), the caller checks the rows again itself, in its own snapshot, as it would have
without a worker (:attr:`RowCheck.result` says which).

A worker that is killed, raises, or says anything but a whole result is never a pass: the
caller raises :class:`RowCheckFailed` (exit code 1; a CustodyError the worker raised, a
StorageError say, is raised again as itself, with its own exit code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import IO, Any

from custody import errors, faults
from custody.errors import CustodyError

PROGRESS_EVERY = 10_000
"""Rows the worker checks between two progress lines."""


class RowCheckFailed(CustodyError):
    """The address rows' check in its own process did not complete: no result, never a pass."""


@dataclass(frozen=True)
class RowResult:
    """What the worker found: the problems as ``audit log --verify`` names them (the first
    ``shown``), the digest of the issuances it read, the rows it read."""

    problems: list[str]
    issued: str
    rows: int


def cores() -> int:
    """The cores this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class RowCheck:
    """A worker started now; :meth:`result` waits for its answer; :meth:`close` ends it."""

    def __init__(self, url: str, shown: int, batches: dict[str, int]) -> None:
        self.done = 0
        """Rows the worker has checked so far (its last progress line)."""
        self._answer: dict[str, Any] | None = None
        self._garbled = ""
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "custody.issuance.row_check"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._reader = threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True)
        self._reader.start()
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"url": url, "shown": shown, "batches": batches}).encode())
            self._proc.stdin.close()
        except OSError:  # the worker died at once: said by result()
            pass

    def _read(self, out: IO[bytes]) -> None:
        for line in out:
            try:
                message = json.loads(line)
            except ValueError:  # cut off (killed while writing) or not ours
                self._garbled = line[:200].decode("utf-8", "replace")
                continue
            if isinstance(message, dict) and isinstance(message.get("done"), int) and len(message) == 1:
                self.done = message["done"]
            elif isinstance(message, dict):
                self._answer = message

    def wait(self, timeout: float) -> bool:
        """Whether the worker has finished, waiting up to ``timeout`` seconds."""
        self._reader.join(timeout)
        return not self._reader.is_alive()

    def result(self) -> RowResult:
        """The worker's answer, once it has finished (waits for it).

        Raises RowCheckFailed when it gave none (killed, crashed, cut off, failed) and the
        worker's own CustodyError when it raised one."""
        self._reader.join()
        code = self._proc.wait()
        answer = self._answer
        if code == 0 and answer is not None and "problems" in answer:
            try:
                return RowResult([str(p) for p in answer["problems"]], str(answer["issued"]), int(answer["rows"]))
            except (KeyError, TypeError, ValueError):
                pass
        if answer is not None and "error" in answer:
            kind = getattr(errors, str(answer.get("kind")), None)
            message = str(answer["error"])
            if isinstance(kind, type) and issubclass(kind, CustodyError):
                raise kind(message)
            raise RowCheckFailed(f"the address rows were not checked: their checking process failed: {message}")
        raise RowCheckFailed(f"the address rows were not checked: their checking process {self._ended(code)}")

    def _ended(self, code: int) -> str:
        how = f"was killed (signal {-code})" if code < 0 else f"exited {code} without a result"
        if self._garbled:
            how += f" (it wrote {self._garbled!r})"
        self._stderr.seek(0)
        last = [line for line in self._stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return how + (f": {last[-1].strip()}" if last else "")

    def close(self) -> None:
        """End the worker if it still runs (the caller failed or is done) and release its pipes."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._reader.join()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _check(url: str, shown: int, batches: dict[str, int]) -> dict[str, Any]:
    """The worker's work: every address row against the issuances, in one read transaction."""
    import hashlib

    from custody.control import audit_log
    from custody.issuance import record
    from custody.store.db import Database

    record.ROW_BATCH = batches.get("address", record.ROW_BATCH)
    record.ISSUED_CHUNK = batches.get("issued", record.ISSUED_CHUNK)
    audit_log.CHAIN_BATCH = batches.get("chain", audit_log.CHAIN_BATCH)
    db = Database(url)
    seen = hashlib.sha256()
    rows = 0

    def counted() -> Any:
        nonlocal rows
        for row in record.iter_address_rows(s):
            yield row
            rows += 1
            if rows % PROGRESS_EVERY == 0:
                _send({"done": rows})

    try:
        with db.transaction(read_only=True) as s:
            faults.fail_point("audit.rows_checking")
            failures = record.check_rows(s, counted(), seen=seen)
    finally:
        db.dispose()
    faults.crash_point("audit.rows_checked")
    return {"problems": [record.problem(f) for f in failures[:shown]], "issued": seen.hexdigest(), "rows": rows}


def main() -> None:
    """The worker: read the request from stdin, write progress lines and one result (or error)."""
    try:
        request = json.loads(sys.stdin.read())
        _send(_check(str(request["url"]), int(request["shown"]), dict(request["batches"])))
    except CustodyError as exc:
        _send({"error": str(exc), "kind": type(exc).__name__})
    except Exception as exc:  # anything else: said, never a pass (the caller raises RowCheckFailed)
        _send({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
