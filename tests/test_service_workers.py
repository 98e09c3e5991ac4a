"""``custody serve --workers 2`` through real HTTP clients: the halt read's cache never answers
"running" when the store says halted, and fails closed on a tampered head; two worker
processes behind one port issue unique, gap-free indexes and refuse each other's replayed
writes; a replayed read is answered at most once per process (docs/THREAT_MODEL.md); a
worker that dies stops the service.

The store is SQLite (the embedded default); every change the halt read must see is made by
the CLI or by SQL on the store file while the server's caches are warm.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.service_support import Client, Server
from tests.support import Custody, founders
from tests.test_halt_file import engine_check

trading_allowed = engine_check()


@dataclass
class Served:
    c: Custody
    keys: dict[str, Path]
    server: Server
    tmp: Path

    def clients(self, n: int = 6) -> list[Client]:
        """Clients with connections of their own (so that both workers answer some)."""
        return [Client(self.server.url) for _ in range(n)]

    def reads(self, clients: list[Client] | None = None) -> list[dict[str, Any]]:
        """The halt document as each client reads it (twice each: the second from a warm cache)."""
        docs = []
        for client in clients or self.clients():
            for _ in range(2):
                docs.append(client.ok("GET", "/v1/halt"))
        return docs

    def sql(self, statement: str, *params: Any) -> None:
        with sqlite3.connect(self.c.home / "custody.db") as db:
            db.execute(statement, params)

    def as_(self, who: str) -> list[str]:
        return ["--as", who, "--key", str(self.keys[who])]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("workers")
    c = Custody(tmp / "home")
    assert c.init(founders()).exit_code == 0
    keys = {name: c.employee(name) for name in ("alice", "bob")}
    keys["svc"] = c.employee("svc", roles="request")
    server = Server(c.env, tmp, "svc", keys["svc"], "--workers", "2")
    try:
        yield Served(c, keys, server, tmp)
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
        assert "Traceback" not in server.log.read_text()


def _halted(docs: list[dict[str, Any]], tmp: Path) -> bool:
    """Every document says halted, and the README's engine check refuses each; False when every
    one says running and the check allows it; anything else fails."""
    verdicts = set()
    for i, doc in enumerate(docs):
        path = tmp / f"halt-{i}.json"
        path.write_text(json.dumps(doc))
        allowed = trading_allowed(str(path))
        assert allowed is (doc["halted"] is False), doc
        verdicts.add(allowed)
    assert len(verdicts) == 1, docs
    return not verdicts.pop()


def _workers(server: Server) -> list[int]:
    pid = server.proc.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_halt_raised_by_the_cli_and_rows_edited_by_sql_are_seen_by_the_next_read(
    served: Served, tmp_path: Path
) -> None:
    clients = served.clients()
    assert len(_workers(served.server)) == 2
    assert not _halted(served.reads(clients), tmp_path)  # both workers' caches warm: running

    raised = served.c("halt", "raise", "--reason", "drill", *served.as_("alice"), "--json")
    assert raised.exit_code == 0, raised.output
    halt_id = json.loads(raised.stdout)["halt_id"]
    docs = served.reads(clients)
    assert _halted(docs, tmp_path) and {d["halts"][0]["id"] for d in docs} == {halt_id}

    # The halt's row marked lifted by SQL: the log still says halted (no head moved).
    served.sql("UPDATE halt SET active = 0 WHERE id = ?", halt_id)
    docs = served.reads(clients)
    assert _halted(docs, tmp_path) and all("says lifted" in d["halts"][0]["problem"] for d in docs)
    served.sql("UPDATE halt SET active = 1 WHERE id = ?", halt_id)

    for who in ("alice", "bob"):
        assert served.c("halt", "lift", str(halt_id), *served.as_(who)).exit_code == 0
    assert not _halted(served.reads(clients), tmp_path)

    # A halt row planted by SQL, the log's head untouched: a cache keyed on the head alone would
    # still answer "running"; this one reads the rows and answers what the derivation says.
    served.sql(
        "INSERT INTO halt (raised_at, raised_by, source, reason, active) VALUES (?, 'mallory', 'employee', 'x', 1)",
        datetime(2026, 1, 1).isoformat(sep=" "),
    )
    docs = served.reads(clients)
    assert _halted(docs, tmp_path) and all("not in the audit log" in d["halts"][0]["problem"] for d in docs)
    served.sql("DELETE FROM halt WHERE raised_by = 'mallory'")
    assert not _halted(served.reads(clients), tmp_path)

    # The lift's entry in the middle of the log rewritten by SQL (its signatures spoiled): halted again.
    with sqlite3.connect(served.c.home / "custody.db") as db:
        seq, payload = db.execute("SELECT seq, payload FROM audit_log WHERE event = 'halt.lifted'").fetchone()
    spoiled = json.loads(payload)
    for lift in spoiled["lifts"]:
        lift["signature"] = lift["signature"][::-1]
    served.sql("UPDATE audit_log SET payload = ? WHERE seq = ?", json.dumps(spoiled), seq)
    docs = served.reads(clients)
    assert _halted(docs, tmp_path) and all("valid employee signature" in d["halts"][0]["problem"] for d in docs)
    served.sql("UPDATE audit_log SET payload = ? WHERE seq = ?", payload, seq)
    assert not _halted(served.reads(clients), tmp_path)

    # The founders-signed roster the lifters were read from, rewritten by SQL to carry one
    # founder's signature (under the quorum): it no longer stands, nobody could lift, halted again.
    with sqlite3.connect(served.c.home / "custody.db") as db:
        rosters = db.execute("SELECT serial, document FROM roster").fetchall()
    assert rosters, "the fixture's employees come from a founders-signed roster"
    for serial, document in rosters:
        one = json.loads(document)
        one["signatures"] = one["signatures"][:1]
        served.sql("UPDATE roster SET document = ? WHERE serial = ?", json.dumps(one), serial)
    assert _halted(served.reads(clients), tmp_path)
    for serial, document in rosters:
        served.sql("UPDATE roster SET document = ? WHERE serial = ?", document, serial)
    assert not _halted(served.reads(clients), tmp_path)


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE audit_head SET seq = seq - 1",  # the log runs past its head
        "UPDATE audit_head SET hash = '" + "ab" * 32 + "'",  # the head no longer the last entry's
        "DELETE FROM audit_head",
    ],
)
def test_a_tampered_audit_head_fails_closed_for_this_answer_only(served: Served, tmp_path: Path, tamper: str) -> None:
    clients = served.clients()
    assert not _halted(served.reads(clients), tmp_path)
    with sqlite3.connect(served.c.home / "custody.db") as db:
        seq, digest = db.execute("SELECT seq, hash FROM audit_head").fetchone()
    served.sql(tamper)
    try:
        docs = served.reads(clients)
        assert _halted(docs, tmp_path)
        for doc in docs:
            assert "error" in doc and doc["valid_until"] == doc["updated_at"], doc  # no lease on an error
    finally:
        served.sql("INSERT OR REPLACE INTO audit_head (id, seq, hash) VALUES (1, ?, ?)", seq, digest)
    assert not _halted(served.reads(clients), tmp_path)


def test_two_workers_issue_unique_gap_free_indexes_and_refuse_each_others_replayed_writes(served: Served) -> None:
    before = len(served.c.json("address", "list"))
    clients = served.clients(10)

    def issue(i: int) -> list[int]:
        r = clients[i % 10].call("POST", f"/v1/accounts/acct-{i % 7}/addresses", json={"count": 2})
        assert r.status_code == 201, r.text
        return [a["index"] for a in r.json()]

    with ThreadPoolExecutor(10) as pool:
        indexes = [i for batch in pool.map(issue, range(60)) for i in batch]
    assert sorted(indexes) == list(range(before, before + 120))
    # Each request answered only after a witness check that began after its commit (checks are
    # shared by concurrent requests): the last head is in the witness file before any CLI runs.
    with sqlite3.connect(served.c.home / "custody.db") as db:
        head = db.execute("SELECT seq, hash FROM audit_head").fetchone()
    witnessed = [json.loads(line) for line in (served.c.home / "witness.jsonl").read_text().splitlines()]
    assert any(w["seq"] == head[0] and w["hash"] == head[1] for w in witnessed), (head, witnessed[-3:])

    # The same signed write on two new connections at once, eight times: one answer each time.
    def race(n: int) -> list[int]:
        signer = Client(served.server.url)
        req = signer.sign(signer.prepare("POST", f"/v1/accounts/race-{n}/addresses", json={}))
        with ThreadPoolExecutor(2) as both:
            answers = list(both.map(lambda _: requests.Session().send(req, timeout=60), range(2)))
        return sorted(a.status_code for a in answers)

    assert [race(n) for n in range(8)] == [[201, 401]] * 8
    stored = sorted(a["index"] for a in served.c.json("address", "list"))
    assert stored == list(range(before + 120 + 8))
    log = served.c.json("audit", "log")
    assert sum(e["payload"]["count"] for e in log if e["event"] == "address.issued") == before + 128


def test_a_replayed_read_is_answered_at_most_once_per_process(served: Served) -> None:
    signer = Client(served.server.url)
    req = signer.sign(signer.prepare("GET", "/v1/halt"))
    answers = [requests.Session().send(req, timeout=60).status_code for _ in range(20)]  # new connections
    assert set(answers) <= {200, 401} and 1 <= answers.count(200) <= len(_workers(served.server)), answers
    # and never again on a connection that was already answered
    session = requests.Session()
    session.send(req, timeout=60)
    assert session.send(req, timeout=60).status_code == 401


def test_a_worker_that_dies_stops_the_service(served: Served) -> None:
    server = Server(served.c.env, served.tmp, "svc", served.keys["svc"], "--workers", "2")
    try:
        first, second = _workers(server)
        os.kill(first, signal.SIGKILL)
        server.proc.wait(30)
        assert server.proc.returncode == 1
        assert f"worker {first} exited" in server.log.read_text() and "stopped" in server.log.read_text()
        assert not Path(f"/proc/{second}").exists()  # stopped, and collected before the service exited
    finally:
        server.stop()


def test_workers_refuse_the_embedded_chain(served: Served) -> None:
    served.c.env["CUSTODY_CHAIN"] = "embedded"
    try:
        args = ["serve", *served.as_("svc"), "--secret-file", str(served.server.secret_file), "--workers", "2"]
        refused = served.c(*args)
    finally:
        del served.c.env["CUSTODY_CHAIN"]
    assert refused.exit_code == 2 and "embedded chain" in refused.output
