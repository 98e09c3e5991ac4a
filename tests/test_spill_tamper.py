"""The red team's attack on the audits' temporary files (custody.store.sorted_runs).

``audit ledger`` and ``audit log --verify`` sort what the audit log recorded through
temporary files when there is more than a chunk of it, and compare it with the rows after.
An insider with the online machine's files (the same user: ``/proc/PID/fd/N`` opens an
unlinked temporary file) rewrites the log's side in the spilled run between its write and its
read, to agree with a ledger row she edited by SQL: the audit must refuse to answer, not say
the ledger matches its log. The attacker acts at the first query for the rows (an SQLAlchemy
event on the real engine: the moment the runs are written and not yet read), through a file
handle of her own, found by content as she would find it.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from custody.errors import StorageError
from custody.store.sorted_runs import SortedRuns
from tests.test_ledger_log import _problems, _sql, books  # noqa: F401  (the fixture)


def _spilled_files() -> Iterator[int]:
    """File descriptors of this process open on regular files with no name left (the runs)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if stat.S_ISREG(os.stat(f"/proc/self/fd/{fd}").st_mode) and target.endswith("(deleted)"):
                yield int(fd)
        except OSError:
            continue


def _rewrite(old: bytes, new: bytes) -> int:
    """As the insider: open every spilled run through /proc with a handle of her own and replace
    ``old`` with ``new`` (same length) in place. How many files were rewritten."""
    rewritten = 0
    for fd in _spilled_files():
        handle = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            data = os.pread(handle, 1 << 20, 0)
            if old in data:
                os.pwrite(handle, data.replace(old, new), 0)
                rewritten += 1
        finally:
            os.close(handle)
    return rewritten


def _marshalled_int(value: int) -> list[bytes]:
    body = struct.pack("<i", value)
    return [b"i" + body, b"\xe9" + body]  # marshal's int, without and with its reference flag


def test_a_spilled_run_rewritten_to_match_an_edited_row_is_refused(books: Any) -> None:  # noqa: F811
    """Posting 11's customer entry (c2, -1011 sat) edited by SQL to -5011, and the log's copy
    of it rewritten to -5011 in the spilled run before the comparison reads it back: without
    the run's digests the audit found nothing."""
    c, db = books
    _sql(c, "UPDATE ledger_entry SET amount = -5011 WHERE amount = -1011")
    tampered: list[int] = []

    def attacker(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM ledger_entry" in statement and not tampered:
            tampered.append(
                sum(_rewrite(o, n) for o, n in zip(_marshalled_int(-1011), _marshalled_int(-5011), strict=True))
            )

    event.listen(db.engine, "before_cursor_execute", attacker)
    try:
        with pytest.raises(StorageError, match="temporary file"):
            _problems(db)
    finally:
        event.remove(db.engine, "before_cursor_execute", attacker)
    assert tampered == [1]  # the attack reached the run that held the posting


@pytest.mark.parametrize("ordered", [True, False])
def test_a_run_cut_short_or_rewritten_is_refused_before_it_is_read(tmp_path: Path, ordered: bool) -> None:
    """A block dropped from the end of a run, or one item rewritten, in both reading paths (runs
    one after the other, and merged)."""
    items = [(k, f"acct{k:04}") for k in range(9000)]
    for attack in ("rewrite", "truncate"):
        with ExitStack() as stack:
            runs = SortedRuns(6000, stack)
            runs.extend(items[:6000] if ordered else items[3000:9000])
            runs.extend(items[6000:] if ordered else items[:3000])
            assert len(runs.runs) == 1
            run, _ = runs.runs[0]
            path = f"/proc/self/fd/{run.fileno()}"
            if attack == "rewrite":
                assert _rewrite(b"acct5000", b"acct5999") == 1
            else:
                os.truncate(path, os.stat(path).st_size - 100)
            with pytest.raises(StorageError, match="temporary file"):
                for _ in runs.blocks():
                    pass
