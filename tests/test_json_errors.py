"""Under --json an error is one JSON object, {"error": MESSAGE, "code": N}, on stderr, with the
same exit code as without --json; stdout stays empty. Without --json errors stay plain text."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result

from tests.support import Custody, founders


def _json_error(result: Result) -> dict[str, object]:
    assert result.stdout == "", result.stdout  # never taken for data
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    doc = json.loads(lines[0])
    assert set(doc) == {"error", "code"} and isinstance(doc["error"], str) and doc["error"]
    assert doc["code"] == result.exit_code
    return doc


def test_errors_under_json_carry_the_exit_code(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    cases: list[tuple[tuple[str, ...], int, str]] = [((("withdraw", "list")), 9, "custody init")]  # no store
    for args, code, words in cases:
        plain = c(*args)
        assert plain.exit_code == code and plain.stderr.startswith("error: ") and words in plain.stderr
        doc = _json_error(c(*args, "--json"))
        assert doc["code"] == code and words in str(doc["error"])

    assert c.init(founders()).exit_code == 0
    alice = c.employee("alice")
    cases = [
        (("withdraw", "show", "42"), 5, "no withdrawal #42"),  # not found
        (("withdraw", "import", "1", str(tmp_path / "missing.psbt")), 2, "cannot read"),  # bad input
        (("init", str(c.manifest_file)), 6, "never overwritten"),  # conflict: never overwritten
    ]
    for args, code, words in cases:
        plain = c(*args)
        assert plain.exit_code == code, plain.output
        assert plain.stderr.startswith("error: ") and plain.stdout == ""
        doc = _json_error(c(*args, "--json"))
        assert doc["code"] == code and words in str(doc["error"]), doc
    # a usage error (click's own, exit 2)
    for args, code, words in [(("address", "new", "--account", "a", "--count", "0"), 2, "--count")]:
        plain = c(*args)
        assert plain.exit_code == code and "Usage:" in plain.stderr
        doc = _json_error(c(*args, "--json"))
        assert doc["code"] == code and words in str(doc["error"]), doc
        doc = _json_error(c(*args, "--json"))
        assert doc["code"] == code and words in str(doc["error"]), doc

    # halted: exit 3 as JSON too
    assert c("halt", "raise", "--reason", "drill", "--as", "alice", "--key", str(alice), "--json").exit_code == 0
    doc = _json_error(c("address", "new", "--account", "a", "--json"))
    assert doc["code"] == 3 and "halt" in str(doc["error"]).lower()


def test_a_hostile_message_stays_one_ascii_line(tmp_path: Path) -> None:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    name = "x\u202e\n\u2028\x1b[31mred"
    result = c("address", "show", name, "--json")
    doc = _json_error(result)
    assert doc["code"] == 5 and "was not issued" in str(doc["error"])
    assert not any(ch in result.stderr for ch in "\u202e\u2028\x1b"), result.stderr  # escaped, not raw
