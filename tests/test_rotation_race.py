"""A key rotation applied while addresses are issued, on PostgreSQL (CUSTODY_TEST_POSTGRES_URL),
each side its own process with its own engine.

PostgreSQL reads each statement anew (READ COMMITTED): an issuer that read the policy epochs
just before a rotation committed, then took the locks just after, would allocate indexes of
the new epoch and store the OLD policy's addresses at them, which the founders' new quorum
never derives (a deposit there is nobody's). Afterwards, every issued address must verify
with the independent verifier against exactly one founders-signed manifest, the one of the
epoch its index falls in; no index is repeated or skipped; the audit log's chain stands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from custody import verify
from custody.config import Settings
from custody.control import audit_log, epochs
from custody.issuance.issuer import list_addresses
from custody.policy.manifest import SignedManifest
from custody.store.db import Database
from tests import support
from tests.rotation_support import founders_policy
from tests.support import PASSPHRASE, account_key, create_store, founders, sign_manifest_with

pytestmark = [pytest.mark.postgres]


@dataclass
class Shop:
    home: Path
    url: str
    settings: Settings
    db: Database
    first: SignedManifest
    rotation: SignedManifest

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, CUSTODY_HOME=str(self.home), CUSTODY_DB_URL=self.url, NO_COLOR="1")
        env["CUSTODY_PASSPHRASE"] = PASSPHRASE
        for name in ("CUSTODY_CRASH_AT", "CUSTODY_PAUSE_AT", "CUSTODY_MANIFEST"):
            env.pop(name, None)
        return env


@pytest.fixture
def shop(tmp_path: Path, pg_url: str) -> Iterator[Shop]:
    """A 2-of-3 store on PostgreSQL and its rotation to 3-of-4, signed by every new founder and
    approved by two of the current ones (tests/test_issuance_cache.py builds it the same way)."""
    home = tmp_path / "home"
    home.mkdir()
    settings = Settings.load(home=str(home), db_url=pg_url)
    db = Database(settings.db_url)
    fs = founders()
    first = create_store(db, settings, founders_policy(fs, 2), fs)
    joiner = founders(tag="joiner-", n=1)[0]
    new_fs = [*fs, support.TestFounder("founder-d", joiner.master, joiner.path)]
    from custody.policy.rotation import approve_rotation, draft_rotation

    m = sign_manifest_with(draft_rotation(first, founders_policy(new_fs, 3)), new_fs)
    for f in fs[:2]:
        m = approve_rotation(m, first, f.name, account_key(f))
    (tmp_path / "rotation.json").write_text(json.dumps(m.to_document()))
    yield Shop(home, pg_url, settings, db, first, m)
    db.dispose()


_ISSUER = """
import json, os, sys
from custody.config import Settings
from custody.errors import Conflict
from custody.issuance.issuer import issue_addresses
from custody.store.db import Database
settings = Settings.load()
db = Database(settings.db_url)
issued, refused, rounds, stop = [], 0, int(sys.argv[1]), sys.argv[2]
while rounds > 0:
    try:
        issued += [(a.index, a.address) for a in issue_addresses(db, settings, "race", 1)]
    except Conflict:  # `rotate apply` between its pin and its commit: refused, nothing taken
        refused += 1
    if not stop or os.path.exists(stop):
        rounds -= 1
print(json.dumps({"issued": issued, "refused": refused}))
"""


def _issuer(shop: Shop, rounds: int, stop: Path | None = None, **extra: str) -> subprocess.Popen[str]:
    """A process issuing one address at a time: ``rounds`` times, or ``rounds`` times more
    once ``stop`` exists."""
    return subprocess.Popen(
        [sys.executable, "-c", _ISSUER, str(rounds), str(stop or "")],
        env=shop.env | extra,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finished(proc: subprocess.Popen[str]) -> list[tuple[int, str]]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return [(int(i), str(a)) for i, a in json.loads(out)["issued"]]


def _check_after(shop: Shop, shown: list[tuple[int, str]]) -> int:
    """What must hold after the race; returns the first index of the new epoch."""
    with shop.db.transaction() as s:
        assert audit_log.verify_chain(s) == []
    _, new = epochs.load_epochs(shop.db)  # the first policy and the rotation
    start = new.receive_from
    stored = [(a.index, a.address) for a in list_addresses(shop.db) if a.chain == 0]
    assert sorted(shown) == sorted(stored)  # what the issuer showed is what was stored
    indexes = sorted(i for i, _ in stored)
    assert indexes == list(range(len(indexes)))  # none repeated, none skipped, in either epoch
    manifests = [verify.parse_manifest(shop.first.body), verify.parse_manifest(shop.rotation.body)]
    for index, address in stored:
        fits = [n for n, m in enumerate(manifests) if verify.verify_address(m, 0, index, address) == []]
        assert fits == [0 if index < start else 1], (index, address, fits, start)
    return start


def test_an_issuer_that_read_the_policy_before_a_rotation_committed_issues_from_the_new_one(shop: Shop) -> None:
    """The issuer stops after deriving (policy read, no lock taken); the rotation is applied and
    committed meanwhile by another process; the issuer goes on. Its address comes from the new
    quorum, at the first index of the new epoch."""
    before = _finished(_issuer(shop, 2))
    assert [i for i, _ in before] == [0, 1]
    issuer = _issuer(shop, 1, CUSTODY_PAUSE_AT="issuance.derived")
    try:
        support.wait_stopped(issuer.pid, "the issuer")
        applied = support.run_cli(shop.env, "rotate", "apply", str(shop.home.parent / "rotation.json"), "--json")
        assert applied.returncode == 0, applied.stderr
        assert json.loads(applied.stdout)["receive_from"] == 2
    finally:
        _go_on(issuer)
    shown = _finished(issuer)
    assert [i for i, _ in shown] == [2]
    assert _check_after(shop, before + shown) == 2


def _go_on(proc: subprocess.Popen[str]) -> None:
    """Continue ``proc`` until it ends: each time it reaches its pause point again (an issuance
    that starts over stops there once more), it is sent on."""
    while proc.poll() is None:
        with open(f"/proc/{proc.pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.05)


def test_issuance_in_a_loop_beside_a_rotation(shop: Shop) -> None:
    """One process issues an address at a time, in a loop; another applies the founders-signed
    rotation (`custody rotate apply`) once the first addresses are out."""
    stop = shop.home.parent / "stop"
    issuer = _issuer(shop, 20, stop)
    while len(list_addresses(shop.db)) < 5:
        assert issuer.poll() is None, issuer.communicate()
        time.sleep(0.05)  # the rotation lands once the issuer is at work
    applied = support.run_cli(shop.env, "rotate", "apply", str(shop.home.parent / "rotation.json"), "--json")
    assert applied.returncode == 0, applied.stderr
    stop.touch()  # twenty more rounds, then the issuer stops
    shown = _finished(issuer)
    start = _check_after(shop, shown)
    assert 5 <= start and len(shown) >= start + 20, (start, len(shown))  # issued on both sides of it
