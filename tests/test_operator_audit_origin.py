"""The audit log names who ran each command: the OS user and host (and the command), covered by
the entry's hash; entries written before it still verify."""

from __future__ import annotations

import json
import os
import pwd
import re
import sqlite3
from pathlib import Path

from custody.store.models import SCHEMA_VERSION
from tests.support import Custody, founders


def _who() -> tuple[str, str]:
    """What the OS says, read here independently of custody's own code."""
    return pwd.getpwuid(os.getuid()).pw_name, os.uname().nodename


def test_every_entry_names_the_os_user_host_and_command(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    c.json("address", "new", "--account", "a")
    entries = c.json("audit", "log")
    user, host = _who()
    issued = [e for e in entries if e["event"] == "address.issued"]
    assert issued and issued[-1]["origin"] == {"user": user, "host": host, "command": "address new"}
    assert all(e["origin"]["user"] == user and e["origin"]["host"] == host for e in entries)
    assert f"{user}@{host}" in c("audit", "log").stdout
    assert c("audit", "log", "--verify").exit_code == 0


def test_an_edited_origin_breaks_the_chain(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    c.json("address", "new", "--account", "a")
    seq = c.json("audit", "log")[-1]["seq"]
    forged = json.dumps({"user": "someone-else", "host": "elsewhere"}, separators=(",", ":"), sort_keys=True)
    with sqlite3.connect(c.home / "custody.db") as db:
        db.execute("UPDATE audit_log SET origin = ? WHERE seq = ?", (forged, seq))
    result = c("audit", "log", "--verify", "--json")
    assert result.exit_code == 3
    assert any(p["seq"] == seq and "edited" in p["reason"] for p in json.loads(result.stdout)["problems"])


def test_a_version_4_store_keeps_verifying_and_gains_origins(tmp_path: Path) -> None:
    # A store as version 4 left it: no origin column, entries hashed over seven fields.
    old = Custody(tmp_path / "old")
    assert old.init(founders()).exit_code == 0
    old.json("address", "new", "--account", "a")
    with sqlite3.connect(old.home / "custody.db") as db:
        rows = db.execute("SELECT seq FROM audit_log ORDER BY seq").fetchall()
    assert rows
    # Rebuild those entries' hashes without an origin, as a version-4 tool wrote them.
    with sqlite3.connect(old.home / "custody.db") as db:
        prev = "0" * 64
        for seq, at, event, actor, payload, signature in db.execute(
            "SELECT seq, at, event, actor, payload, signature FROM audit_log ORDER BY seq"
        ).fetchall():
            stamp = at.replace(" ", "T") + ("Z" if not at.endswith("Z") else "")
            digest = _v4_hash(seq, stamp, event, actor, payload, signature, prev)
            db.execute("UPDATE audit_log SET hash = ?, prev_hash = ? WHERE seq = ?", (digest, prev, seq))
            prev = digest
        db.execute("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,))
        db.execute("ALTER TABLE audit_log DROP COLUMN origin")
        db.execute("UPDATE custody_meta SET value = '4' WHERE key = 'schema_version'")
    (old.home / "witness.jsonl").unlink(missing_ok=True)  # the witness saw the hashes rebuilt above
    verified = old("audit", "log", "--verify")
    assert verified.exit_code == 0, verified.output
    with sqlite3.connect(old.home / "custody.db") as db:
        assert db.execute("SELECT value FROM custody_meta").fetchone()[0] == str(SCHEMA_VERSION)
    old.json("address", "new", "--account", "b")
    entries = old.json("audit", "log")
    assert entries[0]["origin"] is None and entries[-1]["origin"]["command"] == "address new"
    assert old("audit", "log", "--verify").exit_code == 0


def _v4_hash(seq: int, at: str, event: str, actor: str, payload: str, signature: str | None, prev: str) -> str:
    """The version-4 entry hash, written out from docs/FORMATS.md (not custody's function)."""
    import hashlib

    body = json.dumps([seq, at, event, actor, payload, signature, prev], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def test_every_entry_time_is_stored_in_one_form(tmp_path: Path) -> None:
    """SQLite keeps times as text: the issuance's own append (no ORM) writes the ORM's form, so
    readers that compare or parse the text see one form (a "+00:00" suffix broke the v4 hashes)."""
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    c.json("address", "new", "--account", "a")
    c.json("address", "new", "--account", "b", "--count", "3")
    with sqlite3.connect(c.home / "custody.db") as db:
        stamps = [at for (at,) in db.execute("SELECT at FROM audit_log ORDER BY seq")]
    assert len(stamps) >= 3
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", at) for at in stamps), stamps
