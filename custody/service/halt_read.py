"""The halt read of ``custody serve`` (``GET /v1/halt``): exact, and cheap when nothing changed.

Deriving the halt state (:func:`custody.control.halt.read_state`) checks every halt of the
audit log against the halt table, its lift signatures against the roster in force, and the
log's head against its tip: milliseconds of work a read, the same answer each time while
nothing changes, and an exchange polls it from every trading process. The derivation is a
function of what it reads and of nothing else (no clock): the schema version, the audit
log's head and tip, the log's halt and roster entries, the ``halt`` and ``halt_lift`` rows,
and the governance the lifters are checked against (rosters, manifests, policy epochs, the
policy and its founders). Every one of those can be edited by SQL without moving the head,
so the head alone is no key: each read takes, in one read transaction (one snapshot), the
head (checked against the log's tip) and a marker that changes whenever anything else may
have, and the last derivation answers while both are as they were:

* SQLite (a store file): ``PRAGMA data_version`` on a connection of this reader's own that
  never writes. SQLite changes it in that connection's snapshot whenever any other
  connection, of this process or any other (``sqlite3`` in an insider's hands), committed
  anything to the file; the file's identity (device, inode) is checked too, so a store
  replaced by another file is read anew, and so are its write-ahead log's and index's: the
  same store file with another log or index is refused (this process no longer sees its
  commits; see :class:`_OwnConnection`). A write elsewhere (a nonce, an issued address)
  changes it without touching the inputs: then the inputs themselves are read, raw, and
  compared with those of the last derivation before deriving again.
* PostgreSQL: a SHA-256 of every input table's rows (each row's text, in key order),
  computed by the server in the same snapshot (REPEATABLE READ): one round trip.
* Any other SQLite URL (memory, parameters): the inputs themselves, raw.

Fail closed: a read that fails, a log that does not end at its head, or a head whose hash is
not its last entry's (the head rewritten by SQL) is a halt for this answer only, never cached.
A derivation is kept only when it read without error and is of the key's snapshot: on a
SQLite file, the key read before it equals the key read after it (data_version counts commits:
nothing was committed in between); on PostgreSQL and the other SQLite URLs, whose key is
content, it is derived in the very transaction the key was read in (content read again after a
derivation of its own cannot tell that the store was the same throughout). Concurrent reads
share one read of the inputs that began after each of them came (:mod:`custody.service.coalesce`):
as fresh as a read of its own. The lease (``valid_until``) is counted from each answer, as before.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from custody.control import halt as halt_lib
from custody.control.halt_log import _HALT_EVENTS, _ROSTER_EVENT
from custody.errors import CustodyError, StorageError, StoreBusy
from custody.service.coalesce import AsyncCoalesced, Coalesced
from custody.store.db import Database
from custody.store.light import READ_TIMEOUT, busy_message, is_busy, sqlite_file
from custody.store.models import SCHEMA_VERSION

_EVENTS = (*_HALT_EVENTS, _ROSTER_EVENT)
"""Every kind of audit entry the derivation reads (custody.control.halt_log)."""

# Constant statements, no parameters: run on the driver's cursor.
_HEAD = (
    "SELECT h.seq, h.hash, (SELECT MAX(e.seq) FROM audit_log AS e), "
    "(SELECT t.hash FROM audit_log AS t WHERE t.seq = h.seq), "
    "(SELECT m.value FROM custody_meta AS m WHERE m.key = 'schema_version') "
    "FROM audit_head AS h WHERE h.id = 1"
)
_IN_EVENTS = "event IN (" + ", ".join(f"'{e}'" for e in _EVENTS) + ")"
# Who may lift is read from the founders-signed rosters, checked against the founders of their
# policy epoch (custody.control.trust_text): those documents and the manifests are inputs too.
_TABLES = (  # (table, the rows the derivation reads, their order)
    ("audit_log", _IN_EVENTS, "seq"),
    ("halt", "TRUE", "id"),
    ("halt_lift", "TRUE", "id"),
    ("roster", "TRUE", "serial"),
    ("signed_manifest", "TRUE", "id"),
    ("policy_epoch", "TRUE", "epoch"),
    ("policy", "TRUE", "id"),
    ("founder", "TRUE", "id"),
)
_ROWS = tuple(f"SELECT * FROM {table} WHERE {where} ORDER BY {order}" for table, where, order in _TABLES)
_FINGERPRINTS = "SELECT " + ", ".join(
    f"(SELECT encode(sha256(convert_to(COALESCE(string_agg(t::text, E'\\n' ORDER BY t.{order}), ''), 'UTF8')), "
    f"'hex') FROM {table} AS t WHERE {where})"
    for table, where, order in _TABLES
)
"""PostgreSQL: every input table's rows, hashed by the server (a row's text quotes its fields)."""

Inputs = tuple[Any, ...]
Key = tuple[Any, ...]


class Tampered(CustodyError):
    """The audit log's head does not describe the log: the read is a halt."""


@dataclass(frozen=True)
class _Derived:
    key: Key
    rows: Inputs | None  # SQLite file: the raw inputs behind ``state`` (its key is no content)
    state: halt_lib.HaltState


class HaltReader:
    """The halt state of one store, derived again only when its inputs changed (thread-safe)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._file = sqlite_file(db.url) if db.is_sqlite else None
        self._own = _OwnConnection(self._file) if self._file is not None else None
        self._cached: _Derived | None = None
        self._shared = Coalesced(self._read)  # concurrent reads share one that began after each came
        self._awaited = AsyncCoalesced(self._read)  # the same, for callers on the event loop

    def read(self) -> halt_lib.HaltState:
        """The halt state as :func:`custody.control.halt.read_state` gives it (halted, with
        ``error``, when it cannot be read; ``unknown`` when the store is locked elsewhere), read
        from the store after this call began."""
        return self._shared.call()

    async def aread(self) -> halt_lib.HaltState:
        """:meth:`read` for a caller on the event loop (one thread hop a read the callers share).
        Each of the two runs one read at a time; a read of each may run at once (``/metrics``
        calls :meth:`read` from a worker thread), which is safe: a read keeps a derivation only
        under the key it read it with, and a key read later makes the next read look again."""
        return await self._awaited.call()

    def close(self) -> None:
        if self._own is not None:
            self._own.close()

    def _read(self) -> halt_lib.HaltState:  # one run at a time (Coalesced)
        try:
            return self._answer()
        except StoreBusy as exc:
            return halt_lib.HaltState(True, [], error=f"halt state unknown: {exc}", unknown=True)
        except CustodyError as exc:
            return halt_lib.HaltState(True, [], error=f"halt state unreadable: {exc}")

    def _answer(self) -> halt_lib.HaltState:
        if self._own is None:
            return self._answer_in_one_snapshot()
        key, rows = self.inputs(rows=False)
        cached = self._cached
        if cached is not None and cached.key == key:
            return cached.state
        if self._own is not None:  # the marker moved: the inputs themselves, in one snapshot with it
            key, rows = self.inputs(rows=True)
            if cached is not None and rows is not None and cached.rows == rows:
                self._cached = _Derived(key, rows, cached.state)
                return cached.state
        state = halt_lib.read_state(self._db)
        if state.error is None and not state.unknown:
            try:
                if self.inputs(rows=False)[0] == key:
                    self._cached = _Derived(key, rows, state)
            except CustodyError:
                pass  # not kept; this answer is the derivation's, as an uncached read's would be
        return state

    def _answer_in_one_snapshot(self) -> halt_lib.HaltState:
        """PostgreSQL, and a SQLite URL without a file of its own: the key and, when it moved, the
        derivation, in ONE read transaction. Such a key is the inputs' content (their hashes, or
        the rows), which cannot tell a state from the same state set again: a derivation made in
        a transaction of its own, between two reads of the key, could be of a state an insider
        set for that transaction alone and took back before the second read (A, B, A), and was
        then kept under the key of A (tests/test_attack_halt_read_race.py)."""
        with self._db.transaction(read_only=True) as s:
            key = self._key(s)
            cached = self._cached
            if cached is not None and cached.key == key:
                return cached.state
            state = halt_lib.state_in(s) if len(key) > 1 else None
        if state is None:  # another schema version: read_state upgrades or refuses the store; never kept
            return halt_lib.read_state(self._db)
        self._cached = _Derived(key, None, state)
        return state

    def inputs(self, *, rows: bool) -> tuple[Key, Inputs | None]:
        """The key of what the derivation reads, and (``rows``, SQLite file) the raw inputs, in
        one snapshot. Raises Tampered when the log does not end at its head or the head's hash
        is not its last entry's, StoreBusy, StorageError."""
        if self._own is not None:
            return self._own.read(rows)
        with self._db.transaction(read_only=True) as s:
            return self._key(s), None

    def _key(self, s: Session) -> Key:
        """The key in the snapshot of the read transaction ``s`` (PostgreSQL, or a SQLite URL
        without a file of its own). Raises Tampered, and what the session raises."""
        conn = s.connection()
        failure = conn.dialect.loaded_dbapi.Error
        cursor = conn.connection.cursor()  # the driver's own: a third of the cost of SQLAlchemy's statements
        try:
            if self._db.is_sqlite:  # no file of its own: the inputs are the key
                head = _head(cursor)
                return head if len(head) == 1 else (*head, *_rows(cursor))
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one snapshot
            head = _head(cursor)
            if len(head) == 1:
                return head
            cursor.execute(_FINGERPRINTS)
            fingerprints: tuple[Any, ...] = tuple(cursor.fetchone() or ())
            return (*head, *fingerprints)
        except failure as exc:  # as SQLAlchemy's: the transaction makes it StoreBusy or StorageError
            raise DBAPIError.instance(None, None, exc, failure) from exc
        finally:
            cursor.close()


Identity = tuple[tuple[int, int] | None, ...]
"""(device, inode) of the store file, its write-ahead log and the log's index (None: not there)."""


class _OwnConnection:
    """The reader's own connection to a SQLite store file: read-only, so that its
    ``data_version`` moves on every commit to the file (SQLite counts another connection's
    commits only).

    SQLite learns of commits through the write-ahead log's index (``-shm``), which every
    connection of a process to one store file shares while any of them holds it open. If that
    file or the log (``-wal``) is replaced under the process (removed, and made anew by the next
    command), no later commit reaches this process again, through any of its connections, old
    or new, and ``data_version`` never moves (tests/test_attack_halt_read_wal.py). So the
    identity (device, inode) of all three files is checked before each read: a store file of
    another identity is read anew (a store swapped whole: new connections, a new index), but
    the same store file with another log or index is refused (StorageError, a halt for the
    answer) until the process is restarted."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._identity: Identity | None = None
        self._generation = 0  # data_version counts per connection: a new one starts a new count
        self._lock = threading.Lock()

    def read(self, rows: bool) -> tuple[Key, Inputs | None]:
        with self._lock:
            try:
                cursor = self._cursor()
                try:
                    cursor.execute("BEGIN")
                    head = _head(cursor)  # takes the snapshot the version below is of
                    if len(head) == 1:
                        return head, None
                    (version,) = cursor.execute("PRAGMA data_version").fetchone()
                    return (*head, self._generation, version), (_rows(cursor) if rows else None)
                finally:
                    if self._conn is not None and self._conn.in_transaction:
                        cursor.execute("ROLLBACK")
                    cursor.close()
            except sqlite3.Error as exc:
                self.close()
                if is_busy(exc):
                    raise StoreBusy(busy_message(exc)) from None
                raise StorageError(f"database error: {exc}") from None

    def _files(self) -> Identity:
        """(device, inode) of the store file, its log and its index (None: not there). Raises
        StorageError when the store file is missing."""
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise StorageError(f"no custody store at {self._path}: {exc.strerror}") from None
        identity: list[tuple[int, int] | None] = [(st.st_dev, st.st_ino)]
        for suffix in ("-wal", "-shm"):
            try:
                st = os.stat(f"{self._path}{suffix}")
                identity.append((st.st_dev, st.st_ino))
            except OSError:
                identity.append(None)
        return tuple(identity)

    def _cursor(self) -> sqlite3.Cursor:
        identity, known = self._files(), self._identity
        if known is not None and identity[0] == known[0] and identity[1:] != known[1:]:
            raise StorageError(
                f"the store's write-ahead log or its index ({self._path}-wal, -shm) was replaced while this process "
                "had them open: SQLite here no longer sees the store's commits; restart `custody serve`"
            )
        if self._conn is None or identity != known:
            self.close()
            # Never writes (query_only); the file is there (stat above), so connecting makes none.
            self._conn = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {READ_TIMEOUT * 1000}")
            self._conn.execute("PRAGMA query_only = 1")
            if known is None or identity[0] != known[0]:  # a store file new to this reader
                self._conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opens the log and its index
                identity = self._files()  # those this process reads through from now on
            self._identity = identity
            self._generation += 1
        return self._conn.cursor()

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()


def _head(cursor: Any) -> Key:
    """The head's sequence number and hash, checked against the log's tip; ``(version,)`` for a
    store at another schema version. Raises Tampered."""
    cursor.execute(_HEAD)
    head = cursor.fetchone()
    if head is None:
        raise Tampered("the store has no audit log head")
    seq, digest, tip, tip_hash, version = head
    if (tip or 0) != seq:
        raise Tampered(
            "the audit log does not end at its head (an entry was added or removed behind the tool's back): "
            "treated as halted; run `custody audit log --verify`"
        )
    if seq and tip_hash != digest:
        raise Tampered(
            "the audit log's head does not carry its last entry's hash (rewritten behind the tool's back): "
            "treated as halted; run `custody audit log --verify`"
        )
    if str(version) != str(SCHEMA_VERSION):
        return (("schema", version),)  # read_state upgrades or refuses the store; never a cached key
    return (seq, digest)


def _rows(cursor: Any) -> Inputs:
    out = []
    for statement in _ROWS:
        cursor.execute(statement)
        out.append(tuple(tuple(r) for r in cursor.fetchall()))
    return tuple(out)
