"""PSBT signing: each input's spend checked against its UTXO and scripts (BIP-174's signer
checks), SIGHASH_ALL digests (BIP-143 for segwit with the transaction-wide hashes computed once,
python-bitcoinlib's legacy digest for p2sh), RFC 6979 low-S signatures, and signature checks."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import coincurve
from bitcoin.core import CScript
from bitcoin.core.script import SIGHASH_ALL, SignatureHash

from custody.bitcoin.encoding import hash160, ser_compact_size, sha256d
from custody.bitcoin.psbt.maps import _BYTE, _I64, Psbt, _ser_txout
from custody.bitcoin.script import ScriptType, is_low_s, is_p2sh, is_p2wsh, is_strict_der, parse_multisig
from custody.errors import InputError

_MAX_P2SH_SCRIPT = 520  # a redeem script is one push: MAX_SCRIPT_ELEMENT_SIZE
_MAX_WITNESS_SCRIPT = 3600  # MAX_STANDARD_P2WSH_SCRIPT_SIZE


class _Spend(NamedTuple):
    """What spending one input takes: script type, multisig script (script code), amount.
    (Immutable; a NamedTuple rather than a frozen dataclass: one is made per input and check.)"""

    kind: ScriptType
    script: bytes  # the witness script (segwit kinds) or the redeem script (p2sh)
    amount: int
    redeem_script: bytes | None  # p2sh and p2sh-p2wsh


def _spend_info(psbt: Psbt, i: int) -> _Spend:  # noqa: C901 - BIP-174's signer checks of one input, one after another
    """Check an input's UTXO and scripts against each other (BIP-174's signer checks)."""
    scope = f"input {i}"
    psbt.check_maps()
    if not 0 <= i < len(psbt.inputs):
        raise InputError(f"{scope} does not exist (the PSBT has {len(psbt.inputs)} inputs)")
    inp = psbt.inputs[i]
    prevout = psbt.tx.vin[i].prevout
    if inp.sighash_type is not None and inp.sighash_type != SIGHASH_ALL:
        raise InputError(f"{scope}: sighash type {inp.sighash_type:#x} requested; only SIGHASH_ALL is signed")
    nwu = inp.non_witness_utxo
    nwu_out = None
    if nwu is not None:
        if nwu.GetTxid() != bytes(prevout.hash):
            raise InputError(
                f"{scope}: non-witness UTXO is transaction {nwu.GetTxid()[::-1].hex()}, but the "
                f"input spends {bytes(prevout.hash)[::-1].hex()}"
            )
        if prevout.n >= len(nwu.vout):
            raise InputError(f"{scope}: non-witness UTXO has no output {prevout.n}")
        nwu_out = nwu.vout[prevout.n]
    wu = inp.witness_utxo
    if wu is not None:
        if nwu_out is not None and (nwu_out.nValue, bytes(nwu_out.scriptPubKey)) != (
            wu.amount,
            wu.script_pubkey,
        ):
            raise InputError(f"{scope}: witness UTXO disagrees with the non-witness UTXO")
        spk, amount = wu.script_pubkey, wu.amount
    elif nwu_out is not None:
        spk, amount = bytes(nwu_out.scriptPubKey), nwu_out.nValue
    else:
        raise InputError(f"{scope} has no UTXO (neither a witness nor a non-witness UTXO)")

    rs, ws = inp.redeem_script, inp.witness_script
    if is_p2wsh(spk):
        if rs is not None:
            raise InputError(f"{scope}: has a redeem script but spends a P2WSH output")
        if ws is None:
            raise InputError(f"{scope}: spends a P2WSH output but has no witness script")
        if hashlib.sha256(ws).digest() != spk[2:]:
            raise InputError(f"{scope}: witness script does not match the P2WSH scriptPubKey")
        return _checked(scope, _Spend(ScriptType.P2WSH, ws, amount, None))
    if is_p2sh(spk):
        if rs is None:
            raise InputError(f"{scope}: spends a P2SH output but has no redeem script")
        if hash160(rs) != spk[2:22]:
            raise InputError(f"{scope}: redeem script does not match the P2SH scriptPubKey")
        if is_p2wsh(rs):
            if ws is None:
                raise InputError(f"{scope}: spends a P2SH-P2WSH output but has no witness script")
            if hashlib.sha256(ws).digest() != rs[2:]:
                raise InputError(f"{scope}: witness script does not match the redeem script")
            return _checked(scope, _Spend(ScriptType.P2SH_P2WSH, ws, amount, rs))
        if wu is not None:
            raise InputError(f"{scope}: witness UTXO given for a non-witness (P2SH) input")
        if ws is not None:
            raise InputError(f"{scope}: witness script given for a non-witness (P2SH) input")
        return _checked(scope, _Spend(ScriptType.P2SH, rs, amount, rs))
    raise InputError(f"{scope}: scriptPubKey {spk.hex()} is none of P2WSH, P2SH-P2WSH or P2SH multisig")


def _checked(scope: str, spend: _Spend) -> _Spend:
    limit = _MAX_P2SH_SCRIPT if spend.kind is ScriptType.P2SH else _MAX_WITNESS_SCRIPT
    if len(spend.script) > limit:
        raise InputError(f"{scope}: {spend.kind} script of {len(spend.script)} bytes (at most {limit})")
    return spend


class _Bip143:
    """BIP-143 digests with the three transaction-wide hashes computed once.

    Layout of the preimage (SIGHASH_ALL): nVersion | hashPrevouts | hashSequence | outpoint |
    scriptCode | amount | nSequence | hashOutputs | nLockTime | sighash type.
    """

    def __init__(self, tx: Any) -> None:
        # Each input's outpoint and sequence serialized once: for the shared hashes and for its digest.
        self.outpoints = [bytes(t.prevout.hash) + struct.pack("<I", t.prevout.n) for t in tx.vin]
        self.sequences = [struct.pack("<I", t.nSequence) for t in tx.vin]
        self.head = (
            struct.pack("<i", tx.nVersion) + sha256d(b"".join(self.outpoints)) + sha256d(b"".join(self.sequences))
        )
        self.tail = sha256d(b"".join([_ser_txout(o.nValue, o.scriptPubKey) for o in tx.vout])) + struct.pack(
            "<II", tx.nLockTime, SIGHASH_ALL
        )

    def digest(self, i: int, script_code: bytes, amount: int) -> bytes:
        size = len(script_code)
        return sha256d(
            b"".join(
                (
                    self.head,
                    self.outpoints[i],
                    _BYTE[size] if size < 0xFD else ser_compact_size(size),
                    script_code,
                    _I64.pack(amount),
                    self.sequences[i],
                    self.tail,
                )
            )
        )


def _sighash(psbt: Psbt, i: int, spend: _Spend, cache: _Bip143) -> bytes:
    if spend.kind is ScriptType.P2SH:
        return bytes(SignatureHash(CScript(spend.script), psbt.tx, i, SIGHASH_ALL))
    return cache.digest(i, spend.script, spend.amount)


def sighash_for_input(psbt: Psbt, i: int) -> bytes:
    """The SIGHASH_ALL digest input ``i`` is signed over (32 bytes).

    BIP-143 for p2wsh and p2sh-p2wsh inputs, the legacy digest for p2sh. Raises InputError
    when the input's UTXO and scripts do not fit together (a hash mismatch, a missing or
    wrong UTXO, a sighash type other than SIGHASH_ALL, a script type we do not spend).
    """
    spend = _spend_info(psbt, i)
    return _sighash(psbt, i, spend, _Bip143(psbt.tx))


def _sign_one(psbt: Psbt, i: int, spend: _Spend, keys: Mapping[bytes, Any], cache: Callable[[], _Bip143]) -> int:
    """Add the signatures ``keys`` can make for input ``i``; return how many were added."""
    inp = psbt.inputs[i]
    added = 0
    digest: bytes | None = None
    for pub in parse_multisig(spend.script).pubkeys:
        key = keys.get(pub)
        if key is None or pub in inp.partial_sigs:
            continue  # not our key, or signed already: never sign twice
        if digest is None:
            digest = _sighash(psbt, i, spend, cache())
        inp.partial_sigs[pub] = key.sign(digest, hasher=None) + bytes([SIGHASH_ALL])
        added += 1
    return added


def sign_input(psbt: Psbt, i: int, privkey: Any) -> bool:
    """Add ``privkey``'s signature (a ``coincurve.PrivateKey``) to input ``i``.

    Signs SIGHASH_ALL with deterministic (RFC 6979), low-S ECDSA in DER, if the key's
    compressed public key is in the input's multisig script. Returns True if the input holds
    this key's signature afterwards (one already there is kept, never made twice), False if
    the key is not in the script or the input is finalized already.
    Raises InputError when the input cannot be checked (see :func:`sighash_for_input`) or its
    script is not an m-of-n multisig.
    """
    pub = privkey.public_key.format(compressed=True)
    if not 0 <= i < len(psbt.inputs):
        raise InputError(f"input {i} does not exist (the PSBT has {len(psbt.inputs)} inputs)")
    if psbt.inputs[i].is_finalized:
        return False
    spend = _spend_info(psbt, i)
    if pub not in parse_multisig(spend.script).pubkeys:
        return False
    _sign_one(psbt, i, spend, {pub: privkey}, lambda: _Bip143(psbt.tx))
    return True


def sign(psbt: Psbt, privkeys_by_pubkey: Mapping[bytes, Any]) -> int:
    """Sign every input whose script holds one of the keys; return how many signatures were added.

    ``privkeys_by_pubkey`` maps 33-byte compressed public keys to their ``coincurve.PrivateKey``.
    Signatures already present are kept; finalized inputs are skipped. Every input is checked
    before the first signature is made, so on error the PSBT is unchanged. Raises InputError
    if a private key does not match its public key, or an input cannot be checked (see
    :func:`sighash_for_input`) or has no m-of-n multisig script.
    """
    for pub, key in privkeys_by_pubkey.items():
        if key.public_key.format(compressed=True) != pub:
            raise InputError(f"the private key given for {bytes(pub).hex()} is not its key")
    spends = {}
    for i, inp in enumerate(psbt.inputs):
        if not inp.is_finalized:
            spends[i] = _spend_info(psbt, i)
            parse_multisig(spends[i].script)
    cache: list[_Bip143] = []

    def get_cache() -> _Bip143:
        if not cache:
            cache.append(_Bip143(psbt.tx))
        return cache[0]

    return sum(_sign_one(psbt, i, spend, privkeys_by_pubkey, get_cache) for i, spend in spends.items())


def _signature_problem(pub: bytes, sig: bytes, digest: bytes, keys: SignatureChecks | None = None) -> str | None:
    """Why ``sig`` is no valid SIGHASH_ALL signature of ``digest`` by ``pub``; None if it is.

    ``keys`` remembers the public keys parsed before (a key's point depends on its bytes
    alone) and the answers given before, by the whole (key, signature, digest): a signature
    is verified once against each digest it is asked about."""
    if keys is None or keys.answers is None:
        return _check_signature(pub, sig, digest, keys or SignatureChecks())
    asked = (bytes(pub), bytes(sig), digest)
    if asked not in keys.answers:
        keys.answers[asked] = _check_signature(pub, sig, digest, keys)
    return keys.answers[asked]


def _check_signature(pub: bytes, sig: bytes, digest: bytes, keys: SignatureChecks) -> str | None:
    if not is_strict_der(sig):
        return "not a strict DER signature"
    if sig[-1] != SIGHASH_ALL:
        return f"sighash type {sig[-1]:#x} instead of SIGHASH_ALL"
    if not is_low_s(sig[:-1]):
        return "high-S signature"
    try:
        key = keys.get(pub)
        ok = key is not None and key.verify(sig[:-1], digest, hasher=None)
    except ValueError:
        ok = False
    return None if ok else "signature does not verify"


class SignatureChecks:
    """Signature checks of one caller's work, remembered: public keys parsed once (bytes ->
    ``coincurve.PublicKey``, None for bytes that are no point on the curve) and each answer of
    :func:`_signature_problem` by its whole (public key, signature, digest).

    The digest in the key is the one computed from the PSBT each time it is asked, so a
    signature, key or any byte of the transaction or its spend that differs is a new question.
    Hand one to :func:`valid_signers` and then to :func:`~custody.bitcoin.psbt.finalize` on the
    same PSBT and each signature is verified once, not twice."""

    def __init__(self, remember: bool = True) -> None:
        self._keys: dict[bytes, coincurve.PublicKey | None] = {}
        # None: keys only (one call that asks about each signature once has no use for answers)
        self.answers: dict[tuple[bytes, bytes, bytes], str | None] | None = {} if remember else None

    def get(self, pub: bytes) -> coincurve.PublicKey | None:
        pub = bytes(pub)
        if pub not in self._keys:
            try:
                self._keys[pub] = coincurve.PublicKey(pub)
            except ValueError:
                self._keys[pub] = None
        return self._keys[pub]


def valid_signers(psbt: Psbt, checks: SignatureChecks | None = None) -> list[set[bytes]]:
    """For each input, the public keys whose partial signature is a valid, low-S SIGHASH_ALL
    signature of that input. The transaction-wide BIP-143 hashes are computed once; ``checks``
    (:class:`SignatureChecks`) keeps the answers for a :func:`finalize` of the same PSBT.

    Raises InputError when an input's spend information is missing or inconsistent.
    """
    cache = _Bip143(psbt.tx)
    keys = checks if checks is not None else SignatureChecks(remember=False)
    out: list[set[bytes]] = []
    for i, inp in enumerate(psbt.inputs):
        if not inp.partial_sigs:
            out.append(set())
            continue
        digest = _sighash(psbt, i, _spend_info(psbt, i), cache)
        out.append({pub for pub, sig in inp.partial_sigs.items() if _signature_problem(pub, sig, digest, keys) is None})
    return out
