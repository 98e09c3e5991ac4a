"""``custody serve``: the HTTP API for the exchange's backend, metrics and the status page."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import click

from custody.errors import InputError
from custody.identity.webauthn import check_origin
from custody.service import auth
from custody.service import workers as workers_lib
from custody.service.api import ServiceConfig, check_identity, create_app
from custody_cli import output
from custody_cli.context import AppContext, KeyRef, employee_key, example, identity_options, pass_app


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CUSTODY_SERVICE_SECRET_FILE",
    help="The secret clients sign requests with (first line, 16 bytes or more). [env: CUSTODY_SERVICE_SECRET_FILE]",
)
@click.option(
    "--window",
    type=click.FloatRange(1, 3600),
    default=auth.WINDOW,
    show_default=True,
    help="Seconds a signed request's timestamp may differ from the server's clock.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, workers_lib.MAX_WORKERS),
    default=1,
    show_default=True,
    help="Processes answering on the one port (a key file and a node needed above 1).",
)
@click.option(
    "--console-origin",
    metavar="URL",
    help="Serve the approval console (/console/) for browsers at this origin, e.g. https://custody.internal "
    "or http://localhost:8080 (the origin security keys are registered for in the roster).",
)
@identity_options
@pass_app
@example(
    "custody serve --as exchange-svc --key svc.key --secret-file api.secret --port 8080   "
    "(CUSTODY_PASSPHRASE or --passphrase-file for the key)"
)
def serve(
    app: AppContext,
    host: str,
    port: int,
    secret_file: Path | None,
    window: float,
    workers: int,
    console_origin: str | None,
    employee: str,
    key_file: KeyRef,
    passphrase_file: Path | None,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json) until SIGTERM or Ctrl-C.

    --as names the service's own roster employee, which must hold the request role and no
    other; its key signs the withdrawals the service requests. --workers N forks N processes
    that share the port (the store serializes what must be, as for several instances).
    """
    if secret_file is None:
        raise InputError("no request secret: give --secret-file or CUSTODY_SERVICE_SECRET_FILE")
    secret = auth.read_secret(secret_file)
    key = employee_key(key_file, passphrase_file)
    check_identity(app.db, app.settings, employee, key)
    workers_lib.check_forkable(workers, app.settings, key)
    if console_origin is not None:
        console_origin = check_origin(console_origin, urlsplit(console_origin).hostname or "")
    config = ServiceConfig(app.settings, app.db, secret, employee, key, window=window, console_origin=console_origin)

    processes = f", {workers} workers" if workers > 1 else ""
    output.info(f"custody serve: http://{host}:{port} as {employee}{processes} (OpenAPI: /openapi.json)")
    if console_origin:
        output.info(f"approval console: {console_origin}/console/ (keep it on the staff network)")
    workers_lib.serve(
        lambda: create_app(config),
        app.db,
        host=host,
        port=port,
        workers=workers,
        log_level=os.environ.get("CUSTODY_SERVE_LOG_LEVEL", "warning"),
    )


COMMANDS = [serve]
