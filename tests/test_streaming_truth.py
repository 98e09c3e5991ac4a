"""The streaming reads tell the truth, chunk by chunk: listing, the export, `verify addresses`
(store and export) and `audit log --verify` over a store read seven rows at a time.

The expectation is the store itself read by plain SQL, never our own output. A row tampered
with in the middle of the stream, or deleted in chunk k, is named with exit 3; a writer that
moves a bad row behind the verifier's cursor between two chunks does not hide it: the whole
verification sees one snapshot (SQLite's WAL; PostgreSQL's repeatable read).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from custody.control import audit_log
from custody.issuance import issuer, record, verification
from custody.store.db import normalize_url
from tests.support import Custody, founders

BATCH = 7  # rows per query: 100 rows are 15 chunks
SIX = ("chain", "index", "account", "address", "script_pubkey", "script")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(issuer, "ADDRESS_BATCH", BATCH)
    monkeypatch.setattr(record, "ROW_BATCH", BATCH)  # the rows read by audit log --verify
    monkeypatch.setattr(audit_log, "CHAIN_BATCH", BATCH)
    monkeypatch.setattr(record, "ISSUED_CHUNK", 2)  # the issuances sorted in runs of two, merged


def _store(home: Path, db_url: str | None = None) -> Custody:
    c = Custody(home, db_url=db_url)
    assert c.init(founders()).exit_code == 0
    assert c("address", "new", "--account", "alice", "--count", "60").exit_code == 0
    assert c("address", "new", "--account", "bob", "--count", "40").exit_code == 0
    return c


@pytest.fixture
def store(tmp_path: Path) -> Custody:
    return _store(tmp_path / "home")


def _sql(c: Custody, query: str, *params: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(c.home / "custody.db")
    try:
        rows = db.execute(query, params).fetchall()
        db.commit()
    finally:
        db.close()
    return rows


def _rows(c: Custody) -> list[dict[str, Any]]:
    got = _sql(c, "SELECT chain, idx, account, address, script_pubkey, script FROM address ORDER BY chain, idx")
    return [dict(zip(SIX, r, strict=True)) for r in got]


def _mutated(address: str) -> str:
    """The address with one character changed (still unique in the table)."""
    last = "q" if address[-1] != "q" else "p"
    return address[:-1] + last


def _verify(c: Custody, *extra: str) -> tuple[int, dict[str, Any]]:
    manifest = str(c.home / "founders-manifest.json")
    result = c("verify", "addresses", "--manifest", manifest, "--workers", "2", "--no-halt", "--json", *extra)
    return result.exit_code, json.loads(result.stdout)


def test_listing_and_export_are_the_rows(store: Custody) -> None:
    expected = _rows(store)
    assert len(expected) == 100
    listed = json.loads(store("address", "list", "--json").stdout)
    assert [{k: a[k] for k in SIX} for a in listed] == expected
    as_csv = list(csv.DictReader(io.StringIO(store("address", "list", "--csv").stdout)))
    assert [{k: (int(a[k]) if k in ("chain", "index") else a[k]) for k in SIX} for a in as_csv] == expected
    out = store.home / "export.jsonl"
    assert store("address", "export", str(out)).exit_code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["format"] == "custody-address-export"
    assert lines[-1] == {"end": True, "count": 100}
    assert [{k: a[k] for k in SIX} for a in lines[1:-1]] == expected


def test_every_check_passes_on_the_untouched_store(store: Custody) -> None:
    code, report = _verify(store)
    assert (code, report["ok"], report["checked"]) == (0, True, 100), report
    out = store.home / "export.jsonl"
    assert store("address", "export", str(out)).exit_code == 0
    code, report = _verify(store, "--export", str(out))
    assert (code, report["ok"], report["checked"]) == (0, True, 100), report
    result = store("audit", "log", "--verify", "--json")
    report = json.loads(result.stdout)
    (entries,) = _sql(store, "SELECT COUNT(*) FROM audit_log")[0]
    assert (result.exit_code, report["ok"], report["entries"]) == (0, True, entries), report


def test_a_row_tampered_in_the_middle_is_named(store: Custody) -> None:
    out = store.home / "export.jsonl"
    assert store("address", "export", str(out)).exit_code == 0
    ((good,),) = _sql(store, "SELECT address FROM address WHERE chain = 0 AND idx = 50")
    _sql(store, "UPDATE address SET address = ? WHERE chain = 0 AND idx = 50", _mutated(good))
    code, report = _verify(store)
    assert code == 3
    assert {(f["chain"], f["index"]) for f in report["failures"] if f["address"] != "(audit log)"} == {(0, 50)}
    assert report["checked"] == 100

    lines = out.read_text().splitlines()  # the export, tampered on its 51st address line
    row = json.loads(lines[51])
    assert row["index"] == 50
    row["address"] = _mutated(row["address"])
    lines[51] = json.dumps(row)
    out.write_text("\n".join(lines) + "\n")
    code, report = _verify(store, "--export", str(out))
    assert code == 3
    assert [(f["chain"], f["index"]) for f in report["failures"]] == [(0, 50)], report

    result = store("audit", "log", "--verify", "--json")
    assert result.exit_code == 3
    reasons = [p["reason"] for p in json.loads(result.stdout)["problems"]]
    assert any("0/0..59" in r for r in reasons), reasons  # alice's issuance no longer matches its digest


def test_a_row_deleted_in_chunk_k_is_named(store: Custody) -> None:
    ((address,),) = _sql(store, "SELECT address FROM address WHERE chain = 0 AND idx = 30")  # chunk 5 of 7 rows
    _sql(store, "DELETE FROM address WHERE chain = 0 AND idx = 30")
    code, report = _verify(store)
    assert code == 3
    missing = [f for f in report["failures"] if f["address"] == "(missing)"]
    assert [(f["chain"], f["index"]) for f in missing] == [(0, 30)], report
    assert report["checked"] == 99
    result = store("audit", "log", "--verify", "--json")
    assert result.exit_code == 3
    assert any("(0/30)" in p["reason"] for p in json.loads(result.stdout)["problems"])
    listed = json.loads(store("address", "list", "--json").stdout)
    assert address not in {a["address"] for a in listed} and len(listed) == 99


def test_issuances_past_the_first_chunk_are_checked(tmp_path: Path) -> None:
    """Seven issuances, read and sorted two at a time: a row changed in the sixth and the log
    entry of the fifth deleted are each named (the rows' check streams the issuances)."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    for k in range(7):
        assert c("address", "new", "--account", f"a{k}", "--count", "3").exit_code == 0
    result = c("audit", "log", "--verify", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"], result.output
    _sql(c, "UPDATE address SET account = 'a0' WHERE chain = 0 AND idx = 16")
    result = c("audit", "log", "--verify", "--json")
    reasons = [p["reason"] for p in json.loads(result.stdout)["problems"]]
    assert result.exit_code == 3
    assert any("(0/16)" in r and "audit log issued it to 'a5'" in r for r in reasons), reasons
    (seq,) = _sql(c, "SELECT seq FROM audit_log WHERE event = 'address.issued' ORDER BY seq")[4]
    _sql(c, "DELETE FROM audit_log WHERE seq = ?", seq)
    reasons = [p["reason"] for p in json.loads(c("audit", "log", "--verify", "--json").stdout)["problems"]]
    for index in (12, 13, 14):
        assert any(f"(0/{index})" in r and "never issued in the audit log" in r for r in reasons), reasons


def _racing_writer(monkeypatch: pytest.MonkeyPatch, url: str, good: str, bad: str) -> list[bool]:
    """After the verifier's derivation pass has read its first ten rows, a writer commits:
    row 80 made good again and its bad address moved to row 3, behind the cursor."""
    original = verification.iter_addresses
    fired: list[bool] = []
    engine = create_engine(normalize_url(url))

    def racing(s: Any, batch: int | None = None) -> Iterator[Any]:
        for n, row in enumerate(original(s, batch)):
            if n == 10 and not fired:
                fired.append(True)
                with engine.begin() as conn:
                    conn.execute(text("UPDATE address SET address = 'moving' WHERE chain = 0 AND idx = 80"))
                    conn.execute(text("UPDATE address SET address = :a WHERE chain = 0 AND idx = 3"), {"a": bad})
                    conn.execute(text("UPDATE address SET address = :a WHERE chain = 0 AND idx = 80"), {"a": good})
            yield row

    monkeypatch.setattr(verification, "iter_addresses", racing)
    return fired


def _race(c: Custody, monkeypatch: pytest.MonkeyPatch, url: str, read: Any) -> None:
    good = read("SELECT address FROM address WHERE chain = 0 AND idx = 80")
    bad = _mutated(good)
    read(f"UPDATE address SET address = '{bad}' WHERE chain = 0 AND idx = 80")
    fired = _racing_writer(monkeypatch, url, good, bad)
    code, report = _verify(c)
    assert fired == [True]
    assert code == 3
    named = {f["index"] for f in report["failures"]}
    # The state as it stood when the verification began, in both passes: the bad row at 80
    # (its derivation, and bob's issuance 60..99), never row 3 (good then).
    assert 80 in named and 60 in named, report
    assert 3 not in named and 0 not in named, report
    assert report["checked"] == 100
    code, report = _verify(c)  # the next run sees the move
    assert code == 3 and 3 in {f["index"] for f in report["failures"]}


def test_a_writer_racing_the_store_verification_hides_nothing(store: Custody, monkeypatch: pytest.MonkeyPatch) -> None:
    def read(query: str) -> Any:
        rows = _sql(store, query)
        return rows[0][0] if rows else None

    _race(store, monkeypatch, store.env["CUSTODY_DB_URL"], read)


@pytest.mark.postgres
def test_a_writer_racing_the_store_verification_hides_nothing_postgres(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _store(tmp_path / "home", db_url=pg_url)
    engine = create_engine(normalize_url(pg_url))

    def read(query: str) -> Any:
        with engine.begin() as conn:
            result = conn.execute(text(query))
            return result.scalar() if result.returns_rows else None

    _race(c, monkeypatch, pg_url, read)
    engine.dispose()


ODD = ['quote " backslash \\ newline \n tab \t', "é € 😀 \u2028", "\x00\x1f control", "/slash/"]


def test_the_chain_check_hashes_every_kind_of_text_as_entry_hash_does(store: Custody) -> None:
    """Entries whose fields hold quotes, escapes, control characters and non-ASCII (with and
    without a signature and an origin), re-hashed independently, verify; one changed by SQL
    is named."""
    from custody.store.db import Database

    db = Database(store.env["CUSTODY_DB_URL"])
    with db.transaction() as s:
        for n, odd in enumerate(ODD):
            audit_log.append(s, f"test.{n}", odd[:20], {"text": odd, odd: [odd]}, signature=odd if n % 2 else None)
    _sql(store, "UPDATE audit_log SET origin = NULL WHERE event = 'test.0'")  # entries from before schema 5 have none
    ((seq, prev, payload, at, signature),) = _sql(
        store, "SELECT seq, prev_hash, payload, at, signature FROM audit_log WHERE event = 'test.0'"
    )
    # re-hash test.0 without its origin, as such an entry was written (independently: hashlib and json)
    stamp = at.replace(" ", "T") + "Z"
    fields = [seq, stamp, "test.0", ODD[0][:20], payload, signature, prev]
    digest = hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()
    _sql(store, "UPDATE audit_log SET hash = ? WHERE seq = ?", digest, seq)
    rest = _sql(store, "SELECT seq FROM audit_log WHERE seq > ? ORDER BY seq", seq)
    assert rest  # the entries after it no longer link: re-chain them as an insider would
    for (later,) in rest:
        row = _sql(
            store, "SELECT seq, at, event, actor, payload, signature, origin FROM audit_log WHERE seq = ?", later
        )[0]
        f = [row[0], row[1].replace(" ", "T") + "Z", row[2], row[3], row[4], row[5], digest]
        if row[6] is not None:
            f.append(row[6])
        new = hashlib.sha256(json.dumps(f, separators=(",", ":")).encode()).hexdigest()
        _sql(store, "UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?", digest, new, later)
        digest = new
    _sql(store, "UPDATE audit_head SET hash = ? WHERE id = 1", digest)
    for witness in store.home.glob("witness.jsonl"):
        witness.unlink()  # the local witness would (rightly) see the rewrite: here only the hashing is tested
    result = store("audit", "log", "--verify", "--json")
    assert result.exit_code == 0, result.stdout

    _sql(store, "UPDATE audit_log SET payload = replace(payload, 'text', 'next') WHERE event = 'test.1'")
    (edited,) = _sql(store, "SELECT seq FROM audit_log WHERE event = 'test.1'")[0]
    result = store("audit", "log", "--verify", "--json")
    assert result.exit_code == 3
    named = [(p["seq"], p["reason"]) for p in json.loads(result.stdout)["problems"]]
    assert (edited, "content does not match its hash (edited)") in named, named


def test_duplicates_are_found_part_by_part() -> None:
    """The verifier's duplicate search over a large set (looked at a sixteenth at a time)
    finds exactly the values that occur more than once (counted here by Counter)."""
    from array import array
    from collections import Counter

    from custody.verify.core import _duplicates

    rng = random.Random(17)
    values = array("Q", (rng.getrandbits(64) for _ in range(200_000)))
    for k in range(0, 200_000, 20_011):  # some repeated, once or several times, anywhere
        values.append(values[k])
        if k % 3 == 0:
            values.append(values[k])
    values.append((1 << 32) | 5)
    values.append((1 << 32) | 5)  # a chain/index position, as the positions array holds them
    expected = {v for v, n in Counter(values).items() if n > 1}
    assert len(expected) >= 11
    assert _duplicates(values) == expected
    assert _duplicates(array("Q", range(100_000))) == set()
