"""``custody db harden``: the tool's PostgreSQL role may only append to the append-only tables."""

from __future__ import annotations

import click

from custody.store import harden as harden_lib
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, pass_app
from custody_cli.helptext import SummaryGroup


@click.group("db", cls=SummaryGroup)
def db_group() -> None:
    """The store's database (PostgreSQL)."""


@db_group.command("harden")
@click.option("--role", "role", required=True, help="The role the tool runs as (its CUSTODY_DB_URL user).")
@click.option("--owner", "owner", default="custody_owner", show_default=True, help="The role that owns the tables.")
@click.option("--sql", "sql_only", is_flag=True, help="Print the statements; change nothing.")
@json_option
@pass_app
@example("custody --db postgresql://postgres@db/custody db harden --role custody")
def db_harden(app: AppContext, role: str, owner: str, sql_only: bool, as_json: bool) -> None:
    """Make ROLE unable to UPDATE, DELETE or TRUNCATE the append-only tables (PostgreSQL).

    Run once as a superuser (--db names the superuser; the tool keeps its own URL): the
    tables go to OWNER (no login), ROLE gets SELECT and INSERT on the audit log, the ledger's
    entries and transactions, the addresses and the other append-only tables, and SELECT,
    INSERT, UPDATE, DELETE on the rest; triggers refuse UPDATE, DELETE and TRUNCATE on the
    append-only tables whoever asks. Schema upgrades then run as OWNER.
    """
    data = harden_lib.harden(app.db, role, owner, dry_run=sql_only)
    if as_json:
        output.emit_json(data)
        return
    if sql_only:
        for statement in data["statements"]:
            output.line(statement + ";")
        return
    output.table(
        f"What {role} may do (schema {data['schema']}, tables owned by {owner})",
        ["table", "privileges"],
        [(table, ", ".join(privileges) or "none") for table, privileges in data["privileges"].items()],
    )
    output.success(f"hardened: {role} can append to the append-only tables and change none of their rows")


COMMANDS = [db_group]
