"""``custody verify addresses``: the auditors' independent check."""

from __future__ import annotations

import os
from pathlib import Path

import click

from custody.books import reserves_proof
from custody.errors import VerificationFailed
from custody.issuance import verification
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, pass_app
from custody_cli.helptext import SummaryGroup

manifests_option = click.option(
    "--manifest",
    "manifest_files",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The founders' key manifest the auditors hold; after a key rotation, repeat it: the first "
    "manifest, then each rotation manifest, in order.",
)


@click.group("verify", cls=SummaryGroup)
def verify_group() -> None:
    """Independent verification (auditors)."""


@verify_group.command("addresses")
@manifests_option
@click.option(
    "--export",
    "export_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Verify this export file instead of the store.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Processes to use (default: all cores).")
@click.option("--no-halt", is_flag=True, help="Report only; do not raise the trading halt on a mismatch.")
@json_option
@pass_app
@example("custody verify addresses --manifest founders.json --export addresses.jsonl")
def verify_addresses(
    app: AppContext,
    manifest_files: tuple[Path, ...],
    export_file: Path | None,
    workers: int | None,
    no_halt: bool,
    as_json: bool,
) -> None:
    """Re-derive every issued address from the founders' manifest alone (each from the policy
    of its epoch, after a key rotation).

    Exit 0 when all pass; on any mismatch the trading halt is raised and the exit code is 3.
    """
    chain = verification.load_auditor_chain(manifest_files)
    total = verification.count_store(app.db) if export_file is None else None
    with output.Progress("verifying", total, shown=not as_json) as bar:
        outcome = verification.run(
            app.db,
            app.settings,
            chain,
            export_file,
            workers=workers or os.cpu_count() or 1,
            progress=bar.update,
            raise_halt=not no_halt,
        )
    report = outcome.report
    data = report.to_dict()
    if outcome.halt:
        data["halt_id"] = outcome.halt_id
        data["halt"] = {
            "stored": outcome.halt.stored,
            "engine_halted": outcome.halt.engine_halted,
            "problems": list(outcome.halt.problems),
        }
    if as_json:
        output.emit_json(data)
    else:
        for f in report.failures:
            output.line(f"FAIL {f.address} ({f.chain}/{f.index}): {f.reason}", style="red")
        if report.omitted:
            output.line(f"... and {output.plural(report.omitted, 'more failure')} not listed", style="red")
        if report.ok:
            output.success(
                f"all {output.plural(report.checked, 'address', 'addresses')} verified against the founders' manifest"
            )
    for w in [*outcome.warnings, *(outcome.halt.state.warnings if outcome.halt else [])]:
        output.warning(w)
    if not report.ok:
        suffix = (
            ""
            if no_halt
            else f"; {outcome.halt.describe()}"
            if outcome.halt
            else "; no custody store here: raise the halt on it"
        )
        raise VerificationFailed(
            f"{output.plural(report.failure_count, 'verification failure')} in "
            f"{output.plural(report.failed_records, 'address', 'addresses')} of "
            f"{output.plural(report.checked, 'address', 'addresses')} checked{suffix}"
        )


COMMANDS = [verify_group]


@verify_group.command("reserves")
@click.argument("proof", type=click.Path(dir_okay=False, path_type=Path))
@manifests_option
@json_option
@example("custody verify reserves reserves.yaml --manifest founders.json")
def verify_reserves(proof: Path, manifest_files: tuple[Path, ...], as_json: bool) -> None:
    """Check that a proof of reserves lists only the founders' multisig addresses (no store needed).

    Its chain, claim and xpubs must be the manifest's, and every descriptor sortedmulti of
    all the founders' keys at one position, whose address re-derives from the manifest.
    BitMEX's validate_reserves.py then proves the amounts on a node. Exit 3 when not.
    """
    data = reserves_proof.verify_file(manifest_files, proof)
    if as_json:
        output.emit_json(data)
        return
    output.success(
        f"{output.plural(data['addresses'], 'address', 'addresses')}, {data['total_sat']} sat at height "
        f"{data['height']}: the founders' multisig"
    )
