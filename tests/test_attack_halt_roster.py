"""An insider rolls the halt log's roster back to lift a halt alone.

Who may lift at a ``halt.lifted`` entry is the founders' roster named by the last
``roster.applied`` entry before it. Every roster the founders ever signed still stands (it
governed its history), so an entry appended by SQL (well chained: the library computes the
hashes) that names an *older* roster brings back every lift key the founders removed since.
Here bob signed a lift, then the founders disabled him (his key leaked to eve); eve lifts, and
alone she appends the old roster's entry and a ``halt.lifted`` with both signatures. A roster
entry that goes back (a lower serial, or the same serial with another digest) must let nobody
lift from it on, as an entry whose roster does not stand.
"""

from __future__ import annotations

import gc
import json
import sqlite3
from pathlib import Path

from sqlmodel import col, select

from custody.control import audit_log
from custody.store.db import Database
from custody.store.models import AuditEntry, HaltLift
from tests.support import Custody, founders


def test_a_roster_entry_rolled_back_by_sql_lifts_no_halt(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    keys = {name: c.employee(name) for name in ("alice", "bob", "eve")}

    def as_(who: str) -> list[str]:
        return ["--as", who, "--key", str(keys[who])]

    raised = c("halt", "raise", "--reason", "bob's key leaked", *as_("alice"), "--json")
    assert raised.exit_code == 0, raised.output
    halt_id = int(json.loads(raised.stdout)["halt_id"])
    assert c("halt", "lift", str(halt_id), *as_("bob")).exit_code == 0
    assert c("employee", "disable", "bob").exit_code == 0
    c.apply_roster()  # the founders disable bob: his signature counts no more
    assert c("halt", "lift", str(halt_id), *as_("eve")).exit_code == 0
    assert c("halt", "status").exit_code == 3

    gc.collect()
    db = Database(f"sqlite:///{c.home / 'custody.db'}")
    try:
        with db.transaction() as s:
            entries = s.exec(select(AuditEntry).order_by(col(AuditEntry.seq))).all()
            old = [e for e in entries if e.event == "roster.applied"][-2]  # bob still enabled
            audit_log.append(s, "roster.applied", "operator", json.loads(old.payload))
            lifts = [
                {"employee": r.employee, "pubkey": r.pubkey, "signature": r.signature}
                for r in s.exec(select(HaltLift).where(HaltLift.halt_id == halt_id).order_by(col(HaltLift.id)))
            ]
            assert sorted(x["employee"] for x in lifts) == ["bob", "eve"]
            payload = {"halt_id": halt_id, "signers": ["bob", "eve"], "lifts": lifts}
            audit_log.append(s, "halt.lifted", "bob,eve", payload)
        with sqlite3.connect(c.home / "custody.db") as raw:
            raw.execute("UPDATE halt SET active = 0, lifted_at = '2026-01-01 00:00:00.000000' WHERE id = ?", (halt_id,))
        with db.transaction() as s:
            assert audit_log.verify_chain(s) == []  # the chain itself is intact
    finally:
        db.dispose()

    for light in ("1", "0"):  # the light read and the full one
        c.env["CUSTODY_HALT_LIGHT"] = light
        status = c("halt", "status", "--json")
        assert status.exit_code == 3, status.output
        (halt,) = json.loads(status.stdout)["halts"]
        assert halt["id"] == halt_id and "valid employee signature" in halt["problem"], halt
    assert c("address", "new", "--account", "acct-1").exit_code == 3
