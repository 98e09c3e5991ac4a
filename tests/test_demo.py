"""The README's first command: the whole custody story on the embedded chain, twice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.terminal_support import plain, run_on_pty


def _demo(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custody_cli", "demo", "--dir", str(directory), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "HOME": str(directory.parent)},
    )


@pytest.fixture
def short_path() -> Iterator[Path]:
    """A directory with a path as short as a user's ``./custody-demo``: the demo prints its store's
    path whole (it is to be copied), so a test's deep temporary path would make that line the
    widest."""
    made = Path(tempfile.mkdtemp(prefix="d", dir="/tmp"))
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def test_demo_runs_the_whole_story_and_runs_again(short_path: Path) -> None:
    """On a 120x40 terminal the story fits two screens, no line wider than the terminal."""
    tmp_path = short_path
    env = {"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "HOME": str(tmp_path)}
    out = plain(
        run_on_pty(["demo", "--dir", str(tmp_path / "one")], env, columns=120, rows=40, timeout=600, inherit=False)
    )
    lines = out.rstrip("\n").split("\n")
    assert len(lines) <= 80, f"{len(lines)} lines: more than two screens of 40"
    too_wide = [line for line in lines if len(line) > 120]
    assert not too_wide, too_wide
    assert "tpub" in out and not any(len(word) > 100 for word in out.split())  # keys shortened
    for needle in (
        "verified: PASS",
        "FAIL",  # the tampered export caught
        "issuance refused (exit 3)",
        "-> lifted",
        "carol refused (exit 4)",
        "rulebook #1 (",
        "carol's request of 5 BTC refused (exit 4)",
        "rule max_withdrawal",
        "rulebook #1 at height",
        "bob approved -> approved",
        "signed 1 input",
        "confirmed at height",
        "the customer's address holds 150000000 sat",
        "all accounts sum to 0 sat",
        "audit ledger: PASS",
        "audit reserves: PASS",
        "audit log: intact",
        "Where the data lives",
    ):
        assert needle in out, needle
    store = tmp_path / "one" / "store"
    assert json.loads((store / "halt.json").read_text())["halted"] is False
    again = _demo(tmp_path / "two", "--verbose")  # running it twice works: a fresh directory each time
    assert again.returncode == 0, again.stderr
    xpubs = [w for w in again.stdout.split() if "tpub" in w]
    assert len(xpubs) == 3 and all(len(w.split("]")[1]) == 111 for w in xpubs), xpubs  # whole with --verbose
    assert "address-issuance" in again.stdout and "Ledger" in again.stdout  # the tables
    reuse = _demo(tmp_path / "one")
    assert reuse.returncode == 2 and "not empty" in reuse.stderr


def test_the_story_runs_in_the_library_without_a_word_on_the_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """custody.demo does the work and returns data; only the CLI speaks (a renderer per step)."""
    from custody.demo import Story
    from custody_cli.demo import RENDER

    story = Story(tmp_path / "run")
    steps = story.steps()
    assert [s.number for s in steps] == list(range(1, len(steps) + 1))
    assert {s.name for s in steps} == set(RENDER)
    done = {s.name: s.run() for s in steps}
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert done["tamper"]["halted"] is True and done["tamper"]["issuance_refused"]["exit_code"] == 3
    assert done["approvals"]["requester_refused"]["exit_code"] == 4
    assert done["broadcast"]["withdrawal"]["status"] == "confirmed"
    halt_file = json.loads(Path(story.where()["halt_file"]).read_text())
    assert halt_file["halted"] is False  # lifted by two employees, read back from the file itself


def test_a_directory_that_holds_anything_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    from custody.demo import Story
    from custody.errors import InputError

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    with pytest.raises(InputError, match="not empty"):
        Story(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "mine\n"
