"""``custody audit liabilities`` and ``check-inclusion`` through the CLI, on the embedded chain.

Account numbers are assigned once and logged; each customer's nonce file is written once and
never silently renewed; every customer checks their balance with the file they were given;
the published file names nobody and shows no split balance whole.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript, lx

from custody.bitcoin.descriptors import add_checksum
from custody.chain.embedded import EmbeddedBackend, open_chain
from custody.chain.kernel import COINBASE_MATURITY
from custody.verify import liabilities as checker
from tests.support import Custody
from tests.withdraw_support import key_ceremony

OP_TRUE = b"\x51"


class Books:
    """A store on the embedded chain whose customers are paid exact amounts."""

    def __init__(self, tmp: Path, db_url: str | None = None) -> None:
        self.tmp = tmp
        self.c = Custody(tmp / "home", db_url=db_url)
        self.c.env["CUSTODY_CHAIN"] = "embedded"
        self.chain: EmbeddedBackend = open_chain(tmp / "home" / "chain")
        key_ceremony(self.c, tmp, "p2wsh")
        self.chain.mine(1, OP_TRUE)
        self.chain.mine(COINBASE_MATURITY, b"\x52")

    def ok(self, *args: str) -> Any:
        result = self.c(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def pay(self, amounts: dict[str, int]) -> None:
        """One transaction from an anyone-can-spend coinbase to a fresh address of each account."""
        coin = next(u for u in self.chain.unspent([OP_TRUE]))
        outs = []
        for account, sats in amounts.items():
            (issued,) = self.ok("address", "new", "--account", account)
            outs.append(CMutableTxOut(sats, CScript(bytes.fromhex(issued["script_pubkey"]))))
        change = coin.amount - sum(amounts.values()) - 10_000
        outs.append(CMutableTxOut(change, CScript(OP_TRUE)))
        tx = CMutableTransaction([CMutableTxIn(COutPoint(lx(coin.txid), coin.vout))], outs)
        self.chain.submit_block(self.chain.make_block([tx.serialize()], b"\x52"))
        self.ok("sync")

    def sql(self, statement: str, *args: Any) -> list[Any]:
        con = sqlite3.connect(self.c.home / "custody.db")
        with con:
            rows = con.execute(statement, args).fetchall()
        con.close()
        return rows

    def events(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.ok("audit", "log") if e["event"] == event]


@pytest.fixture
def books(tmp_path: Path) -> Iterator[Books]:
    b = Books(tmp_path)
    b.pay({"alice": 50_000_000, "bob": 123_456, "carol": 7})
    yield b
    b.chain.close()


OWED = {"customer:alice": 50_000_000, "customer:bob": 123_456, "customer:carol": 7}


def _publish(books: Books, name: str = "liabilities.txt") -> dict[str, Any]:
    return dict(books.ok("audit", "liabilities", "--out", str(books.tmp / name), "--nonces", str(books.tmp / "nonces")))


def _nonce_files(books: Books) -> dict[str, Path]:
    return {json.loads(p.read_text())["ledger_account"]: p for p in (books.tmp / "nonces").glob("*.json")}


def test_every_customer_checks_their_balance_with_the_nonce_file_they_were_given(books: Books) -> None:
    first = _publish(books)
    assert first["accounts"] == 3 and first["root"]["value_sat"] == sum(OWED.values())
    assert first["height"] == books.chain.tip_height() and first["leaves"] == 8
    files = _nonce_files(books)
    assert set(files) == set(OWED) and {n["ledger_account"] for n in first["new_nonces"]} == set(OWED)
    assert all(p.stat().st_mode & 0o077 == 0 for p in files.values())  # private
    assert (books.tmp / "nonces").stat().st_mode & 0o077 == 0
    published = (books.tmp / "liabilities.txt").read_text()
    assert "alice" not in published and "customer" not in published
    tree = checker.parse(published)
    for key, owed in OWED.items():
        checked = books.ok(
            "audit", "check-inclusion", str(books.tmp / "liabilities.txt"), "--nonce-file", str(files[key]),
            "--balance", f"{owed / 1e8:.8f}",
        )  # fmt: skip
        assert checked["balance_sat"] == owed and checked["height"] == first["height"]
        values = [leaf["value_sat"] for leaf in checked["leaves"]]
        assert sum(values) == owed and len(values) >= 2 and max(values) < owed  # never one whole leaf
        assert all(tree.leaves[leaf["index"]].value == leaf["value_sat"] for leaf in checked["leaves"])
    numbered = books.events("liabilities.account_numbered")
    issued = books.events("liabilities.nonce_issued")
    assert (
        {e["payload"]["ledger_account"] for e in numbered}
        == set(OWED)
        == {e["payload"]["ledger_account"] for e in issued}
    )
    numbers = {e["payload"]["ledger_account"]: e["payload"]["number"] for e in numbered}
    assert {k: int(p.stem) for k, p in files.items()} == numbers
    (record,) = books.events("audit.liabilities")
    assert (
        record["payload"]["root_digest"] == first["root"]["digest"] and record["payload"]["height"] == first["height"]
    )

    # the next run: same numbers, same nonces, nothing new to hand out, a new random split
    before = {k: p.read_bytes() for k, p in files.items()}
    books.chain.mine(1, b"\x52")
    second = _publish(books, "liabilities-2.txt")
    assert second["new_nonces"] == [] and second["root"]["value_sat"] == first["root"]["value_sat"]
    assert {k: p.read_bytes() for k, p in _nonce_files(books).items()} == before
    assert len(books.events("liabilities.account_numbered")) == 3 and len(books.events("audit.liabilities")) == 2
    for key, owed in OWED.items():
        again = books.ok(
            "audit", "check-inclusion", str(books.tmp / "liabilities-2.txt"), "--nonce-file", str(files[key])
        )
        assert again["balance_sat"] == owed and again["height"] == first["height"] + 1
    assert books.ok("audit", "log", "--verify")["ok"]

    # the customer's other ways in, as BitMEX's validator takes them: number and nonce
    alice = json.loads(files["customer:alice"].read_text())
    number, nonce = str(alice["account_number"]), alice["account_nonce"]
    path = str(books.tmp / "liabilities.txt")
    assert (
        books.ok("audit", "check-inclusion", path, "--account", number, "--account-nonce", nonce)["balance_sat"]
        == 50_000_000
    )
    sub = checker.sub_nonce(bytes.fromhex(nonce), first["height"], int(number)).hex()
    assert books.ok("audit", "check-inclusion", path, "--account", number, "--nonce", sub)["balance_sat"] == 50_000_000
    wrong = books.c("audit", "check-inclusion", path, "--nonce-file", str(files["customer:alice"]), "--balance", "0.6")
    assert wrong.exit_code == 3 and "not the 60000000 sat expected" in wrong.stderr
    bob_number = str(json.loads(files["customer:bob"].read_text())["account_number"])
    mixed = books.c(
        "audit", "check-inclusion", path, "--account", bob_number, "--nonce-file", str(files["customer:alice"])
    )
    assert mixed.exit_code == 2 and "is for account" in mixed.stderr
    stolen = books.c("audit", "check-inclusion", path, "--account", bob_number, "--account-nonce", nonce)
    assert stolen.exit_code == 3 and "no leaf is account" in stolen.stderr


def test_a_tampered_published_file_fails_the_customers_check(books: Books) -> None:
    _publish(books)
    alice = str(_nonce_files(books)["customer:alice"])
    lines = (books.tmp / "liabilities.txt").read_text().splitlines()
    digest, value = lines[-1].split(",")
    for changed, why in (
        (f"{digest},{int(value) + 1}", "is not the sum"),
        (f"{digest},-{value}", "must be DIGEST,VALUE"),
        (f"{digest},{2**64}", "overflows"),
    ):
        forged = books.tmp / "forged.txt"
        forged.write_text("\n".join([*lines[:-1], changed]) + "\n")
        result = books.c("audit", "check-inclusion", str(forged), "--nonce-file", alice)
        assert result.exit_code == 3 and why in result.stderr, result.output
    forged.write_text("\n".join(lines[:-8]) + "\n")  # the leaves cut off
    result = books.c("audit", "check-inclusion", str(forged), "--nonce-file", alice)
    assert result.exit_code == 3 and "no leaf is account" in result.stderr
    assert books.c("audit", "check-inclusion", str(books.tmp / "none.txt"), "--nonce-file", alice).exit_code == 2
    (books.tmp / "bad.json").write_text('{"format": "custody-account-nonce", "version": 1}')
    result = books.c(
        "audit", "check-inclusion", str(books.tmp / "liabilities.txt"), "--nonce-file", str(books.tmp / "bad.json")
    )
    assert result.exit_code == 2


def test_a_nonce_file_lost_or_replaced_is_refused_and_nothing_is_published(books: Books) -> None:
    _publish(books)
    files = _nonce_files(books)
    alice = files["customer:alice"]
    kept = alice.read_bytes()
    out = books.tmp / "refused.txt"

    def refused(why: str) -> None:
        result = books.c("audit", "liabilities", "--out", str(out), "--nonces", str(books.tmp / "nonces"))
        assert result.exit_code == 6 and why in result.stderr, result.output
        assert not out.exists() and len(books.events("audit.liabilities")) == 1

    alice.unlink()  # lost: a fresh nonce would break alice's checks
    refused("is missing")
    doc = json.loads(kept)
    alice.write_text(json.dumps(dict(doc, account_nonce="11" * 32)))  # replaced by an insider
    refused("it was replaced")
    alice.write_bytes(files["customer:bob"].read_bytes())  # another account's file
    refused("is for account")
    alice.write_bytes(kept)
    # the store's record of the nonce changed by SQL: the file no longer matches it
    books.sql("UPDATE liability_account SET nonce_sha256 = ? WHERE number = ?", "00" * 32, doc["account_number"])
    refused("it was replaced")
    # a run that stopped after writing the file and before recording it: the file is adopted
    books.sql("UPDATE liability_account SET nonce_sha256 = NULL WHERE number = ?", doc["account_number"])
    adopted = _publish(books, "adopted.txt")
    assert adopted["new_nonces"] == [] and alice.read_bytes() == kept
    assert len(books.events("liabilities.nonce_issued")) == 4
    assert books.ok("audit", "check-inclusion", str(books.tmp / "adopted.txt"), "--nonce-file", str(alice))["ok"]


def test_a_new_customer_gets_a_number_and_a_nonce_the_others_keep_theirs(books: Books) -> None:
    _publish(books)
    numbers = {k: int(p.stem) for k, p in _nonce_files(books).items()}
    books.pay({"dave": 999})
    again = _publish(books, "next.txt")
    assert [n["ledger_account"] for n in again["new_nonces"]] == ["customer:dave"]
    after = {k: int(p.stem) for k, p in _nonce_files(books).items()}
    assert {k: v for k, v in after.items() if k != "customer:dave"} == numbers
    assert len(set(after.values())) == 4 and all(10**11 <= n < 10**12 for n in after.values())
    assert books.sql("SELECT COUNT(*) FROM liability_account") == [(4,)]


def test_reserves_at_a_past_height_on_the_embedded_chain_are_those_of_that_block(books: Books) -> None:
    height = books.chain.tip_height()
    published = _publish(books)
    then = books.ok("audit", "reserves", "--proof", str(books.tmp / "then.yaml"))
    assert then["ok"] and then["reserves_sat"] == then["liabilities_sat"] == published["root"]["value_sat"]
    books.pay({"erin": 1_000})
    books.chain.mine(2, b"\x52")
    later = books.ok("audit", "reserves", "--proof", str(books.tmp / "later.yaml"), "--height", str(height))
    assert later["ok"] and later["height"] == height and later["tip_height"] == height + 3
    assert (books.tmp / "later.yaml").read_text() == (books.tmp / "then.yaml").read_text()
    assert books.ok("audit", "reserves")["reserves_sat"] == then["reserves_sat"] + 1_000


def test_account_nonces_appear_nowhere_but_in_their_files(books: Books) -> None:
    """Not in the store (database and WAL), the audit log, the published file or any output."""
    outputs = [json.dumps(_publish(books)), json.dumps(_publish(books, "again.txt"))]
    files = _nonce_files(books)
    for p in files.values():
        result = books.c("audit", "check-inclusion", str(books.tmp / "again.txt"), "--nonce-file", str(p), "--json")
        outputs += [result.stdout, result.stderr]
    outputs.append(json.dumps(books.ok("audit", "log")))
    stored = b"".join(p.read_bytes() for p in books.c.home.glob("custody.db*"))
    published = (books.tmp / "liabilities.txt").read_bytes() + (books.tmp / "again.txt").read_bytes()
    for p in files.values():
        nonce = bytes.fromhex(json.loads(p.read_text())["account_nonce"])
        for form in (nonce, nonce.hex().encode(), nonce.hex().upper().encode()):
            assert form not in stored and form not in published
            assert all(form.decode("latin-1") not in text for text in outputs)


@pytest.mark.postgres
def test_numbers_and_nonces_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    b = Books(tmp_path, db_url=pg_url)
    try:
        b.pay({"alice": 50_000_000, "bob": 123_456})
        first = _publish(b)
        assert first["accounts"] == 2 and len(first["new_nonces"]) == 2
        assert _publish(b, "again.txt")["new_nonces"] == []
        for key, p in _nonce_files(b).items():
            owed = {"customer:alice": 50_000_000, "customer:bob": 123_456}[key]
            assert (
                b.ok("audit", "check-inclusion", str(tmp_path / "again.txt"), "--nonce-file", str(p))["balance_sat"]
                == owed
            )
        assert b.ok("audit", "reserves")["ok"]
    finally:
        b.chain.close()


# ---------------------------------------------------------------- the auditor's check of a proof of reserves


def _proof_and_manifest(books: Books) -> tuple[dict[str, Any], Path]:
    books.pay({"dave": 4_000, "erin": 5_000})
    assert books.ok("audit", "reserves", "--proof", str(books.tmp / "reserves.yaml"))["ok"]
    manifest = books.tmp / "founders.json"
    assert books.c("policy", "manifest", "--out", str(manifest)).exit_code == 0
    return json.loads((books.tmp / "reserves.yaml").read_text()), manifest


def test_the_auditor_checks_that_the_proof_lists_only_the_founders_multisig(books: Books) -> None:
    doc, manifest = _proof_and_manifest(books)
    checked = books.ok("verify", "reserves", str(books.tmp / "reserves.yaml"), "--manifest", str(manifest))
    assert checked["addresses"] == 5 and checked["total_sat"] == doc["total"] == 50_000_000 + 123_456 + 7 + 9_000
    first = doc["address"][0]
    xpubs = [k.split("/")[0] for k in first["script"].split("sortedmulti(2,")[1].split(")")[0].split(",")]
    one_key = f"{first['script'].split('sortedmulti(2,')[0]}sortedmulti(1,{xpubs[0]}/0/0))"
    forgeries = {
        # BitMEX's validator accepts any descriptor in which one listed xpub appears: a 1-of-1
        # of one founder's key is such a descriptor, and no longer the founders' multisig
        "one founder": ("script", add_checksum(one_key), "founders' multisig"),
        "threshold": (
            "script",
            add_checksum(first["script"].split("#")[0].replace("(2,", "(1,")),
            "sortedmulti(2",
        ),
        "checksum": ("script", first["script"][:-1] + ("q" if first["script"][-1] != "q" else "p"), "checksum"),
        "address": ("addr", doc["address"][1]["addr"], "is listed twice"),
    }
    for name, (field, value, why) in forgeries.items():
        forged = json.loads(json.dumps(doc))
        forged["address"][0][field] = value
        if name == "address":
            forged["address"][0] = dict(doc["address"][1])
        (books.tmp / "forged.yaml").write_text(json.dumps(forged))
        result = books.c("verify", "reserves", str(books.tmp / "forged.yaml"), "--manifest", str(manifest))
        assert result.exit_code == 3 and why in result.stderr, (name, result.output)
    for change, why in (
        ({"chain": "main"}, "chain is"),
        ({"claim": {"m": 1, "n": 3}}, "claim is"),
        ({"total": doc["total"] + 1}, "add up to"),
        ({"xpub": [*doc["xpub"], doc["xpub"][0]]}, "exactly the founders' keys"),
    ):
        (books.tmp / "forged.yaml").write_text(json.dumps(doc | change))
        result = books.c("verify", "reserves", str(books.tmp / "forged.yaml"), "--manifest", str(manifest))
        assert result.exit_code == 3 and why in result.stderr, (change, result.output)
    moved = json.loads(json.dumps(doc))
    moved["address"][0]["addr"] = doc["address"][1]["addr"]  # another position's address
    (books.tmp / "forged.yaml").write_text(json.dumps(moved))
    assert books.c("verify", "reserves", str(books.tmp / "forged.yaml"), "--manifest", str(manifest)).exit_code == 3
    assert books.c("verify", "reserves", str(books.tmp / "none.yaml"), "--manifest", str(manifest)).exit_code == 2
