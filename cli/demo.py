"""``custody demo``: renders the story :mod:`custody.demo` plays (SQLite, regtest, no server).

Each step is announced, run by the library, and its data rendered here; the library does
the work and decides what must hold (a self-approval refused, issuance refused while halted).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from custody.bitcoin.script import parse_script_type
from custody.demo import PASSPHRASE, Story, fresh_directory
from custody_cli import output
from custody_cli.context import example, script_type_option

WIDTH = 120  # the demo fits two screens of a 120x40 terminal; --verbose shows everything


class _Mode:
    verbose = False


def _say(text: str, style: str | None = None) -> None:
    """One line of the story, cut to the width with an ellipsis unless --verbose."""
    if not _Mode.verbose and len(text) > WIDTH:
        text = text[: WIDTH - 1] + "…"
    output.line(text, style=style)


def _short(value: str, keep: int = 12) -> str:
    """A long identifier's head and tail (``tpubDF1eY7qr…gazsDGP3``) unless --verbose."""
    if _Mode.verbose or len(value) <= 2 * keep + 1:
        return value
    return f"{value[:keep]}…{value[-8:]}"


def _status(components: list[tuple[str, str]]) -> None:
    if _Mode.verbose:
        output.table("Status", ["component", "status"], components)
        return
    states = {state for _, state in components}
    if len(states) == 1:
        _say(f"  status: all {len(components)} components {states.pop()}")
    else:
        _say("  status: " + ", ".join(f"{name} {state}" for name, state in components))


def _ceremony(d: dict[str, Any]) -> None:
    for name, account in d["founders"]:
        origin, _, xpub = str(account).partition("]")
        _say(f"  {name}: {origin}]{_short(xpub)}")


def _policy(d: dict[str, Any]) -> None:
    if _Mode.verbose:
        for s in d["signed"]:
            _say(f"  {s['founder']} signed manifest {s['fingerprint']}")
    else:
        _say(f"  signed by {', '.join(s['founder'] for s in d['signed'])}")
    _say(f"  fingerprint to read aloud on every machine that pins it: {d['fingerprint']}")


def _employees(d: dict[str, Any]) -> None:
    if _Mode.verbose:
        for name, pubkey in d["employees"]:
            _say(f"  {name}: {pubkey} (roles: request, approve, lift)")
    else:
        _say(f"  {', '.join(name for name, _ in d['employees'])} (roles: request, approve, lift)")
    _say(f"  roster #{d['roster']} applied, signed by {', '.join(d['roster_signers'])}")
    refused = d["unsigned_refused"]
    _say(
        f"  mallory, proposed online but not signed by the founders, cannot act (exit {refused['exit_code']}): "
        f"{refused['message']}"
    )


def _addresses(d: dict[str, Any]) -> None:
    shown: dict[str, int] = {}
    for a in d["addresses"]:
        shown[a["account"]] = shown.get(a["account"], 0) + 1
        if _Mode.verbose or shown[a["account"]] == 1:
            _say(f"  {a['account']}  {a['chain']}/{a['index']}  {a['address']}")
    if not _Mode.verbose:
        _say(f"  ({len(d['addresses'])} addresses in all; --verbose lists every one)")


def _verify(d: dict[str, Any]) -> None:
    _say(f"  {d['checked']} of {d['exported']} addresses verified: PASS", style="green")


def _tamper(d: dict[str, Any]) -> None:
    failures = d["failures"] if _Mode.verbose else d["failures"][:1]
    for f in failures:
        _say(f"  FAIL {f['address']} at {f['chain']}/{f['index']}: {f['reason']}", style="red")
    if len(failures) < len(d["failures"]):
        _say(f"  ({len(d['failures']) - len(failures)} more failures)")
    _say(f"  halt #{d['halt_id']} raised; halt file {d['halt_file']} says halted={d['halted']}", style="bold red")
    refused = d["issuance_refused"]
    _say(f"  issuance refused (exit {refused['exit_code']}): {refused['message']}")
    _status(d["components"])


def _lift(d: dict[str, Any]) -> None:
    for s in d["signed"]:
        lifted = " -> lifted" if s["lifted"] else ""
        _say(f"  {s['employee']} signed: {s['signers']} of {s['needed']}{lifted}")
    _status(d["components"])


def _deposits(d: dict[str, Any]) -> None:
    for c in d["credited"]:
        _say(f"  {c['account']}: {c['amount']} BTC credited ({_short(c['outpoint'], 16)})")


def _rulebook(d: dict[str, Any]) -> None:
    fees = d["rules"]["fees"]
    _say(f"  rulebook #{d['serial']} ({d['fingerprint']}) signed by {', '.join(d['signed_by'])}:")
    _say(
        f"    at most {d['rules']['max_withdrawal_sat']} sat a withdrawal, {d['rules']['velocity'][0]['max_sat']} sat "
        f"in {d['rules']['velocity'][0]['window_blocks']} blocks, fees at most {fees['max_fee_sat']} sat, "
        f"{fees['max_fee_rate']} sat/vB and {fees['max_fee_share_bp'] / 100:.0f}% of the amount"
    )
    refused = d["refused"]
    message = refused["message"] if _Mode.verbose else refused["message"].partition(": ")[2]
    _say(f"  carol's request of 5 BTC refused (exit {refused['exit_code']}): {message}")


def _request(d: dict[str, Any]) -> None:
    w = d["withdrawal"]
    change_at = f" to 1/{w['change_index']}" if _Mode.verbose else ""
    _say(
        f"  withdrawal #{w['id']}: {w['amount']} BTC to {d['destination']}, fee {w['fee_sat']} sat, "
        f"change {w['change_sat']} sat{change_at}"
    )


def _approvals(d: dict[str, Any]) -> None:
    refused = d["requester_refused"]
    _say(f"  carol refused (exit {refused['exit_code']}): {refused['message']}")
    for a in d["approved"]:
        _say(f"  {a['employee']} approved -> {a['status']}")


def _offline(d: dict[str, Any]) -> None:
    for s in d["signed"]:
        if _Mode.verbose:
            outs = "; ".join(
                f"{o['amount']} BTC to {o['address']}" + (" (change, verified)" if o["change"] else "")
                for o in s["outputs"]
            )
            _say(
                f"  {s['founder']} reviews digest {s['digest']}: {outs}, fee {s['fee']} sat; "
                f"rulebook #{s['rulebook']} at height {s['height']}: tier {s['tier']}, {s['tier_approvals']} approvals"
            )
            _say(
                f"  {s['founder']} checked approvals ({', '.join(s['approvals'])}), inputs and change; "
                f"signed {output.plural(s['signatures_added'], 'input')}"
            )
            continue
        _say(
            f"  {s['founder']} signed {output.plural(s['signatures_added'], 'input')}: digest {s['digest']}, "
            f"rulebook #{s['rulebook']} at height {s['height']}, {len(s['outputs'])} outputs, fee {s['fee']} sat"
        )


def _broadcast(d: dict[str, Any]) -> None:
    w = d["withdrawal"]
    _say(f"  broadcast {d['txid']}")
    _say(
        f"  withdrawal #{w['id']}: {w['status']} at height {w['block_height']} "
        f"({output.plural(w['confirmations'], 'confirmation')})",
        style="green",
    )
    _say(f"  the customer's address holds {d['customer_sat']} sat on chain")


def _audit(d: dict[str, Any]) -> None:
    book, checked, reserves, log = d["balances"], d["ledger"], d["reserves"], d["log"]
    if _Mode.verbose:
        output.table("Ledger", ["account", "balance (BTC)"], [(a["account"], a["balance"]) for a in book["accounts"]])
    else:
        width = max(len(a["account"]) for a in book["accounts"])
        for a in book["accounts"]:
            _say(f"  {a['account'].ljust(width)}  {a['balance']:>14} BTC")
    _say(f"  all accounts sum to {book['totals']['sum_sat']} sat")
    _say(f"  audit ledger: {'PASS' if checked['ok'] else 'FAIL'} ({checked['entries']} entries recomputed)")
    _say(
        f"  audit reserves: {'PASS' if reserves['ok'] else 'FAIL'}: {reserves['reserves_sat']} sat on chain against "
        f"{reserves['liabilities_sat']} sat owed to customers"
    )
    _say(f"  audit log: {'intact' if log['ok'] else 'BROKEN'} ({log['entries']} hash-chained entries)")


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
    _say(f"  store (SQLite):        {where['store']}")
    _say(f"  halt file (engine):    {where['halt_file']}")
    _say(f"  key files, auditors:   {where['keys']}, {where['auditors']}")
    if _Mode.verbose:
        _say(f"  pinned manifest:       {where['manifest']}")
        _say(f"  embedded chain:        {where['chain']}")
    output.line("Try next (the custody command is .venv/bin/custody after ./scripts/demo.sh):", style="bold")
    output.line(f"  export CUSTODY_HOME={where['home']} CUSTODY_CHAIN=embedded")  # whole: to be copied
    output.line(f"  export CUSTODY_PASSPHRASE='{PASSPHRASE}'")
    _say("  custody status; custody withdraw list; custody ledger balance; custody audit log --verify")
    if _Mode.verbose:
        _say("  custody policy show; custody address list; custody audit ledger; custody audit reserves")
        _say(f"  custody verify addresses --manifest {where['auditor_manifest']}")
        _say(f"  custody halt raise --reason test --as alice --key {Path(where['keys']) / 'alice.key'}")
    _say("Each run uses a fresh directory; delete ./custody-demo to reset. --verbose shows every detail.")


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to put the demo's data (default: a new ./custody-demo/RUN directory).",
)
@script_type_option("Script type of the demo policy.")
@click.option(
    "--addresses",
    "per_account",
    default=3,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Deposit addresses per account.",
)
@click.option("--verbose", "-v", is_flag=True, help="Every detail: whole keys and addresses, every table.")
@example("custody demo")
def demo(directory: Path | None, script_type: str, per_account: int, verbose: bool) -> None:
    """Run the custody story end to end in a fresh directory (SQLite, regtest, no server).

    It fits two screens of a 120x40 terminal: long keys shortened, one address per account;
    --verbose shows everything.
    """
    _Mode.verbose = verbose
    story = Story(directory or fresh_directory(), parse_script_type(script_type), per_account)
    output.line("custody demo: the founders' cold storage, end to end on regtest", style="bold")
    output.info(f"demo passphrase for every key file: {PASSPHRASE!r} (demo only)")
    for step in story.steps():
        if _Mode.verbose:
            output.line("")
        _say(f"[{step.number}] {step.title}", style="bold cyan")
        RENDER[step.name](step.run())
    _where(story.where())


COMMANDS = [demo]
