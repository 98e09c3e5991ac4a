"""The red team's attacks on issuance's raw-SQL path under the audit head's lock, by an insider
with the store's SQL (no founder's key, not the code), on SQLite and PostgreSQL.

* the chain's counter row edited: rewound onto issued indexes, set past the last unhardened
  index, set negative: nothing may be issued (no duplicate, no address that is not the
  policy's at its index), no audit entry appended;
* an address row planted by SQL at the index the next issuance will take (a foreign address,
  as if issued): the issuance must refuse rather than skip or overwrite it, and the row check
  names the planted row;
* (PostgreSQL) a trigger that swallows the ``address.issued`` entry while the rows and the head
  go in: the next writer's guard must halt (the log no longer ends at its head), and the row
  check names the unlogged rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from custody.config import Settings
from custody.errors import CustodyError, HaltedError
from custody.issuance import issuer
from custody.issuance.record import check_rows
from custody.policy.generator import AddressDeriver
from custody.store.db import Database
from tests.test_issuance_prediction import _store


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'custody.db'}"
    else:
        yield request.getfixturevalue("pg_url")


def _issued_three(tmp_path: Path, url: str) -> tuple[Database, Settings, AddressDeriver, tuple[int, str]]:
    db, settings, deriver = _store(tmp_path, url)
    issuer.issue_addresses(db, settings, "acct", 3)
    return db, settings, deriver, _head(db)


def _head(db: Database) -> tuple[int, str]:
    with db.transaction(read_only=True) as s:
        seq, digest = s.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one()
        return int(seq), str(digest)


def _sql(db: Database, statement: str, **params: object) -> None:
    with db.engine.begin() as conn:
        conn.execute(text(statement), params)


@pytest.mark.parametrize("value", [0, 2, 2**31 - 1, -1])
def test_a_counter_row_edited_by_sql_issues_nothing(tmp_path: Path, url: str, value: int) -> None:
    """Rewound onto issued indexes (0, 2), at the last unhardened index (a batch of two would
    cross into the hardened range), negative."""
    db, settings, deriver, head = _issued_three(tmp_path, url)
    _sql(db, "UPDATE counter SET next_value = :v", v=value)
    with pytest.raises(CustodyError):
        issuer.issue_addresses(db, settings, "acct", 2)
    assert _head(db) == head  # no entry appended
    stored = issuer.list_addresses(db)  # the three rows as issued: no duplicate, every one its index's
    assert [(a.index, a.address) for a in stored] == [(i, deriver.derive(0, i).address) for i in range(3)]
    with db.transaction(read_only=True) as s:
        failures = check_rows(s, issuer.iter_addresses(s))
    assert any("counter was changed outside the tool" in f.reason for f in failures), failures  # the edit named
    db.dispose()


def test_an_address_planted_at_the_next_index_is_refused_and_named(tmp_path: Path, url: str) -> None:
    db, settings, deriver, head = _issued_three(tmp_path, url)
    foreign = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
    _sql(
        db,
        "INSERT INTO address (chain, idx, account, address, script_pubkey, script, created_at) "
        "VALUES (0, 3, 'acct', :a, '0014751e76e8199196d454941c45d1b3a323f1433bd6', '', CURRENT_TIMESTAMP)",
        a=foreign,
    )
    with pytest.raises(CustodyError):
        issuer.issue_addresses(db, settings, "acct", 1)
    assert _head(db) == head
    assert [a.address for a in issuer.list_addresses(db)][:3] == [deriver.derive(0, i).address for i in range(3)]
    with db.transaction(read_only=True) as s:
        failures = check_rows(s, issuer.iter_addresses(s))
    assert [(f.address, f.index) for f in failures if "inserted outside the tool" in f.reason] == [(foreign, 3)], (
        failures
    )
    db.dispose()


def test_a_trigger_swallowing_the_issuance_entry_halts_the_next_writer(tmp_path: Path, pg_url: str) -> None:
    db, settings, deriver, head = _issued_three(tmp_path, pg_url)
    _sql(
        db,
        "CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.event = 'address.issued' THEN RETURN NULL; END IF; RETURN NEW; END $$",
    )
    _sql(db, "CREATE TRIGGER swallow BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION swallow()")
    issuer.issue_addresses(db, settings, "acct", 1)  # the rows and the head go in, the entry does not
    _sql(db, "DROP TRIGGER swallow ON audit_log")
    with pytest.raises(HaltedError, match="does not end at its head"):
        issuer.issue_addresses(db, settings, "acct", 1)
    with db.transaction(read_only=True) as s:
        failures = check_rows(s, issuer.iter_addresses(s))
    assert [f.index for f in failures if "never issued in the audit log" in f.reason] == [3], failures
    db.dispose()
