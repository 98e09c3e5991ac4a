"""``custody incident ...``: incidents on the status view."""

from __future__ import annotations

import click

from custody.control import incidents
from custody_cli import output
from custody_cli.context import AppContext, example, pass_app
from custody_cli.helptext import SummaryGroup


@click.group(cls=SummaryGroup)
def incident() -> None:
    """Incidents on the status view: every halt opens one."""


@incident.command("update")
@click.argument("incident_id", type=int)
@click.option("--status", required=True, type=click.Choice(list(incidents.STATUSES)), help="The new status.")
@click.option("--message", required=True, help="What is known now.")
@click.option("--as", "actor", default="operator", show_default=True, help="Who writes the update.")
@pass_app
@example("custody incident update 1 --status identified --message 'tampered row found'")
def incident_update(app: AppContext, incident_id: int, status: str, message: str, actor: str) -> None:
    """Add a timestamped update to an incident's timeline."""
    incidents.update_incident(app.db, incident_id, status, message, actor)
    output.success(f"incident #{incident_id}: {status}")


COMMANDS = [incident]
