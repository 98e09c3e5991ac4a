"""An insider with the store's SQL makes it drop audit entries silently: a trigger that skips
the INSERT without an error (SQLite's ``RAISE(IGNORE)``, a PostgreSQL BEFORE trigger that
returns NULL) while the rest of the transaction goes in. A halt is derived from the log: a
``halt.raised`` entry dropped would be a halt the employee is told is raised and the store does
not hold. Every append must fail instead, its transaction store nothing, and the command say
so: the halt then waits in the halt file, as one a store refuses outright, and stops custody
state until the store records it. (Issuance's raw append: tests/test_issuance_sql_attacks.py.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from custody.control import audit_log, halt_file
from custody.errors import StorageError
from tests.test_attack_halt_pending import shop_halts
from tests.test_issuance_prediction import _store
from tests.test_issuance_sql_attacks import _head
from tests.test_withdraw_embedded import EmbeddedShop

SWALLOW_SQLITE = (
    "CREATE TRIGGER swallow BEFORE INSERT ON audit_log WHEN NEW.event = 'halt.raised' BEGIN SELECT RAISE(IGNORE); END"
)


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path, "p2wsh")
    yield s
    s.chain.close()


def _sql(home: Path, statement: str) -> None:
    with sqlite3.connect(home / "custody.db") as db:
        db.execute(statement)


def _log(home: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(home / "custody.db") as db:
        return db.execute("SELECT seq, event FROM audit_log ORDER BY seq").fetchall()


def test_a_swallowed_halt_entry_is_no_silent_success(shop: EmbeddedShop) -> None:
    c = shop.c
    before = _log(c.home)
    _sql(c.home, SWALLOW_SQLITE)
    raised = c("halt", "raise", "--reason", "the hot wallet drains", *shop.as_("carol"))
    assert raised.exit_code == 9, raised.output  # not "halt #1 raised"
    assert "did not keep the audit log entry" in raised.stderr and "waits in the halt file" in raised.stderr
    assert _log(c.home) == before and shop_halts(c) == []  # the halt row went back with the entry
    assert [p["reason"] for p in halt_file.pending(c.home / "halt.json")] == ["the hot wallet drains"]
    status = c("halt", "status", "--json")
    assert status.exit_code == 3 and '"halted": true' in status.output, status.output
    issued = c("address", "new", "--account", "x")
    assert issued.exit_code == 3 and "waits in the halt file" in issued.stderr, issued.output
    assert _log(c.home) == before  # nothing issued

    _sql(c.home, "DROP TRIGGER swallow")  # the store keeps entries again: the next command records it
    assert c("halt", "status", "--json").exit_code == 3
    assert halt_file.pending(c.home / "halt.json") == [] and [who for _, who in shop_halts(c)] == ["carol"]
    assert [e for _, e in _log(c.home)][len(before) :].count("halt.raised") == 1
    assert c("address", "new", "--account", "x").exit_code == 3  # the recorded halt stands


def test_a_swallowed_entry_fails_the_append_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The ORM append on PostgreSQL: a BEFORE trigger returning NULL drops the entry; the append
    raises, the transaction stores nothing, the head stays where it was."""
    db, _settings, _deriver = _store(tmp_path, pg_url)
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN IF NEW.event = 'probe' THEN RETURN NULL; END IF; RETURN NEW; END $$"
            )
        )
        conn.execute(text("CREATE TRIGGER swallow BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION swallow()"))
    head = _head(db)
    with pytest.raises(StorageError, match="did not keep the audit log entry"), db.transaction() as s:
        audit_log.append(s, "probe", "mallory", {"n": 1})
    assert _head(db) == head
    with db.transaction() as s:  # any other event goes in as before
        audit_log.append(s, "probe.other", "mallory", {"n": 2})
    assert _head(db)[0] == head[0] + 1
    db.dispose()
