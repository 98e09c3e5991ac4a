"""The README's first command: the whole custody story on the embedded chain, twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _demo(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custody_cli", "demo", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "HOME": str(directory.parent)},
    )


def test_demo_runs_the_whole_story_and_runs_again(tmp_path: Path) -> None:
    first = _demo(tmp_path / "one")
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
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
        "signed 1 input(s)",
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
    again = _demo(tmp_path / "two")  # running it twice works: a fresh directory each time
    assert again.returncode == 0, again.stderr
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
