"""The engine/session factory and the schema: SQLite by default, PostgreSQL by URL.

Every unit of work is one database transaction (:meth:`Database.transaction`). On SQLite
(always in WAL mode) a writing transaction takes the write lock up front (``BEGIN IMMEDIATE``)
so that two processes never interleave read-then-write sequences; on PostgreSQL row locks do
that job. A reading transaction (``transaction(read_only=True)``) never takes that lock: on
SQLite it is a deferred ``BEGIN`` on a WAL snapshot, refused any write (``query_only``), and
waits at most :data:`READ_TIMEOUT` seconds for a lock (only a connection that locked the
file exclusively holds one against a WAL reader); on PostgreSQL it is ``REPEATABLE READ, READ
ONLY`` (one snapshot, as SQLite's) with a ``lock_timeout``. So readers never wait behind
writers, and a read that cannot complete raises :class:`StoreBusy` quickly instead of waiting
a writer's minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlmodel import Session, SQLModel, create_engine, select

from custody.errors import CustodyError, InputError, StorageError, StoreBusy, VerificationFailed
from custody.store import models
from custody.store.light import PAGED_KEYS, SQLITE_KEYS, is_busy, key_problems, keys_message, sqlite_on_connect
from custody.store.light import READ_TIMEOUT as READ_TIMEOUT
from custody.store.light import WRITE_TIMEOUT as WRITE_TIMEOUT

_READ_ONLY = "custody_read_only"
HALT_FILE = "custody.halt_file"
"""``Session.info`` key: the halt file of the Database that opened the session, or None."""
PINNED_MANIFEST = "custody.pinned_manifest"
"""``Session.info`` key: the founders' manifest pinned on this machine (its path), or None."""


def normalize_url(url: str) -> str:
    """Map ``postgresql://`` and ``postgres://`` to the psycopg 3 driver.

    Raises InputError for an unsupported database.
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if url.startswith(("sqlite://", "postgresql+psycopg://")):
        return url
    raise InputError(f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite:/// or postgresql://")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


class Database:
    """One store. Creating it opens nothing; the first transaction connects."""

    def __init__(self, url: str, *, halt_file: Path | None = None, manifest: Path | None = None) -> None:
        self.url = normalize_url(url)
        self.halt_file = halt_file
        """This machine's halt file (custody.control.halt_file): every session of this Database
        carries it (``session.info[HALT_FILE]``) so that the halt guard also refuses while a halt
        waits there for the store. None: the store alone (a tool or test without settings)."""
        self.manifest = manifest
        """This machine's pinned founders' manifest (its path): every session carries it
        (``session.info[PINNED_MANIFEST]``) so that the halt log counts a lift only by a roster of
        these founders (custody.control.halt_log). None: the store's own (a tool or test without
        settings)."""
        self.is_sqlite = self.url.startswith("sqlite")
        self._version_checked = False
        try:
            if self.is_sqlite:
                path = make_url(self.url).database
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.engine: Engine = create_engine(
                    self.url, connect_args={"timeout": WRITE_TIMEOUT, "isolation_level": None}
                )
                event.listen(self.engine, "connect", _sqlite_on_connect)
                event.listen(self.engine, "begin", _sqlite_on_begin)
            else:
                self.engine = create_engine(self.url, pool_pre_ping=True)
                event.listen(self.engine, "begin", _postgres_on_begin)
            self._reader: Engine = self.engine.execution_options(**{_READ_ONLY: True})
        except (ArgumentError, SQLAlchemyError) as exc:
            raise StorageError(f"cannot open database {redact(self.url)}: {exc}") from None

    @contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error.

        ``read_only``: a reading transaction (see the module's docstring) that never waits
        behind a writer; anything it tries to write fails. The first transaction of this
        Database checks the store's schema version: a store from a newer tool is refused, an
        older one upgraded, before anything is read or written. Raises StoreBusy when a lock
        held elsewhere kept a read from completing, StorageError for other database failures;
        CustodyErrors pass through.
        """
        if not self._version_checked:
            self._version_checked = True
            try:
                if self.has_schema():
                    self.check_schema()
            except BaseException:
                self._version_checked = False
                raise
        try:
            engine = self._reader if read_only else self.engine
            with Session(
                engine, expire_on_commit=False, info={HALT_FILE: self.halt_file, PINNED_MANIFEST: self.manifest}
            ) as session:
                with session.begin():
                    yield session
        except CustodyError:
            raise
        except DBAPIError as exc:
            if _is_busy(exc):
                raise StoreBusy(f"the store is locked by another connection: {_first_line(exc)}") from exc
            raise StorageError(f"database error: {_first_line(exc)}") from exc
        except SQLAlchemyError as exc:
            raise StorageError(f"database error: {_first_line(exc)}") from exc

    def exists(self) -> bool:
        """Whether a custody store is there, without creating anything (no file, no tables)."""
        if self.is_sqlite:
            path = make_url(self.url).database
            if not path or path == ":memory:" or not Path(path).exists():
                return False
        return self.has_schema()

    def has_schema(self) -> bool:
        try:
            return inspect(self._reader).has_table("custody_meta")
        except DBAPIError as exc:
            if _is_busy(exc):
                raise StoreBusy(f"the store is locked by another connection: {_first_line(exc)}") from None
            raise StorageError(f"cannot reach database {redact(self.url)}: {_first_line(exc)}") from None
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot reach database {redact(self.url)}: {_first_line(exc)}") from None

    def ensure_schema(self) -> None:
        """Create the tables, or upgrade them; refuse a schema newer than this tool.

        Raises StorageError.
        """
        try:
            SQLModel.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot create the schema: {_first_line(exc)}") from None
        with self.transaction() as s:
            row = s.get(models.Meta, "schema_version")
            if row is None:
                s.add(models.Meta(key="schema_version", value=str(models.SCHEMA_VERSION)))
                if s.get(models.AuditHead, 1) is None:
                    s.add(models.AuditHead(id=1, seq=0, hash="0" * 64))
            elif int(row.value) > models.SCHEMA_VERSION:
                raise _newer(int(row.value))
            elif int(row.value) < models.SCHEMA_VERSION:
                # Upgrades from older versions go here, one step at a time.
                # 1 -> 2: the ledger and deposit tables (created above by create_all).
                # 2 -> 3: the signed manifest, roster, roster proposal and suspension tables
                # (created above). A store from before has no roster: no employee can act
                # until the founders sign one (`custody roster`), which is fail-closed.
                # 2 -> 3 also: liability_account, the proof of liabilities' account numbers (likewise).
                # 2 -> 3 also: the notification tables, which came during version 2 without a
                # version of their own, for a store made before them (notify.ensure_tables did
                # this on demand before).
                # 3 -> 4: the rulebook and rulebook proposal tables (created above). A store
                # from before has no rulebook: the built-in default rules apply.
                # 4 -> 5: the policy_epoch table (created above): key rotations. A store from
                # before has none: its one policy is epoch 0.
                # 4 -> 5 also: the block scanner's tables (created above) and an index of the
                # address table by scriptPubKey, which create_all does not add to an existing
                # table. The first sync seeds the scanner with one scan of the unspent set.
                index = models.ADDRESS_SCRIPT_INDEX
                s.connection().execute(text(f"CREATE INDEX IF NOT EXISTS {index} ON address (script_pubkey)"))
                # 4 -> 5 also: the replacement table (created above): fee bumps, cancels and
                # children paying for a signed withdrawal; a store from before has none.
                # 4 -> 5 also: service_nonce, the signed requests' nonces `custody serve` accepted,
                # shared by its instances (created above; empty: nothing to carry over).
                # 4 -> 5 also: audit_log.origin, who appended each entry (OS user, host, command);
                # entries from before keep none and their hashes (audit_log.entry_hash).
                _add_column(s, "audit_log", "origin", "TEXT")
                row.value = str(models.SCHEMA_VERSION)
                s.add(row)
            if s.get(models.LedgerHead, 1) is None:
                s.add(models.LedgerHead(id=1, total=0, entries=0, txns=0))

    def check_schema(self) -> None:
        """Raise StorageError unless the store exists at a schema this tool can use.

        A store at an older version is upgraded; a newer one is refused before any DDL. A
        table missing from a store at this version is damage: it is not made again (empty).
        Raises VerificationFailed when a key the paged reads rely on is gone
        (:func:`require_paged_keys`).
        """
        if not self.has_schema():
            raise StorageError(f"no custody store at {redact(self.url)}: run `custody init` first")
        with self.transaction(read_only=True) as s:
            row = s.exec(select(models.Meta).where(models.Meta.key == "schema_version")).first()
            version = int(row.value) if row else 0
            if version == models.SCHEMA_VERSION:
                require_paged_keys(s)
        if version > models.SCHEMA_VERSION:
            raise _newer(version)  # before any DDL: a newer store is not touched
        if version != models.SCHEMA_VERSION:
            self.ensure_schema()
            with self.transaction(read_only=True) as s:
                require_paged_keys(s)

    def dispose(self) -> None:
        self.engine.dispose()


_TABLES = ", ".join(f"'{t}'" for t, _ in PAGED_KEYS)
_OF_TABLES = (
    f"c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema()) AND c.relname IN ({_TABLES})"
)
_POSTGRES_KEYS = text(
    # light.SQLITE_KEYS' rows from the catalog of the current schema: a table with child tables
    # (INHERITS) is not plain (its unique index does not cover their rows); an index counts when
    # it is unique, valid, whole-table (no predicate) and of plain columns (no expression).
    "SELECT 't', c.relname, NULL, (c.relkind = 'r' AND NOT EXISTS "
    f"(SELECT 1 FROM pg_inherits AS h WHERE h.inhparent = c.oid))::text FROM pg_class AS c WHERE {_OF_TABLES} "
    "UNION ALL SELECT 'c', c.relname, a.attname::text, a.attnotnull::text FROM pg_class AS c "
    f"JOIN pg_attribute AS a ON a.attrelid = c.oid WHERE {_OF_TABLES} AND a.attnum > 0 AND NOT a.attisdropped "
    "UNION ALL SELECT 'u', c.relname, x.relname::text, (SELECT string_agg(a.attname::text, ',') "
    "FROM pg_attribute AS a WHERE a.attrelid = c.oid AND a.attnum = ANY (i.indkey::int2[])) "
    "FROM pg_class AS c JOIN pg_index AS i ON i.indrelid = c.oid JOIN pg_class AS x ON x.oid = i.indexrelid "
    f"WHERE {_OF_TABLES} AND i.indisunique AND i.indisvalid AND i.indisready AND i.indislive "
    "AND i.indpred IS NULL AND i.indexprs IS NULL"
)


def require_paged_keys(s: Session) -> None:
    """Refuse a store whose paged reads could skip rows: one catalog query, in the caller's
    transaction (so in the snapshot the caller then reads the rows in).

    The verifications and audits read the address table, the audit log and the ledger page by
    page by key (light.PAGED_KEYS); an insider with the store's SQL who drops a unique
    constraint could insert a second row with the key of a page's last row, which no page
    would return. Raises VerificationFailed (exit 3) when a key is not unique or not NOT NULL.
    """
    conn = s.connection()
    if conn.dialect.name == "sqlite":
        rows = [tuple(r) for r in conn.exec_driver_sql(SQLITE_KEYS).all()]
    else:
        rows = [tuple(r) for r in conn.execute(_POSTGRES_KEYS).all()]
    problems = key_problems(rows)
    if problems:
        raise VerificationFailed(keys_message(problems))


def _add_column(s: Session, table: str, column: str, sql_type: str) -> None:
    """ALTER TABLE ... ADD COLUMN (nullable) unless the column is there already."""
    present = {c["name"] for c in inspect(s.connection()).get_columns(table)}
    if column not in present:
        s.connection().execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))


def _newer(version: int) -> StorageError:
    return StorageError(
        f"the store's schema is version {version}, newer than this tool's {models.SCHEMA_VERSION}: upgrade custody"
    )


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    sqlite_on_connect(cur)
    cur.close()


def _is_busy(exc: DBAPIError) -> bool:
    """Whether a database error is a lock held elsewhere (SQLite busy/locked; PostgreSQL's
    lock_timeout), not damage."""
    return is_busy(exc.orig)


def _sqlite_on_begin(conn: Any) -> None:
    """A writer takes the write lock now and waits for it; a reader takes none (WAL) and
    refuses to write."""
    if conn.get_execution_options().get(_READ_ONLY):
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {READ_TIMEOUT * 1000}")
        conn.exec_driver_sql("PRAGMA query_only = 1")
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {WRITE_TIMEOUT * 1000}")
        conn.exec_driver_sql("PRAGMA query_only = 0")
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _postgres_on_begin(conn: Any) -> None:
    if conn.get_execution_options().get(_READ_ONLY):
        # One snapshot for the whole transaction (a reader that pages through a million rows
        # in chunks sees them as they stood when it began; a read-only transaction never fails
        # to serialize), read only.
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{READ_TIMEOUT}s'")


def plain_rows(s: Session, query: Any, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of a ``text()`` query as the driver's own tuples, in the session's transaction:
    no SQLAlchemy row object per row (a query without column types converts nothing, so the
    values are the same), for the reads that walk a million rows."""
    result = s.connection().execute(query, params)
    try:
        return result.cursor.fetchall()  # type: ignore[return-value]
    finally:
        result.close()
