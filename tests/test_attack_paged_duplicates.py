"""The red team's attack on the reads that page by key, by an insider with the store's SQL.

The verifications read the address table by ``(chain, idx) > last`` and the audit log by
``seq > last``, a page at a time (custody.issuance.issuer.iter_addresses,
custody.control.audit_log.iter_chain). With the unique constraint dropped (the table rebuilt
without it on SQLite, ``DROP CONSTRAINT`` on PostgreSQL), a second row with the key of a
page's last row is returned by no page: ``verify addresses``, the row check and ``audit log
--verify`` passed without ever seeing it. Now every command that uses the store refuses (exit
3) and the verifications halt. The pages are made two rows long, so the duplicate sits on a
page boundary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from custody.books import ledger_log
from custody.control import audit_log
from custody.issuance import issuer
from custody.store.db import Database
from tests.support import Custody, founders

FOREIGN = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'custody.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(issuer, "ADDRESS_BATCH", 2)
    monkeypatch.setattr(audit_log, "CHAIN_BATCH", 2)
    monkeypatch.setattr(ledger_log, "CHUNK", 2)


def _custody(tmp_path: Path, url: str) -> Custody:
    c = Custody(tmp_path / "home", url)
    assert c.init(founders()).exit_code == 0
    issued = c("address", "new", "--account", "acct", "--count", "4")
    assert issued.exit_code == 0, issued.output
    return c


def _sql(url: str, *statements: str) -> None:
    db = Database(url)
    with db.engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    db.dispose()


def _rebuilt(table: str) -> list[str]:
    """SQLite: the table made again by CREATE TABLE AS, which keeps no constraint."""
    return [
        f"CREATE TABLE {table}_copy AS SELECT * FROM {table}",
        f"DROP TABLE {table}",
        f"ALTER TABLE {table}_copy RENAME TO {table}",
    ]


def _pending(c: Custody) -> list[str]:
    """The sources of the halts waiting in the halt file (the store refuses to record them)."""
    doc = json.loads((c.home / "halt.json").read_text())
    return [p["source"] for p in doc.get("pending", [])]


def _refused(c: Custody) -> None:
    verified = c("verify", "addresses", "--manifest", str(c.manifest_file))
    assert verified.exit_code == 3, verified.output
    assert _pending(c) == ["verification"]  # halted: the engine stops at once
    log = c("audit", "log", "--verify")
    assert log.exit_code == 3, log.output
    assert "page by page" in log.output, log.output
    assert sorted(_pending(c)) == ["audit-log", "verification"]
    issued = c("address", "new", "--account", "acct")
    assert issued.exit_code == 3, issued.output
    status = c("halt", "status")
    assert status.exit_code == 3, status.output  # the engine reads halted


def test_a_second_address_row_at_a_page_boundary_is_refused(tmp_path: Path, url: str) -> None:
    c = _custody(tmp_path, url)
    if url.startswith("sqlite"):
        drop = _rebuilt("address")
    else:
        drop = ["ALTER TABLE address DROP CONSTRAINT uq_address_chain_idx"]
    _sql(
        url,
        *drop,
        # (0, 1) ends the first page of two: `(chain, idx) > (0, 1)` never returns this row
        "INSERT INTO address (id, chain, idx, account, address, script_pubkey, script, created_at) "
        f"SELECT 99, 0, 1, 'mallory', '{FOREIGN}', '0014751e76e8199196d454941c45d1b3a323f1433bd6', '', "
        "created_at FROM address WHERE idx = 0",
    )
    _refused(c)


def test_a_second_audit_entry_at_a_page_boundary_is_refused(tmp_path: Path, url: str) -> None:
    c = _custody(tmp_path, url)
    if url.startswith("sqlite"):
        drop = _rebuilt("audit_log")
    else:
        drop = ["ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey"]
    _sql(
        url,
        *drop,
        # seq 2 ends the first page of two: `seq > 2` never returns this entry
        "INSERT INTO audit_log (seq, at, event, actor, payload, signature, prev_hash, hash, origin) "
        "SELECT seq, at, 'halt.lifted', actor, payload, signature, prev_hash, hash, origin "
        "FROM audit_log WHERE seq = 2",
    )
    _refused(c)


def test_a_key_that_allows_null_is_refused(tmp_path: Path, pg_url: str) -> None:
    """A NULL key is returned by no page either (NULL > x is never true). PostgreSQL only:
    SQLite drops NOT NULL only by rebuilding the table, which drops the key too (above)."""
    c = _custody(tmp_path, pg_url)
    _sql(pg_url, "ALTER TABLE address ALTER COLUMN idx DROP NOT NULL")
    _refused(c)


def test_the_intact_store_passes(tmp_path: Path, url: str) -> None:
    """The checks above fail for the attack, not for the small pages."""
    c = _custody(tmp_path, url)
    assert c("verify", "addresses", "--manifest", str(c.manifest_file)).exit_code == 0
    assert c("audit", "log", "--verify").exit_code == 0
    assert c("address", "new", "--account", "acct").exit_code == 0
