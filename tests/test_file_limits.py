"""Every file input is refused above its size limit, unread, with exit code 2.

Each file the tool reads (key, passphrase and PIN files, manifests, PSBTs, exports,
liabilities and proofs, webhook secrets, PGP keys, a node's cookie and state) is given as
``/dev/zero`` and as a sparse regular file one byte over its limit. The command runs in a
real subprocess under a 512 MiB address-space limit: a reader that read first and checked
after would run out of memory (exit 1) or hang (the timeout) instead of exiting 2.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from custody import files
from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.txbuild import Coin, build_transaction
from custody.chain.embedded import open_chain
from custody.control import halt_file, witness
from custody.errors import InputError
from custody.identity.roster import MAX_ROSTER_BYTES
from custody.policy.manifest import MAX_MANIFEST_BYTES
from custody.verify import files as verify_files
from tests.support import PASSPHRASE, Custody, founders

ADDRESS_SPACE = 512 * 1024 * 1024


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")} | env
    return subprocess.run(
        [sys.executable, "-m", "custody_cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
        check=False,
    )


@dataclass
class World:
    """A store, an employee and a founder with their key files, a manifest and a PSBT."""

    tmp: Path
    env: dict[str, str]
    employee_key: Path
    founder_key: Path
    manifest: Path
    psbt: Path
    liabilities: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("limits")
    c = Custody(tmp / "home")
    c.env["CUSTODY_CHAIN"] = "embedded"  # the proof of liabilities is made at the chain's tip
    assert c.init(founders()).exit_code == 0
    employee_key = c.employee("alice")
    founder_key = tmp / "founder.key"
    assert c("keygen", "founder-a", "--out", str(founder_key)).exit_code == 0
    manifest = tmp / "manifest.json"
    assert c("policy", "manifest", "--out", str(manifest)).exit_code == 0
    tx = build_transaction([Coin("11" * 32, 0, 100_000, b"\x00\x20" + bytes(32), 0, 0)], [(b"\x51", 90_000)])
    psbt = tmp / "w.psbt"
    psbt.write_text(psbt_lib.Psbt.from_unsigned_tx(tx).to_base64() + "\n")
    liabilities = tmp / "liabilities.txt"
    published = c("audit", "liabilities", "--out", str(liabilities), "--nonces", str(tmp / "nonces"))
    assert published.exit_code == 0, published.output
    open_chain(tmp / "home" / "chain").close()  # the CLI ran in this process: free the kernel's directory
    env = {k: v for k, v in c.env.items() if v and k != "CUSTODY_CHAIN"}  # the node cases need the node backend
    return World(tmp, env, employee_key, founder_key, manifest, psbt, liabilities)


Case = Callable[[World, Path], tuple[dict[str, str], list[str]]]
"""Given the world and the hostile file: extra environment and the command's arguments."""

PKCS11 = "pkcs11:token=t;object=o?module-path=/nonexistent/libsofthsm2.so"

CASES: dict[str, tuple[int, Case]] = {
    "passphrase file": (
        files.SECRET_FILE_MAX,
        lambda w, f: ({}, ["keygen", "founder-x", "--out", str(w.tmp / "x.key"), "--passphrase-file", str(f)]),
    ),
    "employee key file": (
        files.KEY_FILE_MAX,
        lambda w, f: ({}, ["halt", "raise", "--reason", "r", "--as", "alice", "--key", str(f)]),
    ),
    "PIN file": (
        files.SECRET_FILE_MAX,
        lambda w, f: ({}, ["halt", "raise", "--reason", "r", "--as", "alice", "--key", PKCS11, "--pin-file", str(f)]),
    ),
    "founder key file": (
        files.KEY_FILE_MAX,
        lambda w, f: ({"CUSTODY_MANIFEST": str(w.manifest)}, ["sign", str(w.psbt), "--key", str(f)]),
    ),
    "PSBT to sign": (
        files.PSBT_MAX,
        lambda w, f: ({"CUSTODY_MANIFEST": str(w.manifest)}, ["sign", str(f), "--key", str(w.founder_key)]),
    ),
    "PSBT to import": (files.PSBT_MAX, lambda w, f: ({}, ["withdraw", "import", "1", str(f)])),
    "pinned manifest (signer)": (
        files.MANIFEST_MAX,
        lambda w, f: ({"CUSTODY_MANIFEST": str(f)}, ["sign", str(w.psbt), "--key", str(w.founder_key)]),
    ),
    "pinned manifest (issuance)": (
        files.MANIFEST_MAX,
        lambda w, f: ({"CUSTODY_MANIFEST": str(f)}, ["address", "new", "--account", "acct-1"]),
    ),
    "auditors' manifest": (
        verify_files.MANIFEST_MAX_BYTES,
        lambda w, f: ({}, ["verify", "addresses", "--manifest", str(f)]),
    ),
    "address export": (
        files.EXPORT_MAX,
        lambda w, f: ({}, ["verify", "addresses", "--manifest", str(w.manifest), "--export", str(f)]),
    ),
    "liabilities file": (
        files.LIABILITIES_MAX,
        lambda w, f: ({}, ["audit", "check-inclusion", str(f), "--account", "1", "--nonce", "00" * 32]),
    ),
    "nonce file": (
        files.SECRET_FILE_MAX,
        lambda w, f: ({}, ["audit", "check-inclusion", str(w.liabilities), "--nonce-file", str(f)]),
    ),
    "proof of reserves": (
        files.LIABILITIES_MAX,
        lambda w, f: ({}, ["verify", "reserves", str(f), "--manifest", str(w.manifest)]),
    ),
    "audit log witness": (
        witness.MAX_WITNESS_BYTES,
        lambda w, f: ({}, ["audit", "log", "--verify", "--against", str(f)]),
    ),
    "founders-signed manifest": (MAX_MANIFEST_BYTES, lambda w, f: ({}, ["manifest", "show", str(f)])),
    "founders-signed roster": (MAX_ROSTER_BYTES, lambda w, f: ({}, ["roster", "apply", str(f)])),
    "webhook secret file": (
        files.SECRET_FILE_MAX,
        lambda w, f: ({}, ["notify", "webhook", "add", "https://hooks.example/custody", "--secret-file", str(f)]),
    ),
    "PGP key file": (
        files.PGP_KEY_MAX,
        lambda w, f: ({}, ["notify", "recipient", "add", "auditor@example.com", "--pgp-key", str(f)]),
    ),
    "notify key passphrase file": (
        files.SECRET_FILE_MAX,
        lambda w, f: ({}, ["notify", "key", "init", "--passphrase-file", str(f)]),
    ),
    "SMTP password file": (
        files.SECRET_FILE_MAX,
        lambda w, f: (
            {"CUSTODY_SMTP_URL": "smtp://127.0.0.1:25", "CUSTODY_SMTP_USER": "u", "CUSTODY_SMTP_PASSWORD_FILE": str(f)},
            ["notify", "pending"],
        ),
    ),
    "unattended key passphrase file": (
        files.SECRET_FILE_MAX,
        lambda w, f: ({"CUSTODY_NOTIFY_PASSPHRASE_FILE": str(f)}, ["notify", "pending"]),
    ),
    "node cookie file": (
        files.NODE_FILE_MAX,
        lambda w, f: ({"CUSTODY_NODE_URL": "http://127.0.0.1:9", "CUSTODY_NODE_COOKIE": str(f)}, ["sync"]),
    ),
    "node state file": (files.NODE_FILE_MAX, lambda w, f: _node_state(w, f, ["sync"])),
    "node state file (node status)": (files.NODE_FILE_MAX, lambda w, f: _node_state(w, f, ["node", "status"])),
}


def _node_state(w: World, hostile: Path, args: list[str]) -> tuple[dict[str, str], list[str]]:
    """The state file `custody node start` leaves in its data directory, replaced by ``hostile``."""
    datadir = w.tmp / f"node-{hostile.name}-{args[0]}"
    datadir.mkdir(exist_ok=True)
    state = datadir / "custody-node.json"
    state.unlink(missing_ok=True)
    state.symlink_to(hostile)
    return {"CUSTODY_NODE_DATADIR": str(datadir)}, [*args, "--datadir", str(datadir)] if args[0] == "node" else args


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("hostile", ["/dev/zero", "oversize"])
def test_every_file_input_is_refused_unread(world: World, name: str, hostile: str, tmp_path: Path) -> None:
    limit, case = CASES[name]
    if hostile == "oversize":
        path = tmp_path / "oversize"
        with open(path, "wb") as f:
            f.truncate(limit + 1)  # sparse: no disk used, but its size is over the limit
        expected = "larger than"
    else:
        path = Path("/dev/zero")
        expected = "not a file or a pipe"
    env, args = case(world, path)
    result = run(world.env | env, *args)
    assert result.returncode == 2, (name, result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr[-2000:]
    named = "custody-node.json" if name.startswith("node state") else str(path)  # it names its own path
    assert named in lines[0]


def test_a_pipe_is_read_up_to_its_limit(tmp_path: Path) -> None:
    """A passphrase through a pipe (``<(...)``) works; an endless pipe stops at the limit."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer: a passphrase, then the end
        os.close(reader)
        os.write(writer, f"{PASSPHRASE}\n".encode())
        os._exit(0)
    os.close(writer)
    try:
        data = files.read_limited(Path(f"/proc/self/fd/{reader}"), files.SECRET_FILE_MAX, "passphrase file")
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert data == f"{PASSPHRASE}\n".encode()

    endless = subprocess.Popen(["cat", "/dev/zero"], stdout=subprocess.PIPE)
    try:
        assert endless.stdout is not None
        with pytest.raises(InputError, match="larger than 64 KiB"):
            files.read_limited(Path(f"/proc/self/fd/{endless.stdout.fileno()}"), files.SECRET_FILE_MAX, "secret")
    finally:
        endless.kill()
        endless.wait()


def test_an_export_line_without_end_is_refused(tmp_path: Path, world: World) -> None:
    """An export's header line without a newline, longer than a line may be: an export
    error (a verification failure), never a read without end."""
    export = tmp_path / "endless.jsonl"
    export.write_bytes(b"{" + b" " * (verify_files.EXPORT_MAX_LINE + 10))
    result = run(
        world.env, "verify", "addresses", "--manifest", str(world.manifest), "--export", str(export), "--no-halt"
    )
    assert result.returncode == 3 and "longer than 65536 bytes" in result.stdout + result.stderr, result.stderr


@pytest.mark.parametrize("hostile", ["/dev/zero", "oversize"])
def test_a_halt_file_that_cannot_be_read_is_a_halt(world: World, hostile: str, tmp_path: Path) -> None:
    """The offline signer reads the halt file: unreadable (endless, too large) means halted
    (exit 3), found without reading it all."""
    path = Path(hostile)
    if hostile == "oversize":
        path = tmp_path / "halt.json"
        with open(path, "wb") as f:
            f.truncate(halt_file.MAX_BYTES + 1)
    env = {"CUSTODY_MANIFEST": str(world.manifest), "CUSTODY_HALT_FILE": str(path)}
    result = run(world.env | env, "sign", str(world.psbt), "--key", str(world.founder_key), "--yes")
    assert result.returncode == 3 and "halted" in result.stderr, result.stderr[-2000:]
