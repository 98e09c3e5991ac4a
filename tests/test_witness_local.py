"""LocalWitness (custody serve's witness check) on the paths it hands to :func:`record`: a
witnessed range wider than it reads in one statement, a line it cannot read as a checkpoint,
a checkpoint beyond the log's end, a witness that begins with the genesis. In process, on a
store made as the ceremony makes it; each edit is one an insider could make between two
state changes, and must be caught as the command line catches it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from custody.bitcoin.network import REGTEST
from custody.bitcoin.script import ScriptType
from custody.config import Settings
from custody.control import witness
from custody.control.witness_file import GENESIS, Checkpoint
from custody.errors import InputError
from custody.issuance.issuer import issue_addresses
from custody.policy.model import make_policy
from custody.store.db import Database
from tests.support import create_store, founders


def _store(tmp_path: Path, issued: int) -> tuple[Database, Settings, witness.LocalWitness]:
    fs = founders()
    policy = make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in fs])
    settings = Settings.load(home=str(tmp_path), env={})
    db = Database(settings.db_url)
    create_store(db, settings, policy, fs)
    local = witness.LocalWitness(db, settings.witness_file)
    for i in range(issued):
        issue_addresses(db, settings, f"acct-{i % 3}", 1)
        _, problems = local.record()
        assert problems == []
    return db, settings, local


def _sql(tmp_path: Path, statement: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "custody.db") as db:
        return db.execute(statement, params).fetchall()


def test_an_edit_in_a_range_wider_than_one_read_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _db, settings, local = _store(tmp_path, 6)
    first = json.loads(settings.witness_file.read_text().splitlines()[1])
    monkeypatch.setattr(witness, "SPREAD", 2)  # the witnessed range is wider than this
    assert local.record()[1] == []
    _sql(tmp_path, "UPDATE audit_log SET hash = ? WHERE seq = ?", "ab" * 32, first["seq"])
    _, problems = local.record()
    assert [p.seq for p in problems] == [first["seq"]], problems
    assert "the log was rewritten at or before it" in problems[0].reason


def test_a_checkpoint_beyond_the_log_and_a_wrong_genesis_are_caught(tmp_path: Path) -> None:
    _db, settings, local = _store(tmp_path, 3)
    ((tip,),) = _sql(tmp_path, "SELECT seq FROM audit_head")
    with settings.witness_file.open("a") as fh:
        fh.write(Checkpoint(int(str(tip)) + 5, "cd" * 32).line())
    _, problems = local.record()
    assert any("entries were removed from its end" in p.reason for p in problems), problems
    text = settings.witness_file.read_text()
    settings.witness_file.write_text(Checkpoint(0, "ef" * 32).line() + text.splitlines(keepends=True)[0])
    _, problems = local.record()
    assert [p.seq for p in problems] == [0], problems
    settings.witness_file.write_text(Checkpoint(0, GENESIS).line() + text.splitlines(keepends=True)[0])
    assert local.record()[1] == []


def test_a_line_that_is_not_a_checkpoint_is_refused_as_by_the_command_line(tmp_path: Path) -> None:
    _db, settings, local = _store(tmp_path, 3)
    lines = settings.witness_file.read_text().splitlines(keepends=True)
    settings.witness_file.write_text("".join(lines[:-1]) + "not a checkpoint\n" + lines[-1])
    with pytest.raises(InputError, match="is not a custody checkpoint"):
        local.record()


def test_a_store_that_cannot_be_read_is_a_warning_as_for_a_command(tmp_path: Path) -> None:
    db, settings, local = _store(tmp_path, 3)
    before = settings.witness_file.read_text()
    _sql(tmp_path, "ALTER TABLE audit_head RENAME TO audit_head_gone")
    warning = witness.after_command(db, settings, known=True, local=local)
    assert warning is not None and "was not witnessed" in warning, warning
    assert settings.witness_file.read_text() == before
