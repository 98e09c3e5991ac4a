"""The append-only, hash-chained record of every custody event.

Each entry is appended in the same database transaction as the event it records. Entry
``seq`` hashes its own fields together with the hash of entry ``seq - 1``; the chain's tip
lives in ``audit_head``, whose row lock serializes appends across processes.

Every entry since schema 5 names where it was made (``origin``): the OS user and host of the
process that appended it, and the command when the CLI says which (:func:`set_command`). An
entry's hash covers its origin; entries made before it have none and hash as they always did.
"""

from __future__ import annotations

import contextvars
import functools
import getpass
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from json.encoder import encode_basestring_ascii
from typing import Any

from sqlalchemy import TextClause, bindparam, text
from sqlmodel import Session, col, select

from custody.clock import iso, now
from custody.errors import StorageError
from custody.store.db import plain_rows, require_paged_keys
from custody.store.models import AuditEntry, AuditHead

GENESIS = "0" * 64


def canonical(payload: Any) -> str:
    """Canonical JSON: sorted keys, no spaces."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def entry_hash(
    seq: int,
    at: str,
    event: str,
    actor: str,
    payload: str,
    signature: str | None,
    prev: str,
    origin: str | None = None,
) -> str:
    """SHA-256 of the canonical JSON list of the fields; ``origin`` is the list's eighth item
    only when the entry has one (entries from before schema 5 keep their seven-item hash)."""
    fields: list[Any] = [seq, at, event, actor, payload, signature, prev]
    if origin is not None:
        fields.append(origin)
    return hashlib.sha256(canonical(fields).encode()).hexdigest()


_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar("custody_audit_command", default=None)


def set_command(command: str | None) -> None:
    """The command line's command (``withdraw finalize``), named in the origin of what it appends."""
    _COMMAND.set(command)


@cache
def _os_identity() -> tuple[str, str]:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry: the uid says who
        user = f"uid:{os.getuid()}"
    return user, socket.gethostname()


def origin() -> str:
    """This process's origin for an entry (canonical JSON): OS user, host, and the command."""
    user, host = _os_identity()
    doc: dict[str, Any] = {"user": user[:64], "host": host[:255]}
    command = _COMMAND.get()
    if command:
        doc["command"] = command[:128]
    return canonical(doc)


def _at(value: datetime) -> str:
    return iso(value, "microseconds") or ""


def append(
    session: Session,
    event: str,
    actor: str,
    payload: dict[str, Any],
    signature: str | None = None,
) -> AuditEntry:
    """Append one event to the log inside the caller's transaction.

    Raises StorageError when the store has no audit head (not initialised), or when it did not
    keep the entry (a trigger that skips the INSERT without an error).
    """
    head = session.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()
    if head is None:
        raise StorageError("the store has no audit log head: run `custody init`")
    at = now()
    body = canonical(payload)
    seq = head.seq + 1
    made_by = origin()
    digest = entry_hash(seq, _at(at), event, actor, body, signature, head.hash, made_by)
    entry = AuditEntry(
        seq=seq,
        at=at,
        event=event,
        actor=actor,
        payload=body,
        signature=signature,
        prev_hash=head.hash,
        hash=digest,
        origin=made_by,
    )
    session.add(entry)
    head.seq = seq
    head.hash = digest
    session.add(head)
    session.flush()
    # A trigger may have skipped the entry's INSERT without an error (SQLite's RAISE(IGNORE), a
    # PostgreSQL BEFORE trigger returning NULL) while the head moved: refuse, and the caller's
    # transaction stores nothing, rather than report done what no entry records.
    if session.connection().execute(_KEPT, {"seq": seq, "hash": digest}).first() is None:
        raise StorageError(_SWALLOWED)
    return entry


_KEPT = text("SELECT 1 FROM audit_log WHERE seq = :seq AND hash = :hash")
_SWALLOWED = "the store did not keep the audit log entry it was given (a trigger or rule on audit_log?): nothing stored"
_ENTRY_COLUMNS = "seq, at, event, actor, payload, signature, prev_hash, hash, origin"
_ENTRY_VALUES = ":e_seq, :e_at, :e_event, :e_actor, :e_payload, NULL, :e_prev, :e_hash, :e_origin"
_HEAD_MOVE = "UPDATE audit_head SET seq = :e_seq, hash = :e_hash WHERE id = 1 AND seq = :e_seq - 1"


@functools.lru_cache(maxsize=8)
def _locked_statements(along: str | None, one: bool) -> tuple[TextClause, ...]:
    """The append's statements (one text each time, so the driver prepares it once): with
    ``one``, a single statement, ``along`` and the entry as common table expressions of the
    head's update (PostgreSQL); else ``along``, the entry and the head's update apart."""
    entry = f"INSERT INTO audit_log ({_ENTRY_COLUMNS}) VALUES ({_ENTRY_VALUES})"
    # The entry's time bound with its column's type, as the ORM binds it: SQLite stores the text
    # SQLAlchemy writes for every other entry (naive UTC), never the driver's "+00:00" form.
    at = bindparam("e_at", type_=AuditEntry.__table__.c.at.type)  # type: ignore[attr-defined]
    if one:
        # The head moves only with the entry: a trigger that swallows the entry's INSERT (a
        # BEFORE trigger returning NULL) leaves the head where it was, and the append fails.
        ctes = [f"{entry} RETURNING seq"] if along is None else [along, f"{entry} RETURNING seq"]
        body = ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(ctes))
        kept = f" AND EXISTS (SELECT 1 FROM w{len(ctes) - 1})"
        return (text(f"WITH {body} {_HEAD_MOVE}{kept}").bindparams(at),)
    apart = [] if along is None else [text(along)]
    return (*apart, text(entry).bindparams(at), text(_HEAD_MOVE))


def append_locked(
    session: Session,
    head: tuple[int, str],
    event: str,
    actor: str,
    payload: dict[str, Any],
    *,
    along: tuple[str, dict[str, Any]] | None = None,
) -> int:
    """:func:`append` for a caller that already holds the head's row lock and read ``head``
    (its seq and hash) under it: no ORM object, fixed statements the driver prepares; on
    PostgreSQL one statement that also runs ``along`` (an INSERT's SQL and its parameters,
    none named ``e_*``: the rows the entry records) as a common table expression, elsewhere a
    statement each. Returns the entry's seq. The head's ORM object, if this session holds
    one, is expired (re-read on use). Raises StorageError when the head is not at ``head``, or
    when the store did not keep the entry (a trigger swallowing it): the caller's transaction
    then stores nothing, rather than handing out what no entry records.
    """
    seq, prev = head
    at = now()
    body = canonical(payload)
    made_by = origin()
    digest = entry_hash(seq + 1, _at(at), event, actor, body, None, prev, made_by)
    params = {
        "e_seq": seq + 1,
        "e_at": at,
        "e_event": event,
        "e_actor": actor,
        "e_payload": body,
        "e_prev": prev,
        "e_hash": digest,
        "e_origin": made_by,
    }
    conn = session.connection()
    statements = _locked_statements(None if along is None else along[0], conn.dialect.name == "postgresql")
    if along is not None:
        params.update(along[1])
    counts = [conn.execute(statement, params).rowcount for statement in statements]
    if len(counts) > 1 and counts[-2] != 1:  # the entry's INSERT, apart: a trigger swallowed it
        raise StorageError(_SWALLOWED)
    if counts[-1] != 1:  # the last statement moves the head (on PostgreSQL only with the entry)
        raise StorageError(
            "the audit log head moved under an append that held its lock"
            + ("" if len(counts) > 1 else f", or {_SWALLOWED}")
        )
    for held in [o for o in session.identity_map.values() if isinstance(o, AuditHead)]:
        session.expire(held)
    return seq + 1


def intact(entry: AuditEntry) -> bool:
    """Whether one entry's content still matches its own hash (an edit without re-hashing shows).

    A consistent rewrite from this entry on is for the chain check and the witnesses.
    """
    recomputed = entry_hash(
        entry.seq,
        _at(entry.at),
        entry.event,
        entry.actor,
        entry.payload,
        entry.signature,
        entry.prev_hash,
        entry.origin,
    )
    return recomputed == entry.hash


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    reason: str


CHAIN_BATCH = 10_000
"""Entries read per query when the chain is checked: memory stays bounded at any length."""


_CHAIN_PAGE = text(
    "SELECT seq, at, event, actor, payload, signature, prev_hash, hash, origin FROM audit_log "
    "WHERE seq > :last ORDER BY seq LIMIT :n"
)


def iter_chain(session: Session, batch: int | None = None) -> Iterator[tuple[Any, ...]]:
    """Every entry as a plain row ``(seq, at, event, actor, payload, signature, prev_hash,
    hash, origin)`` in order, read ``batch`` at a time by sequence (no ORM objects, no type
    conversion: ``at`` is as the driver gives it, see :func:`_stamp`)."""
    last = -1
    batch = batch or CHAIN_BATCH
    require_paged_keys(session)  # seq unique: no second entry of a page's last seq goes unread
    while True:
        rows = plain_rows(session, _CHAIN_PAGE, {"last": last, "n": batch})
        if not rows:
            return
        yield from rows
        last = rows[-1][0]


_EVENT_PAGE = text(
    "SELECT seq, at, event, actor, payload, signature, prev_hash, hash, origin FROM audit_log "
    "WHERE event = :event AND seq > :last ORDER BY seq LIMIT :n"
)


def iter_event(session: Session, event: str, batch: int | None = None) -> Iterator[tuple[Any, ...]]:
    """The entries of one ``event`` as :func:`iter_chain` gives them, in log order, ``batch`` at a time."""
    last = -1
    batch = batch or CHAIN_BATCH
    require_paged_keys(session)
    while True:
        rows = plain_rows(session, _EVENT_PAGE, {"event": event, "last": last, "n": batch})
        if not rows:
            return
        yield from rows
        last = rows[-1][0]


def row_intact(row: tuple[Any, ...]) -> bool:
    """:func:`intact` for a plain row of :func:`iter_chain` or :func:`iter_event`."""
    seq, at, event, actor, payload, signature, prev_hash, digest, made_by = row
    return bool(entry_hash(seq, _stamp(at), event, actor, payload, signature, prev_hash, made_by) == digest)


def _stamp(value: Any) -> str:
    """The hashed form of a stored ``at`` (:func:`_at`): from a datetime (PostgreSQL), or from
    SQLite's text, whose usual form ``YYYY-MM-DD HH:MM:SS.ffffff`` (naive UTC, as SQLAlchemy
    writes it) is rewritten without parsing."""
    if isinstance(value, str):
        if len(value) == 26 and value[10] == " " and value[19] == ".":
            return f"{value[:10]}T{value[11:]}Z"
        value = datetime.fromisoformat(value)
    return _at(value)


PROGRESS_EVERY = 1000
"""How many entries :func:`verify_chain_counted` checks between two calls of its ``progress``."""


def _fields(*values: Any) -> list[Any]:
    """entry_hash's list: the origin (the last value) only when the entry has one."""
    return list(values[:-1]) if values[-1] is None else list(values)


def entry_mark(seq: Any, digest: Any) -> bytes:
    """One entry's sequence and stored hash as :func:`verify_chain_counted`'s ``tally`` hashes
    them (a line each), whatever their stored types."""
    return f"{seq} {digest}\n".encode()


def verify_chain_counted(
    session: Session,
    progress: Callable[[int], None] | None = None,
    *,
    tally: tuple[str, Any] | None = None,
) -> tuple[list[ChainProblem], int]:
    """:func:`verify_chain`, and how many entries it read; streamed in bounded memory.
    ``progress`` is called with the entries checked so far, every PROGRESS_EVERY and at the end.
    ``tally``: an event and a hash object, updated with :func:`entry_mark` of every entry of
    that event, in log order (what the entries of one event were, as this walk read them)."""
    problems: list[ChainProblem] = []
    tallied: object = object() if tally is None else tally[0]  # an event no entry has: none tallied
    prev = GENESIS
    expected_seq = 1
    count = 0
    dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
    quote = encode_basestring_ascii  # what that encoder writes for a string (ensure_ascii)
    sha256 = hashlib.sha256
    for seq, at, event, actor, payload, signature, prev_hash, digest, made_by in iter_chain(session):
        count += 1
        if seq != expected_seq:
            problems.append(ChainProblem(seq, f"expected entry {expected_seq}: entries missing or inserted"))
        if prev_hash != prev:
            problems.append(ChainProblem(seq, "does not link to the entry before it"))
        stamp = _stamp(at)
        try:  # entry_hash's canonical JSON written directly: the same text, without the general
            # encoder's dispatch per item (about half the time of a million entries)
            if type(seq) is not int:
                raise TypeError
            body = (
                f"[{seq},{quote(stamp)},{quote(event)},{quote(actor)},{quote(payload)},"
                f"{'null' if signature is None else quote(signature)},{quote(prev_hash)}"
                f"{'' if made_by is None else ',' + quote(made_by)}]"
            )
        except TypeError:  # a value of another type (edited by SQL): the general encoder, as entry_hash
            body = dumps(_fields(seq, stamp, event, actor, payload, signature, prev_hash, made_by))
        if sha256(body.encode()).hexdigest() != digest:
            problems.append(ChainProblem(seq, "content does not match its hash (edited)"))
        if event == tallied:
            tally[1].update(entry_mark(seq, digest))  # type: ignore[index]
        prev = digest
        expected_seq = seq + 1
        if progress is not None and count % PROGRESS_EVERY == 0:
            progress(count)
    if progress is not None:
        progress(count)
    head = session.get(AuditHead, 1)
    if head is None or head.seq != expected_seq - 1 or head.hash != prev:
        problems.append(
            ChainProblem(expected_seq - 1, "the chain's tip does not match the head (entries deleted at the end?)")
        )
    return problems, count


def verify_chain(session: Session) -> list[ChainProblem]:
    """Check every entry's hash and link, and the head; return what is wrong (empty = intact)."""
    return verify_chain_counted(session)[0]


def entries(session: Session, limit: int | None = None) -> list[dict[str, Any]]:
    """The log's entries, oldest first (the last ``limit`` when given: only those are read)."""
    query = select(AuditEntry).order_by(col(AuditEntry.seq).desc() if limit is not None else col(AuditEntry.seq))
    if limit is not None:
        query = query.limit(limit)
    rows = list(session.exec(query).all())
    if limit is not None:
        rows.reverse()
    return [
        {
            "seq": e.seq,
            "at": iso(e.at),
            "event": e.event,
            "actor": e.actor,
            "payload": json.loads(e.payload),
            "signature": e.signature,
            "origin": json.loads(e.origin) if e.origin else None,
            "hash": e.hash,
        }
        for e in rows
    ]
