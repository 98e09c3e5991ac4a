"""The proof of liabilities in BitMEX's format: our generator against our independent checker
(custody.verify.liabilities, written from BitMEX's rules), and against BitMEX's own
``validate_liabilities.py`` when ``BITMEX_POR_DIR`` names a checkout of their repository.

The checker shares no code with the generator; every tampering below is refused by it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custody.books import inclusion, liabilities
from custody.errors import InputError
from custody.verify import liabilities as checker
from custody.verify.errors import LiabilitiesFileError

U64 = 2**64 - 1
BITMEX = os.environ.get("BITMEX_POR_DIR")
ALICE = 100000000001  # 50,000,000 sat


def _balances() -> dict[int, int]:
    return {
        100000000001: 50_000_000,
        100000000002: 123_456,
        100000000003: 7,
        100000000004: 2,
        100000000005: 1,
        100000000006: 0,
        100000000007: 21_000_000 * 100_000_000 - 1,
    }


def _built(balances: dict[int, int], height: int = 812) -> tuple[liabilities.Tree, dict[int, bytes]]:
    nonces = {a: secrets.token_bytes(32) for a in balances}
    return liabilities.build(balances, nonces, height), nonces


def _lines(tree: liabilities.Tree) -> list[str]:
    return tree.text().splitlines()


def _recompute(lines: list[str]) -> list[str]:
    """Recompute every inner node from the leaves up (what a careful forger does)."""
    header, body = lines[0], [(bytes.fromhex(d), int(v)) for d, v in (line.split(",") for line in lines[1:])]
    rows, start, size = [], 0, 1
    while start < len(body):
        rows.append(body[start : start + size])
        start, size = start + size, size * 2
    for depth in range(len(rows) - 2, -1, -1):
        below = rows[depth + 1]
        for i in range(len(rows[depth])):
            (ld, lv), (rd, rv) = below[2 * i], below[2 * i + 1]
            digest = hashlib.sha256(ld + lv.to_bytes(8, "little") + rd + rv.to_bytes(8, "little")).digest()
            rows[depth][i] = (digest, (lv + rv) % 2**64)
    return [header] + [f"{d.hex()},{v}" for row in rows for d, v in row]


def _check(lines: list[str], account: int, nonce: bytes, expected: int | None = None) -> checker.Inclusion:
    return checker.check_account(
        checker.parse("\n".join(lines) + "\n"), account, account_nonce=nonce, expected=expected
    )


def test_our_checker_finds_every_accounts_balance_and_nothing_else() -> None:
    balances = _balances()
    tree, nonces = _built(balances)
    parsed = checker.parse(tree.text())
    assert parsed.height == 812 and checker.tree_problems(parsed) == []
    assert parsed.root.value == sum(balances.values()) and len(parsed.leaves) == 16  # 2 x 6 positive -> 16
    for account, owed in balances.items():
        by_account_nonce = checker.check_account(parsed, account, account_nonce=nonces[account], expected=owed)
        assert by_account_nonce.ok and by_account_nonce.balance == owed, by_account_nonce.problems
        sub = checker.sub_nonce(nonces[account], 812, account)
        by_sub_nonce = checker.check_account(parsed, account, nonce=sub, expected=owed)
        assert by_sub_nonce.matched == by_account_nonce.matched
        assert sorted(i for i, _ in by_account_nonce.matched) == sorted(tree.leaves_of.get(account, []))
    # the empty account has no leaf: checked by expecting 0, refused without it
    assert checker.check_account(parsed, 100000000006, account_nonce=nonces[100000000006], expected=0).ok
    assert not checker.check_account(parsed, 100000000006, account_nonce=nonces[100000000006]).ok
    # another account's number, or another height, opens nothing
    wrong = checker.check_account(parsed, 100000000002, account_nonce=nonces[100000000001])
    assert wrong.matched == [] and not wrong.ok


def test_no_split_balance_is_published_whole_and_the_leaves_are_shuffled() -> None:
    balances = _balances()
    for _ in range(20):
        tree, _ = _built(balances)
        values = [leaf.value for leaf in tree.rows[-1]]
        for account, owed in balances.items():
            mine = [values[i] for i in tree.leaves_of.get(account, [])]
            assert sum(mine) == owed
            if owed >= 2:
                assert len(mine) >= liabilities.MIN_PARTS and max(mine) < owed
            elif owed == 1:
                assert mine == [1]
            else:
                assert mine == []
        # fillers (value 0) open for nobody
        owned = {i for leaves in tree.leaves_of.values() for i in leaves}
        assert all(values[i] == 0 for i in range(len(values)) if i not in owned)
    orders = {tuple(sorted(_built(balances)[0].leaves_of[100000000001])) for _ in range(10)}
    assert len(orders) > 1  # the leaves of one account land at other places each time


@given(st.dictionaries(st.integers(0, U64), st.integers(0, 10**15), max_size=12), st.integers(0, 10**7))
def test_every_generated_tree_checks_for_every_account(balances: dict[int, int], height: int) -> None:
    tree, nonces = _built(balances, height)
    parsed = checker.parse(tree.text())
    assert checker.tree_problems(parsed) == [] and parsed.root.value == sum(balances.values())
    n = len(parsed.leaves)
    assert n & (n - 1) == 0 and n >= 2 * sum(1 for v in balances.values() if v > 0)
    for account, owed in balances.items():
        assert checker.check_account(parsed, account, account_nonce=nonces[account], expected=owed).ok


def test_the_generator_refuses_what_cannot_be_published() -> None:
    with pytest.raises(InputError, match="cannot be negative"):
        liabilities.build({1: -1}, {1: bytes(32)}, 5)
    with pytest.raises(InputError, match="more than 8 bytes"):
        liabilities.build({1: U64, 2: 1}, {1: bytes(32), 2: bytes(32)}, 5)
    with pytest.raises(InputError, match="no 32-byte nonce"):
        liabilities.build({1: 5}, {}, 5)
    empty = checker.parse(liabilities.build({}, {}, 5).text())
    assert len(empty.rows) == 1 and empty.root.value == 0


# ---------------------------------------------------------------- tampering, each refused


@pytest.fixture
def published() -> tuple[list[str], dict[int, bytes], liabilities.Tree]:
    tree, nonces = _built(_balances())
    return _lines(tree), nonces, tree


def _leaf_line(tree: liabilities.Tree, account: int, k: int = 0) -> int:
    """The line (0-based, header 0) of ``account``'s k-th leaf."""
    return len(tree.text().splitlines()) - len(tree.rows[-1]) + tree.leaves_of[account][k]


def test_a_changed_leaf_value_is_refused(published: tuple[list[str], dict[int, bytes], liabilities.Tree]) -> None:
    lines, nonces, tree = published
    at = _leaf_line(tree, ALICE)
    digest, value = lines[at].split(",")
    lines[at] = f"{digest},{int(value) - 1000}"
    report = _check(lines, ALICE, nonces[ALICE], 50_000_000)
    assert not report.ok and any("is not the sum" in p for p in report.problems)
    # the forger recomputes every node above: the tree adds up, and alice's leaf no longer opens
    forged = _check(_recompute(lines), ALICE, nonces[ALICE], 50_000_000)
    assert checker.tree_problems(checker.parse("\n".join(_recompute(lines)))) == []
    assert not forged.ok and forged.balance < 50_000_000 and "not the 50000000 sat expected" in forged.problems[-1]


def test_swapped_children_are_refused(published: tuple[list[str], dict[int, bytes], liabilities.Tree]) -> None:
    lines, nonces, tree = published
    at = _leaf_line(tree, ALICE)
    sibling = at + 1 if tree.leaves_of[ALICE][0] % 2 == 0 else at - 1
    lines[at], lines[sibling] = lines[sibling], lines[at]
    report = _check(lines, ALICE, nonces[ALICE], 50_000_000)
    assert not report.ok and any("digest does not commit" in p for p in report.problems)
    # recomputed above the swap: each leaf commits to its index, so alice's no longer opens
    forged = _check(_recompute(lines), ALICE, nonces[ALICE], 50_000_000)
    assert not forged.ok and forged.balance < 50_000_000
    # two inner nodes swapped (a whole subtree moved) is refused as well
    lines = _recompute(list(published[0]))
    lines[2], lines[3] = lines[3], lines[2]
    assert any("digest does not commit" in p for p in _check(lines, ALICE, nonces[ALICE], 50_000_000).problems)


def test_a_shorter_tree_is_refused(published: tuple[list[str], dict[int, bytes], liabilities.Tree]) -> None:
    lines, nonces, tree = published
    leaves = len(tree.rows[-1])
    without_leaves = lines[:-leaves]  # a whole row dropped: the tree still adds up ...
    assert checker.tree_problems(checker.parse("\n".join(without_leaves))) == []
    report = _check(without_leaves, ALICE, nonces[ALICE])  # ... but no leaf is alice's
    assert not report.ok and "no leaf is account" in report.problems[-1]
    with pytest.raises(LiabilitiesFileError, match="cut short"):
        checker.parse("\n".join(lines[:-1]))
    with pytest.raises(LiabilitiesFileError, match="cut short"):
        checker.parse("\n".join([*lines, lines[-1]]))  # or padded


@pytest.mark.parametrize(
    "value, why",
    [
        ("-5", "must be DIGEST,VALUE"),
        (str(2**64), "overflows"),
        ("9" * 5000, "must be DIGEST,VALUE"),  # longer than any 8-byte value, and than int() reads
        ("+5", "must be DIGEST,VALUE"),
        ("5 ", "DIGEST"),
    ],
)
def test_a_negative_or_overflowing_value_is_refused(
    published: tuple[list[str], dict[int, bytes], liabilities.Tree], value: str, why: str
) -> None:
    lines, _, _ = published
    digest = lines[-1].split(",")[0]
    lines[-1] = f"{digest},{value}"
    with pytest.raises(LiabilitiesFileError, match=why):
        checker.parse("\n".join(lines))


def test_children_that_overflow_their_parent_are_refused(
    published: tuple[list[str], dict[int, bytes], liabilities.Tree],
) -> None:
    """Two leaves near 2**64 whose sum wraps: a parent recomputed modulo 2**64 is refused."""
    lines, nonces, _ = published
    digest = lines[-1].split(",")[0]
    lines[-1] = f"{digest},{U64}"
    lines[-2] = f"{lines[-2].split(',')[0]},{U64}"
    report = _check(_recompute(lines), ALICE, nonces[ALICE], 50_000_000)
    assert any("overflows 8 bytes" in p for p in report.problems)


def test_a_changed_height_or_header_is_refused(
    published: tuple[list[str], dict[int, bytes], liabilities.Tree],
) -> None:
    lines, nonces, _ = published
    moved = ["block_height:813", *lines[1:]]
    assert _check(moved, ALICE, nonces[ALICE]).matched == []  # the sub-nonce is of another height
    for header in ("block_height:-1", "block_height: 812", "height:812", "", "block_height:" + "9" * 5000):
        with pytest.raises(LiabilitiesFileError, match="line 1"):
            checker.parse("\n".join([header, *lines[1:]]))


# ---------------------------------------------------------------- hostile input

_HOSTILE_TREE, _HOSTILE_NONCES = _built({ALICE: 50_000_000, 100000000002: 123_456, 100000000003: 7}, 99)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_mutated_file_is_refused_with_a_documented_error_or_reads_as_the_original(
    tmp_path: Path, data: st.DataObject
) -> None:
    """Byte edits anywhere in the published file: exit 3 (InclusionFailed) or 2 (InputError),
    never another error; a check that still passes read exactly the original tree."""
    original = _HOSTILE_TREE.text().encode()
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3))):
        if not raw:
            break
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.sampled_from([b"\n", b",", b"-", b"0", b"a", b"\xff", b" "]))
        elif op == "delete":
            del raw[pos : pos + data.draw(st.integers(1, 90))]
        else:
            del raw[pos:]
    path = tmp_path / "mutated.txt"
    path.write_bytes(bytes(raw))
    nonce = _HOSTILE_NONCES[ALICE].hex()
    try:
        result = inclusion.check_inclusion(path, account=ALICE, account_nonce=nonce, expected=50_000_000)
    except (inclusion.InclusionFailed, InputError) as exc:
        assert exc.exit_code in (2, 3) and str(exc)
        return
    assert result["balance_sat"] == 50_000_000
    assert checker.parse(bytes(raw).decode()).rows == checker.parse(original.decode()).rows


# ---------------------------------------------------------------- BitMEX's own validator


@pytest.mark.skipif(
    not BITMEX, reason="BITMEX_POR_DIR does not name a checkout of BitMEX/proof-of-reserves-liabilities"
)
def test_bitmex_validate_liabilities_reads_our_file_for_every_account(tmp_path: Path) -> None:
    """Their validator (run as they ship it) finds each account's balance and our root."""
    balances = _balances()
    tree, nonces = _built(balances, 4242)
    proof = tmp_path / "liabilities.txt"
    proof.write_text(tree.text())
    script = Path(str(BITMEX)) / "validate_liabilities.py"
    for account, owed in balances.items():
        for how in (
            ["--account_nonce", nonces[account].hex()],
            ["--nonce", checker.sub_nonce(nonces[account], 4242, account).hex()],
        ):
            run = subprocess.run(
                [sys.executable, str(script), "--proof", str(proof), "--account", str(account), *how],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            print(run.stdout)
            validated = re.search(r"Validated ([\d,]+) sats for account (\d+)", run.stdout)
            total = re.search(r"Total liabilities ([\d,]+) sats, root hash ([0-9a-f]{64})", run.stdout)
            assert validated and total, run.stdout
            assert int(validated.group(1).replace(",", "")) == owed and int(validated.group(2)) == account
            assert int(total.group(1).replace(",", "")) == sum(balances.values())
            assert total.group(2) == tree.root.digest.hex()


@pytest.mark.skipif(
    not BITMEX, reason="BITMEX_POR_DIR does not name a checkout of BitMEX/proof-of-reserves-liabilities"
)
def test_bitmex_readme_example_reads_the_same_in_our_checker_as_in_their_validator(tmp_path: Path) -> None:
    """Their README's worked example (a tree their generator made), read from their checkout:
    every node passes our rules, and our checker says for account 2 what their validator says
    (which is 0 sat and another root than the README claims: the example is stale)."""
    readme = (Path(str(BITMEX)) / "README.md").read_text()
    lines = re.findall(r"^\s+(block_height:\d+|[0-9a-f]{64},\d+)$", readme, re.M)
    assert lines and lines[0] == "block_height:100", "their README's example moved"
    proof = tmp_path / "readme-example.txt"
    proof.write_text("\n".join(lines) + "\n")
    account, nonce = 2, re.search(r"--account 2 --account_nonce ([0-9a-f]{64})", readme)
    assert nonce
    run = subprocess.run(
        [sys.executable, str(Path(str(BITMEX)) / "validate_liabilities.py"), "--proof", str(proof)]
        + ["--account", str(account), "--account_nonce", nonce.group(1)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    print(run.stdout)
    said_sub = re.search(r"Snapshot nonce for account 2 at height 100 is ([0-9a-f]{64})", run.stdout)
    said_sats = re.search(r"Validated ([\d,]+) sats for account 2", run.stdout)
    said_total = re.search(r"Total liabilities ([\d,]+) sats, root hash ([0-9a-f]{64})", run.stdout)
    assert said_sub and said_sats and said_total, run.stdout
    tree = checker.parse(proof.read_text())
    assert checker.tree_problems(tree) == []
    ours = checker.check_account(tree, account, account_nonce=bytes.fromhex(nonce.group(1)), expected=0)
    assert checker.sub_nonce(bytes.fromhex(nonce.group(1)), 100, account).hex() == said_sub.group(1)
    assert ours.ok and ours.balance == int(said_sats.group(1).replace(",", ""))
    assert (ours.root_value, ours.root_digest) == (int(said_total.group(1).replace(",", "")), said_total.group(2))
