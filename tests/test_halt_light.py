"""`custody halt status` through the light path (no ORM) and through the full path give the
same answer, always: exit code, JSON, the halt file written, the warnings.

Every case makes a store in some state (by the CLI, by a library call an insider could make,
or by SQL as an insider with the database would), copies it twice, and runs `halt status
--json` in a fresh interpreter on each copy: once as it runs by default, once with the light
path turned off (CUSTODY_HALT_LIGHT=0). Each run also says which modules it loaded, so the
test knows which path answered: the light one where it should (no sqlalchemy), the full one
where the light path must not guess (halts pending in the halt file, a schema it does not
know, a damaged or missing store, a log past its head, a witness that disagrees).
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from custody.control import halt_file
from custody.errors import UNKNOWN_EXIT
from tests.support import Custody, founders
from tests.support import append_entry as _append
from tests.support import forged_lift as _forged_lift

_PROBE = """
import atexit, json, sys
atexit.register(lambda: sys.stderr.write("\\nLOADED " + json.dumps(sorted(
    m for m in ("sqlalchemy", "sqlmodel", "custody.store.models", "custody.control.halt") if m in sys.modules
)) + "\\n"))
sys.argv = ["custody", "halt", "status", "--json"]
from custody_cli.main import main
main()
"""

LIGHT, FULL = "light", "full"


@dataclass
class Answer:
    code: int
    doc: Any
    warnings: list[str]
    halt_file: Any
    loaded: set[str]


def _normal(text: str, home: Path) -> str:
    """Without what differs between two copies of one store: their directory, the time of the
    run (in a document: the times it was written at and is valid until; every other time, a
    halt's, must be the same)."""
    text = text.replace(str(home), "HOME")
    return re.sub(r'"(updated_at|valid_until)": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"', r'"\1": "TIME"', text)


def _run(home: Path, *, light: bool) -> Answer:
    c = Custody(home)
    env = dict(os.environ, **c.env, CUSTODY_HALT_LIGHT="1" if light else "0")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    lines = proc.stderr.splitlines()
    loaded = set(json.loads([ln for ln in lines if ln.startswith("LOADED ")][-1].removeprefix("LOADED ")))
    warnings = [_normal(ln, home) for ln in lines if ln.strip() and not ln.startswith("LOADED ")]
    doc = json.loads(_normal(proc.stdout, home)) if proc.stdout.strip() else None
    path = home / "halt.json"
    mirror = json.loads(_normal(path.read_text(), home)) if path.exists() else None
    return Answer(proc.returncode, doc, warnings, mirror, loaded)


def _untimed(answer: Answer) -> Answer:
    """The answer with every time masked: for a run that may write to the store itself (a halt
    replayed or raised by the full path), so each run's halts have their own time."""

    def mask(value: Any) -> Any:
        text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "TIME", json.dumps(value))
        return json.loads(text)

    return Answer(answer.code, mask(answer.doc), mask(answer.warnings), mask(answer.halt_file), answer.loaded)


@dataclass
class Shop:
    base: Path
    tmp: Path

    def copy(self, name: str) -> Custody:
        home = self.tmp / name / "home"
        shutil.copytree(self.base, home)
        return Custody(home)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Shop:
    tmp = tmp_path_factory.mktemp("halt-light")
    c = Custody(tmp / "base")
    assert c.init(founders()).exit_code == 0
    for name in ("alice", "bob", "carol"):
        c.employee(name)
    c.employee("dave", roles="request,approve")  # may not lift
    gc.collect()  # no pooled connection of the in-process commands holds the file while it is copied
    return Shop(c.home, tmp)


def _key(c: Custody, who: str) -> str:
    return str(c.home / "keys" / f"{who}.key")


def _raise(c: Custody, who: str = "alice", reason: str = "suspicious") -> int:
    result = c("halt", "raise", "--reason", reason, "--as", who, "--key", _key(c, who), "--json")
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["halt_id"])


def _lift(c: Custody, halt_id: int, *who: str) -> None:
    for name in who:
        result = c("halt", "lift", str(halt_id), "--as", name, "--key", _key(c, name), "--json")
        assert result.exit_code == 0, result.output


@contextmanager
def _sql(c: Custody) -> Iterator[sqlite3.Connection]:
    """The store's file edited behind the tool's back."""
    gc.collect()
    db = sqlite3.connect(c.home / "custody.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield db
        db.execute("COMMIT")
    finally:
        db.close()


def _lifted_payload(db: sqlite3.Connection) -> tuple[int, dict[str, Any]]:
    seq, payload = db.execute("SELECT seq, payload FROM audit_log WHERE event = 'halt.lifted'").fetchone()
    return seq, json.loads(payload)


def _set_payload(db: sqlite3.Connection, seq: int, doc: dict[str, Any]) -> None:
    db.execute("UPDATE audit_log SET payload = ? WHERE seq = ?", (json.dumps(doc, sort_keys=True), seq))


# ---------------------------------------------------------------- the states


def fresh(c: Custody) -> None:
    """A store just made: running."""


def raised(c: Custody) -> None:
    _raise(c)


def lifted_by_two(c: Custody) -> None:
    _lift(c, _raise(c), "alice", "bob")


def lifted_by_one(c: Custody) -> None:
    _lift(c, _raise(c), "alice")


def lifted_then_raised_again(c: Custody) -> None:
    _lift(c, _raise(c), "alice", "bob")
    _raise(c, "carol", "again")


def forged_lift_signature(c: Custody) -> None:
    _lift(c, _raise(c), "alice", "bob")
    with _sql(c) as db:
        seq, doc = _lifted_payload(db)
        sig = doc["lifts"][1]["signature"]
        doc["lifts"][1]["signature"] = sig[:-2] + ("00" if sig[-2:] != "00" else "11")
        _set_payload(db, seq, doc)


def duplicated_lift_signature(c: Custody) -> None:
    _lift(c, _raise(c), "alice", "bob")
    with _sql(c) as db:
        seq, doc = _lifted_payload(db)
        doc["lifts"] = [doc["lifts"][0], doc["lifts"][0]]
        _set_payload(db, seq, doc)


def signature_under_another_name(c: Custody) -> None:
    _lift(c, _raise(c), "alice", "bob")
    with _sql(c) as db:
        seq, doc = _lifted_payload(db)
        doc["lifts"][1] = dict(doc["lifts"][0], employee="bob")
        _set_payload(db, seq, doc)


def lift_by_one_who_may_not(c: Custody) -> None:
    halt_id = _raise(c)
    _lift(c, halt_id, "alice", "bob")
    with _sql(c) as db:
        seq, doc = _lifted_payload(db)
        doc["lifts"][1] = dict(doc["lifts"][1], employee="dave")
        _set_payload(db, seq, doc)


def forged_lift_before_a_real_one(c: Custody) -> None:
    """The insider's denial of service: a forged lift entered first must not keep the real
    lift by two employees from counting."""
    halt_id = _raise(c)
    _append(c, "halt.lifted", "alice,bob", _forged_lift(halt_id))
    _lift(c, halt_id, "alice", "bob")


def forged_lift_after_a_real_one(c: Custody) -> None:
    halt_id = _raise(c)
    _lift(c, halt_id, "alice", "bob")
    _append(c, "halt.lifted", "alice,bob", _forged_lift(halt_id))


def unreadable_lift_before_a_real_one(c: Custody) -> None:
    """A lift entry whose halt id is not a number: it lifts nothing and holds nothing back."""
    halt_id = _raise(c)
    _append(c, "halt.lifted", "alice,bob", _forged_lift(halt_id) | {"halt_id": str(halt_id)})
    _lift(c, halt_id, "alice", "bob")


def forged_lift_and_row_lifted(c: Custody) -> None:
    """The insider's mask: a forged lift entry, and the row marked lifted to agree with it."""
    halt_id = _raise(c)
    _append(c, "halt.lifted", "alice,bob", _forged_lift(halt_id))
    with _sql(c) as db:
        db.execute("UPDATE halt SET active = 0, lifted_at = '2026-01-01 00:00:00.000000'")


def one_real_signature_forged_into_a_lift(c: Custody) -> None:
    """alice signed; the insider appends a lift carrying her real signature under her name and
    under bob's, then a second forged entry with her signature alone."""
    halt_id = _raise(c)
    _lift(c, halt_id, "alice")
    with _sql(c) as db:
        pubkey, signature = db.execute("SELECT pubkey, signature FROM halt_lift").fetchone()
    alice = {"employee": "alice", "pubkey": pubkey, "signature": signature}
    for lifts in ([alice, dict(alice, employee="bob")], [alice]):
        _append(c, "halt.lifted", "alice,bob", {"halt_id": halt_id, "signers": ["alice", "bob"], "lifts": lifts})


def row_lifted_by_sql(c: Custody) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("UPDATE halt SET active = 0, lifted_at = '2026-01-01 00:00:00.000000'")


def row_deleted_by_sql(c: Custody) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("DELETE FROM incident_update")
        db.execute("DELETE FROM incident")
        db.execute("DELETE FROM halt")


def row_not_in_the_log(c: Custody) -> None:
    with _sql(c) as db:
        db.execute(
            "INSERT INTO halt (id, raised_at, raised_by, source, reason, active) "
            "VALUES (7, '2026-01-01 00:00:00.000000', 'mallory', 'employee', 'planted', 1)"
        )


def halt_entry_unreadable(c: Custody) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("UPDATE audit_log SET payload = '{' WHERE event = 'halt.raised'")


def lift_entry_deleted(c: Custody) -> None:
    """The halt.lifted entry and the head set back: the log past its head check passes."""
    _lift(c, _raise(c), "alice", "bob")
    with _sql(c) as db:
        seq, _ = _lifted_payload(db)
        db.execute("UPDATE audit_log SET event = 'note' WHERE seq = ?", (seq,))


def time_of_another_form(c: Custody) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("UPDATE halt SET raised_at = '2026-01-01T00:00:00+05:00'")


def active_as_text(c: Custody) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("UPDATE halt SET active = 'yes'")


def pending_in_the_halt_file(c: Custody) -> None:
    entry = {"id": "ab" * 16, "at": "2026-11-29T00:00:00.000000Z", "source": "ledger", "actor": "ledger"}
    entry |= {"reason": "waits for the store", "signature": None, "components": ["trading"]}
    assert halt_file.add_pending(c.home / "halt.json", entry, lease=60).written


def newer_halt_file_says_running(c: Custody) -> None:
    _raise(c)
    doc = json.loads((c.home / "halt.json").read_text())
    doc.update(halted=False, seq=doc["seq"] + 5, halts=[], valid_until="2099-01-01T00:00:00Z")
    (c.home / "halt.json").write_text(json.dumps(doc))


def newer_halt_file_says_halted(c: Custody) -> None:
    doc = json.loads((c.home / "halt.json").read_text())
    doc.update(halted=True, seq=doc["seq"] + 1)
    (c.home / "halt.json").write_text(json.dumps(doc))


def halt_file_garbage(c: Custody) -> None:
    (c.home / "halt.json").write_text("not json")


def schema_from_the_future(c: Custody) -> None:
    with _sql(c) as db:
        db.execute("UPDATE custody_meta SET value = '99' WHERE key = 'schema_version'")


def schema_version_garbage(c: Custody) -> None:
    with _sql(c) as db:
        db.execute("UPDATE custody_meta SET value = 'five' WHERE key = 'schema_version'")


def log_past_its_head(c: Custody) -> None:
    with _sql(c) as db:
        db.execute(
            "INSERT INTO audit_log (seq, at, event, actor, payload, prev_hash, hash) "
            "SELECT seq + 1, at, 'note', actor, '{}', hash, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
        )


def witness_disagrees(c: Custody) -> None:
    with _sql(c) as db:
        db.execute("UPDATE audit_log SET hash = ? WHERE seq = (SELECT MAX(seq) FROM audit_log)", ("ab" * 32,))


def witness_unreadable(c: Custody) -> None:
    (c.home / "witness.jsonl").write_text("garbage\n")


def store_missing(c: Custody) -> None:
    for suffix in ("", "-wal", "-shm"):
        (c.home / f"custody.db{suffix}").unlink(missing_ok=True)


def store_empty_file(c: Custody) -> None:
    store_missing(c)
    (c.home / "custody.db").write_bytes(b"")


def store_corrupted(c: Custody) -> None:
    gc.collect()
    path = c.home / "custody.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[0:100] = b"\xa5" * 100
    path.write_bytes(bytes(data))


def a_recipient_to_notify(c: Custody) -> None:
    """Someone is to be told: the notification step runs after the light answer too."""
    with _sql(c) as db:
        db.execute(
            "INSERT INTO notify_recipient (kind, target, active, created_at) "
            "VALUES ('webhook', 'http://127.0.0.1:9/hook', 1, '2026-01-01 00:00:00.000000')"
        )


CASES: list[tuple[Callable[[Custody], None], str, int]] = [
    (fresh, LIGHT, 0),
    (raised, LIGHT, 3),
    (lifted_by_two, LIGHT, 0),
    (lifted_by_one, LIGHT, 3),
    (lifted_then_raised_again, LIGHT, 3),
    (forged_lift_signature, LIGHT, 3),
    (duplicated_lift_signature, LIGHT, 3),
    (signature_under_another_name, LIGHT, 3),
    (lift_by_one_who_may_not, LIGHT, 3),
    (forged_lift_before_a_real_one, LIGHT, 0),
    (forged_lift_after_a_real_one, LIGHT, 0),
    (unreadable_lift_before_a_real_one, LIGHT, 0),
    (forged_lift_and_row_lifted, LIGHT, 3),
    (one_real_signature_forged_into_a_lift, LIGHT, 3),
    (row_lifted_by_sql, LIGHT, 3),
    (row_deleted_by_sql, LIGHT, 3),
    (row_not_in_the_log, LIGHT, 3),
    (halt_entry_unreadable, LIGHT, 3),
    (lift_entry_deleted, LIGHT, 3),
    (time_of_another_form, FULL, -1),
    (active_as_text, FULL, -1),
    (pending_in_the_halt_file, FULL, 3),
    (newer_halt_file_says_running, LIGHT, 3),
    (newer_halt_file_says_halted, LIGHT, 0),
    (halt_file_garbage, LIGHT, 0),
    (schema_from_the_future, FULL, 3),
    (schema_version_garbage, FULL, -1),
    (log_past_its_head, FULL, 3),
    (witness_disagrees, FULL, 3),
    (witness_unreadable, FULL, -1),
    (store_missing, FULL, 3),
    (store_empty_file, FULL, 3),
    (store_corrupted, FULL, -1),
    (a_recipient_to_notify, None, 0),
]
"""(the state, the path that must answer (None: either), the exit code (-1: whatever the full
path says))."""


def _both(shop: Shop, make: Callable[[Custody], None], name: str) -> tuple[Answer, Answer]:
    src = shop.copy(f"{name}/src")
    make(src)
    gc.collect()
    homes = []
    for which in ("light", "full"):
        home = shop.tmp / name / which
        shutil.copytree(src.home, home)
        homes.append(home)
    return _run(homes[0], light=True), _run(homes[1], light=False)


@pytest.mark.parametrize(("make", "path", "code"), CASES, ids=[c[0].__name__ for c in CASES])
def test_the_light_path_answers_as_the_full_path(
    shop: Shop, make: Callable[[Custody], None], path: str | None, code: int
) -> None:
    light, full = _both(shop, make, make.__name__)
    assert "sqlalchemy" in full.loaded  # the full path is what it says
    if path == LIGHT:
        assert light.loaded == set(), light.loaded
    elif path == FULL:
        assert "custody.control.halt" in light.loaded, "the light path must leave this state to the full path"
    if path != LIGHT:  # both may have raised a halt, each at its own time
        light, full = _untimed(light), _untimed(full)
    assert (light.code, light.doc, light.warnings) == (full.code, full.doc, full.warnings)
    assert light.halt_file == full.halt_file
    if code != -1:
        assert light.code == code, (light.doc, light.warnings)


@pytest.mark.parametrize(
    "make",
    [forged_lift_before_a_real_one, forged_lift_after_a_real_one, unreadable_lift_before_a_real_one],
    ids=lambda f: f.__name__,
)
def test_a_forged_lift_entry_is_reported_and_holds_no_real_lift_back(shop: Shop, make: Callable[..., None]) -> None:
    """Beside the real lift, the insider's entry lifts nothing and blocks nothing: trading runs,
    and both paths name the entry as written outside the tool."""
    light, full = _both(shop, make, f"reported-{make.__name__}")
    for answer in (light, full):
        assert answer.code == 0 and answer.doc["halted"] is False, (answer.doc, answer.warnings)
        assert answer.halt_file["halted"] is False
        (tampered,) = [w for w in answer.warnings if "written outside the tool" in w]
        assert "halt.lifted" in tampered and ("lifts nothing" in tampered or "cannot be read" in tampered)


def test_the_witness_is_appended_alike(shop: Shop) -> None:
    light, full = (shop.copy(f"witness/{w}") for w in ("light", "full"))
    for c in (light, full):
        _raise(c)
        gc.collect()
    _run(light.home, light=True)
    _run(full.home, light=False)
    seen = [
        [json.loads(ln)["seq"] for ln in (c.home / "witness.jsonl").read_text().splitlines()] for c in (light, full)
    ]
    assert seen[0] == seen[1]


@contextmanager
def _held(homes: list[Path], *, exclusive: bool) -> Iterator[None]:
    """A writer in the middle of its transaction on each store; ``exclusive``: one that locked
    the file against readers too (what makes a read "unknown")."""
    gc.collect()
    conns = [sqlite3.connect(h / "custody.db", isolation_level=None, timeout=60) for h in homes]
    try:
        for db in conns:
            if exclusive:
                db.execute("PRAGMA locking_mode = EXCLUSIVE")
                db.execute("BEGIN EXCLUSIVE")
            else:
                db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE custody_meta SET value = value WHERE key = 'schema_version'")
        yield
    finally:
        for db in conns:
            db.close()


@pytest.mark.parametrize("exclusive", [False, True], ids=["writer", "exclusive"])
def test_a_store_held_by_a_writer(shop: Shop, exclusive: bool) -> None:
    """A writer mid-transaction: both read past it (WAL). One that locked the file: both say
    unknown (exit 10) and leave the halt file alone."""
    name = f"held-{exclusive}"
    src = shop.copy(f"{name}/src")
    _raise(src)
    gc.collect()
    homes = [shop.tmp / name / w for w in ("light", "full")]
    for home in homes:
        shutil.copytree(src.home, home)
    before = (homes[0] / "halt.json").read_text()
    with _held(homes, exclusive=exclusive):
        light, full = _run(homes[0], light=True), _run(homes[1], light=False)
    assert (light.code, light.doc, light.warnings) == (full.code, full.doc, full.warnings)
    assert light.loaded == set() or exclusive  # unknown: the notification step runs as ever
    if exclusive:
        assert light.code == UNKNOWN_EXIT and light.doc["halted"] is None
        assert (homes[0] / "halt.json").read_text() == before
    else:
        assert light.code == 3 and light.doc["halted"] is True


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///custody.db?mode=ro",
        "sqlite:///my%20store.db",
    ],
)
def test_only_a_plain_sqlite_file_is_read_lightly(tmp_path: Path, url: str) -> None:
    """Memory and URLs with parameters or escapes take the full path: publish declines before
    touching anything (PostgreSQL's URLs: tests/test_halt_light_pg.py)."""
    from custody.config import Settings
    from custody.control import halt_light

    settings = Settings.load(home=str(tmp_path), db_url=url, env={})
    assert halt_light.publish(settings) is None
    assert not (tmp_path / "halt.json").exists() and not (tmp_path / "witness.jsonl").exists()
