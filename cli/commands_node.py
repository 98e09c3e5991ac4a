"""``custody node ...``: a regtest node on loopback for trials, demos and tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from custody.chain.regtest import find_node_binary, node_status, start_node, stop_node
from custody.errors import NodeError
from custody_cli import output
from custody_cli.context import AppContext, example, json_option, pass_app

F = TypeVar("F", bound=Callable[..., Any])


def datadir_option(f: F) -> F:
    return click.option(
        "--datadir",
        type=click.Path(file_okay=False, path_type=Path),
        help="The node's data directory (default HOME/node). [env: CUSTODY_NODE_DATADIR]",
    )(f)


def _datadir(app: AppContext, datadir: Path | None) -> Path:
    return datadir if datadir is not None else app.settings.node_datadir


@click.group()
def node() -> None:
    """A regtest node on loopback (bitcoind, or litecoind): start, stop, status.

    Other networks' nodes are reached with CUSTODY_NODE_URL and CUSTODY_NODE_COOKIE
    (or CUSTODY_NODE_AUTH), never started by custody.
    """


@node.command("start")
@datadir_option
@json_option
@pass_app
@example("custody node start --datadir ./regtest-node")
def node_start(app: AppContext, datadir: Path | None, as_json: bool) -> None:
    """Start a regtest node listening on 127.0.0.1 only, on free ports."""
    info = start_node(_datadir(app, datadir), binary=find_node_binary(app.settings.node_binary))
    if as_json:
        output.emit_json(info.to_json())
        return
    output.key_values(
        "Node",
        [("datadir", info.datadir), ("pid", info.pid), ("rpc_url", info.rpc_url), ("version", info.version)],
    )
    output.success(f"regtest node started (pid {info.pid})")


@node.command("stop")
@datadir_option
@pass_app
@example("custody node stop")
def node_stop(app: AppContext, datadir: Path | None) -> None:
    """Stop the node (RPC stop, then signals); no error when none runs."""
    path = _datadir(app, datadir)
    if stop_node(path):
        output.success(f"node in {path} stopped")
    else:
        output.info(f"no node was running in {path}")


@node.command("status")
@datadir_option
@json_option
@pass_app
@example("custody node status --json")
def node_status_command(app: AppContext, datadir: Path | None, as_json: bool) -> None:
    """Exit 0 when the node runs, 8 when it does not."""
    status = node_status(_datadir(app, datadir))
    if as_json:
        output.emit_json(status)
    elif status["running"]:
        output.key_values("Node", [(k, v) for k, v in status.items() if k not in ("running", "error")])
    else:
        output.line(f"node: not running ({status['datadir']})")
    if status["error"]:
        output.warning(status["error"])
    click.get_current_context().exit(0 if status["running"] else NodeError.exit_code)


COMMANDS = [node]
