"""``custody audit ...``: the ledger recomputed, reserves against liabilities, proof of liabilities."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from custody.bitcoin.amounts import parse_btc_amount
from custody.books import audit as audit_lib
from custody.books import liabilities
from custody.chain.backend import backend_for
from custody.control import audit_log as audit_log_lib
from custody.control import witness as witness_lib
from custody.control.wallet import load_policy
from custody.errors import HaltedError
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, pass_app


@click.group("audit")
def audit() -> None:
    """Audits: the ledger, reserves against liabilities, the liabilities tree."""


def _halted(report: dict[str, Any], what: str) -> HaltedError:
    halt = f"; trading is halted (halt #{report['halt_id']})" if report.get("halt_id") else ""
    return HaltedError(f"{what}{halt}")


@audit.command("ledger")
@json_option
@pass_app
@example("custody audit ledger --json")
def audit_ledger(app: AppContext, as_json: bool) -> None:
    """Recompute the whole ledger from its entries; halt trading (exit 3) on any mismatch.

    Every transaction sums to zero, all entries sum to zero, every cached balance and the
    running head equal their recomputation.
    """
    report = audit_lib.audit_ledger(app.db, app.settings)
    if as_json:
        output.emit_json(report)
    else:
        for problem in report["problems"]:
            output.line(f"MISMATCH {problem}", style="red")
        for warning in report["warnings"]:
            output.warning(warning)
        if report["ok"]:
            output.success(
                f"ledger balanced: {report['entries']} entries in {report['transactions']} transactions, "
                f"{report['accounts']} accounts, sum 0 ({report['seconds']} s)"
            )
    if not report["ok"]:
        raise _halted(report, f"the ledger audit found {len(report['problems'])} problem(s)")


@audit.command("reserves")
@json_option
@pass_app
@example("custody audit reserves")
def audit_reserves(app: AppContext, as_json: bool) -> None:
    """Coins on chain at our addresses against customer liabilities; halt (exit 3) when short."""
    backend = backend_for(app.settings, load_policy(app.db).network.name)
    report = audit_lib.audit_reserves(app.db, app.settings, backend)
    if as_json:
        output.emit_json(report)
    else:
        output.key_values(
            f"Reserves at tip height {report['tip_height']} (sat)",
            [
                ("on chain at our addresses", report["reserves_sat"]),
                ("customer liabilities", report["liabilities_sat"]),
                ("  of which held for withdrawals", report["held_sat"]),
                ("difference", report["difference_sat"]),
            ],
        )
    if not report["ok"]:
        raise _halted(report, f"reserves are short of liabilities by {-report['difference_sat']} sat")


@audit.command("liabilities")
@click.option(
    "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The tree to publish."
)
@click.option(
    "--proofs",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write each account's private proof (default OUT with .proofs.jsonl; mode 0600).",
)
@json_option
@pass_app
@example("custody audit liabilities --out liabilities.json")
def audit_liabilities(app: AppContext, out: Path, proofs: Path | None, as_json: bool) -> None:
    """Write the Merkle sum tree of customer liabilities, and each account's proof.

    Publish OUT; hand each customer their own line of the proofs file (their nonce and
    path), never the whole file. Format: docs/FORMATS.md.
    """
    data = audit_lib.write_liabilities(app.db, out, proofs)
    if as_json:
        output.emit_json(data)
        return
    output.success(
        f"{data['accounts']} account(s), {data['root']['sum']} sat in all, root {data['root']['hash']}: "
        f"written to {data['out']}; proofs (private) in {data['proofs']}"
    )
    for key in data["negative_accounts"]:
        output.warning(f"{key} is negative and counts as zero in the tree")


@audit.command("check-inclusion")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--account", required=True, help="Your account.")
@click.option("--nonce", help="Your account's nonce (hex), as the exchange gave it to you.")
@click.option("--proof", type=click.Path(dir_okay=False, path_type=Path), help="Your proof file (instead of --nonce).")
@click.option("--balance", help="The balance you expect, in BTC: checked too.")
@json_option
@example("custody audit check-inclusion liabilities.json --account alice --proof alice-proof.json")
def audit_check_inclusion(
    file: Path, account: str, nonce: str | None, proof: Path | None, balance: str | None, as_json: bool
) -> None:
    """Check that your balance is counted in a liabilities file (no store needed).

    Exit 0 when it is; exit 3 with the reason when it is not (a changed balance, a changed
    tree, or a missing account).
    """
    expected = None
    if balance is not None:  # a zero balance is a balance to check, not an amount to send
        expected = 0 if re.fullmatch(r"0+(\.0*)?", balance) else parse_btc_amount(balance)
    data = liabilities.check_inclusion(file, account, nonce=nonce, proof=proof, expected=expected)
    if as_json:
        output.emit_json(data)
        return
    output.success(
        f"{data['account']}: {data['balance_sat']} sat counted in the root ({data['root']['sum']} sat over "
        f"{data['leaves']} accounts, as of {data['as_of']})"
    )


@audit.group("log", invoke_without_command=True)
@click.option("--verify", "check", is_flag=True, help="Check the chain; exit 3 and halt trading when it is broken.")
@click.option(
    "--against",
    "against",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --verify: a witness (a checkpoint file, a saved notification body or mail); repeatable.",
)
@click.option("--last", type=click.IntRange(1), help="Show only the last N entries.")
@json_option
@click.pass_context
@example("custody audit log --verify --against auditor-checkpoints.jsonl")
def audit_log_command(
    ctx: click.Context, check: bool, against: tuple[Path, ...], last: int | None, as_json: bool
) -> None:
    """The append-only, hash-chained log of every custody event.

    With --verify, an edited, deleted, inserted or reordered entry is named by its sequence
    number; the log is compared with the local witness file and each --against witness (a
    log shorter than witnessed, or diverging from it, was truncated or rewritten); the
    ledger's entries and the address rows are compared with what the log recorded. On any
    problem trading is halted and the exit code is 3.
    """
    if ctx.invoked_subcommand is not None:
        return
    app = ctx.find_object(AppContext)
    assert app is not None
    if against and not check:
        raise click.UsageError("--against goes with --verify")
    if check:
        report = audit_lib.audit_log_check(app.db, app.settings, against=against)
        if as_json:
            output.emit_json(report)
        elif report["ok"]:
            seen = ", ".join(f"{w['source']} (up to entry {w['highest_seq']})" for w in report["witnesses"])
            output.success(
                f"the audit log's {report['entries']} entries chain intact"
                + (f"; it agrees with {seen}" if seen else "; no witness to compare it with")
            )
        else:
            for p in report["problems"]:
                output.line(f"entry {p['seq']}: {p['reason']}", style="red")
        if not report["ok"]:
            raise _halted(report, f"the audit log is broken ({len(report['problems'])} problem(s))")
        return
    app.db.check_schema()
    with app.db.transaction() as s:
        rows = audit_log_lib.entries(s, last)
    if as_json:
        output.emit_json(rows)
        return
    output.table(
        "Audit log",
        ["seq", "at", "event", "actor", "details"],
        [(r["seq"], r["at"], r["event"], r["actor"], json.dumps(r["payload"], sort_keys=True)[:120]) for r in rows],
    )


@audit_log_command.command("checkpoint")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The checkpoint file to append to (JSON Lines; created when missing).",
)
@json_option
@pass_app
@example("custody audit log checkpoint --out /media/auditor/custody-checkpoints.jsonl")
def audit_log_checkpoint(app: AppContext, out: Path, as_json: bool) -> None:
    """Append the log's head (sequence and hash) to a checkpoint file kept outside the store.

    Keep the file where the online machine cannot change it; later, `custody audit log
    --verify --against FILE` finds a log that was truncated or rewritten since.
    """
    data = witness_lib.checkpoint(app.db, out)
    if as_json:
        output.emit_json(data)
        return
    output.success(f"entry {data['seq']} ({data['hash']}) witnessed in {data['out']}")


COMMANDS = [audit]
