"""``custody status``: is custody running, and what waits on people."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from custody.errors import UNKNOWN_EXIT, StorageError
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, pass_app
from custody_cli.helptext import SummaryGroup

if TYPE_CHECKING:
    from custody.chain.types import ChainBackend

NODE_EXIT = 8


@click.group(cls=SummaryGroup, invoke_without_command=True)
@click.option("--all", "all_incidents", is_flag=True, help="Every incident ever, not only open and recent ones.")
@json_option
@pass_app
@example("custody status --json")
def status(app: AppContext, all_incidents: bool, as_json: bool) -> None:
    """Whether custody is operational: the halt, the node, sync, withdrawals waiting on people,
    reserves against liabilities, the halt file's lease, open and recent incidents.

    Exit 0 operational, 3 halted (or the halt file tells the trading engine to stop), 8 the
    node cannot be reached, 9 no store yet (run `custody init`), 10 unknown (the store is
    locked by another process). The node is given CUSTODY_STATUS_NODE_TIMEOUT seconds
    (default 5) to answer before it is reported unreachable.
    """
    if click.get_current_context().invoked_subcommand is not None:
        return  # `custody status publish`, below
    from custody.chain.backend import status_node_timeout
    from custody.service import health
    from custody.store.db import redact

    if not _store_exists(app):
        raise StorageError(f"no custody store at {redact(app.settings.db_url)}: run `custody init MANIFEST` first")
    timeout = status_node_timeout(app.settings)  # a malformed value is refused before anything is read
    view = health.operator_status(app.db, app.settings, lambda: _node(app, timeout), all_incidents=all_incidents)
    if as_json:
        output.emit_json(view)
    else:
        _show(view)
    click.get_current_context().exit(_exit_code(view))


def _node(app: AppContext, timeout: float) -> ChainBackend:
    """The chain backend, for the policy's network read without the write lock (a reader never
    waits behind a writer), given ``timeout`` seconds to answer."""
    from custody.chain.backend import backend_for
    from custody.control.wallet import policy_from_session

    with app.db.transaction(read_only=True) as s:
        network = policy_from_session(s).network.name
    return backend_for(app.settings, network, timeout=timeout)


def _store_exists(app: AppContext) -> bool:
    """False only when there is certainly no store; an unreadable one is the view's to report
    (halted, exit 3), as the halt state reads it."""
    try:
        return app.db.exists()
    except StorageError:
        return True


def _exit_code(view: dict[str, Any]) -> int:
    if view["halted"] is None:  # the store is locked elsewhere: unknown, as `halt status` says
        return UNKNOWN_EXIT
    if view["halted"] or view["halt_file"]["halted"] is not False:
        return 3
    remaining = view["halt_file"]["remaining_seconds"]
    if remaining is not None and remaining < 0:
        return 3
    return 0 if view["node"]["reachable"] else NODE_EXIT


def _show(view: dict[str, Any]) -> None:
    output.line("custody: operational" if view["operational"] else "custody: NOT OPERATIONAL", style="bold")
    for problem in view["problems"]:
        output.line(f"  - {problem}")
    node, sync, waiting, lease = view["node"], view["sync"], view["withdrawals"], view["halt_file"]
    reserves = view["reserves"]
    output.key_values(
        "Status",
        [
            ("node", f"height {node['height']}" if node["reachable"] else f"unreachable: {node['error']}"),
            ("synced to", _synced(sync)),
            (
                "withdrawals waiting",
                f"{waiting['approvals']} for approvals, {waiting['signatures']} for signatures, "
                f"{waiting['broadcast']} for broadcast",
            ),
            ("reserves", _reserves(reserves)),
            ("halt file", _lease(lease)),
        ],
    )
    output.table("Components", ["component", "status"], list(view["components"].items()))
    for inc in view["incidents"]:
        output.table(
            f"Incident #{inc['id']} [{inc['status']}] {inc['title']}",
            ["at", "status", "by", "message"],
            [(u["at"], u["status"], u["actor"], u["message"]) for u in inc["updates"]],
        )


def _synced(sync: dict[str, Any]) -> str:
    if sync["height"] is None:
        return "nothing recorded from the chain yet"
    behind = "" if sync["behind"] is None else f", {output.plural(sync['behind'], 'block')} behind the node"
    return f"height {sync['height']}{behind} (last change {sync['at'] or 'never'})"


def _reserves(reserves: dict[str, Any] | None) -> str:
    if reserves is None:
        return "never audited (custody audit reserves)"
    verdict = "ok" if reserves["ok"] else "SHORT"
    return (
        f"{reserves['reserves_sat']} sat against {reserves['liabilities_sat']} sat of liabilities "
        f"({reserves['difference_sat']:+d} sat, {verdict}) at height {reserves['height']}, audited {reserves['at']}"
    )


def _lease(lease: dict[str, Any]) -> str:
    if lease["halted"] is None:
        return f"{lease['path']}: missing or unreadable (the trading engine stops)"
    state = "halted" if lease["halted"] else "running"
    left = lease["remaining_seconds"]
    validity = "no lease" if left is None else (f"{left} s left" if left >= 0 else f"EXPIRED {-left} s ago")
    return f"{state}, valid until {lease['valid_until']} ({validity})"


@status.command("publish")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@json_option
@pass_app
@example("custody status publish /var/www/status")
def status_publish(app: AppContext, directory: Path, as_json: bool) -> None:
    """Write the status page (index.html, status.json, status.atom) into DIRECTORY for a public host."""
    from custody.service import status_page

    written = status_page.publish(app.db, directory)
    if as_json:
        output.emit_json({"written": [str(p) for p in written]})
        return
    output.success(f"status page written: {', '.join(str(p) for p in written)}")


COMMANDS = [status]
