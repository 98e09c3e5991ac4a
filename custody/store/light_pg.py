"""A read of the PostgreSQL store without the ORM, for what must start fast (``custody halt
status``, which a trading engine polls): libpq through psycopg's own wrapper of it
(``psycopg.pq``, the C implementation of psycopg_binary), never psycopg's connection and
adaptation layer nor SQLAlchemy. The transaction is the full path's reading transaction
(custody.store.db): ``REPEATABLE READ, READ ONLY`` with a ``lock_timeout`` of
:data:`~custody.store.light.READ_TIMEOUT` seconds, so it never waits behind a writer's rows
and never writes.

It connects only where it is certain to reach what the full path reaches: :func:`conninfo`
accepts the URLs whose meaning it can state exactly as SQLAlchemy's psycopg dialect reads
them (tests/test_halt_light_pg.py compares the two), and declines the rest. It answers only
what it can answer with certainty: a server it cannot reach, a store that is missing, of
another schema version, a session whose text or time output is not the one it parses (client
encoding UTF8, DateStyle ISO), a column of a type the ORM would read otherwise, or any other
error raises :class:`~custody.store.light.NotLight`, and the caller takes the full path,
which says what is wrong. A lock held elsewhere past the timeout raises StoreBusy, as the
full path does.

psycopg's package (``import psycopg``) costs more than the whole start-up target of ``halt
status``: :func:`_pq` loads ``psycopg.pq`` alone, see there.
"""

from __future__ import annotations

import _thread
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from types import ModuleType
from typing import Any
from urllib.parse import unquote

from custody.errors import StoreBusy
from custody.store.light import READ_TIMEOUT, NotLight
from custody.store.schema_version import SCHEMA_VERSION

_URL = re.compile(
    r"(?:postgres|postgresql|postgresql\+psycopg)://"
    r"(?:(?P<user>[A-Za-z0-9._~%-]*)(?::(?P<password>[A-Za-z0-9._~%!$&'()*+,;=:-]*))?@)?"
    r"(?P<host>[A-Za-z0-9._-]*)"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?:/(?P<dbname>[A-Za-z0-9._~%-]*))?"
    r"(?:\?(?P<query>[A-Za-z0-9._~%=&-]*))?"
)
_QUERY_ITEM = re.compile(r"(?P<key>[a-z_]+)=(?P<value>[A-Za-z0-9._~%-]+)")
_OWN_KEYS = frozenset({"host", "hostaddr", "port", "user", "password", "dbname", "service"})
"""Query keys that would say again (or, through a service file, elsewhere) what the URL's own
parts say: SQLAlchemy's dialect treats ``host`` and ``port`` there as a list of hosts."""


def conninfo(url: str) -> str | None:
    """The libpq connection string SQLAlchemy's psycopg dialect would connect with for ``url``
    (custody.store.db.normalize_url's forms), or None where that is not certain: anything
    outside a plain ``postgresql://[user[:password]@]host[:port][/dbname][?key=value&...]``
    with unreserved characters and percent escapes (one host; no ``+``, which SQLAlchemy reads
    in a query as a space and libpq does not; no empty or repeated key; no key that restates
    a part of the URL). The values are those of SQLAlchemy's ``make_url`` (user, password and
    database name percent-decoded, the host not) and ``create_connect_args`` (empty parts
    left out, the query's pairs added)."""
    m = _URL.fullmatch(url)
    if m is None:
        return None
    params: dict[str, str] = {}
    for name in ("host", "port", "user", "password", "dbname"):
        value = m.group(name)
        if value is None:
            continue
        if name in ("user", "password", "dbname"):
            value = unquote(value)
        if name == "port":
            value = str(int(value)) if int(value) else ""
        if value:
            params[name] = value
    query = m.group("query")
    if query is not None:
        for item in query.split("&"):
            found = _QUERY_ITEM.fullmatch(item)
            if found is None or found["key"] in params or found["key"] in _OWN_KEYS:
                return None
            params[found["key"]] = unquote(found["value"])
    return " ".join(f"{key}='{_escape(value)}'" for key, value in params.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _pq() -> ModuleType:
    """``psycopg.pq``, psycopg's wrapper of libpq, without psycopg's ``__init__`` until something
    uses the rest of psycopg.

    That ``__init__`` imports and sets up the whole driver (connections, cursors, asyncio, the
    adapters of every type): by itself more than the start-up target of ``halt status``.
    ``psycopg.pq`` needs none of it, yet Python runs a package's ``__init__`` before any of its
    submodules. So the package module is made here from psycopg's own spec, as the import
    system makes it, and its ``pq`` imported under it (with whatever that imports of psycopg:
    its errors, its enums); the ``__init__`` runs in that same module object the first time
    anything asks it for a name it does not have yet (PEP 562's module ``__getattr__``): the
    full path's ``import psycopg`` (through SQLAlchemy), or the notification step's. What
    results is what ``import psycopg`` makes, whose ``__init__`` imports ``pq`` first as well.
    Where psycopg was imported already, its ``pq`` is used as it is."""
    if "psycopg" in sys.modules:
        import psycopg.pq

        return psycopg.pq
    import importlib.util

    spec = importlib.util.find_spec("psycopg")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise NotLight("no psycopg")
    loader = spec.loader
    package = importlib.util.module_from_spec(spec)
    lock = _thread.RLock()
    importing = [True]

    def complete(name: str) -> object:
        if importing[0]:  # ``from psycopg import errors`` asks first: the submodule is imported then
            raise AttributeError(name)
        with lock:
            if vars(package).pop("__getattr__", None) is not None:
                try:
                    loader.exec_module(package)
                except BaseException:
                    if sys.modules.get("psycopg") is package:  # as a failed import leaves it
                        del sys.modules["psycopg"]
                    raise
        return getattr(package, name)

    package.__getattr__ = complete  # type: ignore[method-assign]
    sys.modules["psycopg"] = package
    try:
        import psycopg.pq as pq
    except Exception as exc:  # noqa: BLE001 - the full path's import meets it too (its __init__ imports pq first)
        raise NotLight(f"psycopg.pq: {exc}") from None
    finally:
        importing[0] = False
    return pq


_INT = frozenset({20, 21, 23})  # int8, int2, int4
_TEXT = frozenset({25, 1043})  # text, varchar
_BOOL = 16
_TIMESTAMPTZ = 1184  # timestamp with time zone: what the ORM (sqlmodel's UTCDateTime) makes of a datetime
_TIMESTAMP = 1114  # timestamp without time zone: UTCDateTime reads it as UTC
_STORED_TIME = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,6})?")
_ZONE = re.compile(rb"[+-]\d\d(:\d\d(:\d\d)?)?")
_INTEGER = re.compile(rb"-?[0-9]+")


def _value(oid: int, raw: bytes | None) -> object:
    """A value of the text format as psycopg gives it to the ORM, for the types of the columns
    the light read reads; NotLight for any other type, or a form it does not parse."""
    if raw is None:
        return None
    if oid in _TEXT:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NotLight("text that is not UTF-8") from None
    if oid in _INT and _INTEGER.fullmatch(raw):
        return int(raw)
    if oid == _BOOL and raw in (b"t", b"f"):
        return raw == b"t"
    if oid in (_TIMESTAMP, _TIMESTAMPTZ):
        return _time(raw, zoned=oid == _TIMESTAMPTZ)
    raise NotLight(f"a value of type {oid}: {raw[:40]!r}")


def _time(raw: bytes, *, zoned: bool) -> datetime:
    """A time as the ORM reads it: aware, in UTC (sqlmodel's UTCDateTime over psycopg's
    loaders), from the ISO form of the server's output (DateStyle ISO, checked at connection):
    the fraction without its trailing zeros, the offset of the session's time zone (to the
    second for some historical zones). Raises NotLight for anything else (BC, infinity)."""
    end = _STORED_TIME.match(raw)
    if end is None or (raw[end.end() :] and not zoned) or (zoned and not _ZONE.fullmatch(raw[end.end() :])):
        raise NotLight(f"a stored time {raw[:40]!r}")
    value = datetime.fromisoformat(raw.decode("ascii"))
    return value.astimezone(UTC) if zoned else value.replace(tzinfo=UTC)


class Fetched:
    """The rows of one statement, as sqlite3's cursor gives them."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


class PgCursor:
    """Statements in one transaction, in sqlite3's form (``?`` marks, rows of tuples). Values
    come back typed as the ORM would have them (:func:`_value`). Raises NotLight (any error
    of the server), StoreBusy (a lock held elsewhere past the lock timeout)."""

    def __init__(self, pq: ModuleType, conn: Any) -> None:
        self.pq = pq
        self.conn = conn

    def execute(self, sql: str, parameters: Sequence[object] = (), /) -> Fetched:
        pieces = sql.split("?")
        if len(pieces) != len(parameters) + 1:
            raise NotLight("a statement and its parameters disagree")
        command = pieces[0] + "".join(f"${n}{piece}" for n, piece in enumerate(pieces[1:], 1))
        values = [None if p is None else str(p).encode() for p in parameters]
        res = self.conn.exec_params(command.encode(), values)
        try:
            if res.status != self.pq.ExecStatus.TUPLES_OK:
                self._fail(res)
            types = [res.ftype(c) for c in range(res.nfields)]
            return Fetched(
                [tuple(_value(oid, res.get_value(r, c)) for c, oid in enumerate(types)) for r in range(res.ntuples)]
            )
        finally:
            res.clear()

    def command(self, sql: str) -> None:
        res = self.conn.exec_(sql.encode())
        try:
            if res.status != self.pq.ExecStatus.COMMAND_OK:
                self._fail(res)
        finally:
            res.clear()

    def _fail(self, res: Any) -> None:
        field = self.pq.DiagnosticField
        state = res.error_field(field.SQLSTATE)
        message = (res.error_field(field.MESSAGE_PRIMARY) or b"").decode("utf-8", "replace")
        if state == b"55P03":  # lock_not_available: lock_timeout, as custody.store.light.is_busy
            raise StoreBusy(f"the store is locked by another connection: {message.strip().splitlines()[0]}")
        raise NotLight(f"{(state or b'').decode()}: {message}")


@contextmanager
def read_transaction(info: str) -> Iterator[PgCursor]:
    """A cursor in one reading transaction of the custody store that ``info`` (:func:`conninfo`)
    reaches, at this tool's schema version. Raises NotLight, StoreBusy."""
    pq = _pq()
    conn = pq.PGconn.connect(info.encode())
    try:
        if conn.status != pq.ConnStatus.OK:
            raise NotLight("cannot connect")  # the full path says why, in its own words
        for name, wanted in ((b"client_encoding", b"UTF8"), (b"integer_datetimes", b"on")):
            if conn.parameter_status(name) != wanted:
                raise NotLight(f"{name.decode()} {conn.parameter_status(name)!r}")
        if not (conn.parameter_status(b"DateStyle") or b"").startswith(b"ISO,"):
            raise NotLight(f"DateStyle {conn.parameter_status(b'DateStyle')!r}")
        cur = PgCursor(pq, conn)
        # custody.store.db's reading transaction: one snapshot, read only, a lock waited for briefly
        cur.command("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur.command(f"SET LOCAL lock_timeout = '{READ_TIMEOUT}s'")
        exists = cur.execute("SELECT to_regclass('custody_meta') IS NOT NULL").fetchone()
        if exists != (True,):
            raise NotLight("no custody store")
        row = cur.execute("SELECT value FROM custody_meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise NotLight(f"schema version {row[0] if row else None!r}")  # older: an upgrade; newer: refused
        yield cur
    finally:
        conn.finish()
