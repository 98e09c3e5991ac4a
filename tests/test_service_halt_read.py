"""The cached halt read of ``custody serve`` (custody.service.halt_read) against an insider
with SQL: every table the halt derivation reads, edited behind the tool's back between two
reads of a warm reader, and the next read answers what a derivation from scratch answers
(never the cached "not halted"); undone, and the reader says running again. On SQLite (the
reader's own connection, keyed on ``PRAGMA data_version``) and on PostgreSQL (keyed on the
server's hashes of the tables).

Each edit keeps the audit log's head, the tables' row counts and their largest ids where it can
(an update in place): a key made of the head, counts or ids would miss it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from custody.control import halt as halt_lib
from custody.service.halt_read import HaltReader
from custody.store.db import Database, normalize_url
from tests.conftest import PG_URL
from tests.support import Custody, founders


@dataclass
class Shop:
    c: Custody
    db: Database
    insider: Engine
    halt_id: int

    def sql(self, statement: str, **params: Any) -> None:
        with self.insider.begin() as conn:
            conn.execute(text(statement), params)

    def one(self, statement: str, **params: Any) -> Any:
        with self.insider.begin() as conn:
            return conn.execute(text(statement), params).one()

    def as_(self, who: str) -> list[str]:
        return ["--as", who, "--key", str(self.c.home / "keys" / f"{who}.key")]


def _shop(tmp: Path, url: str | None, lifted: bool) -> Shop:
    c = Custody(tmp / "home", url)
    assert c.init(founders()).exit_code == 0
    for who in ("alice", "bob"):
        c.employee(who)
    halt_id = c.json("halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(c.home / "keys/alice.key"))
    shop = Shop(c, Database(c.env["CUSTODY_DB_URL"]), create_engine(normalize_url(c.env["CUSTODY_DB_URL"])), 0)
    shop.halt_id = halt_id["halt_id"]
    for who in ("alice", "bob") if lifted else ("alice",):  # one lift of two: still halted, one lift row
        assert c("halt", "lift", str(shop.halt_id), *shop.as_(who)).exit_code == 0
    return shop


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[Callable[[], str | None]]:
    """Makes the URL of a new store: SQLite's default in its home, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield lambda: None
        return
    if not PG_URL:
        pytest.skip("CUSTODY_TEST_POSTGRES_URL is not set (CI sets it)")
    admin = create_engine(normalize_url(PG_URL))
    schemas: list[str] = []

    def new() -> str:
        schemas.append(f"custody_test_{uuid.uuid4().hex[:10]}")
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schemas[-1]}"'))
        return f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schemas[-1]}"

    yield new
    with admin.begin() as conn:
        for schema in schemas:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="module")
def lifted(backend: Callable[[], str | None], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """A store whose one halt two employees lifted: running, because the lifts verify against
    the founders-signed roster, whose founders come from the manifest and the policy."""
    shop = _shop(tmp_path_factory.mktemp("lifted"), backend(), lifted=True)
    yield shop
    shop.insider.dispose()
    shop.db.dispose()


@pytest.fixture(scope="module")
def halted(backend: Callable[[], str | None], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """A store with one active halt that one employee signed a lift of."""
    shop = _shop(tmp_path_factory.mktemp("halted"), backend(), lifted=False)
    yield shop
    shop.insider.dispose()
    shop.db.dispose()


def _warm(shop: Shop) -> HaltReader:
    reader = HaltReader(shop.db)
    first = reader.read()
    assert reader.read() is first  # the second read answered from the cache
    return reader


def _doc(state: halt_lib.HaltState) -> tuple[bool, list[dict[str, Any]], str | None]:
    return state.halted, state.halts, state.error


def _check(reader: HaltReader, shop: Shop) -> halt_lib.HaltState:
    """The reader's answer, twice (the second from whatever it cached), each the derivation's."""
    for _ in range(2):
        state = reader.read()
        assert _doc(state) == _doc(halt_lib.read_state(shop.db)), state
    return state


Edit = Callable[[Shop], Callable[[], None]]
"""Edits the store by SQL; returns the undo."""


def _lift_entry(shop: Shop) -> Callable[[], None]:
    seq, payload = shop.one("SELECT seq, payload FROM audit_log WHERE event = 'halt.lifted'")
    spoiled = json.loads(payload)
    for lift in spoiled["lifts"]:
        lift["signature"] = lift["signature"][::-1]
    shop.sql("UPDATE audit_log SET payload = :p WHERE seq = :s", p=json.dumps(spoiled), s=seq)
    return lambda: shop.sql("UPDATE audit_log SET payload = :p WHERE seq = :s", p=payload, s=seq)


def _planted_halt(shop: Shop) -> Callable[[], None]:
    shop.sql(
        "INSERT INTO halt (id, raised_at, raised_by, source, reason, active) "
        "VALUES ((SELECT MAX(id) + 1 FROM halt), '2026-01-01 00:00:00', 'mallory', 'employee', 'x', :yes)",
        yes=True,
    )
    return lambda: shop.sql("DELETE FROM halt WHERE raised_by = 'mallory'")


def _rosters(shop: Shop) -> Callable[[], None]:
    with shop.insider.begin() as conn:
        rosters = conn.execute(text("SELECT serial, document FROM roster")).all()
    for serial, document in rosters:  # one founder's signature: under the quorum
        one = json.loads(document)
        one["signatures"] = one["signatures"][:1]
        shop.sql("UPDATE roster SET document = :d WHERE serial = :s", d=json.dumps(one), s=serial)

    def undo() -> None:
        for serial, document in rosters:
            shop.sql("UPDATE roster SET document = :d WHERE serial = :s", d=document, s=serial)

    return undo


def _manifest(shop: Shop) -> Callable[[], None]:
    (document,) = shop.one("SELECT document FROM signed_manifest WHERE id = 1")
    shop.sql(
        "UPDATE signed_manifest SET document = :d WHERE id = 1", d=document.replace('"threshold": 2', '"threshold": 1')
    )
    return lambda: shop.sql("UPDATE signed_manifest SET document = :d WHERE id = 1", d=document)


def _epoch(shop: Shop) -> Callable[[], None]:
    shop.sql(
        "INSERT INTO policy_epoch (epoch, digest, previous, document, receive_from, change_from, applied_at) "
        "VALUES (1, :z, :z, '{}', 0, 0, '2026-01-01 00:00:00')",
        z="00" * 32,
    )
    return lambda: shop.sql("DELETE FROM policy_epoch WHERE epoch = 1")


def _policy(shop: Shop) -> Callable[[], None]:
    shop.sql("UPDATE policy SET threshold = 3 WHERE id = 1")
    return lambda: shop.sql("UPDATE policy SET threshold = 2 WHERE id = 1")


def _founder(shop: Shop) -> Callable[[], None]:
    (first,) = shop.one("SELECT xpub FROM founder WHERE position = 0")
    (second,) = shop.one("SELECT xpub FROM founder WHERE position = 1")
    shop.sql("UPDATE founder SET xpub = :x WHERE position = 0", x=second)
    return lambda: shop.sql("UPDATE founder SET xpub = :x WHERE position = 0", x=first)


@pytest.mark.parametrize(
    "edit",
    [_lift_entry, _planted_halt, _rosters, _manifest, _epoch, _policy, _founder],
    ids=["audit_log", "halt", "roster", "signed_manifest", "policy_epoch", "policy", "founder"],
)
def test_an_input_edited_by_sql_under_a_warm_reader_halts_its_next_read(lifted: Shop, edit: Edit) -> None:
    reader = _warm(lifted)
    assert not _check(reader, lifted).halted
    undo = edit(lifted)
    try:
        assert _check(reader, lifted).halted  # not the cached "running"
    finally:
        undo()
    assert not _check(reader, lifted).halted


def test_a_schema_version_edited_by_sql_halts_the_next_read(lifted: Shop) -> None:
    reader = _warm(lifted)
    (version,) = lifted.one("SELECT value FROM custody_meta WHERE key = 'schema_version'")
    lifted.sql("UPDATE custody_meta SET value = '999' WHERE key = 'schema_version'")
    try:
        state = reader.read()
        assert state.halted and state.error and "999" in state.error, state
    finally:
        lifted.sql("UPDATE custody_meta SET value = :v WHERE key = 'schema_version'", v=version)
    assert not _check(reader, lifted).halted


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE halt SET active = :no WHERE id = :id",  # its row says lifted; the log does not
        "UPDATE halt_lift SET employee = 'mallory' WHERE halt_id = :id",  # who signed a lift so far
        "UPDATE halt SET raised_at = '2020-01-01 00:00:00' WHERE id = :id",
    ],
    ids=["halt", "halt_lift", "halt-time"],
)
def test_a_halt_or_lift_row_edited_in_place_changes_the_next_answer(halted: Shop, statement: str) -> None:
    reader = _warm(halted)
    before = _check(reader, halted)
    assert before.halted
    with halted.insider.begin() as conn:
        saved = conn.execute(text("SELECT * FROM halt")).all(), conn.execute(text("SELECT * FROM halt_lift")).all()
    halted.sql(statement, no=False, id=halted.halt_id)
    try:
        after = _check(reader, halted)
        assert after.halted and after.halts != before.halts, after
    finally:
        with halted.insider.begin() as conn:  # every row as it was, in place
            for table, rows in zip(("halt", "halt_lift"), saved, strict=True):
                for row in rows:
                    columns = ", ".join(f"{n} = :{n}" for n in row._fields if n != "id")
                    conn.execute(text(f"UPDATE {table} SET {columns} WHERE id = :id"), row._asdict())
    assert _doc(_check(reader, halted)) == _doc(before)


def test_a_store_file_replaced_under_a_warm_reader_is_read_anew(tmp_path: Path, halted: Shop) -> None:
    """SQLite: the reader's own connection would go on reading the old file; it notices the new one."""
    if not halted.db.is_sqlite:
        pytest.skip("a store file is SQLite's")
    shop = _shop(tmp_path / "copy", None, lifted=True)
    path = shop.c.home / "custody.db"
    reader = _warm(shop)
    assert not _check(reader, shop).halted
    other = tmp_path / "halted.db"
    with sqlite3.connect(halted.c.home / "custody.db") as src, sqlite3.connect(other) as dst:
        src.backup(dst)  # a consistent copy of another store, halted
    shop.db.dispose()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.replace(other, path)
    state = reader.read()
    assert state.halted and _doc(state) == _doc(halt_lib.read_state(shop.db)), state
    shutil.rmtree(tmp_path / "copy", ignore_errors=True)
