"""The trading halt: raised, persistent across processes, fail-closed, lifted by two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Custody, append_entry, forged_lift, founders, staffed


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Custody, dict[str, Path]]:
    return staffed(tmp_path / "home")


def _raise(c: Custody, keys: dict[str, Path], who: str = "alice", reason: str = "suspicious") -> int:
    result = c("halt", "raise", "--reason", reason, "--as", who, "--key", str(keys[who]), "--json")
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["halt_id"])


def _lift(c: Custody, keys: dict[str, Path], halt_id: int, who: str) -> dict[str, object]:
    result = c("halt", "lift", str(halt_id), "--as", who, "--key", str(keys[who]), "--json")
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_running_store_reports_running(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, _ = shop
    result = c("halt", "status", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["halted"] is False
    assert json.loads((c.home / "halt.json").read_text())["halted"] is False


def test_employee_halt_stops_issuance_and_is_mirrored(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, keys = shop
    halt_id = _raise(c, keys, reason="wallet looks wrong")
    status = c("halt", "status", "--json")
    assert status.exit_code == 3
    state = json.loads(status.stdout)
    assert state["halted"] and state["halts"][0]["raised_by"] == "alice"
    assert state["halts"][0]["reason"] == "wallet looks wrong"
    mirror = json.loads((c.home / "halt.json").read_text())
    assert mirror["halted"] is True and mirror["halts"][0]["id"] == halt_id
    refused = c("address", "new", "--account", "x")
    assert refused.exit_code == 3 and "halted" in refused.stderr
    assert c.json("address", "list") == []


def test_halt_persists_across_processes(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, keys = shop
    _raise(c, keys)
    env = dict(os.environ, **c.env)
    proc = subprocess.run(
        [sys.executable, "-m", "custody_cli", "halt", "status"], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 3, proc.stderr
    assert "HALTED" in proc.stdout


def test_lift_needs_two_distinct_employees(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, keys = shop
    halt_id = _raise(c, keys)
    first = _lift(c, keys, halt_id, "alice")
    assert first["lifted"] is False and first["signers"] == ["alice"]
    again = _lift(c, keys, halt_id, "alice")  # the same employee twice counts once
    assert again["lifted"] is False and again["signers"] == ["alice"]
    assert c("halt", "status").exit_code == 3
    second = _lift(c, keys, halt_id, "bob")
    assert second["lifted"] is True and second["signers"] == ["alice", "bob"]
    assert c("halt", "status").exit_code == 0
    assert json.loads((c.home / "halt.json").read_text())["halted"] is False
    assert c("halt", "lift", str(halt_id), "--as", "carol", "--key", str(keys["carol"])).exit_code == 6
    assert c("address", "new", "--account", "x").exit_code == 0


def test_lift_refuses_strangers_wrong_keys_and_disabled_employees(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, keys = shop
    halt_id = _raise(c, keys)
    assert c("halt", "lift", str(halt_id), "--as", "mallory", "--key", str(keys["alice"])).exit_code == 5
    wrong = c("halt", "lift", str(halt_id), "--as", "bob", "--key", str(keys["alice"]))
    assert wrong.exit_code == 4 and "not one of bob's keys" in wrong.stderr
    _lift(c, keys, halt_id, "alice")
    assert c("employee", "disable", "alice").exit_code == 0
    c.apply_roster()  # the founders sign the roster that disables her
    # alice's earlier consent counts no more once she is disabled
    after_bob = _lift(c, keys, halt_id, "bob")
    assert after_bob["lifted"] is False and after_bob["signers"] == ["bob"]
    assert c("halt", "lift", str(halt_id), "--as", "alice", "--key", str(keys["alice"])).exit_code == 4
    assert _lift(c, keys, halt_id, "carol")["lifted"] is True
    assert c("halt", "lift", "999", "--as", "bob", "--key", str(keys["bob"])).exit_code == 5


def test_wrong_passphrase_cannot_halt_or_lift(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, keys = shop
    c.env["CUSTODY_PASSPHRASE"] = "not the passphrase"
    result = c("halt", "raise", "--reason", "r", "--as", "alice", "--key", str(keys["alice"]))
    assert result.exit_code == 7 and "wrong passphrase" in result.stderr


def test_status_view_shows_incident_timeline(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, keys = shop
    c.env["CUSTODY_CHAIN"] = "embedded"  # a node that answers: status is about the halt here
    view = c("status", "--json")
    assert view.exit_code == 0
    assert set(json.loads(view.stdout)["components"].values()) == {"operational"}
    halt_id = _raise(c, keys, reason="odd deposit")
    view = c("status", "--json")
    assert view.exit_code == 3
    data = json.loads(view.stdout)
    assert set(data["components"].values()) == {"halted"}
    incident = data["incidents"][0]
    assert incident["status"] == "investigating" and incident["halt_id"] == halt_id
    assert (
        c("incident", "update", str(incident["id"]), "--status", "identified", "--message", "found it").exit_code == 0
    )
    assert c("incident", "update", str(incident["id"]), "--status", "resolved", "--message", "x").exit_code == 6
    assert c("incident", "update", "999", "--status", "identified", "--message", "x").exit_code == 5
    _lift(c, keys, halt_id, "alice")
    _lift(c, keys, halt_id, "bob")
    data = json.loads(c("status", "--json").stdout)
    assert set(data["components"].values()) == {"operational"}
    timeline = [u["status"] for u in data["incidents"][0]["updates"]]
    assert timeline == ["investigating", "identified", "resolved"]
    text = c("status")
    assert "Incident #" in text.stdout and "identified" in text.stdout


def test_unreadable_store_reads_as_halted(shop: tuple[Custody, dict[str, Path]], tmp_path: Path) -> None:
    c, _ = shop
    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"this is not a database" * 100)
    c.env["CUSTODY_DB_URL"] = f"sqlite:///{bad}"
    status = c("halt", "status", "--json")
    assert status.exit_code == 3
    assert json.loads(status.stdout)["halted"] is True
    assert c("address", "new", "--account", "x").exit_code in (3, 9)


def test_halt_hook_runs_on_every_change(shop: tuple[Custody, dict[str, Path]], tmp_path: Path) -> None:
    c, keys = shop
    log = tmp_path / "hook.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$CUSTODY_HALTED" >> {log}\n')
    hook.chmod(0o755)
    c.env["CUSTODY_HALT_HOOK"] = str(hook)
    halt_id = _raise(c, keys)
    _lift(c, keys, halt_id, "alice")
    _lift(c, keys, halt_id, "bob")
    assert log.read_text().split() == ["1", "0"]


def test_issuance_mismatch_raises_the_halt_and_returns_nothing(shop: tuple[Custody, dict[str, Path]]) -> None:
    """The store's policy no longer matches the founders-signed manifest: a founder's key swapped
    in the store by SQL."""
    import sqlite3

    c, _ = shop
    assert c("address", "new", "--account", "a").exit_code == 0
    outsider = founders(tag="outsider")[2]
    db = sqlite3.connect(c.home / "custody.db")
    db.execute("UPDATE founder SET xpub = ? WHERE position = 2", (str(outsider.account),))
    db.commit()
    db.close()
    result = c("address", "new", "--account", "a", "--json")
    assert result.exit_code == 3
    assert "failed verification" in result.stderr and "halted" in result.stderr
    assert result.stdout == ""  # the address is never shown
    assert [a["index"] for a in c.json("address", "list")] == [0]  # nor stored
    state = json.loads(c("halt", "status", "--json").stdout)
    assert state["halted"] and state["halts"][0]["source"] == "verification"


def test_an_edited_pinned_manifest_is_not_trusted_and_halts(shop: tuple[Custody, dict[str, Path]]) -> None:
    """An outsider's xpub written into the pinned manifest: the founders' signatures no longer
    cover it, so nothing is issued against it and trading halts."""
    c, _ = shop
    pinned = c.home / "founders-manifest.json"
    manifest = json.loads(pinned.read_text())
    manifest["founders"][2]["xpub"] = str(founders(tag="outsider")[2].account)
    pinned.write_text(json.dumps(manifest))
    result = c("address", "new", "--account", "a", "--json")
    assert result.exit_code == 3 and result.stdout == ""
    assert "cannot be trusted" in result.stderr and "founder-c" in result.stderr
    assert c.json("address", "list") == []
    state = json.loads(c("halt", "status", "--json").stdout)
    assert state["halted"] and state["halts"][0]["source"] == "verification"


def test_a_pinned_manifest_without_a_founders_signature_is_not_trusted(shop: tuple[Custody, dict[str, Path]]) -> None:
    """founder-c's signature taken out of the pinned manifest (the body untouched): what the
    machine believes is checked signature by signature, so nothing is issued and no halt is
    lifted against it (exit 3)."""
    c, keys = shop
    pinned = c.home / "founders-manifest.json"
    manifest = json.loads(pinned.read_text())
    manifest["signatures"] = [x for x in manifest["signatures"] if x["founder"] != "founder-c"]
    pinned.write_text(json.dumps(manifest))
    result = c("address", "new", "--account", "a", "--json")
    assert result.exit_code == 3 and result.stdout == ""
    assert "founder founder-c has not signed it" in result.stderr
    assert c.json("address", "list") == []
    lifted = c("halt", "lift", "1", "--as", "alice", "--key", str(keys["alice"]))
    assert lifted.exit_code == 3 and "founder founder-c has not signed it" in lifted.stderr


def test_verify_command_halts_on_a_tampered_store(shop: tuple[Custody, dict[str, Path]], tmp_path: Path) -> None:
    import sqlite3

    c, _ = shop
    issued = c.json("address", "new", "--account", "a", "--count", "3")
    manifest = tmp_path / "auditors.json"
    assert c("policy", "manifest", "--out", str(manifest)).exit_code == 0
    clean = c("verify", "addresses", "--manifest", str(manifest), "--json")
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.stdout)["checked"] == 3
    db = sqlite3.connect(c.home / "custody.db")
    from custody.bitcoin.network import REGTEST
    from custody.bitcoin.script import ScriptType
    from custody.policy.generator import AddressDeriver
    from custody.policy.model import make_policy

    outsiders = founders(tag="outsider")
    other = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in outsiders])
    assert issued[1]["address"] != AddressDeriver(other).derive(0, 1).address
    db.execute("UPDATE address SET address = ? WHERE idx = 1", (AddressDeriver(other).derive(0, 1).address,))
    db.commit()
    db.close()
    dirty = c("verify", "addresses", "--manifest", str(manifest), "--json")
    assert dirty.exit_code == 3
    report = json.loads(dirty.stdout)
    assert report["ok"] is False and report["halt_id"]
    assert any(f["index"] == 1 and "derived" in f["reason"] for f in report["failures"])
    assert c("halt", "status").exit_code == 3
    export = tmp_path / "export.jsonl"
    assert c("address", "export", str(export)).exit_code == 0
    lines = export.read_text().splitlines()
    export.write_text("\n".join(lines[:-1]) + "\n")  # truncated: the trailer is gone
    truncated = c("verify", "addresses", "--manifest", str(manifest), "--export", str(export), "--no-halt", "--json")
    assert truncated.exit_code == 3
    assert "trailer" in truncated.stdout or "truncated" in truncated.stdout
    missing = c("verify", "addresses", "--manifest", str(tmp_path / "nope.json"))
    assert missing.exit_code == 2


# ---------------------------------------------------------------- forged lift entries (the ORM path)


def test_a_forged_lift_entry_neither_lifts_nor_blocks_the_real_lift(shop: tuple[Custody, dict[str, Path]]) -> None:
    """The insider appends, well chained, a ``halt.lifted`` entry signed by nobody's key and marks
    the row lifted by SQL: still halted, issuance refused. Then alice and bob lift it for real:
    trading runs, though the forged entry came first; it is named as written outside the tool."""
    import sqlite3

    c, keys = shop
    halt_id = _raise(c, keys)
    append_entry(c, "halt.lifted", "alice,bob", forged_lift(halt_id))
    with sqlite3.connect(c.home / "custody.db") as db:
        db.execute("UPDATE halt SET active = 0, lifted_at = '2026-01-01 00:00:00.000000'")
    refused = c("address", "new", "--account", "a")
    assert refused.exit_code == 3 and "0 valid employee signature(s)" in refused.stderr
    assert _lift(c, keys, halt_id, "alice")["lifted"] is False
    assert _lift(c, keys, halt_id, "bob")["lifted"] is True
    assert c("address", "new", "--account", "a").exit_code == 0
    status = c("halt", "status", "--json")
    assert status.exit_code == 0 and json.loads(status.stdout)["halted"] is False
    assert "lifts nothing" in status.stderr and "written outside the tool" in status.stderr
    assert c("audit", "log", "--verify").exit_code == 0  # well chained: the halt state is what reports it


def test_a_lift_entry_inserted_by_plain_sql_breaks_the_chain(shop: tuple[Custody, dict[str, Path]]) -> None:
    """The same forgery by plain SQL, not re-hashed (the head moved to it): it holds the real
    lift back no more than the well-chained one, and the chain check fails and halts, as it
    does for any entry edited or inserted behind the tool."""
    import sqlite3

    c, keys = shop
    halt_id = _raise(c, keys)
    with sqlite3.connect(c.home / "custody.db") as db:
        seq, at, prev = db.execute("SELECT seq, at, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        payload = json.dumps(forged_lift(halt_id), sort_keys=True, separators=(",", ":"))
        db.execute(
            "INSERT INTO audit_log (seq, at, event, actor, payload, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq + 1, at, "halt.lifted", "alice,bob", payload, prev, "ab" * 32),
        )
        db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq + 1, "ab" * 32))
    _lift(c, keys, halt_id, "alice")
    assert _lift(c, keys, halt_id, "bob")["lifted"] is True
    assert c("halt", "status").exit_code == 0
    verified = c("audit", "log", "--verify")
    assert verified.exit_code == 3 and f"{seq + 1}" in verified.output, verified.output
    assert c("halt", "status").exit_code == 3


def test_an_older_roster_replayed_into_the_log_gives_no_lift_key_back(shop: tuple[Custody, dict[str, Path]]) -> None:
    """bob's key was stolen; the founders disabled him (the next roster). carol, the insider,
    appends (well chained) a ``roster.applied`` entry replaying the founders' older roster, in
    which bob may lift, then a ``halt.lifted`` entry with her own and the stolen key's valid
    signatures, and marks the row lifted. The replayed roster changes nothing: still halted."""
    import sqlite3

    from custody.control.halt_lift import LIFT_DOMAIN
    from custody.identity.keyfile import open_employee_key
    from custody.identity.statements import sign_statement
    from tests.support import PASSPHRASE

    c, keys = shop
    with sqlite3.connect(c.home / "custody.db") as db:
        query = "SELECT payload FROM audit_log WHERE event = 'roster.applied' ORDER BY seq DESC"
        (older,) = db.execute(query).fetchone()
    assert c("employee", "disable", "bob").exit_code == 0
    c.apply_roster()
    halt_id = _raise(c, keys, reason="bob's key was stolen")
    with sqlite3.connect(c.home / "custody.db") as db:
        (raised,) = db.execute("SELECT payload FROM audit_log WHERE event = 'halt.raised'").fetchone()
    statement = [halt_id, json.loads(raised)["raised_at"], "alice", "bob's key was stolen"]
    lifts = []
    for who in ("carol", "bob"):
        key = open_employee_key(keys[who], PASSPHRASE)
        signature = sign_statement(key.private_key, LIFT_DOMAIN, statement)
        lifts.append({"employee": who, "pubkey": key.public_key.hex(), "signature": signature})
    append_entry(c, "roster.applied", "operator", json.loads(older))
    append_entry(c, "halt.lifted", "carol,bob", {"halt_id": halt_id, "signers": ["carol", "bob"], "lifts": lifts})
    with sqlite3.connect(c.home / "custody.db") as db:
        db.execute("UPDATE halt SET active = 0, lifted_at = '2026-01-01 00:00:00.000000'")
    status = c("halt", "status", "--json")
    assert status.exit_code == 3, status.output
    (halt,) = json.loads(status.stdout)["halts"]
    assert halt["id"] == halt_id and "1 valid employee signature(s)" in halt["problem"], halt
    assert c("address", "new", "--account", "a").exit_code == 3
