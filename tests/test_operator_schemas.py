"""Every data command's --json output has a documented shape: a JSON Schema (draft 2020-12) in
docs/schemas/, against which the tests validate what the commands print on a real store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from coincurve import PrivateKey
from jsonschema import Draft202012Validator

from custody.chain.regtest import NodeInfo
from custody.policy.manifest import load_signed_manifest
from custody_cli.main import cli
from tests.rotation_support import founder_xpub, keygen
from tests.support import Custody, founders, sign_manifest_with, sign_roster_file
from tests.test_notify import FROM, SECRET, Mailbox, Receiver, free_port, kill_agent
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
    ("utxo", "list"): "utxo-list",
    ("policy", "descriptors"): "descriptors",
    ("rotate", "show"): "policy-epochs",
    ("audit", "log", "checkpoint", "--out", "CHECKPOINT"): "checkpoint",
    # changes, run once by the fixture (not by its loop): their output is the withdrawal
    ("withdraw", "request"): "withdrawal",
    ("withdraw", "approve"): "withdrawal",
    ("withdraw", "broadcast"): "withdrawal",
    ("withdraw", "import"): "withdrawal",
    ("qr", "encode"): "qr-encode",
    ("qr", "decode"): "qr-decode",
    ("status", "publish"): "status-publish",
    ("withdraw", "finalize"): "withdrawal",
    ("sign",): "signer-review",
    ("withdraw", "cpfp"): "withdrawal",
    ("withdraw", "bump"): "withdrawal",
    ("withdraw", "batch"): "withdrawal",
    ("utxo", "consolidate"): "withdrawal",
    ("node", "fund"): "node-fund",
    ("employee", "suspend"): "suspension",
    ("halt", "raise"): "halt-raise",
    ("halt", "lift"): "halt-lift",
    ("rules", "check"): "rules-check",
    ("withdraw", "cancel"): "withdrawal",
    ("node", "mine"): "node-mine",
    ("audit", "liabilities"): "liabilities",
    ("verify", "addresses"): "verification",
    ("verify", "reserves"): "reserves-proof",
    ("audit", "check-inclusion"): "inclusion",
    # no node runs beside the embedded chain: the stopped shape, exit 8 (tests/test_cli_node.py
    # validates the running one against the same schema)
    ("node", "status"): "node-status",
}


# The notify commands, on a store whose mail server and webhook receiver are real (and down,
# then up: the retry reports both a failure and a delivery)
NOTIFY: dict[tuple[str, ...], str] = {
    ("notify", "key", "init"): "notify-key",
    ("notify", "recipient", "add"): "notify-recipient",
    ("notify", "webhook", "add"): "notify-recipient",
    ("notify", "pending"): "notify-pending",
    ("notify", "retry", "failed"): "notify-delivery",
    ("notify", "retry"): "notify-delivery",
    ("notify", "recipient", "list"): "notify-recipient-list",
    ("notify", "webhook", "list"): "notify-recipient-list",
    ("notify", "recipient", "remove"): "notify-recipient",
    ("notify", "webhook", "remove"): "notify-recipient",
}


# The key ceremony's commands, on a fresh store (tests/support.py's founders sign in between)
CEREMONY: dict[tuple[str, ...], str] = {
    ("manifest", "draft"): "manifest-draft",
    ("init",): "init",
    ("keygen",): "founder-key",
    ("employee", "keygen"): "roster-proposal",
    ("roster", "apply"): "roster-applied",
    ("employee", "add"): "roster-proposal",
    ("employee", "disable"): "roster-proposal",
    ("employee", "enable"): "roster-proposal",
}


def _signed(s: EmbeddedShop, to: str, amount: str, got: dict[tuple[str, ...], Any]) -> int:
    """EmbeddedShop.signed, keeping what `withdraw import` and `withdraw finalize` print."""
    w = s.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", amount, *s.as_("carol"))
    wid = int(w["id"])
    for who in ("alice", "bob"):
        s.ok("withdraw", "approve", str(wid), *s.as_(who), "--yes")
    psbt = s.tmp / f"w{wid}.psbt"
    assert s.c("withdraw", "export", str(wid), str(psbt)).exit_code == 0
    for founder in ("founder-a", "founder-b"):
        out = s.tmp / f"w{wid}-{founder}.psbt"
        got[("sign",)] = s.ok("sign", str(psbt), "--key", str(s.founder_keys[founder]), "--out", str(out), "--yes")
        got[("withdraw", "import")] = s.ok("withdraw", "import", str(wid), str(out))
    got[("withdraw", "finalize")] = s.ok("withdraw", "finalize", str(wid))
    return wid


# The founders' documents and a key rotation, on a store of their own (the rotation changes its
# policy): proposals, signatures, applies, and the pins of an offline signer machine
GOVERNANCE: dict[tuple[str, ...], str] = {
    ("roster", "propose"): "roster-document",
    ("roster", "sign"): "document-signature",
    ("roster", "pin"): "document-pin",
    ("rules", "propose"): "rulebook-proposal",
    ("rules", "sign"): "document-signature",
    ("rules", "apply"): "rulebook-applied",
    ("rules", "pin"): "document-pin",
    ("manifest", "pin"): "manifest-pinned",
    ("rotate", "draft"): "rotation",
    ("manifest", "sign"): "manifest",
    ("rotate", "approve"): "rotation",
    ("rotate", "apply"): "policy-epoch",
    ("rotate", "pin"): "rotation-pinned",
    ("rotate", "sweep"): "withdrawal",
}

# A node's: the session's regtest node (`node start` finds it running; tests/test_cli_node.py
# validates a fresh start against the same schema); PostgreSQL's (tests/test_harden_postgres.py
# validates a real hardening against the same schema).
NODE: dict[tuple[str, ...], str] = {("node", "start"): "node-start"}
POSTGRES: dict[tuple[str, ...], str] = {("db", "harden"): "db-harden"}


def _replacements(s: EmbeddedShop, wid: int, to: str, got: dict[tuple[str, ...], Any]) -> None:
    """A bump and a child of the broadcast withdrawal ``wid`` requested (each then dropped: they
    were never signed), and a coin paid by the faucet."""
    for command in (("withdraw", "bump"), ("withdraw", "cpfp")):
        got[command] = row = s.ok(*command, str(wid), "--fee-rate", "5", *s.as_("carol"))
        s.ok("withdraw", "cancel", str(row["id"]), "--reason", "schema test", *s.as_("alice"))
    got[("node", "fund")] = s.ok("node", "fund", to, "0.001")


def _batch_and_consolidation(s: EmbeddedShop, to: str, got: dict[tuple[str, ...], Any]) -> None:
    """A consolidation of the store's coins (dropped again), then a batch of two approved withdrawals."""
    got[("utxo", "consolidate")] = merged = s.ok("utxo", "consolidate", *s.as_("carol"))
    s.ok("withdraw", "cancel", str(merged["id"]), "--reason", "schema test", *s.as_("alice"))
    for amount in ("0.001", "0.002"):
        w = s.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", amount, *s.as_("carol"))
        for who in ("alice", "bob"):
            s.ok("withdraw", "approve", str(w["id"]), *s.as_(who), "--yes")
    got[("withdraw", "batch")] = s.ok("withdraw", "batch", *s.as_("carol"))


def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    return Draft202012Validator(schema)


def _assert_valid(name: str, data: Any) -> None:
    """``data`` has the shape of schema ``name`` (the first errors, by path, said if not)."""
    errors = sorted(_validator(name).iter_errors(data), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, ...], Any]]:
    """Every command's --json on a store with deposits, a confirmed and a pending withdrawal, an
    incident and a reserves audit, so that lists are not empty."""
    s = EmbeddedShop(tmp_path_factory.mktemp("schemas"), "p2wsh")
    try:
        s.deposit("acct-1")
        to, _ = destination()
        got: dict[tuple[str, ...], Any] = {}
        wid = _signed(s, to, "0.01", got)
        got[("withdraw", "broadcast")] = s.ok("withdraw", "broadcast", str(wid))
        psbt, files = s.tmp / f"w{wid}.psbt", tmp_path_factory.mktemp("qr")
        got[("qr", "encode")] = s.ok("qr", "encode", str(psbt), "--out", str(files / "frames"))
        got[("qr", "decode")] = s.ok("qr", "decode", str(files / "frames"), "--out", str(files / "back.psbt"))
        assert (files / "back.psbt").read_bytes() == psbt.read_bytes()
        mixed = s.c("qr", "decode", str(files / "frames"), "--out", "-", "--json")  # PSBT and JSON on one stdout
        assert mixed.exit_code == 2 and mixed.stdout == "", mixed.output
        got[("status", "publish")] = s.ok("status", "publish", str(files / "site"))
        _replacements(s, wid, to, got)
        s.deposit("acct-1")  # mines the withdrawal too: sync below reports what changed
        got[("withdraw", "request")] = requested = s.ok(
            "withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.02", *s.as_("carol")
        )
        got[("withdraw", "approve")] = s.ok("withdraw", "approve", str(requested["id"]), "--yes", *s.as_("alice"))
        got[("rules", "check")] = s.ok("rules", "check", str(requested["id"]))
        got[("withdraw", "cancel")] = s.ok("withdraw", "cancel", str(requested["id"]), "--reason", "x", *s.as_("alice"))
        _batch_and_consolidation(s, to, got)
        got[("node", "mine")] = s.ok("node", "mine", "1")
        files = tmp_path_factory.mktemp("files")
        got[("audit", "liabilities")] = s.ok(
            "audit", "liabilities", "--out", str(files / "l.txt"), "--nonces", str(files)
        )
        assert s.c("policy", "manifest", "--out", str(files / "m.json")).exit_code == 0
        got[("verify", "addresses")] = s.ok("verify", "addresses", "--manifest", str(files / "m.json"))
        stopped = s.c("node", "status", "--datadir", str(tmp_path_factory.mktemp("no-node")), "--json")
        assert stopped.exit_code == 8, stopped.output
        got[("node", "status")] = json.loads(stopped.stdout)
        assert s.c("audit", "reserves", "--proof", str(files / "reserves.txt")).exit_code == 0
        got[("verify", "reserves")] = s.ok(
            "verify", "reserves", str(files / "reserves.txt"), "--manifest", str(files / "m.json")
        )
        nonce = got[("audit", "liabilities")]["new_nonces"][0]["file"]
        got[("audit", "check-inclusion")] = s.ok(
            "audit", "check-inclusion", str(files / "l.txt"), "--nonce-file", nonce
        )
        got[("employee", "suspend")] = s.ok("employee", "suspend", "carol", "--reason", "drill", *s.as_("alice"))
        got[("halt", "raise")] = raised = s.ok("halt", "raise", "--reason", "drill", *s.as_("alice"))
        for who in ("alice", "bob"):
            got[("halt", "lift")] = s.ok("halt", "lift", str(raised["halt_id"]), *s.as_(who))
        assert got[("halt", "lift")]["lifted"] is True
        address = s.ok("address", "list")[0]["address"]
        checkpoints = str(tmp_path_factory.mktemp("checkpoints") / "head.jsonl")
        for command in (c for c in COMMANDS if c not in got):
            args = [{"ID": str(wid), "ADDR": address, "CHECKPOINT": checkpoints}.get(a, a) for a in command]
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
    _assert_valid(COMMANDS[command], data)


@pytest.fixture(scope="module")
def notify_outputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, ...], Any]]:
    tmp = tmp_path_factory.mktemp("notify-schemas")
    mailbox, receiver = Mailbox(free_port()), Receiver(free_port(), SECRET)
    c = Custody(tmp / "home")
    c.env.update(CUSTODY_SMTP_URL=f"smtp://127.0.0.1:{mailbox.port}", CUSTODY_NOTIFY_FROM=FROM)
    assert c.init(founders()).exit_code == 0
    (tmp / "hook.secret").write_bytes(SECRET)
    got: dict[tuple[str, ...], Any] = {}

    def run(key: tuple[str, ...], *args: str, code: int = 0) -> None:
        result = c(*args, "--json")
        assert result.exit_code == code, (args, result.output)
        got[key] = json.loads(result.stdout)

    try:
        run(("notify", "key", "init"), "notify", "key", "init", "--uid", f"Custody <{FROM}>", "--no-passphrase")
        run(("notify", "recipient", "add"), "notify", "recipient", "add", "ops@exchange.example")
        run(
            ("notify", "webhook", "add"),
            "notify",
            "webhook",
            "add",
            receiver.url,
            "--secret-file",
            str(tmp / "hook.secret"),
        )
        run(("notify", "pending"), "notify", "pending")
        run(("notify", "retry", "failed"), "notify", "retry", code=1)  # both down: failures, kept
        mailbox.up()
        receiver.up()
        run(("notify", "retry"), "notify", "retry")
        run(("notify", "recipient", "list"), "notify", "recipient", "list")
        run(("notify", "webhook", "list"), "notify", "webhook", "list")
        run(("notify", "recipient", "remove"), "notify", "recipient", "remove", "ops@exchange.example")
        run(("notify", "webhook", "remove"), "notify", "webhook", "remove", receiver.url)
        yield got
    finally:
        mailbox.down()
        receiver.down()
        kill_agent(c.home / "gnupg")


@pytest.fixture(scope="module")
def ceremony_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], Any]:
    tmp = tmp_path_factory.mktemp("ceremony-schemas")
    c = Custody(tmp / "home")
    fs = founders()
    got: dict[tuple[str, ...], Any] = {}

    def run(key: tuple[str, ...], *args: str) -> None:
        result = c(*key, *args, "--json")
        assert result.exit_code == 0, (key, result.output)
        got[key] = json.loads(result.stdout)

    def apply_roster() -> None:
        proposal = tmp / "roster.json"
        proposal.unlink(missing_ok=True)
        assert c("roster", "export", "--out", str(proposal)).exit_code == 0
        proposal.write_text(json.dumps(sign_roster_file(proposal, fs[:2]).to_document()))
        run(("roster", "apply"), str(proposal))

    run(("keygen",), "founder-x", "--out", str(tmp / "founder-x.key"))  # a key of its own, not in this manifest
    manifest = tmp / "manifest.json"
    run(
        ("manifest", "draft"),
        "--network",
        "regtest",
        "--threshold",
        "2",
        *[a for f in fs for a in ("--founder", f.spec)],
        "--out",
        str(manifest),
    )
    manifest.write_text(json.dumps(sign_manifest_with(load_signed_manifest(manifest.read_bytes()), fs).to_document()))
    run(("init",), str(manifest))
    run(("employee", "keygen"), "alice", "--out", str(tmp / "alice.key"), "--roles", "request,approve,lift")
    apply_roster()
    run(("employee", "add"), "bob", "--pubkey", PrivateKey().public_key.format().hex(), "--roles", "approve")
    run(("employee", "disable"), "alice")
    apply_roster()
    run(("employee", "enable"), "alice")
    return got


@pytest.mark.parametrize("command", list(CEREMONY), ids=" ".join)
def test_every_ceremony_command_prints_its_documented_shape(
    ceremony_outputs: dict[tuple[str, ...], Any], command: tuple[str, ...]
) -> None:
    _assert_valid(CEREMONY[command], ceremony_outputs[command])
    if command == ("employee", "keygen"):  # the key it made, and a proposal that is not one of them refused
        assert {"pubkey", "file"} <= set(ceremony_outputs[command])
        assert not _validator("roster-proposal").is_valid(ceremony_outputs[command] | {"pubkey": "04ab"})


def _signer_machine(s: EmbeddedShop, name: str) -> tuple[Custody, Any]:
    """An offline signer: a home with nothing but the manifest, pinned by `manifest pin` (what it printed)."""
    machine = Custody(s.tmp / name)
    manifest = s.c.home / "founders-manifest.json"
    fingerprint = load_signed_manifest(manifest.read_bytes()).fingerprint
    return machine, machine.json("manifest", "pin", str(manifest), "--fingerprint", fingerprint)


def _by_founders(s: EmbeddedShop, command: tuple[str, ...], path: Path, *names: str) -> Any:
    """`COMMAND PATH --key K` (sign, approve) by each founder in turn; what the last one printed."""
    for name in names:
        result = s.c(*command, str(path), "--key", str(s.founder_keys[name]), "--yes", "--json")
        assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def governance_outputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, ...], Any]]:
    s = EmbeddedShop(tmp_path_factory.mktemp("governance-schemas"), "p2wsh")
    try:
        signer, pinned = _signer_machine(s, "signer")
        got: dict[tuple[str, ...], Any] = {("manifest", "pin"): pinned}
        dave = PrivateKey().public_key.format().hex()
        got[("roster", "propose")] = s.ok("roster", "propose", "--add", f"dave={dave}:approve")
        roster = s.tmp / "roster-2.json"
        assert s.c("roster", "export", "--out", str(roster)).exit_code == 0
        got[("roster", "sign")] = _by_founders(s, ("roster", "sign"), roster, "founder-a", "founder-b")
        s.ok("roster", "apply", str(roster))
        got[("roster", "pin")] = signer.json("roster", "pin", str(roster))
        changes = s.tmp / "rules-changes.json"
        changes.write_text(json.dumps({"max_withdrawal_sat": 200_000_000}))
        got[("rules", "propose")] = s.ok("rules", "propose", str(changes))
        rules = s.tmp / "rules-1.json"
        assert s.c("rules", "export", "--out", str(rules)).exit_code == 0
        got[("rules", "sign")] = _by_founders(s, ("rules", "sign"), rules, "founder-a", "founder-b")
        got[("rules", "apply")] = s.ok("rules", "apply", str(rules))
        got[("rules", "pin")] = signer.json("rules", "pin", str(rules))
        s.deposit("acct-1")  # a coin of the first policy, for the sweep
        s.founder_keys["founder-d"], xpub_d = keygen(s, "founder-d")
        rotation = s.tmp / "rotation.json"
        draft = ["rotate", "draft", "--threshold", "3", "--out", str(rotation), "--founder", f"founder-d={xpub_d}"]
        for name in ("founder-a", "founder-b", "founder-c"):
            draft += ["--founder", f"{name}={founder_xpub(s, name)}"]
        got[("rotate", "draft")] = s.ok(*draft)
        got[("manifest", "sign")] = _by_founders(s, ("manifest", "sign"), rotation, *sorted(s.founder_keys))
        got[("rotate", "approve")] = _by_founders(s, ("rotate", "approve"), rotation, "founder-a", "founder-b")
        got[("rotate", "apply")] = epoch = s.ok("rotate", "apply", str(rotation))
        got[("rotate", "pin")] = signer.json("rotate", "pin", str(rotation), "--fingerprint", epoch["fingerprint"])
        got[("rotate", "sweep")] = s.ok("rotate", "sweep", *s.as_("carol"))
        yield got
    finally:
        s.chain.close()


@pytest.mark.parametrize("command", list(GOVERNANCE), ids=" ".join)
def test_every_governance_command_prints_its_documented_shape(
    governance_outputs: dict[tuple[str, ...], Any], command: tuple[str, ...]
) -> None:
    _assert_valid(GOVERNANCE[command], governance_outputs[command])


def test_governance_outputs_say_what_happened(governance_outputs: dict[tuple[str, ...], Any]) -> None:
    """Not vacuous: the last signature completed each document, the rotation was approved by two
    and pinned after the first manifest, the sweep is one; and a wrong shape is refused."""
    got = governance_outputs
    assert got[("roster", "sign")]["complete"] and got[("rules", "sign")]["complete"]
    assert got[("rotate", "approve")]["approved_by"] == ["founder-a", "founder-b"]
    assert len(got[("rotate", "pin")]["pinned"]) == 2 and got[("rotate", "apply")]["epoch"] == 1
    assert got[("rotate", "sweep")]["withdrawal_kind"] == "sweep"
    signature = _validator("document-signature")
    assert not signature.is_valid(got[("roster", "sign")] | {"complete": "yes"})
    assert not signature.is_valid({k: v for k, v in got[("rules", "sign")].items() if k != "signed_by"})
    assert not _validator("document-pin").is_valid(got[("rules", "pin")] | {"serial": "1"})
    applied = _validator("rulebook-applied")
    assert not applied.is_valid(got[("rules", "apply")] | {"signed_by": "founder-a"})
    assert not applied.is_valid(got[("rules", "apply")] | {"extra": 1})
    assert not _validator("policy-epoch").is_valid({k: v for k, v in got[("rotate", "apply")].items() if k != "n"})


def test_node_start_prints_its_documented_shape(regtest_node: NodeInfo, tmp_path: Path) -> None:
    """`node start` on the session's running node: nothing started, the node's status said."""
    c = Custody(tmp_path / "home")
    data = c.json("node", "start", "--datadir", str(regtest_node.datadir))
    assert data["already_running"] is True and data["pid"] == regtest_node.pid
    _assert_valid(NODE[("node", "start")], data)
    validator = _validator(NODE[("node", "start")])
    assert not validator.is_valid({k: v for k, v in data.items() if k != "already_running"})
    assert not validator.is_valid(data | {"pid": str(data["pid"])})


@pytest.mark.postgres
def test_db_harden_prints_its_documented_shape(pg_url: str, tmp_path: Path) -> None:
    """`db harden --sql`: the statements it would run, on a real PostgreSQL store (the hardening
    itself is validated against the same schema by tests/test_harden_postgres.py)."""
    c = Custody(tmp_path / "home", db_url=pg_url)
    assert c.init(founders()).exit_code == 0
    data = c.json("db", "harden", "--role", "custody_app", "--sql")
    assert data["statements"] and data["privileges"] == {} and data["role"] == "custody_app"
    _assert_valid(POSTGRES[("db", "harden")], data)
    validator = _validator(POSTGRES[("db", "harden")])
    assert not validator.is_valid(data | {"statements": "GRANT ..."})
    assert not validator.is_valid(data | {"privileges": {"audit_log": ["SELECT", "UPDATE", "DROP"]}})


@pytest.mark.parametrize("command", list(NOTIFY), ids=" ".join)
def test_every_notify_command_prints_its_documented_shape(
    notify_outputs: dict[tuple[str, ...], Any], command: tuple[str, ...]
) -> None:
    data = notify_outputs[command]
    if isinstance(data, list):
        assert data, f"{command}: an empty list would validate anything"
    _assert_valid(NOTIFY[command], data)


def test_notify_outputs_say_what_happened(notify_outputs: dict[tuple[str, ...], Any]) -> None:
    """Not vacuous: the runs filled what the schemas describe, and a wrong shape is refused."""
    pending = notify_outputs[("notify", "pending")]
    assert [r["kind"] for r in pending] == ["email", "webhook"] and pending[0]["pending"]
    assert notify_outputs[("notify", "retry", "failed")]["failed"] and notify_outputs[("notify", "retry")]["delivered"]
    removed = notify_outputs[("notify", "recipient", "remove")]
    assert removed["active"] is False and removed["removed_at"] is not None
    recipient = _validator("notify-recipient")
    assert not recipient.is_valid(removed | {"kind": "sms"})
    assert not recipient.is_valid({k: v for k, v in removed.items() if k != "delivered_seq"})
    assert not _validator("notify-pending").is_valid([removed])  # a recipient without its pending list
    assert not _validator("notify-key").is_valid(notify_outputs[("notify", "key", "init")] | {"fingerprint": "abc"})


def test_every_schema_is_used_and_not_vacuous(outputs: dict[tuple[str, ...], Any]) -> None:
    names = {p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json")}
    assert names == set().union(*(d.values() for d in EVERY))
    # The old, ambiguous shape is refused: `kind` for a withdrawal's kind, a string fee rate.
    withdrawal = dict(outputs[("withdraw", "show", "ID")])
    old = {k: v for k, v in withdrawal.items() if k not in ("withdrawal_kind", "record")} | {"kind": "single"}
    assert not _validator("withdrawal").is_valid(old)
    assert not _validator("withdrawal").is_valid(withdrawal | {"fee_rate": "1.0"})
    deposit = outputs[("ledger", "deposits")][0]
    assert not _validator("sync").is_valid([{k: v for k, v in deposit.items() if k != "record"} | {"kind": "deposit"}])
    assert _validator("sync").is_valid([deposit, withdrawal])
    # sign's review: the old `kind` and a text fee rate are refused too, and so is a field it never had
    review = outputs[("sign",)]
    signer = _validator("signer-review")
    assert not signer.is_valid({k: v for k, v in review.items() if k != "withdrawal_kind"} | {"kind": "single"})
    assert not signer.is_valid(review | {"fee_rate": f"{review['fee_rate']:.2f}"})
    assert not signer.is_valid(review | {"tiers": {"1": {"tier": "standard", "approvals": "2", "why": ""}}})
    assert not _validator("node-fund").is_valid({k: v for k, v in outputs[("node", "fund")].items() if k != "block"})
    changes = [("withdraw", "bump"), ("withdraw", "cpfp"), ("withdraw", "batch"), ("utxo", "consolidate")]
    assert [outputs[c]["withdrawal_kind"] for c in changes] == ["bump", "cpfp", "batch", "consol"]
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


# Commands whose --json has no schema yet (#16 asks for one per shape): none is left, and a new
# command with --json fails the test below until it has a schema (or is named here, for a reason).
WITHOUT_SCHEMA: set[tuple[str, ...]] = set()


EVERY = (COMMANDS, NOTIFY, CEREMONY, GOVERNANCE, NODE, POSTGRES)


def _json_commands(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    runs_itself = not isinstance(cmd, click.Group) or cmd.invoke_without_command
    if runs_itself and any(p.name == "as_json" for p in cmd.params):
        yield path
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _json_commands(sub, (*path, name))


def _command_path(args: tuple[str, ...]) -> tuple[str, ...]:
    """The command named by the leading words of ``args`` (the rest are its arguments)."""
    cmd: click.Command = cli
    path: tuple[str, ...] = ()
    for word in args:
        if not isinstance(cmd, click.Group) or word not in cmd.commands:
            break
        cmd, path = cmd.commands[word], (*path, word)
    return path


def test_every_command_with_json_has_a_validated_schema_or_is_named_as_missing() -> None:
    validated = {_command_path(c) for d in EVERY for c in d}
    every = set(_json_commands(cli))
    assert every - validated - WITHOUT_SCHEMA == set(), "a --json command with neither a schema nor a place here"
    assert validated & WITHOUT_SCHEMA == set(), "validated now: take it off WITHOUT_SCHEMA"
    assert WITHOUT_SCHEMA <= every, "no such command with --json any more"
