"""Proof of liabilities in BitMEX's format: balances split, shuffled, blinded in a Merkle sum tree.

The format is the one BitMEX publishes and checks with ``validate_liabilities.py`` (the
``BitMEX/proof-of-reserves-liabilities`` repository); this is custody's own code for it.
Every account has a stable number and a 32-byte account nonce, given once, privately, to
its customer. At block height ``H`` (integers hashed as 8 bytes little-endian, ``u64``)::

    sub_nonce   = SHA256(account_nonce || u64(H) || u64(account))
    leaf digest = HMAC-SHA256(key=sub_nonce, u64(value) || u64(leaf index))
    node digest = SHA256(left.digest || u64(left.value) || right.digest || u64(right.value))
    node value  = left.value + right.value

Each positive balance is cut at random into at least MIN_PARTS parts (a balance of 1 sat
cannot be cut); then the largest parts are cut again until the leaves number a power of
two, at least MIN_PARTS per account. Zero balances have no leaf. When nothing is left to
cut, zero-valued leaves with random digests fill the last places. The leaves are shuffled
(the operating system's randomness) before their index is committed. The published text
is ``block_height:H`` and then the tree root first, row by row, left to right, one
``DIGEST,VALUE`` line per node. Nothing in it names an account or shows a whole balance.

The independent checker of this format is ``custody.verify.liabilities``; this module only
generates. Standard library only.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from custody.errors import InputError

U64_MAX = 2**64 - 1
MIN_PARTS = 2
"""Every balance of 2 sat or more is published as at least this many leaves."""

_rng = random.SystemRandom()


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def sub_nonce(account_nonce: bytes, height: int, account: int) -> bytes:
    """The HMAC key of ``account``'s leaves at ``height``."""
    return hashlib.sha256(account_nonce + _u64(height) + _u64(account)).digest()


@dataclass(frozen=True)
class Node:
    digest: bytes
    value: int


def _leaf(key: bytes, value: int, index: int) -> Node:
    return Node(hmac.new(key, _u64(value) + _u64(index), hashlib.sha256).digest(), value)


def _parent(left: Node, right: Node) -> Node:
    body = left.digest + _u64(left.value) + right.digest + _u64(right.value)
    return Node(hashlib.sha256(body).digest(), left.value + right.value)


def _cut(value: int, parts: int) -> list[int]:
    """``value`` cut at ``parts - 1`` distinct random places: ``parts`` positive amounts."""
    if parts <= 1:
        return [value]
    cuts = sorted(_rng.sample(range(1, value), parts - 1))
    edges = [0, *cuts, value]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def split(balances: Mapping[int, int], min_parts: int = MIN_PARTS) -> list[tuple[int | None, int]]:
    """The leaves' (account, value) before shuffling; ``None`` marks a zero-valued filler.

    Their number is the smallest power of two at least ``min_parts`` times the number of
    positive balances (1 when there are none).
    """
    positive = [(account, value) for account, value in balances.items() if value > 0]
    target = 1
    while target < min_parts * len(positive):
        target *= 2
    parts: list[tuple[int | None, int]] = []
    for account, value in positive:
        parts += [(account, v) for v in _cut(value, min(min_parts, value))]
    # Cut the largest part in two until the leaves fill the tree (or nothing can be cut).
    heap = [(-v, n, owner) for n, (owner, v) in enumerate(parts)]
    heapq.heapify(heap)
    count = len(parts)
    while len(heap) < target and heap and -heap[0][0] >= 2:
        largest, _, owner = heapq.heappop(heap)
        for v in _cut(-largest, 2):
            count += 1
            heapq.heappush(heap, (-v, count, owner))
    leaves: list[tuple[int | None, int]] = [(owner, -v) for v, _, owner in heap]
    leaves += [(None, 0)] * (target - len(leaves))
    return leaves


@dataclass(frozen=True)
class Tree:
    """A built tree: rows root first (the last row is the leaves), and whose leaves are whose."""

    height: int
    rows: list[list[Node]]
    leaves_of: dict[int, list[int]]  # account -> its leaf indexes (private: never published)

    @property
    def root(self) -> Node:
        return self.rows[0][0]

    def text(self) -> str:
        """The file to publish."""
        lines = [f"block_height:{self.height}"]
        lines += [f"{node.digest.hex()},{node.value}" for row in self.rows for node in row]
        return "\n".join(lines) + "\n"


def build(balances: Mapping[int, int], nonces: Mapping[int, bytes], height: int, min_parts: int = MIN_PARTS) -> Tree:
    """The tree of ``balances`` (account number -> satoshis owed) at block ``height``.

    ``nonces`` holds each account's 32-byte account nonce. Raises InputError for a negative
    balance, a total or a number that does not fit 8 bytes, or a missing or short nonce.
    """
    if not 0 <= height <= U64_MAX:
        raise InputError(f"block height {height} does not fit 8 bytes")
    for account, value in balances.items():
        if not 0 <= account <= U64_MAX:
            raise InputError(f"account number {account} does not fit 8 bytes")
        if value < 0:
            raise InputError(f"account {account}: a liability cannot be negative ({value} sat)")
        if value > 0 and len(nonces.get(account, b"")) != 32:
            raise InputError(f"account {account} has no 32-byte nonce")
    if sum(balances.values()) > U64_MAX:
        raise InputError("the liabilities add up to more than 8 bytes hold")
    leaves = split(balances, min_parts)
    _rng.shuffle(leaves)
    keys = {account: sub_nonce(nonces[account], height, account) for account, v in balances.items() if v > 0}
    row: list[Node] = []
    leaves_of: dict[int, list[int]] = {}
    for index, (owner, value) in enumerate(leaves):
        if owner is None:
            row.append(Node(secrets.token_bytes(32), 0))  # a filler: opens for nobody
        else:
            row.append(_leaf(keys[owner], value, index))
            leaves_of.setdefault(owner, []).append(index)
    rows = [row]
    while len(rows[0]) > 1:
        below = rows[0]
        rows.insert(0, [_parent(below[i], below[i + 1]) for i in range(0, len(below), 2)])
    return Tree(height, rows, leaves_of)
