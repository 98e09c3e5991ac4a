"""Identifiers (addresses, txids, outpoints) are never split over two lines: in tables they are
shortened with an ellipsis, in `show` and --json they are whole on one line."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.terminal_support import plain, run_on_pty
from tests.test_withdraw_embedded import EmbeddedShop, destination


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedShop, dict[str, str]]]:
    s = EmbeddedShop(tmp_path_factory.mktemp("ids"), "p2wsh")
    s.deposit("acct-1")
    to, _ = destination()
    wid = s.signed(to, "0.01")
    shown = s.ok("withdraw", "show", str(wid))
    ids = {"destination": to, "txid": shown["txid"], "address": s.ok("address", "list")[0]["address"]}
    yield s, ids | {"id": str(wid)}
    s.chain.close()


def _never_split(text: str, value: str) -> None:
    """Wherever ``value`` begins on a line, its cell holds it whole, or a head of it ending in an
    ellipsis; never a head alone (the rest folded onto the next line)."""
    for line in text.splitlines():
        start = line.find(value[:8])
        while start != -1:
            seg = line[start:].split("│")[0].split("|")[0].rstrip()
            whole = seg.startswith(value)
            shortened = seg.endswith("…") and value.startswith(seg[:-1])
            assert whole or shortened, (value, line)
            start = line.find(value[:8], start + 1)


@pytest.mark.parametrize("columns", ["80", "120"])
def test_tables_never_wrap_an_identifier_when_piped(shop: tuple[EmbeddedShop, dict[str, str]], columns: str) -> None:
    s, ids = shop
    s.c.env["COLUMNS"] = columns
    try:
        listed = s.c("withdraw", "list")
        addresses = s.c("address", "list")
        shown = s.c("withdraw", "show", ids["id"])
    finally:
        s.c.env["COLUMNS"] = "200"
    for text in (listed.stdout, addresses.stdout):
        assert max(len(line) for line in text.splitlines()) <= int(columns)
        for value in ids.values():
            _never_split(text, value)
    assert ids["address"][:10] in addresses.stdout  # shown, shortened or whole
    # `show` gives every identifier whole, on one line, at any width.
    for value in (ids["destination"], ids["txid"]):
        assert any(value in line for line in shown.stdout.splitlines()), value
    assert json.loads(s.c("withdraw", "show", ids["id"], "--json").stdout)["txid"] == ids["txid"]


def test_a_terminal_of_120_columns_gets_no_identifier_cut(shop: tuple[EmbeddedShop, dict[str, str]]) -> None:
    s, ids = shop
    env = {**s.c.env}
    screen = plain(run_on_pty(["withdraw", "list"], env, columns=120))
    assert "Withdrawals" in screen or ids["id"] in screen, screen
    for value in ids.values():
        _never_split(screen, value)
    assert max(len(line) for line in screen.splitlines()) <= 120
    shown = plain(run_on_pty(["withdraw", "show", ids["id"]], env, columns=120))
    assert ids["txid"] in shown and ids["destination"] in shown
