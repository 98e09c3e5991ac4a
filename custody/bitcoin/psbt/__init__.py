"""Partially signed bitcoin transactions (BIP-174, version 0) for m-of-n multisig inputs.

The roles of BIP-174 for the three script types custody spends from (``p2wsh``,
``p2sh-p2wsh`` and ``p2sh``, each around one ``OP_CHECKMULTISIG`` script):

* creator: :meth:`Psbt.from_unsigned_tx`;
* parser / serializer: :meth:`Psbt.parse`, :meth:`Psbt.from_base64`, :meth:`Psbt.serialize`,
  :meth:`Psbt.to_base64`: strict; fields we do not know (and proprietary ones) are kept and
  written back byte for byte;
* signer: :func:`sign_input`, :func:`sign` (SIGHASH_ALL only, RFC 6979, low-S, DER);
* combiner: :func:`combine`;
* finalizer: :func:`finalize` (checks every signature before it uses it), and back:
  :func:`final_signatures` reads the signatures out of another finalizer's final scripts;
* extractor: :func:`extract`.

Every problem with the data is an :class:`~custody.errors.InputError` whose message names the
map (``global map``, ``input 3``, ``output 0``) and the field.

Serialization order is Bitcoin Core's: known fields by key type; partial signatures by the
HASH160 of their public key (Core's ``CKeyID`` order); BIP-32 derivations by public key;
extended public keys by their 78 bytes; then proprietary and unknown records by key bytes.

Segwit sighashes (BIP-143) are computed here, with hashPrevouts, hashSequence and
hashOutputs computed once per transaction rather than once per input as python-bitcoinlib's
``SignatureHash`` does (quadratic for large transactions); the test suite cross-checks the
two. Legacy (``p2sh``) sighashes are python-bitcoinlib's.
"""

from bitcoin.core.script import SIGHASH_ALL

from custody.bitcoin.psbt.finalize import extract, final_signatures, finalize
from custody.bitcoin.psbt.maps import KeyOrigin, ProprietaryKey, Psbt, PsbtInput, PsbtOutput, WitnessUtxo, combine
from custody.bitcoin.psbt.sighash import SignatureChecks, sighash_for_input, sign, sign_input, valid_signers
from custody.bitcoin.script import Multisig, ScriptType, is_strict_der, parse_multisig

__all__ = [
    "SIGHASH_ALL",
    "KeyOrigin",
    "Multisig",
    "ProprietaryKey",
    "Psbt",
    "PsbtInput",
    "PsbtOutput",
    "SignatureChecks",
    "ScriptType",
    "WitnessUtxo",
    "combine",
    "extract",
    "final_signatures",
    "finalize",
    "is_strict_der",
    "parse_multisig",
    "sighash_for_input",
    "sign",
    "sign_input",
    "valid_signers",
]
