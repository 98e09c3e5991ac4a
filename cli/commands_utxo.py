"""``custody utxo list|consolidate``."""

from __future__ import annotations

import click

from custody.withdraw import utxo as utxo_lib
from custody_cli import output
from custody_cli.commands_withdraw import chain_backend, request_row
from custody_cli.context import (
    AppContext,
    Who,
    acting_options,
    example,
    json_option,
    pass_app,
)
from custody_cli.helptext import SummaryGroup


@click.group(cls=SummaryGroup)
def utxo() -> None:
    """Custody's coins on the chain, and consolidating many small ones."""


@utxo.command("list")
@json_option
@pass_app
@example("custody utxo list --json")
def utxo_list(app: AppContext, as_json: bool) -> None:
    """Every confirmed unspent output at custody's addresses, smallest first, and the
    withdrawal or self-transfer that holds it."""
    rows = utxo_lib.list_utxos(app.db, chain_backend(app))
    if as_json:
        output.emit_json(rows)
        return
    output.table(
        f"{len(rows)} coins, {sum(r['amount_sat'] for r in rows)} sat",
        ["outpoint", "amount (sat)", "address", "account", "held by"],
        [(r["outpoint"], r["amount_sat"], r["address"], r["account"], r["reserved_by"] or "") for r in rows],
    )


@utxo.command("consolidate")
@click.option("--max-inputs", type=click.IntRange(2), default=500, show_default=True, help="The most coins to merge.")
@click.option("--fee-rate", help="Fee rate in sat/vB (default CUSTODY_FEE_RATE or 2).")
@acting_options
@example("custody utxo consolidate --max-inputs 300 --fee-rate 1 --as carol --key carol.key")
def utxo_consolidate(app: AppContext, max_inputs: int, fee_rate: str | None, who: Who, as_json: bool) -> None:
    """Request a consolidation: the smallest coins worth spending into one fresh change
    address, the transaction standard (weight under 400,000) and within the fee caps. Approve
    (the rulebook's self_transfer rule), export, sign, import, finalize and broadcast it by its id.
    """
    request_row(
        app,
        utxo_lib.consolidate,
        who=who,
        as_json=as_json,
        title=lambda d: f"Consolidation #{d['id']} of {len(d['inputs'])} coins",
        fee_rate=fee_rate,
        max_inputs=max_inputs,
    )


COMMANDS = [utxo]
