"""Rosters and rulebooks follow the policy epochs (custody.identity.governance).

A 2-of-3 store with a roster, a rulebook, a withdrawal and a lifted halt rotates to 3-of-4 on the
embedded chain; the rotation carries the roster and rulebook in force. Then the attacks: a roster
and a rulebook the OLD founders sign after the rotation (on a machine that never pinned it) are
refused by the store and by a signer that pinned the rotation, and so is one bound to the new
manifest with only two signatures; one the new quorum signs is accepted. What was signed before
the rotation still stands for the history it governed (the old withdrawal's approvals, the old
halt's lift). Last, an insider's ``roster.applied`` entry, well chained, that adds a lift key of
theirs makes no lift count.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import coincurve
import pytest

from custody.bitcoin import psbt as psbt_lib
from custody.control import audit_log
from custody.control.halt_lift import LIFT_DOMAIN
from custody.identity.roster import parse_roster
from custody.identity.statements import sign_statement
from custody.store.db import Database
from custody.withdraw.signer import PROP_ROSTER, PROPRIETARY_ID
from tests.rotation_support import approve_as, draft_3_of_4
from tests.support import Custody, read_psbt
from tests.test_withdraw_embedded import OP_TRUE, EmbeddedShop, destination

BTC = 100_000_000


def _machine(shop: EmbeddedShop, name: str) -> Custody:
    """Another machine with only the first manifest pinned (a founder's, or an offline signer)."""
    c = Custody(shop.tmp / name)
    c.home.mkdir(exist_ok=True)
    (c.home / "founders-manifest.json").write_bytes((shop.c.home / "founders-manifest.json").read_bytes())
    return c


def _sign(c: Custody, shop: EmbeddedShop, group: str, path: Path, *founders: str) -> None:
    for founder in founders:
        done = c(group, "sign", str(path), "--key", str(shop.founder_keys[founder]), "--yes")
        assert done.exit_code == 0, done.output


def _export(shop: EmbeddedShop, group: str, name: str) -> Path:
    path = shop.tmp / name
    assert shop.c(group, "export", "--out", str(path)).exit_code == 0
    return path


def _propose_rules(shop: EmbeddedShop, changes: dict[str, Any], name: str) -> Path:
    changes_file = shop.tmp / f"{name}-changes.json"
    changes_file.write_text(json.dumps(changes))
    proposed = shop.c("rules", "propose", str(changes_file), "--json")
    assert proposed.exit_code == 0, proposed.output
    return _export(shop, "rules", f"{name}.json")


def _raise(shop: EmbeddedShop, reason: str) -> int:
    return int(shop.ok("halt", "raise", "--reason", reason, *shop.as_("alice"))["halt_id"])


def _lift(shop: EmbeddedShop, halt_id: int) -> None:
    for who in ("alice", "bob"):
        assert shop.c("halt", "lift", str(halt_id), *shop.as_(who)).exit_code == 0


def _refused(result: Any, code: int, words: str) -> None:
    assert result.exit_code == code and words in result.stderr, (result.exit_code, result.output)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path_factory.mktemp("governance"), "p2wsh")
    yield s
    s.chain.close()


@pytest.fixture(scope="module")
def world(shop: EmbeddedShop) -> dict[str, Any]:
    """Before the rotation: rulebook #1, a withdrawal broadcast, a halt raised and lifted, and the
    next roster and rulebook proposed (bound to the first manifest) but not signed yet."""
    rules_1 = _propose_rules(shop, {"max_withdrawal_sat": 2 * BTC}, "rules-1")
    _sign(shop.c, shop, "rules", rules_1, "founder-a", "founder-b")
    assert shop.c("rules", "apply", str(rules_1)).exit_code == 0
    shop.deposit("acct-1")
    to, _ = destination()
    old_withdrawal = shop.signed(to, "0.1")
    shop.ok("withdraw", "broadcast", str(old_withdrawal))
    shop.chain.mine(1, OP_TRUE)
    shop.ok("sync")
    old_halt = _raise(shop, "drill before the rotation")
    _lift(shop, old_halt)
    mallory = shop.tmp / "mallory.key"
    assert (
        shop.c("employee", "keygen", "mallory", "--out", str(mallory), "--roles", "request,approve,lift").exit_code == 0
    )
    old_roster = _export(shop, "roster", "roster-old-founders.json")
    old_rules = _propose_rules(shop, {"max_withdrawal_sat": 50 * BTC}, "rules-old-founders")
    # A signer machine that pins the rotation.
    signer = _machine(shop, "signer")
    rotation = draft_3_of_4(shop, shop.tmp / "rotation.json")
    for founder in ("founder-a", "founder-b"):
        approve_as(shop, rotation, founder)
    fingerprint = shop.ok("rotate", "apply", str(rotation))["fingerprint"]
    assert signer("rotate", "pin", str(rotation), "--fingerprint", fingerprint).exit_code == 0
    return {
        "old_withdrawal": old_withdrawal,
        "old_halt": old_halt,
        "old_roster": old_roster,
        "old_rules": old_rules,
        "signer": signer,
        "rules_1": rules_1,
    }


def test_the_rotation_carries_the_roster_and_rulebook_in_force(shop: EmbeddedShop, world: dict[str, Any]) -> None:
    (entry,) = [e for e in shop.ok("audit", "log") if e["event"] == "policy.rotated"]
    current = shop.tmp / "roster-current.json"
    assert shop.c("roster", "export", "--current", "--out", str(current)).exit_code == 0
    roster_1 = json.loads(current.read_text())
    carried = entry["payload"]["carries"]
    assert carried["roster"]["serial"] == 1 and carried["rulebook"]["serial"] == 1
    # The carried roster still lets its employees act, and the carried rulebook still rules.
    assert shop.ok("roster", "show")["serial"] == 1
    assert roster_1["roster"]["manifest"] != shop.ok("rotate", "show")[-1]["manifest_digest"]
    assert shop.ok("rules", "show")["in_force"]["serial"] == 1


def test_a_roster_the_old_founders_sign_after_the_rotation_is_refused(
    shop: EmbeddedShop, world: dict[str, Any]
) -> None:
    old_roster, signer = world["old_roster"], world["signer"]
    # Here, where the rotation is pinned, no founder signs a roster of the old manifest.
    _refused(
        shop.c("roster", "sign", str(old_roster), "--key", str(shop.founder_keys["founder-a"]), "--yes"),
        2,
        "another founders' manifest than the newest one pinned here",
    )
    # Two old founders sign it on a machine that never pinned the rotation.
    _sign(_machine(shop, "old-founders"), shop, "roster", old_roster, "founder-a", "founder-b")
    _refused(shop.c("roster", "apply", str(old_roster)), 4, "which the founders rotated away from")
    _refused(signer("roster", "pin", str(old_roster)), 4, "which the founders rotated away from")
    # Written into the store by SQL, it stops every step that reads the roster.
    doc = json.loads(old_roster.read_text())
    digest = parse_roster(doc).digest
    with sqlite3.connect(shop.c.home / "custody.db") as db:
        db.execute(
            "INSERT INTO roster (serial, digest, document, applied_at) VALUES (2, ?, ?, '2026-01-01 00:00:00')",
            (digest, json.dumps(doc)),
        )
    _refused(shop.c("halt", "raise", "--reason", "x", *shop.as_("alice")), 3, "rotated away from")
    with sqlite3.connect(shop.c.home / "custody.db") as db:
        db.execute("DELETE FROM roster WHERE serial = 2")

    # A roster of the new manifest needs three of its founders: two old ones are not enough.
    dave = shop.tmp / "dave.key"
    assert shop.c("employee", "keygen", "dave", "--out", str(dave), "--roles", "request,approve,lift").exit_code == 0
    shop.employees["dave"] = dave
    new_roster = _export(shop, "roster", "roster-new-founders.json")
    assert "mallory" not in new_roster.read_text()  # the old proposal was superseded
    _sign(shop.c, shop, "roster", new_roster, "founder-a", "founder-b")
    _refused(shop.c("roster", "apply", str(new_roster)), 4, "a roster needs 3")
    _refused(signer("roster", "pin", str(new_roster)), 4, "a roster needs 3")
    # The new founder's signature counts: founder-d was no founder of the first manifest.
    _sign(shop.c, shop, "roster", new_roster, "founder-d")
    assert shop.c("roster", "apply", str(new_roster)).exit_code == 0
    assert signer("roster", "pin", str(new_roster)).exit_code == 0
    # A machine that never pinned the rotation does not know these founders.
    _refused(_machine(shop, "stale")("roster", "pin", str(new_roster)), 4, "another founders' manifest")
    shown = shop.ok("roster", "show")
    assert shown["serial"] == 2 and "dave" in [e["name"] for e in shown["employees"]]


def test_a_rulebook_the_old_founders_sign_after_the_rotation_is_refused(
    shop: EmbeddedShop, world: dict[str, Any]
) -> None:
    old_rules, signer = world["old_rules"], world["signer"]
    _sign(_machine(shop, "old-founders-rules"), shop, "rules", old_rules, "founder-a", "founder-b")
    _refused(shop.c("rules", "apply", str(old_rules)), 4, "which the founders rotated away from")
    _refused(signer("rules", "pin", str(old_rules)), 4, "which the founders rotated away from")
    # The carried rulebook #1 (of the old founders) is still what a signer may pin.
    assert signer("rules", "pin", str(world["rules_1"])).exit_code == 0

    new_rules = _propose_rules(shop, {"max_withdrawal_sat": 3 * BTC}, "rules-new-founders")
    assert json.loads(new_rules.read_text())["rulebook"]["manifest"] == shop.ok("rotate", "show")[-1]["manifest_digest"]
    _sign(shop.c, shop, "rules", new_rules, "founder-a", "founder-b")
    _refused(shop.c("rules", "apply", str(new_rules)), 4, "a rulebook needs 3")
    _refused(signer("rules", "pin", str(new_rules)), 4, "a rulebook needs 3")
    _sign(shop.c, shop, "rules", new_rules, "founder-d")
    assert shop.c("rules", "apply", str(new_rules)).exit_code == 0
    assert signer("rules", "pin", str(new_rules)).exit_code == 0
    assert shop.ok("rules", "show")["applied"][-1]["serial"] == 2


def test_what_was_signed_before_the_rotation_stands_for_its_history(shop: EmbeddedShop, world: dict[str, Any]) -> None:
    # After the new founders' roster #2 and rulebook #2: the old withdrawal's approvals (made
    # under roster #1 of the old founders) still verify, and the old halt's lift still counts.
    shown = shop.ok("withdraw", "show", str(world["old_withdrawal"]))
    assert shown["status"] == "confirmed", shown
    assert sorted(shown["approvals"]["valid"]) == ["alice", "bob"], shown
    status = shop.c("halt", "status", "--json")
    assert status.exit_code == 0, status.output
    assert shop.ok("audit", "log", "--verify")["ok"]
    # A withdrawal requested by dave (enrolled by the new founders), under their rulebook #2, passes
    # the review of a signer that pinned the rotation.
    shop.deposit("acct-2")  # an address of the new policy
    to, _ = destination()
    w = shop.ok("withdraw", "request", "--account", "acct-2", "--to", to, "--amount", "0.2", *shop.as_("dave"))
    for who in ("alice", "bob"):
        shop.ok("withdraw", "approve", str(w["id"]), *shop.as_(who), "--yes")
    psbt = shop.tmp / "new.psbt"
    assert shop.c("withdraw", "export", str(w["id"]), str(psbt)).exit_code == 0
    key = str(shop.founder_keys["founder-a"])
    # The insider swaps in the roster the old founders signed after the rotation (mallory in it):
    # the signer refuses it from its own pinned chain.
    p = psbt_lib.Psbt.parse(read_psbt(psbt))
    p.proprietary[psbt_lib.ProprietaryKey(PROPRIETARY_ID, PROP_ROSTER, b"")] = world["old_roster"].read_bytes()
    swapped = shop.tmp / "new-swapped.psbt"
    swapped.write_bytes(p.serialize())
    refused = shop.c("sign", str(swapped), "--key", key, "--out", str(shop.tmp / "x.psbt"), "--yes")
    _refused(refused, 4, "which the founders rotated away from")
    out = shop.tmp / "new-a.psbt"
    review = shop.ok("sign", str(psbt), "--key", key, "--out", str(out), "--yes")
    assert (review["roster_serial"], review["rulebook_serial"], review["requester"]) == (2, 2, "dave"), review


def test_a_forged_roster_applied_entry_adds_no_lift_key(shop: EmbeddedShop, world: dict[str, Any]) -> None:
    """alice, the insider, signs a lift herself, then appends (well chained: the tool's own
    library computes the hashes) a ``roster.applied`` entry naming the real roster #2 but listing
    a lift key of hers as employee mallory, a ``halt.lifted`` entry with both signatures, and
    marks the row lifted by SQL. The lift does not count: who may lift is read from the founders'
    roster itself."""
    halt_id = _raise(shop, "forged lift")
    assert shop.c("halt", "lift", str(halt_id), *shop.as_("alice")).exit_code == 0
    key = coincurve.PrivateKey()
    mallory = {"name": "mallory", "keys": [key.public_key.format().hex()], "roles": ["lift"], "enabled": True}
    db = Database(f"sqlite:///{shop.c.home / 'custody.db'}")
    try:
        with db.transaction() as s:
            from sqlmodel import col, select

            from custody.store.models import AuditEntry, HaltLift

            entries = s.exec(select(AuditEntry).order_by(col(AuditEntry.seq))).all()
            applied = json.loads([e for e in entries if e.event == "roster.applied"][-1].payload)
            raised = json.loads([e for e in entries if e.event == "halt.raised"][-1].payload)
            (alice,) = s.exec(select(HaltLift).where(HaltLift.halt_id == halt_id)).all()
            statement = [halt_id, raised["raised_at"], "alice", "forged lift"]
            forged = applied | {"employees": [*applied["employees"], mallory]}
            audit_log.append(s, "roster.applied", "operator", forged)
            lifts = [
                {"employee": "alice", "pubkey": alice.pubkey, "signature": alice.signature},
                {
                    "employee": "mallory",
                    "pubkey": mallory["keys"][0],
                    "signature": sign_statement(key, LIFT_DOMAIN, statement),
                },
            ]
            audit_log.append(
                s, "halt.lifted", "alice,mallory", {"halt_id": halt_id, "signers": ["alice", "mallory"], "lifts": lifts}
            )
        with sqlite3.connect(shop.c.home / "custody.db") as raw:
            raw.execute("UPDATE halt SET active = 0 WHERE id = ?", (halt_id,))
        with db.transaction() as s:
            assert audit_log.verify_chain(s) == []  # the chain itself is intact
    finally:
        db.dispose()
    status = shop.c("halt", "status", "--json")
    assert status.exit_code == 3, status.output
    (halt,) = json.loads(status.stdout)["halts"]
    assert halt["id"] == halt_id and "1 valid employee signature(s)" in halt["problem"], halt
    assert shop.c("address", "new", "--account", "acct-1").exit_code == 3
