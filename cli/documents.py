"""The commands every founders-signed document shares (``custody roster`` and ``custody rules``):
discard, export, sign, apply and pin, defined once by :func:`add_document_commands` over what
differs between the documents (:class:`DocumentKind`); and the helpers of the commands that
read, write and sign founders' files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from custody.control import epochs
from custody.control import roster as roster_lib
from custody.errors import Conflict, InputError
from custody.files import read_bounded, write_atomic
from custody.identity.founders_documents import Founders, FoundersDocument
from custody.identity.keyfile import FounderKey
from custody.policy.manifest import MAX_MANIFEST_BYTES, SignedManifest, load_signed_manifest
from custody.store.db import Database
from custody.withdraw.signer import SignerState, state_path
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

F = TypeVar("F", bound=Callable[..., Any])


def read_file(path: Path, limit: int, what: str) -> bytes:
    try:
        return read_bounded(path, limit, what)
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None


def read_manifest_file(path: Path) -> SignedManifest:
    return load_signed_manifest(read_file(path, MAX_MANIFEST_BYTES, "manifest"))


def write_new(path: Path, text: str, *, overwrite: bool = False) -> None:
    if path.exists() and not overwrite:
        raise Conflict(f"{path} exists already; not overwritten")
    write_atomic(path, text)


def yes_option(f: Any) -> Any:
    return click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")(f)


def confirm(question: str, yes: bool) -> None:
    """Ask on a terminal; refuse (exit 2) off a terminal unless --yes was given."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise InputError("not a terminal, so nobody confirmed: review the output above and pass --yes")
    if not click.confirm(question, default=False, err=True):
        raise InputError("not confirmed; nothing was signed")


def show_founders(title: str, v: dict[str, Any]) -> None:
    """The founders of a manifest's view (who signed, their keys), then its problems."""
    output.table(
        title,
        ["name", "signed", "account xpub"],
        [(f["name"], "yes" if f["signed"] else "NO", f["xpub"]) for f in v["founders"]],
    )
    for p in v["problems"]:
        output.warning(p)


def founder_pairs(founders: tuple[str, ...]) -> list[tuple[str, str]]:
    """``--founder NAME=XPUB`` options as (name, key) pairs. Raises InputError."""
    pairs = []
    for text in founders:
        name, sep, key = text.partition("=")
        if not sep or not name or not key:
            raise InputError(f"--founder takes NAME=XPUB, got {text[:40]!r}")
        pairs.append((name, key))
    return pairs


def signing_founder(pinned: roster_lib.Trust, key: FounderKey) -> str:
    """The pinned manifest's founder whose account key ``key`` is. Raises InputError."""
    newest = pinned.newest.policy  # after a key rotation, only the newest founders sign
    mine = [f.name for f in newest.founders if f.key.xpub.identity() == key.account.xpub.identity()]
    if not mine:
        raise InputError("your key is not one of the founders' keys of the newest manifest pinned here")
    return mine[0]


@dataclass(frozen=True)
class ToSign:
    """A document read for signing: what a founder is shown, and how it is signed."""

    serial: int
    show: Callable[[], None]
    """Render it for the founder (not called with --json)."""
    sign: Callable[[str, Any, Founders], FoundersDocument]
    """Add the signature of (founder's name, account private key, founders)."""
    beside: dict[str, Any] = field(default_factory=dict)
    """Written beside the signed document in the file (the rulebook before it)."""


@dataclass(frozen=True)
class DocumentKind:
    """What differs between the founders-signed documents whose commands are alike."""

    group: str
    """The command group: ``roster``, ``rules``."""
    noun: str
    """The document, in messages and the exported file's key: ``roster``, ``rulebook``."""
    example_file: str
    discard: Callable[[Database], FoundersDocument]
    export: Callable[[AppContext, bool], dict[str, Any]]
    export_help: str
    out_help: str
    current_help: str
    read_to_sign: Callable[[roster_lib.Trust, Path], ToSign]
    sign_help: str
    apply: Callable[[AppContext, Path], tuple[dict[str, Any], str]]
    """Apply the file: its JSON view and the success message."""
    apply_help: str
    read_to_pin: Callable[[Path], object]
    pin: Callable[[object, SignedManifest, SignerState, Sequence[SignedManifest]], FoundersDocument]
    pin_help: str


def _doc(text: str) -> Callable[[F], F]:
    """Give a command defined in a factory its help (before ``example`` appends to it)."""

    def wrap(f: F) -> F:
        f.__doc__ = text
        return f

    return wrap


def add_document_commands(group: click.Group, kind: DocumentKind) -> None:
    """Add discard, export, sign, apply and pin for ``kind`` to ``group``."""
    for add in (_discard, _export, _sign, _apply, _pin):
        add(group, kind, f"custody {kind.group}")


def _discard(group: click.Group, kind: DocumentKind, cmd: str) -> None:
    @group.command("discard")
    @pass_app
    @example(f"{cmd} discard")
    @_doc("Drop the open proposal (nothing it proposed was ever in force).")
    def discard(app: AppContext) -> None:
        doc = kind.discard(app.db)
        output.success(f"proposal for {kind.noun} #{doc.serial} discarded")


def _export(group: click.Group, kind: DocumentKind, cmd: str) -> None:
    @group.command("export")
    @out_file_option(kind.out_help)
    @click.option("--current", is_flag=True, help=kind.current_help)
    @pass_app
    @example(f"{cmd} export --out {kind.example_file}")
    @_doc(kind.export_help)
    def export(app: AppContext, out_file: Path, current: bool) -> None:
        doc = kind.export(app, current)
        write_new(out_file, json.dumps(doc, indent=2) + "\n")
        output.success(f"{kind.noun} #{doc[kind.noun]['serial']} written to {out_file}")


def _sign(group: click.Group, kind: DocumentKind, cmd: str) -> None:
    @group.command("sign")
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
    @founder_key_option
    @yes_option
    @passphrase_options
    @json_option
    @pass_app
    @example(f"{cmd} sign {kind.example_file} --key founder-a.key")
    @_doc(kind.sign_help)
    def sign(
        app: AppContext, file: Path, key_file: Path, yes: bool, passphrase_file: Path | None, as_json: bool
    ) -> None:
        pinned = roster_lib.load_trust(app.settings)
        doc = kind.read_to_sign(pinned, file)
        key = founder_key(key_file, passphrase_file)
        me = signing_founder(pinned, key)
        if not as_json:
            doc.show()
        confirm(f"Sign {kind.noun} #{doc.serial} as {me}?", yes)
        signed = doc.sign(me, key.master.derive(key.account_path).private_key(), pinned.founders)
        write_atomic(file, json.dumps(signed.to_document() | doc.beside, indent=2) + "\n")
        complete = not pinned.governance.problems(signed)
        if as_json:
            output.emit_json({"serial": signed.serial, "signed_by": sorted(signed.signatures), "complete": complete})
            return
        output.success(
            f"{me} signed {kind.noun} #{signed.serial} ({output.plural(len(signed.signatures), 'signature')})"
        )


def _apply(group: click.Group, kind: DocumentKind, cmd: str) -> None:
    @group.command("apply")
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
    @json_option
    @pass_app
    @example(f"{cmd} apply {kind.example_file}")
    @_doc(kind.apply_help)
    def apply(app: AppContext, file: Path, as_json: bool) -> None:
        view, message = kind.apply(app, file)
        if as_json:
            output.emit_json(view)
            return
        output.success(message)


def _pin(group: click.Group, kind: DocumentKind, cmd: str) -> None:
    @group.command("pin")
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
    @json_option
    @pass_app
    @example(f"{cmd} pin {kind.example_file.replace('-2.', '-3.')}")
    @_doc(kind.pin_help)
    def pin(app: AppContext, file: Path, as_json: bool) -> None:
        pinned = read_manifest_file(app.settings.manifest).check()
        state = SignerState.load(state_path(app.settings.manifest), pinned)
        rotations = epochs.read_rotations(epochs.rotations_path(app.settings))  # re-checked by the signer
        doc = kind.pin(kind.read_to_pin(file), pinned, state, rotations)
        if as_json:
            output.emit_json({"serial": doc.serial, "digest": doc.digest, "state": str(state.path)})
            return
        output.success(f"{kind.noun} #{doc.serial} pinned on this signer ({state.path})")
