"""PSBT finalizer and extractor (BIP-174): every signature checked before it is used."""

from __future__ import annotations

from typing import Any

from bitcoin.core import COutPoint, CScript, CScriptWitness, CTransaction, CTxIn, CTxInWitness, CTxWitness

from custody.bitcoin.psbt.maps import Psbt, PsbtInput, _copy_tx, without_cycle_collection
from custody.bitcoin.psbt.sighash import SignatureChecks, _Bip143, _sighash, _signature_problem, _spend_info
from custody.bitcoin.script import ScriptType, parse_multisig, push
from custody.errors import InputError


@without_cycle_collection
def finalize(psbt: Psbt, checks: SignatureChecks | None = None) -> Psbt:
    """Return a finalized copy of ``psbt`` (the BIP-174 input finalizer); ``psbt`` is unchanged.

    For each input, every partial signature is checked (strict DER, SIGHASH_ALL, low-S,
    valid for the input's digest) and the first m valid ones, in script key order, make:

    * p2wsh:      witness ``[<> <sig_1> .. <sig_m> <witness script>]``
    * p2sh-p2wsh: the same witness, scriptSig ``<redeem script>``
    * p2sh:       scriptSig ``OP_0 <sig_1> .. <sig_m> <redeem script>``

    Then the input keeps only its UTXOs, final scripts, proprietary and unknown records.
    Inputs finalized already keep their final scripts (they are not checked again).
    Raises InputError naming the input when it has fewer than m valid signatures of
    distinct keys, or cannot be checked. ``checks`` (:class:`SignatureChecks`), handed to
    :func:`valid_signers` of the same PSBT before, saves verifying each signature again: the
    digests are computed afresh here, and a signature is answered from it only for the very
    same key, signature and digest.
    """
    inputs: list[PsbtInput] = []
    cache = _Bip143(psbt.tx)
    keys = checks if checks is not None else SignatureChecks(remember=False)
    for i, inp in enumerate(psbt.inputs):
        if inp.is_finalized:
            inputs.append(_kept(inp, inp.final_script_sig, inp.final_script_witness))
            continue
        spend = _spend_info(psbt, i)
        multisig = parse_multisig(spend.script)
        digest = _sighash(psbt, i, spend, cache)
        sigs: list[bytes] = []
        problems: list[str] = []
        for pub in multisig.pubkeys:
            sig = inp.partial_sigs.get(pub)
            if sig is None:
                continue
            problem = _signature_problem(pub, sig, digest, keys)
            if problem is not None:
                problems.append(f"{pub.hex()}: {problem}")
            elif len(sigs) < multisig.threshold:
                sigs.append(sig)
        if len(sigs) < multisig.threshold:
            detail = f" ({'; '.join(problems)})" if problems else ""
            raise InputError(
                f"input {i}: {len(sigs)} valid signature(s) of distinct keys, its "
                f"{multisig.threshold}-of-{len(multisig.pubkeys)} script needs "
                f"{multisig.threshold}{detail}"
            )
        if spend.kind is ScriptType.P2SH:
            inputs.append(_kept(inp, b"".join(push(x) for x in [b"", *sigs, spend.script]), None))
        else:
            script_sig = push(spend.redeem_script) if spend.redeem_script is not None else None  # p2sh-p2wsh
            inputs.append(_kept(inp, script_sig, (b"", *sigs, spend.script)))
    return Psbt(
        tx=_copy_tx(psbt.tx),
        inputs=inputs,
        outputs=[out.copy() for out in psbt.outputs],
        xpubs=dict(psbt.xpubs),
        version=psbt.version,
        proprietary=dict(psbt.proprietary),
        unknown=dict(psbt.unknown),
    )


def _kept(inp: PsbtInput, final_script_sig: bytes | None, final_script_witness: tuple[bytes, ...] | None) -> PsbtInput:
    """A finalized input: what BIP-174 keeps of ``inp`` (its UTXOs, proprietary and unknown
    records) and the final scripts; the signing fields (partial signatures, derivations, sighash
    type, redeem and witness scripts) are left behind, never copied to be cleared."""
    return PsbtInput(
        non_witness_utxo=inp.non_witness_utxo,  # immutable CTransaction: shared, as copy() shares it
        witness_utxo=inp.witness_utxo,
        final_script_sig=final_script_sig,
        final_script_witness=final_script_witness,
        proprietary=dict(inp.proprietary),
        unknown=dict(inp.unknown),
    )


def _pushes(scope: str, script: bytes) -> list[bytes]:
    """The data of a push-only script written with minimal pushes (as :func:`push` writes them).

    Raises InputError for any other opcode or a non-minimal push.
    """
    items: list[bytes] = []
    pos = 0
    while pos < len(script):
        op = script[pos]
        if op == 0:
            size, start = 0, pos + 1
        elif op < 0x4C:
            size, start = op, pos + 1
        elif op == 0x4C and pos + 1 < len(script):
            size, start = script[pos + 1], pos + 2
        elif op == 0x4D and pos + 2 < len(script):
            size, start = int.from_bytes(script[pos + 1 : pos + 3], "little"), pos + 3
        else:
            raise InputError(f"{scope}: its final scriptSig is not a sequence of data pushes")
        data = script[start : start + size]
        if len(data) != size or push(data) != script[pos : start + size]:
            raise InputError(f"{scope}: its final scriptSig has a truncated or non-minimal push")
        items.append(data)
        pos = start + size
    return items


def final_signatures(template: Psbt, i: int, finalized: PsbtInput) -> dict[bytes, bytes]:
    """The signatures another finalizer put into ``finalized``'s final scriptSig / scriptWitness,
    as partial signatures (public key -> signature) of ``template``'s input ``i``.

    ``template`` carries what the finalizer dropped: the UTXO and the redeem and witness scripts.
    The final scripts must be exactly the m-of-n spend :func:`finalize` writes for that script
    (``<> <sig_1> .. <sig_m> <script>``, in the witness or the scriptSig, with the redeem script
    for p2sh-p2wsh), and every signature must be a valid SIGHASH_ALL signature of one of the
    script's keys, in the script's key order (as OP_CHECKMULTISIG matches them).
    Raises InputError naming the input otherwise: a finalized input is never silently dropped.
    """
    scope = f"input {i}"
    spend = _spend_info(template, i)
    multisig = parse_multisig(spend.script)
    witness = finalized.final_script_witness
    script_sig = finalized.final_script_sig or b""
    if spend.kind is ScriptType.P2SH:
        if witness:
            raise InputError(f"{scope}: a final scriptWitness on a p2sh (non-witness) input")
        stack = _pushes(scope, script_sig)
    else:
        expected_sig = push(spend.redeem_script) if spend.redeem_script is not None else b""
        if script_sig != expected_sig:
            raise InputError(f"{scope}: its final scriptSig is not the one a {spend.kind} spend of this input has")
        stack = list(witness or ())
    if len(stack) < 2 or stack[0] != b"" or stack[-1] != spend.script:
        raise InputError(
            f"{scope}: its final script is not a spend of this input's {multisig.threshold}-of-"
            f"{len(multisig.pubkeys)} multisig script (dummy, signatures, script)"
        )
    sigs = stack[1:-1]
    if len(sigs) != multisig.threshold:
        raise InputError(
            f"{scope}: its final script has {len(sigs)} signature(s); the script takes {multisig.threshold}"
        )
    digest = _sighash(template, i, spend, _Bip143(template.tx))
    found: dict[bytes, bytes] = {}
    keys = iter(multisig.pubkeys)
    for n, sig in enumerate(sigs):
        for pub in keys:  # OP_CHECKMULTISIG: each signature matches a later key than the one before
            if _signature_problem(pub, sig, digest) is None:
                found[pub] = sig
                break
        else:
            raise InputError(
                f"{scope}: signature {n + 1} of its final script is no valid signature of this "
                "transaction by the script's keys (in their order)"
            )
    return found


def extract(psbt: Psbt) -> Any:
    """Return the network transaction (``bitcoin.core.CTransaction``) of a finalized PSBT.

    Raises InputError naming the first input that is not finalized.
    """
    psbt.check_maps()
    vin = []
    wits = []
    for i, (txin, inp) in enumerate(zip(psbt.tx.vin, psbt.inputs, strict=True)):
        if not inp.is_finalized:
            raise InputError(f"input {i} is not finalized")
        # immutable inputs, as CTransaction would copy them into (it keeps a CTxIn as it is)
        vin.append(CTxIn(COutPoint.from_outpoint(txin.prevout), CScript(inp.final_script_sig or b""), txin.nSequence))
        wits.append(CTxInWitness(CScriptWitness(list(inp.final_script_witness or ()))))
    return CTransaction(vin, psbt.tx.vout, psbt.tx.nLockTime, psbt.tx.nVersion, CTxWitness(wits))
