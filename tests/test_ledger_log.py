"""The ledger's rows against the audit log's postings, read in chunks smaller than the ledger.

Every test sets the chunk to 3 rows, so the log's postings are sorted in several runs spilled
to temporary files and merged, and the rows are read in several pages: an edit, a deletion or
an insertion past the first chunk must still be named, and a log whose postings are not in id
order (as concurrent postings on PostgreSQL may leave it) must not be a false alarm.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from custody.books import audit, ledger, ledger_log
from custody.config import Settings
from custody.store.db import Database
from tests.support import Custody, founders

CHUNK = 3
POSTINGS = 12  # 24 entries, 12 transactions: eight chunks of entries, four of transactions


@pytest.fixture
def books(tmp_path: Path) -> Iterator[tuple[Custody, Database]]:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    db = Database(Settings.load(env=c.env).db_url)
    for k in range(POSTINGS):
        with db.transaction() as s:
            amount = 1000 + k
            ledger.post(
                s,
                "deposit.credited",
                [(ledger.ASSET, amount), (ledger.customer(f"c{k % 3}"), -amount)],
                ref=f"deposit:{k}",
            )
    yield c, db
    db.dispose()


def _sql(c: Custody, statement: str, *args: object) -> None:
    con = sqlite3.connect(c.home / "custody.db")
    with con:
        con.execute(statement, args)
    con.close()


def _problems(db: Database, chunk: int | None = CHUNK, shown: int = 20) -> list[str]:
    with db.transaction() as s:
        return ledger_log.log_problems(s, shown, chunk)


def test_an_intact_ledger_passes_across_chunk_boundaries(books: tuple[Custody, Database]) -> None:
    _, db = books
    assert _problems(db) == []
    assert _problems(db, chunk=1) == []
    assert _problems(db, chunk=None) == []  # one chunk, nothing spilled


def test_an_amount_changed_after_the_first_chunk_is_named(books: tuple[Custody, Database]) -> None:
    c, db = books
    _sql(c, "UPDATE ledger_entry SET amount = amount + 7 WHERE id = 20")
    problems = _problems(db)
    assert len(problems) == 1 and problems[0].startswith("ledger entry #20 says") and "changed outside" in problems[0]


def test_an_entry_deleted_and_one_inserted_past_the_first_chunk_are_named(books: tuple[Custody, Database]) -> None:
    c, db = books
    _sql(c, "DELETE FROM ledger_entry WHERE id = 17")
    _sql(
        c,
        "INSERT INTO ledger_entry (id, txn_id, account_id, amount) "
        "SELECT 99, txn_id, account_id, 5 FROM ledger_entry WHERE id = 18",
    )
    _sql(c, "DELETE FROM ledger_txn WHERE id = 11")
    problems = _problems(db)
    assert any(p.startswith("ledger entry #17") and "deleted outside the tool" in p for p in problems)
    assert any(p.startswith("ledger entry #99") and "inserted outside the tool" in p for p in problems)
    assert any(p.startswith("ledger transaction #11") and "not in the ledger" in p for p in problems)
    assert len(problems) == 3


def test_postings_logged_out_of_id_order_are_no_false_alarm(books: tuple[Custody, Database]) -> None:
    """The first and last postings' log entries swap their payloads: the log's order is no
    longer id order, across runs; the same postings are recorded, so nothing differs."""
    c, db = books
    con = sqlite3.connect(c.home / "custody.db")
    seqs = [r[0] for r in con.execute("SELECT seq FROM audit_log WHERE event = 'ledger.posted' ORDER BY seq")]
    first, last = (
        con.execute("SELECT payload FROM audit_log WHERE seq = ?", (q,)).fetchone()[0] for q in (seqs[0], seqs[-1])
    )
    with con:
        con.execute("UPDATE audit_log SET payload = ? WHERE seq = ?", (last, seqs[0]))
        con.execute("UPDATE audit_log SET payload = ? WHERE seq = ?", (first, seqs[-1]))
    con.close()
    assert _problems(db) == []
    _sql(c, "UPDATE ledger_entry SET amount = amount - 1 WHERE id = 1")  # and a change is still found
    assert [p[:18] for p in _problems(db)] == ["ledger entry #1 sa"]


def test_an_unreadable_posting_after_the_first_chunk_is_named_by_its_entry(books: tuple[Custody, Database]) -> None:
    c, db = books
    con = sqlite3.connect(c.home / "custody.db")
    seq = con.execute("SELECT seq FROM audit_log WHERE event = 'ledger.posted' ORDER BY seq DESC LIMIT 1").fetchone()[0]
    con.close()
    _sql(
        c,
        "UPDATE audit_log SET payload = ? WHERE seq = ?",
        json.dumps({"txn": "12", "event": "x", "ref": "y", "entries": []}),
        seq,
    )
    problems = _problems(db)
    assert f"audit log entry {seq} is not a readable posting record" in problems
    assert any(p.startswith("ledger transaction #12") and "not in the audit log" in p for p in problems)


def test_many_differences_name_the_first_and_count_the_rest_exactly(books: tuple[Custody, Database]) -> None:
    c, db = books
    _sql(c, "UPDATE ledger_entry SET amount = amount + 1")
    problems = _problems(db, shown=5)
    assert len(problems) == 5 and problems[-1].endswith("(and 19 more differences from the audit log)")


def test_the_audit_reads_in_chunks_and_exits_3(
    books: tuple[Custody, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    c, db = books
    monkeypatch.setattr(ledger_log, "CHUNK", CHUNK)
    assert audit.audit_ledger(db, Settings.load(env=c.env), halt_on_failure=False)["ok"]
    _sql(c, "UPDATE ledger_entry SET amount = amount + 1 WHERE id = 22")
    _sql(c, "UPDATE ledger_entry SET amount = amount - 1 WHERE id = 23")  # still sums to zero
    result = c("audit", "ledger", "--json")
    assert result.exit_code == 3
    assert any(p.startswith("ledger entry #22 says") for p in json.loads(result.stdout)["problems"])
