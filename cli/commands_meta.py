"""``custody version``: what is installed, for bug reports and for scripts."""

from __future__ import annotations

import platform

import click

from custody import __version__
from custody_cli import output
from custody_cli.context import example, json_option


@click.command("version")
@json_option
@example("custody version --json")
def version(as_json: bool) -> None:
    """The version of custody, of the store format it writes and of Python (also `custody -V`)."""
    from custody.store.models import SCHEMA_VERSION

    data = {
        "name": "custody",
        "version": __version__,
        "schema_version": SCHEMA_VERSION,
        "python": platform.python_version(),
    }
    if as_json:
        output.emit_json(data)
        return
    output.line(f"custody {__version__} (store schema {SCHEMA_VERSION}, Python {data['python']})")


COMMANDS = [version]
