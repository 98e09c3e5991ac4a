"""Kill the tool with SIGKILL at every step, run it again: nothing lost, nothing done twice.

Pause points (custody.faults.PAUSE_POINTS) stop a process instead; tests/test_halt_file.py
uses them to hold a `halt status` between its read and its write."""

from __future__ import annotations

import json
import signal
from decimal import Decimal
from pathlib import Path

import pytest

from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from custody.control.audit_log import verify_chain
from custody.faults import PAUSE_POINTS, POINTS
from custody.store.db import Database
from tests.support import Custody, founders, run_cli
from tests.withdraw_support import Shop

KILLED = -signal.SIGKILL


def _audit_intact(home: Path) -> None:
    db = Database(f"sqlite:///{home / 'custody.db'}")
    with db.transaction() as s:
        assert verify_chain(s) == []
    db.dispose()


def test_every_crash_point_is_exercised() -> None:
    """A crash point no test kills at is a promise nobody checks (here, or beside its feature:
    the key rotation's and the sweep's in tests/test_rotation.py; the fee bump's and cancel's in
    tests/test_replace_regtest.py, on a node that relays replacements; the sync's steps for a
    consolidation in tests/test_consolidate_reorg_regtest.py)."""
    beside = (
        "test_rotation.py",
        "test_replace_regtest.py",
        "test_consolidate_reorg_regtest.py",
        "test_audit_rows_apart.py",
    )
    here = "".join(p.read_text() for p in (Path(__file__), *(Path(__file__).with_name(b) for b in beside)))
    for point in POINTS:
        assert f'"{point}"' in here, point


def test_every_pause_point_is_exercised() -> None:
    there = "".join(
        (Path(__file__).parent / name).read_text()
        for name in (
            "test_halt_file.py",
            "test_readers.py",
            "test_rotation_race.py",
            "test_webauthn_request.py",
            "test_console_record_race.py",
        )
    )
    for point in PAUSE_POINTS:
        assert f'CUSTODY_PAUSE_AT="{point}"' in there, point


@pytest.mark.parametrize("point,stored", [("issuance.allocated", 0), ("issuance.committed", 5)])
def test_issuance_killed_neither_loses_nor_reuses_an_index(tmp_path: Path, point: str, stored: int) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    killed = run_cli(c.env, "address", "new", "--account", "a", "--count", "5", "--json", crash_at=point)
    assert killed.returncode == KILLED, killed.stderr
    assert killed.stdout == ""
    assert [a["index"] for a in c.json("address", "list")] == list(range(stored))
    again = run_cli(c.env, "address", "new", "--account", "a", "--count", "5", "--json")
    assert again.returncode == 0, again.stderr
    assert [a["index"] for a in json.loads(again.stdout)] == list(range(stored, stored + 5))
    listed = c.json("address", "list")
    assert [a["index"] for a in listed] == list(range(stored + 5))  # no gap, no index twice
    assert len({a["address"] for a in listed}) == len(listed)
    _audit_intact(c.home)


def test_halt_killed_before_the_mirror_is_written_still_reads_halted(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    key = c.employee("alice")
    killed = run_cli(
        c.env, "halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(key), crash_at="halt.stored"
    )
    assert killed.returncode == KILLED
    assert json.loads((c.home / "halt.json").read_text())["halted"] is True  # written before the commit
    assert run_cli(c.env, "address", "new", "--account", "a").returncode == 3
    status = run_cli(c.env, "halt", "status", "--json")
    assert status.returncode == 3 and json.loads(status.stdout)["halts"][0]["reason"] == "drill"
    _audit_intact(c.home)


@pytest.mark.parametrize("point", ["halt.published", "halt.stored"])
def test_verification_killed_between_detection_and_the_store_leaves_trading_halted(tmp_path: Path, point: str) -> None:
    """The halt file and hook come first: killed before the store records the halt (or just
    after, before the file is rewritten), the engine reads halted, and the next command
    records the halt in the store once."""
    import sqlite3

    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "a", "--count", "3").exit_code == 0
    manifest = tmp_path / "auditors.json"
    assert c("policy", "manifest", "--out", str(manifest)).exit_code == 0
    assert run_cli(c.env, "halt", "status").returncode == 0
    db = sqlite3.connect(c.home / "custody.db")
    db.execute("UPDATE address SET account = 'mallory', address = address || 'q' WHERE idx = 2")
    db.commit()
    db.close()
    killed = run_cli(c.env, "verify", "addresses", "--manifest", str(manifest), "--workers", "1", crash_at=point)
    assert killed.returncode == KILLED, killed.stderr
    doc = json.loads((c.home / "halt.json").read_text())
    assert doc["halted"] is True  # the engine stops whatever happens next
    if point == "halt.published":
        assert doc["pending"][0]["source"] == "verification"
    assert run_cli(c.env, "address", "new", "--account", "a").returncode == 3
    status = run_cli(c.env, "halt", "status", "--json")
    assert status.returncode == 3
    after = json.loads(status.stdout)
    assert [h["source"] for h in after["halts"]] == ["verification"] and "pending" not in after
    _audit_intact(c.home)


@pytest.mark.regtest
def test_withdrawal_killed_at_every_step(tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.3", count=2)
    env = shop.c.env
    to, node_address = shop.destination()
    request = [
        "withdraw",
        "request",
        "--account",
        "acct-1",
        "--to",
        to,
        "--amount",
        "0.01",
        *shop.as_("carol"),
        "--json",
    ]

    # request: killed inside its transaction -> nothing recorded, no input reserved
    assert run_cli(env, *request, crash_at="withdrawal.requested").returncode == KILLED
    assert shop.ok("withdraw", "list") == []
    done = run_cli(env, *request)
    assert done.returncode == 0, done.stderr
    wid = str(json.loads(done.stdout)["id"])

    # approve: killed after the commit -> the approval is kept, and counts once
    approve = ["withdraw", "approve", wid, *shop.as_("alice"), "--yes", "--json"]
    assert run_cli(env, *approve, crash_at="withdrawal.approved").returncode == KILLED
    assert shop.ok("withdraw", "show", wid)["approvals"]["valid"] == ["alice"]
    assert run_cli(env, *approve).returncode == 0
    assert run_cli(env, "withdraw", "approve", wid, *shop.as_("bob"), "--yes").returncode == 0
    assert shop.ok("withdraw", "show", wid)["approvals"]["valid"] == ["alice", "bob"]

    psbt = tmp_path / "w.psbt"
    assert run_cli(env, "withdraw", "export", wid, str(psbt)).returncode == 0
    for founder in ("founder-a", "founder-b"):
        assert shop.sign(psbt, founder, tmp_path / f"{founder}.psbt").exit_code == 0

    # import: killed after the commit -> the signatures are kept; importing again adds nothing
    imp = ["withdraw", "import", wid, str(tmp_path / "founder-a.psbt")]
    assert run_cli(env, *imp, crash_at="withdrawal.imported").returncode == KILLED
    assert run_cli(env, *imp).returncode == 0
    assert run_cli(env, "withdraw", "import", wid, str(tmp_path / "founder-b.psbt")).returncode == 0
    assert shop.ok("withdraw", "show", wid)["status"] == "signed"

    # finalize: killed after the commit -> finalizing again gives the same transaction
    assert run_cli(env, "withdraw", "finalize", wid, crash_at="withdrawal.finalized").returncode == KILLED
    txid = shop.ok("withdraw", "show", wid)["txid"]
    assert txid and shop.ok("withdraw", "finalize", wid)["txid"] == txid

    # broadcast: killed after the node has it, before it is recorded -> recorded, not sent twice
    assert run_cli(env, "withdraw", "broadcast", wid, crash_at="withdrawal.sent").returncode == KILLED
    assert shop.ok("withdraw", "show", wid)["status"] == "signed"
    assert txid in shop.rpc.call("getrawmempool")
    assert run_cli(env, "withdraw", "broadcast", wid, crash_at="withdrawal.broadcast").returncode == KILLED
    assert shop.ok("withdraw", "show", wid)["status"] == "broadcast"
    assert shop.ok("withdraw", "broadcast", wid)["txid"] == txid
    shop.mine(1)
    assert shop.ok("sync")[0]["status"] == "confirmed"
    assert shop.wallet.call("getreceivedbyaddress", node_address) == Decimal("0.01")  # paid once, not twice
    assert (
        len([t for t in shop.wallet.call("listreceivedbyaddress", 0) if t["address"] == node_address][0]["txids"]) == 1
    )
    _audit_intact(shop.c.home)


def test_the_offline_signer_killed_after_its_journal_counts_the_withdrawal_once(tmp_path: Path) -> None:
    """Killed between the journal's append and the signatures: run again, it signs (its own
    entry is not counted against it) and the withdrawal counts once towards velocity."""
    from tests.test_rulebook_enforced import Offline, Shop, _signed, _with_chain

    shop = Shop.funded(tmp_path)
    try:
        limit = shop.withheld(
            {"velocity": [{"name": "daily", "scope": "global", "window_blocks": 10, "max_sat": 10**8}]}
        )
        path, more = (_with_chain(shop.export(shop.approved(btc)), [limit]) for btc in ("1", "0.001"))
        offline = Offline(shop, tmp_path / "offline")
        out = tmp_path / "s.psbt"
        args = ("sign", str(path), "--key", str(offline.key), "--yes", "--out", str(out))
        killed = run_cli(offline.env, *args, crash_at="signer.journaled")
        assert killed.returncode == KILLED and not out.exists()
        assert len((offline.home / "signer-journal.jsonl").read_text().splitlines()) == 1
        _signed(offline.sign(path))
        refused = offline.sign(more)
        assert refused.returncode == 4 and "(100000000 sat before this)" in refused.stderr, refused.stderr
    finally:
        shop.chain.close()
