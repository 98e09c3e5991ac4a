"""``custody manifest ...`` and ``custody roster ...``: the founders' signatures that every rule
rests on. Signing runs offline, on a founder's machine, with their key file."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import click

from custody.bitcoin.keys import KeyOrigin
from custody.bitcoin.network import NETWORKS, get_network
from custody.bitcoin.script import ScriptType, parse_script_type
from custody.control import roster as roster_lib
from custody.errors import Conflict, InputError
from custody.files import write_atomic
from custody.identity.roster import MAX_ROSTER_BYTES, Roster, load_roster, sign_roster
from custody.policy.generator import AddressDeriver
from custody.policy.manifest import (
    SignedManifest,
    sign_manifest,
    unsigned,
)
from custody.policy.model import RECEIVE, Policy, make_policy
from custody.policy.origins import origin_problem, own_origin_problem
from custody.policy.setupfiles import MAX_SETUP_FILE_BYTES, policy_from_draft, read_setup_files
from custody.withdraw.signer import pin_roster
from custody_cli import output
from custody_cli.context import (
    AppContext,
    example,
    founder_key,
    founder_key_option,
    json_option,
    out_file_option,
    pass_app,
    passphrase_options,
)
from custody_cli.documents import (
    DocumentKind,
    ToSign,
    add_document_commands,
    confirm,
    founder_pairs,
    read_file,
    read_manifest_file,
    show_founders,
    write_new,
    yes_option,
)
from custody_cli.helptext import SummaryGroup


def _manifest_view(m: SignedManifest) -> dict[str, Any]:
    problems = m.problems()
    return {
        "fingerprint": m.fingerprint,
        "digest": m.digest,
        "network": m.policy.network.name,
        "policy": f"{m.policy.threshold}-of-{m.policy.n}",
        "script_type": m.policy.script_type.value,
        "founders": [{"name": f.name, "xpub": str(f.key), "signed": f.name in m.signatures} for f in m.policy.founders],
        "complete": not problems,
        "problems": problems,
    }


def _show_manifest(m: SignedManifest, as_json: bool) -> None:
    v = _manifest_view(m)
    if as_json:
        output.emit_json(v)
        return
    output.key_values(
        "Founders' manifest",
        [
            ("fingerprint", v["fingerprint"]),
            ("network", v["network"]),
            ("policy", v["policy"]),
            ("script type", v["script_type"]),
        ],
    )
    show_founders("Founders", v)


@click.group(cls=SummaryGroup)
def manifest() -> None:
    """The founders-signed manifest: drafted once, signed by every founder, pinned everywhere."""


@manifest.command("draft")
@click.option("--network", required=True, type=click.Choice(list(NETWORKS)), help="The network; always explicit.")
@click.option("--threshold", type=int, help="Signatures needed (m of n); 2 with --founder.")
@click.option(
    "--script",
    "script_type",
    type=click.Choice([t.value for t in ScriptType]),
    help="How the multisig script is wrapped; p2wsh with --founder.",
)
@click.option(
    "--founder",
    "founders",
    multiple=True,
    metavar="NAME=XPUB",
    help="A founder's account xpub with its key origin, as `custody keygen` printed it. Repeat n times.",
)
@click.option(
    "--from",
    "from_files",
    multiple=True,
    metavar="FILE|-",
    help=(
        "Read the policy from a wallet setup file (BSMS descriptor record, Coldcard, Caravan, Specter, "
        "Sparrow or descriptor text), or from BSMS key records, one file per founder (`-`: stdin)."
    ),
)
@click.option("--token", "tokens", multiple=True, metavar="HEX", help="The BSMS session token of encrypted records.")
@out_file_option("Where to write the unsigned manifest (never overwritten).")
@click.option(
    "--allow-nonstandard-path",
    is_flag=True,
    help="Draft even when a key origin is not the script type's standard path (BIP-48 m/48'/coin'/account'/2' "
    "for p2wsh, /1' for p2sh-p2wsh; BIP-45 m/45' for p2sh): warned, not refused.",
)
@json_option
@example(
    "custody manifest draft --network regtest --founder 'a=[fp/48h/1h/0h/2h]tpub...' ... --out m.json\n"
    "  custody manifest draft --network mainnet --from coldcard-export.txt --out m.json"
)
def manifest_draft(
    network: str,
    threshold: int | None,
    script_type: str | None,
    founders: tuple[str, ...],
    from_files: tuple[str, ...],
    tokens: tuple[str, ...],
    out_file: Path,
    allow_nonstandard_path: bool,
    as_json: bool,
) -> None:
    """Write the founders' manifest for every founder to sign (`custody manifest sign`), from
    --founder keys or from the wallet setup file the founders' wallets or devices wrote.

    Quote each key: an unquoted shell eats the ' of 48'/1'/0'/2' (or write 48h/1h/0h/2h). A key
    origin that is not the standard path for the script type is refused (exit 2) unless
    --allow-nonstandard-path."""
    net = get_network(network)
    st = parse_script_type(script_type) if script_type else None
    if bool(founders) == bool(from_files):
        raise InputError("give the founders' keys as --founder NAME=XPUB ..., or --from FILE (not both)")
    first = None
    if from_files:
        if from_files.count("-") > 1:
            raise InputError("standard input (-) can be read once")
        draft = read_setup_files([_read_input(f) for f in from_files], net, tokens)
        policy = policy_from_draft(draft, net, threshold, st)
        first = AddressDeriver(policy).derive(RECEIVE, 0).address
    else:
        if tokens:
            raise InputError("--token is for encrypted BSMS records read with --from")
        policy = make_policy(
            net, 2 if threshold is None else threshold, st or ScriptType.P2WSH, founder_pairs(founders)
        )
    _check_origins(policy, allow_nonstandard_path)
    m = unsigned(policy)
    write_new(out_file, json.dumps(m.to_document(), indent=2) + "\n")
    if as_json:
        output.emit_json(_manifest_view(m) | {"file": str(out_file), "first_address": first})
        return
    output.line(m.fingerprint)
    if first is not None:
        output.table(
            f"{policy.threshold}-of-{policy.n} {policy.script_type.value} on {policy.network.name}",
            ["name", "account xpub"],
            [(f.name, str(f.key)) for f in policy.founders],
        )
        output.info(f"first deposit address: {first}; compare it with what each founder's wallet or device shows")
    output.success(f"manifest {m.fingerprint} written to {out_file}; every founder signs it next")


def _check_origins(policy: Policy, allow: bool) -> None:
    """Refuse (or, allowed, warn about) key origins off the script type's standard path."""
    problems = [
        p
        for f in policy.founders
        if (p := origin_problem(f.name, f.key, policy.network, policy.script_type)) is not None
    ]
    if problems and not allow:
        raise InputError("; ".join(problems) + " (--allow-nonstandard-path drafts it anyway)")
    for p in problems:
        output.warning(f"NON-STANDARD KEY ORIGIN: {p}")


def _read_input(name: str) -> bytes:
    """A wallet setup file's bytes, or standard input's for ``-`` (bounded either way)."""
    if name != "-":
        return read_file(Path(name), MAX_SETUP_FILE_BYTES, "wallet setup file")
    data = sys.stdin.buffer.read(MAX_SETUP_FILE_BYTES + 1)
    if len(data) > MAX_SETUP_FILE_BYTES:
        raise InputError(f"a wallet setup file is at most {MAX_SETUP_FILE_BYTES} bytes")
    return data


@manifest.command("sign")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@founder_key_option
@yes_option
@passphrase_options
@json_option
@example("custody manifest sign m.json --key founder-a.key")
def manifest_sign(file: Path, key_file: Path, yes: bool, passphrase_file: Path | None, as_json: bool) -> None:
    """Offline: check your own xpub is in the manifest, show it, and add your signature to FILE."""
    m = read_manifest_file(file)
    key = founder_key(key_file, passphrase_file)
    mine = [f.name for f in m.policy.founders if f.key.xpub.identity() == key.account.xpub.identity()]
    if not mine or key.network != m.policy.network:
        raise InputError("your key's account xpub is not in this manifest: do not sign it")
    listed = next(f for f in m.policy.founders if f.name == mine[0])
    wrong_origin = own_origin_problem(mine[0], listed.key, key.account.origin or KeyOrigin(b"", ()))
    if wrong_origin is not None:
        raise InputError(wrong_origin)
    if not as_json:
        _show_manifest(m, False)
    confirm(f"Sign manifest {m.fingerprint} as {mine[0]}?", yes)
    signed = sign_manifest(m, mine[0], key.master.derive(key.account_path).private_key())
    write_atomic(file, json.dumps(signed.to_document(), indent=2) + "\n")
    if as_json:
        output.emit_json(_manifest_view(signed))
        return
    output.success(f"{mine[0]} signed manifest {signed.fingerprint} ({file})")


@manifest.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@json_option
@pass_app
@example("custody manifest show m.json")
def manifest_show(app: AppContext, file: Path | None, as_json: bool) -> None:
    """Show a manifest's fingerprint and who signed it (default: the one pinned here)."""
    _show_manifest(read_manifest_file(file or app.settings.manifest), as_json)


@manifest.command("pin")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--from-store", is_flag=True, help="Take the manifest the shared store carries (team setup).")
@click.option(
    "--fingerprint", required=True, help="The fingerprint the founders read out (abcd-ef01-2345-6789); it must match."
)
@json_option
@pass_app
@example("custody manifest pin --from-store --fingerprint abcd-ef01-2345-6789")
def manifest_pin(app: AppContext, file: Path | None, from_store: bool, fingerprint: str, as_json: bool) -> None:
    """Pin the founders-signed manifest on this machine, after checking every founder's
    signature and the fingerprint you confirmed with them."""
    if (file is None) == (not from_store):
        raise InputError("give a manifest FILE or --from-store (not both)")
    m = roster_lib.manifest_in_store(app.db) if from_store else read_manifest_file(file)  # type: ignore[arg-type]
    m.check()
    if fingerprint.strip().lower() != m.fingerprint:
        raise InputError(f"the manifest's fingerprint is {m.fingerprint}, not {fingerprint.strip()}: do not pin it")
    path = app.settings.manifest
    if path.exists():
        current = read_manifest_file(path)
        if current.digest != m.digest:
            raise Conflict(f"another founders' manifest ({current.fingerprint}) is pinned at {path}; not replaced")
    roster_lib.pin_manifest(path, m)
    if from_store:  # this machine joins the store: its halt file, which its guard reads, as init writes it
        from custody.control.halt import publish

        for w in publish(app.db, app.settings).warnings:
            output.warning(w)
    if as_json:
        output.emit_json(_manifest_view(m) | {"pinned": str(path)})
        return
    output.success(f"founders' manifest {m.fingerprint} pinned at {path}")


# ---------------------------------------------------------------- roster


def _show_roster(r: Roster, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    if as_json:
        output.emit_json(r.to_document() | {"digest": r.digest} | (extra or {}))
        return
    output.key_values(
        "Roster",
        [
            ("serial", r.serial),
            ("digest", r.digest[:16]),
            ("signed by", ", ".join(sorted(r.signatures)) or "nobody yet"),
        ],
    )
    output.table(
        "Employees",
        ["name", "roles", "enabled", "keys"],
        [
            (e.name, ",".join(sorted(e.roles)), "yes" if e.enabled else "DISABLED", " ".join(e.keys))
            for e in r.employees
        ],
    )
    if r.cleared_suspensions:
        output.info(f"clears suspensions: {', '.join(d[:16] for d in r.cleared_suspensions)}")


@click.group(cls=SummaryGroup)
def roster() -> None:
    """The founders-signed employee roster: proposed online, signed offline by m founders, applied."""


@roster.command("show")
@json_option
@pass_app
@example("custody roster show")
def roster_show(app: AppContext, as_json: bool) -> None:
    """The roster in force, suspensions, and the open proposal."""
    v = roster_lib.roster_view(app.db, app.settings)
    if as_json:
        output.emit_json(v)
        return
    output.key_values(
        "Roster",
        [
            ("manifest", v["manifest"]),
            ("serial", v["serial"] or "none yet"),
            ("signed by", ", ".join(v["signed_by"]) or "-"),
        ],
    )
    output.table(
        "Employees",
        ["name", "roles", "state", "keys"],
        [
            (
                e["name"],
                ",".join(e["roles"]),
                "SUSPENDED" if e["suspended"] else ("enabled" if e["enabled"] else "DISABLED"),
                " ".join(k[:16] + "…" for k in e["keys"]),
            )
            for e in v["employees"]
        ],
    )
    for s in v["suspensions"]:
        state = "in force" if s["in_force"] else f"signed by {', '.join(s['signed_by'])}, needs two"
        output.line(f"suspension of {s['employee']} ({state}): {s['reason']}")
    if v["proposal"]:
        output.info(f"open proposal: roster #{v['proposal']['roster']['serial']} (`custody roster export`)")


def _changes(
    add: tuple[str, ...],
    disable: tuple[str, ...],
    enable: tuple[str, ...],
    roles: tuple[str, ...],
    clear: tuple[str, ...],
    webauthn: tuple[str, ...] = (),
) -> list[roster_lib.Change]:
    out = []
    for spec in add:
        name, sep, rest = spec.partition("=")
        pubkey, _, role_text = rest.partition(":")
        if not sep or not pubkey:
            raise InputError(f"--add takes NAME=PUBKEY[:ROLES], got {spec[:40]!r}")
        out.append(roster_lib.Change("add", name, pubkey, roster_lib.parse_roles(role_text) if role_text else ()))
    out += [roster_lib.Change("disable", n) for n in disable]
    out += [roster_lib.Change("enable", n) for n in enable]
    for spec in roles:
        name, sep, role_text = spec.partition("=")
        if not sep:
            raise InputError(f"--roles takes NAME=ROLE[,ROLE...], got {spec[:40]!r}")
        out.append(roster_lib.Change("roles", name, roles=roster_lib.parse_roles(role_text)))
    out += [roster_lib.Change("clear", "-", digest=d.strip().lower()) for d in clear]
    for spec in webauthn:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise InputError(f"--webauthn takes NAME=FILE, got {spec[:40]!r}")
        out.append(roster_lib.webauthn_change(name, Path(path)))
    if not out:
        raise InputError(
            "nothing to propose: give --add, --disable, --enable, --roles, --webauthn or --clear-suspension"
        )
    return out


@roster.command("propose")
@click.option("--add", multiple=True, metavar="NAME=PUBKEY[:ROLES]", help="Add an employee (roles default: all).")
@click.option("--disable", multiple=True, metavar="NAME", help="Disable an employee (their name stays taken).")
@click.option("--enable", multiple=True, metavar="NAME", help="Enable a disabled employee again.")
@click.option("--roles", multiple=True, metavar="NAME=ROLES", help="Set roles: request, approve, lift.")
@click.option("--clear-suspension", "clear", multiple=True, metavar="DIGEST", help="Clear a suspension.")
@click.option(
    "--webauthn",
    multiple=True,
    metavar="NAME=FILE",
    help="Add a security key (the credential the approval console's /console/register shows) to an employee.",
)
@json_option
@pass_app
@example("custody roster propose --add bob=02ab...:approve,lift --disable carol")
def roster_propose(
    app: AppContext,
    add: tuple[str, ...],
    disable: tuple[str, ...],
    enable: tuple[str, ...],
    roles: tuple[str, ...],
    clear: tuple[str, ...],
    webauthn: tuple[str, ...],
    as_json: bool,
) -> None:
    """Propose changes for the next roster; nothing changes until m founders sign it."""
    r = roster_lib.propose(app.db, app.settings, _changes(add, disable, enable, roles, clear, webauthn))
    _show_roster(r, as_json)
    if not as_json:
        output.success(f"roster #{r.serial} proposed: `custody roster export --out FILE` for the founders")


def _roster_export(app: AppContext, current: bool) -> dict[str, Any]:
    return roster_lib.export_roster(app.db) if current else roster_lib.proposal(app.db).to_document()


def _roster_to_sign(pinned: roster_lib.Trust, file: Path) -> ToSign:
    r = load_roster(read_file(file, MAX_ROSTER_BYTES, "roster"))
    if r.manifest != pinned.newest.digest or r.network != pinned.policy.network.name:
        raise InputError(
            "this roster belongs to another founders' manifest than the newest one pinned here: do not sign it"
        )
    return ToSign(r.serial, lambda: _show_roster(r, False), partial(sign_roster, r))


def _roster_apply(app: AppContext, file: Path) -> tuple[dict[str, Any], str]:
    r = roster_lib.apply_roster(app.db, app.settings, read_file(file, MAX_ROSTER_BYTES, "roster"))
    view = {"serial": r.serial, "digest": r.digest, "signed_by": sorted(r.signatures)}
    return view, f"roster #{r.serial} applied (signed by {', '.join(sorted(r.signatures))})"


add_document_commands(
    roster,
    DocumentKind(
        group="roster",
        noun="roster",
        example_file="roster-2.json",
        discard=roster_lib.discard_proposal,
        export=_roster_export,
        export_help="Write the open proposal (or, with --current, the roster in force) to a file.",
        out_help="Where to write the proposal for the founders (never overwritten).",
        current_help="Write the roster in force instead (to pin on a signer machine).",
        read_to_sign=_roster_to_sign,
        sign_help="Offline: show the proposed roster and add your founder's signature to FILE.\n\n"
        "The roster is checked against the manifest pinned on this machine (--manifest).",
        apply=_roster_apply,
        apply_help="Apply a roster m founders signed; it must be the next serial after the one in force.",
        read_to_pin=lambda file: json.loads(read_file(file, MAX_ROSTER_BYTES, "roster")),
        pin=pin_roster,
        pin_help="Offline: remember a founders' roster on this signer machine now, so that no PSBT under an\n"
        "older roster is signed here (checked against the manifest pinned here).",
    ),
)


COMMANDS = [manifest, roster]
