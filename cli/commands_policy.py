"""``custody init`` and ``custody policy ...``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from custody.bitcoin.network import NETWORKS, get_network
from custody.bitcoin.script import ScriptType, parse_script_type
from custody.control.halt import publish
from custody.control.wallet import init_store, load_policy
from custody.errors import Conflict, InputError
from custody.policy.model import make_policy
from custody_cli import output
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
@click.option("--network", required=True, type=click.Choice(list(NETWORKS)), help="The network; always explicit.")
@click.option("--threshold", default=2, show_default=True, type=int, help="Signatures needed (m of n).")
@click.option(
    "--script",
    "script_type",
    default="p2wsh",
    show_default=True,
    type=click.Choice([t.value for t in ScriptType]),
    help="How the multisig script is wrapped.",
)
@click.option(
    "--founder",
    "founders",
    multiple=True,
    required=True,
    metavar="NAME=XPUB",
    help="A founder's account xpub, optionally with key origin [fp/path]. Repeat n times.",
)
@json_option
@pass_app
@example(
    "custody init --network regtest --threshold 2 --founder a=[fp/48'/1'/0'/2']tpub... --founder b=... --founder c=..."
)
def init(
    app: AppContext, network: str, threshold: int, script_type: str, founders: tuple[str, ...], as_json: bool
) -> None:
    """Create the store and its m-of-n wallet policy (never overwrites one).

    Also pins the founders' manifest that issuance verifies every address against.
    """
    policy = make_policy(
        get_network(network), threshold, parse_script_type(script_type), [_founder_pair(f) for f in founders]
    )
    manifest = policy.to_manifest()
    if app.settings.manifest.exists():
        existing = json.loads(app.settings.manifest.read_text(encoding="utf-8") or "null")
        if existing != manifest:
            raise Conflict(f"a different founders' manifest is pinned at {app.settings.manifest}; not overwritten")
    init_store(app.db, policy)
    write_manifest(app.settings.manifest, manifest, overwrite=True)
    state = publish(app.db, app.settings)
    for w in state.warnings:
        output.warning(w)
    if as_json:
        output.emit_json(
            {
                "policy": manifest,
                "descriptors": policy.descriptors(),
                "manifest": str(app.settings.manifest),
                "halt_file": str(app.settings.halt_file),
            }
        )
        return
    output.success(f"{policy.threshold}-of-{policy.n} {policy.script_type.value} policy on {network} created")
    output.info(f"pinned founders' manifest: {app.settings.manifest}")


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
    """Write the founders' key manifest for the auditors (docs/FORMATS.md)."""
    write_manifest(out_file, load_policy(app.db).to_manifest())
    output.success(f"founders' manifest written to {out_file}")


COMMANDS = [init, policy]
