"""What every command shares: settings resolved once, the store opened lazily, options."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from custody.config import Settings
from custody.db import Database
from custody.errors import InputError, KeyFileError
from custody.keyfile import EmployeeKey, FounderKey, open_employee_key, open_founder_key

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class AppContext:
    settings: Settings
    _db: Database | None = field(default=None, repr=False)

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self.settings.db_url)
        return self._db


pass_app = click.make_pass_decorator(AppContext)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the data as JSON.")(f)


def passphrase_options(f: F) -> F:
    f = click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Read the key file's passphrase from this file (first line). Else $CUSTODY_PASSPHRASE, else a prompt.",
    )(f)
    return f


def read_passphrase(passphrase_file: Path | None, *, confirm: bool = False, what: str = "key file") -> str:
    """The passphrase from a file, then CUSTODY_PASSPHRASE, then a prompt; never an argument."""
    if passphrase_file is not None:
        try:
            text = passphrase_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot read passphrase file {passphrase_file}: {exc.strerror}") from None
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise InputError(f"passphrase file {passphrase_file} is empty")
        return lines[0]
    env = os.environ.get("CUSTODY_PASSPHRASE")
    if env:
        return env
    try:
        value: str = click.prompt(f"Passphrase for the {what}", hide_input=True, confirmation_prompt=confirm, err=True)
    except click.Abort:
        raise InputError("no passphrase given (use a prompt, --passphrase-file or CUSTODY_PASSPHRASE)") from None
    return value


def identity_options(f: F) -> F:
    """``--as NAME --key FILE``: the acting employee and their key file."""
    f = passphrase_options(f)
    f = click.option(
        "--key",
        "key_file",
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="The employee's encrypted key file.",
    )(f)
    f = click.option("--as", "employee", required=True, help="The acting employee's name.")(f)
    return f


def employee_key(key_file: Path, passphrase_file: Path | None) -> EmployeeKey:
    if not key_file.exists():
        raise KeyFileError(f"key file {key_file} does not exist")
    return open_employee_key(key_file, read_passphrase(passphrase_file, what=f"employee key {key_file.name}"))


def founder_key(key_file: Path, passphrase_file: Path | None) -> FounderKey:
    if not key_file.exists():
        raise KeyFileError(f"key file {key_file} does not exist")
    return open_founder_key(key_file, read_passphrase(passphrase_file, what=f"founder key {key_file.name}"))


def example(text: str) -> Callable[[F], F]:
    """Append an example to a command's help."""

    def wrap(f: F) -> F:
        doc = (f.__doc__ or "").rstrip()
        f.__doc__ = f"{doc}\n\n\b\nExample:\n  {text}\n"
        return f

    return wrap
