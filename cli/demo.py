"""``custody demo``: renders the story :mod:`custody.demo` plays (SQLite, regtest, no server).

Each step is announced, run by the library, and its data rendered here; the library does
the work and decides what must hold (a self-approval refused, issuance refused while halted).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from custody.bitcoin.script import ScriptType, parse_script_type
from custody.demo import PASSPHRASE, Story, fresh_directory
from custody_cli import output
from custody_cli.context import example


def _status(components: list[tuple[str, str]]) -> None:
    output.table("Status", ["component", "status"], components)


def _ceremony(d: dict[str, Any]) -> None:
    for name, account in d["founders"]:
        output.line(f"  {name}: {account}")


def _policy(d: dict[str, Any]) -> None:
    for s in d["signed"]:
        output.line(f"  {s['founder']} signed manifest {s['fingerprint']}")
    output.line(f"  fingerprint to read aloud on every machine that pins it: {d['fingerprint']}")


def _employees(d: dict[str, Any]) -> None:
    for name, pubkey in d["employees"]:
        output.line(f"  {name}: {pubkey} (roles: request, approve, lift)")
    output.line(f"  roster #{d['roster']} applied, signed by {', '.join(d['roster_signers'])}")
    refused = d["unsigned_refused"]
    output.line(
        f"  mallory, proposed online but not signed by the founders, cannot act (exit {refused['exit_code']}): "
        f"{refused['message']}"
    )


def _addresses(d: dict[str, Any]) -> None:
    for a in d["addresses"]:
        output.line(f"  {a['account']}  {a['chain']}/{a['index']}  {a['address']}")


def _verify(d: dict[str, Any]) -> None:
    output.line(f"  {d['checked']} of {d['exported']} addresses verified: PASS", style="green")


def _tamper(d: dict[str, Any]) -> None:
    for f in d["failures"]:
        output.line(f"  FAIL {f['address']} at {f['chain']}/{f['index']}: {f['reason']}", style="red")
    output.line(
        f"  halt #{d['halt_id']} raised; halt file {d['halt_file']} says halted={d['halted']}", style="bold red"
    )
    refused = d["issuance_refused"]
    output.line(f"  issuance refused (exit {refused['exit_code']}): {refused['message']}")
    _status(d["components"])


def _lift(d: dict[str, Any]) -> None:
    for s in d["signed"]:
        lifted = " -> lifted" if s["lifted"] else ""
        output.line(f"  {s['employee']} signed: {s['signers']} of {s['needed']}{lifted}")
    _status(d["components"])


def _deposits(d: dict[str, Any]) -> None:
    for c in d["credited"]:
        output.line(f"  {c['account']}: {c['amount']} BTC credited ({c['outpoint'][:16]}...)")


def _rulebook(d: dict[str, Any]) -> None:
    fees = d["rules"]["fees"]
    output.line(
        f"  rulebook #{d['serial']} ({d['fingerprint']}) signed by {', '.join(d['signed_by'])}: at most "
        f"{d['rules']['max_withdrawal_sat']} sat a withdrawal, {d['rules']['velocity'][0]['max_sat']} sat in "
        f"{d['rules']['velocity'][0]['window_blocks']} blocks, fees at most {fees['max_fee_sat']} sat, "
        f"{fees['max_fee_rate']} sat/vB and {fees['max_fee_share_bp'] / 100:.0f}% of the amount"
    )
    refused = d["refused"]
    output.line(f"  carol's request of 5 BTC refused (exit {refused['exit_code']}): {refused['message']}")


def _request(d: dict[str, Any]) -> None:
    w = d["withdrawal"]
    output.line(
        f"  withdrawal #{w['id']}: {w['amount']} BTC to {d['destination']}, fee {w['fee_sat']} sat, "
        f"change {w['change_sat']} sat to 1/{w['change_index']}"
    )


def _approvals(d: dict[str, Any]) -> None:
    refused = d["requester_refused"]
    output.line(f"  carol refused (exit {refused['exit_code']}): {refused['message']}")
    for a in d["approved"]:
        output.line(f"  {a['employee']} approved -> {a['status']}")


def _offline(d: dict[str, Any]) -> None:
    for s in d["signed"]:
        outs = "; ".join(
            f"{o['amount']} BTC to {o['address']}" + (" (change, verified)" if o["change"] else "")
            for o in s["outputs"]
        )
        output.line(
            f"  {s['founder']} reviews digest {s['digest']}: {outs}, fee {s['fee']} sat; rulebook #{s['rulebook']} "
            f"at height {s['height']}: tier {s['tier']}, {s['tier_approvals']} approvals"
        )
        output.line(
            f"  {s['founder']} checked approvals ({', '.join(s['approvals'])}), inputs and change; "
            f"signed {s['signatures_added']} input(s)"
        )


def _broadcast(d: dict[str, Any]) -> None:
    w = d["withdrawal"]
    output.line(f"  broadcast {d['txid']}")
    output.line(
        f"  withdrawal #{w['id']}: {w['status']} at height {w['block_height']} "
        f"({output.plural(w['confirmations'], 'confirmation')})",
        style="green",
    )
    output.line(f"  the customer's address holds {d['customer_sat']} sat on chain")


def _audit(d: dict[str, Any]) -> None:
    book, checked, reserves, log = d["balances"], d["ledger"], d["reserves"], d["log"]
    output.table("Ledger", ["account", "balance (BTC)"], [(a["account"], a["balance"]) for a in book["accounts"]])
    output.line(f"  all accounts sum to {book['totals']['sum_sat']} sat")
    output.line(f"  audit ledger: {'PASS' if checked['ok'] else 'FAIL'} ({checked['entries']} entries recomputed)")
    output.line(
        f"  audit reserves: {'PASS' if reserves['ok'] else 'FAIL'}: {reserves['reserves_sat']} sat on chain against "
        f"{reserves['liabilities_sat']} sat owed to customers"
    )
    output.line(f"  audit log: {'intact' if log['ok'] else 'BROKEN'} ({log['entries']} hash-chained entries)")


RENDER: dict[str, Callable[[dict[str, Any]], None]] = {
    "ceremony": _ceremony,
    "policy": _policy,
    "employees": _employees,
    "addresses": _addresses,
    "verify": _verify,
    "tamper": _tamper,
    "lift": _lift,
    "deposits": _deposits,
    "rulebook": _rulebook,
    "request": _request,
    "approvals": _approvals,
    "offline": _offline,
    "broadcast": _broadcast,
    "audit": _audit,
}


def _where(where: dict[str, Path | str]) -> None:
    output.line("")
    output.line("Done. Where the data lives:", style="bold")
    output.line(f"  store (SQLite):        {where['store']}")
    output.line(f"  pinned manifest:       {where['manifest']}")
    output.line(f"  halt file (engine):    {where['halt_file']}")
    output.line(f"  embedded chain:        {where['chain']}")
    output.line(f"  key files:             {where['keys']}")
    output.line(f"  auditors' files:       {where['auditors']}")
    output.line("Try next (the custody command is .venv/bin/custody after ./scripts/demo.sh):", style="bold")
    output.line(f"  export CUSTODY_HOME={where['home']} CUSTODY_CHAIN=embedded CUSTODY_PASSPHRASE='{PASSPHRASE}'")
    output.line("  custody status; custody policy show; custody address list; custody withdraw list")
    output.line("  custody ledger balance; custody audit ledger; custody audit reserves; custody audit log --verify")
    output.line(f"  custody verify addresses --manifest {where['auditor_manifest']}")
    output.line(f"  custody halt raise --reason test --as alice --key {Path(where['keys']) / 'alice.key'}")
    output.line("Each run uses a fresh directory; delete ./custody-demo to reset.")


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to put the demo's data (default: a new ./custody-demo/RUN directory).",
)
@click.option(
    "--script",
    "script_type",
    default="p2wsh",
    show_default=True,
    type=click.Choice([t.value for t in ScriptType]),
    help="Script type of the demo policy.",
)
@click.option(
    "--addresses",
    "per_account",
    default=3,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Deposit addresses per account.",
)
@example("custody demo")
def demo(directory: Path | None, script_type: str, per_account: int) -> None:
    """Run the custody story end to end in a fresh directory (SQLite, regtest, no server)."""
    story = Story(directory or fresh_directory(), parse_script_type(script_type), per_account)
    output.line("custody demo: the founders' cold storage, end to end on regtest", style="bold")
    output.info(f"demo passphrase for every key file: {PASSPHRASE!r} (demo only)")
    for step in story.steps():
        output.line("")
        output.line(f"[{step.number}] {step.title}", style="bold cyan")
        RENDER[step.name](step.run())
    _where(story.where())


COMMANDS = [demo]
