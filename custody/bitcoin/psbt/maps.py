"""PSBT maps (BIP-174, version 0): the data model, the strict parser and serializer, the combiner.

The parser is strict: every problem with the data is an :class:`~custody.errors.InputError`
naming the map (``global map``, ``input 3``, ``output 0``) and the field; fields we do not know
(and proprietary ones) are kept and written back byte for byte. Serialization order is Bitcoin
Core's: known fields by key type; partial signatures by the HASH160 of their public key (Core's
``CKeyID`` order); BIP-32 derivations by public key; extended public keys by their 78 bytes;
then proprietary and unknown records by key bytes.
"""

# size(module): BIP-174's global, input and output maps, read and written side by side so that each
#   key type's reader and writer are checked together; one more split (by map) waits for the PSBT
#   work of other issues

from __future__ import annotations

import base64
import binascii
import functools
import gc
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, ParamSpec, TypeVar

import coincurve
from bitcoin.core import (
    CMutableOutPoint,
    CMutableTransaction,
    CMutableTxIn,
    CMutableTxOut,
    COutPoint,
    CScript,
    CTransaction,
)

from custody.bitcoin.encoding import MAX_MONEY, hash160, ser_compact_size
from custody.errors import InputError

PSBT_MAGIC = b"psbt\xff"

# Global key types (BIP-174 / BIP-370).
PSBT_GLOBAL_UNSIGNED_TX = 0x00
PSBT_GLOBAL_XPUB = 0x01
PSBT_GLOBAL_VERSION = 0xFB
PSBT_GLOBAL_PROPRIETARY = 0xFC
# Input key types.
PSBT_IN_NON_WITNESS_UTXO = 0x00
PSBT_IN_WITNESS_UTXO = 0x01
PSBT_IN_PARTIAL_SIG = 0x02
PSBT_IN_SIGHASH_TYPE = 0x03
PSBT_IN_REDEEM_SCRIPT = 0x04
PSBT_IN_WITNESS_SCRIPT = 0x05
PSBT_IN_BIP32_DERIVATION = 0x06
PSBT_IN_FINAL_SCRIPTSIG = 0x07
PSBT_IN_FINAL_SCRIPTWITNESS = 0x08
PSBT_IN_PROPRIETARY = 0xFC
# Output key types.
PSBT_OUT_REDEEM_SCRIPT = 0x00
PSBT_OUT_WITNESS_SCRIPT = 0x01
PSBT_OUT_BIP32_DERIVATION = 0x02
PSBT_OUT_PROPRIETARY = 0xFC

# Types that BIP-370 defines for PSBT version 2 only and that "must be excluded" from version 0.
_V2_ONLY_GLOBAL = {
    0x02: "tx version",
    0x03: "fallback locktime",
    0x04: "input count",
    0x05: "output count",
    0x06: "tx modifiable flags",
}
_V2_ONLY_INPUT = {
    0x0E: "previous txid",
    0x0F: "spent output index",
    0x10: "sequence",
    0x11: "required time locktime",
    0x12: "required height locktime",
}
_V2_ONLY_OUTPUT = {0x03: "amount", 0x04: "script"}
_KNOWN_GLOBAL = frozenset({0x00, 0x01, 0xFB, 0xFC, *_V2_ONLY_GLOBAL})
_KNOWN_INPUT = frozenset({*range(0x00, 0x09), 0xFC, *_V2_ONLY_INPUT})
_KNOWN_OUTPUT = frozenset({0x00, 0x01, 0x02, 0xFC, *_V2_ONLY_OUTPUT})

# Compiled once: the hot paths read and write 500-input PSBTs.
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_PATH_STRUCTS = [struct.Struct(f"<{n}I") for n in range(16)]  # BIP-32 paths of up to 15 elements
_PATH6 = _PATH_STRUCTS[6]
_EMPTY_SCRIPT = CScript()  # immutable (bytes): shared by every empty scriptSig
_BYTE = [bytes([n]) for n in range(0xFD)]  # one-byte compact sizes, made once
_new = object.__new__
_setattr = object.__setattr__  # for python-bitcoinlib's immutable classes (COutPoint)
_new_bytes = bytes.__new__  # CScript(b) for bytes b, without CScript.__new__'s type dispatch


_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cycle collector off while PSBT maps are built in bulk (as custody.books.ledger does
    for its tuples): a 500-input, 1,000-output PSBT is ~15,000 container objects, none in a cycle,
    and the collector, run every 700 of them, only rescanned the ones already made (a tenth of
    the round trip's time). It runs again as before afterwards, once over what was made."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def without_cycle_collection(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run with :func:`_collector_paused`."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _collector_paused():
            return fn(*args, **kwargs)

    return run


# --------------------------------------------------------------------------- data model


class KeyOrigin(NamedTuple):
    """Where a key comes from: the master key's fingerprint and the BIP-32 path below it."""

    fingerprint: bytes  # 4 bytes
    path: tuple[int, ...]  # child numbers; hardened ones have bit 31 set


_new_origin = functools.partial(tuple.__new__, KeyOrigin)  # KeyOrigin((fingerprint, path)), minus a call


class ProprietaryKey(NamedTuple):
    """The key of a proprietary record (type 0xFC): identifier, subtype and key data."""

    identifier: bytes
    subtype: int
    keydata: bytes


@dataclass(frozen=True, slots=True)
class WitnessUtxo:
    """The output an input spends, as PSBT_IN_WITNESS_UTXO carries it."""

    amount: int  # satoshis
    script_pubkey: bytes


@dataclass(slots=True)
class PsbtInput:
    """The per-input map of a PSBT."""

    non_witness_utxo: Any = None  # bitcoin.core.CTransaction: the whole previous transaction
    witness_utxo: WitnessUtxo | None = None
    partial_sigs: dict[bytes, bytes] = field(default_factory=dict)  # pubkey -> DER sig + hashtype
    sighash_type: int | None = None
    redeem_script: bytes | None = None
    witness_script: bytes | None = None
    bip32_derivations: dict[bytes, KeyOrigin] = field(default_factory=dict)
    final_script_sig: bytes | None = None
    final_script_witness: tuple[bytes, ...] | None = None
    proprietary: dict[ProprietaryKey, bytes] = field(default_factory=dict)
    unknown: dict[bytes, bytes] = field(default_factory=dict)  # whole key (type included) -> value

    @property
    def is_finalized(self) -> bool:
        return self.final_script_sig is not None or self.final_script_witness is not None

    def copy(self) -> PsbtInput:
        return PsbtInput(
            non_witness_utxo=self.non_witness_utxo,  # immutable CTransaction: shared
            witness_utxo=self.witness_utxo,
            partial_sigs=dict(self.partial_sigs),
            sighash_type=self.sighash_type,
            redeem_script=self.redeem_script,
            witness_script=self.witness_script,
            bip32_derivations=dict(self.bip32_derivations),
            final_script_sig=self.final_script_sig,
            final_script_witness=self.final_script_witness,
            proprietary=dict(self.proprietary),
            unknown=dict(self.unknown),
        )


@dataclass(slots=True)
class PsbtOutput:
    """The per-output map of a PSBT."""

    redeem_script: bytes | None = None
    witness_script: bytes | None = None
    bip32_derivations: dict[bytes, KeyOrigin] = field(default_factory=dict)
    proprietary: dict[ProprietaryKey, bytes] = field(default_factory=dict)
    unknown: dict[bytes, bytes] = field(default_factory=dict)

    def copy(self) -> PsbtOutput:
        return PsbtOutput(
            redeem_script=self.redeem_script,
            witness_script=self.witness_script,
            bip32_derivations=dict(self.bip32_derivations),
            proprietary=dict(self.proprietary),
            unknown=dict(self.unknown),
        )


@dataclass(slots=True)
class Psbt:
    """A version 0 PSBT: the unsigned transaction and one map per input and per output."""

    tx: Any  # bitcoin.core.CMutableTransaction, scriptSigs and witnesses empty
    inputs: list[PsbtInput]
    outputs: list[PsbtOutput]
    xpubs: dict[bytes, KeyOrigin] = field(default_factory=dict)  # 78-byte BIP-32 xpub -> origin
    version: int | None = None  # PSBT_GLOBAL_VERSION; None when the record is absent (= 0)
    proprietary: dict[ProprietaryKey, bytes] = field(default_factory=dict)
    unknown: dict[bytes, bytes] = field(default_factory=dict)

    @classmethod
    def from_unsigned_tx(cls, tx: Any) -> Psbt:
        """Create a PSBT with empty maps for ``tx`` (the BIP-174 creator).

        Raises InputError if an input of ``tx`` has a scriptSig or a witness.
        """
        raw = _serialize_unsigned_tx(tx)  # checks the scriptSigs
        if not tx.wit.is_null():
            raise InputError("unsigned transaction: inputs must have no witness")
        unsigned = _parse_unsigned_tx(raw)
        return cls(
            tx=unsigned,
            inputs=[PsbtInput() for _ in unsigned.vin],
            outputs=[PsbtOutput() for _ in unsigned.vout],
        )

    @classmethod
    @without_cycle_collection
    def parse(cls, data: bytes) -> Psbt:
        """Parse a binary PSBT.

        Raises InputError for anything BIP-174 calls invalid (bad magic, duplicate keys, key
        data where none is allowed, malformed values, a signed or witness-serialized unsigned
        transaction, missing or extra maps, trailing bytes), for non-minimal compact sizes,
        for a PSBT version other than 0, and for version 2 fields.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InputError("a PSBT must be bytes")
        data = bytes(data)
        if not data.startswith(PSBT_MAGIC):
            raise InputError("not a PSBT: it does not start with the magic bytes 'psbt' 0xff")
        r = _Reader(data, len(PSBT_MAGIC))
        psbt = _parse_global(r)
        valid_keys: set[bytes] = set()  # public keys found on the curve in this PSBT
        prev_txs: dict[bytes, Any] = {}  # previous transactions read in this PSBT, by their bytes
        for i in range(len(psbt.tx.vin)):
            fast = _parse_input_fast(data, r.pos, valid_keys)
            if fast is not None:
                psbt.inputs.append(fast[0])
                r.pos = fast[1]
            else:
                psbt.inputs.append(_parse_input(_read_map(r, f"input {i}"), f"input {i}", valid_keys, prev_txs))
        pos, size, outputs = r.pos, len(data), psbt.outputs
        for i in range(len(psbt.tx.vout)):
            if pos < size and data[pos] == 0:  # an empty map: its separator alone
                pos += 1
                outputs.append(PsbtOutput())
            else:
                r.pos = pos
                outputs.append(_parse_output(_read_map(r, f"output {i}"), f"output {i}", valid_keys))
                pos = r.pos
        r.pos = pos
        if r.pos != len(data):
            raise InputError(
                f"PSBT has {len(data) - r.pos} trailing bytes after its last output map "
                f"(the transaction has {len(psbt.tx.vin)} inputs and {len(psbt.tx.vout)} outputs)"
            )
        return psbt

    @classmethod
    def from_base64(cls, text: str) -> Psbt:
        """Parse a base64 PSBT (RFC 4648, surrounding whitespace allowed).

        Raises InputError for bad base64 and for everything :meth:`parse` refuses.
        """
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"PSBT is not valid base64: {exc}") from None
        return cls.parse(raw)

    def serialize(self) -> bytes:
        """Return the binary PSBT.

        Raises InputError if the maps do not match the transaction's inputs and outputs or
        the unsigned transaction has a scriptSig or a witness.
        """
        self.check_maps()
        if not self.tx.wit.is_null():
            raise InputError("unsigned transaction: inputs must have no witness")
        parts = [PSBT_MAGIC, _record(bytes([PSBT_GLOBAL_UNSIGNED_TX]), _serialize_unsigned_tx(self.tx))]
        for xpub in sorted(self.xpubs):
            parts.append(_record(bytes([PSBT_GLOBAL_XPUB]) + xpub, _ser_origin(self.xpubs[xpub])))
        if self.version is not None:
            parts.append(_record(bytes([PSBT_GLOBAL_VERSION]), struct.pack("<I", self.version)))
        parts.extend(_extra_records("global map", _KNOWN_GLOBAL, self.proprietary, self.unknown))
        parts.append(b"\x00")
        parts.extend(_serialize_input(inp, f"input {i}") for i, inp in enumerate(self.inputs))
        parts.extend(
            b"\x00" if _is_empty(out) else _serialize_output(out, f"output {i}") for i, out in enumerate(self.outputs)
        )
        return b"".join(parts)

    def to_base64(self) -> str:
        """Return the PSBT as base64 (what ``bitcoin-cli`` and wallets exchange)."""
        return base64.b64encode(self.serialize()).decode("ascii")

    def check_maps(self) -> None:
        """Raise InputError unless there is one map per input and per output of the transaction."""
        if len(self.inputs) != len(self.tx.vin) or len(self.outputs) != len(self.tx.vout):
            raise InputError(
                f"PSBT has {len(self.inputs)} input maps and {len(self.outputs)} output maps "
                f"for a transaction with {len(self.tx.vin)} inputs and {len(self.tx.vout)} outputs"
            )

    @without_cycle_collection
    def copy(self) -> Psbt:
        """Return an independent copy (the transaction and every map are copied)."""
        return Psbt(
            tx=_copy_tx(self.tx),
            inputs=[inp.copy() for inp in self.inputs],
            outputs=[out.copy() for out in self.outputs],
            xpubs=dict(self.xpubs),
            version=self.version,
            proprietary=dict(self.proprietary),
            unknown=dict(self.unknown),
        )

    def unsigned_tx_bytes(self) -> bytes:
        """The unsigned transaction in network (non-witness) serialization."""
        return _serialize_unsigned_tx(self.tx)


# --------------------------------------------------------------------------- low-level reading


class _Reader:
    """Bounds-checked reading of a byte string; every overrun is an InputError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def read(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise InputError(
                f"truncated PSBT: {what} needs {n} byte{'' if n == 1 else 's'} at offset "
                f"{self.pos}, {len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def compact_size(self, what: str) -> int:
        first = self.read(1, what)[0]
        if first < 0xFD:
            return first
        width = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
        value = int.from_bytes(self.read(width, what), "little")
        if value < {2: 0xFD, 4: 0x10000, 8: 0x100000000}[width]:
            raise InputError(f"{what}: compact size {value} is not minimally encoded")
        return value

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def _record(key: bytes, value: bytes) -> bytes:
    if len(key) < 0xFD and len(value) < 0xFD:  # one-byte lengths: the common case
        return _BYTE[len(key)] + key + _BYTE[len(value)] + value
    return ser_compact_size(len(key)) + key + ser_compact_size(len(value)) + value


def _read_chunk(r: _Reader, pos: int, scope: str, name: str) -> tuple[bytes, int]:
    """The length-prefixed ``name`` (key or value) of a map record at ``pos``, and the position
    after it. A one-byte compact size (every length below 253) is read inline; the others, and
    every overrun, go through :class:`_Reader`, whose checks and messages they keep."""
    data = r.data
    if pos < len(data) and data[pos] < 0xFD:
        n = data[pos]
        pos += 1
    else:
        r.pos = pos
        n = r.compact_size(f"{scope} map: {name} length")
        pos = r.pos
    end = pos + n
    if end > len(data):
        r.pos = pos
        r.read(n, f"{scope} map: {name}")  # raises: truncated
    return data[pos:end], end


def _read_map(r: _Reader, scope: str) -> list[tuple[int, bytes, bytes, bytes]]:
    """Read one map up to its 0x00 separator: (key type, key data, whole key, value) records."""
    records: list[tuple[int, bytes, bytes, bytes]] = []
    seen: set[bytes] = set()
    pos = r.pos
    while True:
        key, pos = _read_chunk(r, pos, scope, "key")
        if not key:
            r.pos = pos
            return records
        value, pos = _read_chunk(r, pos, scope, "value")
        if key in seen:
            raise InputError(f"{scope}: duplicate key {key.hex()}")
        seen.add(key)
        if key[0] < 0xFD:
            records.append((key[0], key[1:], key, value))
        else:
            kr = _Reader(key)
            ktype = kr.compact_size(f"{scope} map: key type")
            records.append((ktype, key[kr.pos :], key, value))


def _no_keydata(scope: str, name: str, keydata: bytes) -> None:
    if keydata:
        raise InputError(f"{scope}: {name} key must have no key data, found {keydata.hex()}")


def _check_pubkey(scope: str, name: str, pubkey: bytes, valid: set[bytes] | None = None) -> None:
    """Raise InputError unless ``pubkey`` is a valid public key (33 or 65 bytes, on the curve).

    ``valid`` holds keys found valid before in the same parse (a key's validity depends on its
    bytes alone): a founder's key on 500 inputs is checked on the curve once.
    """
    if valid is not None and pubkey in valid:
        return
    if len(pubkey) not in (33, 65):
        raise InputError(f"{scope}: {name} key holds a public key of {len(pubkey)} bytes (33 or 65 expected)")
    try:
        coincurve.PublicKey(pubkey)
    except ValueError:
        raise InputError(f"{scope}: {name} key holds an invalid public key {pubkey.hex()}") from None
    if valid is not None:
        valid.add(pubkey)


def _parse_origin(scope: str, name: str, value: bytes) -> KeyOrigin:
    if len(value) < 4 or len(value) % 4:
        raise InputError(
            f"{scope}: {name} value must be a 4-byte fingerprint and 4-byte path elements, found {len(value)} bytes"
        )
    count = (len(value) - 4) // 4
    layout = _PATH_STRUCTS[count] if count < len(_PATH_STRUCTS) else struct.Struct(f"<{count}I")
    return _new_origin((value[:4], layout.unpack_from(value, 4)))


def _ser_origin(origin: KeyOrigin) -> bytes:
    if len(origin.fingerprint) != 4:
        raise InputError(f"key origin fingerprint must be 4 bytes, not {len(origin.fingerprint)}")
    count = len(origin.path)
    layout = _PATH_STRUCTS[count] if count < len(_PATH_STRUCTS) else struct.Struct(f"<{count}I")
    try:
        return bytes(origin.fingerprint) + layout.pack(*origin.path)
    except struct.error:
        raise InputError(f"key origin path {origin.path} has an element out of range") from None


def _parse_proprietary(scope: str, keydata: bytes) -> ProprietaryKey:
    kr = _Reader(keydata)
    ident = kr.read(kr.compact_size(f"{scope} proprietary key"), f"{scope} proprietary identifier")
    subtype = kr.compact_size(f"{scope} proprietary subtype")
    return ProprietaryKey(ident, subtype, keydata[kr.pos :])


def _ser_proprietary_key(keytype: int, pk: ProprietaryKey) -> bytes:
    return (
        ser_compact_size(keytype)
        + ser_compact_size(len(pk.identifier))
        + pk.identifier
        + ser_compact_size(pk.subtype)
        + pk.keydata
    )


def _extra_records(
    scope: str,
    known: frozenset[int],
    proprietary: Mapping[ProprietaryKey, bytes],
    unknown: Mapping[bytes, bytes],
) -> list[bytes]:
    """Proprietary and unknown records, ordered by their whole key.

    An "unknown" key must be of a type this map does not define (else parsing it back would
    read it as that field, or refuse it).
    """
    if not proprietary and not unknown:
        return []
    for key in unknown:
        ktype = _Reader(bytes(key)).compact_size(f"{scope} unknown key")
        if ktype in known:
            raise InputError(f"{scope}: unknown record {bytes(key).hex()} has a key type this map defines")
    items = [(_ser_proprietary_key(0xFC, k), v) for k, v in proprietary.items()]
    items.extend(unknown.items())
    items.sort()
    return [_record(k, v) for k, v in items]


# --------------------------------------------------------------------------- transactions


def _parse_unsigned_tx(raw: bytes) -> Any:
    """Parse the unsigned transaction, which BIP-174 requires in non-witness serialization."""
    try:
        return _parse_legacy_tx(raw)
    except InputError:
        if raw[4:6] == b"\x00\x01":
            raise InputError(
                "unsigned transaction is in witness serialization; BIP-174 requires the "
                "non-witness format with empty scriptSigs"
            ) from None
        raise


def _parse_legacy_tx(raw: bytes) -> Any:
    """The unsigned transaction: read fast when it is well formed, else by the checked reader,
    which says what is wrong (both accept exactly the same transactions)."""
    tx = _parse_legacy_tx_fast(raw)
    return tx if tx is not None else _parse_legacy_tx_checked(raw)


def _fast_compact_size(raw: bytes, pos: int) -> tuple[int, int] | None:
    """A minimally encoded compact size of 1 or 3 bytes at ``pos`` and the position after it;
    None for anything else (the checked reader then decides)."""
    if pos >= len(raw):
        return None
    first = raw[pos]
    if first < 0xFD:
        return first, pos + 1
    if first == 0xFD and pos + 3 <= len(raw):
        value = raw[pos + 1] | raw[pos + 2] << 8
        return (value, pos + 3) if value >= 0xFD else None
    return None


def _parse_legacy_tx_fast(raw: bytes) -> Any | None:  # noqa: C901 - one bounds check per field, in wire order
    """:func:`_parse_legacy_tx_checked`'s transaction, or None where that one might refuse it
    (or reads a rarer encoding: a count or script length of 65,536 or more).

    The inputs, outpoints and outputs are made with their attributes set directly: python-bitcoinlib's
    constructors (0.12.2, pinned) only set the same attributes after range checks the reading
    here makes anyway (a 32-byte hash, 32-bit numbers), and cost more than the reading itself.
    """
    size = len(raw)
    if size < 4:
        return None
    counted = _fast_compact_size(raw, 4)
    if counted is None:
        return None
    n_in, pos = counted
    vin = []
    for _ in range(n_in):
        if pos + 41 > size or raw[pos + 36] != 0:  # outpoint, empty scriptSig, sequence
            return None
        txin = _new(CMutableTxIn)
        txin.prevout = _new(COutPoint)
        _setattr(txin.prevout, "hash", raw[pos : pos + 32])
        _setattr(txin.prevout, "n", _U32.unpack_from(raw, pos + 32)[0])
        txin.scriptSig = _EMPTY_SCRIPT
        txin.nSequence = _U32.unpack_from(raw, pos + 37)[0]
        vin.append(txin)
        pos += 41
    counted = _fast_compact_size(raw, pos)
    if counted is None:
        return None
    n_out, pos = counted
    vout = []
    for _ in range(n_out):
        if pos + 9 > size:
            return None
        amount = _I64.unpack_from(raw, pos)[0]
        if raw[pos + 8] < 0xFD:  # a one-byte script length: every standard output
            start = pos + 9
            end = start + raw[pos + 8]
        else:
            script_len = _fast_compact_size(raw, pos + 8)
            if script_len is None:
                return None
            start = script_len[1]
            end = start + script_len[0]
        if not 0 <= amount <= MAX_MONEY or end > size:
            return None
        pos = end
        txout = _new(CMutableTxOut)
        txout.nValue = amount
        txout.scriptPubKey = _new_bytes(CScript, raw[start:end])
        vout.append(txout)
    if pos + 4 != size:
        return None
    return CMutableTransaction(vin, vout, _U32.unpack_from(raw, pos)[0], _I32.unpack_from(raw, 0)[0])


def _parse_legacy_tx_checked(raw: bytes) -> Any:
    what = "unsigned transaction"
    r = _Reader(raw)
    version = struct.unpack("<i", r.read(4, what))[0]
    vin = []
    for i in range(r.compact_size(f"{what}: input count")):
        prev_hash = r.read(32, f"{what}: input {i}")
        prev_n = struct.unpack("<I", r.read(4, f"{what}: input {i}"))[0]
        script_sig = r.read(r.compact_size(f"{what}: input {i}"), f"{what}: input {i}")
        if script_sig:
            raise InputError(f"{what}: input {i} has a non-empty scriptSig")
        sequence = struct.unpack("<I", r.read(4, f"{what}: input {i}"))[0]
        vin.append(CMutableTxIn(COutPoint(prev_hash, prev_n), CScript(), sequence))
    vout = []
    for i in range(r.compact_size(f"{what}: output count")):
        amount = struct.unpack("<q", r.read(8, f"{what}: output {i}"))[0]
        if not 0 <= amount <= MAX_MONEY:
            raise InputError(f"{what}: output {i} amount {amount} is out of range")
        spk = r.read(r.compact_size(f"{what}: output {i}"), f"{what}: output {i}")
        vout.append(CMutableTxOut(amount, CScript(spk)))
    locktime = struct.unpack("<I", r.read(4, f"{what}: locktime"))[0]
    if not r.at_end():
        raise InputError(f"{what} has {len(raw) - r.pos} trailing bytes")
    return CMutableTransaction(vin, vout, locktime, version)


def _serialize_unsigned_tx(tx: Any) -> bytes:
    parts = [struct.pack("<i", tx.nVersion), ser_compact_size(len(tx.vin))]
    for i, txin in enumerate(tx.vin):
        if len(txin.scriptSig):
            raise InputError(f"unsigned transaction: input {i} has a non-empty scriptSig")
        prevout = txin.prevout
        parts.append(bytes(prevout.hash) + _U32.pack(prevout.n) + b"\x00" + _U32.pack(txin.nSequence))
    parts.append(ser_compact_size(len(tx.vout)))
    parts.extend([_ser_txout(o.nValue, o.scriptPubKey) for o in tx.vout])
    parts.append(struct.pack("<I", tx.nLockTime))
    return b"".join(parts)


def _copy_tx(tx: Any) -> Any:
    """An independent copy of ``tx``, as ``CMutableTransaction.from_tx`` makes it, sharing only
    what cannot change: outpoints of the immutable kind (the parser's), scripts (bytes) and
    the witness (``from_tx`` shares it too)."""
    vin = [
        CMutableTxIn(
            t.prevout if type(t.prevout) is COutPoint else CMutableOutPoint.from_outpoint(t.prevout),
            t.scriptSig,
            t.nSequence,
        )
        for t in tx.vin
    ]
    vout = [CMutableTxOut(o.nValue, o.scriptPubKey) for o in tx.vout]
    return CMutableTransaction(vin, vout, tx.nLockTime, tx.nVersion, tx.wit)


def _ser_txout(amount: int, script_pubkey: bytes) -> bytes:
    if len(script_pubkey) < 0xFD:
        return _I64.pack(amount) + _BYTE[len(script_pubkey)] + script_pubkey
    return _I64.pack(amount) + ser_compact_size(len(script_pubkey)) + script_pubkey


def _parse_full_tx(scope: str, raw: bytes) -> Any:
    """A previous transaction (witness serialization allowed), canonically encoded."""
    try:
        tx = CTransaction.deserialize(raw)
    except Exception as exc:  # python-bitcoinlib raises struct.error, ValueError, its own errors
        raise InputError(f"{scope}: non-witness UTXO is not a valid transaction: {exc}") from None
    if tx.serialize() != raw:
        raise InputError(f"{scope}: non-witness UTXO is not canonically encoded")
    return tx


def _parse_witness_stack(scope: str, value: bytes) -> tuple[bytes, ...]:
    r = _Reader(value)
    what = f"{scope} final scriptWitness"
    items = tuple(r.read(r.compact_size(what), what) for _ in range(r.compact_size(what)))
    if not r.at_end():
        raise InputError(f"{what} has {len(value) - r.pos} trailing bytes")
    return items


def _ser_witness_stack(items: Sequence[bytes]) -> bytes:
    return ser_compact_size(len(items)) + b"".join(ser_compact_size(len(x)) + x for x in items)


# --------------------------------------------------------------------------- maps


def _parse_global(r: _Reader) -> Psbt:
    scope = "global map"
    tx = None
    xpubs: dict[bytes, KeyOrigin] = {}
    version: int | None = None
    proprietary: dict[ProprietaryKey, bytes] = {}
    unknown: dict[bytes, bytes] = {}
    for ktype, keydata, key, value in _read_map(r, scope):
        if ktype == PSBT_GLOBAL_UNSIGNED_TX:
            _no_keydata(scope, "unsigned transaction", keydata)
            tx = _parse_unsigned_tx(value)
        elif ktype == PSBT_GLOBAL_XPUB:
            if len(keydata) != 78:
                raise InputError(f"{scope}: extended public key must be 78 bytes, found {len(keydata)}")
            _check_pubkey(scope, "extended public key", keydata[45:])
            if keydata[45] not in (2, 3):
                raise InputError(f"{scope}: extended public key holds no compressed public key")
            origin = _parse_origin(scope, "extended public key", value)
            if len(origin.path) != keydata[4]:
                raise InputError(
                    f"{scope}: extended public key of depth {keydata[4]} has a derivation path "
                    f"of {len(origin.path)} elements"
                )
            xpubs[keydata] = origin
        elif ktype == PSBT_GLOBAL_VERSION:
            _no_keydata(scope, "PSBT version", keydata)
            if len(value) != 4:
                raise InputError(f"{scope}: PSBT version must be 4 bytes, found {len(value)}")
            version = struct.unpack("<I", value)[0]
            if version != 0:
                raise InputError(f"unsupported PSBT version {version}: only version 0 is supported")
        elif ktype == PSBT_GLOBAL_PROPRIETARY:
            proprietary[_parse_proprietary(scope, keydata)] = value
        elif ktype in _V2_ONLY_GLOBAL:
            raise InputError(f"{scope}: {_V2_ONLY_GLOBAL[ktype]} field is not allowed in a version 0 PSBT")
        else:
            unknown[key] = value
    if tx is None:
        raise InputError("PSBT has no unsigned transaction (global key type 0x00)")
    return Psbt(tx=tx, inputs=[], outputs=[], xpubs=xpubs, version=version, proprietary=proprietary, unknown=unknown)


def _parse_input(  # noqa: C901 - one branch per BIP-174 input key type, in the spec's order (derivations first)
    records: list[tuple[int, bytes, bytes, bytes]],
    scope: str,
    valid_keys: set[bytes],
    prev_txs: dict[bytes, Any] | None = None,
) -> PsbtInput:
    inp = PsbtInput()
    for ktype, keydata, key, value in records:
        if ktype == PSBT_IN_BIP32_DERIVATION:  # first: the commonest record (one per key of the script)
            if keydata not in valid_keys:
                _check_pubkey(scope, "BIP-32 derivation", keydata, valid_keys)
            if len(value) == 28:  # a fingerprint and a 6-step path (BIP-48's): read at once
                inp.bip32_derivations[keydata] = _new_origin((value[:4], _PATH6.unpack_from(value, 4)))
            else:
                inp.bip32_derivations[keydata] = _parse_origin(scope, "BIP-32 derivation", value)
        elif ktype == PSBT_IN_NON_WITNESS_UTXO:
            _no_keydata(scope, "non-witness UTXO", keydata)
            inp.non_witness_utxo = _previous_tx(scope, value, prev_txs)
        elif ktype == PSBT_IN_WITNESS_UTXO:
            _no_keydata(scope, "witness UTXO", keydata)
            inp.witness_utxo = _parse_witness_utxo(scope, value)
        elif ktype == PSBT_IN_PARTIAL_SIG:
            _check_pubkey(scope, "partial signature", keydata, valid_keys)
            if not value:
                raise InputError(f"{scope}: empty partial signature for {keydata.hex()}")
            inp.partial_sigs[keydata] = value
        elif ktype == PSBT_IN_SIGHASH_TYPE:
            _no_keydata(scope, "sighash type", keydata)
            if len(value) != 4:
                raise InputError(f"{scope}: sighash type must be 4 bytes, found {len(value)}")
            inp.sighash_type = struct.unpack("<I", value)[0]
        elif ktype == PSBT_IN_REDEEM_SCRIPT:
            _no_keydata(scope, "redeem script", keydata)
            inp.redeem_script = value
        elif ktype == PSBT_IN_WITNESS_SCRIPT:
            _no_keydata(scope, "witness script", keydata)
            inp.witness_script = value
        elif ktype == PSBT_IN_FINAL_SCRIPTSIG:
            _no_keydata(scope, "final scriptSig", keydata)
            inp.final_script_sig = value
        elif ktype == PSBT_IN_FINAL_SCRIPTWITNESS:
            _no_keydata(scope, "final scriptWitness", keydata)
            inp.final_script_witness = _parse_witness_stack(scope, value)
        elif ktype == PSBT_IN_PROPRIETARY:
            inp.proprietary[_parse_proprietary(scope, keydata)] = value
        elif ktype in _V2_ONLY_INPUT:
            raise InputError(f"{scope}: {_V2_ONLY_INPUT[ktype]} field is not allowed in a version 0 PSBT")
        else:
            inp.unknown[key] = value
    return inp


def _previous_tx(scope: str, value: bytes, prev_txs: dict[bytes, Any] | None) -> Any:
    """A non-witness UTXO. Inputs spending outputs of one transaction carry it byte for byte the
    same: read once per PSBT (an immutable CTransaction, shared as copies of a PSBT share it)."""
    known = prev_txs.get(value) if prev_txs is not None else None
    if known is None:
        known = _parse_full_tx(scope, value)
        if prev_txs is not None:
            prev_txs[value] = known
    return known


def _parse_witness_utxo(scope: str, value: bytes) -> WitnessUtxo:
    if len(value) > 8 and value[8] < 0xFD and len(value) == 9 + value[8]:  # well formed: read at once
        amount = _I64.unpack_from(value)[0]
        spk = value[9:]
    else:
        vr = _Reader(value)
        amount = struct.unpack("<q", vr.read(8, f"{scope} witness UTXO amount"))[0]
        spk = vr.read(vr.compact_size(f"{scope} witness UTXO"), f"{scope} witness UTXO script")
        if not vr.at_end():
            raise InputError(f"{scope}: witness UTXO has {len(value) - vr.pos} trailing bytes")
    if not 0 <= amount <= MAX_MONEY:
        raise InputError(f"{scope}: witness UTXO amount {amount} is out of range")
    return WitnessUtxo(amount, spk)


def _parse_input_fast(data: bytes, pos: int, valid_keys: set[bytes]) -> tuple[PsbtInput, int] | None:
    """The input map at ``pos`` and the position after it, when the map holds only what a
    multisig spend's PSBT carries (witness UTXO, witness script, partial signatures, BIP-32
    derivations with 6-step paths), each record well formed with lengths under 253 and its key
    found valid before in this parse; None for anything else, and :func:`_parse_input` then
    reads the map whole (and refuses what is wrong). Both accept such a map alike."""
    size = len(data)
    inp = PsbtInput()
    while pos < size:
        keylen = data[pos]
        if keylen == 0:
            return inp, pos + 1
        vpos = pos + 1 + keylen  # the value's length
        if keylen >= 0xFD or vpos >= size or data[vpos] >= 0xFD or vpos + 1 + data[vpos] > size:
            return None
        end = vpos + 1 + data[vpos]
        ktype = data[pos + 1]
        if ktype == PSBT_IN_BIP32_DERIVATION and keylen == 34 and end - vpos == 29:
            pub = data[pos + 2 : vpos]
            if pub not in valid_keys or pub in inp.bip32_derivations:
                return None
            inp.bip32_derivations[pub] = _new_origin((data[vpos + 1 : vpos + 5], _PATH6.unpack_from(data, vpos + 5)))
        elif ktype == PSBT_IN_PARTIAL_SIG and keylen == 34 and end > vpos + 1:
            pub = data[pos + 2 : vpos]
            if pub not in valid_keys or pub in inp.partial_sigs:
                return None
            inp.partial_sigs[pub] = data[vpos + 1 : end]
        elif ktype == PSBT_IN_WITNESS_SCRIPT and keylen == 1 and inp.witness_script is None:
            inp.witness_script = data[vpos + 1 : end]
        elif ktype == PSBT_IN_WITNESS_UTXO and keylen == 1 and inp.witness_utxo is None and end - vpos > 10:
            amount = _I64.unpack_from(data, vpos + 1)[0]
            if data[vpos + 9] != end - vpos - 10 or not 0 <= amount <= MAX_MONEY:
                return None
            inp.witness_utxo = WitnessUtxo(amount, data[vpos + 10 : end])
        else:
            return None
        pos = end
    return None


def _parse_output(records: list[tuple[int, bytes, bytes, bytes]], scope: str, valid_keys: set[bytes]) -> PsbtOutput:
    out = PsbtOutput()
    for ktype, keydata, key, value in records:
        if ktype == PSBT_OUT_REDEEM_SCRIPT:
            _no_keydata(scope, "redeem script", keydata)
            out.redeem_script = value
        elif ktype == PSBT_OUT_WITNESS_SCRIPT:
            _no_keydata(scope, "witness script", keydata)
            out.witness_script = value
        elif ktype == PSBT_OUT_BIP32_DERIVATION:
            _check_pubkey(scope, "BIP-32 derivation", keydata, valid_keys)
            out.bip32_derivations[keydata] = _parse_origin(scope, "BIP-32 derivation", value)
        elif ktype == PSBT_OUT_PROPRIETARY:
            out.proprietary[_parse_proprietary(scope, keydata)] = value
        elif ktype in _V2_ONLY_OUTPUT:
            raise InputError(f"{scope}: {_V2_ONLY_OUTPUT[ktype]} field is not allowed in a version 0 PSBT")
        else:
            out.unknown[key] = value
    return out


def _serialize_input(inp: PsbtInput, scope: str) -> bytes:
    parts: list[bytes] = []
    add = parts.append
    if inp.non_witness_utxo is not None:
        add(_record(b"\x00", inp.non_witness_utxo.serialize()))
    if inp.witness_utxo is not None:
        add(_record(b"\x01", _ser_txout(inp.witness_utxo.amount, inp.witness_utxo.script_pubkey)))
    sigs = inp.partial_sigs
    for pub in sorted(sigs, key=hash160) if len(sigs) > 1 else sigs:  # Core's CKeyID order
        add(_record(b"\x02" + pub, sigs[pub]))
    if inp.sighash_type is not None:
        add(_record(b"\x03", struct.pack("<I", inp.sighash_type)))
    if inp.redeem_script is not None:
        add(_record(b"\x04", inp.redeem_script))
    if inp.witness_script is not None:
        add(_record(b"\x05", inp.witness_script))
    derivations = inp.bip32_derivations
    for pub in sorted(derivations):
        origin = derivations[pub]
        if len(pub) == 33 and len(origin.fingerprint) == 4 and len(origin.path) == 6:  # BIP-48's, at once
            try:
                add(b"\x22\x06" + pub + b"\x1c" + origin.fingerprint + _PATH6.pack(*origin.path))
                continue
            except struct.error:
                pass  # an element out of range: refused below, with its message
        add(_record(b"\x06" + pub, _ser_origin(origin)))
    if inp.final_script_sig is not None:
        add(_record(b"\x07", inp.final_script_sig))
    if inp.final_script_witness is not None:
        add(_record(b"\x08", _ser_witness_stack(inp.final_script_witness)))
    if inp.proprietary or inp.unknown:
        parts.extend(_extra_records(scope, _KNOWN_INPUT, inp.proprietary, inp.unknown))
    add(b"\x00")
    return b"".join(parts)


def _is_empty(out: PsbtOutput) -> bool:
    return (
        out.redeem_script is None
        and out.witness_script is None
        and not out.bip32_derivations
        and not out.proprietary
        and not out.unknown
    )


def _serialize_output(out: PsbtOutput, scope: str) -> bytes:
    if _is_empty(out):
        return b"\x00"
    parts: list[bytes] = []
    if out.redeem_script is not None:
        parts.append(_record(b"\x00", out.redeem_script))
    if out.witness_script is not None:
        parts.append(_record(b"\x01", out.witness_script))
    for pub in sorted(out.bip32_derivations):
        parts.append(_record(b"\x02" + pub, _ser_origin(out.bip32_derivations[pub])))
    parts.extend(_extra_records(scope, _KNOWN_OUTPUT, out.proprietary, out.unknown))
    parts.append(b"\x00")
    return b"".join(parts)


# --------------------------------------------------------------------------- combiner


@without_cycle_collection
def combine(psbts: Sequence[Psbt]) -> Psbt:
    """Merge PSBTs of one unsigned transaction into a new PSBT (the BIP-174 combiner).

    The result holds every record of every PSBT; the arguments are left unchanged.
    Raises InputError for an empty list, for PSBTs of different transactions, and when two
    PSBTs give different values for the same record (a custody tool does not pick one).
    """
    if not psbts:
        raise InputError("combine needs at least one PSBT")
    for p in psbts:
        p.check_maps()
    first = psbts[0]
    unsigned = first.unsigned_tx_bytes()
    result = first.copy()
    for n, other in enumerate(psbts[1:], start=1):
        if other.unsigned_tx_bytes() != unsigned:
            raise InputError(f"PSBT {n} is for a different unsigned transaction than PSBT 0")
        if other.version is not None:
            result.version = max(result.version or 0, other.version)
        _merge_dict(result.xpubs, other.xpubs, f"PSBT {n} global map", "extended public key")
        _merge_dict(result.proprietary, other.proprietary, f"PSBT {n} global map", "proprietary")
        _merge_dict(result.unknown, other.unknown, f"PSBT {n} global map", "unknown record")
        for i, (mine, theirs) in enumerate(zip(result.inputs, other.inputs, strict=True)):
            _merge_input(mine, theirs, f"PSBT {n} input {i}")
        for i, (mo, to) in enumerate(zip(result.outputs, other.outputs, strict=True)):
            if not _is_empty(to):  # an empty map (most outputs: no change) adds nothing
                _merge_output(mo, to, f"PSBT {n} output {i}")
    return result


def _merge_dict(dst: dict[Any, Any], src: Mapping[Any, Any], scope: str, what: str) -> None:
    for k, v in src.items():
        mine = dst.setdefault(k, v)
        if mine != v:
            shown = k.hex() if isinstance(k, bytes) else repr(k)
            raise InputError(f"{scope}: conflicting values for {what} {shown}")


def _merge_scalar(dst: Any, attr: str, src: Any, scope: str, what: str) -> None:
    theirs = getattr(src, attr)
    if theirs is None:
        return
    mine = getattr(dst, attr)
    if mine is None:
        setattr(dst, attr, theirs)
    elif mine != theirs:
        raise InputError(f"{scope}: conflicting values for the {what}")


def _merge_input(dst: PsbtInput, src: PsbtInput, scope: str) -> None:
    # Each field is looked at only when ``src`` has it (a signer's PSBT carries its signatures,
    # UTXO, script and derivations; most other fields are empty): what is merged is unchanged.
    if src.non_witness_utxo is not None:
        if dst.non_witness_utxo is None:
            dst.non_witness_utxo = src.non_witness_utxo
        elif dst.non_witness_utxo.serialize() != src.non_witness_utxo.serialize():
            raise InputError(f"{scope}: conflicting values for the non-witness UTXO")
    for attr, what in _INPUT_SCALARS:
        if getattr(src, attr) is not None:
            _merge_scalar(dst, attr, src, scope, what)
    for attr, what in _INPUT_DICTS:
        if getattr(src, attr):
            _merge_dict(getattr(dst, attr), getattr(src, attr), scope, what)


_INPUT_SCALARS = (
    ("witness_utxo", "witness UTXO"),
    ("sighash_type", "sighash type"),
    ("redeem_script", "redeem script"),
    ("witness_script", "witness script"),
    ("final_script_sig", "final scriptSig"),
    ("final_script_witness", "final scriptWitness"),
)
_INPUT_DICTS = (
    ("partial_sigs", "partial signature of"),
    ("bip32_derivations", "BIP-32 derivation of"),
    ("proprietary", "proprietary"),
    ("unknown", "unknown record"),
)


def _merge_output(dst: PsbtOutput, src: PsbtOutput, scope: str) -> None:
    _merge_scalar(dst, "redeem_script", src, scope, "redeem script")
    _merge_scalar(dst, "witness_script", src, scope, "witness script")
    _merge_dict(dst.bip32_derivations, src.bip32_derivations, scope, "BIP-32 derivation of")
    _merge_dict(dst.proprietary, src.proprietary, scope, "proprietary")
    _merge_dict(dst.unknown, src.unknown, scope, "unknown record")
