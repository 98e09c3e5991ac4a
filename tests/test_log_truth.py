"""The audit log is the truth: the ledger's rows and the address rows edited by SQL are caught,
and so are a truncated or wholly re-hashed log, against a witness kept outside the store.

Each attack is done as an insider would, by SQL on the store (SQLite and PostgreSQL), with
the cached balances, heads and counters fixed up so that the old checks pass; the chain is
the embedded regtest chain (real blocks, validated by libbitcoinkernel), driven through the
CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from custody.chain.embedded import EmbeddedBackend, open_chain
from custody.chain.kernel import COINBASE_MATURITY
from custody.control import audit_log
from custody.control.witness import Checkpoint, parse
from custody.notify.outbox import notification_for
from custody.policy.generator import AddressDeriver
from custody.store.db import Database, normalize_url
from custody.store.models import AuditEntry
from tests.chain_support import fresh_script
from tests.support import Custody
from tests.withdraw_support import enrol, key_ceremony

OP_TRUE = b"\x51"
COIN = 100_000_000


class Shop:
    """A custody store on the embedded chain, driven through the CLI, and SQL from outside."""

    def __init__(self, tmp: Path, db_url: str | None) -> None:
        self.tmp = tmp
        self.c = Custody(tmp / "home", db_url=db_url)
        self.c.env["CUSTODY_CHAIN"] = "embedded"
        self.chain: EmbeddedBackend = open_chain(tmp / "home" / "chain")
        self.founder_keys = key_ceremony(self.c, tmp, "p2wsh")
        self.employees = enrol(self.c, tmp, self.founder_keys, ["alice", "bob", "carol"])
        self.engine: Engine = create_engine(normalize_url(self.c.env["CUSTODY_DB_URL"]))

    def ok(self, *args: str) -> Any:
        result = self.c(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def address(self, account: str) -> dict[str, Any]:
        (issued,) = self.ok("address", "new", "--account", account)
        return dict(issued)

    def pay(self, script_pubkey: str) -> None:
        """A coinbase (50 BTC) to the script, and blocks until it is mature."""
        self.chain.mine(1, bytes.fromhex(script_pubkey))
        self.chain.mine(COINBASE_MATURITY, OP_TRUE)

    def deposit(self, account: str) -> dict[str, Any]:
        a = self.address(account)
        self.pay(a["script_pubkey"])
        self.ok("sync")
        return a

    def sql(self, statement: str, **params: Any) -> list[tuple[Any, ...]]:
        """SQL on the store from outside the tool, as an insider with the database would."""
        from sqlalchemy import text

        with self.engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return [tuple(r) for r in result.fetchall()] if result.returns_rows else []

    def balance(self, account: str) -> int:
        return int(self.ok("ledger", "balance", account)["balance_sat"])

    def as_(self, who: str) -> list[str]:
        return ["--as", who, "--key", str(self.employees[who])]

    def halted(self) -> bool:
        return self.c("halt", "status").exit_code == 3

    def close(self) -> None:
        self.engine.dispose()
        self.chain.close()


@pytest.fixture(params=["sqlite", "postgres"])
def shop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Shop]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    s = Shop(tmp_path, url)
    yield s
    s.close()


def _destination() -> str:
    from custody.bitcoin.bech32 import encode_segwit

    return encode_segwit("bcrt", 0, fresh_script()[2:])


# ---------------------------------------------------------------- the ledger


def test_a_ledger_entry_repointed_to_another_customer_is_caught_and_cannot_be_withdrawn(shop: Shop) -> None:
    shop.deposit("alice")
    shop.deposit("bob")
    assert shop.balance("alice") == shop.balance("bob") == 50 * COIN
    # The insider moves alice's 50 BTC credit to bob, and fixes the two cached balances so
    # that every balance still equals the sum of its entries.
    ((entry_id, alice_id),) = shop.sql(
        "SELECT e.id, a.id FROM ledger_entry e JOIN ledger_account a ON a.id = e.account_id "
        "WHERE a.key = 'customer:alice'"
    )
    ((bob_id,),) = shop.sql("SELECT id FROM ledger_account WHERE key = 'customer:bob'")
    shop.sql("UPDATE ledger_entry SET account_id = :b WHERE id = :e", b=bob_id, e=entry_id)
    shop.sql("UPDATE ledger_account SET balance = balance + :v WHERE id = :a", v=50 * COIN, a=alice_id)
    shop.sql("UPDATE ledger_account SET balance = balance - :v WHERE id = :b", v=50 * COIN, b=bob_id)
    assert shop.balance("bob") == 100 * COIN and shop.balance("alice") == 0  # the cache says so

    result = shop.c("audit", "ledger", "--json")
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    (problem,) = report["problems"]
    assert f"ledger entry #{entry_id} says customer:bob" in problem
    assert "the audit log recorded customer:alice" in problem
    assert shop.halted()
    refused = shop.c(
        "withdraw", "request", "--account", "bob", "--to", _destination(), "--amount", "75", *shop.as_("carol")
    )
    assert refused.exit_code == 3, refused.output
    assert "halted" in refused.output
    assert shop.sql("SELECT COUNT(*) FROM withdrawal") == [(0,)]
    # `audit log --verify` names it too.
    verified = shop.c("audit", "log", "--verify", "--json")
    assert verified.exit_code == 3
    assert any(f"ledger entry #{entry_id}" in p["reason"] for p in json.loads(verified.stdout)["problems"])


def test_a_ledger_posting_deleted_or_inserted_by_sql_is_caught(shop: Shop) -> None:
    shop.deposit("alice")
    shop.deposit("bob")
    # Deleted: bob's credit, its transaction, and every total that would show it.
    ((txn_id, asset_id, bob_id),) = shop.sql(
        "SELECT t.id, ea.account_id, eb.account_id FROM ledger_txn t "
        "JOIN ledger_entry ea ON ea.txn_id = t.id AND ea.amount > 0 "
        "JOIN ledger_entry eb ON eb.txn_id = t.id AND eb.amount < 0 "
        "JOIN ledger_account a ON a.id = eb.account_id WHERE a.key = 'customer:bob'"
    )
    shop.sql("DELETE FROM ledger_entry WHERE txn_id = :t", t=txn_id)
    shop.sql("DELETE FROM ledger_txn WHERE id = :t", t=txn_id)
    shop.sql("UPDATE ledger_account SET balance = balance - :v WHERE id = :a", v=50 * COIN, a=asset_id)
    shop.sql("UPDATE ledger_account SET balance = balance + :v WHERE id = :b", v=50 * COIN, b=bob_id)
    shop.sql("UPDATE ledger_head SET entries = entries - 2, txns = txns - 1 WHERE id = 1")
    result = shop.c("audit", "ledger", "--json")
    assert result.exit_code == 3, result.output
    problems = json.loads(result.stdout)["problems"]
    assert any("in the audit log but not in the ledger: deleted outside the tool" in p for p in problems)
    assert any(f"ledger transaction #{txn_id}" in p and "not in the ledger" in p for p in problems)
    assert shop.halted()


def test_a_ledger_posting_inserted_by_sql_is_caught(shop: Shop) -> None:
    shop.deposit("alice")
    ((asset_id,),) = shop.sql("SELECT id FROM ledger_account WHERE key = 'asset:onchain'")
    ((alice_id,),) = shop.sql("SELECT id FROM ledger_account WHERE key = 'customer:alice'")
    # A balanced posting that credits alice 10 BTC more, with the balances and head to match.
    ((txn_id,),) = shop.sql(
        "INSERT INTO ledger_txn (at, event, ref, memo, entries, total) "
        "VALUES (CURRENT_TIMESTAMP, 'deposit.credited', 'deposit:forged:0', '', 2, 0) RETURNING id"
    )
    shop.sql(
        "INSERT INTO ledger_entry (txn_id, account_id, amount) VALUES (:t, :a, :v), (:t, :c, :w)",
        t=txn_id,
        a=asset_id,
        v=10 * COIN,
        c=alice_id,
        w=-10 * COIN,
    )
    shop.sql("UPDATE ledger_account SET balance = balance + :v WHERE id = :a", v=10 * COIN, a=asset_id)
    shop.sql("UPDATE ledger_account SET balance = balance - :v WHERE id = :c", v=10 * COIN, c=alice_id)
    shop.sql("UPDATE ledger_head SET entries = entries + 2, txns = txns + 1 WHERE id = 1")
    result = shop.c("audit", "ledger", "--json")
    assert result.exit_code == 3, result.output
    problems = json.loads(result.stdout)["problems"]
    assert sum("is not in the audit log: inserted outside the tool" in p for p in problems) == 2
    assert any(f"ledger transaction #{txn_id}" in p and "not in the audit log" in p for p in problems)
    assert shop.halted()


# ---------------------------------------------------------------- the addresses


def test_an_address_row_given_to_another_account_is_not_credited_and_is_caught(shop: Shop) -> None:
    alice = shop.address("alice")
    shop.address("bob")
    shop.sql("UPDATE address SET account = 'mallory' WHERE address = :a", a=alice["address"])
    shop.pay(alice["script_pubkey"])
    result = shop.c("sync")
    assert result.exit_code == 3, result.output
    assert "the audit log issued it to 'alice'" in result.output
    assert shop.halted()
    assert shop.sql("SELECT COUNT(*) FROM deposit") == [(0,)]  # not recorded, not credited to anyone
    assert shop.balance("mallory") == 0
    assert shop.sql("SELECT COUNT(*) FROM ledger_entry") == [(0,)]

    verified = shop.c("verify", "addresses", "--manifest", str(shop.c.home / "founders-manifest.json"), "--json")
    assert verified.exit_code == 3, verified.output
    (failure,) = json.loads(verified.stdout)["failures"]
    assert failure["address"] == alice["address"]
    assert "account 'mallory'" in failure["reason"] and "issued it to 'alice'" in failure["reason"]
    assert shop.c("audit", "log", "--verify").exit_code == 3

    # Put right, the deposit is credited to alice, whom the log issued the address to.
    shop.sql("UPDATE address SET account = 'alice' WHERE address = :a", a=alice["address"])
    shop.ok("sync")
    assert shop.balance("alice") == 50 * COIN


def test_address_rows_deleted_or_inserted_by_sql_are_caught(shop: Shop) -> None:
    issued = shop.ok("address", "new", "--account", "alice", "--count", "3")
    manifest = str(shop.c.home / "founders-manifest.json")
    shop.sql("DELETE FROM address WHERE address = :a", a=issued[1]["address"])
    verified = shop.c("verify", "addresses", "--manifest", manifest, "--json")
    assert verified.exit_code == 3, verified.output
    (failure,) = json.loads(verified.stdout)["failures"]
    assert (failure["chain"], failure["index"]) == (0, 1)
    assert "deleted outside the tool" in failure["reason"]
    assert shop.halted()


def test_an_address_row_inserted_by_sql_is_caught_though_it_derives_correctly(shop: Shop) -> None:
    shop.ok("address", "new", "--account", "alice", "--count", "2")
    # The real address at 0/7, derived from the policy: the verifier alone would pass it.
    from custody.control.wallet import load_policy

    db = Database(shop.c.env["CUSTODY_DB_URL"])
    derived = AddressDeriver(load_policy(db)).derive(0, 7)
    db.dispose()
    shop.sql(
        "INSERT INTO address (chain, idx, account, address, script_pubkey, script, created_at) "
        "VALUES (0, 7, 'mallory', :a, :spk, :script, CURRENT_TIMESTAMP)",
        a=derived.address,
        spk=derived.script_pubkey.hex(),
        script=derived.script.hex(),
    )
    verified = shop.c("verify", "addresses", "--manifest", str(shop.c.home / "founders-manifest.json"), "--json")
    assert verified.exit_code == 3, verified.output
    (failure,) = json.loads(verified.stdout)["failures"]
    assert failure["address"] == derived.address
    assert "never issued in the audit log: inserted outside the tool" in failure["reason"]
    # A deposit to it is not credited to mallory.
    shop.pay(derived.script_pubkey.hex())
    assert shop.c("sync").exit_code == 3
    assert shop.sql("SELECT COUNT(*) FROM ledger_entry") == [(0,)]


# ---------------------------------------------------------------- truncation and rewrites, against witnesses


def _run_audits(shop: Shop, n: int) -> None:
    for _ in range(n):
        shop.ok("audit", "ledger")


def test_a_truncated_log_with_its_head_set_back_is_caught_against_a_witness(shop: Shop) -> None:
    shop.deposit("alice")
    _run_audits(shop, 3)
    auditor = shop.tmp / "auditor" / "checkpoints.jsonl"
    taken = shop.ok("audit", "log", "checkpoint", "--out", str(auditor))
    # The insider deletes the last three entries and sets the head back: the chain verifies.
    ((seq, digest),) = shop.sql("SELECT seq, hash FROM audit_log WHERE seq = :s", s=taken["seq"] - 3)
    shop.sql("DELETE FROM audit_log WHERE seq > :s", s=seq)
    shop.sql("UPDATE audit_head SET seq = :s, hash = :h WHERE id = 1", s=seq, h=digest)
    db = Database(shop.c.env["CUSTODY_DB_URL"])
    with db.transaction() as s:
        assert audit_log.verify_chain(s) == []  # intact, as far as the chain alone can tell
    db.dispose()

    # Against the auditor's checkpoint (the local witness moved out of the way first).
    shop.c.env["CUSTODY_WITNESS_FILE"] = str(shop.tmp / "elsewhere.jsonl")
    result = shop.c("audit", "log", "--verify", "--against", str(auditor), "--json")
    assert result.exit_code == 3, result.output
    reasons = [p["reason"] for p in json.loads(result.stdout)["problems"]]
    assert any(f"the log ends at entry {seq}" in r and f"entry {taken['seq']}" in r for r in reasons)
    assert shop.halted()


def test_the_local_witness_catches_a_truncation_at_the_next_command(shop: Shop) -> None:
    shop.deposit("alice")
    _run_audits(shop, 2)
    ((head,),) = shop.sql("SELECT seq FROM audit_head")
    ((seq, digest),) = shop.sql("SELECT seq, hash FROM audit_log WHERE seq = :s", s=head - 2)
    shop.sql("DELETE FROM audit_log WHERE seq > :s", s=seq)
    shop.sql("UPDATE audit_head SET seq = :s, hash = :h WHERE id = 1", s=seq, h=digest)
    result = shop.c("ledger", "balance", "alice")  # any command that opens the store
    assert result.exit_code == 3, result.output
    assert "disagrees with the witness" in result.output
    state = json.loads((shop.c.home / "halt.json").read_text())
    assert state["halted"] is True
    assert any("witness" in h["reason"] for h in state["halts"])
    # The witness keeps what it saw: nothing lower was appended after it.
    lines = (shop.c.home / "witness.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["seq"] == head


def _rehash_from(shop: Shop, seq: int) -> None:
    """Recompute every hash from entry ``seq`` on and the head: a consistent rewrite."""
    db = Database(shop.c.env["CUSTODY_DB_URL"])
    with db.transaction() as s:
        from sqlmodel import col, select

        rows = list(s.exec(select(AuditEntry).where(col(AuditEntry.seq) >= seq).order_by(col(AuditEntry.seq))))
        prev = s.exec(select(AuditEntry.hash).where(AuditEntry.seq == seq - 1)).one()
    db.dispose()
    for e in rows:
        digest = audit_log.entry_hash(
            e.seq, audit_log._at(e.at), e.event, e.actor, e.payload, e.signature, prev, e.origin
        )
        shop.sql("UPDATE audit_log SET prev_hash = :p, hash = :h WHERE seq = :s", p=prev, h=digest, s=e.seq)
        prev = digest
    shop.sql("UPDATE audit_head SET hash = :h WHERE id = 1", h=prev)


def test_a_log_rehashed_whole_after_an_edit_is_caught_against_a_witness(shop: Shop) -> None:
    alice = shop.deposit("alice")
    _run_audits(shop, 1)
    auditor = shop.tmp / "auditor.jsonl"
    shop.ok("audit", "log", "checkpoint", "--out", str(auditor))
    # A webhook receiver's saved body of the last notifiable entry is a witness too.
    db = Database(shop.c.env["CUSTODY_DB_URL"])
    with db.transaction() as s:
        from sqlmodel import col, select

        entry = s.exec(
            select(AuditEntry).where(AuditEntry.event == "audit.ledger").order_by(col(AuditEntry.seq))
        ).all()[-1]
        note = notification_for(entry)
    db.dispose()
    assert note is not None
    body = shop.tmp / "webhook-body.json"
    body.write_text(json.dumps(note.document(), sort_keys=True, separators=(",", ":")))

    # The insider gives alice's address to mallory in the row AND in the log's issuance entry,
    # then re-hashes the chain from there: the chain, the rows and the log all agree.
    ((seq, payload),) = shop.sql("SELECT seq, payload FROM audit_log WHERE event = 'address.issued'")
    doc = json.loads(payload)
    doc["account"] = "mallory"
    from custody.issuance.record import row_line

    a = alice
    doc["rows_sha256"] = (
        __import__("hashlib")
        .sha256(row_line(0, a["index"], "mallory", a["address"], a["script_pubkey"], a["script"]))
        .hexdigest()
    )
    shop.sql("UPDATE audit_log SET payload = :p WHERE seq = :s", p=audit_log.canonical(doc), s=seq)
    shop.sql("UPDATE address SET account = 'mallory' WHERE address = :a", a=a["address"])
    _rehash_from(shop, seq)
    shop.c.env["CUSTODY_WITNESS_FILE"] = str(shop.tmp / "elsewhere.jsonl")
    assert shop.c("audit", "log", "--verify").exit_code == 0  # without a witness: consistent

    for witness in (auditor, body):
        result = shop.c("audit", "log", "--verify", "--against", str(witness), "--json")
        assert result.exit_code == 3, result.output
        reasons = [p["reason"] for p in json.loads(result.stdout)["problems"]]
        assert any("the log was rewritten at or before it" in r for r in reasons), reasons
    assert shop.halted()


# ---------------------------------------------------------------- witness files


def test_a_witness_that_is_not_one_is_refused_with_exit_2(shop: Shop) -> None:
    junk = shop.tmp / "junk.txt"
    junk.write_text("hello\n")
    result = shop.c("audit", "log", "--verify", "--against", str(junk))
    assert result.exit_code == 2, result.output
    missing = shop.c("audit", "log", "--verify", "--against", str(shop.tmp / "nope.jsonl"))
    assert missing.exit_code == 2


def test_a_torn_last_line_is_skipped_and_cut_off_by_the_next_append(shop: Shop) -> None:
    path = shop.c.home / "witness.jsonl"
    before = path.read_text().splitlines()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"format":"custody-checkpoint","seq":99')  # a crash in the middle of an append
    assert parse(path.read_text(), "w") == parse("\n".join(before) + "\n", "w")
    shop.ok("audit", "ledger")  # appends its head
    lines = path.read_text().splitlines()
    assert lines[: len(before)] == before
    assert all(json.loads(line)["format"] == "custody-checkpoint" for line in lines)
    assert len(lines) == len(before) + 1


def test_a_witness_from_another_log_or_a_forged_hash_disagrees() -> None:
    cps = parse(
        Checkpoint(3, "ab" * 32).line() + Checkpoint(5, "cd" * 32).line(),
        "file",
    )
    assert [(c.seq, c.hash) for c in cps] == [(3, "ab" * 32), (5, "cd" * 32)]
    mail = "custody: HALT\n\nevent:     halt.raised (audit log entry 12)\nhash:      " + "ef" * 32 + "\n"
    (from_mail,) = parse(mail, "mail")
    assert (from_mail.seq, from_mail.hash) == (12, "ef" * 32)
