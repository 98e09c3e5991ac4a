"""``custody withdraw ...``, ``custody sign`` and ``custody sync``."""

# size(module): every withdraw command in one group (bump and cancel added); split the replacements'
#   commands into their own module next

from __future__ import annotations

import base64
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from custody.bitcoin import psbt as psbt_lib
from custody.books import deposits
from custody.chain.backend import backend_for
from custody.control import epochs
from custody.control import halt as halt_lib
from custody.control.wallet import load_policy
from custody.errors import ApprovalError, HaltedError, InputError
from custody.files import PSBT_MAX, read_limited
from custody.withdraw import batch as wd_batch
from custody.withdraw import broadcast as wd_broadcast
from custody.withdraw import limits as wd_limits
from custody.withdraw import psbt_io as wd_psbt
from custody.withdraw import queue as wd
from custody.withdraw import replace, replace_sync
from custody.withdraw import states as wd_states
from custody.withdraw.signer import Review, SignerState, review, sign_reviewed, state_path
from custody_cli import listing, output
from custody_cli.context import (
    AppContext,
    KeyRef,
    Who,
    acting_options,
    employee_key,
    example,
    founder_key,
    founder_key_option,
    identity_options,
    json_option,
    pass_app,
    passphrase_options,
)
from custody_cli.documents import confirm, read_manifest_file, yes_option
from custody_cli.helptext import SummaryGroup

MAX_PSBT_BYTES = PSBT_MAX
STDIO = "-"


def read_psbt_file(path: Path) -> bytes:
    """A PSBT from a file, or from standard input for ``-``: binary (BIP-174) or base64.

    A file is refused from its size before it is read (a device such as /dev/zero at once);
    standard input is read up to the limit."""
    name = "standard input" if str(path) == STDIO else str(path)
    try:
        if str(path) == STDIO:
            data = sys.stdin.buffer.read(MAX_PSBT_BYTES + 1)
        else:
            data = read_limited(path, MAX_PSBT_BYTES, "PSBT file")
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None
    if len(data) > MAX_PSBT_BYTES:
        raise InputError(f"{name} is larger than {MAX_PSBT_BYTES} bytes: not a PSBT of ours")
    if data.startswith(b"psbt\xff"):
        return data
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except ValueError:
        raise InputError(f"{name} is neither a binary nor a base64 PSBT") from None


def write_psbt_file(path: Path, p: psbt_lib.Psbt, as_base64: bool = False) -> str:
    """Write ``p``: to standard output for ``-`` (base64, one line), else to the file, binary
    (BIP-174) when its name ends in ``.psbt`` unless ``as_base64``, base64 otherwise.
    Returns where it went, for messages."""
    if str(path) == STDIO:
        sys.stdout.write(p.to_base64() + "\n")
        sys.stdout.flush()
        return "standard output"
    binary = path.suffix.lower() == ".psbt" and not as_base64
    data = p.serialize() if binary else (p.to_base64() + "\n").encode("ascii")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return str(path)


def base64_option(f: Any) -> Any:
    return click.option(
        "--base64",
        "as_base64",
        is_flag=True,
        help="Write a .psbt file as base64 text instead of binary (BIP-174). Standard output is always base64.",
    )(f)


def chain_backend(app: AppContext) -> Any:
    return backend_for(app.settings, load_policy(app.db).network.name)


def _show(data: dict[str, Any], as_json: bool, title: str | None = None) -> None:
    if as_json:
        output.emit_json(data)
        return
    output.key_values(
        title or f"Withdrawal #{data['id']}",
        [
            ("status", data["status"]),
            ("account", data["account"]),
            ("requester", data["requester"]),
            ("destination", data["destination"]),
            ("amount", f"{data['amount']} BTC ({data['amount_sat']} sat)"),
            ("fee", f"{data['fee_sat']} sat at {data['fee_rate']} sat/vB"),
            (
                "change",
                f"{data['change_sat']} sat"
                + (f" at 1/{data['change_index']}" if data["change_index"] is not None else ""),
            ),
            ("inputs", ", ".join(i["outpoint"] for i in data["inputs"])),
            ("approvals", ", ".join(data["approvals"]["valid"]) or "none"),
            ("txid", data["txid"] or data["unsigned_txid"] + " (unsigned)"),
            ("confirmations", data["confirmations"]),
            ("reason", data["reason"]),
        ],
    )


def request_row(
    app: AppContext,
    call: Callable[..., dict[str, Any]],
    *args: Any,
    who: Who,
    as_json: bool,
    title: Callable[[dict[str, Any]], str] | None = None,
    actor: str = "actor",
    **options: Any,
) -> None:
    """A command that requests a withdrawal row (a withdrawal, a batch, a bump, a cancel, a
    child, a consolidation, a sweep): the employee's key opened, the library's ``call`` with the
    store, the settings, the chain, ``args``, the employee (as ``actor``), the key, the limits and
    ``options``; the row it made shown."""
    employee, key_file, passphrase_file = who
    key = employee_key(key_file, passphrase_file)
    data = call(
        app.db,
        app.settings,
        chain_backend(app),
        *args,
        **{actor: employee},
        key=key,
        limits=wd_limits.limits_from_settings(app.settings),
        **options,
    )
    _show(data, as_json, title=title(data) if title else None)


@click.group(cls=SummaryGroup)
def withdraw() -> None:
    """The withdrawal queue: request, approve (two employees), export, import, finalize, broadcast."""


@withdraw.command("request")
@click.option("--account", required=True, help="The customer account paying.")
@click.option("--to", "destination", required=True, help="Destination address (of the policy's network).")
@click.option("--amount", required=True, help="Amount in BTC, exactly (at most 8 decimals).")
@click.option("--fee-rate", help="Fee rate in sat/vB (default CUSTODY_FEE_RATE or 2).")
@acting_options
@example("custody withdraw request --account alice --to bcrt1q... --amount 0.015 --as carol --key carol.key")
def withdraw_request(
    app: AppContext, account: str, destination: str, amount: str, fee_rate: str | None, who: Who, as_json: bool
) -> None:
    """Request a withdrawal: coins selected, change to a fresh verified address, inputs reserved."""
    request_row(
        app,
        wd.request_withdrawal,
        who=who,
        as_json=as_json,
        actor="requester",
        account=account,
        destination=destination,
        amount=amount,
        fee_rate=fee_rate,
    )


@withdraw.command("approve")
@click.argument("withdrawal_id", type=int)
@click.option("--expect-digest", metavar="DIGEST", help="Approve only if the statement digest is this one.")
@yes_option
@identity_options
@json_option
@pass_app
@example("custody withdraw approve 1 --as alice --key alice.key")
def withdraw_approve(
    app: AppContext,
    withdrawal_id: int,
    expect_digest: str | None,
    yes: bool,
    employee: str,
    key_file: KeyRef,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Review, then sign the exact transaction of a withdrawal (two distinct employees, never the
    requester). Shows every destination and amount, the change, the fee and the statement digest
    first, and asks on a terminal; --yes or --expect-digest DIGEST for scripts."""
    shown = wd.show_withdrawal(app.db, withdrawal_id)
    digest = shown.get("statement_digest") or ""
    if expect_digest is None:
        if not as_json:
            render_review(shown)
        confirm(f"Approve withdrawal #{withdrawal_id} (digest {short(digest)}) as {employee}?", yes)
    key = employee_key(key_file, passphrase_file)
    data = wd.approve(
        app.db, withdrawal_id, employee, key, settings=app.settings, expect_digest=expect_digest or digest
    )
    _show(data, as_json)


def short(digest: str) -> str:
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


def render_review(w: dict[str, Any]) -> None:
    """What an approver checks, on stdout: every output, the change, the fee, the digest."""
    output.key_values(
        f"Withdrawal #{w['id']} ({w['withdrawal_kind']})",
        [
            ("account", w["account"]),
            ("requester", w["requester"]),
            ("fee", f"{w['fee_sat']} sat ({w['fee_rate']} sat/vB)"),
            ("approvals so far", ", ".join(w["approvals"]["valid"]) or "none"),
            ("statement digest", short(w.get("statement_digest") or "")),
        ],
    )
    output.table(
        "Outputs",
        ["#", "address", "amount (sat)", ""],
        [
            (o["n"], o["address"], o["amount_sat"], "change (ours, verified)" if o["change"] else "")
            for o in w["outputs"]
        ],
    )


@withdraw.command("export")
@click.argument("withdrawal_id", type=int)
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@base64_option
@pass_app
@example("custody withdraw export 1 w1.psbt")
def withdraw_export(app: AppContext, withdrawal_id: int, file: Path, as_base64: bool) -> None:
    """Write the PSBT with the approval bundle for the offline signers: binary (BIP-174) to a
    .psbt file, base64 to any other name or to standard output (FILE `-`)."""
    where = write_psbt_file(file, wd_psbt.export_psbt(app.db, withdrawal_id), as_base64)
    output.success(f"withdrawal #{withdrawal_id} written to {where}")


@withdraw.command("import")
@click.argument("withdrawal_id", type=int)
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@json_option
@pass_app
@example("custody withdraw import 1 w1-signed-by-a.psbt")
def withdraw_import(app: AppContext, withdrawal_id: int, file: Path, as_json: bool) -> None:
    """Merge a signed PSBT's signatures (PSBTs signed separately combine; inputs another signer
    finalized give up theirs). FILE: binary or base64, `-` for standard input."""
    data = wd_psbt.import_psbt(app.db, withdrawal_id, read_psbt_file(file))
    if as_json:
        output.emit_json(data)
        return
    output.success(
        f"withdrawal #{withdrawal_id}: signed by {', '.join(data['founders_signed']) or 'no founder yet'}"
        f" ({data['status']})"
    )


@withdraw.command("finalize")
@click.argument("withdrawal_id", type=int)
@json_option
@pass_app
@example("custody withdraw finalize 1")
def withdraw_finalize(app: AppContext, withdrawal_id: int, as_json: bool) -> None:
    """Build the final transaction from the founders' signatures."""
    _show(wd_psbt.finalize(app.db, withdrawal_id), as_json)


@withdraw.command("broadcast")
@click.argument("withdrawal_id", type=int)
@json_option
@pass_app
@example("custody withdraw broadcast 1")
def withdraw_broadcast(app: AppContext, withdrawal_id: int, as_json: bool) -> None:
    """Test-accept the final transaction on the node, then broadcast it (idempotent).

    A refusal exits 8 naming its class (missing-inputs, mempool-conflict, ...) and is
    recorded in the audit log; nothing else changes: the withdrawal stays signed, its inputs
    reserved and its hold in place (custody sync settles or refunds it on the chain's proof).
    """
    _show(wd_broadcast.broadcast(app.db, chain_backend(app), withdrawal_id, settings=app.settings), as_json)


@withdraw.command("cancel")
@click.argument("withdrawal_id", type=int)
@click.option("--reason", required=True, help="Why the withdrawal is cancelled.")
@click.option(
    "--fee-rate", help="An approved or signed withdrawal's cancel: its fee rate in sat/vB (default CUSTODY_FEE_RATE)."
)
@acting_options
@example("custody withdraw cancel 1 --reason 'customer asked' --as alice --key alice.key")
def withdraw_cancel(
    app: AppContext, withdrawal_id: int, reason: str, fee_rate: str | None, who: Who, as_json: bool
) -> None:
    """Cancel a withdrawal. Still awaiting approvals: failed at once, its inputs and hold
    released. Approved (founders could still sign it offline) or carrying founders' signatures
    (signed, broadcast, or refused by the node): a self-transfer of its inputs back to a fresh
    change address is requested, to approve, sign and broadcast like a withdrawal; the hold is
    released only once that cancel confirms CUSTODY_REFUND_CONFIRMATIONS deep (custody sync), and
    if the original confirms first, nothing is refunded.
    """
    request_row(
        app,
        replace.cancel,
        withdrawal_id,
        who=who,
        as_json=as_json,
        reason=reason,
        fee_rate=fee_rate,
    )


@withdraw.command("bump")
@click.argument("withdrawal_id", type=int)
@click.option("--fee-rate", required=True, help="The replacement's fee rate in sat/vB.")
@acting_options
@example("custody withdraw bump 1 --fee-rate 20 --as carol --key carol.key")
def withdraw_bump(app: AppContext, withdrawal_id: int, fee_rate: str, who: Who, as_json: bool) -> None:
    """Request a fee bump (RBF) of a signed withdrawal: the same destinations and amounts, the
    extra fee taken from change. It gets an id of its own to approve (the rulebook's bump rule),
    export, sign, import, finalize and broadcast; custody sync follows whichever version confirms.
    """
    request_row(app, replace.bump, withdrawal_id, who=who, as_json=as_json, fee_rate=fee_rate)


@withdraw.command("cpfp")
@click.argument("withdrawal_id", type=int)
@click.option("--fee-rate", required=True, help="The fee rate in sat/vB the transaction and its child pay together.")
@acting_options
@example("custody withdraw cpfp 1 --fee-rate 20 --as carol --key carol.key")
def withdraw_cpfp(app: AppContext, withdrawal_id: int, fee_rate: str, who: Who, as_json: bool) -> None:
    """Request a child paying for a broadcast withdrawal (CPFP), when a bump is not possible:
    a self-transfer of its change to a fresh change address, approved and signed like a
    withdrawal, whose fee lifts both to --fee-rate."""
    request_row(app, replace.cpfp, withdrawal_id, who=who, as_json=as_json, fee_rate=fee_rate)


@withdraw.command("batch")
@click.option("--fee-rate", help="Fee rate in sat/vB for the batch (default CUSTODY_FEE_RATE or 2).")
@acting_options
@example("custody withdraw batch --as alice --key alice.key")
def withdraw_batch(app: AppContext, fee_rate: str | None, who: Who, as_json: bool) -> None:
    """Put every approved, unsigned withdrawal into one transaction (the daily batch).

    Its approvals are the union of its members'; sign, import, finalize and broadcast
    it by the batch's id.
    """
    request_row(
        app,
        wd_batch.create_batch,
        who=who,
        as_json=as_json,
        title=lambda d: f"Batch #{d['id']} of withdrawals {', '.join(map(str, d['members']))}",
        fee_rate=fee_rate,
    )


@withdraw.command("list")
@click.option(
    "--status",
    type=click.Choice(
        [
            wd_states.REQUESTED,
            wd_states.APPROVED,
            wd_states.SIGNED,
            wd_states.BROADCAST,
            wd_states.CONFIRMED,
            wd_states.FAILED,
        ]
    ),
)
@listing.limit_option("withdrawals")
@json_option
@pass_app
@example("custody withdraw list --status approved --limit 20")
def withdraw_list(app: AppContext, status: str | None, limit: int | None, as_json: bool) -> None:
    """List withdrawals and where each stands."""
    rows = wd.list_withdrawals(app.db, status)
    if as_json:
        output.emit_json(listing.limited(rows, limit))
        return
    listing.table(
        "Withdrawals",
        ["id", "status", "account", "amount", "destination", "approvals", "txid"],
        [
            (
                r["id"],
                r["status"],
                r["account"],
                r["amount"],
                r["destination"],
                ", ".join(r["approvals"]["valid"]),
                r["txid"] or "",
            )
            for r in rows
        ],
        limit=limit,
    )


@withdraw.command("show")
@click.argument("withdrawal_id", type=int)
@click.option("--raw", is_flag=True, help="Print only the final transaction, in hex (once finalized).")
@json_option
@pass_app
@example("custody withdraw show 1")
def withdraw_show(app: AppContext, withdrawal_id: int, raw: bool, as_json: bool) -> None:
    """Show one withdrawal: inputs, outputs, approvals, signatures, confirmations.
    --raw: the final transaction's hex, for `sendrawtransaction` or any block explorer."""
    if raw:
        sys.stdout.write(wd.final_transaction(app.db, withdrawal_id) + "\n")
        return
    _show(wd.show_withdrawal(app.db, withdrawal_id), as_json)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@founder_key_option
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Where to write the signed PSBT (default: FILE with -signed-NAME before .psbt; "
    "standard output when FILE is `-`). `-`: standard output, base64.",
)
@base64_option
@passphrase_options
@json_option
@pass_app
@click.option("--expect-digest", metavar="DIGEST", help="Sign only if the statement digest is this one.")
@yes_option
@example("custody sign w1.psbt --key founder-a.key --out w1-a.psbt")
def sign(
    app: AppContext,
    file: Path,
    key_file: Path,
    out_file: Path | None,
    as_base64: bool,
    passphrase_file: Path | None,
    as_json: bool,
    expect_digest: str | None,
    yes: bool,
) -> None:
    """Review and sign a withdrawal PSBT offline with a founder key (no store, no node needed).

    Believes only what is pinned on this machine: the founders-signed manifest (--manifest /
    CUSTODY_MANIFEST) and, beside it, the newest employee roster and rulebook seen and the journal
    of what it signed. Refuses unless the PSBT's roster and rulebooks are signed by m founders and
    not older, the requester signed the exact transaction, as many distinct approvers of the roster
    as the rulebook's tier needs (never the requester) did too, every input is one of the policy's
    scripts, the change re-derives, and the rulebook in force at the transaction's locktime allows
    it (velocity counted from the journal). Shows what is signed and asks on a terminal.
    """
    if out_file is None and str(file) == STDIO:
        out_file = Path(STDIO)
    to_stdout = str(out_file) == STDIO
    if to_stdout and as_json:
        raise InputError("--json and --out - would both write to standard output: choose one")
    consulted = halt_lib.check_before_signing(app.db, app.settings)
    try:
        pinned = read_manifest_file(app.settings.manifest).check()
    except InputError as exc:
        raise InputError(f"the pinned founders' manifest {app.settings.manifest}: {exc} (pass --manifest)") from None
    p = psbt_lib.Psbt.parse(read_psbt_file(file))
    key = founder_key(key_file, passphrase_file)
    state = SignerState.load(state_path(app.settings.manifest), pinned)
    rotations = epochs.read_rotations(epochs.rotations_path(app.settings))  # re-checked by the signer
    r = review(p, key, pinned, state, rotations)
    if expect_digest is not None:
        if not r.digest.startswith(expect_digest.strip().lower().replace("-", "")):
            raise ApprovalError(f"the statement digest is {r.short_digest}, not {expect_digest}: do not sign")
    else:
        if not as_json:
            # standard output carries only the PSBT with --out -: the review goes to stderr
            with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
                render_signer_review(r)
        confirm(f"Sign withdrawal #{r.withdrawal_id} (digest {r.short_digest}) as {r.founder}?", yes)
    result = sign_reviewed(p, r, state)
    out = out_file or file.with_name(f"{file.stem}-signed-{result.founder}{file.suffix or '.psbt'}")
    written = write_psbt_file(out, p, as_base64)
    if as_json:
        output.emit_json(
            r.to_dict()
            | {
                "signatures_added": result.signatures_added,
                "out": str(out),
                "halt_checked": consulted,
            }
        )
        return
    output.success(
        f"{result.founder} signed {output.plural(result.signatures_added, 'input')} of withdrawal "
        f"#{result.withdrawal_id} (approved by {', '.join(result.approvals)}); written to {written}"
    )


def render_signer_review(r: Review) -> None:
    output.key_values(
        f"Withdrawal #{r.withdrawal_id} ({r.withdrawal_kind}), to sign as {r.founder}",
        [
            ("network", r.network),
            ("account", r.account),
            ("requester", f"{r.requester} (signature checked)"),
            ("approved by", ", ".join(r.approvals)),
            ("inputs", f"{r.inputs} of our policy, {r.input_total} sat"),
            ("fee", f"{r.fee} sat ({r.fee_rate:.2f} sat/vB)"),
            ("roster", f"#{r.roster_serial}, signed by the founders of manifest {r.manifest}"),
            ("rulebook", f"#{r.rulebook_serial}" if r.rulebook_serial else "NONE SIGNED YET: the built-in rules apply"),
            ("height", f"{r.height} (the transaction's locktime; this signer last signed at {r.journal_height})"),
            (
                "tier",
                ", ".join(f"#{wid}: {n.tier}, {n.approvals} approvals ({n.why})" for wid, n in sorted(r.needs.items())),
            ),
            ("statement digest", r.short_digest),
        ],
    )
    output.table(
        "Outputs",
        ["#", "address", "amount (sat)", ""],
        [(o["n"], o["address"], o["amount_sat"], "change (verified)" if o["change"] else "") for o in r.outputs],
    )


@click.command()
@json_option
@pass_app
@example("custody sync")
def sync(app: AppContext, as_json: bool) -> None:
    """Follow withdrawals to confirmation and credit deposits from the chain.

    A signed withdrawal is settled once the chain shows its transaction (wherever it was
    broadcast), and failed and refunded only when another transaction spends one of its
    inputs CUSTODY_REFUND_CONFIRMATIONS (default 6) blocks deep. Deposits to issued
    addresses are credited to their account at CUSTODY_DEPOSIT_CONFIRMATIONS confirmations
    (default 1); a credited deposit a chain
    reorganisation removed is reversed. A consolidation or a sweep is followed the same way
    (its network fee booked when it confirms, reversed when a reorganisation takes it out;
    failed, nothing posted, when another transaction spends one of its coins that deep).
    --json: a list of what changed, each item with its "record" ("withdrawal", with its
    "withdrawal_kind": single, batch, consol, sweep, ...; or "deposit").
    Reading new blocks shows a progress bar on a terminal (stderr; never with --json).
    """
    backend = chain_backend(app)
    confirmations = deposits.deposit_confirmations(app.settings)
    limits = wd_limits.limits_from_settings(app.settings)
    changed = wd_broadcast.sync(app.db, backend, limits, settings=app.settings)
    changed += replace_sync.sync_replacements(app.db, backend, limits, settings=app.settings)
    with output.Progress("reading blocks", None, shown=not as_json) as bar:  # a terminal's only
        credited = deposits.sync_deposits(app.db, app.settings, backend, confirmations, progress=bar.update)
    halts = [d for d in credited if d.get("halt_id")]
    if as_json:
        output.emit_json([*changed, *credited])
    else:
        for r in changed:
            output.line(f"withdrawal #{r['id']}: {r['status']} ({output.plural(r['confirmations'], 'confirmation')})")
        for d in credited:
            output.line(
                f"deposit {d['outpoint']} to {d['account']}: {d['amount_sat']} sat ({d['amount']} BTC) {d['change']} "
                f"({output.plural(d['confirmations'], 'confirmation')})"
            )
        if not changed and not credited:
            output.info(_nothing_changed(app))
    if halts:  # recorded, and trading halted: say so with exit code 3
        raise HaltedError(
            "; ".join(f"account {d['account']!r} went negative (halt #{d['halt_id']})" for d in halts)
            + ": a reversed deposit left it owing; trading is halted"
        )


def _nothing_changed(app: AppContext) -> str:
    """What sync says when the chain changed nothing: and what still waits on it."""
    waiting = wd.list_withdrawals(app.db, wd_states.BROADCAST)
    if not waiting:
        return "nothing changed"
    ids = ", ".join(f"#{w['id']}" for w in waiting[:5]) + (" ..." if len(waiting) > 5 else "")
    return f"nothing changed; {output.plural(len(waiting), 'withdrawal')} broadcast, waiting for a block: {ids}"


COMMANDS = [withdraw, sign, sync]
