"""``custody demo``: the main job end to end on the embedded default (SQLite, no server).

It plays every role in one process, with demo passphrases, in a fresh directory: the
founders' key ceremony, employee identities, the 2-of-3 policy, deposit addresses for a
few accounts, the auditors' independent verification, a tampered export caught and
trading halted, and the halt lifted by two employees.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import click
import coincurve

from custody import verify
from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.bech32 import encode_segwit
from custody.bitcoin.destinations import parse_destination
from custody.bitcoin.encoding import hash160
from custody.bitcoin.network import REGTEST, get_network
from custody.bitcoin.script import ScriptType, parse_script_type
from custody.books import audit, deposits, ledger
from custody.chain.backend import backend_for
from custody.config import Settings
from custody.control import halt as halt_lib
from custody.control import roster as roster_lib
from custody.control.wallet import init_store
from custody.errors import CustodyError
from custody.identity.employee_keys import FileSigner
from custody.identity.keyfile import create_employee_key, create_founder_key, open_employee_key, open_founder_key
from custody.identity.roster import sign_roster
from custody.issuance.issuer import export_addresses, issue_addresses, list_addresses
from custody.policy.manifest import load_signed_manifest, sign_manifest, unsigned
from custody.policy.model import make_policy
from custody.store.db import Database
from custody.withdraw import queue as wd
from custody.withdraw.signer import SignerState, review, sign_reviewed
from custody_cli import output
from custody_cli.commands_policy import write_manifest
from custody_cli.context import example

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
    if directory is None:
        directory = Path("custody-demo") / datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")
    if directory.exists() and any(directory.iterdir()):
        raise click.UsageError(f"{directory} is not empty; give a new --dir (each demo starts fresh)")
    directory.mkdir(parents=True, exist_ok=True)
    directory = directory.resolve()  # the paths printed at the end work from anywhere
    keys = directory / "keys"
    settings = Settings.load(home=str(directory / "store"), env={"CUSTODY_CHAIN": "embedded"})
    db = Database(settings.db_url)
    network = get_network("regtest")
    stype = parse_script_type(script_type)

    output.line("custody demo: the founders' cold storage, end to end on regtest", style="bold")
    output.info(f"demo passphrase for every key file: {DEMO_PASSPHRASE!r} (demo only)")

    _step(1, "Founders' key ceremony: three founders create keys offline and publish xpubs")
    founders = []
    founder_keys = {}
    for name in ("founder-a", "founder-b", "founder-c"):
        key = create_founder_key(keys / f"{name}.key", name, network, DEMO_PASSPHRASE, stype.bip48_script_index or 2)
        founders.append((name, str(key.account)))
        founder_keys[name] = key.master.derive(key.account_path).private_key()
        output.line(f"  {name}: {key.account}")

    _step(2, "Every founder signs the 2-of-3 manifest; the store is created from it and it is pinned")
    signed = unsigned(make_policy(network, 2, stype, founders))
    for name, account_key in founder_keys.items():
        signed = sign_manifest(signed, name, account_key)
        output.line(f"  {name} signed manifest {signed.fingerprint}")
    init_store(db, signed)
    roster_lib.pin_manifest(settings.manifest, signed)
    auditor_manifest = directory / "auditors" / "founders-manifest.json"
    write_manifest(auditor_manifest, signed.to_document())
    halt_lib.publish(db, settings)
    output.line(f"  fingerprint to read aloud on every machine that pins it: {signed.fingerprint}")

    _step(3, "Employees: keys made, proposed as roster #1, which two founders sign offline; only then enrolled")
    for name in ("alice", "bob", "carol"):
        ekey = create_employee_key(keys / f"{name}.key", name, DEMO_PASSPHRASE)
        roster_lib.propose(db, settings, [roster_lib.Change("add", name, ekey.public_key.hex())])
        output.line(f"  {name}: {ekey.public_key.hex()} (roles: request, approve, lift)")
    proposal = roster_lib.proposal(db)
    founders_view = roster_lib.load_trust(settings).founders
    for name in ("founder-a", "founder-b"):
        proposal = sign_roster(proposal, name, founder_keys[name], founders_view)
    applied = roster_lib.apply_roster(db, settings, json.dumps(proposal.to_document()).encode())
    output.line(f"  roster #{applied.serial} applied, signed by {', '.join(sorted(applied.signatures))}")
    mallory = create_employee_key(keys / "mallory.key", "mallory", DEMO_PASSPHRASE)
    roster_lib.propose(db, settings, [roster_lib.Change("add", "mallory", mallory.public_key.hex())])
    try:
        halt_lib.raise_by_employee(db, settings, "mallory", FileSigner(mallory), "only proposed")
    except CustodyError as exc:
        output.line(
            f"  mallory, proposed online but not signed by the founders, cannot act (exit {exc.exit_code}): {exc}"
        )

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
        ekey = FileSigner(open_employee_key(keys / f"{name}.key", DEMO_PASSPHRASE))
        result = halt_lib.lift(db, settings, raised.id or 0, name, ekey)
        output.line(
            f"  {name} signed: {len(result.signers)} of {result.needed}" + (" -> lifted" if result.lifted else "")
        )
    view = halt_lib.status_view(db)
    output.table("Status", ["component", "status"], list(view["components"].items()))

    _withdrawal_story(db, settings, directory, keys, auditor_manifest)

    output.line("")
    output.line("Done. Where the data lives:", style="bold")
    output.line(f"  store (SQLite):        {settings.db_url}")
    output.line(f"  pinned manifest:       {settings.manifest}")
    output.line(f"  halt file (engine):    {settings.halt_file}")
    output.line(f"  embedded chain:        {settings.chain_datadir}")
    output.line(f"  key files:             {keys}")
    output.line(f"  auditors' files:       {directory / 'auditors'}")
    output.line("Try next (the custody command is .venv/bin/custody after ./scripts/demo.sh):", style="bold")
    home = directory / "store"
    output.line(f"  export CUSTODY_HOME={home} CUSTODY_CHAIN=embedded CUSTODY_PASSPHRASE='{DEMO_PASSPHRASE}'")
    output.line("  custody status; custody policy show; custody address list; custody withdraw list")
    output.line("  custody ledger balance; custody audit ledger; custody audit reserves; custody audit log --verify")
    output.line(f"  custody verify addresses --manifest {auditor_manifest}")
    output.line(f"  custody halt raise --reason test --as alice --key {keys / 'alice.key'}")
    output.line("Each run uses a fresh directory; delete ./custody-demo to reset.")


COMMANDS = [demo]


def _withdrawal_story(db: Database, settings: Settings, directory: Path, keys: Path, manifest_file: Path) -> None:
    """Deposits on the embedded chain, then a withdrawal from request to confirmation."""
    backend = backend_for(settings, "regtest")

    _step(8, "Customers deposit: blocks mined on the embedded chain (Bitcoin Core's validation) pay them")
    for a in list_addresses(db):
        if a.index % 3 == 0:  # the first address of each account
            backend.mine(1, bytes.fromhex(a.script_pubkey))
    backend.mine(100, b"\x51")  # coinbase maturity
    for d in deposits.sync_deposits(db, settings, backend, 1):
        output.line(f"  {d['account']}: {d['amount']} BTC credited ({d['outpoint'][:16]}...)")

    _step(9, "carol requests a withdrawal of 1.5 BTC for acct-1001 to the customer's own address")
    customer = coincurve.PrivateKey(hashlib.sha256(b"demo customer wallet").digest())
    destination = encode_segwit("bcrt", 0, hash160(customer.public_key.format()))
    carol = FileSigner(open_employee_key(keys / "carol.key", DEMO_PASSPHRASE))
    w = wd.request_withdrawal(
        db,
        settings,
        backend,
        account="acct-1001",
        destination=destination,
        amount="1.5",
        fee_rate="2",
        requester="carol",
        key=carol,
    )
    wid = int(w["id"])
    output.line(
        f"  withdrawal #{wid}: {w['amount']} BTC to {destination}, fee {w['fee_sat']} sat, "
        f"change {w['change_sat']} sat to 1/{w['change_index']}"
    )

    _step(10, "Approvals: carol may not approve her own request; alice and bob sign the exact transaction")
    try:
        wd.approve(db, wid, "carol", carol, settings=settings)
    except CustodyError as exc:
        output.line(f"  carol refused (exit {exc.exit_code}): {exc}")
    for name in ("alice", "bob"):
        approver = FileSigner(open_employee_key(keys / f"{name}.key", DEMO_PASSPHRASE))
        w = wd.approve(db, wid, name, approver, settings=settings)
        output.line(f"  {name} approved -> {w['status']}")

    _step(11, "Offline signing: the PSBT goes to two founders' machines (no store, no node)")
    unsigned = directory / "offline" / f"withdrawal-{wid}.psbt"
    unsigned.parent.mkdir(parents=True, exist_ok=True)
    unsigned.write_text(wd.export_psbt(db, wid).to_base64() + "\n")
    pinned = load_signed_manifest(manifest_file.read_bytes()).check()
    signed = []
    for name in ("founder-a", "founder-b"):
        p = psbt_lib.Psbt.from_base64(unsigned.read_text().strip())
        state = SignerState.load(directory / "offline" / name / "signer-state.json", pinned)
        founder = open_founder_key(keys / f"{name}.key", DEMO_PASSPHRASE)
        r = review(p, founder, pinned, state)
        outs = "; ".join(
            f"{o['amount']} BTC to {o['address']}" + (" (change, verified)" if o["change"] else "") for o in r.outputs
        )
        output.line(f"  {name} reviews digest {r.short_digest}: {outs}, fee {r.fee} sat")
        result = sign_reviewed(p, r, state)
        out = unsigned.with_name(f"withdrawal-{wid}-{name}.psbt")
        out.write_text(p.to_base64() + "\n")
        signed.append(out)
        output.line(
            f"  {name} checked approvals ({', '.join(result.approvals)}), inputs and change; "
            f"signed {result.signatures_added} input(s)"
        )

    _step(12, "Signatures merged, final transaction checked by the kernel, broadcast, mined, confirmed")
    for path in signed:
        wd.import_psbt(db, wid, psbt_lib.Psbt.from_base64(path.read_text().strip()).serialize())
    w = wd.finalize(db, wid)
    w = wd.broadcast(db, backend, wid, settings=settings)
    output.line(f"  broadcast {w['txid']}")
    backend.mine(1, b"\x51")
    wd.sync(db, backend, wd.Limits(), settings=settings)
    deposits.sync_deposits(db, settings, backend, 1)
    w = wd.show_withdrawal(db, wid)
    output.line(
        f"  withdrawal #{wid}: {w['status']} at height {w['block_height']} ({w['confirmations']} confirmation)",
        style="green",
    )
    paid = [u for u in backend.unspent([bytes.fromhex(parse_destination(destination, REGTEST).script_pubkey.hex())])]
    output.line(f"  the customer's address holds {sum(u.amount for u in paid)} sat on chain")

    _step(13, "The continuous audit: every account sums to zero, reserves cover liabilities, the log is intact")
    book = ledger.balances(db)
    output.table(
        "Ledger",
        ["account", "balance (BTC)"],
        [(a["account"], a["balance"]) for a in book["accounts"]],
    )
    output.line(f"  all accounts sum to {book['totals']['sum_sat']} sat")
    checked = audit.audit_ledger(db, settings)
    output.line(f"  audit ledger: {'PASS' if checked['ok'] else 'FAIL'} ({checked['entries']} entries recomputed)")
    reserves = audit.audit_reserves(db, settings, backend)
    output.line(
        f"  audit reserves: {'PASS' if reserves['ok'] else 'FAIL'}: {reserves['reserves_sat']} sat on chain against "
        f"{reserves['liabilities_sat']} sat owed to customers"
    )
    log = audit.audit_log_check(db, settings)
    output.line(f"  audit log: {'intact' if log['ok'] else 'BROKEN'} ({log['entries']} hash-chained entries)")
