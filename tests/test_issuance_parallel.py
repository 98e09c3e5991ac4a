"""A large batch is derived and verified on every core, and comes out exactly as one core makes it."""

from __future__ import annotations

from pathlib import Path

from custody.bitcoin.network import REGTEST
from custody.bitcoin.script import ScriptType
from custody.config import Settings
from custody.issuance.issuer import PARALLEL_MIN, issue_addresses, issue_chunks, list_addresses
from custody.policy.generator import AddressDeriver
from custody.policy.model import make_policy
from custody.store.db import Database
from tests.support import create_store, founders


def test_a_parallel_batch_is_complete_ordered_and_right(tmp_path: Path) -> None:
    policy = make_policy(
        REGTEST, 2, ScriptType.P2SH_P2WSH, [(f.name, str(f.account)) for f in founders(script_index=1)]
    )
    settings = Settings.load(home=str(tmp_path), env={})
    db = Database(settings.db_url)
    create_store(db, settings, policy, founders(script_index=1))
    count = PARALLEL_MIN + 1234
    issued = issue_addresses(db, settings, "bulk", count)
    assert [a.index for a in issued] == list(range(count))
    deriver = AddressDeriver(policy)  # one core, in this process
    assert [a.address for a in issued] == [deriver.derive(0, i).address for i in range(count)]
    stored = list_addresses(db)
    assert [(a.index, a.address) for a in stored] == [(a.index, a.address) for a in issued]
    assert [a.index for a in issue_addresses(db, settings, "next", 1)] == [count]


def test_progress_counts_every_address_once_across_chunks_and_cores(tmp_path: Path) -> None:
    """The progress a terminal shows: rising, ending at the count, and nothing issued differs."""
    fs = founders(script_index=1)
    policy = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in fs])
    settings = Settings.load(home=str(tmp_path), env={})
    db = Database(settings.db_url)
    create_store(db, settings, policy, fs)
    count = PARALLEL_MIN + 2600  # a first chunk on every core, a second in this process
    seen: list[int] = []
    parts = list(issue_chunks(db, settings, "bulk", count, chunk=PARALLEL_MIN + 100, progress=seen.append))
    assert [len(p) for p in parts] == [PARALLEL_MIN + 100, 2500]
    assert seen == sorted(seen) and len(set(seen)) == len(seen) and seen[-1] == count
    assert seen[0] < PARALLEL_MIN + 100 and PARALLEL_MIN + 100 in seen  # shown while the first chunk was derived
    deriver = AddressDeriver(policy)
    issued = [a for p in parts for a in p]
    assert [a.address for a in issued] == [deriver.derive(0, i).address for i in range(count)]
