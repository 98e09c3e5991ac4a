"""``custody serve``'s witness check after each state change, attacked between two issuances.

After every state change the service checks the audit log against the local witness file and
appends its head, as every CLI command does (custody.control.witness); a long-running process
does it from what it parsed before (LocalWitness). An insider who edits the log by SQL, or the
witness file by hand, while the server runs must be caught by the very next state change, as
a command would catch it: that request answers 423 with WitnessMismatch (exit code 3), trading
is halted with the witness named, and nothing is appended to the witness after the disagreement.
Each edit is made to an entry or a line from before the last head this process confirmed, so a
check that looked only at what came since would miss it. And the ordinary traffic of the
file, another process's lines, a line torn by a crash, raises no alarm.

A real uvicorn on loopback, a real HTTP client, the store SQLite (the embedded default).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select

from custody.control import audit_log
from custody.store.db import Database
from custody.store.models import AuditEntry
from tests.service_support import Client, Server
from tests.support import Custody, founders


@dataclass
class Served:
    c: Custody
    server: Server
    client: Client

    @property
    def witness(self) -> Path:
        return self.c.home / "witness.jsonl"

    def issue(self, account: str = "acct-1") -> Any:
        return self.client.call("POST", f"/v1/accounts/{account}/addresses", json={"count": 1})

    def sql(self, statement: str, *params: Any) -> list[Any]:
        with sqlite3.connect(self.c.home / "custody.db") as db:
            return db.execute(statement, params).fetchall()

    def head(self) -> tuple[int, str]:
        ((seq, digest),) = self.sql("SELECT seq, hash FROM audit_head")
        return seq, digest

    def witnessed(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.witness.read_text().splitlines()]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    svc = c.employee("svc", roles="request")
    server = Server(c.env, tmp_path, "svc", svc)
    try:
        yield Served(c, server, Client(server.url))
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
        assert "Traceback" not in server.log.read_text()


def _issued(served: Served, n: int) -> list[tuple[int, str]]:
    """``n`` issuances through the API, each answered 201; the head after each."""
    heads = []
    for i in range(n):
        r = served.issue(f"acct-{i % 3}")
        assert r.status_code == 201, r.text
        heads.append(served.head())
    return heads


# ---------------------------------------------------------------- the edits, between two requests


def entry_hash_edited(served: Served, early: tuple[int, str]) -> None:
    """The hash of an entry the witness saw as a head several requests ago, edited by SQL."""
    served.sql("UPDATE audit_log SET hash = ? WHERE seq = ?", "ab" * 32, early[0])


def log_rehashed_from_an_early_entry(served: Served, early: tuple[int, str]) -> None:
    """An early entry's payload rewritten, and the chain re-hashed from there to the head: the
    chain verifies, only the witness can tell."""
    seq = early[0]
    ((payload,),) = served.sql("SELECT payload FROM audit_log WHERE seq = ?", seq)
    doc = json.loads(payload)
    doc["account"] = "mallory"  # an issuance's: the address given to another account
    served.sql("UPDATE audit_log SET payload = ? WHERE seq = ?", audit_log.canonical(doc), seq)
    db = Database(served.c.env["CUSTODY_DB_URL"])
    with db.transaction() as s:
        rows = list(s.exec(select(AuditEntry).where(col(AuditEntry.seq) >= seq).order_by(col(AuditEntry.seq))))
        prev = s.exec(select(AuditEntry.hash).where(AuditEntry.seq == seq - 1)).one()
    db.dispose()
    for e in rows:
        at = audit_log._at(e.at)
        digest = audit_log.entry_hash(e.seq, at, e.event, e.actor, e.payload, e.signature, prev, e.origin)
        served.sql("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?", prev, digest, e.seq)
        prev = digest
    served.sql("UPDATE audit_head SET hash = ? WHERE id = 1", prev)
    with db.transaction() as s:
        assert audit_log.verify_chain(s) == []  # consistent, as far as the chain alone can tell
    db.dispose()


def log_truncated_and_head_set_back(served: Served, early: tuple[int, str]) -> None:
    """Every entry after an early head deleted and the head set back to it: the chain verifies."""
    served.sql("DELETE FROM audit_log WHERE seq > ?", early[0])
    served.sql("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", *early)


def witness_line_edited(served: Served, early: tuple[int, str]) -> None:
    """The witness file's line of an early head given another hash, in place (same length)."""
    text = served.witness.read_text()
    line = next(ln for ln in text.splitlines() if json.loads(ln)["seq"] == early[0])
    assert text.count(line) == 1
    served.witness.write_text(text.replace(line, line.replace(early[1], "cd" * 32)))


def witness_file_replaced(served: Served, early: tuple[int, str]) -> None:
    """The witness file swapped (a new file renamed over it) for a copy in which a line before
    the last is another log's: a line of the same bytes as one seen before, but another file."""
    lines = served.witness.read_text().splitlines(keepends=True)
    at = next(i for i, ln in enumerate(lines) if json.loads(ln)["seq"] == early[0])
    doc = json.loads(lines[at])
    doc["hash"] = "ef" * 32
    lines[at] = json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"
    swapped = served.witness.with_name("witness.swapped")
    swapped.write_text("".join(lines))
    os.replace(swapped, served.witness)


EDITS: list[Callable[[Served, tuple[int, str]], None]] = [
    entry_hash_edited,
    log_rehashed_from_an_early_entry,
    log_truncated_and_head_set_back,
    witness_line_edited,
    witness_file_replaced,
]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__ for e in EDITS])
def test_an_edit_between_two_issuances_is_caught_by_the_next_one(
    served: Served, edit: Callable[[Served, tuple[int, str]], None]
) -> None:
    heads = _issued(served, 8)
    early, last = heads[2], heads[-1]
    witnessed = served.witnessed()
    assert witnessed[-1]["seq"] == last[0] and witnessed[-1]["hash"] == last[1]
    assert any(w["seq"] == early[0] for w in witnessed)

    edit(served, early)
    before = served.witness.read_text()

    r = served.issue()
    assert r.status_code == 423, r.text
    error = r.json()["error"]
    assert error["kind"] == "WitnessMismatch" and error["exit_code"] == 3, error
    assert "disagrees with the witness" in error["message"]
    # Trading halted, the witness named as the reason; the witness kept what it saw.
    state = json.loads((served.c.home / "halt.json").read_text())
    assert state["halted"] is True
    assert any("witness" in h["reason"] for h in state["halts"]), state
    assert served.witness.read_text() == before
    # And the next request is refused by the halt before it issues anything.
    count = served.sql("SELECT COUNT(*) FROM address")
    again = served.issue()
    assert again.status_code == 423 and again.json()["error"]["exit_code"] == 3, again.text
    assert served.sql("SELECT COUNT(*) FROM address") == count


def test_other_writers_and_a_torn_line_raise_no_alarm(served: Served) -> None:
    _issued(served, 3)
    # Another process's commands append their own lines between two requests.
    for _ in range(2):
        assert served.c("audit", "ledger").exit_code == 0
    assert _issued(served, 2)
    # A crash in the middle of someone's append: the torn line is skipped, then cut off.
    with served.witness.open("a") as fh:
        fh.write('{"format":"custody-checkpoint","seq":9')
    heads = _issued(served, 2)
    witnessed = served.witnessed()  # every line whole again
    assert (witnessed[-1]["seq"], witnessed[-1]["hash"]) == heads[-1]
    assert json.loads((served.c.home / "halt.json").read_text())["halted"] is False
