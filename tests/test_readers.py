"""Readers never wait on writers, and never invent a halt because they could not read.

`custody halt status` is what a trading engine polls. On SQLite (WAL) it reads a snapshot
without the write lock, so an issuance holding that lock, or a long store verification,
never makes it wait or answer "halted". A store that truly cannot be read now (a connection
holding it exclusively) answers "unknown" with its own exit code (10), and the halt file is
left to its lease instead of being rewritten.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import pytest

from custody.errors import UNKNOWN_EXIT
from tests.support import Custody, founders, wait_stopped

RUNNING = 0
HALTED = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Custody]:
    c = Custody(tmp_path_factory.mktemp("readers") / "home")
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "seed", "--count", "3000").exit_code == 0
    yield c


def _cli(c: Custody, *args: str, quiet: bool = False, **extra: str) -> subprocess.Popen[str]:
    """``custody ARGS`` in a subprocess; ``quiet``: its output discarded (a writer nobody reads
    must not stop on a full pipe)."""
    env = dict(os.environ, **c.env)
    env.pop("CUSTODY_CRASH_AT", None)
    env.pop("CUSTODY_PAUSE_AT", None)
    env.update(extra)
    sink = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "custody_cli", *args], env=env, stdout=sink, stderr=sink, text=True)


def _status(c: Custody) -> tuple[int, dict[str, object], str]:
    proc = _cli(c, "halt", "status", "--json")
    out, err = proc.communicate(timeout=300)
    return proc.returncode, (json.loads(out) if out.strip() else {}), err


def test_status_reads_beside_an_issuer_that_holds_the_write_lock(store: Custody) -> None:
    """An issuer stopped inside its transaction (SQLite's write lock held, as a long batch
    holds it): `halt status` and `status` answer "running" from the committed state, and the
    issuer then completes."""
    c = store
    issuer = _cli(c, "address", "new", "--account", "held", "--count", "2", CUSTODY_PAUSE_AT="issuance.allocated")
    try:
        wait_stopped(issuer.pid, "the issuer")
        code, doc, err = _status(c)
        assert code == RUNNING, err
        assert doc["halted"] is False
        listed = _cli(c, "status", "--json")
        out, err = listed.communicate(timeout=300)
        view = json.loads(out)
        assert view["halted"] is False and view["error"] is None, (err, out)
        # No node runs here: `custody status` says so at once (exit 8), from the committed
        # state; it never waits for the issuer's write lock (the policy's network, the figures
        # are read without it), so the node's error is the node's, not a locked store's.
        assert listed.returncode == 8, (err, out)
        assert view["node"]["error"].startswith("no node configured"), view["node"]
        assert view["problems"] == [f"the node cannot be reached: {view['node']['error']}"], view["problems"]
    finally:
        os.kill(issuer.pid, signal.SIGCONT)
    _, err = issuer.communicate(timeout=300)
    assert issuer.returncode == 0, err


def test_halt_status_in_a_loop_beside_a_verification_and_an_issuance(store: Custody) -> None:
    """Every answer of a polling loop is right while a store verification and an issuance
    run: "running" until a halt is raised, "halted" after, never anything else."""
    c = store
    writers = [
        _cli(c, "verify", "addresses", "--manifest", str(c.manifest_file), "--workers", "1", quiet=True),
        _cli(c, "address", "new", "--account", "busy", "--count", "4000", quiet=True),
    ]
    answers: list[int] = []
    beside = 0
    while any(w.poll() is None for w in writers) or not answers:
        code, doc, err = _status(c)
        assert code == RUNNING and doc["halted"] is False, (code, doc, err)
        answers.append(code)
        beside += any(w.poll() is None for w in writers)
    for w in writers:
        assert w.wait(timeout=300) == 0
    assert beside >= 1  # at least one answer came while a writer was still at work


def test_a_store_locked_exclusively_answers_unknown_and_leaves_the_halt_file(store: Custody) -> None:
    c = store
    code, _, err = _status(c)
    assert code == RUNNING, err
    halt_file = c.home / "halt.json"
    before = halt_file.read_bytes()
    gc.collect()  # the in-process commands' idle pooled connections would hold the WAL index open
    lock = sqlite3.connect(c.home / "custody.db", isolation_level=None, timeout=60)
    try:
        lock.execute("PRAGMA locking_mode = EXCLUSIVE")
        lock.execute("BEGIN EXCLUSIVE")
        lock.execute("SELECT COUNT(*) FROM audit_log").fetchone()
        code, doc, err = _status(c)
        assert code == UNKNOWN_EXIT, err
        assert doc["halted"] is None and "unknown" in str(doc["error"])
        assert halt_file.read_bytes() == before  # not rewritten as halted: its lease decides
        view = _cli(c, "status", "--json")
        out, err = view.communicate(timeout=300)
        assert view.returncode == UNKNOWN_EXIT, err
        assert json.loads(out)["halted"] is None
    finally:
        lock.close()  # an exclusive locking mode holds the file until the connection closes
    code, doc, err = _status(c)
    assert code == RUNNING and doc["halted"] is False, err
