"""``custody init`` and ``custody policy ...``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from custody.control.halt import publish
from custody.control.roster import manifest_in_store, pin_manifest
from custody.control.wallet import init_store, load_policy
from custody.errors import Conflict, InputError
from custody_cli import output
from custody_cli.commands_trust import read_manifest_file
from custody_cli.context import AppContext, example, json_option, pass_app


def _founder_pair(text: str) -> tuple[str, str]:
    name, sep, key = text.partition("=")
    if not sep or not name or not key:
        raise InputError(f"--founder takes NAME=XPUB, got {text[:40]!r}")
    return name, key


def write_manifest(path: Path, manifest: dict[str, object], overwrite: bool = False) -> None:
    if path.exists() and not overwrite:
        raise Conflict(f"{path} exists already; not overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


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


@click.group()
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
    """Print the receive (/0/*) and change (/1/*) output descriptors with checksums."""
    d = load_policy(app.db).descriptors()
    if as_json:
        output.emit_json(d)
        return
    output.line(d["receive"])
    output.line(d["change"])


@policy.command("manifest")
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the manifest (not overwritten).",
)
@pass_app
@example("custody policy manifest --out founders.json")
def policy_manifest(app: AppContext, out_file: Path) -> None:
    """Write the founders-signed manifest for the auditors (docs/FORMATS.md)."""
    write_manifest(out_file, manifest_in_store(app.db).to_document())
    output.success(f"founders' manifest written to {out_file}")


COMMANDS = [init, policy]
