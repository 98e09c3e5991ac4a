"""The ``custody`` command: global options, error handling and the command groups."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import click

from custody import __version__
from custody.config import Settings
from custody.control import halt_file, witness
from custody.errors import CustodyError
from custody_cli import output
from custody_cli.context import AppContext

JSON_ERRORS = "custody.json"  # ctx.meta: the command line has --json, so errors are JSON too


class CustodyGroup(click.Group):
    """Turns library errors into a message on stderr and their stable exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        if "--json" in ctx.args:  # before parsing, so that usage errors are JSON too
            ctx.meta[JSON_ERRORS] = True
        try:
            result = super().invoke(ctx)
            _witness(ctx)
        except CustodyError as exc:
            if os.environ.get("CUSTODY_DEBUG") == "1":
                traceback.print_exc()
            code = exc.exit_code
            if not ctx.meta.get(JSON_ERRORS):
                output.error(str(exc))
            if not isinstance(exc, witness.WitnessMismatch):
                code = _witness_after_error(ctx, code)
            if ctx.meta.get(JSON_ERRORS):
                output.error_json(str(exc), code or 1)
            _after_command(ctx)  # a halt raised by the command exits 3: its notification goes first
            ctx.exit(code)
        except click.exceptions.Exit as exit_:
            code = _witness_after_error(ctx, exit_.exit_code)
            _after_command(ctx)  # e.g. `halt status` exits 3 on its own
            if code != exit_.exit_code:
                ctx.exit(code)
            raise
        except click.ClickException as exc:  # usage errors: exit 2
            if not ctx.meta.get(JSON_ERRORS):
                raise
            output.error_json(exc.format_message(), exc.exit_code)
            ctx.exit(exc.exit_code)
        except click.Abort:
            raise
        except KeyboardInterrupt:
            _error(ctx, "interrupted", 130)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
            if os.environ.get("CUSTODY_DEBUG") == "1":
                traceback.print_exc()
            _error(ctx, f"internal error: {type(exc).__name__}: {exc} (set CUSTODY_DEBUG=1 for the traceback)", 1)
            ctx.exit(1)
        _after_command(ctx)
        return result


def _error(ctx: click.Context, message: str, code: int) -> None:
    """An error as text on stderr, or as JSON on stdout when the command was given --json."""
    if ctx.meta.get(JSON_ERRORS):
        output.error_json(message, code)
    else:
        output.error(message)


def _witness(ctx: click.Context) -> None:
    """After a command that opened the store: the log against the local witness, then its head
    appended there (raises WitnessMismatch, exit 3, after halting trading on a mismatch)."""
    app = ctx.find_object(AppContext)
    if app is None or app._db is None:
        return
    warning = witness.after_command(app._db, app.settings)
    if warning:
        output.warning(warning)


def _witness_after_error(ctx: click.Context, code: int) -> int:
    """The witness step after a command that failed or exited by itself: exit 3 on a mismatch."""
    try:
        _witness(ctx)
    except CustodyError as exc:
        output.error(str(exc))
        return exc.exit_code
    return code


def _after_command(ctx: click.Context) -> None:
    """Deliver pending notifications, best effort: never raises, never changes the exit code."""
    from custody_cli.commands_notify import after_command

    after_command(ctx)


@click.group(cls=CustodyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="custody")
@click.option(
    "--home", envvar="CUSTODY_HOME", help="Data directory (default ~/.local/share/custody). [env: CUSTODY_HOME]"
)
@click.option(
    "--db",
    "db_url",
    envvar="CUSTODY_DB_URL",
    help="Database URL: sqlite:///PATH or postgresql://... (default: SQLite in the data directory). "
    "[env: CUSTODY_DB_URL]",
)
@click.option(
    "--halt-file",
    envvar="CUSTODY_HALT_FILE",
    help="Where the halt state is mirrored for the trading engine (default HOME/halt.json). [env: CUSTODY_HALT_FILE]",
)
@click.option(
    "--manifest",
    "manifest",
    envvar="CUSTODY_MANIFEST",
    help="The pinned founders' manifest issuance verifies against (default HOME/founders-manifest.json). "
    "[env: CUSTODY_MANIFEST]",
)
@click.pass_context
def cli(ctx: click.Context, home: str | None, db_url: str | None, halt_file: str | None, manifest: str | None) -> None:
    """Multisig custody and withdrawal approval for an exchange's cold storage.

    Exit codes: 0 ok, 1 error, 2 bad input, 3 halted or address mismatch, 4 approval rule
    broken, 5 not found, 6 conflict, 7 key file, 8 node, 9 storage.

    \b
    Example:
      custody --home ./vault status
    """
    ctx.obj = AppContext(Settings.load(home=home, db_url=db_url, halt_file=halt_file, manifest=manifest))
    _replay_halts(ctx.obj)


def _replay_halts(app: AppContext) -> None:
    """Halts waiting in the halt file (the store was down) reach the store before any command.

    One read of the halt file when none waits. The store still down: a warning, and the halt
    file keeps saying halted.
    """
    if not halt_file.pending(app.settings.halt_file):
        return
    from custody.control import halt as halt_lib

    state = halt_lib.publish(app.db, app.settings, hook=None)
    for w in state.warnings:
        output.warning(w)


def _register() -> None:
    from custody_cli import (
        commands_address,
        commands_audit,
        commands_db,
        commands_halt,
        commands_keys,
        commands_ledger,
        commands_node,
        commands_notify,
        commands_policy,
        commands_qr,
        commands_rotate,
        commands_rules,
        commands_serve,
        commands_trust,
        commands_utxo,
        commands_verify,
        commands_withdraw,
        demo,
    )

    for module in (
        commands_keys,
        commands_trust,
        commands_rules,
        commands_policy,
        commands_rotate,
        commands_address,
        commands_halt,
        commands_verify,
        commands_node,
        commands_withdraw,
        commands_qr,
        commands_utxo,
        commands_ledger,
        commands_audit,
        commands_notify,
        commands_db,
        commands_serve,
        demo,
    ):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    try:
        cli.main(prog_name="custody", standalone_mode=True)
    except SystemExit as exc:
        sys.exit(exc.code)
