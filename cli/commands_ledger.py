"""``custody ledger ...``: balances, entries and deposits of the double-entry ledger."""

from __future__ import annotations

import click

from custody.books import deposit_states, deposits, ledger
from custody_cli import listing, output
from custody_cli.context import AppContext, example, json_option, pass_app
from custody_cli.helptext import SummaryGroup


@click.group("ledger", cls=SummaryGroup)
def ledger_group() -> None:
    """The double-entry ledger: every account sums to zero after every event."""


@ledger_group.command("balance")
@click.argument("account", required=False)
@json_option
@pass_app
@example("custody ledger balance alice")
def ledger_balance(app: AppContext, account: str | None, as_json: bool) -> None:
    """One account's balance, or every account's with the totals.

    ACCOUNT is a customer account (the --account of its deposit addresses) or a ledger
    account such as asset:onchain, held:withdrawal-7, expense:network-fees.
    """
    data = ledger.balances(app.db, account)
    if as_json:
        output.emit_json(data)
        return
    if account is not None:
        output.line(f"{data['account']}: {data['balance']} BTC ({data['balance_sat']} sat)")
        return
    output.table(
        "Ledger balances",
        ["account", "kind", "balance (BTC)", "sat"],
        [(a["account"], a["kind"], a["balance"], a["balance_sat"]) for a in data["accounts"]],
    )
    t = data["totals"]
    output.key_values(
        "Totals (sat)",
        [
            ("all accounts (must be 0)", t["sum_sat"]),
            ("customer liabilities", t["customers_sat"]),
            ("held for withdrawals", t["held_sat"]),
            ("asset: coins recognized", t["asset_sat"]),
            ("network fees paid", t["network_fees_sat"]),
            ("withdrawal fees charged", t["fee_income_sat"]),
            ("fee savings", t["fee_savings_sat"]),
        ],
    )


@ledger_group.command("entries")
@click.option("--account", help="Only this account's entries (customer account or ledger account).")
@click.option("--limit", type=click.IntRange(1), help="At most this many entries.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the entries as CSV.")
@json_option
@pass_app
@example("custody ledger entries --account alice --csv")
def ledger_entries(app: AppContext, account: str | None, limit: int | None, as_csv: bool, as_json: bool) -> None:
    """The ledger's entries in posting order: debit or credit, with their event."""
    rows = ledger.iter_entries(app.db, account)
    if limit is not None:
        rows = (r for n, r in zip(range(limit), rows, strict=False))
    if as_csv:
        output.emit_csv(ledger.ENTRY_COLUMNS, rows)
        return
    if as_json:
        output.emit_json(list(rows))
        return
    listing.table(
        "Ledger entries",
        ["txn", "at", "event", "ref", "account", "debit", "credit"],
        [
            (r["txn"], r["at"], r["event"], r["ref"], r["account"], r["debit_sat"] or "", r["credit_sat"] or "")
            for r in rows
        ],
        limit=limit,
        newest_last=False,
    )


@ledger_group.command("deposits")
@click.option("--account", help="Only this customer account's deposits.")
@click.option("--status", type=click.Choice(deposit_states.STATUSES))
@listing.limit_option("deposits")
@json_option
@pass_app
@example("custody ledger deposits --status pending --limit 50")
def ledger_deposits(app: AppContext, account: str | None, status: str | None, limit: int | None, as_json: bool) -> None:
    """Deposits seen on the chain by `custody sync`: pending, credited, reversed or dropped."""
    rows = deposits.list_deposits(app.db, account, status)
    if as_json:
        output.emit_json(listing.limited(rows, limit))
        return
    listing.table(
        "Deposits",
        ["outpoint", "account", "amount", "status", "height", "confirmations"],
        [(d["outpoint"], d["account"], d["amount"], d["status"], d["height"], d["confirmations"]) for d in rows],
        limit=limit,
    )


COMMANDS = [ledger_group]
