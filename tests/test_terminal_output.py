"""Untrusted strings never reach the terminal raw: tables, titles, CSV and messages.

An insider (or any employee) writes a halt reason, an incident message or a cancel reason
that, printed as it is, would clear the screen and paint a green "trading: running", set
the window title, hide a link, or move the cursor back over what was printed. Every one of
them must come out as visible escapes, byte for byte, and never as rich markup either.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_withdraw_embedded import EmbeddedShop, destination

# Clear the screen and paint green; C1 CSI (cursor up); BEL; carriage return; a bidi
# override; rich markup; an OSC 8 hyperlink and an OSC 0 window title (ended by ST and BEL).
HOSTILE = (
    "\x1b[2J\x1b[32mtrading: running\x1b[0m\x9b1A\x07\r\u202e[bold red]ok[/bold red]"
    "\x1b]8;;http://e.vil/\x1b\\x\x1b]0;title\x07"
)
# What must be shown instead, written out by hand (not computed by the code under test).
SHOWN = (
    r"\x1b[2J\x1b[32mtrading: running\x1b[0m\x9b1A\x07\r\u202e[bold red]ok[/bold red]"
    r"\x1b]8;;http://e.vil/\x1b\x\x1b]0;title\x07"
)


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path, "p2wsh")
    s.c.env["COLUMNS"] = "400"  # wide enough that no cell folds: the bytes are compared whole
    yield s
    s.chain.close()


def clean(data: bytes) -> str:
    """The output, checked to carry no control, format or separator character but newlines."""
    text = data.decode("utf-8")
    bad = sorted(
        {f"U+{ord(ch):04X}" for ch in text if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")}
    )
    assert not bad, f"raw characters reached the terminal: {bad}"
    return text


def test_hostile_reasons_and_messages_are_shown_as_escapes(shop: EmbeddedShop) -> None:
    shop.deposit("acct-1")
    to, _ = destination()
    w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.01", *shop.as_("carol"))
    cancelled = shop.c("withdraw", "cancel", str(w["id"]), "--reason", HOSTILE, *shop.as_("alice"))
    assert cancelled.exit_code == 0, cancelled.output
    raised = shop.c("halt", "raise", "--reason", HOSTILE, *shop.as_("bob"), "--json")
    assert raised.exit_code == 0, raised.output
    updated = shop.c("incident", "update", "1", "--status", "identified", "--message", HOSTILE)
    assert updated.exit_code == 0, updated.output

    outputs = {
        "status": shop.c("status"),
        "halt status": shop.c("halt", "status"),
        "withdraw list": shop.c("withdraw", "list"),
        "withdraw show": shop.c("withdraw", "show", str(w["id"])),
        "ledger entries": shop.c("ledger", "entries"),
        "ledger entries --csv": shop.c("ledger", "entries", "--csv"),
    }
    for name, result in outputs.items():
        assert result.exit_code in (0, 3), (name, result.output)
        clean(result.stdout_bytes)
        clean(result.stderr_bytes)
    # Each place the hostile text lands shows it whole, escaped, and as text, not markup.
    status_lines = outputs["status"].stdout.splitlines()
    assert f"Incident #1 [identified] Trading halted: {SHOWN}" in status_lines  # a table title: no markup
    assert outputs["status"].stdout.count(SHOWN) == 3  # the title, the halt's own update, the hostile update
    assert SHOWN in outputs["halt status"].stdout
    shown = outputs["withdraw show"].stdout
    assert f"cancelled by alice: {SHOWN}" in shown
    assert f"cancelled by alice: {SHOWN}" in outputs["ledger entries --csv"].stdout
    assert "trading: HALTED" in outputs["halt status"].stdout
    # --json keeps the exact text (escaped by JSON itself) for programs to read
    status = shop.c("halt", "status", "--json")
    clean(status.stdout_bytes)
    assert json.loads(status.stdout)["halts"][0]["reason"] == HOSTILE


def test_rich_markup_in_a_title_is_text(shop: EmbeddedShop) -> None:
    """An incident's title goes into a table title, which rich would read as markup."""
    raised = shop.c(
        "halt", "raise", "--reason", "[green]all clear[/green] [link=http://e.vil]x[/link]", *shop.as_("bob")
    )
    assert raised.exit_code == 0
    lines = shop.c("status").stdout.splitlines()
    assert "Incident #1 [investigating] Trading halted: [green]all clear[/green] [link=http://e.vil]x[/link]" in lines


def test_error_messages_escape_what_a_file_says(shop: EmbeddedShop, tmp_path: Path) -> None:
    """A node's error text, a file's content, a name: errors are one line of escapes too."""
    bad = tmp_path / "bad.psbt"
    bad.write_bytes(b"\x1b[2Jnot base64")
    result = shop.c("withdraw", "import", "1", str(bad))
    assert result.exit_code in (2, 5), result.output
    clean(result.stderr_bytes)
    named = shop.c("employee", "disable", "\x1b[31mmallory\u202e")
    assert named.exit_code != 0
    assert r"\x1b[31mmallory\u202e" in clean(named.stderr_bytes)
