"""`custody status` tells the truth: no store, a node that is down, a stale lease, what waits."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support import Custody, founders
from tests.test_withdraw_embedded import EmbeddedShop, destination


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path_factory.mktemp("status"), "p2wsh")
    s.deposit("acct-1")
    yield s
    s.chain.close()


def test_before_init_status_exits_9_as_documented(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    result = c("status")
    assert result.exit_code == 9 and "custody init" in result.stderr
    as_json = c("status", "--json")
    assert as_json.exit_code == 9 and as_json.stdout == ""
    assert json.loads(as_json.stderr)["code"] == 9
    assert not (tmp_path / "home" / "custody.db").exists()  # status created no store


def test_a_node_that_is_down_is_not_operational(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    c.env.update(CUSTODY_NODE_URL="http://127.0.0.1:9", CUSTODY_NODE_AUTH="u:p")  # discard port: refused
    result = c("status", "--json")
    assert result.exit_code == 8, result.output
    view = json.loads(result.stdout)
    assert view["operational"] is False and view["node"]["reachable"] is False
    assert any("node cannot be reached" in p for p in view["problems"])
    text = c("status")
    assert text.exit_code == 8 and "NOT OPERATIONAL" in text.stdout and "unreachable" in text.stdout


def test_a_node_that_never_answers_is_given_the_documented_timeout(tmp_path: Path) -> None:
    """A node that accepts the connection and says nothing (a hung node, a firewall that
    swallows packets) is reported unreachable after CUSTODY_STATUS_NODE_TIMEOUT, not after
    the ten minutes a withdrawal's node calls may take; a malformed value is refused."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens; nobody ever answers
        c.env.update(CUSTODY_NODE_URL=f"http://127.0.0.1:{silent.getsockname()[1]}", CUSTODY_NODE_AUTH="u:p")
        c.env["CUSTODY_STATUS_NODE_TIMEOUT"] = "0.5"
        result = c("status", "--json")
        assert result.exit_code == 8, result.output
        assert "did not answer getblockchaininfo within 0.5s" in json.loads(result.stdout)["node"]["error"]
        del c.env["CUSTODY_STATUS_NODE_TIMEOUT"]  # the default, named in the help
        result = c("status", "--json")
        assert result.exit_code == 8, result.output
        assert "within 5s" in json.loads(result.stdout)["node"]["error"]
    assert "CUSTODY_STATUS_NODE_TIMEOUT" in " ".join(c("status", "--help").stdout.split())
    c.env["CUSTODY_STATUS_NODE_TIMEOUT"] = "soon"
    refused = c("status")
    assert refused.exit_code == 2 and "CUSTODY_STATUS_NODE_TIMEOUT" in refused.stderr, refused.output


def test_status_shows_node_sync_waiting_withdrawals_and_reserves(shop: EmbeddedShop) -> None:
    to, _ = destination()
    shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.01", *shop.as_("carol"))
    audit = shop.c("audit", "reserves", "--json")
    assert audit.exit_code == 0, audit.output
    result = shop.c("status", "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    tip = shop.chain.tip_height()
    assert view["operational"] is True and view["problems"] == []
    assert view["node"] == {"reachable": True, "height": tip, "error": None}
    assert view["sync"]["height"] is not None and view["sync"]["behind"] == tip - view["sync"]["height"]
    assert view["withdrawals"]["approvals"] == 1
    reported = json.loads(audit.stdout)
    assert view["reserves"]["reserves_sat"] == reported["reserves_sat"]
    assert view["reserves"]["liabilities_sat"] == reported["liabilities_sat"]
    assert view["halt_file"]["halted"] is False and view["halt_file"]["remaining_seconds"] > 0
    assert set(view) >= {"halted", "error", "components", "incidents"}  # the status view's own keys stay
    text = shop.c("status").stdout
    assert f"height {tip}" in text and "1 for approvals" in text and "sat of liabilities" in text


def test_an_expired_lease_is_a_halt_for_the_engine(shop: EmbeddedShop) -> None:
    path = shop.c.home / "halt.json"
    original = path.read_text()
    doc = json.loads(original)
    doc["valid_until"] = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(json.dumps(doc))
    try:
        result = shop.c("status", "--json")
        assert result.exit_code == 3
        view = json.loads(result.stdout)
        assert view["operational"] is False and view["halt_file"]["remaining_seconds"] < 0
        assert "EXPIRED" in shop.c("status").stdout
    finally:
        path.write_text(original)


def test_old_resolved_incidents_only_with_all(tmp_path: Path) -> None:
    shop = EmbeddedShop(tmp_path, "p2wsh")
    try:
        raised = shop.ok("halt", "raise", "--reason", "drill", *shop.as_("alice"))
        for who in ("alice", "bob"):
            assert shop.c("halt", "lift", str(raised["halt_id"]), *shop.as_(who)).exit_code == 0
        assert [i["status"] for i in shop.ok("status")["incidents"]] == ["resolved"]  # recent: shown
        month_ago = (datetime.now(UTC) - timedelta(days=30)).replace(tzinfo=None).isoformat(sep=" ")
        with sqlite3.connect(shop.c.home / "custody.db") as db:
            db.execute("update incident set resolved_at = ?", (month_ago,))
        assert shop.ok("status")["incidents"] == []
        every = shop.ok("status", "--all")["incidents"]
        assert [i["title"] for i in every] == ["Trading halted: drill"]
    finally:
        shop.chain.close()


def test_sync_says_what_still_waits_on_the_chain(shop: EmbeddedShop) -> None:
    """Runs last on the module's store: a withdrawal in the mempool is not 'nothing'."""
    shop.deposit("acct-1")  # the first deposit's coin is reserved by the request above
    to, _ = destination()
    wid = shop.signed(to, "0.01")
    shop.ok("withdraw", "broadcast", str(wid))
    synced = shop.c("sync")
    assert synced.exit_code == 0, synced.output
    assert f"1 withdrawal broadcast, waiting for a block: #{wid}" in synced.stderr
    assert shop.ok("status")["withdrawals"] == {"approvals": 1, "signatures": 0, "broadcast": 0}
    shown = shop.ok("withdraw", "show", str(wid))
    assert isinstance(shown["fee_rate"], float) and shown["fee_rate"] > 0
