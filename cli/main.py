"""The ``custody`` command: global options, error handling and the command groups."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any

import click

from custody import __version__
from custody.config import Settings
from custody.control import halt_file
from custody.errors import CustodyError
from custody_cli.context import NOTHING_TO_DELIVER, AppContext
from custody_cli.helptext import SUMMARY_LIMIT

JSON_ERRORS = "custody.json"  # ctx.meta: the command line has --json, so errors are JSON too

COMMAND_INDEX: dict[str, tuple[str, str]] = {
    # command: (module of custody_cli that defines it, its one-line summary for `custody --help`)
    # A command's module (and the library it needs: the ORM, the kernel, GnuPG, PKCS#11, the
    # web server) is imported only when that command runs, so `custody --help`, `-V` and
    # `halt status` start fast. tests/test_startup.py fails when this index and the commands'
    # own help disagree, and prints the line to put here.
    "address": ("commands_address", "Deposit addresses: issue (verified before they are shown), list, show, export."),
    "audit": ("commands_audit", "Audits: the ledger, reserves against liabilities, the liabilities tree."),
    "db": ("commands_db", "The store's database (PostgreSQL)."),
    "demo": ("demo", "Run the custody story end to end in a fresh directory (SQLite, regtest, no server)."),
    "employee": (
        "commands_keys",
        "Employees: each signs requests, approvals and halt lifts with a key of the founders' roster.",
    ),
    "halt": ("commands_halt", "The trading halt: raise it, read it, lift it (two employees)."),
    "incident": ("commands_incident", "Incidents on the status view: every halt opens one."),
    "init": (
        "commands_policy",
        "Create the store from the founders-signed manifest (never overwrites one); pin it here.",
    ),
    "keygen": ("commands_keys", "Create a founder key and print its account xpub for the key ceremony."),
    "ledger": ("commands_ledger", "The double-entry ledger: every account sums to zero after every event."),
    "manifest": (
        "commands_trust",
        "The founders-signed manifest: drafted once, signed by every founder, pinned everywhere.",
    ),
    "node": (
        "commands_node",
        "A regtest node on loopback (bitcoind, or litecoind): start, stop, status; fund and mine "
        "(also on the embedded chain).",
    ),
    "notify": ("commands_notify", "Signed notifications: PGP-signed mail and HMAC-signed webhooks of custody events."),
    "policy": ("commands_policy", "The wallet policy: show it, its descriptors, and the founders' manifest."),
    "roster": (
        "commands_trust",
        "The founders-signed employee roster: proposed online, signed offline by m founders, applied.",
    ),
    "qr": ("commands_qr", "Carry PSBTs as animated QR codes (BBQr): screen to camera, no cable, no USB stick."),
    "rotate": ("commands_rotate", "Key rotation: a new founders' quorum, approved by the current one."),
    "rules": (
        "commands_rules",
        "The founders-signed rulebook: approval tiers, limits, velocity, trusted destinations, fees.",
    ),
    "serve": ("commands_serve", "Serve the HTTP API (OpenAPI at /openapi.json) until SIGTERM or Ctrl-C."),
    "sign": (
        "commands_withdraw",
        "Review and sign a withdrawal PSBT offline with a founder key (no store, no node needed).",
    ),
    "status": (
        "commands_status",
        "Whether custody is operational: the halt, the node, sync, withdrawals waiting on people, reserves "
        "against liabilities, the halt file's lease, open and recent incidents.",
    ),
    "sync": ("commands_withdraw", "Follow withdrawals to confirmation and credit deposits from the chain."),
    "version": (
        "commands_meta",
        "The version of custody, of the store format it writes and of Python (also `custody -V`).",
    ),
    "utxo": ("commands_utxo", "Custody's coins on the chain, and consolidating many small ones."),
    "verify": ("commands_verify", "Independent verification (auditors)."),
    "withdraw": (
        "commands_withdraw",
        "The withdrawal queue: request, approve (two employees), export, import, finalize, broadcast.",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands are imported when one runs (:data:`COMMAND_INDEX`).

    ``commands`` (every command, e.g. for the docs test or the man page) imports them all;
    running, completing or listing them imports only what is needed.
    """

    @property
    def commands(self) -> MutableMapping[str, click.Command]:
        for name in COMMAND_INDEX:
            self._load(name)
        return self._commands

    @commands.setter
    def commands(self, value: MutableMapping[str, click.Command]) -> None:
        self._commands = dict(value)

    def _load(self, name: str) -> click.Command | None:
        if name not in self._commands and name in COMMAND_INDEX:
            module = importlib.import_module(f"custody_cli.{COMMAND_INDEX[name][0]}")
            for command in module.COMMANDS:
                self._commands.setdefault(command.name or "", command)
        return self._commands.get(name)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        self._commands[name or cmd.name or ""] = cmd

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self._commands) | set(COMMAND_INDEX))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the index: no command module imported for ``--help``."""
        names = self.list_commands(ctx)
        limit = SUMMARY_LIMIT  # whole summaries, wrapped by the formatter, never cut with "..."
        rows = []
        for name in names:
            cmd = self._commands.get(name) or click.Command(name, help=COMMAND_INDEX[name][1])
            if not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class CustodyGroup(LazyGroup):
    """Turns library errors into a message on stderr and their stable exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        from custody_cli import output  # here, not at the top: `--help` and `-V` never reach invoke

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
            if type(exc).__name__ != "WitnessMismatch":  # custody.control.witness's, not imported for this
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
            _usage_error(ctx, _place_global_option(exc))
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


GLOBAL_OPTIONS = ("--home", "--db", "--halt-file", "--manifest")


def _place_global_option(exc: click.ClickException) -> click.ClickException:
    """`custody sign FILE --manifest F`: the usage error says a global option goes before the command."""
    if not isinstance(exc, click.NoSuchOption) or exc.option_name not in GLOBAL_OPTIONS:
        return exc
    name = exc.option_name
    env = "CUSTODY_DB_URL" if name == "--db" else "CUSTODY_" + name.lstrip("-").replace("-", "_").upper()
    return click.UsageError(
        f"{name} is a global option: give it before the command (custody {name} VALUE COMMAND ...) or set {env}",
        ctx=exc.ctx,
    )


def _usage_error(ctx: click.Context, exc: click.ClickException) -> None:
    """A usage error: click's text on stderr, or one JSON line under --json; exit 2."""
    if not ctx.meta.get(JSON_ERRORS):
        raise exc
    from custody_cli import output

    output.error_json(exc.format_message(), exc.exit_code)
    ctx.exit(exc.exit_code)


def _error(ctx: click.Context, message: str, code: int) -> None:
    """An error as text on stderr, or as JSON on stdout when the command was given --json."""
    from custody_cli import output

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
    from custody.control import witness
    from custody_cli import output

    warning = witness.after_command(app._db, app.settings)
    if warning:
        output.warning(warning)


def _witness_after_error(ctx: click.Context, code: int) -> int:
    """The witness step after a command that failed or exited by itself: exit 3 on a mismatch."""
    try:
        _witness(ctx)
    except CustodyError as exc:
        from custody_cli import output

        output.error(str(exc))
        return exc.exit_code
    return code


def _after_command(ctx: click.Context) -> None:
    """Deliver pending notifications, best effort: never raises, never changes the exit code.
    Skipped where the command found no recipient (the light `halt status`)."""
    if ctx.meta.get(NOTHING_TO_DELIVER):
        return
    from custody_cli.commands_notify import after_command

    after_command(ctx)


@click.group(cls=CustodyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="custody")
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
    from custody_cli import output

    state = halt_lib.publish(app.db, app.settings, hook=None)
    for w in state.warnings:
        output.warning(w)


def main() -> None:
    try:
        cli.main(prog_name="custody", standalone_mode=True)
    except SystemExit as exc:
        sys.exit(exc.code)
