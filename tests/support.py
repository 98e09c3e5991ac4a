"""Helpers shared by the tests: founders' keys, an isolated custody home, the CLI runner."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from custody.bitcoin.keys import ExtendedPrivateKey, KeyOrigin, OriginKey, bip48_path
from custody.bitcoin.message import sign_message
from custody.bitcoin.network import Network, get_network
from custody.bitcoin.script import parse_script_type
from custody.identity.roster import Roster, load_roster
from custody.policy.manifest import SignedManifest, load_signed_manifest, sign_manifest
from custody.policy.origins import standard_path
from custody_cli.main import cli

PASSPHRASE = "correct horse battery staple"


@dataclass(frozen=True)
class TestFounder:
    name: str
    master: ExtendedPrivateKey
    path: tuple[int, ...]

    @property
    def account(self) -> OriginKey:
        return OriginKey(KeyOrigin(self.master.fingerprint, self.path), self.master.derive(self.path).neuter())

    @property
    def spec(self) -> str:
        return f"{self.name}={self.account}"


def founders(
    network: str = "regtest", n: int = 3, script_index: int = 2, tag: str = "", script: str | None = None
) -> list[TestFounder]:
    """Deterministic regtest-only founder keys (seeds from a label, never for real money); with
    ``script``, at that script type's standard path (custody.policy.origins)."""
    net: Network = get_network(network)
    path = bip48_path(net, script_index)
    if script is not None:
        path = standard_path(net, parse_script_type(script))
    out = []
    for i in range(n):
        seed = hashlib.sha256(f"custody test founder {tag}{i}".encode()).digest()
        out.append(TestFounder(f"founder-{chr(97 + i)}", ExtendedPrivateKey.from_seed(seed, net), path))
    return out


class Custody:
    """Runs ``custody`` in process against an isolated home directory."""

    def __init__(self, home: Path, db_url: str | None = None) -> None:
        self.home = home
        self.env = {
            "CUSTODY_HOME": str(home),
            "NO_COLOR": "1",
            "CUSTODY_PASSPHRASE": PASSPHRASE,
            "COLUMNS": "200",
        }
        if db_url:
            self.env["CUSTODY_DB_URL"] = db_url
        else:
            self.env["CUSTODY_DB_URL"] = f"sqlite:///{home / 'custody.db'}"
        self.env["CUSTODY_HALT_HOOK"] = ""
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | bytes | None = None) -> Result:
        env = {k: v for k, v in self.env.items()}
        return self.runner.invoke(cli, list(args), env=env, input=input, catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def init(
        self, fs: list[TestFounder], *, network: str = "regtest", threshold: int = 2, script: str = "p2wsh"
    ) -> Result:
        """The key ceremony: a manifest drafted, signed by every founder, then ``custody init``."""
        path = self.home.parent / f"{self.home.name}-manifest.json"
        path.unlink(missing_ok=True)
        args = ["manifest", "draft", "--network", network, "--threshold", str(threshold), "--script", script]
        for f in fs:
            args += ["--founder", f.spec]
        drafted = self(*args, "--out", str(path))
        if drafted.exit_code != 0:
            return drafted
        path.write_text(json.dumps(sign_manifest_with(load_signed_manifest(path.read_bytes()), fs).to_document()))
        self.founders = fs
        self.threshold = threshold
        self.manifest_file = path
        return self("init", str(path))

    def employee(self, name: str, roles: str = "request,approve,lift") -> Path:
        """A key file for ``name``, enrolled the only way there is: a roster the founders signed."""
        path = self.home / "keys" / f"{name}.key"
        result = self("employee", "keygen", name, "--out", str(path), "--roles", roles)
        assert result.exit_code == 0, result.output
        self.apply_roster()
        return path

    def apply_roster(self, signers: list[TestFounder] | None = None) -> Result:
        """Export the open roster proposal, have founders sign it (the threshold's first by
        default), apply it."""
        out = self.home.parent / f"{self.home.name}-roster.json"
        out.unlink(missing_ok=True)
        result = self("roster", "export", "--out", str(out))
        assert result.exit_code == 0, result.output
        out.write_text(json.dumps(sign_roster_file(out, signers or self.founders[: self.threshold]).to_document()))
        applied = self("roster", "apply", str(out))
        assert applied.exit_code == 0, applied.output
        return applied


def staffed(home: Path, env: dict[str, str] | None = None) -> tuple[Custody, dict[str, Path]]:
    """A custody at ``home`` (``env`` added to its environment) set up with :func:`founders` and
    alice, bob and carol enrolled with every role; their key files by name."""
    c = Custody(home)
    c.env.update(env or {})
    assert c.init(founders()).exit_code == 0
    return c, {name: c.employee(name) for name in ("alice", "bob", "carol")}


def wait_stopped(pid: int, what: str) -> None:
    """Until process ``pid`` is stopped (SIGSTOP, state T: it reached its CUSTODY_PAUSE_AT point);
    AssertionError naming ``what`` after two minutes."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError(f"{what} never reached its pause point")


def account_key(f: TestFounder) -> Any:
    """The founder's account private key (coincurve): what signs manifests and rosters."""
    return f.master.derive(f.path).private_key()


def sign_manifest_with(m: SignedManifest, fs: list[TestFounder]) -> SignedManifest:
    for f in fs:
        m = sign_manifest(m, f.name, account_key(f))
    return m


def sign_roster_file(path: Path, fs: list[TestFounder]) -> Roster:
    """The roster in ``path`` signed by ``fs`` (founders' names as in the manifest)."""
    r = load_roster(path.read_bytes())
    for f in fs:
        r = r.with_signature(f.name, sign_message(account_key(f), r.message))
    return r


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


def run_cli(
    env: dict[str, str], *args: str, crash_at: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``custody ARGS`` in a real subprocess (for crash tests); CUSTODY_CRASH_AT when given."""

    full = dict(os.environ, **env)
    full.pop("CUSTODY_CRASH_AT", None)
    if crash_at:
        full["CUSTODY_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "custody_cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def create_store(db: Any, settings: Any, policy: Any, fs: list[TestFounder]) -> SignedManifest:
    """A store made from ``policy`` as the ceremony makes it (every founder of ``fs`` signs the
    manifest), with the manifest pinned where ``settings`` say and the halt file written, as
    `custody init` does (a command's halt guard reads a missing halt file as halted): for
    library-level tests and benchmarks that do not go through the CLI."""
    from custody.control.halt import publish
    from custody.control.roster import pin_manifest
    from custody.control.wallet import init_store
    from custody.policy.manifest import unsigned

    signed = sign_manifest_with(unsigned(policy), fs)
    init_store(db, signed)
    pin_manifest(settings.manifest, signed)
    publish(db, settings, hook=False)
    return signed


def read_psbt(path: Path) -> bytes:
    """A PSBT file's bytes, whether it was written binary (a .psbt name) or base64."""
    data = path.read_bytes()
    return data if data.startswith(b"psbt\xff") else base64.b64decode(data.strip())


def psbt_b64(path: Path) -> str:
    """A PSBT file as the base64 text the node's RPCs take."""
    return base64.b64encode(read_psbt(path)).decode("ascii")


def append_entry(c: Custody, event: str, actor: str, payload: dict[str, Any]) -> None:
    """An audit entry an insider with the SQLite store appends, well chained (the tool's own
    library computes the hashes and moves the head): the log's chain and head checks pass."""
    import gc

    from custody.control import audit_log
    from custody.store.db import Database

    gc.collect()  # no pooled connection of an in-process command holds the file
    db = Database(f"sqlite:///{c.home / 'custody.db'}")
    try:
        with db.transaction() as s:
            audit_log.append(s, event, actor, payload)
    finally:
        db.dispose()


def forged_lift(halt_id: int) -> dict[str, Any]:
    """A ``halt.lifted`` payload in the tool's shape, signed by a key of nobody's."""
    import coincurve

    stranger = coincurve.PrivateKey().public_key.format().hex()
    lifts = [{"employee": who, "pubkey": stranger, "signature": "30" * 35} for who in ("alice", "bob")]
    return {"halt_id": halt_id, "signers": ["alice", "bob"], "lifts": lifts}


def force_spilling(monkeypatch: Any, at: int = 3) -> None:
    """Make the verifier's cross-set checks go through its temporary files (custody.verify.spill)
    beyond ``at`` records, in batches of about ``at`` records (many runs: merged over levels)."""
    monkeypatch.setattr("custody.verify.core.SPILL_AT", at)
    monkeypatch.setattr("custody.verify.parallel.BATCH_RECORDS", at)
    monkeypatch.setattr("custody.verify.parallel.BATCH_BYTES", 200 * at)
