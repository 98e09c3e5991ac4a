"""``custody node start|status|stop`` through the CLI, in process, with a real node."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from custody.chain.regtest import stop_node
from tests.support import Custody
from tests.test_operator_schemas import _validator

pytestmark = pytest.mark.regtest


@pytest.fixture
def custody(tmp_path: Path) -> Iterator[Custody]:
    runner = Custody(tmp_path / "home")
    try:
        yield runner
    finally:
        stop_node(tmp_path / "home" / "node")  # whatever the test left running


def test_start_status_stop(custody: Custody) -> None:
    datadir = (custody.home / "node").resolve()
    stopped = custody("node", "status")
    assert stopped.exit_code == 8, stopped.output
    assert "not running" in stopped.stdout

    started = custody("node", "start", "--json")
    assert started.exit_code == 0, started.output
    info = json.loads(started.stdout)
    assert info["datadir"] == str(datadir)
    assert info["rpc_url"].startswith("http://127.0.0.1:")

    status = custody.json("node", "status")
    assert status["running"] is True and status["chain"] == "regtest" and status["pid"] == info["pid"]
    assert isinstance(status["blocks"], int)
    assert not list(_validator("node-status").iter_errors(status))
    # a fresh start prints the node's status, as a start that found it running does (tests/test_operator_schemas.py)
    assert info["already_running"] is False and info["running"] is True and info["chain"] == "regtest"
    assert not list(_validator("node-start").iter_errors(info))
    shown = custody("node", "status")
    assert shown.exit_code == 0 and info["rpc_url"] in shown.stdout

    again = custody("node", "start")
    assert again.exit_code == 0, again.output  # idempotent: the one node of the data directory
    assert "already runs" in again.stderr and str(info["pid"]) in again.stderr
    same = custody.json("node", "start")
    assert same["already_running"] is True and same["pid"] == info["pid"]

    stop = custody("node", "stop")
    assert stop.exit_code == 0, stop.output
    assert "stopped" in stop.stderr
    after = custody("node", "status", "--json")
    assert after.exit_code == 8
    assert json.loads(after.stdout)["running"] is False
    idle = custody("node", "stop")
    assert idle.exit_code == 0 and "no node was running" in idle.stderr


def test_datadir_from_option_and_environment(custody: Custody, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    assert custody("node", "status", "--datadir", str(elsewhere), "--json").exit_code == 8
    custody.env["CUSTODY_NODE_DATADIR"] = str(elsewhere)
    result = custody("node", "status", "--json")
    assert result.exit_code == 8
    assert json.loads(result.stdout)["datadir"] == str(elsewhere.resolve())


@pytest.mark.parametrize("command", ["start", "stop", "status"])
def test_every_node_command_has_help_with_an_example(custody: Custody, command: str) -> None:
    result = custody("node", command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout and f"custody node {command}" in result.stdout


def test_readme_lists_the_node_commands() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for command in ("start", "stop", "status"):
        assert f"| `custody node {command}" in readme
    for variable in ("CUSTODY_NODE_URL", "CUSTODY_NODE_COOKIE", "CUSTODY_NODE_AUTH", "CUSTODY_NODE_DATADIR"):
        assert variable in readme
