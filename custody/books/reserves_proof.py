"""Proof of reserves in BitMEX's format: every custody address holding coins at a height.

The file is what BitMEX's ``validate_reserves.py`` (``BitMEX/proof-of-reserves-liabilities``)
reads with a YAML parser; custody writes it in YAML's JSON-compatible form, so that any JSON
reader reads it too (docs/FORMATS.md)::

    {"chain": "main", "height": 840000, "block_hash": "…",
     "claim": {"m": 2, "n": 3}, "keys": [], "xpub": ["xpub6…", "xpub6…", "xpub6…"],
     "total": 150000000,
     "address": [{"addr_type": "multisig_wsh", "addr": "bc1q…",
                  "script": "wsh(sortedmulti(2,[fp/48'/0'/0'/2']xpub6…/0/7,…))#checksum",
                  "balance": 100000000}, …]}

Our addresses are HD-derived, with other keys at every index, so BitMEX's fixed-key entry
types (``sh``, ``sh_wsh``, ``wsh``: a script of known public keys) do not fit them; its
descriptor-typed entries (``addr_type`` starting ``multisig_``) do: ``script`` is the
address's output descriptor, which must contain one of the listed ``xpub`` (the founders'
account keys), and which the validator hands to the node's ``scantxoutset`` at ``height``.
Each descriptor is derived here from the policy, never read from the store; an address
whose stored script is not its derivation is left out and reported (its coins are not
provably ours). ``block_hash`` is custody's addition; the validator ignores it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custody.bitcoin.descriptors import add_checksum
from custody.bitcoin.script import ScriptType
from custody.chain.node import CORE_CHAIN
from custody.chain.types import Snapshot
from custody.control.epochs import Derivers, Epoch
from custody.errors import InputError, VerificationFailed
from custody.files import LIABILITIES_MAX, read_limited_text
from custody.issuance.verification import load_auditor_chain
from custody.policy.model import Policy
from custody.verify import reserves as reserves_checker

ADDR_TYPES = {
    ScriptType.P2WSH: "multisig_wsh",
    ScriptType.P2SH_P2WSH: "multisig_sh_wsh",
    ScriptType.P2SH: "multisig_sh",
}


def address_descriptor(policy: Policy, chain: int, index: int) -> str:
    """The output descriptor of the address at ``chain``/``index``, with its checksum."""
    keys = ",".join(f"{f.key}/{chain}/{index}" for f in policy.founders)
    return add_checksum(policy.script_type.wrap(f"sortedmulti({policy.threshold},{keys})"))


@dataclass(frozen=True)
class StoredAddress:
    chain: int
    index: int
    address: str
    script_pubkey: str  # hex, as the store has it


@dataclass
class ReservesProof:
    document: dict[str, Any]
    total: int
    outputs: int
    unproven: list[str] = field(default_factory=list)  # stored addresses whose script is not their derivation

    def text(self) -> str:
        return json.dumps(self.document, indent=1) + "\n"


def _policy_claim(policy: Policy) -> dict[str, Any]:
    return {
        "claim": {"m": policy.threshold, "n": policy.n},
        "xpub": [f.key.xpub.serialize() for f in policy.founders],
        "addr_type": ADDR_TYPES[policy.script_type],
    }


def build(every: Sequence[Epoch], addresses: Sequence[StoredAddress], snapshot: Snapshot) -> ReservesProof:
    """The proof of the coins in ``snapshot`` at ``addresses`` (those holding none are not listed).

    Each address is proven with the policy of its epoch (``every``: the store's policies, first
    to newest); the top-level claim and xpubs are the newest policy's and, after a rotation,
    ``policies`` lists every policy's (docs/FORMATS.md)."""
    held: dict[str, tuple[int, int]] = {}
    for u in snapshot.utxos:
        amount, count = held.get(u.script_pubkey.hex(), (0, 0))
        held[u.script_pubkey.hex()] = (amount + u.amount, count + 1)
    derivers = Derivers(every)
    entries: list[tuple[int, int, dict[str, Any]]] = []
    unproven: list[str] = []
    total = outputs = 0
    for a in addresses:
        if a.script_pubkey not in held:
            continue
        amount, count = held.pop(a.script_pubkey)
        derived = derivers.derive(a.chain, a.index)
        policy = derivers.policy(a.chain, a.index)
        if derived.script_pubkey.hex() != a.script_pubkey or derived.address != a.address:
            unproven.append(
                f"address {a.address} at {a.chain}/{a.index} in the store is not the policy's address there "
                f"({derived.address}); its {amount} sat are not counted"
            )
            continue
        total += amount
        outputs += count
        entry = {
            "addr_type": ADDR_TYPES[policy.script_type],
            "addr": a.address,
            "script": address_descriptor(policy, a.chain, a.index),
            "balance": amount,
        }
        entries.append((a.chain, a.index, entry))
    entries.sort(key=lambda e: (e[0], e[1]))
    newest = every[-1].policy
    document = {
        "chain": CORE_CHAIN[newest.network.name],
        "height": snapshot.height,
        "block_hash": snapshot.block_hash,
        "claim": {"m": newest.threshold, "n": newest.n},
        "keys": [],
        "xpub": [f.key.xpub.serialize() for f in newest.founders],
        "total": total,
        "address": [e for _, _, e in entries],
    }
    if len(every) > 1:
        document["policies"] = [_policy_claim(e.policy) | {"manifest_digest": e.manifest.digest} for e in every]
    return ReservesProof(document, total, outputs, unproven)


def verify_file(manifest_paths: Sequence[Path], proof_path: Path) -> dict[str, Any]:
    """An auditor's check of a proof of reserves against the founders' manifests (custody.verify.reserves):
    the first, then each rotation, in order.

    Returns the report; raises InputError for an unreadable manifest or proof (custody's
    JSON form of the YAML), VerificationFailed listing what is not the founders' multisig.
    """
    manifests = [d.manifest for d in load_auditor_chain(manifest_paths)]
    try:
        doc = json.loads(read_limited_text(proof_path, LIABILITIES_MAX, "proof of reserves"))
    except FileNotFoundError:
        raise InputError(f"proof of reserves {proof_path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"proof of reserves {proof_path} is not readable JSON: {exc}") from None
    report = reserves_checker.check_proof(manifests, doc)
    if not report.ok:
        shown = "; ".join(report.problems[:10])
        more = f" (and {len(report.problems) - 10} more)" if len(report.problems) > 10 else ""
        raise VerificationFailed(f"the proof of reserves is not the founders' multisig: {shown}{more}")
    return {
        "ok": True,
        "chain": doc.get("chain"),
        "height": doc.get("height"),
        "block_hash": doc.get("block_hash"),
        "addresses": report.addresses,
        "total_sat": report.total,
    }
