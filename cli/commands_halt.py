"""``custody halt ...``, ``custody incident ...`` and ``custody status``."""

from __future__ import annotations

from pathlib import Path

import click

from custody.control import halt as halt_lib
from custody_cli import output
from custody_cli.context import (
    AppContext,
    KeyRef,
    employee_key,
    example,
    identity_options,
    json_option,
    pass_app,
)


@click.group()
def halt() -> None:
    """The trading halt: raise it, read it, lift it (two employees)."""


@halt.command("status")
@json_option
@pass_app
@example("custody halt status --json")
def halt_status(app: AppContext, as_json: bool) -> None:
    """Exit 0 when trading may run, 3 when halted (also when the state cannot be read)."""
    state = halt_lib.publish(app.db, app.settings)
    if as_json:
        output.emit_json(state.to_dict())
    elif state.error:
        output.error(state.error)
    elif not state.halted:
        output.line("trading: running", style="green")
    else:
        output.line("trading: HALTED", style="bold red")
        output.table(
            "Active halts",
            ["id", "raised", "by", "source", "reason", "lift signatures"],
            [
                (
                    h["id"],
                    h["raised_at"],
                    h["raised_by"],
                    h["source"],
                    h["reason"],
                    ", ".join(h["lift_signatures"]) or "-",
                )
                for h in state.halts
            ],
        )
    for w in state.warnings:
        output.warning(w)
    click.get_current_context().exit(3 if state.halted else 0)


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
    key = employee_key(key_file, passphrase_file)
    result = halt_lib.raise_by_employee(app.db, app.settings, employee, key, reason)
    for w in result.state.warnings:
        output.warning(w)
    if as_json:
        output.emit_json({"halt_id": result.id, "state": result.state.to_dict()})
        return
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
    key = employee_key(key_file, passphrase_file)
    result = halt_lib.lift(app.db, app.settings, halt_id, employee, key)
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


@click.group()
def incident() -> None:
    """Incidents on the status view: every halt opens one."""


@incident.command("update")
@click.argument("incident_id", type=int)
@click.option("--status", required=True, type=click.Choice(list(halt_lib.STATUSES)), help="The new status.")
@click.option("--message", required=True, help="What is known now.")
@click.option("--as", "actor", default="operator", show_default=True, help="Who writes the update.")
@pass_app
@example("custody incident update 1 --status identified --message 'tampered row found'")
def incident_update(app: AppContext, incident_id: int, status: str, message: str, actor: str) -> None:
    """Add a timestamped update to an incident's timeline."""
    halt_lib.update_incident(app.db, incident_id, status, message, actor)
    output.success(f"incident #{incident_id}: {status}")


@click.command()
@json_option
@pass_app
@example("custody status")
def status(app: AppContext, as_json: bool) -> None:
    """The status view: each component operational or halted, open and recent incidents."""
    view = halt_lib.status_view(app.db)
    if as_json:
        output.emit_json(view)
        click.get_current_context().exit(3 if view["halted"] else 0)
    if view["error"]:
        output.error(view["error"])
    output.table("Components", ["component", "status"], list(view["components"].items()))
    for inc in view["incidents"]:
        output.table(
            f"Incident #{inc['id']} [{inc['status']}] {inc['title']}",
            ["at", "status", "by", "message"],
            [(u["at"], u["status"], u["actor"], u["message"]) for u in inc["updates"]],
        )
    click.get_current_context().exit(3 if view["halted"] else 0)


COMMANDS = [halt, incident, status]
