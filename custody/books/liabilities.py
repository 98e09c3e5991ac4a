"""Proof of liabilities: a Merkle sum tree of customer balances (docs/FORMATS.md).

Each leaf is ``(hash, sum)``: ``sum`` is one account's balance in satoshis and ``hash``
commits to the account's id, a random 32-byte nonce of its own and that balance::

    leaf.hash = SHA256("custody/liabilities/leaf/v1" || nonce || u32be(len(id)) || id || u64be(balance))

Each inner node commits to both children and their sums, and its sum is theirs added::

    node.hash = SHA256("custody/liabilities/node/v1" || left.hash || u64be(left.sum) || right.hash || u64be(right.sum))
    node.sum  = left.sum + right.sum

Leaves are sorted by hash (so their order says nothing about the accounts); an odd node at
the end of a level is carried up unchanged. The published file holds every leaf and the
root; a customer holding their nonce (or their proof: nonce, leaf index and the siblings on
the way up) finds their own leaf without learning whose the others are, and checks that
their balance is counted in the root's sum. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custody.errors import InputError, VerificationFailed

FORMAT = "custody-liabilities"
PROOF_FORMAT = "custody-liabilities-proof"
VERSION = 1
LEAF_TAG = b"custody/liabilities/leaf/v1"
NODE_TAG = b"custody/liabilities/node/v1"
MAX_SUM = 2**63 - 1


class InclusionFailed(VerificationFailed):
    """A customer's balance is not (or not correctly) in the liabilities tree (exit 3)."""


@dataclass(frozen=True)
class Node:
    hash: bytes
    sum: int

    def to_dict(self) -> dict[str, Any]:
        return {"hash": self.hash.hex(), "sum": self.sum}


@dataclass(frozen=True)
class Step:
    """A sibling on the way from a leaf to the root; ``side`` is the sibling's side."""

    side: str  # "left" or "right"
    node: Node

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, **self.node.to_dict()}


def _u64(value: int) -> bytes:
    if not 0 <= value <= MAX_SUM:
        raise InputError(f"a liabilities sum must be 0..{MAX_SUM} sat, not {value}")
    return value.to_bytes(8, "big")


def leaf_hash(account: str, nonce: bytes, balance: int) -> bytes:
    ident = account.encode("utf-8")
    return hashlib.sha256(LEAF_TAG + nonce + len(ident).to_bytes(4, "big") + ident + _u64(balance)).digest()


def parent(left: Node, right: Node) -> Node:
    body = NODE_TAG + left.hash + _u64(left.sum) + right.hash + _u64(right.sum)
    return Node(hashlib.sha256(body).digest(), left.sum + right.sum)


def levels(leaves: Sequence[Node]) -> list[list[Node]]:
    """Every level of the tree, leaves first, the root last (an empty tree: a zero root)."""
    if not leaves:
        return [[Node(bytes(32), 0)]]
    out = [list(leaves)]
    while len(out[-1]) > 1:
        level = out[-1]
        up = [parent(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        out.append(up)
    return out


def path(tree: list[list[Node]], index: int) -> list[Step]:
    """The siblings from leaf ``index`` to the root."""
    steps = []
    for level in tree[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            steps.append(Step("left" if sibling < index else "right", level[sibling]))
        index //= 2
    return steps


def climb(leaf: Node, steps: Sequence[Step]) -> Node:
    node = leaf
    for step in steps:
        node = parent(step.node, node) if step.side == "left" else parent(node, step.node)
    return node


@dataclass(frozen=True)
class Built:
    document: dict[str, Any]
    proofs: list[dict[str, Any]]


def build(balances: Sequence[tuple[str, int]], header: dict[str, Any]) -> Built:
    """The liabilities document and one private proof per account (account id, balance >= 0)."""
    nonces = {account: secrets.token_bytes(32) for account, _ in balances}
    leaves = sorted(((Node(leaf_hash(a, nonces[a], b), b), a) for a, b in balances), key=lambda item: item[0].hash)
    tree = levels([n for n, _ in leaves])
    root = tree[-1][0]
    document = {
        "format": FORMAT,
        "version": VERSION,
        **header,
        "root": root.to_dict(),
        "count": len(leaves),
        "leaves": [n.to_dict() for n, _ in leaves],
    }
    proofs = [
        {
            "format": PROOF_FORMAT,
            "version": VERSION,
            "account": account,
            "nonce": nonces[account].hex(),
            "balance": node.sum,
            "index": i,
            "root": root.to_dict(),
            "path": [s.to_dict() for s in path(tree, i)],
        }
        for i, (node, account) in enumerate(leaves)
    ]
    return Built(document, proofs)


# ---------------------------------------------------------------- checking (the customer's side)


def _node(obj: Any, what: str) -> Node:
    try:
        h = bytes.fromhex(obj["hash"])
        total = obj["sum"]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{what} is not a {{hash, sum}} node") from None
    if len(h) != 32 or not isinstance(total, int) or isinstance(total, bool) or not 0 <= total <= MAX_SUM:
        raise InputError(f"{what}: a 32-byte hash and a sum of 0..{MAX_SUM} sat are expected")
    return Node(h, total)


def load(path_: Path) -> tuple[dict[str, Any], list[Node], Node]:
    """A liabilities file: (document, leaves, root). Raises InputError for a malformed file."""
    try:
        doc = json.loads(path_.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"liabilities file {path_} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"liabilities file {path_} is unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"{path_} is not a {FORMAT} file")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise InputError(f"{path_} is version {doc.get('version')!r}; this tool reads version {VERSION}")
    raw = doc.get("leaves")
    if not isinstance(raw, list):
        raise InputError(f"{path_} has no leaves")
    leaves = [_node(leaf, f"leaf {i}") for i, leaf in enumerate(raw)]
    return doc, leaves, _node(doc.get("root"), "the root")


def _proof(path_: Path, candidates: Sequence[str]) -> dict[str, Any]:
    """The proof of one of ``candidates`` in a proof file (one JSON object, or JSON Lines)."""
    try:
        text = path_.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"proof file {path_} is unreadable: {exc}") from None
    try:
        objects: list[Any] = [json.loads(text)]
    except ValueError:  # JSON Lines: the whole proofs file
        try:
            objects = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise InputError(f"proof file {path_} is not JSON: {exc}") from None
    for obj in objects:
        if isinstance(obj, dict) and obj.get("format") == PROOF_FORMAT and obj.get("account") in candidates:
            return obj
    raise InputError(f"proof file {path_} holds no proof for account {candidates[-1]!r}")


def candidates(account: str) -> list[str]:
    """The ids an account may have in the tree: as given, and as a customer account."""
    return [account] if account.startswith(("customer:", "held:")) else [f"customer:{account}", account]


def check_inclusion(
    file: Path,
    account: str,
    *,
    nonce: str | None = None,
    proof: Path | None = None,
    expected: int | None = None,
) -> dict[str, Any]:
    """Check that ``account`` is in the liabilities ``file`` with its balance counted in the root.

    Give the account's ``nonce`` (hex), or its ``proof`` file. ``expected``: the balance the
    customer expects (satoshis). Raises InclusionFailed with every reason found; InputError
    for malformed input.
    """
    if (nonce is None) == (proof is None):
        raise InputError("give the account's --nonce or its --proof file (one of them)")
    doc, leaves, root = load(file)
    problems: list[str] = []
    computed = levels(leaves)[-1][0]
    if computed != root:
        problems.append(
            f"the leaves do not add up to the file's root (recomputed sum {computed.sum} sat, hash "
            f"{computed.hash.hex()[:16]}…; the file says {root.sum} sat, {root.hash.hex()[:16]}…): "
            "the file was changed"
        )
    if len(leaves) != doc.get("count"):
        problems.append(f"the file says {doc.get('count')} leaves and holds {len(leaves)}")
    ids = candidates(account)
    found: tuple[str, int, Node] | None = None
    if nonce is not None:
        try:
            salt = bytes.fromhex(nonce)
        except ValueError:
            raise InputError("the nonce must be hex") from None
        if len(salt) != 32:
            raise InputError("the nonce must be 32 bytes (64 hex digits)")
        for i, leaf in enumerate(leaves):
            for ident in ids:
                if leaf_hash(ident, salt, leaf.sum) == leaf.hash:
                    found = (ident, i, leaf)
                    break
            if found:
                break
        if found is None:
            problems.append(
                f"no leaf matches account {account!r} with this nonce: its balance was changed, or the "
                "account was left out"
            )
    else:
        assert proof is not None
        p = _proof(proof, ids)
        try:
            salt = bytes.fromhex(str(p["nonce"]))
            balance = p["balance"]
            index = p["index"]
            steps = [Step(str(s["side"]), _node(s, f"proof step {n}")) for n, s in enumerate(p["path"])]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"proof file {proof} is malformed") from None
        if not isinstance(balance, int) or not isinstance(index, int) or not 0 <= balance <= MAX_SUM:
            raise InputError(f"proof file {proof} is malformed")
        leaf = Node(leaf_hash(str(p["account"]), salt, balance), balance)
        top = climb(leaf, steps)
        if top != root:
            problems.append(
                f"the proof's balance of {balance} sat does not lead to the file's root: the balance or the "
                "path was changed"
            )
        if _node(p.get("root"), "the proof's root") != root:
            problems.append("the proof was made for another root than the file's")
        if not 0 <= index < len(leaves) or leaves[index] != leaf:
            problems.append(f"leaf {index} of the file is not this account's leaf with a balance of {balance} sat")
        found = (str(p["account"]), index, leaf)
    if found is not None and expected is not None and found[2].sum != expected:
        problems.append(f"the tree counts {found[2].sum} sat for {account!r}, not the {expected} sat expected")
    if problems:
        raise InclusionFailed(f"inclusion check failed for {account!r}: " + "; ".join(problems))
    assert found is not None
    return {
        "ok": True,
        "account": found[0],
        "balance_sat": found[2].sum,
        "leaf_index": found[1],
        "root": root.to_dict(),
        "leaves": len(leaves),
        "as_of": doc.get("as_of"),
    }
