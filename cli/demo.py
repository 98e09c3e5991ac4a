"""``custody demo``: the main job end to end on the embedded default (SQLite, no server).

It plays every role in one process, with demo passphrases, in a fresh directory: the
founders' key ceremony, employee identities, the 2-of-3 policy, deposit addresses for a
few accounts, the auditors' independent verification, a tampered export caught and
trading halted, and the halt lifted by two employees.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click
from custody_cli import output
from custody_cli.commands_policy import write_manifest
from custody_cli.context import example

from custody import halt as halt_lib
from custody import verify
from custody.config import Settings
from custody.db import Database
from custody.employees import add_employee
from custody.errors import CustodyError
from custody.issuance import export_addresses, issue_addresses
from custody.keyfile import create_employee_key, create_founder_key, open_employee_key
from custody.network import get_network
from custody.policy import make_policy, parse_script_type
from custody.wallet import init_store

DEMO_PASSPHRASE = "demo passphrase, never for real keys"


def _step(n: int, text: str) -> None:
    output.line("")
    output.line(f"[{n}] {text}", style="bold cyan")


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
    type=click.Choice(["p2wsh", "p2sh-p2wsh", "p2sh"]),
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
    if directory is None:
        directory = Path("custody-demo") / datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")
    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} is not empty; give a new --dir (each demo starts fresh)")
    directory.mkdir(parents=True, exist_ok=True)
    keys = directory / "keys"
    settings = Settings.load(home=str(directory / "store"), env={})
    db = Database(settings.db_url)
    network = get_network("regtest")
    stype = parse_script_type(script_type)

    output.line("custody demo: the founders' cold storage, end to end on regtest", style="bold")
    output.info(f"demo passphrase for every key file: {DEMO_PASSPHRASE!r} (demo only)")

    _step(1, "Founders' key ceremony: three founders create keys offline and publish xpubs")
    founders = []
    for name in ("founder-a", "founder-b", "founder-c"):
        key = create_founder_key(keys / f"{name}.key", name, network, DEMO_PASSPHRASE, stype.bip48_script_index or 2)
        founders.append((name, str(key.account)))
        output.line(f"  {name}: {key.account}")

    _step(2, "The 2-of-3 policy: store created, descriptors, founders' manifest pinned")
    policy = make_policy(network, 2, stype, founders)
    init_store(db, policy)
    write_manifest(settings.manifest, policy.to_manifest(), overwrite=True)
    auditor_manifest = directory / "auditors" / "founders-manifest.json"
    write_manifest(auditor_manifest, policy.to_manifest())
    halt_lib.publish(db, settings)
    for label, desc in policy.descriptors().items():
        output.line(f"  {label}: {desc}")

    _step(3, "Employees: three identities with registered signing keys")
    for name in ("alice", "bob", "carol"):
        ekey = create_employee_key(keys / f"{name}.key", name, DEMO_PASSPHRASE)
        add_employee(db, name, ekey.public_key.hex())
        output.line(f"  {name}: {ekey.public_key.hex()}")

    _step(4, "Deposit addresses, each verified independently before it is shown")
    for account in ("acct-1001", "acct-1002", "acct-1003"):
        for a in issue_addresses(db, settings, account, per_account):
            output.line(f"  {account}  {a.chain}/{a.index}  {a.address}")

    _step(5, "Auditors re-derive every address from their own copy of the founders' manifest")
    export = directory / "auditors" / "addresses.jsonl"
    count = export_addresses(db, export)
    manifest = verify.load_manifest(auditor_manifest)
    report = verify.verify_export(manifest, export)
    output.line(
        f"  {report.checked} of {count} addresses verified: {'PASS' if report.ok else 'FAIL'}",
        style="green" if report.ok else "red",
    )
    if not report.ok:
        raise CustodyError("the clean store failed verification; see the report")

    _step(6, "Someone swaps an address in the export: the verifier catches it and trading halts")
    tampered = directory / "auditors" / "addresses-tampered.jsonl"
    lines = export.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[2])
    record["address"] = json.loads(lines[3])["address"]  # another issued address in its place
    lines[2] = json.dumps(record)
    tampered.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = verify.verify_export(manifest, tampered)
    for f in report.failures:
        output.line(f"  FAIL {f.address} at {f.chain}/{f.index}: {f.reason}", style="red")
    raised = halt_lib.raise_halt(
        db,
        settings,
        reason=f"address verification failed: {report.failures[0].reason}",
        source="verification",
        actor="verifier",
    )
    output.line(
        f"  halt #{raised.id} raised; halt file {settings.halt_file} says halted="
        f"{json.loads(settings.halt_file.read_text())['halted']}",
        style="bold red",
    )
    try:
        issue_addresses(db, settings, "acct-1001", 1)
    except CustodyError as exc:
        output.line(f"  issuance refused (exit {exc.exit_code}): {exc}")
    view = halt_lib.status_view(db)
    output.table("Status", ["component", "status"], list(view["components"].items()))

    _step(7, "Two employees sign the lift of that exact halt")
    for name in ("alice", "bob"):
        ekey = open_employee_key(keys / f"{name}.key", DEMO_PASSPHRASE)
        result = halt_lib.lift(db, settings, raised.id or 0, name, ekey)
        output.line(
            f"  {name} signed: {len(result.signers)} of {result.needed}" + (" -> lifted" if result.lifted else "")
        )
    view = halt_lib.status_view(db)
    output.table("Status", ["component", "status"], list(view["components"].items()))

    output.line("")
    output.line("Done. Where the data lives:", style="bold")
    output.line(f"  store (SQLite):        {settings.db_url}")
    output.line(f"  pinned manifest:       {settings.manifest}")
    output.line(f"  halt file (engine):    {settings.halt_file}")
    output.line(f"  key files:             {keys}")
    output.line(f"  auditors' files:       {directory / 'auditors'}")
    output.line("Try next:", style="bold")
    home = directory / "store"
    output.line(f"  export CUSTODY_HOME={home} CUSTODY_PASSPHRASE='{DEMO_PASSPHRASE}'")
    output.line("  custody status; custody policy show; custody address list")
    output.line(f"  custody verify addresses --manifest {auditor_manifest}")
    output.line(f"  custody halt raise --reason test --as alice --key {keys / 'alice.key'}")
    output.line("Each run uses a fresh directory; delete ./custody-demo to reset.")


COMMANDS = [demo]
