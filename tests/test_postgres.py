"""The team setup against a real PostgreSQL server (CUSTODY_TEST_POSTGRES_URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import PASSPHRASE, Custody, founders

PG_URL = os.environ.get("CUSTODY_TEST_POSTGRES_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="CUSTODY_TEST_POSTGRES_URL is not set (CI sets it)"),
]


def _issuer(home: Path, url: str, account: str, rounds: int, count: int) -> subprocess.Popen[str]:
    env = dict(os.environ, CUSTODY_HOME=str(home), CUSTODY_DB_URL=url, NO_COLOR="1", CUSTODY_PASSPHRASE=PASSPHRASE)
    code = (
        "import json, sys\n"
        "from custody.config import Settings\n"
        "from custody.store.db import Database\n"
        "from custody.issuance.issuer import issue_addresses\n"
        "s = Settings.load()\n"
        "db = Database(s.db_url)\n"
        "out = []\n"
        f"for _ in range({rounds}):\n"
        f"    out += [a.index for a in issue_addresses(db, s, {account!r}, {count})]\n"
        "print(json.dumps(out))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_concurrent_issuers_get_disjoint_indexes_without_gaps(tmp_path: Path, pg_url: str) -> None:
    c = Custody(tmp_path / "home", db_url=pg_url)
    assert c.init(founders()).exit_code == 0
    procs = [_issuer(tmp_path / "home", pg_url, f"acct-{i}", rounds=15, count=4) for i in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    everything = sorted(i for r in results for i in r)
    assert everything == list(range(3 * 15 * 4))  # disjoint and no gaps
    for r in results:
        assert len(set(r)) == len(r)
    stored = c.json("address", "list")
    assert sorted(a["index"] for a in stored) == everything
    assert len({a["address"] for a in stored}) == len(stored)


def test_team_store_round_trip(tmp_path: Path, pg_url: str) -> None:
    c = Custody(tmp_path / "home", db_url=pg_url)
    team = founders(script="p2sh-p2wsh")
    assert c.init(team, script="p2sh-p2wsh").exit_code == 0
    assert c.init(founders()).exit_code == 6  # never overwritten, on PostgreSQL too
    c.founders = team  # the store's founders sign its rosters
    key = c.employee("alice")
    issued = c.json("address", "new", "--account", "alice", "--count", "5")
    assert [a["index"] for a in issued] == [0, 1, 2, 3, 4]
    # a second operator machine: another home, same database, sees the same store
    other = Custody(tmp_path / "other", db_url=pg_url)
    # it pins the founders-signed manifest from the shared store, after the fingerprint check
    fingerprint = c.json("manifest", "show")["fingerprint"]
    assert other("manifest", "pin", "--from-store", "--fingerprint", fingerprint).exit_code == 0
    assert [a["address"] for a in other.json("address", "list")] == [a["address"] for a in issued]
    raised = other("halt", "raise", "--reason", "pg halt", "--as", "alice", "--key", str(key))
    assert raised.exit_code == 0, raised.output
    assert c("address", "new", "--account", "alice").exit_code == 3
