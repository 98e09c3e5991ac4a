"""On PostgreSQL: the role the tool runs as may append to the append-only tables, never change them.

``custody db harden --role APP`` (run once, as a superuser) gives the custody tables to a
separate owner role that nobody logs in as, grants the tool's role only what it needs, and
puts triggers on the append-only tables that refuse UPDATE, DELETE and TRUNCATE whoever
asks (an owner who means it must first disable them, which is an act of its own):

* append-only (:data:`APPEND_ONLY`): SELECT and INSERT;
* every other custody table: SELECT, INSERT, UPDATE, DELETE;
* the sequences: USAGE and SELECT; the schema: USAGE, and no CREATE (a schema the tool's
  role owned goes to the owner role: a schema's owner may drop what is in it).

So an insider with the tool's credentials cannot edit, delete or truncate the audit log, the
ledger's entries or the issued addresses; what they can still change (the heads, cached
balances, halts, withdrawals) is checked against the log. Schema upgrades then run as the
owner. :func:`statements` is the SQL, also printed by ``custody db harden --sql`` and shown
in the README.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import text
from sqlmodel import SQLModel

from custody.errors import InputError
from custody.store.db import Database

APPEND_ONLY = (
    "audit_log",
    "ledger_txn",
    "ledger_entry",
    "address",
    "policy",
    "founder",
    "halt_lift",
    "incident_update",
    "signed_manifest",
    "roster",
    "rulebook",
)
"""Tables the tool only ever inserts into."""

_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_FUNCTION = "custody_append_only"


def _role(name: str, what: str) -> str:
    if not _ROLE.match(name):
        raise InputError(f"{what} must be a lower-case PostgreSQL role name (letters, digits, _), not {name!r}")
    return f'"{name}"'


def statements(schema: str, app_role: str, owner_role: str, tables: list[str] | None = None) -> list[str]:
    """The SQL that hardens ``schema`` for ``app_role``, the tables owned by ``owner_role``.

    Raises InputError for a role or schema name that is not a plain identifier.
    """
    app, owner = _role(app_role, "the tool's role"), _role(owner_role, "the owner role")
    if app == owner:
        raise InputError("the owner role must not be the role the tool runs as")
    s = _role(schema, "the schema")
    names = tables if tables is not None else sorted(t.name for t in SQLModel.metadata.sorted_tables)
    append_only = [t for t in names if t in APPEND_ONLY]
    mutable = [t for t in names if t not in APPEND_ONLY]
    sql = [
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{owner_role}') "
        f"THEN CREATE ROLE {owner} NOLOGIN; END IF; END $$",
        f"DO $$ BEGIN IF (SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = '{schema}') "
        f"= '{app_role}' THEN ALTER SCHEMA {s} OWNER TO {owner}; END IF; END $$",
        f"REVOKE CREATE ON SCHEMA {s} FROM PUBLIC",
        f"REVOKE CREATE ON SCHEMA {s} FROM {app}",
        f"GRANT USAGE ON SCHEMA {s} TO {app}",
    ]
    sql += [f"ALTER TABLE {s}.{t} OWNER TO {owner}" for t in names]  # their sequences follow
    sql += [f"REVOKE ALL ON {s}.{t} FROM PUBLIC, {app}" for t in names]
    sql += [f"GRANT SELECT, INSERT ON {s}.{t} TO {app}" for t in append_only]
    sql += [f"GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.{t} TO {app}" for t in mutable]
    sql += [
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {app}",
        f"CREATE OR REPLACE FUNCTION {s}.{_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'custody: % on % refused: the table is append-only', TG_OP, TG_TABLE_NAME "
        "USING ERRCODE = 'insufficient_privilege'; END $$",
        f"ALTER FUNCTION {s}.{_FUNCTION}() OWNER TO {owner}",
    ]
    for t in append_only:
        sql += [
            f"DROP TRIGGER IF EXISTS {_FUNCTION} ON {s}.{t}",
            f"CREATE TRIGGER {_FUNCTION} BEFORE UPDATE OR DELETE ON {s}.{t} "
            f"FOR EACH ROW EXECUTE FUNCTION {s}.{_FUNCTION}()",
            f"DROP TRIGGER IF EXISTS {_FUNCTION}_truncate ON {s}.{t}",
            f"CREATE TRIGGER {_FUNCTION}_truncate BEFORE TRUNCATE ON {s}.{t} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {s}.{_FUNCTION}()",
        ]
    return sql


def harden(db: Database, app_role: str, owner_role: str = "custody_owner", *, dry_run: bool = False) -> dict[str, Any]:
    """Harden the store's schema for ``app_role`` (see the module); run as a superuser.

    Returns the statements and, after them, what ``app_role`` may do to each table. Raises
    InputError on SQLite, for a bad role name, an ``app_role`` that does not exist, is a
    superuser, could act as the owner or owns the schema's database objects some other way;
    StorageError when the server refuses a statement (nothing is changed then: one
    transaction).
    """
    if db.is_sqlite:
        raise InputError("custody db harden is for PostgreSQL: a SQLite file is as writable as its directory")
    db.check_schema()
    with db.transaction() as s:
        conn = s.connection()
        schema = conn.execute(text("SELECT current_schema()")).scalar_one()
        sql = statements(schema, app_role, owner_role)
        if dry_run:
            return {"schema": schema, "owner": owner_role, "role": app_role, "statements": sql, "privileges": {}}
        role = conn.execute(
            text("SELECT rolsuper, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = :r"), {"r": app_role}
        ).first()
        if role is None:
            raise InputError(f"there is no role {app_role!r} on this server: create it first (CREATE ROLE ... LOGIN)")
        if role[0] or role[1] or role[2]:
            raise InputError(f"role {app_role!r} is a superuser or can create roles: it could undo any hardening")
        if conn.execute(text("SELECT current_user")).scalar_one() == app_role:
            raise InputError("run custody db harden as a superuser, not as the role the tool runs as")
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        for statement in sql:
            cursor.execute(statement)  # no parameters: the driver leaves % in a function body alone
        owns = conn.execute(
            text(
                "SELECT pg_has_role(:r, nspowner, 'USAGE') FROM pg_namespace WHERE nspname = :s "
                "UNION ALL SELECT pg_has_role(:r, :o, 'USAGE')"
            ),
            {"r": app_role, "s": schema, "o": owner_role},
        ).all()
        if any(row[0] for row in owns):
            raise InputError(
                f"role {app_role!r} owns schema {schema!r} or is a member of its owner or of {owner_role!r}: "
                "it could drop the tables; give the schema to another role first (ALTER SCHEMA ... OWNER TO)"
            )
        privileges = {
            t: [
                p
                for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")
                if conn.execute(
                    text("SELECT has_table_privilege(:r, :t, :p)"), {"r": app_role, "t": f"{schema}.{t}", "p": p}
                ).scalar_one()
            ]
            for t in sorted(tb.name for tb in SQLModel.metadata.sorted_tables)
        }
    return {"schema": schema, "owner": owner_role, "role": app_role, "statements": sql, "privileges": privileges}
