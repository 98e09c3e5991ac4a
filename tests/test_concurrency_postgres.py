"""Several operator processes at once against the PostgreSQL server and the real node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from custody.store.db import normalize_url
from tests.withdraw_support import Shop

pytestmark = [pytest.mark.postgres, pytest.mark.regtest]


def _start(shop: Shop, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, **shop.c.env)
    env.pop("CUSTODY_CRASH_AT", None)
    return subprocess.Popen(
        [sys.executable, "-m", "custody_cli", *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _all(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append((p.returncode, stdout, stderr))
    return out


def _events(url: str) -> list[str]:
    engine = create_engine(normalize_url(url))
    with engine.connect() as conn:
        rows = [r[0] for r in conn.execute(text("SELECT event FROM audit_log ORDER BY seq"))]
    engine.dispose()
    return rows


def test_operators_race_over_coins_approvals_and_broadcast(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient, pg_url: str
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet, db_url=pg_url)
    shop.deposit("acct-1", "0.1", count=3)  # three coins, four requests

    to, node_address = shop.destination()
    requests = [
        _start(
            shop,
            "withdraw",
            "request",
            "--account",
            "acct-1",
            "--to",
            to,
            "--amount",
            "0.05",
            *shop.as_("carol"),
            "--json",
        )
        for _ in range(4)
    ]
    results = _all(requests)
    won = [json.loads(out) for code, out, _ in results if code == 0]
    lost = [err for code, _, err in results if code != 0]
    assert len(won) == 3 and len(lost) == 1, results
    assert "unreserved" in lost[0]
    outpoints = [i["outpoint"] for w in won for i in w["inputs"]]
    assert len(outpoints) == len(set(outpoints)) == 3  # no coin booked twice

    wid = str(won[0]["id"])
    approvals = _all(
        [_start(shop, "withdraw", "approve", wid, *shop.as_(who), "--yes") for who in ("alice", "alice", "bob", "bob")]
    )
    assert all(code == 0 for code, _, _ in approvals), approvals
    shown = shop.ok("withdraw", "show", wid)
    assert shown["approvals"]["valid"] == ["alice", "bob"] and shown["status"] == "approved"
    assert _events(pg_url).count("withdrawal.approved") == 2  # each employee counted once

    psbt = tmp_path / "w.psbt"
    assert shop.cli("withdraw", "export", wid, str(psbt)).exit_code == 0
    for founder in ("founder-a", "founder-b"):
        assert shop.sign(psbt, founder, tmp_path / f"{founder}.psbt").exit_code == 0
    _all([_start(shop, "withdraw", "import", wid, str(tmp_path / f"{f}.psbt")) for f in ("founder-a", "founder-b")])
    assert shop.ok("withdraw", "show", wid)["status"] == "signed"
    finals = _all([_start(shop, "withdraw", "finalize", wid, "--json") for _ in range(3)])
    assert len({json.loads(out)["txid"] for code, out, _ in finals if code == 0}) == 1
    sent = _all([_start(shop, "withdraw", "broadcast", wid, "--json") for _ in range(3)])
    txids = {json.loads(out)["txid"] for code, out, _ in sent if code == 0}
    assert len(txids) == 1, sent  # exactly one transaction for the withdrawal
    assert _events(pg_url).count("withdrawal.broadcast") == 1
    shop.mine(1)
    shop.ok("sync")
    assert shop.wallet.call("listreceivedbyaddress", 0, False, False, node_address)[0]["txids"] == list(txids)


def test_the_halt_wins_every_race_with_issuance(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient, pg_url: str
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet, db_url=pg_url)
    issuers = [_start(shop, "address", "new", "--account", f"acct-{i}", "--count", "1") for i in range(6)]
    halt = _start(shop, "halt", "raise", "--reason", "race", *shop.as_("alice"), "--json")
    more = [_start(shop, "address", "new", "--account", f"late-{i}", "--count", "1") for i in range(6)]
    results = _all([*issuers, halt, *more])
    assert results[6][0] == 0, results[6]
    for code, _, err in [*results[:6], *results[7:]]:
        assert code in (0, 3), err
    events = _events(pg_url)
    raised = events.index("halt.raised")
    assert "address.issued" not in events[raised:]  # nothing issued after the halt took effect
    refused = sum(1 for code, _, _ in [*results[:6], *results[7:]] if code == 3)
    assert refused == 12 - events.count("address.issued")

    halt_id = json.loads(results[6][1])["halt_id"]
    lifts = _all(
        [_start(shop, "halt", "lift", str(halt_id), *shop.as_(who), "--json") for who in ("alice", "bob", "carol")]
    )
    assert all(code in (0, 6) for code, _, _ in lifts), lifts
    assert _events(pg_url).count("halt.lifted") == 1
    status = shop.cli("halt", "status", "--json")
    assert status.exit_code == 0, status.output
