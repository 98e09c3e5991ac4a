"""The halt file as the trading engine's lease, and the halt as the audit log's, tried the way
an insider or a faulty world would: SQL edits of the halt table, a status racing a raise,
a stale lease, a read-only halt file, a full disk, a dead database, a forged halt file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from custody.control import audit_log
from custody.store.db import Database
from tests.support import Custody, founders, run_cli, staffed, wait_stopped

README = Path(__file__).parent.parent / "README.md"


def engine_check() -> Callable[[str], bool]:
    """The README's reference engine check, run as written there."""
    found = re.search(r"```python\n(import json\n.*?def trading_allowed.*?)```", README.read_text(), re.S)
    assert found, "README lacks the reference engine check"
    namespace: dict[str, Any] = {}
    exec(found.group(1), namespace)  # noqa: S102 - the README's own code is what is tested
    check: Callable[[str], bool] = namespace["trading_allowed"]
    return check


trading_allowed = engine_check()


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Custody, dict[str, Path]]:
    return staffed(tmp_path / "home")


def _raise(c: Custody, keys: dict[str, Path], reason: str = "drill", who: str = "alice") -> int:
    result = c("halt", "raise", "--reason", reason, "--as", who, "--key", str(keys[who]), "--json")
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["halt_id"])


def _lift_both(c: Custody, keys: dict[str, Path], halt_id: int) -> None:
    for who in ("alice", "bob"):
        result = c("halt", "lift", str(halt_id), "--as", who, "--key", str(keys[who]), "--json")
        assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lifted"] is True


def _file(c: Custody) -> dict[str, Any]:
    return dict(json.loads((c.home / "halt.json").read_text()))


def _engine(c: Custody) -> bool:
    return trading_allowed(str(c.home / "halt.json"))


def _sql(c: Custody, *statements: tuple[str, tuple[Any, ...]]) -> None:
    db = sqlite3.connect(c.home / "custody.db")
    for sql, args in statements:
        db.execute(sql, args)
    db.commit()
    db.close()


# ---------------------------------------------------------------- the engine's contract


def test_the_reference_engine_check_trades_only_on_a_fresh_false(tmp_path: Path) -> None:
    path = tmp_path / "halt.json"
    assert not trading_allowed(str(path))  # missing
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat(timespec="seconds").replace("+00:00", "Z")
    good = {"format": "custody-halt-state", "version": 2, "halted": False, "seq": 7, "valid_until": later}
    path.write_text(json.dumps(good))
    assert trading_allowed(str(path))
    earlier = (datetime.now(UTC) - timedelta(seconds=1)).isoformat(timespec="seconds").replace("+00:00", "Z")
    for bad in (
        {"halted": True},
        {"halted": "false"},
        {"halted": 0},
        {"version": 1},
        {"version": 3},
        {"format": "something-else"},
        {"valid_until": earlier},  # a stale lease
        {"valid_until": "tomorrow"},
        {"valid_until": None},
    ):
        path.write_text(json.dumps(good | bad))
        assert not trading_allowed(str(path)), bad
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "valid_until"}))
    assert not trading_allowed(str(path))
    whole = json.dumps(good).encode()
    for cut in (0, 1, len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[:cut])
        assert not trading_allowed(str(path)), cut
    path.write_text("[1, 2]")
    assert not trading_allowed(str(path))


def test_a_lease_nobody_renews_expires_into_a_halt(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, _ = shop
    c.env["CUSTODY_HALT_LEASE"] = "3"
    assert c("halt", "status").exit_code == 0
    doc = _file(c)
    assert doc["version"] == 2 and doc["halted"] is False and isinstance(doc["seq"], int)
    assert _engine(c)
    until = datetime.fromisoformat(doc["valid_until"].replace("Z", "+00:00"))
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 0.2)
    assert not _engine(c)  # nobody ran `halt status` or `halt watch`: stale, so halted
    assert c("halt", "status").exit_code == 0
    assert _engine(c)
    c.env["CUSTODY_HALT_LEASE"] = "soon"
    assert c("halt", "status").exit_code == 2


# ---------------------------------------------------------------- the halt table edited by SQL


def test_a_halt_row_deleted_by_sql_is_still_a_halt(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, keys = shop
    halt_id = _raise(c, keys, "wallet looks wrong")
    _sql(
        c,
        (
            "DELETE FROM incident_update WHERE incident_id IN (SELECT id FROM incident WHERE halt_id = ?)",
            (halt_id,),
        ),
        ("DELETE FROM incident WHERE halt_id = ?", (halt_id,)),
        ("DELETE FROM halt_lift WHERE halt_id = ?", (halt_id,)),
        ("DELETE FROM halt WHERE id = ?", (halt_id,)),
    )
    status = c("halt", "status", "--json")
    assert status.exit_code == 3
    (halt,) = json.loads(status.stdout)["halts"]
    assert halt["id"] == halt_id and halt["reason"] == "wallet looks wrong" and "deleted" in halt["problem"]
    assert not _engine(c)
    refused = c("address", "new", "--account", "a")
    assert refused.exit_code == 3 and "deleted" in refused.stderr
    assert c.json("address", "list") == []
    # SQLite would hand the deleted row's id out again: a new halt gets one no halt ever had.
    other = _raise(c, keys, "another", who="carol")
    assert other > halt_id
    _lift_both(c, keys, other)
    assert c("halt", "status").exit_code == 3
    # Two employees can still lift it: its row comes back from the log first.
    _lift_both(c, keys, halt_id)
    assert c("halt", "status").exit_code == 0 and _engine(c)
    assert c("address", "new", "--account", "a").exit_code == 0


def test_a_halt_row_marked_lifted_by_sql_is_still_a_halt(shop: tuple[Custody, dict[str, Path]]) -> None:
    c, keys = shop
    halt_id = _raise(c, keys)
    _sql(c, ("UPDATE halt SET active = 0, lifted_at = '2020-01-01 00:00:00' WHERE id = ?", (halt_id,)))
    status = c("halt", "status", "--json")
    assert status.exit_code == 3
    assert "says lifted" in json.loads(status.stdout)["halts"][0]["problem"]
    assert c("address", "new", "--account", "a").exit_code == 3
    assert c("status", "--json").exit_code == 3
    _lift_both(c, keys, halt_id)
    assert c("address", "new", "--account", "a").exit_code == 0


def test_a_lift_forged_into_the_log_without_two_signatures_is_no_lift(shop: tuple[Custody, dict[str, Path]]) -> None:
    """An insider appends a well-chained halt.lifted entry (the tool's own library computes
    the hashes) and marks the row lifted: once with made-up signatures, once replaying the
    real signatures of an earlier lift. The log check refuses both."""
    c, keys = shop
    first = _raise(c, keys, "first")
    _lift_both(c, keys, first)
    second = _raise(c, keys, "second")
    db = Database(f"sqlite:///{c.home / 'custody.db'}")
    with db.transaction() as s:
        real = [json.loads(e.payload) for e in s.exec(text_select("halt.lifted"))][0]["lifts"]
        assert len(real) == 2
    forgeries = [
        [{"employee": x["employee"], "pubkey": x["pubkey"], "signature": "30" + "00" * 40} for x in real],
        real,  # valid signatures, of halt #first's lift
    ]
    for lifts in forgeries:
        with db.transaction() as s:
            audit_log.append(
                s, "halt.lifted", "alice,bob", {"halt_id": second, "signers": ["alice", "bob"], "lifts": lifts}
            )
        _sql(c, ("UPDATE halt SET active = 0 WHERE id = ?", (second,)))
        with db.transaction() as s:
            assert audit_log.verify_chain(s) == []  # the chain itself is intact
        status = c("halt", "status", "--json")
        assert status.exit_code == 3, status.output
        (halt,) = json.loads(status.stdout)["halts"]
        assert halt["id"] == second and "0 valid employee signature(s)" in halt["problem"]
        assert c("address", "new", "--account", "a").exit_code == 3
    db.dispose()


def text_select(event: str) -> Any:
    from sqlmodel import col, select

    from custody.store.models import AuditEntry

    return select(AuditEntry).where(AuditEntry.event == event).order_by(col(AuditEntry.seq))


# ---------------------------------------------------------------- ordering: a status racing a raise


def _cli(c: Custody, *args: str, **extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, **c.env, **extra)
    env.pop("CUSTODY_CRASH_AT", None)
    return subprocess.Popen(
        [sys.executable, "-m", "custody_cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_status_that_read_before_a_raise_cannot_write_after_it(shop: tuple[Custody, dict[str, Path]]) -> None:
    """`halt status` stops (SIGSTOP, as a swapped-out process would) after reading the store
    and before writing the file; a halt is raised and published meanwhile; then it goes on."""
    c, keys = shop
    for round_ in range(3):
        assert c("halt", "status").exit_code == 0 and _engine(c)
        slow = _cli(c, "halt", "status", "--json", CUSTODY_PAUSE_AT="halt.state_read")
        wait_stopped(slow.pid, "the status process")
        halt_id = _raise(c, keys, f"raised while a status stood still {round_}")
        raised_seq = _file(c)["seq"]
        os.kill(slow.pid, signal.SIGCONT)
        out, err = slow.communicate(timeout=120)
        assert slow.returncode == 3, err  # it read again and saw the halt
        doc = _file(c)
        assert doc["halted"] is True and doc["seq"] >= raised_seq
        assert halt_id in [h["id"] for h in doc["halts"]]
        assert not _engine(c)
        _lift_both(c, keys, halt_id)


_POLLER = """
import sys, threading
from custody.config import Settings
from custody.control import halt
from custody.store.db import Database
settings = Settings.load()
db = Database(settings.db_url)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
rounds = 0
while not stop.is_set():
    halt.publish(db, settings, hook=False)
    rounds += 1
print(rounds)
"""

_RAISER = """
import sys
from pathlib import Path
from custody.config import Settings
from custody.control import halt
from custody.identity.employee_keys import FileSigner
from custody.identity.keyfile import open_employee_key
from custody.store.db import Database
settings = Settings.load()
db = Database(settings.db_url)
key = FileSigner(open_employee_key(Path(sys.argv[1]), sys.argv[2]))
for line in sys.stdin:
    raised = halt.raise_by_employee(db, settings, "bob", key, line.strip())
    assert raised.stored and raised.engine_halted, raised.problems
    print(raised.id, flush=True)
"""


def test_raises_racing_status_polls_never_leave_trading_allowed(shop: tuple[Custody, dict[str, Path]]) -> None:
    """Two real processes, many rounds: one publishes the halt state in a tight loop (as
    `halt status` does, read then write), the other raises halts; after every raise, the
    engine's file says halted for as long as the halt stands."""
    from custody.config import Settings
    from custody.control import halt_lift
    from custody.identity.employee_keys import FileSigner
    from custody.identity.keyfile import open_employee_key
    from tests.support import PASSPHRASE

    c, keys = shop
    env = dict(os.environ, **c.env)
    poller = subprocess.Popen(
        [sys.executable, "-c", _POLLER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    raiser = subprocess.Popen(
        [sys.executable, "-c", _RAISER, str(keys["bob"]), PASSPHRASE],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert poller.stdin and raiser.stdin and raiser.stdout
    settings = Settings.load(env=c.env)
    db = Database(settings.db_url)
    lifters = {n: FileSigner(open_employee_key(keys[n], PASSPHRASE)) for n in ("alice", "carol")}
    try:
        for round_ in range(30):
            raiser.stdin.write(f"race {round_}\n")
            raiser.stdin.flush()
            halt_id = int(raiser.stdout.readline())
            for _ in range(20):  # the engine polls while the other process keeps writing
                doc = _file(c)
                assert doc["halted"] is True and halt_id in [h["id"] for h in doc["halts"]], (round_, doc)
                assert not _engine(c)
                time.sleep(0.005)
            for name, key in lifters.items():
                halt_lift.lift(db, settings, halt_id, name, key)
    finally:
        db.dispose()
        polled, _ = poller.communicate(timeout=120)  # closes its stdin: it stops
        raiser.communicate(timeout=120)
    assert poller.returncode == 0 and raiser.returncode == 0
    assert int(polled) > 40  # the poller did race every round


def test_a_forged_halt_file_ahead_of_the_log_is_replaced(shop: tuple[Custody, dict[str, Path]]) -> None:
    """A file claiming an audit entry the log never reached must not pin "trading allowed"."""
    c, keys = shop
    halt_id = _raise(c, keys)
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat(timespec="seconds").replace("+00:00", "Z")
    forged = {"format": "custody-halt-state", "version": 2, "halted": False, "seq": 10**9, "valid_until": later}
    (c.home / "halt.json").write_text(json.dumps(forged))
    assert _engine(c)  # what the forger wanted
    status = c("halt", "status")
    assert status.exit_code == 3 and "beyond the log's head" in status.stderr
    doc = _file(c)
    assert doc["halted"] is True and doc["seq"] < 10**9 and doc["halts"][0]["id"] == halt_id
    assert not _engine(c)


# ---------------------------------------------------------------- the hook


def test_the_hook_gets_no_secret(shop: tuple[Custody, dict[str, Path]], tmp_path: Path) -> None:
    c, keys = shop
    dump = tmp_path / "hook.env"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\nenv >> {dump}\necho --- >> {dump}\n")
    hook.chmod(0o755)
    secrets = {
        "CUSTODY_PKCS11_PIN": "pin-4711-secret",
        "CUSTODY_NOTIFY_PASSPHRASE": "notify-pass-secret",
        "CUSTODY_NOTIFY_PASSPHRASE_FILE": str(tmp_path / "notify-pass-secret-file"),
        "CUSTODY_SMTP_PASSWORD": "smtp-pass-secret",
        "CUSTODY_SMTP_PASSWORD_FILE": str(tmp_path / "smtp-pass-secret-file"),
        "CUSTODY_NODE_AUTH": "rpcuser:rpc-pass-secret",
        "CUSTODY_NODE_COOKIE": str(tmp_path / "node-cookie-secret"),
        "AWS_SECRET_ACCESS_KEY": "aws-key-secret",
    }
    c.env.update(secrets, CUSTODY_HALT_HOOK=str(hook))
    halt_id = _raise(c, keys)
    _lift_both(c, keys, halt_id)
    seen = dump.read_text()
    assert "CUSTODY_HALTED=1" in seen and "CUSTODY_HALTED=0" in seen
    for value in [*secrets.values(), c.env["CUSTODY_PASSPHRASE"], c.env["CUSTODY_DB_URL"]]:
        assert value not in seen
    assert "CUSTODY_PASSPHRASE" not in seen and "CUSTODY_DB_URL" not in seen


# ---------------------------------------------------------------- faults: read-only, full disk, dead database


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs of its own (root only); skipped, saying why, where it cannot be made."""
    path.mkdir(parents=True)
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def test_a_read_only_halt_file_makes_halt_raise_fail_loudly(
    shop: tuple[Custody, dict[str, Path]], tmp_path: Path
) -> None:
    c, keys = shop
    with tmpfs(tmp_path / "ro", "1m") as ro:
        c.env["CUSTODY_HALT_FILE"] = str(ro / "halt.json")
        assert c("halt", "status").exit_code == 0 and trading_allowed(str(ro / "halt.json"))
        remount = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True, check=False)
        assert remount.returncode == 0, remount.stderr
        result = c("halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(keys["alice"]))
        assert result.exit_code == 9, result.output  # never 0 while the engine's file says trading
        assert "COULD NOT BE WRITTEN" in result.stderr and "Read-only" in result.stderr
        assert trading_allowed(str(ro / "halt.json"))  # what the command warned about
        status = c("halt", "status", "--json")
        assert status.exit_code == 3 and json.loads(status.stdout)["halts"][0]["reason"] == "drill"


def _tamper_address(c: Custody) -> None:
    from custody.bitcoin.network import REGTEST
    from custody.bitcoin.script import ScriptType
    from custody.policy.generator import AddressDeriver
    from custody.policy.model import make_policy

    other = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in founders(tag="outsider")])
    _sql(c, ("UPDATE address SET address = ? WHERE idx = 1", (AddressDeriver(other).derive(0, 1).address,)))


def test_a_verification_on_a_full_disk_still_halts_and_exits_3(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        c = Custody(disk / "home")
        assert c.init(founders()).exit_code == 0
        assert c("address", "new", "--account", "a", "--count", "3").exit_code == 0
        manifest = tmp_path / "auditors.json"
        assert c("policy", "manifest", "--out", str(manifest)).exit_code == 0
        assert c("halt", "status").exit_code == 0 and _engine(c)
        _tamper_address(c)
        # Another process keeps the store open (its WAL and shared memory stay), then the disk fills.
        keep = sqlite3.connect(c.home / "custody.db")
        keep.execute("SELECT COUNT(*) FROM address").fetchall()
        filler = disk / "filler"
        with open(filler, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\xff" * 65536)
                fh.flush()
        with open(filler, "ab") as fh, pytest.raises(OSError):
            fh.write(b"\xff" * 8192)
            fh.flush()
            os.fsync(fh.fileno())
        verified = run_cli(c.env, "verify", "addresses", "--manifest", str(manifest), "--workers", "1")
        assert verified.returncode == 3, verified.stderr
        assert "trading is halted" in verified.stderr
        assert not _engine(c)
        assert _file(c)["halted"] is True
        filler.unlink()
        keep.close()
        status = c("halt", "status", "--json")
        assert status.exit_code == 3, status.output
        doc = json.loads(status.stdout)
        assert [h["source"] for h in doc["halts"]] == ["verification"] and "pending" not in doc
        assert isinstance(doc["halts"][0]["id"], int)  # in the store, not only in the file


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://postgres@127.0.0.1:{port}/custody"  # nothing listens there now


def test_an_employee_halts_with_the_database_down_and_the_store_learns_later(
    shop: tuple[Custody, dict[str, Path]],
) -> None:
    c, keys = shop
    store = c.env["CUSTODY_DB_URL"]
    assert c("halt", "status").exit_code == 0
    c.env["CUSTODY_DB_URL"] = _dead_url()
    result = c("halt", "raise", "--reason", "db gone, stop now", "--as", "alice", "--key", str(keys["alice"]))
    assert result.exit_code == 9, result.output
    assert "trading is halted on this machine" in result.stderr
    doc = _file(c)
    assert doc["halted"] is True and not _engine(c)
    (waiting,) = doc["pending"]
    assert waiting["reason"] == "db gone, stop now" and waiting["actor"] == "alice" and waiting["signature"]
    assert c("halt", "status").exit_code == 3  # the store unreadable, the file still halted
    assert "pending" in _file(c)
    # The store is back: the next command, whatever it is, records the halt there.
    c.env["CUSTODY_DB_URL"] = store
    assert c("address", "list").exit_code == 0
    assert "pending" not in _file(c) and not _engine(c)
    status = c("halt", "status", "--json")
    assert status.exit_code == 3
    (halt,) = json.loads(status.stdout)["halts"]
    assert (halt["raised_by"], halt["source"], halt["reason"]) == ("alice", "employee", "db gone, stop now")
    assert c("address", "new", "--account", "a").exit_code == 3
    c("halt", "status")  # replayed once only
    assert len(json.loads(c("halt", "status", "--json").stdout)["halts"]) == 1
    _lift_both(c, keys, halt["id"])
    assert _engine(c)


def test_a_forged_pending_halt_is_recorded_as_unverified(shop: tuple[Custody, dict[str, Path]]) -> None:
    """Anyone who can write the halt file can halt (as they could by deleting it), but not in
    an employee's name: a signature that does not check out is recorded as unverified."""
    c, _ = shop
    assert c("halt", "status").exit_code == 0
    doc = _file(c)
    doc["pending"] = [
        {
            "id": uuid.uuid4().hex,
            "at": "2026-01-01T00:00:00.000000Z",
            "source": "employee",
            "actor": "alice",
            "reason": "not alice",
            "signature": "3006020101020101",
        }
    ]
    (c.home / "halt.json").write_text(json.dumps(doc))
    status = c("halt", "status", "--json")
    assert status.exit_code == 3
    (halt,) = json.loads(status.stdout)["halts"]
    assert halt["source"] == "journal" and halt["raised_by"] == "journal" and "unverified" in halt["reason"]


PG_URL = os.environ.get("CUSTODY_TEST_POSTGRES_URL")


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="CUSTODY_TEST_POSTGRES_URL is not set (CI sets it)")
def test_the_database_stopped_during_a_halt_raise(tmp_path: Path) -> None:
    """A PostgreSQL database of its own that stops taking connections (and loses those it had)."""
    assert PG_URL
    name = f"custody_down_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"

    def connections(allow: bool) -> None:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}'))
            if not allow:
                conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
                )

    try:
        c = Custody(tmp_path / "home", db_url=url)
        assert c.init(founders()).exit_code == 0
        keys = {n: c.employee(n) for n in ("alice", "bob")}
        assert c("halt", "status").exit_code == 0 and _engine(c)
        connections(False)
        raised = run_cli(c.env, "halt", "raise", "--reason", "server gone", "--as", "bob", "--key", str(keys["bob"]))
        assert raised.returncode == 9, raised.stderr
        assert "trading is halted on this machine" in raised.stderr
        assert not _engine(c) and _file(c)["pending"][0]["reason"] == "server gone"
        connections(True)
        status = run_cli(c.env, "halt", "status", "--json")
        assert status.returncode == 3, status.stderr
        doc = json.loads(status.stdout)
        assert "pending" not in doc
        assert [(h["raised_by"], h["source"], h["reason"]) for h in doc["halts"]] == [
            ("bob", "employee", "server gone")
        ]
        _lift_both(c, keys, doc["halts"][0]["id"])
        assert _engine(c)
    finally:
        connections(True)
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


# ---------------------------------------------------------------- halt watch: a second operator machine


def test_halt_watch_keeps_a_second_machine_fresh_and_stops_on_sigterm(
    shop: tuple[Custody, dict[str, Path]], tmp_path: Path
) -> None:
    """Machine B shares machine A's store and runs `halt watch`; A halts and lifts. B joined as
    the README says: it pinned the founders' manifest (whose founders alone sign the rosters
    that lift) from the store."""
    a, keys = shop
    b = Custody(tmp_path / "machine-b", db_url=a.env["CUSTODY_DB_URL"])
    fingerprint = a.json("manifest", "show")["fingerprint"]
    assert b("manifest", "pin", "--from-store", "--fingerprint", fingerprint).exit_code == 0
    b_file = str(b.home / "halt.json")
    watch = _cli(b, "halt", "watch", "--interval", "0.2", "--lease", "5")
    try:

        def until(wanted: bool) -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if trading_allowed(b_file) is wanted:
                    return
                time.sleep(0.05)
            raise AssertionError(f"machine B's halt file never said trading_allowed={wanted}")

        until(True)
        halt_id = _raise(a, keys, "raised on machine A")
        until(False)
        assert json.loads(Path(b_file).read_text())["halts"][0]["id"] == halt_id
        _lift_both(a, keys, halt_id)
        until(True)
        watch.send_signal(signal.SIGTERM)
        out, err = watch.communicate(timeout=60)
        assert watch.returncode == 0, err
        assert "HALTED" in err and "stopped" in err
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert b("halt", "watch", "--interval", "5", "--lease", "2").exit_code == 2  # a lease shorter than the interval
