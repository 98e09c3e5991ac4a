"""The schema: created and upgraded by the tool itself; a newer one is refused, not touched."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from custody.store.models import SCHEMA_VERSION
from tests.support import Custody, founders


def _db(c: Custody) -> sqlite3.Connection:
    return sqlite3.connect(c.home / "custody.db")


def test_a_store_from_a_newer_tool_is_refused(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    with _db(c) as db:
        db.execute("UPDATE custody_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    for args in (("policy", "show"), ("address", "new", "--account", "a")):
        result = c(*args)
        assert result.exit_code == 9 and "newer than this tool" in result.stderr
    with _db(c) as db:
        assert db.execute("SELECT value FROM custody_meta").fetchone()[0] == str(SCHEMA_VERSION + 1)
        assert db.execute("SELECT COUNT(*) FROM address").fetchone()[0] == 0


def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    """Version 1 had no ledger: its tables are created and the head row added, data kept."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    issued = c.json("address", "new", "--account", "a", "--count", "2")
    with _db(c) as db:
        for table in ("ledger_entry", "ledger_txn", "ledger_account", "ledger_head", "deposit"):
            db.execute(f"DROP TABLE {table}")
        db.execute("UPDATE custody_meta SET value = '1' WHERE key = 'schema_version'")
    assert [a["address"] for a in c.json("address", "list")] == [a["address"] for a in issued]
    with _db(c) as db:
        assert db.execute("SELECT value FROM custody_meta").fetchone()[0] == str(SCHEMA_VERSION)
        assert db.execute("SELECT total, entries FROM ledger_head").fetchone() == (0, 0)
    assert c("audit", "ledger").exit_code == 0
    assert c("audit", "log", "--verify").exit_code == 0


def test_a_version_2_store_gets_the_liability_account_numbers_table(tmp_path: Path) -> None:
    """Version 2 had no account numbers for the proof of liabilities: the table is created."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    with _db(c) as db:
        db.execute("DROP TABLE liability_account")
        db.execute("UPDATE custody_meta SET value = '2' WHERE key = 'schema_version'")
    assert c("policy", "show").exit_code == 0
    with _db(c) as db:
        assert db.execute("SELECT value FROM custody_meta").fetchone()[0] == str(SCHEMA_VERSION)
        assert db.execute("SELECT COUNT(*) FROM liability_account").fetchone()[0] == 0


def _tables(c: Custody) -> set[str]:
    with _db(c) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_store_made_before_the_notification_tables_gets_them_in_its_upgrade(tmp_path: Path) -> None:
    """The notification tables came during version 2 without a version of their own: the
    store's upgrade creates them (the notify layer no longer does), and keeps the rest."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    issued = c.json("address", "new", "--account", "a")
    with _db(c) as db:
        db.execute("DROP TABLE notify_cursor")
        db.execute("DROP TABLE notify_recipient")
        db.execute("UPDATE custody_meta SET value = '2' WHERE key = 'schema_version'")
    assert {"notify_cursor", "notify_recipient"} & _tables(c) == set()
    assert c.json("notify", "recipient", "list") == []
    assert {"notify_cursor", "notify_recipient"} <= _tables(c)
    with _db(c) as db:
        assert db.execute("SELECT value FROM custody_meta").fetchone()[0] == str(SCHEMA_VERSION)
    assert c("notify", "recipient", "add", "ops@exchange.example").exit_code == 0
    assert [r["target"] for r in c.json("notify", "recipient", "list")] == ["ops@exchange.example"]
    assert [a["address"] for a in c.json("address", "list")] == [a["address"] for a in issued]
    assert c("audit", "log", "--verify").exit_code == 0


def test_a_newer_store_missing_tables_is_refused_before_any_table_is_made(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    with _db(c) as db:
        db.execute("DROP TABLE notify_cursor")
        db.execute("UPDATE custody_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    before = _tables(c)
    for args in (("notify", "recipient", "list"), ("halt", "status")):
        result = c(*args)
        assert result.exit_code in (3, 9) and "newer than this tool" in result.stderr, result.output
    assert _tables(c) == before


def test_a_dropped_halt_table_is_not_made_again_empty(tmp_path: Path) -> None:
    """A store at this version missing a table is damaged: recreating the table empty would
    fail open (a dropped halt table would read as "not halted"). It stays missing and the
    tool refuses, halted."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    alice = c.employee("alice")
    assert c("halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(alice)).exit_code == 0
    with _db(c) as db:
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute("DROP TABLE halt_lift")
        db.execute("DROP TABLE halt")
    status = c("halt", "status", "--json")
    assert status.exit_code == 3
    assert "halt" not in _tables(c) and "halt_lift" not in _tables(c)
    assert c("address", "new", "--account", "a").exit_code in (3, 9)


def test_a_version_3_store_is_upgraded_to_rulebooks(tmp_path: Path) -> None:
    """Version 3 had no rulebook: its tables are created, the built-in rules apply, data kept."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    issued = c.json("address", "new", "--account", "a", "--count", "2")
    with _db(c) as db:
        for table in ("rulebook", "rulebook_proposal"):
            db.execute(f"DROP TABLE {table}")
        db.execute("UPDATE custody_meta SET value = '3' WHERE key = 'schema_version'")
    assert [a["address"] for a in c.json("address", "list")] == [a["address"] for a in issued]
    with _db(c) as db:
        assert db.execute("SELECT value FROM custody_meta").fetchone()[0] == str(SCHEMA_VERSION)
        assert db.execute("SELECT COUNT(*) FROM rulebook").fetchone() == (0,)
    assert c("audit", "log", "--verify").exit_code == 0
