"""Every data command's --json output has a documented shape: a JSON Schema (draft 2020-12) in
docs/schemas/, against which the tests validate what the commands print on a real store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.test_withdraw_embedded import EmbeddedShop, destination

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"

# command -> schema; `None` in a command stands for the withdrawal id, `ADDR` for an issued address
COMMANDS: dict[tuple[str, ...], str] = {
    ("version",): "version",
    ("status",): "status",
    ("halt", "status"): "halt-state",
    ("policy", "show"): "policy",
    ("address", "list"): "address-list",
    ("address", "new", "--account", "acct-9"): "address-list",
    ("address", "show", "ADDR"): "address",
    ("withdraw", "list"): "withdrawal-list",
    ("withdraw", "show", "ID"): "withdrawal",
    ("ledger", "balance"): "ledger-balance",
    ("ledger", "balance", "acct-1"): "ledger-account",
    ("ledger", "entries"): "ledger-entries",
    ("ledger", "deposits"): "deposit-list",
    ("audit", "log"): "audit-log",
    ("audit", "ledger"): "audit-ledger",
    ("roster", "show"): "roster",
    ("rules", "show"): "rulebook",
    ("manifest", "show"): "manifest",
    ("audit", "reserves"): "audit-reserves",
    ("sync",): "sync",
    ("employee", "list"): "employee-list",
    # changes, run once by the fixture (not by its loop): their output is the withdrawal
    ("withdraw", "request"): "withdrawal",
    ("withdraw", "approve"): "withdrawal",
    # no node runs beside the embedded chain: the stopped shape, exit 8 (tests/test_cli_node.py
    # validates the running one against the same schema)
    ("node", "status"): "node-status",
}


def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    return Draft202012Validator(schema)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, ...], Any]]:
    """Every command's --json on a store with deposits, a confirmed and a pending withdrawal, an
    incident and a reserves audit, so that lists are not empty."""
    s = EmbeddedShop(tmp_path_factory.mktemp("schemas"), "p2wsh")
    try:
        s.deposit("acct-1")
        to, _ = destination()
        wid = s.signed(to, "0.01")
        s.ok("withdraw", "broadcast", str(wid))
        s.deposit("acct-1")  # mines the withdrawal too: sync below reports what changed
        got: dict[tuple[str, ...], Any] = {}
        got[("withdraw", "request")] = requested = s.ok(
            "withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.02", *s.as_("carol")
        )
        got[("withdraw", "approve")] = s.ok("withdraw", "approve", str(requested["id"]), "--yes", *s.as_("alice"))
        stopped = s.c("node", "status", "--datadir", str(tmp_path_factory.mktemp("no-node")), "--json")
        assert stopped.exit_code == 8, stopped.output
        got[("node", "status")] = json.loads(stopped.stdout)
        assert s.c("audit", "reserves").exit_code == 0
        raised = s.ok("halt", "raise", "--reason", "drill", *s.as_("alice"))
        for who in ("alice", "bob"):
            assert s.c("halt", "lift", str(raised["halt_id"]), *s.as_(who)).exit_code == 0
        address = s.ok("address", "list")[0]["address"]
        for command in (c for c in COMMANDS if c not in got):
            args = [{"ID": str(wid), "ADDR": address}.get(a, a) for a in command]
            result = s.c(*args, "--json")
            assert result.exit_code == 0, (command, result.output)
            got[command] = json.loads(result.stdout)
        yield got
    finally:
        s.chain.close()


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_every_data_command_prints_its_documented_shape(
    outputs: dict[tuple[str, ...], Any], command: tuple[str, ...]
) -> None:
    data = outputs[command]
    if isinstance(data, list) and command != ("sync",):
        assert data, f"{command}: an empty list would validate anything"
    errors = sorted(_validator(COMMANDS[command]).iter_errors(data), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]


def test_every_schema_is_used_and_not_vacuous(outputs: dict[tuple[str, ...], Any]) -> None:
    names = {p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json")}
    assert names == set(COMMANDS.values())
    # The old, ambiguous shape is refused: `kind` for a withdrawal's kind, a string fee rate.
    withdrawal = dict(outputs[("withdraw", "show", "ID")])
    old = {k: v for k, v in withdrawal.items() if k not in ("withdrawal_kind", "record")} | {"kind": "single"}
    assert not _validator("withdrawal").is_valid(old)
    assert not _validator("withdrawal").is_valid(withdrawal | {"fee_rate": "1.0"})
    deposit = outputs[("ledger", "deposits")][0]
    assert not _validator("sync").is_valid([{k: v for k, v in deposit.items() if k != "record"} | {"kind": "deposit"}])
    assert _validator("sync").is_valid([deposit, withdrawal])
    # a running node without its pid, an employee with a role the roster does not know
    assert not _validator("node-status").is_valid(outputs[("node", "status")] | {"running": True})
    alice = outputs[("employee", "list")][0]
    assert not _validator("employee-list").is_valid([alice | {"roles": ["admin"]}])


def test_raw_and_normal_balances_say_why_they_differ(outputs: dict[tuple[str, ...], Any]) -> None:
    for account in outputs[("ledger", "balance")]["accounts"]:
        sign = 1 if account["normal_side"] == "debit" else -1
        assert account["balance_sat"] == sign * account["raw_sat"], account
    customer = outputs[("ledger", "balance", "acct-1")]
    assert customer["normal_side"] == "credit" and customer["raw_sat"] < 0 < customer["balance_sat"]
