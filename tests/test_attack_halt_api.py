"""An insider with the store's SQL against the halt read of ``custody serve`` (``GET /v1/halt``).

The insider makes the store refuse every new halt (a trigger: the same answer as a full disk
or a read-only file, which is what the halt file's ``pending`` journal exists for). An employee
raises a halt: the store cannot record it, so it waits in the halt file, which says halted.
The service's halt read answers under the halt file's contract, so it must say halted too
(README: ``halted`` is false only when the store shows no standing halt and nothing waits in
``pending``), or every trading process polling it trades through the employee's halt.
"""

from __future__ import annotations

import gc
import json
import signal
import sqlite3
from pathlib import Path

from custody.control import halt_file
from tests.service_support import Client, Server
from tests.support import Custody, founders
from tests.test_halt_file import engine_check


def test_a_halt_the_store_refuses_to_record_halts_the_service_read(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    alice = c.employee("alice")
    svc = c.employee("svc", roles="request")
    gc.collect()
    server = Server(c.env, tmp_path, "svc", svc)
    try:
        client = Client(server.url)
        assert client.ok("GET", "/v1/halt")["halted"] is False

        with sqlite3.connect(c.home / "custody.db") as db:  # the insider: no halt row goes in any more
            db.execute("CREATE TRIGGER refuse_halts BEFORE INSERT ON halt BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        raised = c("halt", "raise", "--reason", "the hot wallet drains", "--as", "alice", "--key", str(alice))
        assert "could not record" in raised.output, raised.output
        waiting = halt_file.pending(c.home / "halt.json")
        assert [p["reason"] for p in waiting] == ["the hot wallet drains"]
        assert c("halt", "status").exit_code == 3  # the store keeps refusing: the file keeps saying halted

        doc = client.ok("GET", "/v1/halt")
        (tmp_path / "served.json").write_text(json.dumps(doc))
        assert doc["halted"] is True, doc
        assert [p["id"] for p in doc["pending"]] == [p["id"] for p in waiting]
        assert not engine_check()(str(tmp_path / "served.json"))
        issued = client.call("POST", "/v1/accounts/acct-1/addresses", json={"count": 1})  # the guard agrees
        assert issued.status_code == 423 and issued.json()["error"]["exit_code"] == 3, issued.text
        with sqlite3.connect(c.home / "custody.db") as db:
            assert db.execute("SELECT COUNT(*) FROM address").fetchone()[0] == 0

        with sqlite3.connect(c.home / "custody.db") as db:  # the store records it again: the log's halt stands
            db.execute("DROP TRIGGER refuse_halts")
        assert c("halt", "status").exit_code == 3
        doc = client.ok("GET", "/v1/halt")
        assert doc["halted"] is True and len(doc["halts"]) == 1 and "pending" not in doc, doc
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
