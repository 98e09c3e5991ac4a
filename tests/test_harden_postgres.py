"""``custody db harden`` against the real PostgreSQL server: the tool's role cannot UPDATE,
DELETE or TRUNCATE the append-only tables, and the tool keeps working as that role."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from tests.conftest import PG_URL
from tests.support import Custody, founders
from tests.test_operator_schemas import _validator

pytestmark = pytest.mark.postgres


def _admin_url() -> str:
    assert PG_URL
    return PG_URL.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture
def roles() -> Iterator[tuple[str, str, str]]:
    """A login role for the tool, an owner role's name, and a schema the tool's role owns at first."""
    if not PG_URL:
        pytest.skip("CUSTODY_TEST_POSTGRES_URL is not set (CI sets it)")
    tag = uuid.uuid4().hex[:8]
    app, owner, schema = f"custody_app_{tag}", f"custody_owner_{tag}", f"custody_harden_{tag}"
    admin = create_engine(_admin_url())
    with admin.begin() as conn:
        conn.execute(text(f'CREATE ROLE "{app}" LOGIN'))
        conn.execute(text(f'CREATE SCHEMA "{schema}" AUTHORIZATION "{app}"'))
    yield app, owner, schema
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        for role in (app, owner):
            if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first():
                conn.execute(text(f'DROP OWNED BY "{role}" CASCADE'))
                conn.execute(text(f'DROP ROLE "{role}"'))
    admin.dispose()


def _url(role: str, schema: str) -> str:
    assert PG_URL
    base, _, database = PG_URL.rpartition("/")
    host = base.split("@", 1)[-1]
    return f"postgresql://{role}@{host}/{database.split('?')[0]}?options=-csearch_path%3D{schema}"


def test_the_tools_role_can_append_but_not_change_and_keeps_working(
    tmp_path: Path, roles: tuple[str, str, str]
) -> None:
    app, owner, schema = roles
    tool = Custody(tmp_path / "home", db_url=_url(app, schema))
    assert tool.init(founders()).exit_code == 0  # the tool's role creates (and owns) the tables
    tool.employee("alice")
    assert tool("address", "new", "--account", "acct-1", "--count", "3").exit_code == 0

    superuser = Custody(tmp_path / "admin", db_url=_url("postgres", schema))
    hardened = superuser("db", "harden", "--role", app, "--owner", owner, "--json")
    assert hardened.exit_code == 0, hardened.output
    data = json.loads(hardened.stdout)
    assert not list(_validator("db-harden").iter_errors(data))  # its documented shape
    assert (data["role"], data["owner"], data["schema"]) == (app, owner, schema)
    privileges = data["privileges"]
    assert privileges["audit_log"] == ["SELECT", "INSERT"]
    assert privileges["ledger_entry"] == ["SELECT", "INSERT"]
    assert privileges["address"] == ["SELECT", "INSERT"]
    assert privileges["audit_head"] == ["SELECT", "INSERT", "UPDATE", "DELETE"]

    engine = create_engine(_url(app, schema).replace("postgresql://", "postgresql+psycopg://", 1))
    attacks = [
        "UPDATE audit_log SET payload = '{}' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)",
        "TRUNCATE audit_log",
        "UPDATE address SET account = 'mallory'",
        "DELETE FROM address",
        "UPDATE ledger_entry SET account_id = 1",
        "DELETE FROM ledger_txn",
        "DROP TABLE audit_log",
        "ALTER TABLE audit_log DISABLE TRIGGER ALL",
        "CREATE TABLE side (x int)",
    ]
    for attack in attacks:
        with pytest.raises(DBAPIError) as refused, engine.begin() as conn:
            conn.execute(text(attack))
        assert "permission denied" in str(refused.value) or "must be owner" in str(refused.value), attack
    # Even the owner's triggers refuse: a superuser's UPDATE of the log fails too.
    admin = create_engine(_admin_url())
    with pytest.raises(DBAPIError, match="append-only"), admin.begin() as conn:
        conn.execute(text(f"UPDATE \"{schema}\".audit_log SET actor = 'x' WHERE seq = 1"))
    with pytest.raises(DBAPIError, match="append-only"), admin.begin() as conn:
        conn.execute(text(f'TRUNCATE "{schema}".ledger_entry'))
    admin.dispose()
    engine.dispose()

    # The tool, as its role, keeps working: issuance, postings, audits, halts.
    assert tool("address", "new", "--account", "acct-2", "--count", "2").exit_code == 0
    from custody.books import ledger
    from custody.store.db import Database

    db = Database(tool.env["CUSTODY_DB_URL"])
    with db.transaction() as s:
        ledger.post(s, "bench", [(ledger.ASSET, 1000), (ledger.customer("acct-1"), -1000)], ref="test")
    db.dispose()
    for command in (["audit", "ledger"], ["audit", "log", "--verify"]):
        result = tool(*command)
        assert result.exit_code == 0, result.output
    manifest = str(tool.home / "founders-manifest.json")
    assert tool("verify", "addresses", "--manifest", manifest).exit_code == 0
    raised = tool("halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(tool.home / "keys/alice.key"))
    assert raised.exit_code == 0, raised.output
    assert tool("halt", "status").exit_code == 3


def test_harden_refuses_sqlite_and_a_superuser_as_the_tools_role(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    result = c("db", "harden", "--role", "custody")
    assert result.exit_code == 2 and "PostgreSQL" in result.output
    bad = c("db", "harden", "--role", 'x"; DROP TABLE audit_log; --')
    assert bad.exit_code == 2


def test_harden_refuses_a_superuser_role(pg_url: str, tmp_path: Path) -> None:
    c = Custody(tmp_path / "home", db_url=pg_url)
    assert c.init(founders()).exit_code == 0
    result = c("db", "harden", "--role", "postgres")
    assert result.exit_code == 2, result.output
    assert "superuser" in result.output
