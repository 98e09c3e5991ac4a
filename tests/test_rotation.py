"""Key rotation to a new quorum, on the embedded chain: a 2-of-3 store rotates to 3-of-4 with the
approval of two current founders; new addresses come from the new policy, an old address keeps
receiving and crediting; the verifier and the reserves proof know both policies. Then the
insider's attacks: a rotation approved by one founder only (by the CLI and written by SQL), a
rotated address row rewritten in either policy, a rotation during a halt."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bitcoin.core.script import CScript

from custody import verify
from custody.bitcoin import psbt as psbt_lib
from custody.chain.embedded import open_chain
from custody.chain.kernel import COINBASE_MATURITY
from custody.policy.generator import AddressDeriver
from custody.policy.manifest import load_signed_manifest
from tests.rotation_support import approve_as, draft_3_of_4
from tests.support import read_psbt, run_cli
from tests.test_withdraw_embedded import EmbeddedShop, destination

OP_TRUE = b"\x51"


def _db(shop: EmbeddedShop) -> sqlite3.Connection:
    return sqlite3.connect(shop.c.home / "custody.db", isolation_level=None)


def _killed_at(shop: EmbeddedShop, point: str, *args: str) -> None:
    """``custody ARGS`` in a subprocess, SIGKILLed at ``point`` (the chain handed over meanwhile)."""
    shop.chain.close()
    try:
        killed = run_cli(shop.c.env, *args, crash_at=point)
    finally:
        shop.chain = open_chain(shop.tmp / "home" / "chain")
    assert killed.returncode == -9, killed.stderr


def _lift(shop: EmbeddedShop, halt_id: int) -> None:
    for who in ("alice", "bob"):
        assert shop.c("halt", "lift", str(halt_id), *shop.as_(who)).exit_code == 0


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path_factory.mktemp("rotate"), "p2wsh")
    yield s
    s.chain.close()


@pytest.fixture(scope="module")
def rotated(shop: EmbeddedShop) -> dict[str, Any]:
    """The store before and after its rotation: an old address, the manifests, a new address."""
    (old,) = shop.ok("address", "new", "--account", "acct-1")
    first = shop.c.home / "founders-manifest.json"
    rotation = draft_3_of_4(shop, shop.tmp / "rotation.json")
    approve_as(shop, rotation, "founder-a")
    too_few = shop.c("rotate", "apply", str(rotation), "--json")
    assert too_few.exit_code == 2 and "approved by 1 of the current founders" in too_few.stderr, too_few.output
    assert shop.ok("rotate", "show")[-1]["epoch"] == 0  # nothing recorded, nothing pinned
    assert not (shop.c.home / "founders-rotations.json").exists()
    approve_as(shop, rotation, "founder-b")
    epoch = shop.ok("rotate", "apply", str(rotation))
    (new,) = shop.ok("address", "new", "--account", "acct-2")
    return {"old": old, "new": new, "first": first, "rotation": rotation, "epoch": epoch}


def test_new_addresses_come_from_the_new_quorum(shop: EmbeddedShop, rotated: dict[str, Any]) -> None:
    epoch = rotated["epoch"]
    assert (epoch["epoch"], epoch["threshold"], epoch["n"], epoch["receive_from"]) == (1, 3, 4, 1)
    old_m = verify.load_manifest(rotated["first"])
    new_m = verify.load_manifest(rotated["rotation"])
    old, new = rotated["old"], rotated["new"]
    # The independent verifier derives each from its own policy and from no other.
    assert verify.verify_address(old_m, 0, old["index"], old["address"]) == []
    assert verify.verify_address(new_m, 0, new["index"], new["address"]) == []
    assert verify.verify_address(old_m, 0, new["index"], new["address"]) != []
    assert verify.verify_address(new_m, 0, old["index"], old["address"]) != []
    entries = shop.ok("audit", "log")
    rotated_entry = [e for e in entries if e["event"] == "policy.rotated"]
    assert len(rotated_entry) == 1 and rotated_entry[0]["payload"]["approved_by"] == ["founder-a", "founder-b"]


def test_a_deposit_to_an_old_address_after_the_rotation_is_credited(
    shop: EmbeddedShop, rotated: dict[str, Any]
) -> None:
    shop.chain.mine(1, bytes.fromhex(rotated["old"]["script_pubkey"]))
    shop.chain.mine(1, bytes.fromhex(rotated["new"]["script_pubkey"]))
    shop.chain.mine(COINBASE_MATURITY, OP_TRUE)
    shop.ok("sync")
    deposits = {d["account"]: d for d in shop.ok("ledger", "deposits")}
    assert deposits["acct-1"]["status"] == "credited" and deposits["acct-2"]["status"] == "credited"
    assert shop.ok("ledger", "balance", "customer:acct-1")["balance_sat"] == deposits["acct-1"]["amount_sat"] > 0


def test_a_withdrawal_after_the_rotation_is_signed_by_the_new_quorum(
    shop: EmbeddedShop, rotated: dict[str, Any]
) -> None:
    to, spk = destination()
    w = shop.ok("withdraw", "request", "--account", "acct-2", "--to", to, "--amount", "0.5", *shop.as_("carol"))
    wid = str(w["id"])
    for who in ("alice", "bob"):
        shop.ok("withdraw", "approve", wid, *shop.as_(who), "--yes")
    psbt = shop.tmp / f"w{wid}.psbt"
    assert shop.c("withdraw", "export", wid, str(psbt)).exit_code == 0
    # A signer machine that never pinned the rotation does not know this policy.
    stale = EmbeddedSigner(shop)
    refused = stale("sign", str(psbt), "--key", str(shop.founder_keys["founder-a"]), "--out", "-", "--yes")
    assert refused.exit_code == 2 and "another policy than the founders' manifests pinned here" in refused.stderr
    signed_by = []
    for founder in ("founder-a", "founder-b", "founder-d"):
        out = shop.tmp / f"w{wid}-{founder}.psbt"
        signed = shop.c("sign", str(psbt), "--key", str(shop.founder_keys[founder]), "--out", str(out), "--yes")
        assert signed.exit_code == 0, signed.output
        imported = shop.ok("withdraw", "import", wid, str(out))
        signed_by.append(imported["status"])
        if founder == "founder-b":  # two of the old quorum are no longer enough
            assert shop.c("withdraw", "finalize", wid).exit_code != 0
    shop.ok("withdraw", "finalize", wid)
    shop.ok("withdraw", "broadcast", wid)
    shop.chain.mine(1, OP_TRUE)
    assert shop.ok("sync")[0]["status"] == "confirmed"
    assert [u.amount for u in shop.chain.unspent([spk])] == [50_000_000]
    # Its change went to the new policy's change chain (the independent verifier says so).
    new_m = verify.load_manifest(rotated["rotation"])
    (change,) = [a for a in shop.ok("address", "list") if a["chain"] == 1]
    assert verify.verify_address(new_m, 1, change["index"], change["address"]) == []


def test_the_old_policy_coins_are_swept_to_the_new_one_once_across_sigkills(
    shop: EmbeddedShop, rotated: dict[str, Any]
) -> None:
    old_spk = bytes.fromhex(rotated["old"]["script_pubkey"])
    (old_coin,) = shop.chain.unspent([old_spk])
    fees_before = shop.ok("ledger", "balance", "expense:network-fees")["balance_sat"]
    customer_before = shop.ok("ledger", "balance", "customer:acct-1")["balance_sat"]
    # Killed inside the sweep's transaction: nothing recorded, nothing reserved.
    _killed_at(shop, "sweep.requested", "rotate", "sweep", *shop.as_("carol"))
    assert [w for w in shop.ok("withdraw", "list") if w["withdrawal_kind"] == "sweep"] == []
    sweep = shop.ok("rotate", "sweep", *shop.as_("carol"))
    wid = str(sweep["id"])
    assert [i["outpoint"] for i in sweep["inputs"]] == [f"{old_coin.txid}:{old_coin.vout}"]
    assert sweep["amount_sat"] + sweep["fee_sat"] == old_coin.amount
    twice = shop.c("rotate", "sweep", *shop.as_("carol"))
    assert twice.exit_code == 6 and "one sweep at a time" in twice.stderr
    # Its one output is the new policy's (the independent verifier says so), at a change index.
    new_m = verify.load_manifest(rotated["rotation"])
    assert verify.verify_address(new_m, 1, sweep["change_index"], sweep["destination"]) == []
    unapproved = shop.c("withdraw", "export", wid, str(shop.tmp / "early.psbt"))
    assert unapproved.exit_code == 4  # two employees first
    for who in ("alice", "bob"):
        shop.ok("withdraw", "approve", wid, *shop.as_(who), "--yes")
    psbt = shop.tmp / f"sweep{wid}.psbt"
    assert shop.c("withdraw", "export", wid, str(psbt)).exit_code == 0
    # A signer that never pinned the rotation cannot see where the coins go: refused.
    stale = EmbeddedSigner(shop)
    refused = stale("sign", str(psbt), "--key", str(shop.founder_keys["founder-a"]), "--out", "-", "--yes")
    assert refused.exit_code == 2 and "does not re-derive" in refused.stderr, refused.output
    # Two colluding insiders re-point the output, byte for byte, at the OLD policy's change
    # address (or anywhere else): the old coins move only into the newest pinned policy.
    p = psbt_lib.Psbt.parse(read_psbt(psbt))
    old_policy = load_signed_manifest(rotated["first"].read_bytes()).policy
    p.tx.vout[0].scriptPubKey = CScript(AddressDeriver(old_policy).derive(1, sweep["change_index"]).script_pubkey)
    redirected = shop.tmp / "sweep-redirected.psbt"
    redirected.write_bytes(p.serialize())
    moved = shop.c("sign", str(redirected), "--key", str(shop.founder_keys["founder-a"]), "--out", "-", "--yes")
    assert moved.exit_code == 2 and "move only to the newest policy" in moved.stderr, moved.output
    for founder in ("founder-a", "founder-c"):  # two of the OLD 2-of-3 quorum
        out = shop.tmp / f"sweep{wid}-{founder}.psbt"
        signed = shop.c("sign", str(psbt), "--key", str(shop.founder_keys[founder]), "--out", str(out), "--yes")
        assert signed.exit_code == 0, signed.output
        shop.ok("withdraw", "import", wid, str(out))
    shop.ok("withdraw", "finalize", wid)
    # Killed after the chain took it, before it was recorded: broadcast again, one transaction.
    _killed_at(shop, "withdrawal.sent", "withdraw", "broadcast", wid)
    sent = shop.ok("withdraw", "broadcast", wid)
    assert shop.chain.mempool() == [sent["txid"]]
    shop.chain.mine(1, OP_TRUE)
    assert [w["status"] for w in shop.ok("sync") if str(w["id"]) == wid] == ["confirmed"]
    shop.ok("sync")
    assert shop.chain.unspent([old_spk]) == []
    moved = shop.chain.unspent([bytes.fromhex(shop.ok("address", "show", sweep["destination"])["script_pubkey"])])
    assert [u.amount for u in moved] == [sweep["amount_sat"]]
    # The customer's balance never moved; the network fee is booked once.
    assert shop.ok("ledger", "balance", "customer:acct-1")["balance_sat"] == customer_before
    fees = shop.ok("ledger", "balance", "expense:network-fees")["balance_sat"]
    assert fees - fees_before == sweep["fee_sat"]
    assert shop.c("audit", "ledger").exit_code == 0
    nothing = shop.c("rotate", "sweep", *shop.as_("carol"))
    assert nothing.exit_code == 2 and "nothing to sweep" in nothing.stderr


def test_the_verifier_and_the_reserves_proof_know_both_policies(shop: EmbeddedShop, rotated: dict[str, Any]) -> None:
    first, rotation = str(rotated["first"]), str(rotated["rotation"])
    report = shop.ok("verify", "addresses", "--manifest", first, "--manifest", rotation)
    assert report["ok"] and report["checked"] >= 2
    # The auditors holding the first manifest alone cannot vouch for the new policy's addresses.
    alone = shop.c("verify", "addresses", "--manifest", first, "--no-halt", "--json")
    assert alone.exit_code == 3 and "policy epoch 1" in alone.stdout
    export = shop.tmp / "addresses.jsonl"
    assert shop.c("address", "export", str(export)).exit_code == 0
    assert shop.ok("verify", "addresses", "--manifest", first, "--manifest", rotation, "--export", str(export))["ok"]
    proof = shop.tmp / "reserves.json"
    shop.c("audit", "reserves", "--proof", str(proof), "--json")  # short of nothing: only proves the coins
    doc = json.loads(proof.read_text())
    assert [p["claim"] for p in doc["policies"]] == [{"m": 2, "n": 3}, {"m": 3, "n": 4}]
    assert len(doc["address"]) == 2
    checked = shop.ok("verify", "reserves", str(proof), "--manifest", first, "--manifest", rotation)
    assert checked["addresses"] == 2
    refused = shop.c("verify", "reserves", str(proof), "--manifest", first)
    assert refused.exit_code == 3


@pytest.mark.parametrize("which", ["old", "new"])
def test_a_rewritten_address_of_either_policy_halts_the_verifier(
    shop: EmbeddedShop, rotated: dict[str, Any], which: str
) -> None:
    first, rotation = str(rotated["first"]), str(rotated["rotation"])
    victim = rotated[which]
    # The insider rewrites the row to the OTHER policy's address at the same index: a real
    # founders' multisig address, of the wrong policy for its epoch. Only re-deriving each index
    # with its own epoch's policy notices.
    wrong_policy = load_signed_manifest(rotated["rotation" if which == "old" else "first"].read_bytes()).policy
    swapped = AddressDeriver(wrong_policy).derive(0, victim["index"])
    db = _db(shop)
    db.execute(
        "UPDATE address SET address = ?, script_pubkey = ?, script = ? WHERE chain = 0 AND idx = ?",
        (swapped.address, swapped.script_pubkey.hex(), swapped.script.hex(), victim["index"]),
    )
    try:
        bad = shop.c("verify", "addresses", "--manifest", first, "--manifest", rotation, "--json")
        assert bad.exit_code == 3, bad.output
        failures = json.loads(bad.stdout)["failures"]
        assert any(f["index"] == victim["index"] and f["address"] == swapped.address for f in failures)
        assert shop.c("halt", "status").exit_code == 3
    finally:
        db.execute(
            "UPDATE address SET address = ?, script_pubkey = ?, script = ? WHERE chain = 0 AND idx = ?",
            (victim["address"], victim["script_pubkey"], victim["script"], victim["index"]),
        )
    _lift(shop, json.loads(bad.stdout)["halt_id"])
    assert shop.ok("verify", "addresses", "--manifest", first, "--manifest", rotation)["ok"]


# ---------------------------------------------------------------- a rotation too few founders approved


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path_factory.mktemp("rotate-harm"), "p2wsh")
    yield s
    s.chain.close()


def test_a_rotation_written_by_sql_with_one_approval_is_refused_everywhere(fresh: EmbeddedShop) -> None:
    shop = fresh
    (old,) = shop.ok("address", "new", "--account", "acct-1")
    rotation = draft_3_of_4(shop, shop.tmp / "rotation-one.json")
    approve_as(shop, rotation, "founder-a")
    m = load_signed_manifest(rotation.read_bytes())
    first = shop.c.home / "founders-manifest.json"
    # The insider records it by SQL (an audit entry could not be forged into the hash chain).
    db = _db(shop)
    db.execute(
        "INSERT INTO policy_epoch (epoch, digest, previous, document, receive_from, change_from, applied_at) "
        "VALUES (1, ?, ?, ?, 1, 0, '2026-01-01 00:00:00')",
        (m.digest, load_signed_manifest(first.read_bytes()).digest, json.dumps(m.to_document())),
    )
    # The store refuses to issue from it (and from the policy before it: the epochs do not stand).
    issued = shop.c("address", "new", "--account", "acct-1", "--json")
    assert issued.exit_code == 3 and "approved by 1 of the current founders" in issued.stderr, issued.output
    # A signer machine refuses to pin it.
    signer = EmbeddedSigner(shop)
    pinned = signer("rotate", "pin", str(rotation), "--fingerprint", m.fingerprint)
    assert pinned.exit_code == 2 and "needs 2" in pinned.stderr, pinned.output
    # The independent verifier refuses it as the auditors' manifest...
    chain = shop.c("verify", "addresses", "--manifest", str(first), "--manifest", str(rotation), "--no-halt")
    assert chain.exit_code == 2 and "it needs 2" in chain.stderr, chain.output
    # ... and, run over the store, halts on it.
    run = shop.c("verify", "addresses", "--manifest", str(first), "--json")
    assert run.exit_code == 3 and "(policy epochs)" in run.stdout, run.output
    assert shop.c("halt", "status").exit_code == 3
    db.execute("DELETE FROM policy_epoch")
    _lift(shop, json.loads(run.stdout)["halt_id"])
    assert shop.ok("address", "new", "--account", "acct-1")[0]["index"] == old["index"] + 1


def test_a_rotation_respects_the_halt_and_survives_sigkill(fresh: EmbeddedShop) -> None:
    shop = fresh
    rotation = shop.tmp / "rotation-halt.json"
    draft_3_of_4(shop, rotation)
    approve_as(shop, rotation, "founder-a")
    approve_as(shop, rotation, "founder-b")
    raised = shop.ok("halt", "raise", "--reason", "drill", *shop.as_("alice"))
    refused = shop.c("rotate", "apply", str(rotation))
    assert refused.exit_code == 3, refused.output
    assert shop.ok("rotate", "show")[-1]["epoch"] == 0
    _lift(shop, raised["halt_id"])
    # Killed between pinning and the store: nothing issued from either policy meanwhile, no halt.
    killed = run_cli(shop.c.env, "rotate", "apply", str(rotation), crash_at="rotate.pinned")
    assert killed.returncode == -9, killed.stderr
    assert shop.ok("rotate", "show")[-1]["epoch"] == 0
    waiting = shop.c("address", "new", "--account", "acct-1")
    assert waiting.exit_code == 6 and "not applied to the store" in waiting.stderr, waiting.output
    assert shop.c("halt", "status").exit_code == 0
    # Killed after the commit: applying again is refused, once is enough.
    killed = run_cli(shop.c.env, "rotate", "apply", str(rotation), crash_at="rotate.committed")
    assert killed.returncode == -9, killed.stderr
    again = shop.c("rotate", "apply", str(rotation))
    assert again.exit_code == 6 and "applied already" in again.stderr
    assert [e["epoch"] for e in shop.ok("rotate", "show")] == [0, 1]
    assert len([e for e in shop.ok("audit", "log") if e["event"] == "policy.rotated"]) == 1
    (issued,) = shop.ok("address", "new", "--account", "acct-1")
    new_m = verify.load_manifest(rotation)
    assert verify.verify_address(new_m, 0, issued["index"], issued["address"]) == []


class EmbeddedSigner:
    """Another machine (an offline signer) with only the first manifest pinned."""

    def __init__(self, shop: EmbeddedShop) -> None:
        from tests.support import Custody

        self.c = Custody(shop.tmp / "signer-home")
        self.c.home.mkdir(exist_ok=True)
        (self.c.home / "founders-manifest.json").write_bytes((shop.c.home / "founders-manifest.json").read_bytes())

    def __call__(self, *args: str) -> Any:
        return self.c(*args)


def test_a_rotation_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    from tests.rotation_support import rotated
    from tests.support import Custody, founders

    c = Custody(tmp_path / "home", db_url=pg_url)
    old = founders(n=3)
    assert c.init(old).exit_code == 0
    first = load_signed_manifest((c.home / "founders-manifest.json").read_bytes())
    new = founders(n=4, tag="rotated-")
    m = rotated(first, new, 3, old[:2])
    path = tmp_path / "rotation.json"
    path.write_text(json.dumps(m.to_document()))
    assert c("rotate", "apply", str(path)).exit_code == 0
    (issued,) = c.json("address", "new", "--account", "a")
    assert verify.verify_address(verify.load_manifest(path), 0, issued["index"], issued["address"]) == []
    assert [e["epoch"] for e in c.json("rotate", "show")] == [0, 1]
    first_file = c.home / "founders-manifest.json"
    assert c.json("verify", "addresses", "--manifest", str(first_file), "--manifest", str(path))["ok"]
