"""The check every transaction passes before it is broadcast, on any backend.

Two parts:

* **Consensus**: every input's script is verified by Bitcoin Core's own interpreter
  (libbitcoinkernel, through ``py-bitcoinkernel``) under all the consensus flags it exposes:
  P2SH, DERSIG, NULLDUMMY, CHECKLOCKTIMEVERIFY, CHECKSEQUENCEVERIFY, WITNESS, TAPROOT.
  Only those flags may ever be passed: the kernel *aborts the whole process* (an assertion,
  not an error code) when it is handed a policy flag such as STRICTENC or LOW_S.
* **Standardness** (Bitcoin Core's relay policy, src/policy/policy.cpp, which the kernel
  does not implement): low-S, strict-DER signatures with a standard sighash type (every
  signature of a multisig, p2pkh, p2pk or p2wpkh spend, in scriptSigs and witnesses), an empty
  CHECKMULTISIG dummy, weight <= 400,000, scriptSig <= 1,650 bytes and push-only, p2wsh
  witness script <= 3,600 bytes with <= 100 other stack items of <= 80 bytes each, p2sh
  redeem scripts of <= 15 sigops, standard output scripts and no dust output.

Not checked here (the chain backend's test-accept does): that the inputs exist and are
unspent, amounts against the inputs, fees, locktimes and coinbase maturity.

The kernel stays behind this module and :mod:`custody.chain.embedded`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pbk
from bitcoin.core import CTransaction
from pbk.script import PrecomputedTransactionData

from custody.bitcoin.destinations import dust_limit
from custody.bitcoin.encoding import MAX_MONEY, SECP256K1_ORDER
from custody.bitcoin.script import is_strict_der
from custody.chain.types import Refusal, TransactionRefused
from custody.errors import InputError

CONSENSUS_FLAGS = pbk.ScriptVerificationFlags.ALL
"""P2SH | DERSIG | NULLDUMMY | CHECKLOCKTIMEVERIFY | CHECKSEQUENCEVERIFY | WITNESS | TAPROOT."""

MAX_STANDARD_TX_WEIGHT = 400_000
MIN_STANDARD_TX_NONWITNESS_SIZE = 65
MAX_STANDARD_SCRIPTSIG_SIZE = 1_650
MAX_STANDARD_P2WSH_SCRIPT_SIZE = 3_600
MAX_STANDARD_P2WSH_STACK_ITEMS = 100
MAX_STANDARD_P2WSH_STACK_ITEM_SIZE = 80
MAX_P2SH_SIGOPS = 15
MAX_OP_RETURN_RELAY = 83  # bytes of the whole OP_RETURN script (Core before v30; the stricter limit)
MAX_STANDARD_VERSION = 3
MAX_BARE_MULTISIG_KEYS = 3

STANDARD_SIGHASH_TYPES = frozenset({0x01, 0x02, 0x03, 0x81, 0x82, 0x83})  # ALL/NONE/SINGLE [|ANYONECANPAY]

OP_0 = 0x00
OP_PUSHDATA1, OP_PUSHDATA2, OP_PUSHDATA4 = 0x4C, 0x4D, 0x4E
OP_1NEGATE = 0x4F
OP_1, OP_16 = 0x51, 0x60
OP_RETURN = 0x6A
OP_DUP = 0x76
OP_EQUAL, OP_EQUALVERIFY = 0x87, 0x88
OP_HASH160 = 0xA9
OP_CHECKSIG, OP_CHECKSIGVERIFY = 0xAC, 0xAD
OP_CHECKMULTISIG, OP_CHECKMULTISIGVERIFY = 0xAE, 0xAF

Op = tuple[int, bytes | None]
"""One script operation: the opcode and, for a push, its data."""


# --------------------------------------------------------------------------- the check


def check_before_broadcast(raw_tx: bytes, spent: Sequence[tuple[int, bytes]]) -> None:
    """Refuse ``raw_tx`` unless it is valid by consensus and standard by Bitcoin Core's policy.

    ``spent`` holds, for each input in order, the ``(amount in satoshis, scriptPubKey)`` of
    the output it spends. Raises InputError when ``raw_tx`` is no transaction or ``spent``
    does not fit it, TransactionRefused (a NodeError: NON_STANDARD or INVALID) naming the
    input and the rule when a rule is broken.
    """
    tx = decode_transaction(raw_tx)
    spent = _check_spent(tx, spent)
    problem = standardness_problem(tx, spent)
    if problem is not None:
        raise TransactionRefused(f"transaction is not standard: {problem}", Refusal.NON_STANDARD, problem)
    problem = script_problem(raw_tx, spent)
    if problem is not None:
        raise TransactionRefused(f"transaction is invalid by consensus: {problem}", Refusal.INVALID, problem)


def decode_transaction(raw_tx: bytes) -> Any:
    """``raw_tx`` as a ``bitcoin.core.CTransaction``; InputError when it is not one."""
    try:
        tx = CTransaction.deserialize(bytes(raw_tx))
    except Exception as e:  # python-bitcoinlib raises several unrelated types
        raise InputError(f"not a transaction: {e}") from None
    if not tx.vin or not tx.vout:
        raise InputError("not a transaction: it has no inputs or no outputs")
    return tx


def _check_spent(tx: Any, spent: Sequence[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    if len(spent) != len(tx.vin):
        raise InputError(f"{len(spent)} spent outputs given for a transaction of {len(tx.vin)} inputs")
    out = []
    for n, (amount, spk) in enumerate(spent):
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= MAX_MONEY:
            raise InputError(f"input {n}: spent amount {amount!r} is not a number of satoshis")
        out.append((amount, bytes(spk)))
    return out


def script_problem(raw_tx: bytes, spent: Sequence[tuple[int, bytes]]) -> str | None:
    """Why the kernel refuses an input's script under all consensus flags; None if none does.

    ``spent`` must hold one ``(amount, scriptPubKey)`` per input (see :func:`_check_spent`).
    """
    try:
        ktx = pbk.Transaction(bytes(raw_tx))
    except RuntimeError:
        return "libbitcoinkernel cannot parse the transaction"
    outputs = [pbk.TransactionOutput(pbk.ScriptPubkey(spk), amount) for amount, spk in spent]
    precomputed = PrecomputedTransactionData(ktx, outputs)
    assert CONSENSUS_FLAGS & ~pbk.ScriptVerificationFlags.ALL == 0  # anything else aborts the process
    for n, (amount, spk) in enumerate(spent):
        try:
            ok = pbk.ScriptPubkey(spk).verify(amount, ktx, precomputed, n, CONSENSUS_FLAGS)
        except pbk.ScriptVerifyException as e:
            return f"input {n}: the kernel could not verify it ({e.status.name})"
        if not ok:
            return f"input {n}: script verification failed (mandatory-script-verify-flag-failed)"
    return None


# --------------------------------------------------------------------------- script parsing


def parse_script(script: bytes) -> list[Op] | None:
    """The operations of ``script``; None when a push runs past its end."""
    ops: list[Op] = []
    i, n = 0, len(script)
    while i < n:
        op = script[i]
        i += 1
        if op > OP_PUSHDATA4:
            ops.append((op, None))
            continue
        if op < OP_PUSHDATA1:  # OP_0 (an empty push) and direct pushes of 1..75 bytes
            size = op
        else:
            width = {OP_PUSHDATA1: 1, OP_PUSHDATA2: 2, OP_PUSHDATA4: 4}[op]
            if i + width > n:
                return None
            size = int.from_bytes(script[i : i + width], "little")
            i += width
        if i + size > n:
            return None
        ops.append((op, script[i : i + size]))
        i += size
    return ops


def _pushes(script: bytes) -> list[bytes] | None:
    """The data pushed by a push-only script (OP_1NEGATE and OP_1..OP_16 as numbers)."""
    ops = parse_script(script)
    if ops is None:
        return None
    out = []
    for op, data in ops:
        if data is not None:
            out.append(data)
        elif op == OP_1NEGATE:
            out.append(b"\x81")
        elif OP_1 <= op <= OP_16:
            out.append(bytes([op - OP_1 + 1]))
        else:
            return None
    return out


def _small_int(op: Op) -> int | None:
    code, data = op
    if OP_1 <= code <= OP_16:
        return code - OP_1 + 1
    if data is not None and len(data) == 1 and 1 <= data[0] <= 20:
        return data[0]  # 17..20 keys: a one-byte push
    return None


@dataclass(frozen=True)
class _Multisig:
    threshold: int
    keys: int


def _multisig(script: bytes) -> _Multisig | None:
    """``OP_m <key>... OP_n OP_CHECKMULTISIG`` with 33- or 65-byte keys; None otherwise."""
    ops = parse_script(script)
    if ops is None or len(ops) < 4 or ops[-1] != (OP_CHECKMULTISIG, None):
        return None
    m, n = _small_int(ops[0]), _small_int(ops[-2])
    keys = ops[1:-2]
    if m is None or n is None or n != len(keys) or not 1 <= m <= n:
        return None
    if any(data is None or len(data) not in (33, 65) for _, data in keys):
        return None
    return _Multisig(m, n)


def _sigops(script: bytes) -> int:
    """Accurate sigop count of a redeem script (Core's GetSigOpCount(true))."""
    ops = parse_script(script) or []
    count = 0
    last: Op | None = None
    for op in ops:
        code = op[0]
        if code in (OP_CHECKSIG, OP_CHECKSIGVERIFY):
            count += 1
        elif code in (OP_CHECKMULTISIG, OP_CHECKMULTISIGVERIFY):
            keys = _small_int(last) if last is not None and last[1] is None else None
            count += keys if keys is not None else 20
        last = op
    return count


# --------------------------------------------------------------------------- script types

# Layouts of the output scripts relay policy accepts (Core's Solver):
#   p2pkh   OP_DUP OP_HASH160 <20> OP_EQUALVERIFY OP_CHECKSIG
#   p2sh    OP_HASH160 <20> OP_EQUAL
#   p2wpkh  OP_0 <20>;  p2wsh  OP_0 <32>;  p2tr  OP_1 <32>;  other witness  OP_1..OP_16 <2..40>
#   p2pk    <33 or 65 byte key> OP_CHECKSIG
#   bare multisig (at most 3 keys);  nulldata  OP_RETURN <pushes>


def _is_p2pkh(spk: bytes) -> bool:
    return len(spk) == 25 and spk[:3] == bytes([OP_DUP, OP_HASH160, 20]) and spk[23:] == bytes([OP_EQUALVERIFY, 0xAC])


def _is_p2sh(spk: bytes) -> bool:
    return len(spk) == 23 and spk[0] == OP_HASH160 and spk[1] == 20 and spk[22] == OP_EQUAL


def _witness_program(spk: bytes) -> tuple[int, bytes] | None:
    if not 4 <= len(spk) <= 42 or spk[1] + 2 != len(spk):
        return None
    if spk[0] == OP_0:
        return 0, spk[2:]
    if OP_1 <= spk[0] <= OP_16:
        return spk[0] - OP_1 + 1, spk[2:]
    return None


def _is_p2pk(spk: bytes) -> bool:
    return (len(spk) == 35 and spk[0] == 33 or len(spk) == 67 and spk[0] == 65) and spk[-1] == OP_CHECKSIG


def output_kind(spk: bytes) -> str | None:
    """The standard type of an output script, or None when relay policy refuses it."""
    if _is_p2pkh(spk):
        return "p2pkh"
    if _is_p2sh(spk):
        return "p2sh"
    program = _witness_program(spk)
    if program is not None:
        version, data = program
        if version == 0:
            return {20: "p2wpkh", 32: "p2wsh"}.get(len(data))  # other v0 lengths are invalid
        return "p2tr" if version == 1 and len(data) == 32 else "witness_unknown"
    if _is_p2pk(spk):
        return "p2pk"
    multisig = _multisig(spk)
    if multisig is not None:
        return "multisig" if multisig.keys <= MAX_BARE_MULTISIG_KEYS else None
    if spk and spk[0] == OP_RETURN and _pushes(spk[1:]) is not None:
        return "nulldata" if len(spk) <= MAX_OP_RETURN_RELAY else None
    return None


# --------------------------------------------------------------------------- signatures


def signature_problem(sig: bytes) -> str | None:
    """Why an ECDSA signature (with its sighash byte) is not standard; None if it is.

    An empty signature (a deliberately failing CHECKMULTISIG slot) has nothing to check.
    """
    if not sig:
        return None
    if not is_strict_der(sig):
        return "signature is not strict DER (non-canonical encoding)"
    if sig[-1] not in STANDARD_SIGHASH_TYPES:
        return f"signature has the non-standard sighash type {sig[-1]:#04x}"
    len_r = sig[3]
    s = int.from_bytes(sig[6 + len_r : -1], "big")
    if s > SECP256K1_ORDER // 2:
        return "signature is high-S (non-canonical: S value is unnecessarily high)"
    return None


def _multisig_problem(script: bytes, stack: Sequence[bytes]) -> str | None:
    """Dummy and signatures of a CHECKMULTISIG spend: ``stack`` is ``[dummy, sig...]``."""
    if _multisig(script) is None:
        return None
    if not stack:
        return "multisig spend without its dummy element"
    if stack[0] != b"":
        return "CHECKMULTISIG dummy element is not empty (NULLDUMMY)"
    for sig in stack[1:]:
        problem = signature_problem(sig)
        if problem is not None:
            return problem
    return None


def _single_sig_problem(sig: bytes | None) -> str | None:
    return None if sig is None else signature_problem(sig)


def _p2wsh_problem(witness: Sequence[bytes]) -> str | None:
    if not witness:
        return "p2wsh spend without a witness"
    script, stack = witness[-1], witness[:-1]
    if len(script) > MAX_STANDARD_P2WSH_SCRIPT_SIZE:
        return f"witness script of {len(script)} bytes (at most {MAX_STANDARD_P2WSH_SCRIPT_SIZE})"
    if len(stack) > MAX_STANDARD_P2WSH_STACK_ITEMS:
        return f"{len(stack)} p2wsh stack items (at most {MAX_STANDARD_P2WSH_STACK_ITEMS})"
    for item in stack:
        if len(item) > MAX_STANDARD_P2WSH_STACK_ITEM_SIZE:
            return f"p2wsh stack item of {len(item)} bytes (at most {MAX_STANDARD_P2WSH_STACK_ITEM_SIZE})"
    return _multisig_problem(script, stack)


def _witness_problem(program: bytes, witness: Sequence[bytes]) -> str | None:
    """A version 0 witness program's spend (native or nested in p2sh)."""
    if len(program) == 32:
        return _p2wsh_problem(witness)
    return _single_sig_problem(witness[0] if witness else None)  # p2wpkh: [sig, pubkey]


def _input_problem(spk: bytes, script_sig: bytes, witness: Sequence[bytes]) -> str | None:
    """Standardness of one input: what it spends, its scriptSig, witness and signatures."""
    if len(script_sig) > MAX_STANDARD_SCRIPTSIG_SIZE:
        return f"scriptSig of {len(script_sig)} bytes (at most {MAX_STANDARD_SCRIPTSIG_SIZE})"
    pushes = _pushes(script_sig)
    if pushes is None:
        return "scriptSig is not push-only"
    kind = output_kind(spk)
    if kind is None or kind == "nulldata":
        return f"spends a non-standard output script {spk.hex()}"
    if kind == "p2sh":
        if not pushes:
            return "p2sh spend with an empty scriptSig"
        redeem = pushes[-1]
        program = _witness_program(redeem)
        if program is not None:
            if len(pushes) != 1:
                return "p2sh-wrapped witness spend with more than the redeem script in its scriptSig"
            return _witness_problem(program[1], witness) if program[0] == 0 else None
        if _sigops(redeem) > MAX_P2SH_SIGOPS:
            return f"p2sh redeem script with {_sigops(redeem)} sigops (at most {MAX_P2SH_SIGOPS})"
        if output_kind(redeem) in ("p2pkh", "p2pk") and len(pushes) >= 2:
            return _single_sig_problem(pushes[0])  # [sig, (pubkey,) redeem script]
        return _multisig_problem(redeem, pushes[:-1])
    if kind in ("p2wpkh", "p2wsh"):
        return _witness_problem(spk[2:], witness)
    if kind in ("p2pkh", "p2pk"):
        return _single_sig_problem(pushes[0] if pushes else None)
    if kind == "multisig":
        return _multisig_problem(spk, pushes)
    return None  # taproot and future witness versions: Schnorr or unknown, no DER to check


def _weight(tx: Any) -> tuple[int, int]:
    """(weight, non-witness size) of ``tx``."""
    base = len(CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion).serialize())
    return base * 3 + len(tx.serialize()), base


def standardness_problem(tx: Any, spent: Sequence[tuple[int, bytes]]) -> str | None:
    """The first of Bitcoin Core's relay-policy rules ``tx`` breaks, or None.

    ``tx`` is a decoded transaction (:func:`decode_transaction`); ``spent`` one
    ``(amount, scriptPubKey)`` per input.
    """
    if not 1 <= tx.nVersion <= MAX_STANDARD_VERSION:
        return f"version {tx.nVersion} (standard: 1 to {MAX_STANDARD_VERSION})"
    weight, base = _weight(tx)
    if weight > MAX_STANDARD_TX_WEIGHT:
        return f"weight {weight} (at most {MAX_STANDARD_TX_WEIGHT})"
    if base < MIN_STANDARD_TX_NONWITNESS_SIZE:
        return f"non-witness size {base} bytes (at least {MIN_STANDARD_TX_NONWITNESS_SIZE})"
    data_outputs = 0
    for n, out in enumerate(tx.vout):
        spk = bytes(out.scriptPubKey)
        kind = output_kind(spk)
        if kind is None:
            return f"output {n}: non-standard scriptPubKey {spk.hex()}"
        if kind == "nulldata":
            data_outputs += 1
        elif out.nValue < dust_limit(spk):
            return f"output {n}: {out.nValue} sat is dust (at least {dust_limit(spk)} sat)"
    if data_outputs > 1:
        return "more than one OP_RETURN output"
    witnesses = tx.wit.vtxinwit if not tx.wit.is_null() else []
    for n, (txin, (_, spk)) in enumerate(zip(tx.vin, spent, strict=True)):
        stack = [bytes(item) for item in witnesses[n].scriptWitness.stack] if n < len(witnesses) else []
        problem = _input_problem(spk, bytes(txin.scriptSig), stack)
        if problem is not None:
            return f"input {n}: {problem}"
    return None
