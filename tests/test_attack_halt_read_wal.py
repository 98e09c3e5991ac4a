"""An insider with the online machine's files against the cached halt read of ``custody serve``
on SQLite: the store's write-ahead log and its index (``-wal``, ``-shm``) removed under the
running service. No byte of the store is written outside SQLite.

The service's connections keep the removed files open and go on reading through them; the next
connection (any command) makes new ones and commits there. The halt read is keyed on
``PRAGMA data_version``, which the service's own connection reads from the index it holds: no
commit ever reaches it, so the key never moves and the cached "running" would be served through
the employee's halt for as long as the service runs, while ``custody halt status`` says halted.
The read must notice that the files it reads through are no longer the store's.
"""

from __future__ import annotations

import gc
import signal
import sqlite3
from pathlib import Path

from tests.service_support import Client, Server, halted_metric
from tests.support import Custody, founders, run_cli


def test_a_halt_committed_through_a_new_write_ahead_log_reaches_the_running_service(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    alice = c.employee("alice")
    svc = c.employee("svc", roles="request")
    store = c.home / "custody.db"
    gc.collect()
    server = Server(c.env, tmp_path, "svc", svc)
    try:
        client = Client(server.url)
        assert client.ok("GET", "/v1/halt")["halted"] is False  # cached: running
        assert halted_metric(server) == 0.0

        gc.collect()  # no pooled connection of an in-process command holds the files
        raw = sqlite3.connect(store)
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every commit in the store file itself
        raw.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{store}{suffix}").unlink()

        # The employee's halt, from a process of its own (as every command runs): new files, then a commit.
        raised = run_cli(
            c.env, "halt", "raise", "--reason", "the hot wallet drains", "--as", "alice", "--key", str(alice)
        )
        assert raised.returncode == 0, raised.stderr
        assert run_cli(c.env, "halt", "status").returncode == 3  # the store: halted

        assert halted_metric(server) == 1.0
        for _ in range(2):
            served = client.ok("GET", "/v1/halt")
            assert served["halted"] is True, served  # halted, or the state unreadable: never running
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
