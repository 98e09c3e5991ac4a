"""Settings are read once, in custody/config.py: what reads them, when a bad one is refused,
what the halt hook inherits, and that secrets stay out of their repr."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from custody.config import Settings
from tests.support import Custody, founders

ROOT = Path(__file__).resolve().parents[1]
ENV_READS = {"environ", "environb", "getenv", "getenvb"}


def _environment_reads(path: Path) -> list[int]:
    """Lines of ``path`` that touch the process environment (os.environ, os.getenv, ...)."""
    tree = ast.parse(path.read_text(), str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ENV_READS:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and any(a.name in ENV_READS for a in node.names):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_library_reads_the_environment_only_in_config() -> None:
    """custody/config.py reads every setting; custody/faults.py's crash, fail (full disk) and
    pause switches are the exception (its comment says why). Everything else is handed
    Settings: the verifier's spill directory too (Settings.spill_dir, from $TMPDIR)."""
    found = {
        str(path.relative_to(ROOT)): lines
        for path in sorted((ROOT / "custody").rglob("*.py"))
        if (lines := _environment_reads(path))
    }
    assert set(found) == {"custody/config.py", "custody/faults.py"}, found
    assert len(found["custody/faults.py"]) == 3


def test_the_scan_sees_every_way_to_read_the_environment(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom os import getenv\nos.environ.get('A')\nos.getenv('B')\nos.environb\nx = os.path\n"
    )
    assert _environment_reads(sample) == [2, 3, 4, 5]


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Custody, Path]:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    return c, c.employee("alice")


def test_a_malformed_setting_fails_only_the_commands_that_use_it(shop: tuple[Custody, Path]) -> None:
    """Fee limits, confirmations and the notification timeout are parsed by the command that
    needs them: a typo in one never turns `custody halt status` (the trading engine's check)
    into an error."""
    c, _ = shop
    c.env.update(
        CUSTODY_MAX_FEE="lots",
        CUSTODY_FEE_RATE="fast",
        CUSTODY_DEPOSIT_CONFIRMATIONS="x",
        CUSTODY_NOTIFY_TIMEOUT="soon",
        CUSTODY_SMTP_PASSWORD_FILE=str(c.home / "no-such-file"),
        CUSTODY_CHAIN="embedded",
    )
    assert c("halt", "status").exit_code == 0
    assert c("status").exit_code == 0
    sync = c("sync")
    assert sync.exit_code == 2 and "CUSTODY_DEPOSIT_CONFIRMATIONS" in sync.stderr
    c.env["CUSTODY_DEPOSIT_CONFIRMATIONS"] = "1"
    sync = c("sync")
    assert sync.exit_code == 2 and "CUSTODY_MAX_FEE" in sync.stderr
    pending = c("notify", "pending")
    assert pending.exit_code == 2 and "CUSTODY_NOTIFY_TIMEOUT" in pending.stderr
    c.env["CUSTODY_NOTIFY_TIMEOUT"] = "5"
    pending = c("notify", "pending")
    assert pending.exit_code == 2 and "CUSTODY_SMTP_PASSWORD_FILE" in pending.stderr


def test_the_halt_hook_inherits_an_allow_list_of_the_environment_the_settings_were_read_from(
    shop: tuple[Custody, Path], tmp_path: Path
) -> None:
    """The hook gets the locale and time zone the command started with, and no secret."""
    c, alice = shop
    log = tmp_path / "hook.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$TZ $CUSTODY_HALTED [$CUSTODY_PASSPHRASE] [$OPERATOR_TAG]" >> {log}\n')
    hook.chmod(0o755)
    c.env.update(CUSTODY_HALT_HOOK=str(hook), TZ="Europe/Zurich", OPERATOR_TAG="desk-7")
    raised = c("halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(alice))
    assert raised.exit_code == 0, raised.output
    lines = log.read_text().splitlines()
    assert lines and set(lines) >= {"Europe/Zurich 1 [] []"}, lines


def test_secrets_in_the_settings_stay_out_of_their_repr(tmp_path: Path) -> None:
    secrets = {
        "CUSTODY_NODE_AUTH": "rpcuser:node-secret-1",
        "CUSTODY_SMTP_PASSWORD": "smtp-secret-2",
        "CUSTODY_NOTIFY_PASSPHRASE": "pgp-secret-3",
        "CUSTODY_PASSPHRASE": "key-secret-4",
    }
    settings = Settings.load(home=str(tmp_path), env=secrets)
    assert settings.smtp_password == "smtp-secret-2" and settings.notify_passphrase == "pgp-secret-3"
    shown = repr(settings)
    for value in secrets.values():
        assert value not in shown
