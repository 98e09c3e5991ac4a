"""An auditor's check that a proof of reserves lists only the founders' multisig addresses.

BitMEX's ``validate_reserves.py`` proves the amount a proof's descriptors hold at its height
(the node scans them); of each descriptor it checks only that one of the listed xpubs
appears in it. This check supplies the rest from the founders' manifest the auditors hold:
the chain, the claim (m, n) and the xpubs are the manifest's; every entry's descriptor is
``sortedmulti`` of all the founders' keys at one ``/CHAIN/INDEX`` with the manifest's
threshold, wrapped for its script type, with a valid BIP-380 checksum; its address
re-derives from the manifest at that position; no position is listed twice; balances are
positive and add up to the total. Standard library and this package only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .core import verify_address
from .manifest import Manifest

CORE_CHAIN = {"mainnet": "main", "testnet": "test", "signet": "signet", "regtest": "regtest"}
ADDR_TYPES = {"p2wsh": "multisig_wsh", "p2sh-p2wsh": "multisig_sh_wsh", "p2sh": "multisig_sh"}
WRAPS = {"p2wsh": ("wsh(", ")"), "p2sh-p2wsh": ("sh(wsh(", "))"), "p2sh": ("sh(", ")")}
HARDENED = 2**31

# BIP-380's descriptor checksum.
_INPUT_CHARSET = "0123456789()[],'/*abcdefgh@:$%{}IJKLMNOPQRSTUVWXYZ&+-.;<=>?!^_|~ijklmnopqrstuvwxyzABCDEFGH`#\"\\ "
_CHECKSUM_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0xF5DEE51989, 0xA9FDCA3312, 0x1BAB10E32D, 0x3706B1677A, 0x644D626FFD)
_KEY = re.compile(r"(?:\[[0-9a-fA-F]{8}(?:/[0-9]+['h]?)*\])?([1-9A-HJ-NP-Za-km-z]{100,120})/([0-9]+)/([0-9]+)")


def descriptor_checksum(body: str) -> str | None:
    """The 8-character checksum of ``body``; None when it holds a character BIP-380 lacks."""
    c, cls, count = 1, 0, 0

    def step(c: int, v: int) -> int:
        top = c >> 35
        c = ((c & 0x7FFFFFFFF) << 5) ^ v
        for i, g in enumerate(_GENERATOR):
            if (top >> i) & 1:
                c ^= g
        return c

    for ch in body:
        pos = _INPUT_CHARSET.find(ch)
        if pos < 0:
            return None
        c = step(c, pos & 31)
        cls = cls * 3 + (pos >> 5)
        count += 1
        if count == 3:
            c, cls, count = step(c, cls), 0, 0
    if count:
        c = step(c, cls)
    for _ in range(8):
        c = step(c, 0)
    c ^= 1
    return "".join(_CHECKSUM_CHARSET[(c >> (5 * (7 - i))) & 31] for i in range(8))


@dataclass
class ReservesCheck:
    addresses: int = 0
    total: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _position(manifest: Manifest, descriptor: str) -> tuple[int, int] | str:
    """(chain, index) of a descriptor that is the founders' multisig there, or the reason it is not."""
    body, sep, checksum = descriptor.partition("#")
    if not sep or descriptor_checksum(body) != checksum:
        return "its checksum is missing or wrong"
    head, tail = WRAPS[manifest.script_type]
    prefix = f"{head}sortedmulti({manifest.threshold},"
    if not body.startswith(prefix) or not body.endswith(")" + tail):
        return f"it is not {head}sortedmulti({manifest.threshold},...){tail}"
    keys = body[len(prefix) : -len(")" + tail)].split(",")
    founders = [f.xpub.rsplit("]", 1)[-1] for f in manifest.founders]
    parsed = [_KEY.fullmatch(k) for k in keys]
    if len(keys) != len(founders) or not all(parsed):
        return f"it does not hold the {len(founders)} founders' keys at one /CHAIN/INDEX"
    found = [(m.group(1), int(m.group(2)), int(m.group(3))) for m in parsed if m]
    if [xpub for xpub, _, _ in found] != founders:
        return "its keys are not the founders' keys of the manifest, in its order"
    places = {(chain, index) for _, chain, index in found}
    if len(places) != 1:
        return "its keys are derived at different positions"
    ((chain, index),) = places
    if chain not in (0, 1) or not 0 <= index < HARDENED:
        return f"position {chain}/{index} is not a receive or change address"
    return chain, index


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _claims(manifest: Manifest) -> tuple[tuple[int, int], list[str], str]:
    return (
        (manifest.threshold, manifest.n),
        sorted(f.xpub.rsplit("]", 1)[-1] for f in manifest.founders),
        ADDR_TYPES[manifest.script_type],
    )


def _check_policies(manifests: Sequence[Manifest], doc: dict[str, Any], problems: list[str]) -> None:
    """The top-level claim and xpubs are the newest policy's; after a rotation ``policies`` lists
    every policy's, first to newest."""
    newest = manifests[-1]
    if doc.get("chain") != CORE_CHAIN[newest.network]:
        problems.append(f"chain is {doc.get('chain')!r}, the manifest's network is {newest.network}")
    claim = doc.get("claim")
    if not isinstance(claim, dict) or (claim.get("m"), claim.get("n")) != (newest.threshold, newest.n):
        problems.append(f"claim is {claim!r}, the manifest is {newest.threshold} of {newest.n}")
    xpubs = doc.get("xpub")
    if not isinstance(xpubs, list) or sorted(str(x) for x in xpubs) != _claims(newest)[1]:
        problems.append("xpub does not list exactly the founders' keys of the manifest")
    if len(manifests) == 1:
        return
    listed = doc.get("policies")
    if not isinstance(listed, list) or len(listed) != len(manifests):
        problems.append(f"policies must list the {len(manifests)} policies of the manifests given")
        return
    for n, (entry, m) in enumerate(zip(listed, manifests, strict=True)):
        (mn, keys, addr_type) = _claims(m)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("claim"), dict)
            or (entry["claim"].get("m"), entry["claim"].get("n")) != mn
            or not isinstance(entry.get("xpub"), list)
            or sorted(str(x) for x in entry["xpub"]) != keys
            or entry.get("addr_type") != addr_type
        ):
            problems.append(f"policies[{n}] is not the policy of manifest {n + 1}")


def _placed(manifests: Sequence[Manifest], descriptor: str) -> tuple[Manifest, tuple[int, int]] | str:
    """The manifest whose multisig the descriptor is, and its position; or why none."""
    reasons = []
    for m in manifests:
        where = _position(m, descriptor)
        if not isinstance(where, str):
            return m, where
        reasons.append(where)
    return reasons[0] if len(manifests) == 1 else "; ".join(dict.fromkeys(reasons))


def check_proof(manifests: Manifest | Sequence[Manifest], doc: Any) -> ReservesCheck:
    """Every way the proof ``doc`` (its parsed JSON/YAML) is not the founders' multisig: of the
    one manifest, or of any of ``manifests`` (a store that rotated its keys: first to newest)."""
    every = [manifests] if isinstance(manifests, Manifest) else list(manifests)
    report = ReservesCheck()
    problems = report.problems
    if not isinstance(doc, dict):
        problems.append("the proof is not a mapping")
        return report
    _check_policies(every, doc, problems)
    if doc.get("keys") not in ([], None):
        problems.append("keys lists fixed public keys: custody's addresses have none")
    entries = doc.get("address")
    if not isinstance(entries, list):
        problems.append("address is not a list")
        return report
    seen: set[tuple[int, int]] = set()
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"address entry {n} is not a mapping")
            continue
        addr = str(entry.get("addr"))
        balance = _count(entry.get("balance"))
        if balance is None or balance <= 0:
            problems.append(f"{addr}: balance {entry.get('balance')!r} is not a positive number of satoshis")
        else:
            report.total += balance
        placed = _placed(every, str(entry.get("script")))
        if isinstance(placed, str):
            problems.append(f"{addr}: its descriptor is not the founders' multisig: {placed}")
            continue
        manifest, where = placed
        if entry.get("addr_type") != ADDR_TYPES[manifest.script_type]:
            problems.append(f"{addr}: addr_type is {entry.get('addr_type')!r}, not {ADDR_TYPES[manifest.script_type]}")
        if where in seen:
            problems.append(f"{addr}: position {where[0]}/{where[1]} is listed twice")
        seen.add(where)
        for reason in verify_address(manifest, where[0], where[1], addr):
            problems.append(f"{addr}: {reason}")
        report.addresses += 1
    if _count(doc.get("total")) != report.total:
        problems.append(f"total is {doc.get('total')!r}, the balances add up to {report.total}")
    return report
