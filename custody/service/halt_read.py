"""The halt read of ``custody serve`` (``GET /v1/halt``): exact, and cheap when nothing changed.

Deriving the halt state (:func:`custody.control.halt.read_state`) checks every halt of the
audit log against the halt table, its lift signatures against the roster in force, and the
log's head against its tip: milliseconds of work a read, the same answer each time while
nothing changes, and an exchange polls it from every trading process. The derivation is a
function of what it reads and of nothing else (no clock): the schema version, the audit
log's head and tip, the log's halt and roster entries, the ``halt`` and ``halt_lift`` rows.
So each read here reads exactly those, raw, in one read transaction (one snapshot: REPEATABLE
READ on PostgreSQL), and when they equal the inputs of the last derivation, that derivation
is the answer: exact, not stale. Keyed on more than the head: a halt row planted or edited by
SQL, or an entry rewritten in the middle of the log, leaves the head as it was, and the
derivation reads those too.

Fail closed: a read that fails, a log that does not end at its head, or a head whose hash is
not its last entry's (the head rewritten by SQL) is a halt for this answer only, never cached.
A derivation is kept only when it read without error and the inputs read before it equal
those read after it (it saw those inputs and no others). Concurrent reads share one read of
the inputs that began after each of them came (:mod:`custody.service.coalesce`): as fresh as
a read of its own. The lease (``valid_until``) is counted from each answer, as before.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import DBAPIError

from custody.control import halt as halt_lib
from custody.control.halt_log import _HALT_EVENTS, _ROSTER_EVENT
from custody.errors import CustodyError, StoreBusy
from custody.service.coalesce import Coalesced
from custody.store.db import Database
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
_ENTRIES = "SELECT * FROM audit_log WHERE event IN (" + ", ".join(f"'{e}'" for e in _EVENTS) + ") ORDER BY seq"
_HALTS = "SELECT * FROM halt ORDER BY id"
_LIFTS = "SELECT * FROM halt_lift ORDER BY id"
# Who may lift is read from the founders-signed rosters, checked against the founders of their
# policy epoch (custody.control.trust_text): those documents and the manifests are inputs too.
_GOVERNANCE = (
    "SELECT * FROM roster ORDER BY serial",
    "SELECT * FROM signed_manifest ORDER BY id",
    "SELECT * FROM policy_epoch ORDER BY epoch",
    "SELECT * FROM policy ORDER BY id",
    "SELECT * FROM founder ORDER BY id",
)

Inputs = tuple[Any, ...]


class Tampered(CustodyError):
    """The audit log's head does not describe the log: the read is a halt."""


class HaltReader:
    """The halt state of one store, derived again only when its inputs changed (thread-safe)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._cached: tuple[Inputs, halt_lib.HaltState] | None = None
        self._shared = Coalesced(self._read)  # concurrent reads share one that began after each came

    def read(self) -> halt_lib.HaltState:
        """The halt state as :func:`custody.control.halt.read_state` gives it (halted, with
        ``error``, when it cannot be read; ``unknown`` when the store is locked elsewhere), read
        from the store after this call began."""
        return self._shared.call()

    def _read(self) -> halt_lib.HaltState:
        try:
            inputs = self.inputs()
        except StoreBusy as exc:
            return halt_lib.HaltState(True, [], error=f"halt state unknown: {exc}", unknown=True)
        except CustodyError as exc:
            return halt_lib.HaltState(True, [], error=f"halt state unreadable: {exc}")
        if self._cached is not None and self._cached[0] == inputs:
            return self._cached[1]
        state = halt_lib.read_state(self._db)
        if state.error is None and not state.unknown:
            try:
                if self.inputs() == inputs:
                    self._cached = (inputs, state)
            except CustodyError:
                pass  # not kept; this answer is the derivation's, as an uncached read's would be
        return state

    def inputs(self) -> Inputs:
        """Everything the derivation reads, in one snapshot. Raises Tampered when the log does
        not end at its head or the head's hash is not its last entry's, StoreBusy, StorageError."""
        with self._db.transaction(read_only=True) as s:
            conn = s.connection()
            failure = conn.dialect.loaded_dbapi.Error
            cursor = conn.connection.cursor()  # the driver's own: a third of the cost of SQLAlchemy's statements
            try:
                if not self._db.is_sqlite:  # one snapshot for every statement (SQLite's read is one already)
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                return _inputs(cursor)
            except failure as exc:  # as SQLAlchemy's: the transaction makes it StoreBusy or StorageError
                raise DBAPIError.instance(None, None, exc, failure) from exc
            finally:
                cursor.close()


def _inputs(cursor: Any) -> Inputs:
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
        return (version,)  # read_state upgrades or refuses the store; never equal to a cached key
    rows = []
    for statement in (_ENTRIES, _HALTS, _LIFTS, *_GOVERNANCE):
        cursor.execute(statement)
        rows.append(tuple(tuple(r) for r in cursor.fetchall()))
    return (seq, digest, *rows)
