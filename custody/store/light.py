"""A read of the SQLite store without the ORM, for what must start fast (``custody halt status``,
which a trading engine polls): one DB-API connection set up as custody.store.db sets up its
readers (WAL, the same pragmas, ``query_only``, a deferred ``BEGIN``, :data:`READ_TIMEOUT`),
so it never waits behind a writer and never writes.

It answers only what it can answer with certainty: a store that is missing, damaged, of
another schema version, or that holds a value of an unexpected type raises :class:`NotLight`,
and the caller takes the full path (the ORM), which says what is wrong. A lock held elsewhere
raises StoreBusy, as the full path does. Standard library only.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from custody.errors import StoreBusy
from custody.store.schema_version import SCHEMA_VERSION

WRITE_TIMEOUT = 60
"""Seconds a writing transaction waits for SQLite's write lock (another writer's chunk)."""
READ_TIMEOUT = 5
"""Seconds a reading transaction waits for a lock before it raises StoreBusy."""


class NotLight(Exception):
    """The light read cannot answer with certainty: take the full path."""


def sqlite_file(url: str) -> Path | None:
    """The file of a plain ``sqlite:///PATH`` URL; None for anything else (PostgreSQL, memory,
    query parameters, escapes): those take the full path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix) :]
    if not path or path == ":memory:" or any(c in path for c in "?%#"):
        return None
    return Path(path)


def is_busy(orig: BaseException | None) -> bool:
    """Whether a driver's error is a lock held elsewhere (SQLite busy/locked; PostgreSQL's
    lock_timeout), not damage."""
    if getattr(orig, "sqlstate", None) == "55P03":  # lock_not_available
        return True
    name = getattr(orig, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return True
    return "database is locked" in str(orig)


def busy_message(orig: BaseException) -> str:
    """StoreBusy's message (the full path's words)."""
    text = str(orig)
    first = text.strip().splitlines()[0] if text.strip() else type(orig).__name__
    return f"the store is locked by another connection: {first}"


def sqlite_on_connect(cur: Any) -> None:
    """Every SQLite connection's set-up (custody.store.db's engine runs it too)."""
    cur.execute(f"PRAGMA busy_timeout = {READ_TIMEOUT * 1000}")  # a file locked exclusively: StoreBusy soon
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=FULL")


@contextmanager
def read_transaction(path: Path) -> Iterator[sqlite3.Cursor]:
    """A cursor in one read transaction of the custody store at ``path``, at this tool's schema
    version. Raises NotLight (no store there, damage, another version), StoreBusy."""
    try:
        if path.stat().st_size == 0:
            raise NotLight("an empty file")
    except OSError:
        raise NotLight("no file") from None  # the full path says "no custody store" (and makes the file)
    try:
        conn = sqlite3.connect(str(path), timeout=WRITE_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise NotLight(str(exc)) from None
    try:
        cur = conn.cursor()
        sqlite_on_connect(cur)
        cur.execute(f"PRAGMA busy_timeout = {READ_TIMEOUT * 1000}")
        cur.execute("PRAGMA query_only = 1")
        cur.execute("BEGIN")
        if cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'custody_meta'").fetchone() is None:
            raise NotLight("no custody store")
        row = cur.execute("SELECT value FROM custody_meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise NotLight(f"schema version {row[0] if row else None!r}")  # older: an upgrade; newer: refused
        if key_problems(cur.execute(SQLITE_KEYS).fetchall()):
            raise NotLight("a key the paged reads rely on is gone")  # the full path refuses, and says why
        yield cur
        conn.rollback()
    except sqlite3.Error as exc:
        if is_busy(exc):
            raise StoreBusy(busy_message(exc)) from None
        raise NotLight(f"{type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


_STORED_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?")


def stored_time(value: object) -> datetime:
    """A DATETIME column as the ORM reads it (naive), only in the form the ORM writes it.
    Raises NotLight for anything else."""
    if not isinstance(value, str) or not _STORED_TIME.fullmatch(value):
        raise NotLight(f"a stored time {value!r}")
    return datetime.fromisoformat(value)


def stored_int(value: object) -> int:
    """An INTEGER column (never a bool, text or float). Raises NotLight for anything else."""
    if type(value) is not int:
        raise NotLight(f"a stored integer {value!r}")
    return value


def stored_str(value: object) -> str:
    """A text column. Raises NotLight for anything else (a blob, a number)."""
    if not isinstance(value, str):
        raise NotLight(f"a stored text {value!r}")
    return value


def stored_bool(value: object) -> bool:
    """A BOOLEAN column (0 or 1). Raises NotLight for anything else."""
    if type(value) is not int or value not in (0, 1):
        raise NotLight(f"a stored boolean {value!r}")
    return bool(value)


# ---------------------------------------------------------------- the keys the paged reads rely on

PAGED_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("address", ("chain", "idx")),
    ("audit_log", ("seq",)),
    ("ledger_txn", ("id",)),
    ("ledger_entry", ("id",)),
)
"""Tables read page by page by key (``WHERE key > last ORDER BY key LIMIT n``: the verifier's
address reads, the audit log's chain check, the ledger's comparison with the log), and the key.
Such a read is only sound while the key is unique and never NULL: a second row with the key
of a page's last row, or a NULL key, is never read by any page."""

_TABLES = ", ".join(f"'{t}'" for t, _ in PAGED_KEYS)
_OF_TABLES = f"m.type = 'table' AND m.name IN ({_TABLES})"

SQLITE_KEYS = (
    # One statement: each table (not virtual), its columns (NOT NULL?), an INTEGER PRIMARY
    # KEY (the rowid itself: unique without an index) and its unique, whole-table indexes.
    f"SELECT 't', m.name, NULL, CAST(m.sql NOT LIKE 'CREATE VIRTUAL%' AS TEXT) FROM sqlite_master AS m "
    f"WHERE {_OF_TABLES} "
    f"UNION ALL SELECT 'c', m.name, c.name, CAST(c.\"notnull\" AS TEXT) "
    f"FROM sqlite_master AS m, pragma_table_info(m.name) AS c WHERE {_OF_TABLES} "
    f"UNION ALL SELECT 'u', m.name, c.name, c.name FROM sqlite_master AS m, pragma_table_info(m.name) AS c "
    f"WHERE {_OF_TABLES} AND c.pk = 1 AND upper(c.type) = 'INTEGER' "
    f"AND (SELECT count(*) FROM pragma_table_info(m.name) AS k WHERE k.pk > 0) = 1 "
    f"UNION ALL SELECT 'u', m.name, l.name, group_concat(coalesce(i.name, ''), ',') "
    f"FROM sqlite_master AS m, pragma_index_list(m.name) AS l, pragma_index_info(l.name) AS i "
    f'WHERE {_OF_TABLES} AND l."unique" = 1 AND l.partial = 0 GROUP BY m.name, l.name'
)
""":func:`key_problems`'s rows on SQLite: ``(kind, table, name, value)``."""


def key_problems(rows: list[tuple[Any, ...]]) -> list[str]:
    """What is wrong with the keys of :data:`PAGED_KEYS`, from the rows of :data:`SQLITE_KEYS`
    (or custody.store.db's PostgreSQL query of the same shape): ``('t', table, -, usable)``,
    ``('c', table, column, not_null)``, ``('u', table, index, "col,col")`` (a unique index, or
    key, over the whole table, of plain columns). Empty: every key stands."""
    tables: dict[str, bool] = {}
    not_null: dict[str, set[str]] = {}
    unique: dict[str, list[set[str]]] = {}
    for kind, table, name, value in rows:
        flag = str(value).lower() in ("1", "true", "t")
        if kind == "t":
            tables[table] = flag
        elif kind == "c" and flag:
            not_null.setdefault(table, set()).add(name)
        elif kind == "u":
            unique.setdefault(table, []).append(set(str(value).split(",")))
    problems = []
    for table, key in PAGED_KEYS:
        columns = ", ".join(key)
        if table not in tables:
            problems.append(f"table {table} is missing")
        elif not tables[table]:
            problems.append(f"table {table} is not a plain table (a view, a virtual table, or one with child tables)")
        elif not any(cols <= set(key) for cols in unique.get(table, [])):
            problems.append(f"table {table} has no unique index or key on ({columns})")
        elif not set(key) <= not_null.get(table, set()):
            problems.append(f"table {table} allows NULL in ({columns})")
    return problems


def keys_message(problems: list[str]) -> str:
    """The refusal for :func:`key_problems`'s findings (custody.store.db raises it)."""
    return (
        f"the store's schema was changed outside the tool: {'; '.join(problems)}. The verifications and "
        "audits read these tables page by page by that key: a second row with a key already read, or a NULL "
        "key, would be skipped by every check. Refused: restore the constraint (after removing any duplicate) "
        "and verify again"
    )
