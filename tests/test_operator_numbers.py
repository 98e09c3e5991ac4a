"""Numbers an operator reads (#16 items 6 and 8): confirmations that follow the chain's tip,
counts whose nouns agree ("1 confirmation", "1 address ... (index 0)"), through the CLI."""

from __future__ import annotations

import re
from pathlib import Path

from custody.chain.embedded import open_chain
from tests.support import Custody, founders
from tests.test_withdraw_embedded import OP_TRUE

CLI = Path(__file__).resolve().parent.parent / "cli"


def test_issuance_says_one_address_and_its_index(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    one = c("address", "new", "--account", "a")
    assert one.exit_code == 0 and "1 address issued for a (index 0)" in one.stderr, one.output
    three = c("address", "new", "--account", "b", "--count", "3")
    assert three.exit_code == 0 and "3 addresses issued for b (indexes 1..3)" in three.stderr, three.output


def test_a_deposits_confirmations_follow_the_tip_after_it_is_credited(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    c.env["CUSTODY_CHAIN"] = "embedded"
    assert c.init(founders()).exit_code == 0
    (issued,) = c.json("address", "new", "--account", "alice")
    chain = open_chain(c.home / "chain")  # the chain the in-process commands open
    try:
        chain.mine(1, bytes.fromhex(issued["script_pubkey"]))
        credited = c("sync")
        assert credited.exit_code == 0 and "credited (1 confirmation)" in credited.stdout, credited.output
        (deposit,) = c.json("ledger", "deposits")
        assert deposit["status"] == "credited" and deposit["confirmations"] == 1
        chain.mine(5, OP_TRUE)
        assert c("sync").exit_code == 0
        (deposit,) = c.json("ledger", "deposits")
        assert deposit["confirmations"] == chain.tip_height() - deposit["height"] + 1 == 6  # not frozen at 1
        assert c.json("ledger", "balance", "alice")["balance_sat"] == deposit["amount_sat"]
    finally:
        chain.close()


def test_no_message_counts_with_a_parenthesised_plural() -> None:
    """ "1 block(s) mined", "1 address(es) issued": every count in an f-string goes through
    output.plural, so the noun agrees with the number."""
    counted = re.compile(r"\{[^{}]*\}[^\"'{}]{0,40}?\w\((?:s|es)\)")
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(CLI.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if counted.search(line)
    ]
    assert found == []
