"""``custody rules ...``: the founders-signed rulebook of approval tiers, limits, velocity,
trusted destinations and fee caps. Proposed online, signed offline by m founders, applied."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import click

from custody.control import roster as roster_lib
from custody.control import rulebook as rulebook_lib
from custody.errors import InputError
from custody.identity.founders_documents import load_json
from custody.identity.rulebook import DEFAULT_RULES, MAX_RULEBOOK_BYTES, load_rulebook, parse_rulebook, sign_rulebook
from custody.identity.rulebook_chain import loosened
from custody.withdraw import queue as wd
from custody.withdraw.signer import pin_rulebook
from custody_cli import output
from custody_cli.commands_withdraw import chain_backend
from custody_cli.context import (
    AppContext,
    example,
    json_option,
    pass_app,
)
from custody_cli.documents import DocumentKind, ToSign, add_document_commands, read_file
from custody_cli.helptext import SummaryGroup


def _bump_text(rules: dict[str, Any]) -> str:
    bump = rules.get("bump")
    if bump is None:
        return "2 approvals, the fee caps above (no bump section)"
    return f"{bump['approvals']} approvals, at most {bump['max_fee_sat']} sat and {bump['max_fee_rate']} sat/vB"


def _render_rules(title: str, rules: dict[str, Any]) -> None:
    fees = rules["fees"]
    output.key_values(
        title,
        [
            ("max withdrawal", f"{rules['max_withdrawal_sat']} sat" if rules["max_withdrawal_sat"] else "none"),
            ("outside the allowlist", rules["destinations"]["outside"]),
            ("cooling-off", f"{rules['cooling_off_blocks']} blocks"),
            (
                "fees at most",
                f"{fees['max_fee_sat']} sat, {fees['max_fee_rate']} sat/vB, {fees['max_fee_share_bp'] / 100:.2f}% "
                f"of the amount; a batch {fees['max_batch_fee_sat']} sat",
            ),
            ("self-transfer", f"{rules['self_transfer']['approvals']} approvals"),
            ("fee bump", _bump_text(rules)),
            ("loosening delay", f"{rules['loosening_delay_blocks']} blocks"),
        ],
    )
    output.table(
        "Approval tiers",
        ["tier", "up to (sat)", "approvals"],
        [
            (t["name"], t["up_to_sat"] if t["up_to_sat"] is not None else "any amount", t["approvals"])
            for t in rules["tiers"]
        ],
    )
    if rules["velocity"]:
        output.table(
            "Velocity limits",
            ["name", "scope", "window (blocks)", "at most (sat)"],
            [(v["name"], v["scope"], v["window_blocks"], v["max_sat"]) for v in rules["velocity"]],
        )
    if rules["destinations"]["allowlist"]:
        output.table(
            "Trusted destinations",
            ["address", "account", "label", "added by"],
            [
                (d.get("address") or d["script_pubkey"], d["account"] or "any", d["label"], f"#{d['added_serial']}")
                for d in rules["destinations"]["allowlist"]
            ],
        )


def _render_book(title: str, view: dict[str, Any]) -> None:
    if view["built_in"]:
        output.info(f"{title}: the built-in rules (no founders-signed rulebook yet)")
    else:
        output.info(
            f"{title}: rulebook #{view['serial']} ({view['fingerprint']}), signed by {', '.join(view['signed_by'])}, "
            f"in force from height {view['effective_height']}"
        )
    _render_rules(title, view["rules"])


@click.group(cls=SummaryGroup)
def rules() -> None:
    """The founders-signed rulebook: approval tiers, limits, velocity, trusted destinations, fees."""


@rules.command("show")
@json_option
@pass_app
@example("custody rules show")
def rules_show(app: AppContext, as_json: bool) -> None:
    """The rulebook in force at the chain's tip, any applied one still waiting for its height,
    and the open proposal (what it loosens)."""
    v = rulebook_lib.show(app.db, app.settings, chain_backend(app))
    if as_json:
        output.emit_json(v)
        return
    output.info(f"height {v['height']}")
    _render_book("In force", v["in_force"])
    for w in v["waiting"]:
        output.warning(f"rulebook #{w['serial']} takes effect at height {w['effective_height']}")
    if v["proposal"]:
        p = v["proposal"]
        loosens = "; ".join(p["loosens"]) or "nothing (it only tightens)"
        output.info(f"open proposal: rulebook #{p['serial']}, effective at {p['effective_height']}; loosens {loosens}")


@rules.command("propose")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--effective-height",
    type=click.IntRange(0, 499_999_999),
    help="From which block it applies (default: the earliest allowed: at once when it only tightens, "
    "else the tip plus the current rulebook's loosening delay).",
)
@json_option
@pass_app
@example("custody rules propose rules.json")
def rules_propose(app: AppContext, file: Path, effective_height: int | None, as_json: bool) -> None:
    """Propose the next rulebook: FILE is a JSON object of the sections to change (as `rules show
    --json` prints them under "rules"; allowlist entries may give an "address"). Every operator
    and notification recipient is told; nothing changes until m founders sign it and it is applied."""
    changes = load_json(read_file(file, MAX_RULEBOOK_BYTES, "rules file"), MAX_RULEBOOK_BYTES, "rules file")
    if not isinstance(changes, dict):
        raise InputError(f"{file}: the rules are a JSON object of rulebook sections")
    book, looser = rulebook_lib.propose(
        app.db, app.settings, chain_backend(app), changes, effective_height=effective_height
    )
    if as_json:
        output.emit_json(rulebook_lib.book_view(book, book.network) | {"loosens": looser})
        return
    _render_rules(f"Proposed rulebook #{book.serial}", rulebook_lib.rules_view(book.rules, book.network))
    if looser:
        output.warning(f"it loosens: {'; '.join(looser)}; it takes effect at height {book.effective_height}")
    output.success(
        f"rulebook #{book.serial} proposed (effective at height {book.effective_height}): "
        "`custody rules export --out FILE` for the founders"
    )


@rules.command("check")
@click.argument("withdrawal_id", type=int)
@json_option
@pass_app
@example("custody rules check 7")
def rules_check(app: AppContext, withdrawal_id: int, as_json: bool) -> None:
    """Which rulebook and tier a withdrawal falls under, what it still needs, and every rule it breaks."""
    v = wd.rule_check(app.db, withdrawal_id)
    if as_json:
        output.emit_json(v)
        return
    book = f"rulebook #{v['rulebook']}" if v["rulebook"] else "the built-in rules"
    output.info(f"withdrawal #{withdrawal_id} ({v['status']}) under {book} at height {v['height']}")
    output.table(
        "Approvals",
        ["withdrawal", "tier", "because", "needed", "approved by", "still needed"],
        [
            (
                f"#{w['withdrawal_id']}",
                w["tier"],
                w["why"],
                w["approvals_needed"],
                ", ".join(w["approved_by"]) or "nobody",
                w["still_needed"],
            )
            for w in v["withdrawals"]
        ],
    )
    for x in v["violations"]:
        output.warning(f"rule {x['rule']}: {x['detail']}")
    if v["allowed"]:
        output.success("the rules allow it")


def _rules_export(app: AppContext, current: bool) -> dict[str, Any]:
    return rulebook_lib.export_document(app.db, app.settings, current)


def _read_rulebook(file: Path) -> object:
    return load_json(read_file(file, MAX_RULEBOOK_BYTES * 2, "rulebook"), MAX_RULEBOOK_BYTES * 2, "rulebook")


def _rulebook_to_sign(pinned: roster_lib.Trust, file: Path) -> ToSign:
    raw = _read_rulebook(file)
    book = parse_rulebook(raw)
    if book.manifest != pinned.newest.digest or book.network != pinned.policy.network.name:
        raise InputError(
            "this rulebook belongs to another founders' manifest than the newest one pinned here: do not sign it"
        )
    before = raw.get("previous_rulebook") if isinstance(raw, dict) else None
    previous = parse_rulebook(before) if before else None
    if previous is not None and previous.digest != book.previous:
        raise InputError("the rulebook given as the previous one is not the one this rulebook follows")
    looser = (
        loosened(previous.rules if previous else DEFAULT_RULES, book.rules) if previous or book.serial == 1 else None
    )

    def show() -> None:
        _render_rules(f"Rulebook #{book.serial}", rulebook_lib.rules_view(book.rules, book.network))
        output.info(f"proposed at height {book.proposed_height}, in force from height {book.effective_height}")
        if looser is None:
            output.warning("the file does not carry the previous rulebook: what this one loosens cannot be shown")
        elif looser:
            output.warning(f"it loosens: {'; '.join(looser)}")

    return ToSign(book.serial, show, partial(sign_rulebook, book), {"previous_rulebook": before})


def _rules_apply(app: AppContext, file: Path) -> tuple[dict[str, Any], str]:
    doc = _read_rulebook(file)
    if isinstance(doc, dict):
        doc.pop("previous_rulebook", None)  # shown to the founders; the chain in the store is what counts
    data = json.dumps(doc).encode()
    load_rulebook(data)  # a clear error for a malformed file before the store is opened
    book, looser = rulebook_lib.apply(app.db, app.settings, data)
    view = {
        "serial": book.serial,
        "digest": book.digest,
        "effective_height": book.effective_height,
        "signed_by": sorted(book.signatures),
        "loosens": looser,
    }
    message = (
        f"rulebook #{book.serial} applied (signed by {', '.join(sorted(book.signatures))}); "
        f"in force from height {book.effective_height}"
    )
    return view, message


add_document_commands(
    rules,
    DocumentKind(
        group="rules",
        noun="rulebook",
        example_file="rulebook-2.json",
        discard=rulebook_lib.discard,
        export=_rules_export,
        export_help="Write the open proposal (or, with --current, the newest applied rulebook), with the\n"
        "rulebook before it so that a founder sees what changes.",
        out_help="Where to write it for the founders (never overwritten).",
        current_help="Write the newest applied rulebook instead.",
        read_to_sign=_rulebook_to_sign,
        sign_help="Offline: show the rulebook (and what it loosens against the one before, when the file\n"
        "carries it) and add your founder's signature to FILE. Checked against the manifest pinned here.",
        apply=_rules_apply,
        apply_help="Apply a rulebook m founders signed: the next in the chain; a loosening one only when it was\n"
        "proposed here and takes effect no earlier than the current rulebook's delay allows.",
        read_to_pin=_read_rulebook,
        pin=pin_rulebook,
        pin_help="Offline: remember a founders' rulebook on this signer machine now, so that no PSBT under an\n"
        "older rulebook (or none) is signed here (checked against the manifest pinned here).",
    ),
)


COMMANDS = [rules]
