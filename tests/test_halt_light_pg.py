"""`custody halt status` on PostgreSQL through the light path (libpq through ``psycopg.pq``, no
ORM, no psycopg ``__init__``) and through the full path give the same answer, always: exit code,
JSON, the halt file written, the warnings. tests/test_halt_light.py does the same on SQLite.

Every case makes a store in some state (by the CLI, by a library call an insider could make, or
by SQL as an insider with the database would) in a database of its own, copies it twice
(``CREATE DATABASE ... TEMPLATE``) with the home directory beside it, and runs `halt status
--json` in a fresh interpreter on each copy: once as it runs by default, once with the light
path turned off (CUSTODY_HALT_LIGHT=0). Each run says which modules it loaded, so the test
knows which path answered. Against the real server of CUSTODY_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from custody.errors import UNKNOWN_EXIT
from tests.support import Custody, founders
from tests.support import forged_lift as _forged_lift
from tests.test_halt_light import (
    _lift,
    _raise,
    fresh,
    halt_file_garbage,
    lifted_by_one,
    lifted_by_two,
    lifted_then_raised_again,
    newer_halt_file_says_halted,
    newer_halt_file_says_running,
    pending_in_the_halt_file,
    raised,
    witness_unreadable,
)

psycopg = pytest.importorskip("psycopg")

PG_URL = os.environ.get("CUSTODY_TEST_POSTGRES_URL")

_PROBE = """
import atexit, json, sys
atexit.register(lambda: sys.stderr.write("\\nLOADED " + json.dumps(sorted(
    m for m in ("sqlalchemy", "sqlmodel", "custody.store.models", "custody.control.halt", "psycopg.connection")
    if m in sys.modules
)) + "\\n"))
sys.argv = ["custody", "halt", "status", "--json"]
from custody_cli.main import main
main()
"""

LIGHT, FULL = "light", "full"


def _url(name: str, query: str = "") -> str:
    assert PG_URL
    parts = urlsplit(PG_URL)
    return parts._replace(path=f"/{name}", query=query).geturl()


@contextmanager
def _admin() -> Iterator[Any]:
    assert PG_URL
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        yield conn


def _copy_database(source: str, target: str) -> None:
    """``target`` made as a copy of ``source`` (no connection to ``source`` may stay open: the
    in-process commands' pools are cut)."""
    gc.collect()
    with _admin() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (source,),
        )
        conn.execute(f'CREATE DATABASE "{target}" TEMPLATE "{source}"')


@dataclass
class Answer:
    code: int
    doc: Any
    warnings: list[str]
    halt_file: Any
    loaded: set[str]


def _normal(text: str, home: Path, db: str) -> str:
    """Without what differs between two copies of one store: their directory and database, the
    time of the run (in a document: the times it was written at and is valid until; every
    other time, a halt's, must be the same)."""
    text = text.replace(str(home), "HOME").replace(db, "DB")
    return re.sub(r'"(updated_at|valid_until)": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"', r'"\1": "TIME"', text)


def _run(home: Path, db: str, url: str, *, light: bool) -> Answer:
    env = dict(os.environ, **Custody(home, url).env, CUSTODY_HALT_LIGHT="1" if light else "0")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    lines = proc.stderr.splitlines()
    loaded = set(json.loads([ln for ln in lines if ln.startswith("LOADED ")][-1].removeprefix("LOADED ")))
    warnings = [_normal(ln, home, db) for ln in lines if ln.strip() and not ln.startswith("LOADED ")]
    doc = json.loads(_normal(proc.stdout, home, db)) if proc.stdout.strip() else None
    path = home / "halt.json"
    mirror = json.loads(_normal(path.read_text(), home, db)) if path.exists() else None
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
    base_db: str
    tmp: Path
    prefix: str
    made: list[str] = field(default_factory=list)

    def database(self) -> str:
        """A new database's name (none is a part of another's: they are replaced in messages)."""
        name = f"{self.prefix}_{len(self.made):04d}"
        self.made.append(name)
        return name

    def copy(self, name: str) -> Case:
        db = self.database()
        _copy_database(self.base_db, db)
        home = self.tmp / name / "home"
        shutil.copytree(self.base, home)
        return Case(home, _url(db), db)


class Case(Custody):
    """A copy of the shop: its home and its database (``db``); ``query`` is added to the URL
    `halt status` is run with."""

    def __init__(self, home: Path, url: str, db: str) -> None:
        super().__init__(home, url)
        self.url = url
        self.db = db
        self.query = ""


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    if not PG_URL:
        pytest.skip("CUSTODY_TEST_POSTGRES_URL is not set (CI sets it)")
    tmp = tmp_path_factory.mktemp("halt-light-pg")
    prefix = f"custody_hlpg_{uuid.uuid4().hex[:8]}"
    shop = Shop(tmp / "base", "", tmp, prefix)
    shop.base_db = shop.database()
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{shop.base_db}"')
    try:
        c = Custody(shop.base, _url(shop.base_db))
        assert c.init(founders()).exit_code == 0
        for name in ("alice", "bob", "carol"):
            c.employee(name)
        c.employee("dave", roles="request,approve")  # may not lift
        yield shop
    finally:
        gc.collect()
        with _admin() as conn:
            for db in shop.made:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@contextmanager
def _sql(c: Case) -> Iterator[Any]:
    """The store edited behind the tool's back, in one transaction."""
    with psycopg.connect(c.url) as db:
        yield db


def _append(c: Case, event: str, actor: str, payload: dict[str, Any]) -> None:
    """An audit entry an insider with the database appends, well chained (the tool's own
    library computes the hashes and moves the head): the log's chain and head checks pass."""
    from custody.control import audit_log
    from custody.store.db import Database

    db = Database(c.url)
    try:
        with db.transaction() as s:
            audit_log.append(s, event, actor, payload)
    finally:
        db.dispose()


def _lifted_payload(db: Any) -> tuple[int, dict[str, Any]]:
    seq, payload = db.execute("SELECT seq, payload FROM audit_log WHERE event = 'halt.lifted'").fetchone()
    return seq, json.loads(payload)


def _set_payload(db: Any, seq: int, doc: dict[str, Any]) -> None:
    db.execute("UPDATE audit_log SET payload = %s WHERE seq = %s", (json.dumps(doc, sort_keys=True), seq))


# ---------------------------------------------------------------- the states (beside test_halt_light's)


def forged_lift_signature(c: Case) -> None:
    _lift(c, _raise(c), "alice", "bob")
    with _sql(c) as db:
        seq, doc = _lifted_payload(db)
        sig = doc["lifts"][1]["signature"]
        doc["lifts"][1]["signature"] = sig[:-2] + ("00" if sig[-2:] != "00" else "11")
        _set_payload(db, seq, doc)


def duplicated_lift_signature(c: Case) -> None:
    _lift(c, _raise(c), "alice", "bob")
    with _sql(c) as db:
        seq, doc = _lifted_payload(db)
        doc["lifts"] = [doc["lifts"][0], doc["lifts"][0]]
        _set_payload(db, seq, doc)


def signature_under_another_name(c: Case) -> None:
    _lift(c, _raise(c), "alice", "bob")
    with _sql(c) as db:
        seq, doc = _lifted_payload(db)
        doc["lifts"][1] = dict(doc["lifts"][0], employee="bob")
        _set_payload(db, seq, doc)


def lift_by_one_who_may_not(c: Case) -> None:
    _lift(c, _raise(c), "alice", "bob")
    with _sql(c) as db:
        seq, doc = _lifted_payload(db)
        doc["lifts"][1] = dict(doc["lifts"][1], employee="dave")
        _set_payload(db, seq, doc)


def forged_lift_before_a_real_one(c: Case) -> None:
    halt_id = _raise(c)
    _append(c, "halt.lifted", "alice,bob", _forged_lift(halt_id))
    _lift(c, halt_id, "alice", "bob")


def forged_lift_after_a_real_one(c: Case) -> None:
    halt_id = _raise(c)
    _lift(c, halt_id, "alice", "bob")
    _append(c, "halt.lifted", "alice,bob", _forged_lift(halt_id))


def unreadable_lift_before_a_real_one(c: Case) -> None:
    halt_id = _raise(c)
    _append(c, "halt.lifted", "alice,bob", _forged_lift(halt_id) | {"halt_id": str(halt_id)})
    _lift(c, halt_id, "alice", "bob")


def forged_lift_and_row_lifted(c: Case) -> None:
    halt_id = _raise(c)
    _append(c, "halt.lifted", "alice,bob", _forged_lift(halt_id))
    with _sql(c) as db:
        db.execute("UPDATE halt SET active = FALSE, lifted_at = '2026-01-01 00:00:00'")


def one_real_signature_forged_into_a_lift(c: Case) -> None:
    halt_id = _raise(c)
    _lift(c, halt_id, "alice")
    with _sql(c) as db:
        pubkey, signature = db.execute("SELECT pubkey, signature FROM halt_lift").fetchone()
    alice = {"employee": "alice", "pubkey": pubkey, "signature": signature}
    for lifts in ([alice, dict(alice, employee="bob")], [alice]):
        _append(c, "halt.lifted", "alice,bob", {"halt_id": halt_id, "signers": ["alice", "bob"], "lifts": lifts})


def row_lifted_by_sql(c: Case) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("UPDATE halt SET active = FALSE, lifted_at = '2026-01-01 00:00:00.5'")


def row_deleted_by_sql(c: Case) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("DELETE FROM incident_update")
        db.execute("DELETE FROM incident")
        db.execute("DELETE FROM halt")


def row_not_in_the_log(c: Case) -> None:
    with _sql(c) as db:
        db.execute(
            "INSERT INTO halt (id, raised_at, raised_by, source, reason, active) "
            "VALUES (7, '2026-01-01 00:00:00', 'mallory', 'employee', 'planted', TRUE)"
        )


def halt_entry_unreadable(c: Case) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("UPDATE audit_log SET payload = '{' WHERE event = 'halt.raised'")


def lift_entry_deleted(c: Case) -> None:
    _lift(c, _raise(c), "alice", "bob")
    with _sql(c) as db:
        seq, _ = _lifted_payload(db)
        db.execute("UPDATE audit_log SET event = 'note' WHERE seq = %s", (seq,))


def times_of_every_fraction(c: Case) -> None:
    """PostgreSQL writes a time's fraction without its trailing zeros (ISO DateStyle): none,
    one digit, six; the row's time is what the halt's status shows."""
    for n, at in enumerate(("2026-01-01 00:00:00", "2026-01-01 00:00:00.5", "2026-01-01 00:00:00.000001")):
        _raise(c, reason=f"halt {n}")
        with _sql(c) as db:
            db.execute("UPDATE halt SET raised_at = %s WHERE id = (SELECT MAX(id) FROM halt)", (at,))


def time_without_a_zone(c: Case) -> None:
    """A column of times without their zone (the ORM makes every time one with it): read as
    UTC by both."""
    _raise(c)
    with _sql(c) as db:
        db.execute("ALTER TABLE halt ALTER COLUMN raised_at TYPE timestamp USING raised_at AT TIME ZONE 'UTC'")


def time_as_text(c: Case) -> None:
    """A column the ORM would read as another type: the full path says."""
    _raise(c)
    with _sql(c) as db:
        db.execute("ALTER TABLE halt ALTER COLUMN raised_at TYPE text")


def time_zone_of_the_session(c: Case) -> None:
    """Times written with another offset (the session's time zone): the same instants."""
    _raise(c)
    c.query = "options=-cTimeZone%3DAsia%2FKolkata"


def active_as_text(c: Case) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("ALTER TABLE halt ALTER COLUMN active TYPE text USING active::text")


def seq_as_numeric(c: Case) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("ALTER TABLE audit_log ALTER COLUMN seq TYPE numeric")


def table_dropped(c: Case) -> None:
    _raise(c)
    with _sql(c) as db:
        db.execute("DROP TABLE halt_lift")


def halt_file_missing(c: Case) -> None:
    _raise(c)
    (c.home / "halt.json").unlink()


def schema_from_the_future(c: Case) -> None:
    with _sql(c) as db:
        db.execute("UPDATE custody_meta SET value = '99' WHERE key = 'schema_version'")


def schema_version_garbage(c: Case) -> None:
    with _sql(c) as db:
        db.execute("UPDATE custody_meta SET value = 'five' WHERE key = 'schema_version'")


def log_past_its_head(c: Case) -> None:
    with _sql(c) as db:
        db.execute(
            "INSERT INTO audit_log (seq, at, event, actor, payload, prev_hash, hash) "
            "SELECT seq + 1, at, 'note', actor, '{}', hash, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
        )


def witness_disagrees(c: Case) -> None:
    with _sql(c) as db:
        db.execute("UPDATE audit_log SET hash = %s WHERE seq = (SELECT MAX(seq) FROM audit_log)", ("ab" * 32,))


def store_missing(c: Case) -> None:
    """The database is there, the store's tables are not."""
    with _sql(c) as db:
        db.execute("DROP SCHEMA public CASCADE")
        db.execute("CREATE SCHEMA public")


def server_out_of_reach(c: Case) -> None:
    """No server at the URL's port: the light path cannot connect and declines."""
    c.url = c.url.replace(f":{urlsplit(c.url).port}/", ":9/")


def date_style_german(c: Case) -> None:
    """A session whose times are written in another form: the light path declines."""
    c.query = "options=-cDateStyle%3DGerman"


def client_encoding_latin1(c: Case) -> None:
    c.query = "options=-cclient_encoding%3DLATIN1"


def search_path_given(c: Case) -> None:
    """Options in the URL the light path reads as SQLAlchemy does (the tests' schemas use them)."""
    c.query = "options=-csearch_path%3Dpublic"


def a_recipient_to_notify(c: Case) -> None:
    with _sql(c) as db:
        db.execute(
            "INSERT INTO notify_recipient (kind, target, active, created_at) "
            "VALUES ('webhook', 'http://127.0.0.1:9/hook', TRUE, '2026-01-01 00:00:00')"
        )


CASES: list[tuple[Callable[[Any], None], str | None, int]] = [
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
    (times_of_every_fraction, LIGHT, 3),
    (time_without_a_zone, LIGHT, 3),
    (time_as_text, FULL, -1),
    (time_zone_of_the_session, LIGHT, 3),
    (active_as_text, FULL, -1),
    (seq_as_numeric, FULL, -1),
    (table_dropped, FULL, -1),
    (pending_in_the_halt_file, FULL, 3),
    (newer_halt_file_says_running, LIGHT, 3),
    (newer_halt_file_says_halted, LIGHT, 0),
    (halt_file_garbage, LIGHT, 0),
    (halt_file_missing, LIGHT, 3),
    (schema_from_the_future, FULL, 3),
    (schema_version_garbage, FULL, -1),
    (log_past_its_head, FULL, 3),
    (witness_disagrees, FULL, 3),
    (witness_unreadable, FULL, -1),
    (store_missing, FULL, 3),
    (server_out_of_reach, FULL, 3),
    (date_style_german, FULL, -1),
    (client_encoding_latin1, FULL, -1),
    (search_path_given, LIGHT, 0),
    (a_recipient_to_notify, None, 0),
]
"""(the state, the path that must answer (None: either), the exit code (-1: whatever the full
path says))."""


def _homes(shop: Shop, make: Callable[[Any], None], name: str) -> tuple[Case, Case]:
    src = shop.copy(name)
    make(src)
    copies = []
    for which in (LIGHT, FULL):
        db = shop.database()
        _copy_database(src.db, db)
        home = shop.tmp / name / which
        shutil.copytree(src.home, home)
        case = Case(home, src.url.replace(src.db, db), db)
        case.query = src.query
        copies.append(case)
    return copies[0], copies[1]


def _answer(c: Case, *, light: bool) -> Answer:
    url = f"{c.url}?{c.query}" if c.query else c.url
    return _run(c.home, c.db, url, light=light)


@pytest.mark.parametrize(("make", "path", "code"), CASES, ids=[c[0].__name__ for c in CASES])
def test_the_light_path_answers_as_the_full_path(
    shop: Shop, make: Callable[[Any], None], path: str | None, code: int
) -> None:
    light_case, full_case = _homes(shop, make, make.__name__)
    light, full = _answer(light_case, light=True), _answer(full_case, light=False)
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


def test_the_witness_is_appended_alike(shop: Shop) -> None:
    light_case, full_case = _homes(shop, raised, "witness")
    _answer(light_case, light=True)
    _answer(full_case, light=False)
    seen = [
        [json.loads(ln)["seq"] for ln in (c.home / "witness.jsonl").read_text().splitlines()]
        for c in (light_case, full_case)
    ]
    assert seen[0] == seen[1]


@contextmanager
def _held(cases: list[Case], statement: str) -> Iterator[None]:
    """``statement`` run in an open transaction on each store, held until the block ends."""
    conns = [psycopg.connect(c.url) for c in cases]
    try:
        for conn in conns:
            conn.execute(statement)
        yield
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize(
    ("statement", "code"),
    [
        ("UPDATE custody_meta SET value = value WHERE key = 'schema_version'", 3),  # a writer's row locks
        ("UPDATE halt SET reason = reason", 3),
        ("LOCK TABLE halt IN ACCESS EXCLUSIVE MODE", UNKNOWN_EXIT),  # what ALTER TABLE takes
        ("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE", UNKNOWN_EXIT),
    ],
    ids=["writer-meta", "writer-halt", "lock-halt", "lock-audit-log"],
)
def test_a_store_held_elsewhere(shop: Shop, statement: str, code: int) -> None:
    """A writer mid-transaction: both read past it. A table locked against readers: both say
    unknown (exit 10), not halted, and leave the halt file alone; the light path leaves that
    answer to the full path (which of its reads the lock stops depends on the table)."""
    name = re.sub(r"\W+", "_", statement.lower())
    light_case, full_case = _homes(shop, raised, name)
    before = (light_case.home / "halt.json").read_text()
    with _held([light_case, full_case], statement):
        answers: dict[str, Answer] = {}
        runs = [
            threading.Thread(target=lambda: answers.__setitem__(LIGHT, _answer(light_case, light=True))),
            threading.Thread(target=lambda: answers.__setitem__(FULL, _answer(full_case, light=False))),
        ]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
    light, full = answers[LIGHT], answers[FULL]
    assert (light.code, light.doc, light.warnings) == (full.code, full.doc, full.warnings)
    assert light.code == code, (light.doc, light.warnings)
    if code == UNKNOWN_EXIT:
        assert light.doc["halted"] is None
        assert (light_case.home / "halt.json").read_text() == before
    else:
        assert light.loaded == set(), light.loaded


# ---------------------------------------------------------------- the URL, read as SQLAlchemy reads it


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/custody",
        "postgres://postgres@127.0.0.1/custody",
        "postgresql+psycopg://u@h/d",
        "postgresql://us%40er:p%40ss%3Aw%2Fo'rd!$&()*+,;=:@db.example-1.org:6543/my%20store",
        "postgresql://u:@h/d",
        "postgresql://h",
        "postgresql:///d",
        "postgresql://",
        "postgresql://u@h:0/d",
        "postgresql://u@h/d?options=-csearch_path%3Dcustody_test_1&sslmode=require&connect_timeout=5",
        "postgresql://u@h/d?application_name=it%27s%20custody%5C",
    ],
)
def test_a_url_is_read_as_sqlalchemy_reads_it(url: str) -> None:
    """The connection parameters of the light path's connection string, as libpq parses it, are
    those SQLAlchemy's psycopg dialect hands psycopg for the same URL (made into a connection
    string by psycopg itself)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
    from sqlalchemy.engine import make_url

    from custody.store.db import normalize_url
    from custody.store.light_pg import conninfo

    info = conninfo(url)
    assert info is not None
    args, kwargs = PGDialect_psycopg().create_connect_args(make_url(normalize_url(url)))
    assert conninfo_to_dict(info) == conninfo_to_dict(make_conninfo(*args, **kwargs))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h1,h2/d",  # several hosts
        "postgresql://u@h/d?host=h2",
        "postgresql://u@h/d?port=5433",
        "postgresql://u@h/d?service=other",
        "postgresql://u@h/d?application_name=a+b",  # SQLAlchemy reads "a b", libpq "a+b"
        "postgresql://u@h/d?sslmode=",
        "postgresql://u@h/d?sslmode=require&sslmode=disable",
        "postgresql://u@[::1]/d",
        "postgresql://u@%2Fvar%2Frun%2Fpostgresql/d",  # SQLAlchemy does not decode a host
        "postgresql://u@h/d#x",
        "postgres+psycopg://u@h/d",  # custody.store.db refuses it
        "postgresql+psycopg2://u@h/d",
        "sqlite:///custody.db",
    ],
)
def test_a_url_it_cannot_read_with_certainty_is_left_to_the_full_path(url: str) -> None:
    from custody.store.light_pg import conninfo

    assert conninfo(url) is None


def test_the_full_driver_loads_after_the_light_one() -> None:
    """After psycopg.pq was loaded alone, `import psycopg` is the whole driver, in the same
    module, sharing that pq and its errors: what the full path and the notification step use."""
    if not PG_URL:
        pytest.skip("CUSTODY_TEST_POSTGRES_URL is not set (CI sets it)")
    probe = f"""
import sys
from custody.store import light_pg
from custody.store.light import NotLight
try:
    with light_pg.read_transaction(light_pg.conninfo({PG_URL!r}) or "") as cur:
        pass
except NotLight:  # no store there: psycopg.pq was loaded all the same
    pass
print("psycopg.connection" in sys.modules)
import psycopg
import psycopg.errors
assert psycopg.pq is sys.modules["psycopg.pq"] and psycopg.errors is sys.modules["psycopg.errors"]
with psycopg.connect({PG_URL!r}) as conn:
    assert conn.execute("SELECT 1").fetchone() == (1,)
conn = psycopg.pq.PGconn.connect(b"port=9 host=127.0.0.1")
assert conn.status == psycopg.pq.ConnStatus.BAD
try:
    psycopg.connect("port=9 host=127.0.0.1")
except psycopg.OperationalError:
    print("caught")
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "caught"], (proc.stdout, proc.stderr)
