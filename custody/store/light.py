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
