"""Start-up: which modules `custody --help`, `-V` and `halt status` load (not how long they take).

A trading engine polls `custody halt status`; people read `--help`. Neither may pay for the
ORM, the kernel, GnuPG, PKCS#11, the web server or rich's tables when it does not use them.
The timings are benchmarks/bench_startup.py's business.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.support import Custody, founders

HEAVY = (
    "sqlalchemy",
    "sqlmodel",
    "pydantic",
    "fastapi",
    "uvicorn",
    "gnupg",
    "pkcs11",
    "cryptography",
    "pbk",  # libbitcoinkernel (py-bitcoinkernel)
    "rich",
    "rich.table",
    "coincurve",
    "custody.store.models",
    "psycopg",  # the package: on the light path a module whose __init__ has not run (custody.store.light_pg)
    "psycopg.connection",  # imported by psycopg's __init__: the whole driver
    "asyncio",
)

_PROBE = """
import atexit, json, sys
heavy = json.loads(sys.argv[1])
atexit.register(lambda: sys.stderr.write("\\nLOADED " + json.dumps([m for m in heavy if m in sys.modules]) + "\\n"))
sys.argv = ["custody", *sys.argv[2:]]
from custody_cli.main import main
main()
"""


def _loaded(env: dict[str, str], *args: str) -> tuple[int, set[str]]:
    """Run ``custody ARGS`` in a fresh interpreter; the heavy modules it had loaded at exit."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(HEAVY), *args],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED ")][-1]
    return proc.returncode, set(json.loads(line.removeprefix("LOADED ")))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Custody:
    c = Custody(tmp_path_factory.mktemp("startup") / "home")
    assert c.init(founders()).exit_code == 0
    return c


def test_help_and_version_load_nothing_heavy(store: Custody) -> None:
    for args in (["--help"], ["--version"]):
        code, loaded = _loaded(store.env, *args)
        assert code == 0, args
        assert loaded == set(), (args, loaded)


def test_halt_status_loads_no_orm(store: Custody) -> None:
    """On SQLite it reads the store through the DB-API (custody.control.halt_light): no
    sqlalchemy, sqlmodel, models, nor anything else heavy but the lift signatures' curve."""
    code, loaded = _loaded(store.env, "halt", "status", "--json")
    assert code == 0
    assert loaded <= {"coincurve"}, loaded
    code, loaded = _loaded(store.env, "halt", "status")  # the words, not JSON: rich's console, no table
    assert code == 0
    assert loaded <= {"coincurve", "rich"}, loaded


def test_halt_status_without_the_light_path_loads_the_store(store: Custody) -> None:
    """CUSTODY_HALT_LIGHT=0 (and every state the light path leaves to it, tests/test_halt_light.py)
    takes the ORM, nothing else: and the probe sees what a command loads."""
    code, loaded = _loaded(dict(store.env, CUSTODY_HALT_LIGHT="0"), "halt", "status", "--json")
    assert code == 0
    assert loaded & {"fastapi", "uvicorn", "gnupg", "pkcs11", "cryptography", "pbk", "rich.table"} == set(), loaded
    assert {"sqlalchemy", "custody.store.models"} <= loaded


def test_halt_status_on_postgresql_loads_libpq_alone(pg_url: str, tmp_path: Path) -> None:
    """On PostgreSQL it reads through libpq, by psycopg's wrapper of it (psycopg.pq) alone: no
    sqlalchemy, sqlmodel, models, nor psycopg's driver (the package's __init__: connections,
    cursors, adapters). The URL carries the schema in its options (conftest's pg_url)."""
    c = Custody(tmp_path / "home", pg_url)
    assert c.init(founders()).exit_code == 0
    code, loaded = _loaded(c.env, "halt", "status", "--json")
    assert code == 0
    assert "psycopg" in loaded and loaded <= {"psycopg", "asyncio", "coincurve"}, loaded  # asyncio: psycopg.errors's
    code, loaded = _loaded(dict(c.env, CUSTODY_HALT_LIGHT="0"), "halt", "status", "--json")
    assert code == 0
    assert {"sqlalchemy", "custody.store.models", "psycopg.connection"} <= loaded  # the probe sees the driver


def test_the_index_agrees_with_the_commands() -> None:
    """`custody --help` lists commands from main.COMMAND_INDEX without importing them: the
    index names each command's module and summary as the command itself does."""
    from custody_cli.main import COMMAND_INDEX, cli

    found = {}
    for name, cmd in cli.commands.items():
        module = sys.modules[cmd.callback.__module__] if cmd.callback else None
        if isinstance(cmd, click.Group) and module is None:
            module = sys.modules[type(cmd).__module__]
        found[name] = (Path(module.__file__ or "").stem if module else "?", cmd.get_short_help_str(10_000))
    index = {
        name: (mod, click.Command(name, help=text).get_short_help_str(10_000))
        for name, (mod, text) in COMMAND_INDEX.items()
    }
    assert index == found, f"put this in cli/main.py's COMMAND_INDEX: {found}"
