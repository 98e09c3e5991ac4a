"""``custody init`` and ``custody policy ...``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from custody.control.halt import publish
from custody.control.roster import manifest_in_store, pin_manifest
from custody.control.wallet import init_store, load_policy
from custody.errors import Conflict, InputError
from custody.files import write_atomic
from custody.policy.manifest import write_manifest
from custody.policy.origins import origin_problem
from custody.policy.setupfiles import FORMATS, descriptor_text, export_policy
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, out_file_option, pass_app
from custody_cli.documents import read_manifest_file
from custody_cli.helptext import SummaryGroup


def _founder_pair(text: str) -> tuple[str, str]:
    name, sep, key = text.partition("=")
    if not sep or not name or not key:
        raise InputError(f"--founder takes NAME=XPUB, got {text[:40]!r}")
    return name, key


@click.command()
@click.argument("manifest_file", metavar="MANIFEST", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@pass_app
@example("custody init founders-manifest.json")
def init(app: AppContext, manifest_file: Path, as_json: bool) -> None:
    """Create the store from the founders-signed manifest (never overwrites one); pin it here.

    Every founder must have signed MANIFEST (`custody manifest draft`, then `custody manifest
    sign` by each founder). Issuance verifies every address against the pinned copy.
    """
    signed = read_manifest_file(manifest_file).check()
    path = app.settings.manifest
    if path.exists() and read_manifest_file(path).digest != signed.digest:
        raise Conflict(f"a different founders' manifest is pinned at {path}; not overwritten")
    init_store(app.db, signed)
    pin_manifest(path, signed)
    for founder in signed.policy.founders:  # every founder signed it: warned loudly, not refused
        problem = origin_problem(founder.name, founder.key, signed.policy.network, signed.policy.script_type)
        if problem is not None:
            output.warning(f"NON-STANDARD KEY ORIGIN: {problem}; check every founder's signer derives it")
    state = publish(app.db, app.settings)
    for w in state.warnings:
        output.warning(w)
    policy = signed.policy
    if as_json:
        output.emit_json(
            {
                "policy": policy.to_manifest(),
                "fingerprint": signed.fingerprint,
                "descriptors": policy.descriptors(),
                "manifest": str(path),
                "halt_file": str(app.settings.halt_file),
            }
        )
        return
    output.success(
        f"{policy.threshold}-of-{policy.n} {policy.script_type.value} policy on {policy.network.name} created"
    )
    output.info(f"founders' manifest {signed.fingerprint} pinned at {path}")


@click.group(cls=SummaryGroup)
def policy() -> None:
    """The wallet policy: show it, its descriptors, and the founders' manifest."""


@policy.command("show")
@json_option
@pass_app
@example("custody policy show --json")
def policy_show(app: AppContext, as_json: bool) -> None:
    """Show the network, threshold, script type and founders' keys."""
    p = load_policy(app.db)
    if as_json:
        output.emit_json(p.to_manifest() | {"descriptors": p.descriptors()})
        return
    output.key_values(
        "Policy",
        [("network", p.network.name), ("policy", f"{p.threshold}-of-{p.n}"), ("script type", p.script_type.value)],
    )
    output.table("Founders", ["name", "key"], [(f.name, str(f.key)) for f in p.founders])


@policy.command("descriptors")
@json_option
@pass_app
@example("custody policy descriptors")
def policy_descriptors(app: AppContext, as_json: bool) -> None:
    """Print the output descriptors with checksums: receive and change in one (BIP-389 <0;1>/*),
    then receive (/0/*) and change (/1/*) alone.

    Each descriptor stands in its own paragraph under a `#` comment: Sparrow reads a pasted or
    imported text by paragraphs, joining adjacent lines, and takes the first one.
    """
    p = load_policy(app.db)
    if as_json:
        output.emit_json(p.descriptors() | {"multipath": p.multipath_descriptor()})
        return
    for text in descriptor_text(p).rstrip("\n").split("\n"):
        output.line(text)


def write_out(out_file: str, text: str) -> None:
    """``text`` to standard output for ``-``, else to a new file (never overwritten)."""
    if out_file == "-":
        sys.stdout.write(text)
        return
    path = Path(out_file)
    if path.exists():
        raise Conflict(f"{path} exists already; not overwritten")
    write_atomic(path, text)


@policy.command("export")
@click.option(
    "--format", "fmt", required=True, type=click.Choice(list(FORMATS)), help="The wallet setup file to write."
)
@click.option(
    "--out", "out_file", default="-", show_default=True, metavar="FILE|-", help="Where to write it (`-`: stdout)."
)
@click.option(
    "--name", default="custody", show_default=True, help="The wallet's name in the file (Coldcard: 1-20 ASCII)."
)
@pass_app
@example("custody policy export --format coldcard --out custody-coldcard.txt")
def policy_export(app: AppContext, fmt: str, out_file: str, name: str) -> None:
    """Write the wallet setup file other wallets and signers import, from the founders-signed
    manifest pinned here (every signature checked, never the store alone).

    bsms: a BIP-129 descriptor record; coldcard: Coldcard's multisig file; caravan and
    specter: their wallet JSON; sparrow: Sparrow's descriptor export (the BIP-389 <0;1>/*
    descriptor first); descriptor: one BIP-389 descriptor with checksum.
    """
    signed = read_manifest_file(app.settings.manifest).check()
    write_out(out_file, export_policy(signed.policy, fmt, name))
    if out_file != "-":
        output.success(f"{fmt} wallet setup file of manifest {signed.fingerprint} written to {out_file}")


@policy.command("manifest")
@out_file_option("Where to write the manifest (not overwritten).")
@pass_app
@example("custody policy manifest --out founders.json")
def policy_manifest(app: AppContext, out_file: Path) -> None:
    """Write the founders-signed manifest for the auditors (docs/FORMATS.md)."""
    write_manifest(out_file, manifest_in_store(app.db).to_document())
    output.success(f"founders' manifest written to {out_file}")


COMMANDS = [init, policy]
