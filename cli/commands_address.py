"""``custody address ...``: issue, list, show and export deposit addresses."""

from __future__ import annotations

from pathlib import Path

import click

from custody.issuance.issuer import export_addresses, get_address, issue_addresses, list_addresses
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, pass_app

COLUMNS = ["chain", "index", "account", "address", "script_pubkey", "script", "created_at"]


@click.group()
def address() -> None:
    """Deposit addresses: issue (verified before they are shown), list, show, export."""


@address.command("new")
@click.option("--account", required=True, help="The customer account the address is for.")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 1_000_000), help="How many addresses.")
@json_option
@pass_app
@example("custody address new --account alice --count 3")
def address_new(app: AppContext, account: str, count: int, as_json: bool) -> None:
    """Issue the next deposit address(es) of the policy, each verified independently first."""
    issued = issue_addresses(app.db, app.settings, account, count)
    if as_json:
        output.emit_json([a.to_dict() for a in issued])
        return
    for a in issued:
        output.line(a.address)
    output.success(f"{len(issued)} address(es) issued for {account} (indexes {issued[0].index}..{issued[-1].index})")


@address.command("list")
@click.option("--account", help="Only this account's addresses.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@json_option
@pass_app
@example("custody address list --account alice --csv")
def address_list(app: AppContext, account: str | None, as_csv: bool, as_json: bool) -> None:
    """List issued addresses in index order."""
    rows = [a.to_dict() for a in list_addresses(app.db, account)]
    if as_json:
        output.emit_json(rows)
    elif as_csv:
        output.emit_csv(COLUMNS, rows)
    else:
        output.table(
            "Addresses",
            ["chain", "index", "account", "address", "created"],
            [(r["chain"], r["index"], r["account"], r["address"], r["created_at"]) for r in rows],
        )


@address.command("show")
@click.argument("addr", metavar="ADDRESS")
@json_option
@pass_app
@example("custody address show bcrt1q...")
def address_show(app: AppContext, addr: str, as_json: bool) -> None:
    """Show one issued address with its index and scripts."""
    data = get_address(app.db, addr).to_dict()
    if as_json:
        output.emit_json(data)
        return
    output.key_values("Address", [(k, data[k]) for k in COLUMNS])


@address.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_app
@example("custody address export addresses.jsonl")
def address_export(app: AppContext, file: Path) -> None:
    """Write the export auditors verify: network, descriptors and every address (JSON Lines)."""
    count = export_addresses(app.db, file)
    output.success(f"{count} address(es) exported to {file}")


COMMANDS = [address]
