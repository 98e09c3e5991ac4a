"""An independent checker of a proof of liabilities in BitMEX's published format.

Written from the rules of BitMEX's ``validate_liabilities.py`` (the ``BitMEX/proof-of-
reserves-liabilities`` repository), on the standard library only; it shares no code with
custody's generator (``custody.books.liabilities``). The file is text::

    block_height:H
    DIGEST,VALUE          the root
    DIGEST,VALUE          row 1: its two children, left first
    ...                   row k: 2**k nodes, left to right
    DIGEST,VALUE          the last row: the leaves (a power of two of them)

``DIGEST`` is 64 hex digits, ``VALUE`` an unsigned decimal of satoshis that fits 8 bytes.
Every integer is hashed as 8 bytes little-endian (``u64``)::

    sub_nonce   = SHA256(account_nonce || u64(H) || u64(account))
    leaf digest = HMAC-SHA256(key=sub_nonce, u64(value) || u64(leaf index))
    node digest = SHA256(left.digest || u64(left.value) || right.digest || u64(right.value))
    node value  = left.value + right.value

A customer's balance is the sum of the leaves whose digest their sub-nonce reproduces.
BitMEX's validator checks only the paths above those leaves; this checker checks every
node of the tree, so that no part of the published sum goes unexamined.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field

from .errors import LiabilitiesFileError

U64_MAX = 2**64 - 1
MAX_ROWS = 64
"""More rows than this would need more than 2**63 leaves."""

# At most 20 digits: 2**64-1 has 20, and longer numbers are refused before int() reads them.
_HEADER = re.compile(r"block_height:(0|[1-9][0-9]{0,19})")
_NODE = re.compile(r"([0-9a-f]{64}),(0|[1-9][0-9]{0,19})")


def u64(value: int) -> bytes:
    """``value`` as 8 bytes little-endian; ValueError outside 0..2**64-1."""
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{value} does not fit 8 unsigned bytes")
    return value.to_bytes(8, "little")


def sub_nonce(account_nonce: bytes, height: int, account: int) -> bytes:
    """The key an account's leaves are committed with at ``height``."""
    return hashlib.sha256(account_nonce + u64(height) + u64(account)).digest()


def leaf_digest(key: bytes, value: int, index: int) -> bytes:
    return hmac.new(key, u64(value) + u64(index), hashlib.sha256).digest()


def node_digest(left: TreeNode, right: TreeNode) -> bytes:
    return hashlib.sha256(left.digest + u64(left.value) + right.digest + u64(right.value)).digest()


@dataclass(frozen=True)
class TreeNode:
    digest: bytes
    value: int
    line: int  # its line in the file (1 is the header)


@dataclass(frozen=True)
class Tree:
    """A parsed file: the block height and the rows, root first."""

    height: int
    rows: list[list[TreeNode]]

    @property
    def root(self) -> TreeNode:
        return self.rows[0][0]

    @property
    def leaves(self) -> list[TreeNode]:
        return self.rows[-1]


def parse(text: str) -> Tree:
    """Parse a liabilities file. Raises LiabilitiesFileError naming the first bad line.

    Refused: a missing or malformed ``block_height:`` header, a line that is not exactly
    ``DIGEST,VALUE`` (a sign, a space, a third field, upper-case hex ...), a value above
    2**64-1, and a last row that is not complete (rows must hold 1, 2, 4, ... nodes).
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if not lines:
        raise LiabilitiesFileError("the file is empty")
    header = _HEADER.fullmatch(lines[0])
    if header is None:
        raise LiabilitiesFileError(f"line 1 must be block_height:HEIGHT (8 bytes at most), not {lines[0][:80]!r}")
    height = int(header.group(1))
    if height > U64_MAX:
        raise LiabilitiesFileError(f"line 1: block height {height} does not fit 8 bytes")
    rows: list[list[TreeNode]] = []
    row: list[TreeNode] = []
    for number, line in enumerate(lines[1:], start=2):
        match = _NODE.fullmatch(line)
        if match is None:
            raise LiabilitiesFileError(
                f"line {number} must be DIGEST,VALUE (64 lower-case hex digits, an unsigned decimal of 8 bytes), "
                f"not {line[:100]!r}"
            )
        value = int(match.group(2))
        if value > U64_MAX:
            raise LiabilitiesFileError(f"line {number}: value {value} overflows 8 unsigned bytes")
        row.append(TreeNode(bytes.fromhex(match.group(1)), value, number))
        if len(row) == 1 << len(rows):
            rows.append(row)
            row = []
            if len(rows) > MAX_ROWS:
                raise LiabilitiesFileError(f"more than {MAX_ROWS} rows")
    if not rows:
        raise LiabilitiesFileError("the file has no root")
    if row:
        raise LiabilitiesFileError(
            f"the last row holds {len(row)} nodes where {1 << len(rows)} are due: the file was cut short "
            "or padded (the leaves must be a power of two)"
        )
    return Tree(height, rows)


def tree_problems(tree: Tree, limit: int = 20) -> list[str]:
    """Every node whose digest or value does not follow from its two children (at most ``limit``)."""
    problems: list[str] = []
    for depth in range(len(tree.rows) - 1):
        below = tree.rows[depth + 1]
        for i, node in enumerate(tree.rows[depth]):
            left, right = below[2 * i], below[2 * i + 1]
            total = left.value + right.value
            if total > U64_MAX:
                problems.append(
                    f"line {node.line}: its children (lines {left.line} and {right.line}) add up to {total}, "
                    "which overflows 8 bytes"
                )
            elif node.value != total:
                problems.append(
                    f"line {node.line}: value {node.value} is not the sum {total} of its children "
                    f"(lines {left.line} and {right.line})"
                )
            elif node.digest != node_digest(left, right):
                problems.append(
                    f"line {node.line}: digest does not commit to its children (lines {left.line} and {right.line})"
                )
            if len(problems) >= limit:
                return problems
    return problems


@dataclass
class Inclusion:
    """What the file says of one account, and everything found wrong."""

    height: int
    account: int
    root_digest: str
    root_value: int
    leaves: int
    matched: list[tuple[int, int]] = field(default_factory=list)  # (leaf index, value)
    problems: list[str] = field(default_factory=list)

    @property
    def balance(self) -> int:
        return sum(value for _, value in self.matched)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_account(
    tree: Tree,
    account: int,
    *,
    account_nonce: bytes | None = None,
    nonce: bytes | None = None,
    expected: int | None = None,
) -> Inclusion:
    """Check the whole tree and find ``account``'s leaves with its account nonce (or its sub-nonce).

    ``expected``: the balance the customer expects, in satoshis. Without it, an account with
    no leaf is a problem (a zero balance is checked by expecting 0). Raises ValueError for a
    nonce that is not 32 bytes or an account number that does not fit 8 bytes.
    """
    if (account_nonce is None) == (nonce is None):
        raise ValueError("give the account nonce or the sub-nonce, one of them")
    if not 0 <= account <= U64_MAX:
        raise ValueError(f"account number {account} does not fit 8 unsigned bytes")
    if account_nonce is not None:
        if len(account_nonce) != 32:
            raise ValueError("the account nonce must be 32 bytes (64 hex digits)")
        key = sub_nonce(account_nonce, tree.height, account)
    else:
        assert nonce is not None
        if len(nonce) != 32:
            raise ValueError("the nonce must be 32 bytes (64 hex digits)")
        key = nonce
    report = Inclusion(tree.height, account, tree.root.digest.hex(), tree.root.value, len(tree.leaves))
    report.problems = tree_problems(tree)
    if report.problems:
        report.problems.insert(0, "the tree does not add up: the file was changed after it was made")
    report.matched = [
        (i, leaf.value)
        for i, leaf in enumerate(tree.leaves)
        if hmac.compare_digest(leaf_digest(key, leaf.value, i), leaf.digest)
    ]
    if expected is None and not report.matched:
        report.problems.append(
            f"no leaf is account {account}'s at height {tree.height}: its balance was changed or left out, "
            "or this is the wrong nonce (expect a balance of 0 to check an empty account)"
        )
    elif expected is not None and report.balance != expected:
        report.problems.append(
            f"the tree counts {report.balance} sat for account {account} ({len(report.matched)} leaves), "
            f"not the {expected} sat expected"
        )
    return report
