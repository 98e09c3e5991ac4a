"""The regtest node helpers, against a real node (tests using it are marked ``regtest``)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from custody.chain.regtest import (
    STATE_FILE,
    NodeInfo,
    ensure_wallet,
    find_node_binary,
    node_status,
    start_node,
    stop_node,
)
from custody.chain.rpc import RpcClient, expect_chain
from custody.config import Settings
from custody.errors import Conflict, NodeError
from tests.support import Custody

MWEB_ACTIVATION_HEIGHT = 432  # litecoind's regtest; custody's node config keeps MWEB off


def raw_descriptor(rpc: RpcClient, script_hex: str) -> str:
    """``raw(SCRIPT)`` with the checksum the node computes."""
    return str(rpc.call("getdescriptorinfo", f"raw({script_hex})")["descriptor"])


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                address, port = local.split(":")
                if table == "tcp":
                    host = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
                else:
                    host = address  # any IPv6 listener is a failure below
                found.append((host, int(port, 16)))
    return found


def run_python(code: str, *args: str) -> str:
    """Run ``code`` in a second Python process and return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no parent reaped does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def fake_binary(tmp_path: Path, body: str) -> Path:
    """An executable that answers ``-version`` like a node and otherwise runs ``body``."""
    path = tmp_path / "fake-bitcoind"
    path.write_text('#!/bin/sh\nif [ "$1" = "-version" ]; then echo "Fake Core version v0.0.0"; exit 0; fi\n' + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --- the session's node ---------------------------------------------------------------


def test_node_is_on_regtest(regtest_node: NodeInfo, rpc: RpcClient) -> None:
    assert rpc.call("getblockchaininfo")["chain"] == "regtest"
    assert expect_chain(rpc, "regtest")["chain"] == "regtest"
    assert regtest_node.rpc_url == f"http://127.0.0.1:{regtest_node.rpc_port}"
    assert regtest_node.cookie_file == regtest_node.datadir / "regtest" / ".cookie"
    assert regtest_node.cookie_file.exists()


def test_expect_chain_refuses_a_wrong_chain(rpc: RpcClient) -> None:
    with pytest.raises(NodeError, match="is on chain 'regtest', expected 'main'") as caught:
        expect_chain(rpc, "main")
    assert caught.value.exit_code == 8


def test_node_listens_on_loopback_only(regtest_node: NodeInfo) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc to list the node's sockets")
    listening = listening_addresses(regtest_node.pid)
    ports = {port for _, port in listening}
    assert {regtest_node.rpc_port, regtest_node.p2p_port} <= ports
    assert all(host == "127.0.0.1" for host, _ in listening), listening


def test_mining_with_generatetodescriptor(rpc: RpcClient) -> None:
    op_true = raw_descriptor(rpc, "51")  # OP_TRUE: a script with no address at all
    height = rpc.call("getblockcount")
    hashes = rpc.call("generatetodescriptor", 3, op_true)
    assert len(hashes) == 3
    assert rpc.call("getblockcount") == height + 3
    coinbase = rpc.call("getblock", hashes[-1], 2)["tx"][0]
    assert coinbase["vout"][0]["scriptPubKey"]["hex"] == "51"


def test_funded_wallet_holds_a_mature_coinbase(funded_wallet: RpcClient) -> None:
    balance = funded_wallet.call("getbalance")
    assert isinstance(balance, Decimal)
    assert balance >= Decimal(50)
    assert funded_wallet.call("listunspent")


def test_mining_goes_on_past_litecoin_mweb_activation(rpc: RpcClient) -> None:
    height = rpc.call("getblockcount")
    target = MWEB_ACTIVATION_HEIGHT + 5
    if height < target:
        rpc.call("generatetodescriptor", target - height, raw_descriptor(rpc, "51"))
    assert rpc.call("getblockcount") >= target


def test_ensure_wallet_creates_once_and_reloads(rpc: RpcClient) -> None:
    wallet = ensure_wallet(rpc, "ensure me")
    assert wallet.call("getwalletinfo")["walletname"] == "ensure me"
    assert ensure_wallet(rpc, "ensure me").url == wallet.url
    rpc.call("unloadwallet", "ensure me")
    assert "ensure me" not in rpc.call("listwallets")
    assert ensure_wallet(rpc, "ensure me").call("getwalletinfo")["walletname"] == "ensure me"


def test_status_of_the_running_node(regtest_node: NodeInfo) -> None:
    status = node_status(regtest_node.datadir)
    assert status["running"] is True
    assert status["pid"] == regtest_node.pid
    assert status["chain"] == "regtest"
    assert isinstance(status["blocks"], int)
    assert status["rpc_url"] == regtest_node.rpc_url
    assert status["error"] is None


def test_a_second_node_in_the_same_datadir_is_refused(regtest_node: NodeInfo) -> None:
    with pytest.raises(Conflict, match="already runs"):
        start_node(regtest_node.datadir)


# --- nodes of their own -----------------------------------------------------------------

START = """
    import json, sys
    from pathlib import Path
    from custody.chain.regtest import find_node_binary, start_node
    from custody.config import Settings
    binary = find_node_binary(Settings.load().node_binary)
    print(json.dumps(start_node(Path(sys.argv[1]), binary=binary).to_json()))
"""
STOP = """
    import sys
    from pathlib import Path
    from custody.chain.regtest import stop_node
    print(stop_node(Path(sys.argv[1])))
"""


@pytest.mark.regtest
def test_another_process_stops_and_restarts_the_node(tmp_path: Path) -> None:
    datadir = tmp_path / "node"
    try:
        first = NodeInfo.from_json(json.loads(run_python(START, str(datadir))))
        assert node_status(datadir)["running"] is True
        op_true = raw_descriptor(first.client(), "51")
        first.client().call("generatetodescriptor", 2, op_true)
        blocks = first.client().call("getblockcount")
        assert blocks == 3  # the block that took it out of initial block download, and these two

        assert run_python(STOP, str(datadir)).strip() == "True"
        assert not alive(first.pid)
        assert node_status(datadir)["running"] is False
        assert not (datadir / STATE_FILE).exists()
        assert run_python(STOP, str(datadir)).strip() == "False"

        second = NodeInfo.from_json(json.loads(run_python(START, str(datadir))))
        assert second.pid != first.pid
        status = node_status(datadir)
        assert status["running"] is True
        assert status["blocks"] == blocks  # the chain survived the restart (and needed no new block)
    finally:
        stop_node(datadir)
    assert node_status(datadir)["running"] is False


@pytest.mark.regtest
def test_start_fails_with_the_log_when_the_rpc_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(NodeError) as caught:
            start_node(tmp_path / "node", rpc_port=port, p2p_port=_free_port())
    message = str(caught.value)
    assert "exited with code" in message
    assert "debug.log" in message
    assert "HTTP server" in message or "bind" in message
    assert node_status(tmp_path / "node")["running"] is False


def test_status_and_stop_of_a_datadir_without_node(tmp_path: Path) -> None:
    status = node_status(tmp_path)
    assert status["running"] is False
    assert status["pid"] is None and status["chain"] is None
    assert stop_node(tmp_path) is False


def test_start_reports_why_the_node_exited(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, 'echo "Error: fake failure to start" >&2; exit 1\n')
    with pytest.raises(NodeError, match=r"(?s)exited with code 1.*Error: fake failure to start"):
        start_node(tmp_path / "node", binary=binary)
    assert not (tmp_path / "node" / STATE_FILE).exists()


def test_start_times_out_and_stops_the_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "fake.pid"
    binary = fake_binary(tmp_path, f'echo $$ > "{pid_file}"\nexec sleep 60\n')
    with pytest.raises(NodeError, match=r"did not answer within 1s"):
        start_node(tmp_path / "node", binary=binary, timeout=1)
    assert not alive(int(pid_file.read_text()))
    assert not (tmp_path / "node" / STATE_FILE).exists()


def _bitcoind(tmp_path: Path, env: dict[str, str]) -> str | None:
    """BITCOIND as the settings read it from ``env``."""
    return Settings.load(home=str(tmp_path / "home"), env=env).node_binary


def test_find_node_binary_prefers_bitcoind_env(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, "exit 0\n")
    assert find_node_binary(_bitcoind(tmp_path, {"BITCOIND": str(binary)})) == binary


def test_find_node_binary_refuses_a_bitcoind_env_that_is_not_executable(tmp_path: Path) -> None:
    with pytest.raises(NodeError, match="is not an executable file"):
        find_node_binary(_bitcoind(tmp_path, {"BITCOIND": str(tmp_path / "missing")}))


def test_find_node_binary_says_how_to_install_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NodeError, match="apt-get install -y litecoind"):
        find_node_binary(_bitcoind(tmp_path, {}))


def test_node_start_runs_the_bitcoind_of_the_settings(tmp_path: Path) -> None:
    """custody node start runs BITCOIND, read once with the settings, not the node on PATH."""
    binary = fake_binary(tmp_path, 'echo "Error: the configured fake ran" >&2; exit 1\n')
    c = Custody(tmp_path / "home")
    c.env["BITCOIND"] = str(binary)
    result = c("node", "start", "--datadir", str(tmp_path / "node"))
    assert result.exit_code == 8 and "the configured fake ran" in result.stderr, result.output
    c.env["BITCOIND"] = str(tmp_path / "missing")
    result = c("node", "start", "--datadir", str(tmp_path / "node"))
    assert result.exit_code == 8 and "is not an executable file" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
