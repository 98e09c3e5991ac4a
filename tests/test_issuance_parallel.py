"""A large batch is derived and verified on every core, and comes out exactly as one core makes it."""

from __future__ import annotations

import json
from pathlib import Path

from custody.addresses import AddressDeriver
from custody.config import Settings
from custody.db import Database
from custody.issuance import PARALLEL_MIN, issue_addresses, list_addresses
from custody.network import REGTEST
from custody.policy import ScriptType, make_policy
from custody.wallet import init_store
from tests.support import founders


def test_a_parallel_batch_is_complete_ordered_and_right(tmp_path: Path) -> None:
    policy = make_policy(
        REGTEST, 2, ScriptType.P2SH_P2WSH, [(f.name, str(f.account)) for f in founders(script_index=1)]
    )
    settings = Settings.load(home=str(tmp_path), env={})
    db = Database(settings.db_url)
    init_store(db, policy)
    settings.manifest.write_text(json.dumps(policy.to_manifest()))
    count = PARALLEL_MIN + 1234
    issued = issue_addresses(db, settings, "bulk", count)
    assert [a.index for a in issued] == list(range(count))
    deriver = AddressDeriver(policy)  # one core, in this process
    assert [a.address for a in issued] == [deriver.derive(0, i).address for i in range(count)]
    stored = list_addresses(db)
    assert [(a.index, a.address) for a in stored] == [(a.index, a.address) for a in issued]
    assert [a.index for a in issue_addresses(db, settings, "next", 1)] == [count]
