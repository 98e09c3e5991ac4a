"""A withdrawal's PSBT: ``export_psbt`` writes it for the offline signer (``custody.withdraw.signer``)
with the records it checks, ``import_psbt`` merges the founders' signatures from it, ``finalize``
builds the final transaction. Every step refuses while trading is halted and is idempotent.
"""

# size(build_psbt): the PSBT's global, input and output records and the proprietary records the
#   offline signer checks, written in the order the signer reads them

from __future__ import annotations

import json
from typing import Any

from bitcoin.core import CMutableTransaction, CTransaction, b2lx, b2x, x
from sqlmodel import Session, col, select

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.keys import b58check_decode
from custody.bitcoin.script import ScriptType

# Withdrawals spend and change to the newest policy only; after a key rotation the older
# policies' coins move by the sweep (custody.control.epochs).
from custody.control import audit_log, epochs, halt
from custody.control import roster as roster_lib
from custody.control import rulebook as rulebook_lib
from custody.control.epochs import current_policy as policy_from_session
from custody.errors import (
    ApprovalError,
    Conflict,
    InputError,
    StorageError,
)
from custody.faults import crash_point
from custody.policy.model import CHANGE, Policy
from custody.store.db import Database
from custody.store.models import AddressRow, RosterRow, WithdrawalInput, WithdrawalRow
from custody.withdraw import replacements
from custody.withdraw.records import (
    _approvals,
    _change_position,
    _enforce,
    _get,
    _inputs,
    _members,
    _not_in_batch,
    _require_approved,
    _summary,
    _touch,
    _tx,
    view,
)
from custody.withdraw.signer import (
    PROP_APPROVALS,
    PROP_META,
    PROP_ROSTER,
    PROP_RULEBOOKS,
    PROP_SUSPENSIONS,
    PROPRIETARY_ID,
)
from custody.withdraw.states import (
    APPROVED,
    BATCH,
    BROADCAST,
    CONFIRMED,
    REQUESTED,
    SIGNED,
    SWEEP,
    Event,
    can,
    next_state,
)

# ---------------------------------------------------------------- 3. export (PSBT)


def _origin_of(policy: Policy, founder_index: int) -> tuple[bytes, tuple[int, ...]]:
    key = policy.founders[founder_index].key
    if key.origin is not None:
        return key.origin.fingerprint, key.origin.path
    return key.xpub.fingerprint, ()


def _derivations(policy: Policy, chain: int, index: int) -> dict[bytes, psbt_lib.KeyOrigin]:
    out = {}
    for i, f in enumerate(policy.founders):
        fp, path = _origin_of(policy, i)
        pub = f.key.xpub.derive((chain, index)).public_key
        out[pub] = psbt_lib.KeyOrigin(fp, (*path, chain, index))
    return out


def _scripts(policy: Policy, script: bytes) -> tuple[bytes | None, bytes | None]:
    """(redeem script, witness script) for a multisig script of the policy's type."""
    import hashlib

    if policy.script_type is ScriptType.P2SH:
        return script, None
    if policy.script_type is ScriptType.P2SH_P2WSH:
        return b"\x00\x20" + hashlib.sha256(script).digest(), script
    return None, script


def _prop(subtype: int) -> psbt_lib.ProprietaryKey:
    return psbt_lib.ProprietaryKey(PROPRIETARY_ID, subtype, b"")


def _previous_tx(wid: int, rec: WithdrawalInput) -> CTransaction:
    """The stored previous transaction of an input, checked against its outpoint and output.

    Raises StorageError when it is missing (a withdrawal requested before every input kept its
    previous transaction: cancel it and request it again) or disagrees with the input's record.
    """
    if not rec.prev_tx:
        raise StorageError(
            f"withdrawal #{wid}: input {rec.txid}:{rec.vout} has no previous transaction recorded "
            "(requested by an older custody): cancel the withdrawal and request it again"
        )
    try:
        prev = CTransaction.deserialize(x(rec.prev_tx))
    except Exception:  # noqa: BLE001 - python-bitcoinlib raises several kinds on bad bytes
        raise StorageError(f"withdrawal #{wid}: input {rec.txid}:{rec.vout}: previous transaction unreadable") from None
    if (
        b2lx(prev.GetTxid()) != rec.txid
        or rec.vout >= len(prev.vout)
        or (int(prev.vout[rec.vout].nValue), bytes(prev.vout[rec.vout].scriptPubKey).hex())
        != (rec.amount, rec.script_pubkey)
    ):
        raise StorageError(
            f"withdrawal #{wid}: the previous transaction stored for input {rec.txid}:{rec.vout} is not the one spent"
        )
    return prev


def _spent_policy(s: Session, row: WithdrawalRow) -> Policy:
    """The policy whose coins the withdrawal spends: the newest, but an older one for a sweep."""
    first = _inputs(s, row.id or 0)[:1]
    every = epochs.store_epochs(s)
    return epochs.epoch_of(every, first[0].chain, first[0].idx).policy if first else every[-1].policy


def build_psbt(s: Session, policy: Policy, row: WithdrawalRow) -> psbt_lib.Psbt:
    """The PSBT an offline signer needs, with the approval bundle in proprietary fields. Each
    input and change output carries the scripts and derivations of its own epoch's policy."""
    wid = row.id or 0
    tx = _tx(row)
    derivers = epochs.Derivers(epochs.store_epochs(s))
    policy = _spent_policy(s, row)
    p = psbt_lib.Psbt.from_unsigned_tx(CMutableTransaction.from_tx(tx))
    inputs = {f"{i.txid}:{i.vout}": i for i in _inputs(s, wid)}
    scripts = {a.script_pubkey: a for a in s.exec(select(AddressRow)).all()}
    for n, vin in enumerate(tx.vin):
        rec = inputs[f"{b2lx(vin.prevout.hash)}:{vin.prevout.n}"]
        addr = scripts[rec.script_pubkey]
        pin = p.inputs[n]
        pin.non_witness_utxo = _previous_tx(wid, rec)  # every input, segwit too
        if policy.script_type is not ScriptType.P2SH:
            pin.witness_utxo = psbt_lib.WitnessUtxo(rec.amount, bytes.fromhex(rec.script_pubkey))
        pin.redeem_script, pin.witness_script = _scripts(policy, bytes.fromhex(addr.script))
        pin.bip32_derivations = _derivations(policy, addr.chain, addr.idx)
        pin.sighash_type = 1
    change_output = None
    for n, vout in enumerate(tx.vout):
        ours = scripts.get(bytes(vout.scriptPubKey).hex())
        if ours is not None and ours.chain == CHANGE:
            change_output = n
            own = derivers.policy(ours.chain, ours.idx)
            p.outputs[n].redeem_script, p.outputs[n].witness_script = _scripts(own, bytes.fromhex(ours.script))
            p.outputs[n].bip32_derivations = _derivations(own, ours.chain, ours.idx)
    for i, f in enumerate(policy.founders):
        p.xpubs[b58check_decode(f.key.xpub.serialize())] = psbt_lib.KeyOrigin(*_origin_of(policy, i))
    meta = {
        "version": 1,
        "network": policy.network.name,
        "withdrawal_id": wid,
        "requester": row.requester,
        "request_signature": row.request_signature,
        "account": row.account,
        "destination": row.destination,
        "amount": row.amount,
        "change_output": change_output,
        "policy": policy.to_manifest(),
    } | replacements.psbt_meta(s, row)
    if row.kind == SWEEP:
        meta["kind"] = SWEEP
    if row.kind == BATCH:
        meta["kind"] = BATCH
        meta["members"] = [
            {
                "withdrawal_id": m.id,
                "requester": m.requester,
                "request_signature": m.request_signature,
                "account": m.account,
                "unsigned_tx": m.unsigned_tx,
                "amounts": [a for _, a in _summary(policy, m, _inputs(s, m.id or 0)).inputs],
                "change_output": _change_position(s, m),
                "approvals": [a.to_dict() for a in _approvals(s, m.id or 0)],
            }
            for m in _members(s, wid)
        ]
    p.proprietary[_prop(PROP_META)] = json.dumps(meta, sort_keys=True).encode()
    p.proprietary[_prop(PROP_APPROVALS)] = json.dumps([a.to_dict() for a in _approvals(s, wid)]).encode()
    newest = s.exec(select(RosterRow).order_by(col(RosterRow.serial).desc())).first()
    if newest is None:
        raise ApprovalError("there is no founders-signed roster: the offline signer would refuse this PSBT")
    p.proprietary[_prop(PROP_ROSTER)] = newest.document.encode()
    p.proprietary[_prop(PROP_SUSPENSIONS)] = json.dumps(roster_lib.suspension_documents(s)).encode()
    p.proprietary[_prop(PROP_RULEBOOKS)] = json.dumps(rulebook_lib.chain_documents(s)).encode()
    return p


def export_psbt(db: Database, withdrawal_id: int) -> psbt_lib.Psbt:
    """The PSBT of an approved withdrawal, carrying the signatures merged so far.

    Raises HaltedError, NotFound, ApprovalError (fewer valid approvals than its tier needs),
    PolicyViolation (a rule of the rulebook), Conflict (already broadcast or failed).
    """
    with db.transaction() as s:
        halt.guard(s)
        policy = policy_from_session(s)
        row = _get(s, withdrawal_id)
        _not_in_batch(row)
        if row.status not in (APPROVED, SIGNED):
            if row.status == REQUESTED:
                _require_approved(s, policy, row)
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status}; nothing to sign")
        _require_approved(s, policy, row)
        _enforce(s, policy, row)
        fresh = build_psbt(s, policy, row)
        if row.psbt:
            fresh = psbt_lib.combine([fresh, _signatures_only(psbt_lib.Psbt.from_base64(row.psbt))])
        audit_log.append(s, "withdrawal.exported", "operator", {"withdrawal_id": withdrawal_id})
        return fresh


def _signatures_only(p: psbt_lib.Psbt) -> psbt_lib.Psbt:
    out = psbt_lib.Psbt.from_unsigned_tx(p.tx)
    for mine, theirs in zip(out.inputs, p.inputs, strict=True):
        mine.partial_sigs = dict(theirs.partial_sigs)
    return out


# ---------------------------------------------------------------- 5. import, finalize, broadcast


def _founders_signed(policy: Policy, p: psbt_lib.Psbt, valid: list[set[bytes]]) -> list[str]:
    """Founders with a valid signature (``valid``: psbt.valid_signers) on every input."""
    names = []
    for i, f in enumerate(policy.founders):
        fingerprint = _origin_of(policy, i)[0]
        if all(
            any(origin.fingerprint == fingerprint and pub in valid[n] for pub, origin in pin.bip32_derivations.items())
            for n, pin in enumerate(p.inputs)
        ):
            names.append(f.name)
    return names


def import_psbt(db: Database, withdrawal_id: int, data: bytes) -> dict[str, Any]:
    """Merge a signed PSBT's signatures into the withdrawal, those of inputs another signer has
    finalized included (read out of their final scripts and checked, never dropped).

    Raises HaltedError, NotFound, InputError (another transaction, bad signatures, a final
    script that is not this input's multisig spend),
    ApprovalError, Conflict.
    """
    incoming = psbt_lib.Psbt.parse(data)
    with db.transaction() as s:
        halt.guard(s)
        row = _get(s, withdrawal_id, lock=True)
        policy = _spent_policy(s, row)
        _not_in_batch(row)
        if row.status not in (APPROVED, SIGNED):
            raise Conflict(f"withdrawal #{withdrawal_id} is {row.status}; signatures cannot be imported")
        _require_approved(s, policy, row)
        if incoming.unsigned_tx_bytes() != x(row.unsigned_tx):
            raise InputError(f"this PSBT is for another transaction than withdrawal #{withdrawal_id}'s")
        base = build_psbt(s, policy, row)
        theirs = _signatures_only(incoming)
        for n, pin in enumerate(incoming.inputs):
            if pin.is_finalized:  # another finalizer (the node's walletprocesspsbt) put them in its final scripts
                theirs.inputs[n].partial_sigs.update(psbt_lib.final_signatures(base, n, pin))
        parts = [base, theirs]
        if row.psbt:
            parts.append(_signatures_only(psbt_lib.Psbt.from_base64(row.psbt)))
        merged = psbt_lib.combine(parts)
        valid = psbt_lib.valid_signers(merged)
        for n, pin in enumerate(merged.inputs):
            for pub in pin.partial_sigs:
                if pub not in pin.bip32_derivations or pub not in valid[n]:
                    raise InputError(f"input {n}: a signature is not a valid founder signature of this transaction")
        signers = _founders_signed(policy, merged, valid)
        row.psbt = _signatures_only(merged).to_base64()
        if len(signers) >= policy.threshold and can(row.status, Event.SIGNED):
            _touch(s, row, next_state(row.status, Event.SIGNED))
        else:
            _touch(s, row)
        audit_log.append(
            s, "withdrawal.signatures_imported", "operator", {"withdrawal_id": withdrawal_id, "founders": signers}
        )
        result = view(s, policy, row)
        result["founders_signed"] = signers
    crash_point("withdrawal.imported")
    return result


def finalize(db: Database, withdrawal_id: int) -> dict[str, Any]:
    """Build the final transaction from the merged signatures.

    Raises HaltedError, NotFound, ApprovalError (approvals, or fewer than m founders),
    Conflict.
    """
    with db.transaction() as s:
        halt.guard(s)
        row = _get(s, withdrawal_id, lock=True)
        policy = _spent_policy(s, row)
        _not_in_batch(row)
        if row.final_tx and row.status in (SIGNED, BROADCAST, CONFIRMED):
            return view(s, policy, row)  # idempotent
        if row.status != SIGNED:
            raise ApprovalError(
                f"withdrawal #{withdrawal_id} is {row.status}: it needs {policy.threshold} founders' signatures"
            )
        _require_approved(s, policy, row)
        merged = psbt_lib.combine([build_psbt(s, policy, row), psbt_lib.Psbt.from_base64(row.psbt or "")])
        checks = psbt_lib.SignatureChecks()  # each signature verified once, for both questions
        signers = _founders_signed(policy, merged, psbt_lib.valid_signers(merged, checks))
        if len(signers) < policy.threshold:
            raise ApprovalError(
                f"withdrawal #{withdrawal_id} has {len(signers)} founders' signatures "
                f"({', '.join(signers) or 'none'}); {policy.threshold} are needed"
            )
        final = psbt_lib.extract(psbt_lib.finalize(merged, checks))
        row.final_tx = b2x(final.serialize())
        row.txid = b2lx(final.GetTxid())
        _touch(s, row)
        audit_log.append(s, "withdrawal.finalized", "operator", {"withdrawal_id": withdrawal_id, "txid": row.txid})
        result = view(s, policy, row)
    crash_point("withdrawal.finalized")
    return result
