"""The offline founder signer: no store, no node; only the PSBT, a key file and the manifest.

Before it adds a single signature it checks, from the PSBT and the pinned founders'
manifest alone, that:

* the PSBT is for this policy and network, and the key is one of its founders';
* at least two valid approvals by distinct, enabled employees of the registry the PSBT
  carries, none of them the requester, cover exactly this transaction;
* every input spends one of the policy's own scripts, re-derived here from the manifest;
* the change output (if any) re-derives from the policy.

Signatures are deterministic (RFC 6979) and low-S. Signing twice adds nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from bitcoin.core import CTransaction, b2lx
from bitcoin.core.serialize import SerializationError

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.script import ScriptType
from custody.errors import ApprovalError, Conflict, InputError
from custody.identity.approvals import (
    Approval,
    ApprovalCheck,
    Member,
    RegistryEntry,
    TxSummary,
    check_approvals,
    check_batch,
    summarize,
)
from custody.identity.keyfile import FounderKey
from custody.policy.generator import AddressDeriver, DerivedAddress
from custody.policy.model import BRANCHES, Policy, policy_from_manifest

# The PSBT's proprietary records (identifier "custody"), written by custody.withdraw.queue:
PROPRIETARY_ID = b"custody"
PROP_META = 0  # JSON: network, withdrawal (or batch members), change output, the policy's manifest
PROP_APPROVALS = 1  # JSON: the approvals of the withdrawal
PROP_REGISTRY = 2  # JSON: the employee registry the approvals were checked against


@dataclass(frozen=True)
class SignResult:
    withdrawal_id: int
    founder: str
    signatures_added: int
    approvals: tuple[str, ...]


def _prop_json(p: psbt_lib.Psbt, subtype: int, what: str) -> Any:
    raw = p.proprietary.get(psbt_lib.ProprietaryKey(PROPRIETARY_ID, subtype, b""))
    if raw is None:
        raise InputError(f"the PSBT carries no {what}: export it with `custody withdraw export`")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a 5000-digit number, nested too deep
        raise InputError(f"the PSBT's {what} is not valid JSON") from None


def _enabled(value: object) -> bool:
    """A registry entry's ``enabled``: JSON true or false only (``"false"`` is not true)."""
    if not isinstance(value, bool):
        raise TypeError(f"'enabled' must be true or false, not {value!r}")
    return value


def _same_policy(a: Policy, b: Policy) -> bool:
    return (
        a.network == b.network
        and a.threshold == b.threshold
        and a.script_type == b.script_type
        and sorted(f.key.xpub.identity() for f in a.founders) == sorted(f.key.xpub.identity() for f in b.founders)
    )


def _our_position(derivations: dict[bytes, psbt_lib.KeyOrigin], founder: FounderKey) -> tuple[int, int] | None:
    """(chain, index) of this founder's key among an input's or output's derivations."""
    fp = founder.master.fingerprint
    base = founder.account_path
    for origin in derivations.values():
        if origin.fingerprint == fp and origin.path[: len(base)] == base and len(origin.path) == len(base) + 2:
            chain, index = origin.path[-2:]
            if chain in BRANCHES:
                return chain, index
    return None


def _expect(derived: DerivedAddress, script_type: ScriptType, redeem: bytes | None, witness: bytes | None) -> bool:
    if script_type is ScriptType.P2SH:
        return redeem == derived.script and witness is None
    if script_type is ScriptType.P2WSH:
        return witness == derived.script and redeem is None
    return witness == derived.script and redeem == b"\x00\x20" + hashlib.sha256(derived.script).digest()


def _check_batch(
    policy: Policy, meta: dict[str, Any], summary: TxSummary, change: object, registry: dict[str, RegistryEntry]
) -> ApprovalCheck:
    """A batch counts when every member is approved for its own transaction and the batch
    spends, pays and charges exactly what the members were approved for."""
    members = []
    try:
        for m in meta["members"]:
            tx = CTransaction.deserialize(bytes.fromhex(m["unsigned_tx"]))
            member_summary = summarize(policy.network.name, int(m["withdrawal_id"]), tx, [int(a) for a in m["amounts"]])
            approvals = [Approval(str(a["employee"]), str(a["pubkey"]), str(a["signature"])) for a in m["approvals"]]
            check = check_approvals(member_summary, approvals, registry, str(m["requester"]))
            change_output = m["change_output"]
            members.append(Member(member_summary, change_output if isinstance(change_output, int) else None, check))
    except (KeyError, TypeError, ValueError, OverflowError, SerializationError) as exc:
        # OverflowError: int(Infinity); SerializationError: a member's transaction does not decode
        raise InputError(f"the PSBT's batch members are malformed: {exc}") from None
    problems = check_batch(summary, change if isinstance(change, int) else None, members)
    valid = tuple(sorted({name for m in members for name in m.check.valid}))
    return ApprovalCheck(valid if not problems else (), tuple(("batch", p) for p in problems))


def check_and_sign(p: psbt_lib.Psbt, founder: FounderKey, manifest: dict[str, Any]) -> SignResult:
    """Check everything above, then add ``founder``'s signatures to every input.

    Raises InputError (not our policy, foreign input or change), ApprovalError (approvals
    missing or invalid), Conflict (this founder has signed already: nothing added).
    """
    policy = policy_from_manifest(manifest)
    meta = _prop_json(p, PROP_META, "withdrawal metadata")
    if not isinstance(meta, dict):
        raise InputError("the PSBT's withdrawal metadata is malformed")
    if meta.get("network") != policy.network.name:
        raise InputError(f"the PSBT is for network {meta.get('network')!r}, the manifest says {policy.network.name}")
    try:
        claimed = policy_from_manifest(meta.get("policy"))
    except InputError as exc:
        raise InputError(f"the PSBT's policy is unreadable: {exc}") from None
    if not _same_policy(claimed, policy):
        raise InputError("the PSBT is for another policy than the pinned founders' manifest")
    names = [f.name for f in policy.founders if f.key.xpub.identity() == founder.account.xpub.identity()]
    if not names or founder.network != policy.network:
        raise InputError("this key is not one of the policy's founders' keys")
    founder_name = names[0]
    deriver = AddressDeriver(policy)

    amounts: list[int] = []
    keys: dict[int, Any] = {}
    for n, pin in enumerate(p.inputs):
        where = _our_position(pin.bip32_derivations, founder)
        if where is None:
            raise InputError(f"input {n} is not one of our policy's scripts (no derivation for this founder)")
        derived = deriver.derive(*where)
        spent = pin.witness_utxo
        if pin.non_witness_utxo is not None:
            prevout = p.tx.vin[n].prevout
            if b2lx(pin.non_witness_utxo.GetTxid()) != b2lx(prevout.hash) or prevout.n >= len(
                pin.non_witness_utxo.vout
            ):
                raise InputError(f"input {n}: its previous transaction does not match the outpoint")
            out = pin.non_witness_utxo.vout[prevout.n]
            spent = psbt_lib.WitnessUtxo(int(out.nValue), bytes(out.scriptPubKey))
        if spent is None:
            raise InputError(f"input {n}: the amount and script it spends are missing")
        if spent.script_pubkey != derived.script_pubkey or not _expect(
            derived, policy.script_type, pin.redeem_script, pin.witness_script
        ):
            raise InputError(f"input {n} is not one of our policy's scripts at {where[0]}/{where[1]}")
        amounts.append(spent.amount)
        keys[n] = founder.master.derive((*founder.account_path, *where)).private_key()

    change = meta.get("change_output")
    for n, out in enumerate(p.outputs):
        claims = _our_position(out.bip32_derivations, founder) if out.bip32_derivations else None
        if n == change or claims is not None:
            if claims is None or claims[0] != 1:
                raise InputError(f"output {n} is marked as change but does not derive from the policy's change chain")
            derived = deriver.derive(*claims)
            if bytes(p.tx.vout[n].scriptPubKey) != derived.script_pubkey:
                raise InputError(f"output {n}: the change output is not ours (it does not re-derive from the policy)")

    withdrawal_id = meta.get("withdrawal_id")
    requester = meta.get("requester")
    if not isinstance(withdrawal_id, int) or not isinstance(requester, str):
        raise InputError("the PSBT's withdrawal metadata is malformed")
    summary = summarize(policy.network.name, withdrawal_id, p.tx, amounts)
    try:
        approvals = [
            Approval(str(a["employee"]), str(a["pubkey"]), str(a["signature"]))
            for a in _prop_json(p, PROP_APPROVALS, "approval bundle")
        ]
        registry = {
            str(e["name"]): RegistryEntry(str(e["name"]), str(e["pubkey"]), _enabled(e["enabled"]))
            for e in _prop_json(p, PROP_REGISTRY, "employee registry")
        }
    except (KeyError, TypeError):
        raise InputError("the PSBT's approval bundle or registry is malformed") from None
    if meta.get("kind") == "batch":
        check = _check_batch(policy, meta, summary, change, registry)
    else:
        check = check_approvals(summary, approvals, registry, requester)
    if not check.enough:
        raise ApprovalError(f"withdrawal #{withdrawal_id}: {check.explain()}")

    added = psbt_lib.sign(p, {key.public_key.format(compressed=True): key for key in keys.values()})
    if added == 0:
        raise Conflict(f"{founder_name} has signed this PSBT already; a founder's signatures count once")
    return SignResult(withdrawal_id, founder_name, added, check.valid)
