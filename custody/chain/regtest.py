"""Running a regtest node on loopback, in its own data directory.

For operators (``custody node start|stop|status``) and for the integration tests. The node
is Bitcoin Core's ``bitcoind`` (where ``BITCOIND`` names one, or on PATH) or Litecoin
Core's ``litecoind``, which runs the same script and RPC rules; custody speaks to either
only in scriptPubKeys, descriptors and raw transactions, never in address strings.

A started node is described by :class:`NodeInfo`, kept as JSON in its data directory, so
that another process can find, query and stop it with nothing but the directory.

Files in the data directory (the node's own files are under ``regtest/``)::

    custody-node.conf   configuration written at every start
    custody-node.json   NodeInfo of the running node (removed when it stops)
    custody-node.pid    the node's pid, written by the node
    custody-node.out    the node's stdout and stderr (errors before debug.log exists)
"""

# size(_start_once): starting a real node step by step (ports, config, process, RPC wait, wallet),
#   each failure naming its step

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custody.chain.rpc import RPC_IN_WARMUP, RpcClient, RpcError, expect_chain
from custody.errors import Conflict, NodeError
from custody.files import NODE_FILE_MAX, read_limited_text

CONF_FILE = "custody-node.conf"
STATE_FILE = "custody-node.json"
PID_FILE = "custody-node.pid"
OUT_FILE = "custody-node.out"

INSTALL_HINT = (
    "set BITCOIND to a bitcoind binary, or install Litecoin Core "
    "(scripts/install-node.sh, or: apt-get install -y litecoind)"
)

_LOOPBACK = "127.0.0.1"
_BIND_FAILURES = ("Unable to bind", "Unable to start HTTP server", "Failed to listen")

# Nodes this process started, so that they are reaped (waited for) when they stop.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class NodeInfo:
    """A running regtest node: where it lives, how to reach it, which process it is."""

    datadir: Path
    pid: int
    rpc_port: int
    p2p_port: int
    binary: Path
    version: str
    rpc_url: str
    cookie_file: Path

    def client(self, timeout: float = 30.0) -> RpcClient:
        """An RPC client for this node, authenticated by its cookie."""
        return RpcClient(self.rpc_url, cookie_file=self.cookie_file, timeout=timeout)

    def to_json(self) -> dict[str, Any]:
        return {
            "datadir": str(self.datadir),
            "pid": self.pid,
            "rpc_port": self.rpc_port,
            "p2p_port": self.p2p_port,
            "binary": str(self.binary),
            "version": self.version,
            "rpc_url": self.rpc_url,
            "cookie_file": str(self.cookie_file),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeInfo:
        """Raises KeyError, TypeError or ValueError for data that is not a NodeInfo."""
        return cls(
            datadir=Path(str(data["datadir"])),
            pid=int(data["pid"]),
            rpc_port=int(data["rpc_port"]),
            p2p_port=int(data["p2p_port"]),
            binary=Path(str(data["binary"])),
            version=str(data["version"]),
            rpc_url=str(data["rpc_url"]),
            cookie_file=Path(str(data["cookie_file"])),
        )


def find_node_binary(configured: str | None = None) -> Path:
    """The node binary to run: ``configured`` (``BITCOIND``, ``Settings.node_binary``), else
    bitcoind on PATH, else litecoind on PATH.

    Raises NodeError when BITCOIND names no executable, or when none is found.
    """
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise NodeError(f"BITCOIND={configured} is not an executable file")
        return Path(found)
    for name in ("bitcoind", "litecoind"):
        found = shutil.which(name)
        if found is not None:
            return Path(found)
    raise NodeError(f"no node binary found: {INSTALL_HINT}")


def start_node(
    datadir: Path,
    *,
    rpc_port: int | None = None,
    p2p_port: int | None = None,
    binary: Path | None = None,
    timeout: float = 60,
    leave_ibd: bool = True,
    extra_args: Sequence[str] = (),
) -> NodeInfo:
    """Start a regtest node in ``datadir`` on loopback and wait until its RPC answers.

    A regtest node stays in initial block download until its tip is less than a day old,
    and custody refuses a node in it: with ``leave_ibd`` (the default), a node still in it
    mines one block paying ``raw(51)`` (OP_1: anyone can spend it). ``extra_args`` are
    added to the node's command line (``-mempoolreplacement=1``, ...).
    Ports not given are chosen free. ``binary`` is the node to run (the CLI passes
    :func:`find_node_binary` of the settings' ``BITCOIND``); None looks on PATH only.
    Returns the node's NodeInfo, also saved in datadir.
    Raises Conflict when a node already runs in datadir, and NodeError when no binary is
    found or the node exits or does not answer within ``timeout`` seconds (the message
    ends with the last lines of its log; the process is stopped).
    """
    datadir = datadir.resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    previous = _load_state(datadir)
    if previous is not None and _is_running(previous):
        raise Conflict(f"a node already runs in {datadir} (pid {previous.pid})")
    binary = binary if binary is not None else find_node_binary()
    version = _node_version(binary)
    # Ports chosen here may be taken by someone else before the node binds them: retry.
    attempts = 1 if rpc_port is not None and p2p_port is not None else 3
    for attempt in range(attempts):
        try:
            info = _start_once(datadir, binary, version, rpc_port, p2p_port, timeout, extra_args)
        except _PortTaken as e:
            if attempt == attempts - 1:
                raise NodeError(str(e)) from None
            continue
        if leave_ibd:
            client = info.client()
            chain_info = client.call("getblockchaininfo")
            if isinstance(chain_info, dict) and chain_info.get("initialblockdownload") is not False:
                client.call("generatetodescriptor", 1, "raw(51)")
        return info
    raise AssertionError("unreachable")


def stop_node(datadir: Path, timeout: float = 30) -> bool:
    """Stop the node running in ``datadir``: RPC ``stop``, then SIGTERM, then SIGKILL.

    Returns True when a node was stopped, False when none was running.
    Raises NodeError when the process outlives even SIGKILL.
    """
    datadir = datadir.resolve()
    info = _load_state(datadir)
    if info is None:
        return False
    if not _is_running(info):
        _remove_state(datadir)
        return False
    try:
        info.client(timeout=min(timeout, 10.0)).call("stop")
    except NodeError:
        pass  # unreachable or hung: the signals below still stop it
    if not _wait_until_gone(info, timeout):
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            _signal(info.pid, sig)
            if _wait_until_gone(info, grace):
                break
        else:
            raise NodeError(f"node in {datadir} (pid {info.pid}) does not stop")
    _remove_state(datadir)
    return True


def node_status(datadir: Path) -> dict[str, Any]:
    """What is known of the node in ``datadir``; never raises for a stopped node.

    Keys: datadir, running, pid, rpc_url, rpc_port, p2p_port, version, chain, blocks,
    error (why chain and blocks are missing although the process runs).
    """
    datadir = datadir.resolve()
    status: dict[str, Any] = {
        "datadir": str(datadir),
        "running": False,
        "pid": None,
        "rpc_url": None,
        "rpc_port": None,
        "p2p_port": None,
        "version": None,
        "chain": None,
        "blocks": None,
        "error": None,
    }
    info = _load_state(datadir)
    if info is None or not _is_running(info):
        return status
    status.update(
        running=True,
        pid=info.pid,
        rpc_url=info.rpc_url,
        rpc_port=info.rpc_port,
        p2p_port=info.p2p_port,
        version=info.version,
    )
    try:
        chain_info = info.client(timeout=10.0).call("getblockchaininfo")
        status.update(chain=chain_info["chain"], blocks=chain_info["blocks"])
    except NodeError as e:
        status["error"] = str(e)
    return status


def ensure_wallet(client: RpcClient, name: str) -> RpcClient:
    """Load the node's wallet ``name``, creating it if it does not exist.

    Creates the node's default kind (a legacy wallet on 0.21 nodes, which is all
    Debian's litecoind can make; descriptors on recent Bitcoin Core).
    Returns a client for that wallet. Raises NodeError (RpcError) when the node refuses.
    """
    if name not in client.call("listwallets"):
        on_disk = {wallet["name"] for wallet in client.call("listwalletdir")["wallets"]}
        if name in on_disk:
            client.call("loadwallet", name)
        else:
            client.call("createwallet", name)
    return client.wallet(name)


class _PortTaken(Exception):
    """A port chosen free was taken before the node could bind it."""


def _start_once(
    datadir: Path,
    binary: Path,
    version: str,
    rpc_port: int | None,
    p2p_port: int | None,
    timeout: float,
    extra_args: Sequence[str] = (),
) -> NodeInfo:
    chosen_ports = rpc_port is None or p2p_port is None
    taken: set[int] = set()
    rpc_port = rpc_port if rpc_port is not None else _free_port(taken)
    taken.add(rpc_port)
    p2p_port = p2p_port if p2p_port is not None else _free_port(taken)
    taken.add(p2p_port)
    onion_port = _free_port(taken)

    conf = datadir / CONF_FILE
    conf.write_text(_conf_text(version, rpc_port, p2p_port, onion_port), encoding="utf-8")
    cookie = datadir / "regtest" / ".cookie"
    cookie.unlink(missing_ok=True)  # left by a node that crashed; the new node writes its own
    pid_file = datadir / PID_FILE
    pid_file.unlink(missing_ok=True)
    debug_log = datadir / "regtest" / "debug.log"
    log_offset = debug_log.stat().st_size if debug_log.exists() else 0

    with open(datadir / OUT_FILE, "wb") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                f"-datadir={datadir}",
                f"-conf={conf}",
                f"-pid={pid_file}",
                "-printtoconsole=0",
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # an operator's Ctrl-C in the shell must not stop it
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    info = NodeInfo(
        datadir=datadir,
        pid=proc.pid,
        rpc_port=rpc_port,
        p2p_port=p2p_port,
        binary=binary,
        version=version,
        rpc_url=f"http://{_LOOPBACK}:{rpc_port}",
        cookie_file=cookie,
    )
    _save_state(info)  # first, so that an interrupted start can still be stopped
    try:
        _wait_for_rpc(info, proc, timeout, log_offset, chosen_ports)
        # A wrapper script may have forked rather than exec'd: the node's own pid counts.
        try:
            node_pid = int(pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            node_pid = proc.pid
        if node_pid != proc.pid:
            info = dataclasses.replace(info, pid=node_pid)
            _save_state(info)
        return info
    except BaseException:
        _kill_child(proc)
        _remove_state(datadir)
        raise


def _wait_for_rpc(
    info: NodeInfo,
    proc: subprocess.Popen[bytes],
    timeout: float,
    log_offset: int,
    chosen_ports: bool,
) -> None:
    client = RpcClient(info.rpc_url, cookie_file=info.cookie_file, timeout=5.0, warmup_timeout=0)
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while True:
        returncode = proc.poll()
        if returncode is not None:
            tail = _log_tail(info.datadir, log_offset)
            message = f"node {info.binary} exited with code {returncode} while starting in {info.datadir}{tail}"
            if chosen_ports and any(failure in tail for failure in _BIND_FAILURES):
                raise _PortTaken(message)
            raise NodeError(message)
        try:
            client.call("getblockchaininfo")
            break
        except RpcError as e:
            if e.code != RPC_IN_WARMUP:
                raise NodeError(f"node in {info.datadir} failed while starting: {e}") from None
            last_error = e.rpc_message
        except NodeError as e:
            last_error = str(e)  # not listening yet, or no cookie yet
        if time.monotonic() > deadline:
            raise NodeError(
                f"node in {info.datadir} did not answer within {timeout:g}s "
                f"({last_error}){_log_tail(info.datadir, log_offset)}"
            )
        time.sleep(0.1)
    expect_chain(client, "regtest")


def _conf_text(version: str, rpc_port: int, p2p_port: int, onion_port: int) -> str:
    # Network-specific options only count inside the [regtest] section.
    lines = [
        "# Written by custody at every node start; edits are lost.",
        "regtest=1",
        "",
        "[regtest]",
        "server=1",
        "txindex=1",
        "fallbackfee=0.0002",
        "# Loopback only: RPC and P2P listen on 127.0.0.1, nothing is announced or sought.",
        f"rpcbind={_LOOPBACK}",
        f"rpcallowip={_LOOPBACK}",
        f"rpcport={rpc_port}",
        "listen=1",
        f"port={p2p_port}",
        f"bind={_LOOPBACK}:{p2p_port}",
        # Without an explicit onion bind the node also binds a fixed default port
        # (litecoind: 19444), which clashes between nodes; give it a free one instead.
        f"bind={_LOOPBACK}:{onion_port}=onion",
        "listenonion=0",
        "discover=0",
        "dnsseed=0",
        "upnp=0",
        "natpmp=0",
    ]
    if "Litecoin" in version:
        # Litecoin's MWEB deployment activates at regtest height 432, and the node then
        # cannot mine a block without an MWEB peg-in ("bad-txns-vin-empty"). Bitcoin has no
        # MWEB: keep it from ever activating (start time -2 = never).
        lines.append("vbparams=mweb:-2:0")
    return "\n".join(lines) + "\n"


def _node_version(binary: Path) -> str:
    try:
        result = subprocess.run(
            [str(binary), "-version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NodeError(f"cannot run node binary {binary}: {e}") from None
    first_line = result.stdout.decode("utf-8", "replace").strip().splitlines()[:1]
    if result.returncode != 0 or not first_line:
        raise NodeError(
            f"{binary} -version failed with code {result.returncode}: is it bitcoind? "
            f"{result.stderr.decode('utf-8', 'replace').strip()[-500:]}"
        )
    return first_line[0]


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((_LOOPBACK, 0))
            port: int = s.getsockname()[1]
        if port not in taken:
            return port


def _log_tail(datadir: Path, offset: int, lines: int = 25) -> str:
    """The node's output and the end of this run's debug.log, as an indented block."""
    parts: list[str] = []
    try:
        out = (datadir / OUT_FILE).read_text(encoding="utf-8", errors="replace").strip()
        if out:
            parts.append(f"\n{OUT_FILE}:\n" + _indent(out.splitlines()[-lines:]))
    except OSError:
        pass
    debug_log = datadir / "regtest" / "debug.log"
    try:
        with open(debug_log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        if text.strip():
            parts.append(f"\nlast lines of {debug_log}:\n" + _indent(text.splitlines()[-lines:]))
    except OSError:
        pass
    return "".join(parts) if parts else f"\n(no output; nothing in {debug_log})"


def _indent(lines: list[str]) -> str:
    return "\n".join("  " + line for line in lines)


def _load_state(datadir: Path) -> NodeInfo | None:
    try:
        data = json.loads(read_limited_text(datadir / STATE_FILE, NODE_FILE_MAX, "node state file"))
        return NodeInfo.from_json(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NodeError(f"node state {datadir / STATE_FILE} is unreadable: {e}") from None


def _save_state(info: NodeInfo) -> None:
    path = info.datadir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _remove_state(datadir: Path) -> None:
    (datadir / STATE_FILE).unlink(missing_ok=True)


def _is_running(info: NodeInfo) -> bool:
    """Whether ``info.pid`` is alive and is the node of ``info.datadir`` (not a reused pid)."""
    child = _CHILDREN.get(info.pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[info.pid]
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, though another user's: the checks below still tell
    proc = Path(f"/proc/{info.pid}")
    if not Path("/proc/self").exists():
        return True  # no procfs: trust the pid
    try:
        stat = (proc / "stat").read_text(encoding="utf-8", errors="replace")
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False  # exited, waiting to be reaped by a parent that may never do so
        args = (proc / "cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    return f"-datadir={info.datadir}".encode() in args


def _wait_until_gone(info: NodeInfo, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_running(info):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_child(proc: subprocess.Popen[bytes]) -> None:
    """Stop a node this process started and reap it: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _CHILDREN.pop(proc.pid, None)
