"""custody.identity.governance over two rotations, with real founders' signatures: E0 (2-of-3)
-> E1 (3-of-3, new keys) -> E2 (2-of-3, new keys again). Which roster each epoch's founders may
still sign, and which the rotations' carried serials close; and what a rotation's ``carries`` may be."""

from __future__ import annotations

from typing import Any

import pytest

from custody.bitcoin.message import sign_message
from custody.errors import InputError
from custody.identity.governance import carries, governance_of
from custody.identity.roster import Employee, Roster
from custody.policy.manifest import SignedManifest, unsigned
from custody.policy.rotation import check_chain, check_rotation, draft_rotation
from tests.rotation_support import founders_policy, rotated
from tests.support import account_key, founders, sign_manifest_with

E0_FOUNDERS = founders(n=3, tag="e0-")
E1_FOUNDERS = founders(n=3, tag="e1-")
E2_FOUNDERS = founders(n=3, tag="e2-")
ALICE = Employee("alice", ("02" + "11" * 32,), frozenset({"request", "approve", "lift"}))
MALLORY = Employee("mallory", ("02" + "22" * 32,), frozenset({"request", "approve", "lift"}))


def _roster(
    manifest: SignedManifest, serial: int, previous: Roster | None, signers: list[Any], *more: Employee
) -> Roster:
    r = Roster("regtest", manifest.digest, serial, previous.digest if previous else None, (ALICE, *more), ())
    for f in signers:
        r = r.with_signature(f.name, sign_message(account_key(f), r.message))
    return r


def _rotate(current: SignedManifest, fs: list[Any], m: int, approvers: list[Any], carried: Any) -> SignedManifest:
    return check_rotation(rotated(current, fs, m, approvers, carried), current)


@pytest.fixture(scope="module")
def chain() -> dict[str, Any]:
    e0 = sign_manifest_with(unsigned(founders_policy(E0_FOUNDERS, 2)), E0_FOUNDERS)
    r1 = _roster(e0, 1, None, E0_FOUNDERS[:2])
    r2 = _roster(e0, 2, r1, E0_FOUNDERS[:2])
    e1 = _rotate(e0, E1_FOUNDERS, 3, E0_FOUNDERS[:2], carries(r2, None))
    # No roster under E1: the next rotation carries E0's roster #2 again.
    e2 = _rotate(e1, E2_FOUNDERS, 2, E1_FOUNDERS, carries(r2, None))
    return {"e0": e0, "e1": e1, "e2": e2, "r1": r1, "r2": r2}


def test_the_old_founders_history_stands_and_nothing_they_sign_after_it(chain: dict[str, Any]) -> None:
    e0, e1, e2, r1, r2 = (chain[k] for k in ("e0", "e1", "e2", "r1", "r2"))
    gov = governance_of(check_chain([e0, e1, e2]))
    assert gov.problems(r1) == [] and gov.problems(r2) == []  # history, and the carried roster
    # The old quorum signs #3 after the rotations (and another #2): neither counts.
    late = _roster(e0, 3, r2, E0_FOUNDERS[:2])
    assert any("rotated away from" in p for p in gov.problems(late))
    fork = _roster(e0, 2, r1, E0_FOUNDERS[1:], MALLORY)
    assert fork.digest != r2.digest and any("rotated away from" in p for p in gov.problems(fork))
    # E1's founders, rotated away from too, carried nothing of their own: their #3 does not count.
    assert any("rotated away from" in p for p in gov.problems(_roster(e1, 3, r2, E1_FOUNDERS)))
    # E2's quorum signs #3; two signatures of E2 suffice (its m), E0's keys count for nothing there.
    assert gov.problems(_roster(e2, 3, r2, E2_FOUNDERS[:2])) == []
    assert any("needs 2" in p for p in gov.problems(_roster(e2, 3, r2, [E2_FOUNDERS[0], *E0_FOUNDERS[:1]])))
    # A new epoch's roster comes after what its rotation carried.
    assert any("must come after" in p for p in gov.problems(_roster(e2, 2, r1, E2_FOUNDERS[:2])))
    # Before the rotations were pinned, the same late roster was the old founders' to sign.
    assert governance_of(check_chain([e0])).problems(late) == []


def test_a_rotation_without_carries_carries_nothing(chain: dict[str, Any]) -> None:
    e0, r1, r2 = chain["e0"], chain["r1"], chain["r2"]
    bare = _rotate(e0, E1_FOUNDERS, 3, E0_FOUNDERS[:2], None)
    gov = governance_of(check_chain([e0, bare]))
    assert any("no roster of theirs" in p for p in gov.problems(r1))
    assert any("no roster of theirs" in p for p in gov.problems(r2))


def test_what_a_rotation_carries_is_checked_and_signed(chain: dict[str, Any]) -> None:
    e0, r2 = chain["e0"], chain["r2"]
    with pytest.raises(InputError, match="what a rotation carries"):
        draft_rotation(
            e0, founders_policy(E1_FOUNDERS, 3), {"roster": {"serial": 0, "digest": r2.digest}, "rulebook": None}
        )
    rotation = _rotate(e0, E1_FOUNDERS, 3, E0_FOUNDERS[:2], carries(r2, None))
    # Editing what it carries after everyone signed voids every signature and approval.
    body = rotation.body | {"carries": carries(chain["r1"], None)}
    edited = SignedManifest(body, rotation.signatures, rotation.policy, rotation.approvals)
    with pytest.raises(InputError, match="not valid"):
        check_rotation(edited, e0)
