"""``custody keygen`` and ``custody employee ...``."""

from __future__ import annotations

from pathlib import Path

import click

from custody.bitcoin.network import NETWORKS, get_network
from custody.bitcoin.script import ScriptType, parse_script_type
from custody.clock import iso
from custody.control.employees import add_employee, disable_employee, list_employees
from custody.errors import InputError
from custody.identity.employee_keys import parse_pkcs11_uri
from custody.identity.keyfile import create_employee_key, create_founder_key
from custody.identity.pkcs11_keys import generate_token_key
from custody_cli import output
from custody_cli.context import (
    AppContext,
    example,
    json_option,
    pass_app,
    passphrase_options,
    pin_file_option,
    read_passphrase,
    read_pin,
)


@click.command()
@click.argument("name")
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the encrypted key file (never overwritten).",
)
@click.option(
    "--network",
    default="regtest",
    show_default=True,
    type=click.Choice(list(NETWORKS)),
    help="The network the key is for.",
)
@click.option(
    "--script",
    "script_type",
    default="p2wsh",
    show_default=True,
    type=click.Choice([t.value for t in ScriptType if t.bip48_script_index is not None]),
    help="BIP-48 script type of the account key.",
)
@passphrase_options
@json_option
@example("custody keygen founder-a --out founder-a.key --network regtest")
def keygen(
    name: str, out_file: Path, network: str, script_type: str, passphrase_file: Path | None, as_json: bool
) -> None:
    """Create a founder key and print its account xpub for the key ceremony.

    The BIP-32 master comes from the OS's randomness and is written encrypted (scrypt +
    ChaCha20-Poly1305); the passphrase comes from --passphrase-file, CUSTODY_PASSPHRASE
    or a prompt.
    """
    index = parse_script_type(script_type).bip48_script_index or 2
    passphrase = read_passphrase(passphrase_file, confirm=True, what="new founder key")
    key = create_founder_key(out_file, name, get_network(network), passphrase, index)
    if as_json:
        output.emit_json({"name": name, "network": network, "xpub": str(key.account), "file": str(out_file)})
        return
    output.line(str(key.account))
    output.success(f"founder key {name} written to {out_file}; publish the line above for the ceremony")


@click.group()
def employee() -> None:
    """Employee identities: each signs approvals and halt lifts with a registered key."""


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
    "--register/--no-register", default=True, show_default=True, help="Also register the public key in the store."
)
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
    register: bool,
    passphrase_file: Path | None,
    pin_file: Path | None,
    as_json: bool,
) -> None:
    """Create an employee signing key (a key file, or a key generated on a PKCS#11 token); register it."""
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
    if register:
        add_employee(app.db, name, pubkey.hex())
    if as_json:
        key = "uri" if token_uri is not None else "file"
        output.emit_json({"name": name, "pubkey": pubkey.hex(), key: where, "registered": register})
        return
    output.line(pubkey.hex())
    output.success(f"employee key {name} {place}" + (" and registered" if register else ""))


@employee.command("add")
@click.argument("name")
@click.option("--pubkey", required=True, help="The employee's compressed secp256k1 public key (hex).")
@json_option
@pass_app
@example("custody employee add bob --pubkey 02ab...")
def employee_add(app: AppContext, name: str, pubkey: str, as_json: bool) -> None:
    """Register an employee by public key."""
    row = add_employee(app.db, name, pubkey)
    if as_json:
        output.emit_json({"name": row.name, "pubkey": row.pubkey, "enabled": row.enabled})
        return
    output.success(f"employee {row.name} registered")


@employee.command("list")
@json_option
@pass_app
@example("custody employee list --json")
def employee_list(app: AppContext, as_json: bool) -> None:
    """List employees and whether they are enabled."""
    rows = list_employees(app.db)
    data = [{"name": r.name, "pubkey": r.pubkey, "enabled": r.enabled, "created_at": iso(r.created_at)} for r in rows]
    if as_json:
        output.emit_json(data)
        return
    output.table(
        "Employees",
        ["name", "enabled", "public key", "created"],
        [(d["name"], "yes" if d["enabled"] else "DISABLED", d["pubkey"], d["created_at"]) for d in data],
    )


@employee.command("disable")
@click.argument("name")
@pass_app
@example("custody employee disable bob")
def employee_disable(app: AppContext, name: str) -> None:
    """Disable an employee: their approvals and lifts no longer count."""
    disable_employee(app.db, name)
    output.success(f"employee {name} disabled")


COMMANDS = [keygen, employee]
