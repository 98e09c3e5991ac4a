"""Issuance derives and verifies the next address before it takes any lock, at the index the
counter says then; the lock confirms it or the work is done again. Another issuer that
commits in between (PostgreSQL: nothing is locked before the allocation) must make this one
derive again: every stored address is its own index's, no index twice, no gap, and the
store's rows stand against the audit log."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from custody.bitcoin.network import REGTEST
from custody.bitcoin.script import ScriptType
from custody.config import Settings
from custody.control import audit_log, halt
from custody.errors import HaltedError
from custody.issuance import issuer
from custody.issuance.record import ISSUED, check_rows
from custody.policy.generator import AddressDeriver
from custody.policy.model import make_policy
from custody.store.db import Database
from tests.support import create_store, founders


def _store(tmp_path: Path, url: str) -> tuple[Database, Settings, AddressDeriver]:
    settings = Settings.load(home=str(tmp_path), db_url=url)
    db = Database(url)
    fs = founders()
    policy = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in fs])
    create_store(db, settings, policy, fs)
    return db, settings, AddressDeriver(policy)


def _stands(db: Database, deriver: AddressDeriver, n: int) -> None:
    stored = issuer.list_addresses(db)
    assert [a.index for a in stored] == list(range(n))  # no index twice, no gap
    assert all(a.address == deriver.derive(0, a.index).address for a in stored)
    with db.transaction(read_only=True) as s:
        assert check_rows(s, issuer.iter_addresses(s)) == []


def test_an_issuer_that_commits_between_the_prediction_and_the_lock(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, settings, deriver = _store(tmp_path, pg_url)
    other = Database(pg_url)
    derive = issuer._derive_checked
    calls: list[int] = []

    def derive_while_another_issues(*args: Any) -> issuer.Checked:
        calls.append(args[3])  # the first index asked for
        if len(calls) == 1:  # the prediction: another process issues 3 meanwhile, and commits
            assert [a.index for a in issuer.issue_addresses(other, settings, "other", 3)] == [0, 1, 2]
        return derive(*args)

    monkeypatch.setattr(issuer, "_derive_checked", derive_while_another_issues)
    (mine,) = issuer.issue_addresses(db, settings, "mine", 1)
    assert calls[0] == 0 and mine.index == 3 and calls[-1] == 3  # predicted 0, derived again at 3
    assert mine.address == deriver.derive(0, 3).address
    _stands(db, deriver, 4)
    other.dispose()
    db.dispose()


def test_a_halt_committed_between_the_full_check_and_the_lock_wins(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, settings, deriver = _store(tmp_path, pg_url)
    other = Database(pg_url)
    _refused_while(
        db,
        settings,
        monkeypatch,
        lambda: halt.raise_halt(other, settings, reason="drill", source="employee", actor="alice"),
        "drill",
    )
    with db.transaction(read_only=True) as s:
        assert check_rows(s, issuer.iter_addresses(s)) == []
    other.dispose()
    db.dispose()


def _refused_while(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], object], match: str
) -> None:
    """``meanwhile`` runs between the unlocked checks and the lock: the issuance must be refused
    (HaltedError matching ``match``), nothing stored and the counter not moved."""
    derive = issuer._derive_checked

    def derive_and_meanwhile(*args: Any) -> issuer.Checked:
        meanwhile()
        return derive(*args)

    monkeypatch.setattr(issuer, "_derive_checked", derive_and_meanwhile)
    with pytest.raises(HaltedError, match=match):
        issuer.issue_addresses(db, settings, "mine", 1)
    assert issuer.list_addresses(db) == []
    with db.transaction(read_only=True) as s:
        assert issuer._peek(s, 0) == 0  # the counter was not moved either


def test_an_entry_forged_at_the_log_end_between_the_check_and_the_lock_refuses(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An insider appends an entry by SQL (no head moved, no halt event) after the unlocked check: the tip
    read under the lock, in the statement that allocates, must see it and refuse."""
    db, settings, deriver = _store(tmp_path, pg_url)
    insider = Database(pg_url)

    def forge() -> None:
        with insider.engine.begin() as conn:
            last = conn.execute(text("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")).one()
            conn.execute(
                text(
                    "INSERT INTO audit_log (seq, at, event, actor, payload, signature, prev_hash, hash) "
                    "VALUES (:seq, now(), 'address.issued', 'mallory', '{}', NULL, :prev, :hash)"
                ),
                {"seq": last[0] + 1, "prev": last[1], "hash": "0" * 64},
            )

    _refused_while(db, settings, monkeypatch, forge, "does not end at its head")
    insider.dispose()
    db.dispose()


def test_concurrent_single_address_issuers_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    db, settings, deriver = _store(tmp_path, pg_url)
    errors: list[BaseException] = []

    def issue(n: int) -> None:
        mine = Database(pg_url)
        try:
            for _ in range(n):
                issuer.issue_addresses(mine, settings, "acct", 1)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            mine.dispose()

    threads = [threading.Thread(target=issue, args=(8,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _stands(db, deriver, 32)
    db.dispose()


def _issue_until_halted(url: str, home: str, account: str, out: Any) -> None:
    """One issuer process: single addresses in a loop until the halt refuses it; reports what
    it was given (shown to its caller) and how it stopped."""
    db = Database(url)
    settings = Settings.load(home=home, db_url=url)
    given: list[tuple[int, str]] = []
    stop = "ran out"
    try:
        for _ in range(5000):
            (a,) = issuer.issue_addresses(db, settings, account, 1)
            given.append((a.index, a.address))
    except HaltedError:
        stop = "halted"
    except BaseException as exc:  # reported to the test
        stop = repr(exc)
    out.put((given, stop))
    db.dispose()


def test_a_halt_raised_while_four_processes_issue_stops_every_one_of_them(tmp_path: Path, pg_url: str) -> None:
    """An insider (or a crowd of callers) keeps four issuers busy while an employee raises a
    halt: the halt must commit between two issuances, not under one; nothing is issued after
    its entry, every address shown is stored and every stored one was shown, no index twice,
    no gap, and the chain and the rows stand."""
    db, settings, deriver = _store(tmp_path, pg_url)
    ctx = get_context("spawn")  # no connection inherited from this process
    out = ctx.Queue()
    procs = [ctx.Process(target=_issue_until_halted, args=(pg_url, str(tmp_path), f"race-{i}", out)) for i in range(4)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # every one of the four issuing before the halt comes
        if {a.account for a in issuer.list_addresses(db)} == {f"race-{i}" for i in range(4)}:
            break
        time.sleep(0.05)
    halt.raise_halt(db, settings, reason="race drill", source="employee", actor="alice")
    reports = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [stop for _, stop in reports] == ["halted"] * 4  # each one stopped by the halt
    with db.transaction(read_only=True) as s:
        log = s.execute(text("SELECT seq, event, payload FROM audit_log ORDER BY seq")).all()
        assert audit_log.verify_chain(s) == []
        assert check_rows(s, issuer.iter_addresses(s)) == []
    raised = [seq for seq, event, _ in log if event == "halt.raised"]
    issued = [(seq, json.loads(payload)) for seq, event, payload in log if event == ISSUED]
    assert len(raised) == 1 and issued and all(seq < raised[0] for seq, _ in issued)  # none after the halt
    given = sorted(a for r, _ in reports for a in r)
    stored = issuer.list_addresses(db)
    assert given == [(a.index, a.address) for a in stored]  # shown = stored
    assert sum(e["count"] for _, e in issued) == len(stored) >= 4
    _stands(db, deriver, len(stored))
    db.dispose()
