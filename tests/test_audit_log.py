"""The audit log: every custody event, hash-chained; an edit, deletion, insertion or reordering is found."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.support import Custody, founders


@pytest.fixture
def store(tmp_path: Path) -> Custody:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    alice = c.employee("alice")
    c.employee("bob")
    assert c("address", "new", "--account", "a", "--count", "2").exit_code == 0
    halt = c("halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(alice), "--json")
    halt_id = json.loads(halt.stdout)["halt_id"]
    for who in ("alice", "bob"):
        assert c("halt", "lift", str(halt_id), "--as", who, "--key", str(c.home / "keys" / f"{who}.key")).exit_code == 0
    assert c("employee", "disable", "bob").exit_code == 0
    c.apply_roster()
    assert c("audit", "ledger").exit_code == 0
    return c


def _sql(c: Custody, statement: str, *args: object) -> None:
    db = sqlite3.connect(c.home / "custody.db")
    db.execute(statement, args)
    db.commit()
    db.close()


def _verify(c: Custody) -> tuple[int, dict[str, object]]:
    result = c("audit", "log", "--verify", "--json")
    assert result.stdout.startswith("{"), result.output
    return result.exit_code, json.loads(result.stdout)


def test_every_event_is_logged_with_its_actor_and_the_chain_verifies(store: Custody) -> None:
    entries = store.json("audit", "log")
    events = [e["event"] for e in entries]
    for expected in (
        "policy.set",
        "roster.proposed",
        "roster.applied",
        "address.issued",
        "halt.raised",
        "halt.lift_signed",
        "halt.lifted",
        "audit.ledger",
    ):
        assert expected in events, expected
    raised = next(e for e in entries if e["event"] == "halt.raised")
    assert raised["actor"] == "alice" and raised["signature"]  # signed by the employee who raised it
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    code, report = _verify(store)
    assert code == 0 and report["ok"] and report["problems"] == []


def test_an_edited_entry_is_found(store: Custody) -> None:
    _sql(store, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 3")
    code, report = _verify(store)
    assert code == 3
    assert report["problems"][0]["seq"] == 3 and "edited" in report["problems"][0]["reason"]
    assert store("halt", "status").exit_code == 3  # a broken log halts trading


def test_a_deleted_entry_is_found(store: Custody) -> None:
    _sql(store, "DELETE FROM audit_log WHERE seq = 4")
    code, report = _verify(store)
    assert code == 3 and report["problems"][0]["seq"] == 5
    assert "missing" in report["problems"][0]["reason"]


def test_a_deleted_last_entry_is_found(store: Custody) -> None:
    _sql(store, "DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)")
    code, report = _verify(store)
    assert code == 3 and "head" in report["problems"][0]["reason"]


def test_an_inserted_entry_is_found(store: Custody) -> None:
    db = sqlite3.connect(store.home / "custody.db")
    last = db.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    db.execute(
        "INSERT INTO audit_log (seq, at, event, actor, payload, signature, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?)",
        (last[0] + 1, "2026-01-01 00:00:00", "halt.lifted", "mallory", "{}", None, last[1], "0" * 64),
    )
    db.commit()
    db.close()
    code, report = _verify(store)
    assert code == 3 and any(p["seq"] == last[0] + 1 for p in report["problems"])
    # the forged entry blocks every append, the halt's own included: the engine is halted anyway
    assert "halt_error" in report
    assert json.loads((store.home / "halt.json").read_text())["halted"] is True
    assert store("address", "new", "--account", "a").exit_code == 3
    status = store("halt", "status", "--json")  # the mirror is not flipped back to running
    assert status.exit_code == 3 and "does not end at its head" in json.loads(status.stdout)["error"]
    assert json.loads((store.home / "halt.json").read_text())["halted"] is True


def test_reordered_entries_are_found(store: Custody) -> None:
    db = sqlite3.connect(store.home / "custody.db")
    db.execute("UPDATE audit_log SET seq = -1 WHERE seq = 5")
    db.execute("UPDATE audit_log SET seq = 5 WHERE seq = 6")
    db.execute("UPDATE audit_log SET seq = 6 WHERE seq = -1")
    db.commit()
    db.close()
    code, report = _verify(store)
    assert code == 3 and {p["seq"] for p in report["problems"]} & {5, 6}
