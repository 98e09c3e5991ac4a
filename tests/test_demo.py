"""The README's first command: the whole custody story on the embedded chain, twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


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
