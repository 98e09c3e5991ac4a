"""``custody halt ...``.

`halt status` is what a trading engine polls: this module imports the ORM (through
custody.control.halt) only in the commands that need it, and `halt status` reads the SQLite
store without it (custody.control.halt_light) wherever that gives the full path's answer."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from custody.config import parse_lease
from custody.control.halt_state import HaltState
from custody.errors import UNKNOWN_EXIT, StorageError
from custody_cli import output
from custody_cli.context import (
    NOTHING_TO_DELIVER,
    AppContext,
    KeyRef,
    employee_key,
    example,
    identity_options,
    json_option,
    pass_app,
)
from custody_cli.helptext import SummaryGroup


@click.group(cls=SummaryGroup)
def halt() -> None:
    """The trading halt: raise it, read it, lift it (two employees)."""


@halt.command("status")
@json_option
@pass_app
@example("custody halt status --json")
def halt_status(app: AppContext, as_json: bool) -> None:
    """Exit 0 when trading may run, 3 when halted (also when the state cannot be read), 10 when
    unknown: the store is locked elsewhere right now (the halt file is left to its lease)."""
    state = _status(app)
    if as_json:
        output.emit_json(state.to_dict())
    elif state.error:
        output.error(state.error + (" (trading: UNKNOWN)" if state.unknown else ""))
    elif not state.halted:
        output.line("trading: running", style="green")
    else:
        output.line("trading: HALTED", style="bold red")
    if state.halts and not as_json:
        output.table(
            "Active halts",
            ["id", "raised", "by", "source", "reason", "lift signatures"],
            [
                (
                    h["id"],
                    h["raised_at"],
                    h["raised_by"],
                    h["source"],
                    h["reason"] + (f" [{h['problem']}]" if h.get("problem") else ""),
                    ", ".join(h["lift_signatures"]) or "-",
                )
                for h in state.halts
            ],
        )
    if state.pending and not as_json:
        output.table(
            "Halts waiting in the halt file for the store",
            ["requested", "by", "source", "reason"],
            [(p.get("at"), p.get("actor"), p.get("source"), p.get("reason")) for p in state.pending],
        )
    for w in state.warnings:
        output.warning(w)
    click.get_current_context().exit(UNKNOWN_EXIT if state.unknown else 3 if state.halted else 0)


def _status(app: AppContext) -> HaltState:
    """The light read (no ORM) where it answers, else the full path's. Either way: the halt file
    written, the hook run, the log's head witnessed; the notification step after the command
    is skipped only where the light read saw no recipient (it has nothing to do then)."""
    if app.settings.halt_light and app._db is None:
        from custody.control import halt_light

        published = halt_light.publish(app.settings)
        if published is not None:
            if not published.notify:
                click.get_current_context().find_root().meta[NOTHING_TO_DELIVER] = True
            return published.state
    from custody.control import halt as halt_lib

    return halt_lib.publish(app.db, app.settings)


@halt.command("watch")
@click.option(
    "--interval",
    type=click.FloatRange(0.05, 3600),
    default=2.0,
    show_default=True,
    help="Seconds between two reads of the store.",
)
@click.option(
    "--lease",
    type=str,
    default=None,
    help="Seconds each write of the halt file holds (valid_until); longer than the interval. "
    "[default: $CUSTODY_HALT_LEASE, else 60]",
)
@pass_app
@example("custody halt watch --interval 2 --lease 30   (run it as a service on every operator machine)")
def halt_watch(app: AppContext, interval: float, lease: str | None) -> None:
    """Keep this machine's halt file fresh from the store until SIGTERM or Ctrl-C.

    Every interval it replays halts waiting in the halt file, reads the store and rewrites
    the file with a new lease; the hook runs when the state changes. Exit 0 when stopped.
    """
    seconds = parse_lease(lease, "--lease") if lease is not None else app.settings.halt_lease
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    last_warnings: list[str] = []

    def report(state: HaltState, changed: bool) -> None:
        nonlocal last_warnings
        if changed:
            where = f"audit entry {state.seq}" if state.seq is not None else "store not read"
            verdict = "HALTED" if state.halted else "running"
            output.info(f"trading: {verdict} ({where}; halt file {app.settings.halt_file})")
        if state.warnings != last_warnings:
            for w in state.warnings:
                output.warning(w)
            last_warnings = list(state.warnings)

    from custody.control import halt as halt_lib

    try:
        halt_lib.watch(app.db, app.settings, interval=interval, lease=seconds, stop=stop.wait, report=report)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    output.info("halt watch stopped")


@halt.command("raise")
@click.option("--reason", required=True, help="Why trading must stop.")
@identity_options
@json_option
@pass_app
@example("custody halt raise --reason 'suspicious withdrawal' --as alice --key alice.key")
def halt_raise(
    app: AppContext, reason: str, employee: str, key_file: KeyRef, passphrase_file: Path | None, as_json: bool
) -> None:
    """Halt trading now. Any single registered employee may do it."""
    from custody.control import halt as halt_lib

    key = employee_key(key_file, passphrase_file)
    result = halt_lib.raise_by_employee(app.db, app.settings, employee, key, reason)
    for w in result.state.warnings:
        output.warning(w)
    if as_json:
        output.emit_json(
            {
                "halt_id": result.id,
                "stored": result.stored,
                "engine_halted": result.engine_halted,
                "problems": list(result.problems),
                "state": result.state.to_dict(),
            }
        )
    if not result.stored or not result.engine_halted:
        raise StorageError(result.describe())
    if not as_json:
        output.line(f"halt #{result.id} raised: trading is halted", style="bold red")


@halt.command("lift")
@click.argument("halt_id", type=int)
@identity_options
@json_option
@pass_app
@example("custody halt lift 1 --as alice --key alice.key   (then a second employee)")
def halt_lift(
    app: AppContext, halt_id: int, employee: str, key_file: KeyRef, passphrase_file: Path | None, as_json: bool
) -> None:
    """Sign the lift of one halt; it lifts when two distinct employees have signed."""
    from custody.control import halt_lift as lift_lib

    key = employee_key(key_file, passphrase_file)
    result = lift_lib.lift(app.db, app.settings, halt_id, employee, key)
    if result.state:
        for w in result.state.warnings:
            output.warning(w)
    if as_json:
        output.emit_json(
            {"halt_id": halt_id, "signers": result.signers, "lifted": result.lifted, "needed": result.needed}
        )
        return
    if result.lifted:
        output.line(f"halt #{halt_id} lifted by {' and '.join(result.signers)}", style="green")
    else:
        output.line(
            f"halt #{halt_id}: {len(result.signers)} of {result.needed} lift signatures "
            f"({', '.join(result.signers) or 'none valid'}); still halted"
        )


COMMANDS = [halt]
