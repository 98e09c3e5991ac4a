"""An insider with the store's SQL against the halt guard, while an employee's halt waits in the halt file.

The insider makes the store refuse every new halt row (a trigger: the same answer as a full
disk), then an employee raises a halt. The store cannot record it, so it waits in the halt
file's ``pending`` journal. The guard of every path that moves custody state must refuse
(exit 3, halted) and store nothing until the store records the halt and two employees lift
it; a halt file deleted or garbled reads as halted too. The console's halt page and the
status view show the waiting halt.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from custody.config import Settings
from custody.control import halt_file, incidents
from custody.service.console_halt import _halt_page
from custody.store.db import Database
from tests.support import Custody, founders
from tests.test_withdraw_embedded import EmbeddedShop, destination

REFUSE = "CREATE TRIGGER refuse_halts BEFORE INSERT ON halt BEGIN SELECT RAISE(ABORT, 'disk full'); END"
TABLES = ("address", "withdrawal", "approval", "reserved_input", "audit_log", "ledger_entry")


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path, "p2wsh")
    yield s
    s.chain.close()


def _counts(c: Custody) -> dict[str, object]:
    with sqlite3.connect(c.home / "custody.db") as db:
        counts: dict[str, object] = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
        counts["statuses"] = db.execute("SELECT id, status, psbt IS NULL FROM withdrawal ORDER BY id").fetchall()
        counts["counters"] = db.execute("SELECT name, next_value FROM counter ORDER BY name").fetchall()
    return counts


def _sql(c: Custody, statement: str) -> None:
    with sqlite3.connect(c.home / "custody.db") as db:
        db.execute(statement)


def test_a_halt_waiting_for_a_refusing_store_stops_issuance_and_withdrawals(shop: EmbeddedShop) -> None:
    c = shop.c
    shop.deposit("acct-1", coins=3)
    to, _ = destination()
    requested = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.01", *shop.as_("bob"))
    approved = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.02", *shop.as_("carol"))
    for who in ("alice", "bob"):
        shop.ok("withdraw", "approve", str(approved["id"]), *shop.as_(who), "--yes")

    _sql(c, REFUSE)  # the insider: no halt row goes in any more
    raised = c("halt", "raise", "--reason", "the hot wallet drains", *shop.as_("carol"))
    assert "could not record" in raised.output, raised.output
    assert [p["reason"] for p in halt_file.pending(c.home / "halt.json")] == ["the hot wallet drains"]
    before = _counts(c)
    psbt = shop.tmp / "exported.psbt"
    refusals = {
        "address new": c("address", "new", "--account", "x"),
        "request": c("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.01", *shop.as_("bob")),
        "approve": c("withdraw", "approve", str(requested["id"]), *shop.as_("alice"), "--yes"),
        "export": c("withdraw", "export", str(approved["id"]), str(psbt)),
    }
    for step, result in refusals.items():
        assert result.exit_code == 3, (step, result.output)
        assert "waits in the halt file" in result.stderr and "the hot wallet drains" in result.stderr, step
    assert _counts(c) == before and not psbt.exists()  # nothing stored, nothing allocated, no PSBT

    _sql(c, "DROP TRIGGER refuse_halts")  # the store records again: the next command replays the halt
    status = c("halt", "status", "--json")
    assert status.exit_code == 3 and halt_file.pending(c.home / "halt.json") == [], status.output
    (halt,) = [h for h in shop_halts(c) if h[1] == "carol"]
    assert c("address", "new", "--account", "x").exit_code == 3  # the recorded halt stands
    for who in ("alice", "bob"):
        assert c("halt", "lift", str(halt[0]), *shop.as_(who)).exit_code == 0
    assert c("halt", "status").exit_code == 0
    assert shop.ok("address", "new", "--account", "x")
    assert c("withdraw", "export", str(approved["id"]), str(psbt)).exit_code == 0 and psbt.exists()


def shop_halts(c: Custody) -> list[tuple[int, str]]:
    with sqlite3.connect(c.home / "custody.db") as db:
        return db.execute("SELECT id, raised_by FROM halt").fetchall()


@pytest.mark.parametrize("damage", ["deleted", "garbled"])
def test_a_deleted_or_garbled_halt_file_reads_as_halted(tmp_path: Path, damage: str) -> None:
    """The insider removes the journal to let custody state move: the guard reads a missing or
    unreadable halt file as halted (as the engine does) until the store writes it again."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "a").exit_code == 0
    path = c.home / "halt.json"
    if damage == "deleted":
        path.unlink()
    else:
        path.write_text('{"format": "custody-halt-state", "version": 2, "halted": false, "pending": [')
    refused = c("address", "new", "--account", "a")
    assert refused.exit_code == 3 and "missing or unreadable" in refused.stderr, refused.output
    assert c("halt", "status").exit_code == 0  # written again from the store, which holds no halt
    assert c("address", "new", "--account", "a").exit_code == 0


def test_the_console_and_the_status_view_show_a_waiting_halt(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    alice = c.employee("alice")
    _sql(c, REFUSE)
    raised = c("halt", "raise", "--reason", "a <b>drain</b>", "--as", "alice", "--key", str(alice))
    assert "could not record" in raised.output
    settings = Settings.load(env=c.env)
    db = Database(settings.db_url, halt_file=settings.halt_file)
    try:
        view = incidents.status_view(db)
        assert view["halted"] is True and set(view["components"].values()) == {"halted"}, view
        body = bytes(_halt_page(db).body).decode()
        assert "Trading is HALTED" in body and "a &lt;b&gt;drain&lt;/b&gt;" in body and "class=pending" in body
        store_only = Database(settings.db_url)  # what the page said before: the store alone
        assert incidents.status_view(store_only)["halted"] is False
        store_only.dispose()
    finally:
        db.dispose()
