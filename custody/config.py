"""Settings: flags first, then ``CUSTODY_*`` environment variables, then defaults.

Read once by the CLI (never at import time) and passed down explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from custody.errors import InputError

CHAIN_BACKENDS = ("embedded", "node")
"""Values of ``CUSTODY_CHAIN``: the embedded regtest chain, or a node over JSON-RPC."""


def default_home(env: Mapping[str, str]) -> Path:
    """``$CUSTODY_HOME``, else ``$XDG_DATA_HOME/custody``, else ``~/.local/share/custody``."""
    if env.get("CUSTODY_HOME"):
        return Path(env["CUSTODY_HOME"]).expanduser()
    xdg = env.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "custody"


@dataclass(frozen=True)
class Settings:
    """Where custody keeps its state and how it reaches it."""

    home: Path
    db_url: str
    halt_file: Path
    halt_hook: str | None
    manifest: Path
    node_url: str | None = None
    """JSON-RPC URL of the node (``http://HOST:PORT``); None: the node of ``node_datadir``."""
    node_cookie: Path | None = None
    """The node's ``.cookie`` file, for ``node_url``."""
    node_auth: str | None = field(default=None, repr=False)
    """``user:password`` for ``node_url``; kept out of repr (a secret)."""
    node_datadir: Path = Path("node")
    """Data directory of the node ``custody node start`` runs (default HOME/node)."""
    chain: str = "node"
    """Which chain backend: ``node`` (JSON-RPC) or ``embedded`` (regtest in ``chain_datadir``)."""
    chain_datadir: Path = Path("chain")
    """Data directory of the embedded regtest chain (default HOME/chain)."""
    witness_file: Path = Path("witness.jsonl")
    """The local witness of the audit log's head, appended after every command (default HOME/witness.jsonl)."""
    halt_lease: float = 60.0
    """Seconds a halt file that allows trading holds (its ``valid_until``)."""

    @classmethod
    def load(
        cls,
        *,
        home: str | None = None,
        db_url: str | None = None,
        halt_file: str | None = None,
        manifest: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Settings:
        """Resolve every setting from the given flags, then the environment, then defaults.

        Raises InputError for a ``CUSTODY_CHAIN`` other than ``embedded`` or ``node``.
        """
        env = os.environ if env is None else env
        home_path = Path(home).expanduser() if home else default_home(env)
        url = db_url or env.get("CUSTODY_DB_URL") or f"sqlite:///{home_path / 'custody.db'}"
        halt = halt_file or env.get("CUSTODY_HALT_FILE") or str(home_path / "halt.json")
        hook = env.get("CUSTODY_HALT_HOOK") or None
        pinned = manifest or env.get("CUSTODY_MANIFEST") or str(home_path / "founders-manifest.json")
        # The node: environment only (CUSTODY_NODE_AUTH is a secret, never a flag).
        cookie = env.get("CUSTODY_NODE_COOKIE") or None
        datadir = env.get("CUSTODY_NODE_DATADIR") or str(home_path / "node")
        chain = env.get("CUSTODY_CHAIN") or "node"
        if chain not in CHAIN_BACKENDS:
            raise InputError(f"CUSTODY_CHAIN must be one of {', '.join(CHAIN_BACKENDS)}, not {chain!r}")
        chain_datadir = env.get("CUSTODY_CHAIN_DATADIR") or str(home_path / "chain")
        lease = parse_lease(env.get("CUSTODY_HALT_LEASE") or "60", "CUSTODY_HALT_LEASE")
        return cls(
            home_path,
            url,
            Path(halt).expanduser(),
            hook,
            Path(pinned).expanduser(),
            node_url=env.get("CUSTODY_NODE_URL") or None,
            node_cookie=Path(cookie).expanduser() if cookie else None,
            node_auth=env.get("CUSTODY_NODE_AUTH") or None,
            node_datadir=Path(datadir).expanduser(),
            chain=chain,
            chain_datadir=Path(chain_datadir).expanduser(),
            witness_file=Path(env.get("CUSTODY_WITNESS_FILE") or str(home_path / "witness.jsonl")).expanduser(),
            halt_lease=lease,
        )


MAX_LEASE = 86400.0


def parse_lease(value: str, what: str) -> float:
    """Seconds of a halt file's lease: a number in (0, 86400]. Raises InputError."""
    try:
        seconds = float(value)
    except ValueError:
        raise InputError(f"{what} must be a number of seconds, not {value!r}") from None
    if not 0 < seconds <= MAX_LEASE:
        raise InputError(f"{what} must be more than 0 and at most {MAX_LEASE:.0f} seconds")
    return seconds
