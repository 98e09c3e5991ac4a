"""``custody keygen`` and ``custody employee ...``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from custody.bitcoin.network import NETWORKS, get_network
from custody.bitcoin.script import parse_script_type
from custody.control import roster as roster_lib
from custody.errors import Conflict, InputError
from custody.files import read_bounded
from custody.identity import words as words_lib
from custody.identity.employee_keys import parse_pkcs11_uri
from custody.identity.keyfile import check_passphrase, create_employee_key, create_founder_key, write_founder_key
from custody.identity.pkcs11_keys import generate_token_key
from custody.identity.roster import check_name
from custody.identity.words import seed_from_words
from custody.policy.origins import standard_path
from custody_cli import output
from custody_cli.context import (
    AppContext,
    KeyRef,
    employee_key,
    example,
    identity_options,
    json_option,
    out_file_option,
    pass_app,
    passphrase_options,
    pin_file_option,
    read_passphrase,
    read_pin,
    script_type_option,
)
from custody_cli.helptext import SummaryGroup


@click.command()
@click.argument("name")
@out_file_option("Where to write the encrypted key file (never overwritten).")
@click.option(
    "--network",
    default="regtest",
    show_default=True,
    type=click.Choice(list(NETWORKS)),
    help="The network the key is for.",
)
@script_type_option(
    "Script type of the account key: m/48'/coin'/0'/2' for p2wsh, /1' for p2sh-p2wsh (BIP-48), m/45' for p2sh (BIP-45)."
)
@click.option(
    "--mnemonic",
    "with_words",
    is_flag=True,
    help="Make the seed from 24 new BIP-39 words, shown once on the terminal (stderr) to write down.",
)
@click.option("--restore", is_flag=True, help="Recreate the key file from BIP-39 words (prompt or --words-file).")
@click.option(
    "--words-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --restore: read the words from this file instead of a prompt.",
)
@passphrase_options
@json_option
@example(
    "custody keygen founder-a --out founder-a.key --network regtest --mnemonic\n"
    "  custody keygen founder-a --out founder-a.key --network regtest --restore"
)
def keygen(
    name: str,
    out_file: Path,
    network: str,
    script_type: str,
    with_words: bool,
    restore: bool,
    words_file: Path | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Create a founder key and print its account xpub for the key ceremony.

    The BIP-32 master comes from the OS's randomness, or with --mnemonic from 24 BIP-39 words
    shown once on this terminal (never on stdout, in a file or with --json), or with --restore
    from words you give. It is written encrypted (scrypt + ChaCha20-Poly1305); the passphrase
    comes from --passphrase-file, CUSTODY_PASSPHRASE or a prompt.
    """
    if with_words and restore:
        raise InputError("--mnemonic makes new words, --restore reads existing ones: give one")
    if words_file is not None and not restore:
        raise InputError("--words-file goes with --restore")
    if out_file.exists():
        raise Conflict(f"{out_file} exists already; key files are never overwritten")
    if with_words and not sys.stderr.isatty():
        raise InputError("--mnemonic shows the words on a terminal only: run it with stderr on a terminal")
    net = get_network(network)
    path = standard_path(net, parse_script_type(script_type))
    if restore:
        seed = seed_from_words(_read_words(words_file))
        passphrase = read_passphrase(passphrase_file, confirm=True, what="restored founder key")
        key = write_founder_key(out_file, name, net, passphrase, seed, seed_source=words_lib.SOURCE, account_path=path)
    elif with_words:
        passphrase = read_passphrase(passphrase_file, confirm=True, what="new founder key")
        check_passphrase(passphrase)
        phrase = words_lib.new_words()
        _show_words(phrase)
        if not click.confirm("Have you written the 24 words down, in order?", default=False, err=True):
            raise InputError("not confirmed; no key file was written (the words shown are void)")
        seed = seed_from_words(phrase)
        del phrase
        key = write_founder_key(out_file, name, net, passphrase, seed, seed_source=words_lib.SOURCE, account_path=path)
    else:
        passphrase = read_passphrase(passphrase_file, confirm=True, what="new founder key")
        key = create_founder_key(out_file, name, net, passphrase, account_path=path)
    if as_json:
        output.emit_json(
            {
                "name": name,
                "network": network,
                "xpub": str(key.account),
                "file": str(out_file),
                "seed": words_lib.SOURCE if (with_words or restore) else "random",
            }
        )
        return
    output.line(str(key.account))
    output.success(f"founder key {name} written to {out_file}; publish the line above for the ceremony")


def _show_words(phrase: str) -> None:
    """The words, numbered, on stderr (a terminal: checked by the caller); never logged."""
    words = phrase.split()
    err = sys.stderr
    err.write("\nWrite these 24 words down, in order, and keep them offline. They are shown once.\n\n")
    for row in range(0, len(words), 4):
        err.write("  ".join(f"{i + 1:2d}. {words[i]:<9}" for i in range(row, row + 4)) + "\n")
    err.write("\n")
    err.flush()


def _read_words(words_file: Path | None) -> str:
    """The words from a file (all of it, at most 1 KiB) or a hidden prompt on the terminal."""
    if words_file is not None:
        try:
            data = read_bounded(words_file, 1024, "words file")
        except FileNotFoundError:
            raise InputError(f"words file {words_file} does not exist") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"words file {words_file} is not UTF-8 text") from None
    try:
        text: str = click.prompt("The BIP-39 words, separated by spaces", hide_input=True, err=True)
    except click.Abort:
        raise InputError("no words given (use the prompt or --words-file)") from None
    return text


@click.group(cls=SummaryGroup)
def employee() -> None:
    """Employees: each signs requests, approvals and halt lifts with a key of the founders' roster.

    Adding, disabling or re-enabling an employee only ever proposes the next roster: nothing
    changes until m founders sign it offline (`custody roster sign`) and it is applied.
    """


roles_option = click.option(
    "--roles", default="request,approve,lift", show_default=True, help="Roles to propose: request, approve, lift."
)


def _proposed(app: AppContext, change: roster_lib.Change, as_json: bool, data: dict[str, object]) -> None:
    r = roster_lib.propose(app.db, app.settings, [change])
    if as_json:
        output.emit_json(data | {"proposed_roster": r.serial})
        return
    output.info(f"proposed for roster #{r.serial}: founders sign it (`custody roster export`), then it is applied")


@employee.command("keygen")
@click.argument("name")
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the encrypted key file (never overwritten).",
)
@click.option(
    "--pkcs11",
    "token_uri",
    metavar="URI",
    help=(
        "Generate the key on a PKCS#11 token instead, never extractable: "
        "'pkcs11:token=LABEL[;object=KEY]?module-path=/path/module.so' (object defaults to NAME)."
    ),
)
@click.option(
    "--propose/--no-propose",
    default=True,
    show_default=True,
    help="Also propose the employee for the next roster.",
)
@roles_option
@passphrase_options
@pin_file_option()
@json_option
@pass_app
@example(
    "custody employee keygen alice --out alice.key\n"
    "  custody employee keygen bob --pkcs11 'pkcs11:token=custody?module-path=/usr/lib/softhsm/libsofthsm2.so'"
)
def employee_keygen(
    app: AppContext,
    name: str,
    out_file: Path | None,
    token_uri: str | None,
    propose: bool,
    roles: str,
    passphrase_file: Path | None,
    pin_file: Path | None,
    as_json: bool,
) -> None:
    """Create an employee signing key (a key file, or a key generated on a PKCS#11 token); propose it."""
    check_name(name)
    role_list = roster_lib.parse_roles(roles)
    if (out_file is None) == (token_uri is None):
        raise InputError("give exactly one of --out FILE (a key file) or --pkcs11 URI (a key on a token)")
    if token_uri is not None:
        if passphrase_file is not None:
            raise InputError("--passphrase-file is for key files; a token's PIN comes from --pin-file")
        uri = parse_pkcs11_uri(token_uri)
        label = uri.object or name
        uri = uri.with_object(label)
        pin = read_pin(pin_file, what=f"token {uri.token}")
        pubkey = generate_token_key(uri.module_path, uri.token, label, pin, name=name).public_key
        where, place = str(uri), f"generated on token {uri.token}"
    else:
        assert out_file is not None
        if pin_file is not None:
            raise InputError("--pin-file is for keys on a token (--pkcs11); a key file takes --passphrase-file")
        passphrase = read_passphrase(passphrase_file, confirm=True, what="new employee key")
        pubkey = create_employee_key(out_file, name, passphrase).public_key
        where, place = str(out_file), f"written to {out_file}"
    data: dict[str, object] = {"name": name, "pubkey": pubkey.hex(), "uri" if token_uri else "file": where}
    if not as_json:
        output.line(pubkey.hex())
        output.success(f"employee key {name} {place}")
    if propose:
        _proposed(app, roster_lib.Change("add", name, pubkey.hex(), role_list), as_json, data)
    elif as_json:
        output.emit_json(data)


@employee.command("add")
@click.argument("name")
@click.option("--pubkey", required=True, help="The employee's compressed secp256k1 public key (hex).")
@roles_option
@json_option
@pass_app
@example("custody employee add bob --pubkey 02ab... --roles approve,lift")
def employee_add(app: AppContext, name: str, pubkey: str, roles: str, as_json: bool) -> None:
    """Propose an employee by public key for the next roster."""
    change = roster_lib.Change("add", check_name(name), pubkey, roster_lib.parse_roles(roles))
    _proposed(app, change, as_json, {"name": name, "pubkey": pubkey})


@employee.command("list")
@json_option
@pass_app
@example("custody employee list --json")
def employee_list(app: AppContext, as_json: bool) -> None:
    """List the employees of the roster in force: roles, enabled, suspended."""
    v = roster_lib.roster_view(app.db, app.settings)
    if as_json:
        output.emit_json(v["employees"])
        return
    output.table(
        f"Employees (roster #{v['serial'] or '-'})",
        ["name", "roles", "state", "public keys"],
        [
            (
                e["name"],
                ",".join(e["roles"]),
                "SUSPENDED" if e["suspended"] else ("enabled" if e["enabled"] else "DISABLED"),
                " ".join(e["keys"]),
            )
            for e in v["employees"]
        ],
    )


@employee.command("disable")
@click.argument("name")
@json_option
@pass_app
@example("custody employee disable bob")
def employee_disable(app: AppContext, name: str, as_json: bool) -> None:
    """Propose disabling an employee in the next roster (fast: `custody employee suspend`)."""
    _proposed(app, roster_lib.Change("disable", name), as_json, {"name": name})


@employee.command("enable")
@click.argument("name")
@json_option
@pass_app
@example("custody employee enable bob")
def employee_enable(app: AppContext, name: str, as_json: bool) -> None:
    """Propose enabling a disabled employee again in the next roster."""
    _proposed(app, roster_lib.Change("enable", name), as_json, {"name": name})


@employee.command("suspend")
@click.argument("name")
@click.option("--reason", required=True, help="Why (the same text for both signers).")
@identity_options
@json_option
@pass_app
@example("custody employee suspend carol --reason 'laptop stolen' --as alice --key alice.key")
def employee_suspend(
    app: AppContext,
    name: str,
    reason: str,
    employee: str,
    key_file: KeyRef,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Sign the suspension of an employee; in force at once when two roster employees signed it."""
    sus, active = roster_lib.suspend(
        app.db, app.settings, name, reason, employee, employee_key(key_file, passphrase_file)
    )
    if as_json:
        output.emit_json(sus.to_dict() | {"digest": sus.digest, "in_force": active})
        return
    if active:
        output.success(f"{name} is suspended (digest {sus.digest[:16]}); a later founders' roster may clear it")
    else:
        output.info(f"suspension of {name} signed by {employee}; a second employee signs the same reason to enforce it")


COMMANDS = [keygen, employee]
