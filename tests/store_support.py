"""Looking at a SQLite store from outside the tool: every table's rows, and the audit chain."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from custody.control.audit_log import verify_chain
from custody.store.db import Database

StoreDump = dict[str, list[tuple[Any, ...]]]


def dump_store(db_file: Path) -> StoreDump:
    """Every table of the SQLite store at ``db_file`` with all its rows, in a stable order.

    Read with the sqlite3 module, not through custody: what is compared is what is on disk.
    """
    conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        # Sorting the rows themselves (by their repr: NULLs and mixed types compare) makes
        # the dump independent of rowid and of the query plan.
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    finally:
        conn.close()


def audit_problems(db_file: Path) -> list[str]:
    """What :func:`custody.control.audit_log.verify_chain` finds wrong with the store's log (empty: intact)."""
    db = Database(f"sqlite:///{db_file}")
    try:
        with db.transaction() as s:
            return [f"{p.seq}: {p.reason}" for p in verify_chain(s)]
    finally:
        db.dispose()
