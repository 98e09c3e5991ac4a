"""``custody rotate ...``: key rotation to a new quorum (custody.policy.rotation,
custody.control.epochs). Drafting runs where the store is (it names the roster and rulebook the
rotation carries over); approving on a founder's machine; ``apply`` on the online machine; ``pin``
on every other machine, the offline signers first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from custody.bitcoin.script import ScriptType, parse_script_type
from custody.control import epochs
from custody.errors import InputError
from custody.files import write_atomic
from custody.identity.governance import carried_of
from custody.policy.model import make_policy
from custody.policy.rotation import approve_rotation, approvers, draft_rotation, rotation_problems
from custody_cli import output
from custody_cli.context import (
    AppContext,
    Who,
    acting_options,
    example,
    founder_key,
    founder_key_option,
    json_option,
    out_file_option,
    pass_app,
    passphrase_options,
)
from custody_cli.documents import confirm, founder_pairs, read_manifest_file, show_founders, write_new, yes_option
from custody_cli.helptext import SummaryGroup


@click.group(cls=SummaryGroup)
def rotate() -> None:
    """Key rotation: a new founders' quorum, approved by the current one."""


def carried_view(m: Any) -> dict[str, Any]:
    return {k: c.to_dict() if c else None for k, c in carried_of(m.body).items()}


def _view(m: Any, current: Any) -> dict[str, Any]:
    return {
        "fingerprint": m.fingerprint,
        "digest": m.digest,
        "previous": current.digest,
        "previous_fingerprint": current.fingerprint,
        "policy": f"{m.policy.threshold}-of-{m.policy.n}",
        "script_type": m.policy.script_type.value,
        "founders": [{"name": f.name, "xpub": str(f.key), "signed": f.name in m.signatures} for f in m.policy.founders],
        "carries": carried_view(m),
        "approved_by": approvers(m, current),
        "approvals_needed": current.policy.threshold,
        "problems": rotation_problems(m, current),
    }


def _carried(v: dict[str, Any]) -> list[tuple[str, Any]]:
    return list(v["carries"].items())


def _show(v: dict[str, Any], as_json: bool) -> None:
    if as_json:
        output.emit_json(v)
        return
    output.key_values(
        "Rotation manifest",
        [
            ("fingerprint", v["fingerprint"]),
            ("rotates from", v["previous_fingerprint"]),
            ("new policy", f"{v['policy']} {v['script_type']}"),
            *((f"carries {k}", f"#{c['serial']} sha256:{c['digest']}" if c else "none") for k, c in _carried(v)),
            ("approved by", f"{', '.join(v['approved_by']) or 'nobody'} (needs {v['approvals_needed']})"),
        ],
    )
    show_founders("New founders", v)


@rotate.command("draft")
@click.option("--threshold", type=int, required=True, help="Signatures the new policy needs (m of n).")
@click.option("--founder", "founders", multiple=True, required=True, metavar="NAME=XPUB", help="A new founder's key.")
@click.option("--script-type", type=click.Choice([t.value for t in ScriptType]), help="Default: the current one's.")
@out_file_option("Where to write the rotation manifest to sign (never overwritten).")
@json_option
@pass_app
@example("custody rotate draft --threshold 3 --founder a=[fp/48h/1h/0h/2h]tpub... (x4) --out rotation.json")
def rotate_draft(
    app: AppContext, threshold: int, founders: tuple[str, ...], script_type: str | None, out_file: Path, as_json: bool
) -> None:
    """Write a rotation manifest from the newest manifest pinned here to a new policy, for every
    new founder to sign (`custody manifest sign`) and m current founders to approve (`rotate approve`).
    It carries over the store's roster and rulebook in force: they stay in force until the new
    founders sign the next ones, and nothing the old founders sign after them counts."""
    current = epochs.pinned_chain(app.settings)[-1]
    st = parse_script_type(script_type) if script_type else current.policy.script_type
    carried = epochs.draft_carries(app.db)  # the roster and rulebook in force stay until the new founders sign
    m = draft_rotation(current, make_policy(current.policy.network, threshold, st, founder_pairs(founders)), carried)
    write_new(out_file, json.dumps(m.to_document(), indent=2) + "\n")
    if as_json:
        output.emit_json(_view(m, current) | {"file": str(out_file)})
        return
    output.line(m.fingerprint)
    output.success(f"rotation manifest {m.fingerprint} written to {out_file}")


@rotate.command("approve")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@founder_key_option
@yes_option
@passphrase_options
@json_option
@pass_app
@example("custody rotate approve rotation.json --key alice.key")
def rotate_approve(
    app: AppContext, file: Path, key_file: Path, yes: bool, passphrase_file: Path | None, as_json: bool
) -> None:
    """Offline, as a CURRENT founder: approve the rotation in FILE with your current key (m of you
    must). The current manifest is the newest one pinned on this machine."""
    current = epochs.pinned_chain(app.settings)[-1]
    m = read_manifest_file(file)
    key = founder_key(key_file, passphrase_file)
    mine = [f.name for f in current.policy.founders if f.key.xpub.identity() == key.account.xpub.identity()]
    if not mine or key.network != current.policy.network:
        raise InputError("your key is not one of the current founders' keys: you cannot approve a rotation")
    if not as_json:
        _show(_view(m, current), False)
    confirm(f"Approve rotation {m.fingerprint} as {mine[0]}?", yes)
    approved = approve_rotation(m, current, mine[0], key.master.derive(key.account_path).private_key())
    write_atomic(file, json.dumps(approved.to_document(), indent=2) + "\n")
    if as_json:
        output.emit_json(_view(approved, current))
        return
    output.success(f"{mine[0]} approved rotation {approved.fingerprint} ({file})")


@rotate.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--actor", default="operator", show_default=True, help="Who applies it, for the audit log.")
@json_option
@pass_app
@example("custody rotate apply rotation.json")
def rotate_apply(app: AppContext, file: Path, actor: str, as_json: bool) -> None:
    """Pin the approved rotation here and make it the store's newest policy: new addresses come
    from it; old addresses stay watched and credited until `rotate sweep` empties them."""
    epoch = epochs.apply_rotation(app.db, app.settings, read_manifest_file(file), actor=actor)
    if as_json:
        output.emit_json(epoch.to_dict())
        return
    output.success(
        f"epoch {epoch.number}: {epoch.policy.threshold}-of-{epoch.policy.n} ({epoch.manifest.fingerprint}) "
        f"issues from receive index {epoch.receive_from}, change index {epoch.change_from}"
    )


@rotate.command("pin")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--fingerprint", required=True, help="The fingerprint the founders read out; it must match.")
@json_option
@pass_app
@example("custody rotate pin rotation.json --fingerprint abcd-ef01-2345-6789")
def rotate_pin(app: AppContext, file: Path, fingerprint: str, as_json: bool) -> None:
    """Pin an approved rotation on this machine (an offline signer first): after the newest
    manifest pinned here, approved by its quorum and signed by every new founder."""
    m = read_manifest_file(file)
    if fingerprint.strip().lower() != m.fingerprint:
        raise InputError(f"the rotation's fingerprint is {m.fingerprint}, not {fingerprint}: not pinned")
    chain = epochs.pin_rotation(app.settings, m)
    if as_json:
        output.emit_json({"pinned": [c.fingerprint for c in chain]})
        return
    output.success(f"pinned {output.plural(len(chain), 'manifest')}; the newest is {chain[-1].fingerprint}")


@rotate.command("show")
@json_option
@pass_app
@example("custody rotate show --json")
def rotate_show(app: AppContext, as_json: bool) -> None:
    """The store's policies, first to newest, and where each one's indexes begin."""
    rows = [e.to_dict() for e in epochs.load_epochs(app.db)]
    if as_json:
        output.emit_json(rows)
        return
    output.table(
        "Policies",
        ["epoch", "manifest", "policy", "founders", "receive from", "change from"],
        [
            (
                str(r["epoch"]),
                r["fingerprint"],
                f"{r['threshold']}-of-{r['n']}",
                ", ".join(r["founders"]),
                str(r["receive_from"]),
                str(r["change_from"]),
            )
            for r in rows
        ],
    )


@rotate.command("sweep")
@click.option("--fee-rate", help="Fee rate in sat/vB (default CUSTODY_FEE_RATE or 2).")
@acting_options
@example("custody rotate sweep --as carol --key carol.key")
def rotate_sweep(app: AppContext, fee_rate: str | None, who: Who, as_json: bool) -> None:
    """Request the next sweep: the oldest policy's coins to a fresh address of the newest one, in
    one self-transfer that then takes the withdrawal's path (`withdraw approve` by two employees,
    `sign` by the OLD policy's founders, `withdraw import/finalize/broadcast`, `sync`)."""
    from custody.withdraw import sweep
    from custody_cli.commands_withdraw import request_row

    request_row(
        app,
        sweep.propose_sweep,
        who=who,
        as_json=as_json,
        title=lambda d: f"Sweep #{d['id']}",
        actor="requester",
        fee_rate=fee_rate,
    )


COMMANDS = [rotate]
