"""What every command shares: settings resolved once, the store opened lazily, options."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from custody.config import Settings
from custody.errors import InputError, KeyFileError
from custody.files import SECRET_FILE_MAX, read_limited_text

if TYPE_CHECKING:  # imported where used: a command that opens no store or key loads neither
    from custody.identity.employee_keys import FileSigner, Pkcs11Uri
    from custody.identity.keyfile import FounderKey
    from custody.identity.pkcs11_keys import Pkcs11Signer
    from custody.store.db import Database

F = TypeVar("F", bound=Callable[..., Any])

NOTHING_TO_DELIVER = "custody.nothing_to_deliver"
"""ctx.meta: the command saw no notification recipient in the store: the notification step
after it (custody_cli.main) has nothing to do and is skipped."""


@dataclass
class AppContext:
    settings: Settings
    _db: Database | None = field(default=None, repr=False)

    @property
    def db(self) -> Database:
        if self._db is None:
            from custody.control import audit_log
            from custody.store.db import Database

            ctx = click.get_current_context(silent=True)
            if ctx is not None:  # the audit log names the command in every entry it appends
                audit_log.set_command(ctx.command_path.partition(" ")[2] or ctx.command_path)
            self._db = Database(
                self.settings.db_url, halt_file=self.settings.halt_file, manifest=self.settings.manifest
            )
        return self._db


pass_app = click.make_pass_decorator(AppContext)


def json_option(f: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help='Print the data as JSON; an error then prints {"error": MESSAGE, "code": EXIT_CODE} on stderr.',
    )(f)


def passphrase_options(f: F) -> F:
    f = click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Read the key file's passphrase from this file (first line). Else $CUSTODY_PASSPHRASE, else a prompt.",
    )(f)
    return f


def read_secret(
    secret_file: Path | None, *, kind: str, env_var: str, option: str, prompt: str, confirm: bool = False
) -> str:
    """A secret (passphrase, PIN) from a file's first line, then ``env_var``, then a prompt;
    never from a command-line argument. Raises InputError when none is given or readable."""
    if secret_file is not None:
        try:
            lines = read_limited_text(secret_file, SECRET_FILE_MAX, f"{kind} file").splitlines()
        except OSError as exc:
            raise InputError(f"cannot read {kind} file {secret_file}: {exc.strerror}") from None
        if not lines or not lines[0]:
            raise InputError(f"{kind} file {secret_file} is empty")
        return lines[0]
    env = os.environ.get(env_var)
    if env:
        return env
    try:
        value: str = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
    except click.Abort:
        raise InputError(f"no {kind} given (use a prompt, {option} or {env_var})") from None
    return value


def read_passphrase(passphrase_file: Path | None, *, confirm: bool = False, what: str = "key file") -> str:
    """A key file's passphrase: --passphrase-file, then CUSTODY_PASSPHRASE, then a prompt."""
    return read_secret(
        passphrase_file,
        kind="passphrase",
        env_var="CUSTODY_PASSPHRASE",
        option="--passphrase-file",
        prompt=f"Passphrase for the {what}",
        confirm=confirm,
    )


if TYPE_CHECKING:
    KeyRef = Path | Pkcs11Uri
    """Where an employee's key is: a key file, or a key on a PKCS#11 token."""
else:  # the same at run time, without importing the key modules for every command
    KeyRef = Any

_PIN_FILE = "custody.pin_file"


if TYPE_CHECKING:  # click 8.4 made ParamType generic; older clicks cannot subscript it at run time
    _KeyRefParam = click.ParamType[KeyRef, Any]
else:
    _KeyRefParam = click.ParamType


class KeyRefType(_KeyRefParam):
    """``--key``: a key file path, or a ``pkcs11:`` URI (RFC 7512) of a key on a token."""

    name = "FILE|URI"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> KeyRef:
        from custody.identity.employee_keys import Pkcs11Uri, is_pkcs11_uri, parse_pkcs11_uri

        if isinstance(value, Path | Pkcs11Uri):
            return value
        text = str(value)
        if is_pkcs11_uri(text):
            try:
                return parse_pkcs11_uri(text)
            except InputError as exc:
                self.fail(str(exc), param, ctx)
        return Path(text)


def pin_file_option(*, expose_value: bool = True) -> Callable[[F], F]:
    def remember(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
        ctx.meta[_PIN_FILE] = value
        return value

    return click.option(
        "--pin-file",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=expose_value,
        callback=remember,
        help="Read the token's user PIN from this file (first line). Else $CUSTODY_PKCS11_PIN, else a prompt.",
    )


def read_pin(pin_file: Path | None, *, what: str = "token") -> str:
    """The token PIN: --pin-file, then CUSTODY_PKCS11_PIN, then a prompt."""
    return read_secret(
        pin_file, kind="PIN", env_var="CUSTODY_PKCS11_PIN", option="--pin-file", prompt=f"User PIN of the {what}"
    )


def identity_options(f: F) -> F:
    """``--as NAME --key FILE|URI``: the acting employee and their key file or token key.

    ``--pin-file`` is not passed to the command: :func:`employee_key` reads it from the
    click context, so commands keep calling ``employee_key(key_file, passphrase_file)``.
    """
    f = passphrase_options(f)
    f = pin_file_option(expose_value=False)(f)
    f = click.option(
        "--key",
        "key_file",
        required=True,
        type=KeyRefType(),
        help=(
            "The employee's encrypted key file, or their key on a PKCS#11 token as a URI: "
            "'pkcs11:token=LABEL;object=KEY?module-path=/usr/lib/softhsm/libsofthsm2.so'."
        ),
    )(f)
    f = click.option("--as", "employee", required=True, help="The acting employee's name.")(f)
    return f


Who = tuple[str, KeyRef, Path | None]
"""The acting employee: ``--as``, ``--key`` and ``--passphrase-file``."""


def acting_options(f: Callable[..., None]) -> Callable[..., None]:
    """:func:`identity_options`, ``--json`` and the app (passed first) of a command that acts
    as an employee: it takes the identity as one ``who`` (:data:`Who`) and ``as_json``."""

    @functools.wraps(f)
    def command(
        app: AppContext, /, *args: Any, employee: str, key_file: KeyRef, passphrase_file: Path | None, **kwargs: Any
    ) -> None:
        f(app, *args, who=(employee, key_file, passphrase_file), **kwargs)

    return identity_options(json_option(pass_app(command)))


def employee_key(key_file: KeyRef, passphrase_file: Path | None) -> FileSigner | Pkcs11Signer:
    """Open the acting employee's key: decrypt a key file, or log in to the token.

    A key file takes --passphrase-file (or CUSTODY_PASSPHRASE, or a prompt); a token key
    takes --pin-file (or CUSTODY_PKCS11_PIN, or a prompt). Raises InputError for the other
    one's option, KeyFileError when the key cannot be opened.
    """
    from custody.identity.employee_keys import FileSigner, Pkcs11Uri
    from custody.identity.keyfile import open_employee_key
    from custody.identity.pkcs11_keys import Pkcs11Signer

    ctx = click.get_current_context(silent=True)
    pin_file: Path | None = ctx.meta.get(_PIN_FILE) if ctx is not None else None
    if isinstance(key_file, Pkcs11Uri):
        if passphrase_file is not None:
            raise InputError("--passphrase-file is for key files; a token key's PIN comes from --pin-file")
        if key_file.object is None:
            raise InputError("the pkcs11 URI names no key: add ;object=LABEL")
        pin = read_pin(pin_file, what=f"token {key_file.token}")
        return Pkcs11Signer(key_file.module_path, key_file.token, key_file.object, pin)
    if pin_file is not None:
        raise InputError("--pin-file is for keys on a token (--key pkcs11:...); a key file takes --passphrase-file")
    if not key_file.exists():
        raise KeyFileError(f"key file {key_file} does not exist")
    return FileSigner(
        open_employee_key(key_file, read_passphrase(passphrase_file, what=f"employee key {key_file.name}"))
    )


def out_file_option(help: str) -> Callable[[F], F]:
    """``--out FILE`` (required): where a command writes its file."""
    return click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path), help=help)


def script_type_option(help: str) -> Callable[[F], F]:
    """``--script TYPE`` (default p2wsh): how a policy's multisig script is wrapped."""
    from custody.bitcoin.script import ScriptType  # here: the commands without the option never load it

    return click.option(
        "--script",
        "script_type",
        default="p2wsh",
        show_default=True,
        type=click.Choice([t.value for t in ScriptType]),
        help=help,
    )


def founder_key_option(f: F) -> F:
    """``--key FILE``: a founder's encrypted key file (founders sign offline, never on a token here)."""
    return click.option(
        "--key",
        "key_file",
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="The founder's encrypted key file.",
    )(f)


def founder_key(key_file: Path, passphrase_file: Path | None) -> FounderKey:
    from custody.identity.keyfile import open_founder_key

    if not key_file.exists():
        raise KeyFileError(f"key file {key_file} does not exist")
    return open_founder_key(key_file, read_passphrase(passphrase_file, what=f"founder key {key_file.name}"))


def example(text: str) -> Callable[[F], F]:
    """Append an example to a command's help."""

    def wrap(f: F) -> F:
        # cleandoc first: the appended lines are not indented, so click's own cleandoc would
        # otherwise keep the docstring's indentation inside the sentences.
        doc = inspect.cleandoc(f.__doc__ or "").rstrip()
        f.__doc__ = f"{doc}\n\n\b\nExample:\n  {text}\n"
        return f

    return wrap
