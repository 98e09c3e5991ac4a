"""Where people expect to undo or repeat (#16 item 9): a disabled employee is enabled again by
the founders' next roster, through the CLI. (`node start` on a running node exiting 0 is
tests/test_cli_node.py's.)"""

from __future__ import annotations

from pathlib import Path

from tests.support import Custody, founders


def test_a_disabled_employee_is_enabled_again_by_the_next_roster(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    keys = {name: c.employee(name) for name in ("alice", "bob")}

    def enabled() -> dict[str, bool]:
        return {e["name"]: e["enabled"] for e in c.json("employee", "list")}

    def raise_as(who: str) -> int:
        return c("halt", "raise", "--reason", f"drill by {who}", "--as", who, "--key", str(keys[who])).exit_code

    assert c("employee", "disable", "bob").exit_code == 0
    assert enabled() == {"alice": True, "bob": True}  # a proposal changes nothing until signed
    c.apply_roster()
    assert enabled() == {"alice": True, "bob": False}
    refused = c("halt", "raise", "--reason", "drill", "--as", "bob", "--key", str(keys["bob"]))
    assert refused.exit_code == 4, refused.output  # a disabled employee signs nothing
    assert c("employee", "enable", "bob").exit_code == 0
    c.apply_roster()
    assert enabled() == {"alice": True, "bob": True}
    assert raise_as("bob") == 0  # the way back: bob acts again
