"""The red team's attacks on issuance's raw-SQL path under the audit head's lock, by an insider
with the store's SQL (no founder's key, not the code), on SQLite and PostgreSQL.

* the chain's counter row edited: rewound onto issued indexes, set past the last unhardened
  index, set negative: nothing may be issued (no duplicate, no address that is not the
  policy's at its index), no audit entry appended;
* an address row planted by SQL at the index the next issuance will take (a foreign address,
  as if issued): the issuance must refuse rather than skip or overwrite it, and the row check
  names the planted row;
* a trigger that swallows the ``address.issued`` entry (the rows and the head would go in):
  the issuance must fail and store nothing, not hand out addresses no entry records.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from custody.config import Settings
from custody.errors import CustodyError, StorageError
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


_SWALLOW = {
    "postgresql": [
        "CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.event = 'address.issued' THEN RETURN NULL; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER swallow BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION swallow()",
    ],
    "sqlite": [
        "CREATE TRIGGER swallow BEFORE INSERT ON audit_log WHEN NEW.event = 'address.issued' "
        "BEGIN SELECT RAISE(IGNORE); END",
    ],
}


def test_a_trigger_swallowing_the_issuance_entry_stores_nothing(tmp_path: Path, url: str) -> None:
    """A trigger that silently drops the ``address.issued`` entry (the rows and the head would go
    in): the issuance fails and stores nothing, so no address is handed out that no entry
    records; the store is as it was, and once the trigger is gone issuance goes on from there."""
    db, settings, deriver, head = _issued_three(tmp_path, url)
    for statement in _SWALLOW[db.engine.dialect.name]:
        _sql(db, statement)
    with pytest.raises(StorageError, match="did not keep the audit log entry"):
        issuer.issue_addresses(db, settings, "acct", 1)
    assert _head(db) == head  # no entry, no head move
    assert [a.index for a in issuer.list_addresses(db)] == [0, 1, 2]  # no row without its entry
    _sql(db, "DROP TRIGGER swallow" + (" ON audit_log" if db.engine.dialect.name == "postgresql" else ""))
    (fresh,) = issuer.issue_addresses(db, settings, "acct", 1)
    assert (fresh.index, fresh.address) == (3, deriver.derive(0, 3).address)
    with db.transaction(read_only=True) as s:
        assert check_rows(s, issuer.iter_addresses(s)) == []
    db.dispose()
