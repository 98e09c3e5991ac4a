"""Long work shows progress on a terminal (never in a pipe, never with --json): address
issuance and export, sync reading blocks, audit log --verify; long lists are capped on a terminal
and limited by --limit everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from custody.chain.embedded import open_chain
from custody_cli.listing import FRAME
from tests.support import Custody, founders
from tests.terminal_support import plain, run_on_pty
from tests.test_withdraw_embedded import OP_TRUE

ROWS = 20  # a 20-line terminal shows ROWS - FRAME rows of a table


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Custody:
    c = Custody(tmp_path_factory.mktemp("long") / "home")
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "bulk", "--count", "600").exit_code == 0
    for i in range(ROWS):  # one audit log entry each: a log longer than a screenful
        assert c("address", "new", "--account", f"a{i}").exit_code == 0
    return c


def test_a_long_export_shows_a_progress_bar_on_a_terminal_only(store: Custody, tmp_path: Path) -> None:
    out = tmp_path / "on-terminal.jsonl"
    screen = plain(run_on_pty(["address", "export", str(out)], store.env, columns=120))
    assert "exporting addresses" in screen and "━" in screen, screen[-500:]
    assert json.loads(out.read_text().splitlines()[-1]) == {"end": True, "count": 600 + ROWS}
    piped = store("address", "export", str(tmp_path / "piped.jsonl"))
    assert piped.exit_code == 0 and "exporting" not in piped.stderr and "━" not in piped.stderr
    assert f"{600 + ROWS} addresses exported" in piped.stderr


BATCH = 3000  # above the CLI's PROGRESS_FROM, below a chunk: one transaction


def test_a_large_issuance_shows_a_progress_bar_on_a_terminal_only(store: Custody) -> None:
    before = len(store.json("address", "list"))
    screen = plain(run_on_pty(["address", "new", "--account", "pty", "--count", str(BATCH)], store.env, columns=120))
    assert "issuing addresses" in screen and "━" in screen, screen[-500:]
    issued = [a["address"] for a in store.json("address", "list", "--account", "pty")]
    assert len(issued) == BATCH and issued[0] in screen and issued[-1] in screen  # stdout whole beside the bar
    as_json = plain(run_on_pty(["address", "new", "--account", "pty", "--count", str(BATCH), "--json"], store.env, 120))
    assert "issuing" not in as_json and "━" not in as_json
    assert len(json.loads(as_json)) == BATCH  # the terminal got the JSON alone
    piped = store("address", "new", "--account", "piped", "--count", str(BATCH))
    assert piped.exit_code == 0 and "issuing" not in piped.stderr and "━" not in piped.stderr
    assert len(piped.stdout.split()) == BATCH
    assert len(store.json("address", "list")) == before + 3 * BATCH  # the bar changed nothing issued


def test_lists_take_a_limit_and_a_terminal_gets_a_screenful(store: Custody) -> None:
    every = store.json("audit", "log")
    assert len(every) > ROWS  # --json gets them all
    assert [e["seq"] for e in store.json("audit", "log", "--last", "3")] == [e["seq"] for e in every[-3:]]
    assert store.json("withdraw", "list", "--limit", "2") == []
    assert store.json("ledger", "deposits", "--limit", "2") == []
    piped = store("audit", "log")
    assert piped.exit_code == 0 and "shown" not in piped.stderr  # a pipe gets every row
    screen = plain(run_on_pty(["audit", "log"], store.env, columns=200, rows=ROWS))
    assert f"{ROWS - FRAME} of {len(every)} shown" in screen
    assert f"│ {every[-1]['seq']} " in screen and f"│ {every[0]['seq']} " not in screen  # the newest


def test_audit_log_verify_shows_a_progress_bar_on_a_terminal_only(store: Custody) -> None:
    rows = len(store.json("audit", "log")) + len(store.json("address", "list"))  # entries, then address rows
    screen = plain(run_on_pty(["audit", "log", "--verify"], store.env, columns=120))
    assert "checking the audit log" in screen and "━" in screen, screen[-500:]
    assert f"/{rows}" in screen and "chain intact" in screen, screen[-500:]  # the bar counts every row
    as_json = plain(run_on_pty(["audit", "log", "--verify", "--json"], store.env, columns=120))
    assert "checking" not in as_json and "━" not in as_json, as_json[-500:]
    assert json.loads(as_json)["ok"] is True  # the terminal got the JSON alone
    piped = store("audit", "log", "--verify")
    assert piped.exit_code == 0 and "checking" not in piped.stderr and "━" not in piped.stderr


BLOCKS = 250


def test_sync_shows_a_progress_bar_reading_blocks_on_a_terminal_only(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    c.env["CUSTODY_CHAIN"] = "embedded"
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "a").exit_code == 0
    assert c("sync").exit_code == 0  # the scan's cursor starts here

    def mine(blocks: int) -> None:
        chain = open_chain(c.home / "chain")  # the one the in-process commands opened, if any
        chain.mine(blocks, OP_TRUE)
        chain.close()  # the kernel lets one process at a time have it: the terminal's custody next

    mine(BLOCKS)
    screen = plain(run_on_pty(["sync"], c.env, columns=120))
    assert "reading blocks" in screen and "━" in screen, screen[-500:]
    assert f"{BLOCKS}/{BLOCKS}" in screen and "nothing changed" in screen, screen[-500:]
    mine(BLOCKS)
    as_json = plain(run_on_pty(["sync", "--json"], c.env, columns=120))
    assert "reading" not in as_json and "━" not in as_json and json.loads(as_json) == [], as_json[-500:]
    mine(BLOCKS)
    piped = c("sync")
    assert piped.exit_code == 0 and "reading" not in piped.stderr and "━" not in piped.stderr
    open_chain(c.home / "chain").close()
