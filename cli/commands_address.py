"""``custody address ...``: issue, list, show and export deposit addresses."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import click

from custody.issuance.issuer import export_addresses, get_address, issue_chunks, iter_issued
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, pass_app
from custody_cli.helptext import SummaryGroup

PROGRESS_FROM = 2_000
"""A batch this large shows a progress bar on a terminal (several seconds of work)."""

COLUMNS = ["chain", "index", "account", "address", "script_pubkey", "script", "created_at"]


@click.group(cls=SummaryGroup)
def address() -> None:
    """Deposit addresses: issue (verified before they are shown), list, show, export."""


@address.command("new")
@click.option("--account", required=True, help="The customer account the address is for.")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 1_000_000), help="How many addresses.")
@json_option
@pass_app
@example("custody address new --account alice --count 3")
def address_new(app: AppContext, account: str, count: int, as_json: bool) -> None:
    """Issue the next deposit address(es) of the policy, each verified independently first.

    A large count is committed and printed in chunks of 10,000 (a progress bar of the addresses
    derived and verified on stderr when it is a terminal, never with --json); a failure stops
    the rest, the chunks printed before it stay issued.
    """
    first: int | None = None
    last = 0
    done = 0
    shown = not as_json and count >= PROGRESS_FROM
    with (
        _JsonArray(sys.stdout) if as_json else contextlib.nullcontext() as array,
        output.Progress("issuing addresses", count, shown=shown) as bar,
    ):
        for part in issue_chunks(app.db, app.settings, account, count, progress=bar.update if shown else None):
            first = part[0].index if first is None else first
            last = part[-1].index
            done += len(part)
            if array is not None:
                array.extend(a.to_dict() for a in part)
            else:
                sys.stdout.write("".join(f"{a.address}\n" for a in part))
    if not as_json:
        span = f"index {first}" if first == last else f"indexes {first}..{last}"
        output.success(f"{output.plural(done, 'address', 'addresses')} issued for {account} ({span})")


@address.command("list")
@click.option("--account", help="Only this account's addresses.")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip this many first.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many (default: all).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@json_option
@pass_app
@example("custody address list --account alice --csv")
def address_list(
    app: AppContext, account: str | None, offset: int, limit: int | None, as_csv: bool, as_json: bool
) -> None:
    """List issued addresses in index order (JSON and CSV stream: any number in bounded memory)."""
    rows = (a.to_dict() for a in iter_issued(app.db, account, offset=offset, limit=limit))
    if as_json:
        with _JsonArray(sys.stdout) as array:
            array.extend(rows)
    elif as_csv:
        output.emit_csv(COLUMNS, rows)
    else:
        output.table(
            "Addresses",
            ["chain", "index", "account", "address", "created"],
            [(r["chain"], r["index"], r["account"], r["address"], r["created_at"]) for r in rows],
        )


class _JsonArray:
    """A JSON array written item by item, the same text as ``json.dumps(items, indent=2)``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0

    def __enter__(self) -> _JsonArray:
        return self

    def extend(self, items: Iterable[dict[str, Any]]) -> None:
        for item in items:
            body = json.dumps(item, indent=2, default=str).replace("\n", "\n  ")
            self.out.write(("[\n  " if self.count == 0 else ",\n  ") + body)
            self.count += 1

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None or self.count:  # closed also after a failure: what was issued stays readable
            self.out.write("\n]\n" if self.count else "[]\n")


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
    from custody.issuance.verification import count_store

    with output.Progress("exporting addresses", count_store(app.db)) as bar:
        count = export_addresses(app.db, file, progress=bar.update)
    output.success(f"{output.plural(count, 'address', 'addresses')} exported to {file}")


COMMANDS = [address]
