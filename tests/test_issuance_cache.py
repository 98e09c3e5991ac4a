"""What issuance caches (the pinned chain's and the store's epochs' signature checks) is never
stale: in ONE process, after a warm call, an insider's edit of the pinned files or of the
store's policy rows by SQL, and a rotation the tool applies, are each seen by the very next
call, through the library API as the CLI, the API server and the benchmarks call it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from custody.config import Settings
from custody.control import epochs, halt
from custody.errors import Conflict, VerificationFailed
from custody.issuance.issuer import issue_addresses, list_addresses
from custody.policy.generator import AddressDeriver
from custody.policy.manifest import SignedManifest
from custody.policy.model import Policy
from custody.store.db import Database
from tests import support
from tests.rotation_support import founders_policy, rotated
from tests.support import create_store, founders


@dataclass
class Store:
    db: Database
    settings: Settings
    fs: list[support.TestFounder]
    signed: SignedManifest

    def issue(self) -> int:
        return issue_addresses(self.db, self.settings, "acct", 1)[0].index

    def indexes(self) -> list[int]:
        return [a.index for a in list_addresses(self.db)]

    def sql(self, statement: str, **params: object) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(text(statement), params)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    settings = Settings.load(home=str(tmp_path), db_url=url) if url else Settings.load(home=str(tmp_path), env={})
    db = Database(settings.db_url)
    fs = founders()
    signed = create_store(db, settings, founders_policy(fs, 2), fs)
    s = Store(db, settings, fs, signed)
    assert [s.issue(), s.issue()] == [0, 1]  # warm: every check made and kept
    yield s
    db.dispose()


def _rotation(s: Store, approvers: int = 2) -> tuple[SignedManifest, Policy]:
    """A rotation to 3-of-4 (a new founder joins), signed by every new founder, approved by
    ``approvers`` of the current ones."""
    new_fs = [*s.fs, *founders(tag="joiner-", n=1)]
    new_fs[-1] = support.TestFounder("founder-d", new_fs[-1].master, new_fs[-1].path)
    m = rotated(s.signed, new_fs, 3, s.fs[:approvers])
    return m, m.policy


def _insert_epoch(s: Store, m: SignedManifest, receive_from: int) -> None:
    s.sql(
        "INSERT INTO policy_epoch (epoch, digest, previous, document, receive_from, change_from, applied_at) "
        "VALUES (1, :digest, :previous, :document, :receive_from, 0, '2026-01-01 00:00:00')",
        digest=m.digest,
        previous=s.signed.digest,
        document=json.dumps(m.to_document()),
        receive_from=receive_from,
    )


def test_a_rotation_written_by_sql_after_a_warm_call_is_refused(store: Store) -> None:
    m, _ = _rotation(store)  # fully approved: only the missing audit entry and pin give it away
    _insert_epoch(store, m, receive_from=2)
    with pytest.raises(VerificationFailed, match="not the rotation the audit log recorded"):
        store.issue()
    store.sql("DELETE FROM policy_epoch")
    assert store.issue() == 2  # the refused call took no index


def test_an_applied_epoch_edited_by_sql_after_a_warm_call_is_refused(store: Store) -> None:
    m, policy = _rotation(store)
    epochs.apply_rotation(store.db, store.settings, m)
    assert store.issue() == 2  # warm again, on the new epoch
    store.sql("UPDATE policy_epoch SET receive_from = 1 WHERE epoch = 1")
    with pytest.raises(VerificationFailed, match="not the rotation the audit log recorded"):
        store.issue()
    store.sql("UPDATE policy_epoch SET receive_from = 2 WHERE epoch = 1")
    assert store.issue() == 3


def test_a_new_epoch_after_a_warm_call_issues_from_the_new_policy(store: Store) -> None:
    m, policy = _rotation(store)
    epochs.apply_rotation(store.db, store.settings, m)
    issued = issue_addresses(store.db, store.settings, "acct", 1)[0]
    assert issued.index == 2
    assert issued.address == AddressDeriver(policy).derive(0, 2).address
    assert issued.address != AddressDeriver(store.signed.policy).derive(0, 2).address


def test_a_rotation_pinned_but_not_applied_after_a_warm_call_is_refused(store: Store) -> None:
    m, _ = _rotation(store)
    epochs.pin_rotation(store.settings, m)  # `rotate apply` stopped after its first step
    with pytest.raises(Conflict, match="pinned on this machine but not applied"):
        store.issue()
    assert store.indexes() == [0, 1]


def test_an_edited_pin_file_after_a_warm_call_halts(store: Store) -> None:
    path = store.settings.manifest
    doc = json.loads(path.read_text())
    sigs = doc["signatures"]
    sigs[0]["signature"] = sigs[1]["signature"]  # founder-a's signature swapped for founder-b's
    path.write_text(json.dumps(doc))
    with pytest.raises(VerificationFailed, match="halted"):
        store.issue()
    assert halt.read_state(store.db).halted
    assert store.indexes() == [0, 1]


def test_a_rotations_file_with_too_few_approvals_after_a_warm_call_halts(store: Store) -> None:
    m, _ = _rotation(store, approvers=1)
    doc = {"format": epochs.ROTATIONS_FORMAT, "version": 1, "manifests": [m.to_document()]}
    epochs.rotations_path(store.settings).write_text(json.dumps(doc))
    with pytest.raises(VerificationFailed, match="halted"):
        store.issue()
    assert halt.read_state(store.db).halted


def test_a_founder_key_replaced_by_sql_after_a_warm_call_halts(store: Store) -> None:
    stranger = founders(tag="stranger-")[0]
    store.sql("UPDATE founder SET xpub = :xpub WHERE name = 'founder-c'", xpub=str(stranger.account))
    with pytest.raises(VerificationFailed, match="halted"):
        store.issue()  # derived from the store's (edited) policy: the pinned manifest disowns it
    assert halt.read_state(store.db).halted
    assert store.indexes() == [0, 1]
