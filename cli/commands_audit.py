"""``custody audit ...``: the ledger recomputed, reserves against liabilities, proof of liabilities."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from custody.bitcoin.amounts import parse_btc_amount
from custody.books import audit as audit_lib
from custody.books import inclusion
from custody.chain.backend import backend_for
from custody.control import audit_log as audit_log_lib
from custody.control import witness as witness_lib
from custody.control.wallet import load_policy
from custody.errors import HaltedError
from custody_cli import listing, output
from custody_cli.context import AppContext, example, json_option, out_file_option, pass_app
from custody_cli.helptext import SummaryGroup


@click.group("audit", cls=SummaryGroup)
def audit() -> None:
    """Audits: the ledger, reserves against liabilities, the liabilities tree."""


def _halted(report: dict[str, Any], what: str) -> HaltedError:
    if report.get("halt_error"):
        halt = f"; {report['halt_error']}"
    else:
        halt = f"; trading is halted (halt #{report['halt_id']})" if report.get("halt_id") else ""
    return HaltedError(f"{what}{halt}")


def _warn(report: dict[str, Any]) -> None:
    for warning in report.get("warnings", []):
        output.warning(warning)


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
        raise _halted(report, f"the ledger audit found {output.plural(len(report['problems']), 'problem')}")


@audit.command("reserves")
@click.option(
    "--proof",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the proof of reserves here (BitMEX's format, for validate_reserves.py).",
)
@click.option(
    "--height",
    type=click.IntRange(0),
    help="The block height to prove at (default: the tip); below the tip, liabilities must have been published there.",
)
@json_option
@pass_app
@example("custody audit reserves --proof reserves.yaml")
def audit_reserves(app: AppContext, proof: Path | None, height: int | None, as_json: bool) -> None:
    """Coins on chain at our addresses against the liabilities' root sum at the same height.

    Halts trading (exit 3) when reserves are short, or when an address holding coins is not
    the policy's. With --proof, writes every address holding coins with its descriptor and
    balance: anyone checks it with BitMEX's validate_reserves.py against their own node.
    Format: docs/FORMATS.md.
    """
    backend = backend_for(app.settings, load_policy(app.db).network.name)
    report = audit_lib.audit_reserves(app.db, app.settings, backend, height=height, proof=proof)
    if as_json:
        output.emit_json(report)
    else:
        output.key_values(
            f"Reserves at height {report['height']} (sat)",
            [
                ("on chain at our addresses", report["reserves_sat"]),
                ("liabilities (root sum)", report["liabilities_sat"]),
                ("difference", report["difference_sat"]),
            ],
        )
        for problem in report["unproven"]:
            output.line(f"UNPROVEN {problem}", style="red")
        if report["proof"]:
            output.success(f"proof of reserves ({report['addresses']} addresses) written to {report['proof']}")
    _warn(report)
    if not report["ok"]:
        if report["difference_sat"] < 0:
            raise _halted(report, f"reserves are short of liabilities by {-report['difference_sat']} sat")
        raise _halted(
            report, f"coins at {output.plural(len(report['unproven']), 'address', 'addresses')} not the policy's"
        )


@audit.command("liabilities")
@out_file_option("The tree to publish.")
@click.option(
    "--nonces",
    "nonces_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The private directory of account nonces: one file per account, kept across runs (mode 0600).",
)
@json_option
@pass_app
@example("custody audit liabilities --out liabilities.txt --nonces ./nonces")
def audit_liabilities(app: AppContext, out_file: Path, nonces_dir: Path, as_json: bool) -> None:
    """Write the proof of liabilities at the chain's tip, in BitMEX's format.

    Publish OUT. Each balance is split into random parts and blinded with its account's
    nonce. Hand each new nonce file in --nonces to its customer, once, privately; keep the
    directory: a nonce file that goes missing or changes is refused. Format: docs/FORMATS.md.
    """
    backend = backend_for(app.settings, load_policy(app.db).network.name)
    data = audit_lib.write_liabilities(app.db, backend, out_file, nonces_dir)
    if as_json:
        output.emit_json(data)
        return
    output.success(
        f"{output.plural(data['accounts'], 'account')} in {data['leaves']} leaves, "
        f"{data['root']['value_sat']} sat in all at height "
        f"{data['height']}, root {data['root']['digest']}: written to {data['out']}"
    )
    for new in data["new_nonces"]:
        output.line(f"new nonce for {new['ledger_account']} (account {new['number']}): {new['file']}")
    for key in data["negative_accounts"]:
        output.warning(f"{key} is negative and counts as zero in the tree")


@audit.command("check-inclusion")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--account", type=click.IntRange(0), help="Your account number.")
@click.option(
    "--nonce-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Your nonce file, as the exchange gave it to you (number and nonce).",
)
@click.option("--account-nonce", help="Your account nonce (hex), with --account.")
@click.option("--nonce", help="The nonce of this file's height (hex), with --account, instead of the account nonce.")
@click.option("--balance", help="The balance you expect, in BTC: checked too (0 checks an empty account).")
@json_option
@example("custody audit check-inclusion liabilities.txt --nonce-file 381920475531.json --balance 0.5")
def audit_check_inclusion(
    file: Path,
    account: int | None,
    nonce_file: Path | None,
    account_nonce: str | None,
    nonce: str | None,
    balance: str | None,
    as_json: bool,
) -> None:
    """Check that your balance is counted in a proof of liabilities (no store needed).

    Every node of the tree is checked, then the leaves your nonce opens are added up.
    Exit 0 when they are; exit 3 with the reason when not (a changed value, a changed or
    shortened tree, a missing account, another balance than --balance).
    """
    expected = None
    if balance is not None:  # a zero balance is a balance to check, not an amount to send
        expected = 0 if re.fullmatch(r"0+(\.0*)?", balance) else parse_btc_amount(balance)
    data = inclusion.check_inclusion(
        file, account=account, account_nonce=account_nonce, nonce=nonce, nonce_file=nonce_file, expected=expected
    )
    if as_json:
        output.emit_json(data)
        return
    output.success(
        f"account {data['account']}: {data['balance_sat']} sat counted in {len(data['leaves'])} leaves of the root "
        f"({data['root']['value_sat']} sat over {data['leaf_count']} leaves, height {data['height']})"
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
    problem trading is halted and the exit code is 3. A progress bar follows the check on a
    terminal (stderr; never with --json).
    """
    if ctx.invoked_subcommand is not None:
        return
    app = ctx.find_object(AppContext)
    assert app is not None
    if against and not check:
        raise click.UsageError("--against goes with --verify")
    if check:
        with output.Progress("checking the audit log", None, shown=not as_json) as bar:  # a terminal's only
            report = audit_lib.audit_log_check(app.db, app.settings, against=against, progress=bar.update)
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
        _warn(report)
        if not report["ok"]:
            raise _halted(report, f"the audit log is broken ({output.plural(len(report['problems']), 'problem')})")
        return
    app.db.check_schema()
    with app.db.transaction() as s:
        rows = audit_log_lib.entries(s, last)
    if as_json:
        output.emit_json(rows)
        return
    listing.table(
        "Audit log",
        ["seq", "at", "event", "actor", "on", "details"],
        [
            (
                r["seq"],
                r["at"],
                r["event"],
                r["actor"],
                _on(r["origin"]),
                json.dumps(r["payload"], sort_keys=True)[:120],
            )
            for r in rows
        ],
        limit=last,
    )


def _on(origin: dict[str, Any] | None) -> str:
    """``user@host`` of the process that appended an entry (blank before schema 5)."""
    return "" if not origin else f"{origin.get('user')}@{origin.get('host')}"


@audit_log_command.command("checkpoint")
@out_file_option("The checkpoint file to append to (JSON Lines; created when missing).")
@json_option
@pass_app
@example("custody audit log checkpoint --out /media/auditor/custody-checkpoints.jsonl")
def audit_log_checkpoint(app: AppContext, out_file: Path, as_json: bool) -> None:
    """Append the log's head (sequence and hash) to a checkpoint file kept outside the store.

    Keep the file where the online machine cannot change it; later, `custody audit log
    --verify --against FILE` finds a log that was truncated or rewritten since.
    """
    data = witness_lib.checkpoint(app.db, out_file)
    if as_json:
        output.emit_json(data)
        return
    output.success(f"entry {data['seq']} ({data['hash']}) witnessed in {data['out']}")


COMMANDS = [audit]
