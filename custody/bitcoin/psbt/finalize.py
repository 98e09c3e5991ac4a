"""PSBT finalizer and extractor (BIP-174): every signature checked before it is used."""

from __future__ import annotations

from typing import Any

from bitcoin.core import CMutableTxIn, CScript, CScriptWitness, CTransaction, CTxInWitness, CTxWitness

from custody.bitcoin.psbt.maps import Psbt, PsbtInput
from custody.bitcoin.psbt.sighash import _Bip143, _sighash, _signature_problem, _spend_info
from custody.bitcoin.script import ScriptType, parse_multisig, push
from custody.errors import InputError


def finalize(psbt: Psbt) -> Psbt:
    """Return a finalized copy of ``psbt`` (the BIP-174 input finalizer); ``psbt`` is unchanged.

    For each input, every partial signature is checked (strict DER, SIGHASH_ALL, low-S,
    valid for the input's digest) and the first m valid ones, in script key order, make:

    * p2wsh:      witness ``[<> <sig_1> .. <sig_m> <witness script>]``
    * p2sh-p2wsh: the same witness, scriptSig ``<redeem script>``
    * p2sh:       scriptSig ``OP_0 <sig_1> .. <sig_m> <redeem script>``

    Then the input keeps only its UTXOs, final scripts, proprietary and unknown records.
    Inputs finalized already keep their final scripts (they are not checked again).
    Raises InputError naming the input when it has fewer than m valid signatures of
    distinct keys, or cannot be checked.
    """
    out = psbt.copy()
    cache = _Bip143(out.tx)
    for i, inp in enumerate(out.inputs):
        if inp.is_finalized:
            _clear_signing_fields(inp)
            continue
        spend = _spend_info(out, i)
        multisig = parse_multisig(spend.script)
        digest = _sighash(out, i, spend, cache)
        sigs: list[bytes] = []
        problems: list[str] = []
        for pub in multisig.pubkeys:
            sig = inp.partial_sigs.get(pub)
            if sig is None:
                continue
            problem = _signature_problem(pub, sig, digest)
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
            inp.final_script_sig = b"".join(push(x) for x in [b"", *sigs, spend.script])
            inp.final_script_witness = None
        else:
            inp.final_script_witness = (b"", *sigs, spend.script)
            if spend.redeem_script is not None:  # p2sh-p2wsh
                inp.final_script_sig = push(spend.redeem_script)
            else:
                inp.final_script_sig = None
        _clear_signing_fields(inp)
    return out


def _clear_signing_fields(inp: PsbtInput) -> None:
    """What a finalized input no longer needs (BIP-174: keep the UTXOs and unknown fields)."""
    inp.partial_sigs.clear()
    inp.bip32_derivations.clear()
    inp.sighash_type = None
    inp.redeem_script = None
    inp.witness_script = None


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
        vin.append(CMutableTxIn(txin.prevout, CScript(inp.final_script_sig or b""), txin.nSequence))
        wits.append(CTxInWitness(CScriptWitness(list(inp.final_script_witness or ()))))
    return CTransaction(vin, psbt.tx.vout, psbt.tx.nLockTime, psbt.tx.nVersion, CTxWitness(wits))
