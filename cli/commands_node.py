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
from custody_cli.helptext import SummaryGroup

F = TypeVar("F", bound=Callable[..., Any])


def datadir_option(f: F) -> F:
    return click.option(
        "--datadir",
        type=click.Path(file_okay=False, path_type=Path),
        help="The node's data directory (default HOME/node). [env: CUSTODY_NODE_DATADIR]",
    )(f)


def _datadir(app: AppContext, datadir: Path | None) -> Path:
    return datadir if datadir is not None else app.settings.node_datadir


@click.group(cls=SummaryGroup)
def node() -> None:
    """A regtest node on loopback (bitcoind, or litecoind): start, stop, status; fund and mine
    (also on the embedded chain).

    Other networks' nodes are reached with CUSTODY_NODE_URL and CUSTODY_NODE_COOKIE
    (or CUSTODY_NODE_AUTH), never started by custody.
    """


@node.command("start")
@datadir_option
@json_option
@pass_app
@example("custody node start --datadir ./regtest-node")
def node_start(app: AppContext, datadir: Path | None, as_json: bool) -> None:
    """Start a regtest node listening on 127.0.0.1 only, on free ports; nothing to do (exit 0)
    when one already runs and answers in the data directory. --json: the node's status (as
    `node status` prints it) and "already_running"."""
    path = _datadir(app, datadir)
    current = node_status(path)
    if current["running"] and current["error"] is None:
        if as_json:
            output.emit_json(current | {"already_running": True})
        else:
            output.info(f"a node already runs in {current['datadir']} (pid {current['pid']}, {current['rpc_url']})")
        return
    info = start_node(path, binary=find_node_binary(app.settings.node_binary))
    if as_json:  # one shape either way: the node's status, and whether this command started it
        output.emit_json(node_status(path) | {"already_running": False})
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


def _regtest_backend(app: AppContext) -> Any:
    from custody.chain.backend import backend_for

    return backend_for(app.settings, "regtest")


@node.command("fund")
@click.argument("address")
@click.argument("amount")
@json_option
@pass_app
@example("custody node fund bcrt1q... 0.5")
def node_fund(app: AppContext, address: str, amount: str, as_json: bool) -> None:
    """Regtest only: pay AMOUNT BTC to ADDRESS (a bcrt1/2... address, as custody prints them)
    from custody's faucet, and mine one block so that it confirms.

    The faucet is the chain custody uses (CUSTODY_CHAIN): the node, or the embedded chain.
    Blocks are mined to it first when it has no mature coins.
    """
    from custody.bitcoin.amounts import format_btc, parse_btc_amount
    from custody.bitcoin.destinations import parse_destination
    from custody.bitcoin.network import get_network
    from custody.chain.faucet import fund

    dest = parse_destination(address, get_network("regtest"))
    funded = fund(_regtest_backend(app), dest.script_pubkey, parse_btc_amount(amount))
    data = {"txid": funded.txid, "address": dest.address, "amount_sat": funded.amount, "fee_sat": funded.fee}
    data["block"] = funded.block
    if as_json:
        output.emit_json(data)
        return
    output.line(funded.txid)
    output.success(f"{format_btc(funded.amount)} BTC paid to {dest.address}, confirmed in block {funded.block}")


@node.command("mine")
@click.argument("blocks", type=click.IntRange(1, 10_000))
@click.option("--to", "address", help="Pay the coinbases to this address (default: custody's faucet).")
@json_option
@pass_app
@example("custody node mine 6")
def node_mine(app: AppContext, blocks: int, address: str | None, as_json: bool) -> None:
    """Regtest only: mine BLOCKS blocks on the chain custody uses (the node, or the embedded
    chain with CUSTODY_CHAIN=embedded, whose blocks libbitcoinkernel validates)."""
    from custody.bitcoin.destinations import parse_destination
    from custody.bitcoin.network import get_network
    from custody.chain.faucet import mine

    spk = parse_destination(address, get_network("regtest")).script_pubkey if address else None
    backend = _regtest_backend(app)
    hashes = mine(backend, blocks, spk)
    if as_json:
        output.emit_json({"blocks": hashes, "height": backend.tip_height()})
        return
    for h in hashes:
        output.line(h)
    output.success(f"{output.plural(len(hashes), 'block')} mined; the tip is at height {backend.tip_height()}")


COMMANDS = [node]
