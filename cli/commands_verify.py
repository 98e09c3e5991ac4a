"""``custody verify addresses``: the auditors' independent check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import click
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, pass_app

from custody import halt as halt_lib
from custody import verify
from custody.errors import InputError, VerificationFailed
from custody.issuance import count_addresses, iter_addresses


@click.group("verify")
def verify_group() -> None:
    """Independent verification (auditors)."""


def _store_records(app: AppContext) -> tuple[int, Iterator[verify.AddressRecord]]:
    app.db.check_schema()

    def records() -> Iterator[verify.AddressRecord]:
        with app.db.transaction() as s:
            for row in iter_addresses(s):
                yield verify.AddressRecord(
                    chain=row.chain,
                    index=row.idx,
                    address=row.address,
                    script=bytes.fromhex(row.script),
                    script_pubkey=bytes.fromhex(row.script_pubkey),
                    account=row.account,
                )

    with app.db.transaction() as s:
        total = count_addresses(s)
    return total, records()


@verify_group.command("addresses")
@click.option(
    "--manifest",
    "manifest_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The founders' key manifest the auditors hold.",
)
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
    app: AppContext, manifest_file: Path, export_file: Path | None, workers: int | None, no_halt: bool, as_json: bool
) -> None:
    """Re-derive every issued address from the founders' manifest alone.

    Exit 0 when all pass; on any mismatch the trading halt is raised and the exit code is 3.
    """
    try:
        manifest = verify.load_manifest(manifest_file)
    except FileNotFoundError:
        raise InputError(f"manifest {manifest_file} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"manifest {manifest_file}: {exc}") from None
    workers = workers or os.cpu_count() or 1
    if export_file is not None and not export_file.exists():
        raise InputError(f"export {export_file} does not exist")
    total, records = (None, None) if export_file is not None else _store_records(app)
    with output.Progress("verifying", total) as bar:
        try:
            if export_file is not None:
                report = verify.verify_export(manifest, export_file, workers=workers, progress=bar.update)
            else:
                assert records is not None
                report = verify.verify_records(manifest, records, workers=workers, progress=bar.update)
        except verify.ExportError as exc:  # a malformed or truncated export fails verification too
            report = verify.Report(checked=0, failures=[verify.Failure("(export file)", -1, -1, str(exc))])
    data = report.to_dict()
    if not report.ok and not no_halt:
        first = report.failures[0]
        reason = (
            f"address verification failed: {len(report.failures)} problem(s); first: "
            f"{first.address} at {first.chain}/{first.index}: {first.reason}"
        )
        raised = halt_lib.raise_halt(app.db, app.settings, reason=reason, source="verification", actor="verifier")
        data["halt_id"] = raised.id
    if as_json:
        output.emit_json(data)
    else:
        for f in report.failures:
            output.line(f"FAIL {f.address} ({f.chain}/{f.index}): {f.reason}", style="red")
        if report.ok:
            output.success(f"all {report.checked} address(es) verified against the founders' manifest")
    if not report.ok:
        raise VerificationFailed(
            f"{len(report.failures)} verification failure(s) in {report.checked} address(es)"
            + ("" if no_halt else "; trading is halted")
        )


COMMANDS = [verify_group]
