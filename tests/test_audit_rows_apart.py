"""`audit log --verify` with the address rows checked in a second process (custody.issuance.
row_check), forced on a small store: every insider's SQL edit the one-process check catches is
still caught, and named the same way; a worker that is killed or fails is never a pass.

Each store is attacked by SQL from outside the tool (SQLite and PostgreSQL). That the worker
judged the rows (and this process did not check them again) is seen by counting this
process's own row checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from custody.books import audit
from custody.control import audit_log
from custody.control.wallet import load_policy
from custody.faults import FAIL_POINTS
from custody.issuance import record, row_check
from custody.policy.generator import AddressDeriver
from custody.store.db import Database, normalize_url
from tests.support import Custody, founders


class Store:
    """A small store (three issuances, seven rows per query) whose rows a worker checks."""

    def __init__(self, tmp: Path, db_url: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
        self.c = Custody(tmp / "home", db_url=db_url)
        assert self.c.init(founders()).exit_code == 0
        for account, count in (("alice", 12), ("bob", 9), ("carol", 5)):
            assert self.c("address", "new", "--account", account, "--count", str(count)).exit_code == 0
        self.engine = create_engine(normalize_url(self.c.env["CUSTODY_DB_URL"]))
        self.here: list[int] = []  # row checks run in this process
        original = record.check_rows

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.here.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(record, "check_rows", counted)
        monkeypatch.setattr(record, "ROW_BATCH", 7)
        monkeypatch.setattr(audit_log, "CHAIN_BATCH", 7)
        monkeypatch.setattr(record, "ISSUED_CHUNK", 2)
        monkeypatch.setattr(row_check, "cores", lambda: 2)  # on any machine

    def sql(self, statement: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return [tuple(r) for r in result.fetchall()] if result.returns_rows else []

    def verify(self, apart: bool = True) -> tuple[int, dict[str, Any]]:
        """``audit log --verify --json``, the rows in a worker (``apart``) or in this process."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(audit, "ROWS_APART", 0 if apart else 10**9)
            before = len(self.here)
            result = self.c("audit", "log", "--verify", "--json")
            assert len(self.here) - before == (0 if apart else 1)  # the worker's answer was taken
        return result.exit_code, json.loads(result.stdout)

    def reasons(self) -> list[str]:
        """The problems found with the rows checked apart, which must be those found here."""
        code, report = self.verify(apart=True)
        assert code == 3 and not report["ok"], report
        _, alone = self.verify(apart=False)
        assert [p["reason"] for p in alone["problems"]] == [p["reason"] for p in report["problems"]]
        return [p["reason"] for p in report["problems"]]

    def halted(self) -> bool:
        return self.c("halt", "status").exit_code == 3


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    s = Store(tmp_path, url, monkeypatch)
    yield s
    s.engine.dispose()


def test_an_intact_store_passes_with_its_rows_checked_apart(store: Store) -> None:
    code, report = store.verify()
    assert code == 0 and report["ok"] and report["problems"] == [], report


def test_an_address_row_given_to_another_account_is_caught_apart(store: Store) -> None:
    store.sql("UPDATE address SET account = 'mallory' WHERE chain = 0 AND idx = 13")
    reasons = store.reasons()
    assert any("(0/13)" in r and "account 'mallory'" in r and "issued it to 'bob'" in r for r in reasons), reasons
    assert store.halted()


def test_an_edited_issuance_entry_is_caught_apart(store: Store) -> None:
    (seq,) = store.sql("SELECT seq FROM audit_log WHERE event = 'address.issued' ORDER BY seq")[1]
    payload = store.sql("SELECT payload FROM audit_log WHERE seq = :s", s=seq)[0][0]
    store.sql("UPDATE audit_log SET payload = :p WHERE seq = :s", p=payload.replace('"bob"', '"mallory"'), s=seq)
    store.sql("UPDATE address SET account = 'mallory' WHERE account = 'bob'")
    reasons = store.reasons()
    assert f"audit log entry {seq} (address.issued) was edited" in " ".join(reasons), reasons
    assert any("content does not match its hash" in r for r in reasons), reasons  # the chain's own finding


def test_a_deleted_address_row_is_caught_apart(store: Store) -> None:
    store.sql("DELETE FROM address WHERE chain = 0 AND idx = 22")
    reasons = store.reasons()
    assert any("(0/22)" in r and "deleted outside the tool" in r for r in reasons), reasons


def test_an_address_row_added_without_an_entry_is_caught_apart(store: Store) -> None:
    db = Database(store.c.env["CUSTODY_DB_URL"])
    derived = AddressDeriver(load_policy(db)).derive(0, 40)  # a real address: the verifier alone would pass it
    db.dispose()
    store.sql(
        "INSERT INTO address (chain, idx, account, address, script_pubkey, script, created_at) "
        "VALUES (0, 40, 'mallory', :a, :spk, :script, CURRENT_TIMESTAMP)",
        a=derived.address,
        spk=derived.script_pubkey.hex(),
        script=derived.script.hex(),
    )
    reasons = store.reasons()
    assert any(f"address {derived.address} (0/40)" in r and "never issued in the audit log" in r for r in reasons)


def test_an_issuance_between_the_two_snapshots_has_the_rows_checked_here(store: Store) -> None:
    """The worker's snapshot begins after this process's: an issuance committed in between
    (here, a forged one with no rows: the worker would name its rows missing) makes the two
    disagree on the issuances, and the rows are checked again here, against this snapshot."""
    started = row_check.RowCheck.__init__

    def between(self: row_check.RowCheck, *args: Any) -> None:
        with Database(store.c.env["CUSTODY_DB_URL"]).transaction() as s:
            payload = {"chain": 0, "first_index": 26, "count": 3, "account": "dave", "addresses_sha256": "0" * 64}
            audit_log.append(s, record.ISSUED, "operator", payload)
        started(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(row_check.RowCheck, "__init__", between)
        mp.setattr(audit, "ROWS_APART", 0)
        result = store.c("audit", "log", "--verify", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"], result.output
    assert len(store.here) == 1  # checked again here
    # After it, the forged issuance is in every snapshot: its three rows are missing.
    reasons = store.reasons()
    assert sum("deleted outside the tool" in r and "'dave'" in r for r in reasons) == 3, reasons


@pytest.mark.parametrize(
    "variable,point,said",
    [
        ("CUSTODY_CRASH_AT", "audit.rows_checked", "their checking process was killed (signal 9)"),
        ("CUSTODY_FAIL_AT", "audit.rows_checking", "No space left on device"),
    ],
)
def test_a_worker_killed_or_failing_is_never_a_pass(
    store: Store, monkeypatch: pytest.MonkeyPatch, variable: str, point: str, said: str
) -> None:
    """Killed after checking every row (its result unsaid), or failing as on a full disk: exit
    1, the reason on stderr, no report, nothing recorded; on an intact store and on a broken one."""
    for broken in (False, True):
        if broken:
            store.sql("UPDATE address SET account = 'mallory' WHERE chain = 0 AND idx = 3")
        entries = store.sql("SELECT COUNT(*) FROM audit_log")
        store.c.env[variable] = point
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(audit, "ROWS_APART", 0)
            result = store.c("audit", "log", "--verify", "--json")
        del store.c.env[variable]
        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        assert "the address rows were not checked" in result.stderr and said in result.stderr, result.stderr
        assert store.sql("SELECT COUNT(*) FROM audit_log") == entries  # no audit run recorded
        assert not store.halted()  # not a finding: the check did not complete
    assert store.verify()[0] == 3  # run whole, the edit is found


def test_every_fail_point_is_exercised() -> None:
    here = Path(__file__).read_text()
    for point in FAIL_POINTS:
        assert f'"{point}"' in here, point
