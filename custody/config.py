"""Settings: flags first, then ``CUSTODY_*`` environment variables, then defaults.

Read once by the CLI (never at import time) and passed down explicitly. This is the one
module of the library that reads the environment (a test keeps it so); the exception is
``CUSTODY_CRASH_AT``, the crash-safety tests' kill switch, read where it fires
(custody/faults.py says why).

Values whose refusal belongs to the command that uses them (fee limits, confirmations, the
notification timeout, status's node timeout) are kept as given and parsed by their layer, so a malformed one fails
only the commands that need it, as before: ``custody halt status`` never fails over a fee cap.
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
    spill_dir: str | None = None
    """``$TMPDIR`` as set: where large verifications sort their keys (strictly there when set;
    Python's temporary directory when not)."""
    halt_lease: float = 60.0
    """Seconds a halt file that allows trading holds (its ``valid_until``)."""
    halt_light: bool = True
    """``CUSTODY_HALT_LIGHT`` (default 1; 0 turns it off): ``halt status`` reads a SQLite store
    without the ORM where that gives the same answer (custody.control.halt_light)."""
    node_binary: str | None = None
    """``BITCOIND``: the node binary ``custody node start`` runs (else bitcoind, then litecoind, on PATH)."""
    hook_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False, compare=False)
    """The environment these settings were read from; the halt hook inherits an allow-list of
    it (custody.control.halt_state.HOOK_ENV). It holds secrets, so it stays out of repr."""

    # Withdrawals and deposits: as given, parsed by custody.withdraw.limits.limits_from_settings
    # and custody.books.deposits.deposit_confirmations (None when the variable is not set).
    fee_rate: str | None = None
    """``CUSTODY_FEE_RATE``: the default fee rate in sat/vB (2)."""
    max_fee_rate: str | None = None
    """``CUSTODY_MAX_FEE_RATE``: the highest fee rate accepted, sat/vB (500)."""
    max_fee: str | None = None
    """``CUSTODY_MAX_FEE``: the highest absolute fee accepted, sat (1,000,000)."""
    confirmations: str | None = None
    """``CUSTODY_CONFIRMATIONS``: confirmations after which a withdrawal is confirmed (1)."""
    refund_confirmations: str | None = None
    """``CUSTODY_REFUND_CONFIRMATIONS``: how deep another transaction spending a signed
    withdrawal's input must be before the withdrawal is failed and refunded (6)."""
    deposit_confirmations: str | None = None
    """``CUSTODY_DEPOSIT_CONFIRMATIONS``: confirmations after which a deposit is credited (1)."""
    status_node_timeout: str | None = None
    """``CUSTODY_STATUS_NODE_TIMEOUT``: seconds ``custody status`` waits for the node before
    it reports it unreachable (5); parsed by custody.chain.backend.status_node_timeout."""

    # Notifications (custody.notify.delivery.NotifyConfig reads the secret files and checks these).
    gnupg_home: Path = Path("gnupg")
    """``CUSTODY_GNUPGHOME``: the GnuPG home with the system PGP key (default HOME/gnupg)."""
    smtp_url: str | None = None
    """``CUSTODY_SMTP_URL``: ``smtp://HOST:PORT`` or ``smtps://HOST:PORT``."""
    smtp_starttls: bool = False
    """``CUSTODY_SMTP_STARTTLS``: 1, true, yes or on to require STARTTLS."""
    smtp_user: str | None = None
    """``CUSTODY_SMTP_USER``: the SMTP login."""
    smtp_password_file: Path | None = None
    """``CUSTODY_SMTP_PASSWORD_FILE``: a file whose first line is the SMTP password (read when used)."""
    smtp_password: str | None = field(default=None, repr=False)
    """``CUSTODY_SMTP_PASSWORD``: the SMTP password, when no file is given; kept out of repr."""
    notify_from: str | None = None
    """``CUSTODY_NOTIFY_FROM``: the notifications' sender (default: the system key's address)."""
    notify_passphrase_file: Path | None = None
    """``CUSTODY_NOTIFY_PASSPHRASE_FILE``: a file whose first line is the system key's passphrase."""
    notify_passphrase: str | None = field(default=None, repr=False)
    """``CUSTODY_NOTIFY_PASSPHRASE``: the system key's passphrase, when no file is given."""
    notify_timeout: str | None = None
    """``CUSTODY_NOTIFY_TIMEOUT``: seconds a command may spend delivering notifications (5)."""

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
        gnupg_home = env.get("CUSTODY_GNUPGHOME") or str(home_path / "gnupg")
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
            spill_dir=env.get("TMPDIR") or None,
            halt_lease=lease,
            halt_light=env.get("CUSTODY_HALT_LIGHT", "1").strip() != "0",
            node_binary=env.get("BITCOIND") or None,
            hook_env=dict(env),
            fee_rate=env.get("CUSTODY_FEE_RATE"),
            max_fee_rate=env.get("CUSTODY_MAX_FEE_RATE"),
            max_fee=env.get("CUSTODY_MAX_FEE"),
            confirmations=env.get("CUSTODY_CONFIRMATIONS"),
            refund_confirmations=env.get("CUSTODY_REFUND_CONFIRMATIONS"),
            deposit_confirmations=env.get("CUSTODY_DEPOSIT_CONFIRMATIONS"),
            status_node_timeout=env.get("CUSTODY_STATUS_NODE_TIMEOUT") or None,
            gnupg_home=Path(gnupg_home).expanduser(),
            smtp_url=env.get("CUSTODY_SMTP_URL") or None,
            smtp_starttls=_flag(env.get("CUSTODY_SMTP_STARTTLS")),
            smtp_user=env.get("CUSTODY_SMTP_USER") or None,
            smtp_password_file=_path(env.get("CUSTODY_SMTP_PASSWORD_FILE")),
            smtp_password=env.get("CUSTODY_SMTP_PASSWORD") or None,
            notify_from=env.get("CUSTODY_NOTIFY_FROM") or None,
            notify_passphrase_file=_path(env.get("CUSTODY_NOTIFY_PASSPHRASE_FILE")),
            notify_passphrase=env.get("CUSTODY_NOTIFY_PASSPHRASE") or None,
            notify_timeout=env.get("CUSTODY_NOTIFY_TIMEOUT") or None,
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


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
