"""Per-record checks (fast path + diagnosis) and the cross-set checks over a whole set.

The fast path derives the n founder keys at chain/index (3 CKDpub for 2-of-3), builds the
expected script and address and compares bytes and strings. Only a record that differs is
diagnosed, and the diagnosis names every distinct problem it finds.
"""

# size(module): the independent verifier stays one readable file with deliberate copies of our
#   primitives (it imports nothing of ours); an auditor reads it top to bottom
# size(Checker.diagnose): names every reason a record is wrong; the independent verifier is left as
#   it is
# size(check_batch): the verifier's batch check in one function, read by auditors; left as it is

from __future__ import annotations

import hashlib
import heapq
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate, islice
from typing import Any, NamedTuple

from .base58 import b58check_decode, b58check_encode
from .bech32 import P2WSHEncoder, decode_segwit_address
from .bip32 import ChildDeriver, InvalidChild, ckd_pub, hash160
from .errors import DecodeError, ExportError
from .export import ExportHeader, Trailer, parse_fields
from .manifest import Manifest
from .networks import NETWORKS, networks_of_base58_version, networks_of_hrp
from .script import KEY_PUSH, OP_1, OP_CHECKMULTISIG, ScriptError, parse_multisig
from .spill import Runs, spill_directory

MAX_INDEX = 2**31 - 1
NO_POSITION = 2**64 - 1  # fingerprint of a record whose chain/index is out of range


@dataclass(frozen=True)
class Failure:
    """One distinct problem with one record (a record may have several)."""

    address: str
    chain: int
    index: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The failure as a JSON-ready dict."""
        return {
            "address": self.address,
            "chain": self.chain,
            "index": self.index,
            "reason": self.reason,
        }


LISTED = 1000
"""A report keeps the details of this many failures, the first in record order; it counts
every failure and every failed record exactly (an insider who rewrote a million rows makes a
million failures, and the verifier's memory must not grow with them)."""


@dataclass
class Report:
    """The outcome of verifying a set of records: exact counts, the first ``limit`` details."""

    checked: int = 0
    failures: list[Failure] = field(default_factory=list)
    failure_count: int = 0
    failed_records: int = 0
    limit: int = field(default_factory=lambda: LISTED)

    def __post_init__(self) -> None:
        """A report made from a list of failures counts them (each distinct record once)."""
        if self.failures and not self.failure_count:
            self.failure_count = len(self.failures)
            self.failed_records = len({(f.chain, f.index, f.address) for f in self.failures})
        del self.failures[self.limit :]

    @property
    def ok(self) -> bool:
        """True when every record re-derived and no cross-set check failed."""
        return not self.failure_count

    @property
    def omitted(self) -> int:
        """How many failures are counted but not listed (beyond the first ``limit``)."""
        return self.failure_count - len(self.failures)

    def merge(self, other: Report) -> None:
        """Add ``other``'s counts and as many of its details as the bound leaves room for
        (``other`` covers records this report does not)."""
        self.checked += other.checked
        self.failure_count += other.failure_count
        self.failed_records += other.failed_records
        self.failures.extend(other.failures[: max(0, self.limit - len(self.failures))])

    def to_dict(self) -> dict[str, Any]:
        """Counts and the listed failures, JSON-ready."""
        return {
            "ok": self.ok,
            "checked": self.checked,
            "failed_records": self.failed_records,
            "failure_count": self.failure_count,
            "omitted": self.omitted,
            "failures": [f.to_dict() for f in self.failures],
        }


class Spec(NamedTuple):
    """What a worker needs of the manifest; plain values, cheap to pickle."""

    network: str
    threshold: int
    script_type: str
    founders: tuple[tuple[str, bytes, bytes], ...]  # (name, account key, chain code)


def spec_of(manifest: Manifest) -> Spec:
    """The picklable essentials of ``manifest``."""
    return Spec(
        manifest.network,
        manifest.threshold,
        manifest.script_type,
        tuple((f.name, f.key.key, f.key.chain_code) for f in manifest.founders),
    )


class Expected(NamedTuple):
    """What the founders' keys say belongs at one chain/index."""

    keys: tuple[tuple[str, bytes], ...]  # (founder name, child key), manifest order
    script: bytes
    payload: bytes  # witness program (p2wsh) or script hash (p2sh, p2sh-p2wsh)
    address: str
    script_pubkey: bytes


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _times(count: int) -> str:
    return {2: "twice", 3: "three times"}.get(count, f"{count} times")


class Checker:
    """Checks records against one manifest. Not thread-safe (the derivers reuse buffers)."""

    def __init__(self, spec: Spec) -> None:
        """Raises InvalidChild in the (2**-127) case that a founder has no chain key."""
        self.spec = spec
        self.network = NETWORKS[spec.network]
        self.m = spec.threshold
        self.n = len(spec.founders)
        self.names = [name for name, _, _ in spec.founders]
        self.script_type = spec.script_type
        # The founders' chain-level keys (xpub/0, xpub/1), derived once; None for a chain
        # on which a founder has no key (BIP-32 invalid child, probability 2**-127).
        self._fast: list[ChildDeriver | None] = []
        self._chain_errors: list[str | None] = []
        for chain in (0, 1):
            parents: list[tuple[bytes, bytes]] = []
            error = None
            for name, key, chain_code in spec.founders:
                try:
                    parents.append(ckd_pub(key, chain_code, chain))
                except InvalidChild:
                    error = f"founder {name} has no chain {chain} key (BIP-32 invalid child)"
            self._fast.append(None if error else ChildDeriver(parents))
            self._chain_errors.append(error)
        # Template pieces: OP_m 0x21 <key> 0x21 <key> ... 0x21 <key> OP_n OP_CHECKMULTISIG
        self._head = bytes([OP_1 - 1 + self.m, KEY_PUSH])
        self._tail = bytes([OP_1 - 1 + self.n, OP_CHECKMULTISIG])
        self._p2wsh = P2WSHEncoder(self.network.hrp) if self.script_type == "p2wsh" else None
        self._p2sh_version = bytes([self.network.p2sh_version])

    # -- the fast path ------------------------------------------------------------------

    def check(
        self,
        chain: Any,
        index: Any,
        address: Any,
        script: Any = None,
        script_pubkey: Any = None,
    ) -> list[str]:
        """Reasons why the record is wrong; empty when it re-derives. Raises nothing."""
        try:
            if self._matches(chain, index, address, script, script_pubkey):
                return []
            return self.diagnose(chain, index, address, script, script_pubkey)
        except Exception as exc:  # noqa: BLE001 - a bad record must never stop the run
            return [f"record could not be checked: {exc!r}"]

    def _matches(self, chain: Any, index: Any, address: Any, script: Any, script_pubkey: Any) -> bool:
        """True if the record is exactly what the keys say at chain/index (3 CKDs for n=3)."""
        if type(chain) is not int or type(index) is not int or not 0 <= index <= MAX_INDEX:
            return False
        deriver = self._fast[chain] if chain in (0, 1) else None
        if deriver is None:
            return False
        keys = deriver.children(index)
        if keys is None:
            return False
        keys.sort()  # BIP-67
        built = self._head + b"\x21".join(keys) + self._tail
        if script is not None and script != built:
            return False
        if self._p2wsh is not None:
            program = hashlib.sha256(built).digest()
            return address == self._p2wsh.encode(program) and (
                script_pubkey is None or script_pubkey == b"\x00\x20" + program
            )
        if self.script_type == "p2sh":
            script_hash = hash160(built)
        else:
            script_hash = hash160(b"\x00\x20" + hashlib.sha256(built).digest())
        return address == b58check_encode(self._p2sh_version + script_hash) and (
            script_pubkey is None or script_pubkey == b"\xa9\x14" + script_hash + b"\x87"
        )

    # -- what belongs at chain/index --------------------------------------------------------

    def payload_of(self, script: bytes, script_type: str | None = None) -> bytes:
        """The witness program or script hash an address of ``script`` commits to."""
        script_type = script_type or self.script_type
        if script_type == "p2wsh":
            return hashlib.sha256(script).digest()
        if script_type == "p2sh-p2wsh":
            return hash160(b"\x00\x20" + hashlib.sha256(script).digest())
        return hash160(script)

    def address_of(self, payload: bytes) -> str:
        """The address for ``payload`` on the manifest's network and script type."""
        if self._p2wsh is not None:
            return self._p2wsh.encode(payload)
        return b58check_encode(self._p2sh_version + payload)

    def script_pubkey_of(self, payload: bytes) -> bytes:
        """OP_0 <program> for p2wsh, OP_HASH160 <hash> OP_EQUAL for the p2sh types."""
        if self._p2wsh is not None:
            return b"\x00\x20" + payload
        return b"\xa9\x14" + payload + b"\x87"

    def expected(self, chain: int, index: int) -> Expected:
        """Keys, script, address and script_pubkey at chain/index (0 <= chain <= 1).

        Raises InvalidChild naming the founder if BIP-32 yields no key there.
        """
        deriver = self._fast[chain]
        if deriver is None:
            raise InvalidChild(str(self._chain_errors[chain]))
        children = deriver.children(index)
        if children is None:
            spec = self.spec.founders
            for name, key, chain_code in spec:  # name the founder without a key there
                try:
                    ckd_pub(*ckd_pub(key, chain_code, chain), index)
                except InvalidChild:
                    raise InvalidChild(
                        f"founder {name} has no key at {chain}/{index} "
                        "(BIP-32 invalid child; the index must be skipped)"
                    ) from None
            raise InvalidChild(f"no key at {chain}/{index}")  # pragma: no cover
        keys = list(zip(self.names, children, strict=True))
        built = self._head + b"\x21".join(sorted(k for _, k in keys)) + self._tail
        payload = self.payload_of(built)
        return Expected(
            tuple(keys),
            built,
            payload,
            self.address_of(payload),
            self.script_pubkey_of(payload),
        )

    # -- diagnosis ------------------------------------------------------------------------

    def diagnose(self, chain: Any, index: Any, address: Any, script: Any, script_pubkey: Any) -> list[str]:  # noqa: C901 - names every reason a record is wrong; the verifier stays apart
        """Every distinct reason why the record is wrong (empty if it is right)."""
        reasons: list[str] = []
        where = f"{chain}/{index}"
        position_ok = True
        if type(chain) is not int or chain not in (0, 1):
            reasons.append(f"chain {chain!r} is not 0 (receive) or 1 (change)")
            position_ok = False
        if type(index) is not int or not 0 <= index <= MAX_INDEX:
            reasons.append(f"index {index!r} is not in 0..{MAX_INDEX}")
            position_ok = False
        expected: Expected | None = None
        if position_ok:
            try:
                expected = self.expected(chain, index)
            except InvalidChild as exc:
                reasons.append(str(exc))
        if script is not None and not isinstance(script, bytes):
            reasons.append("script is not bytes")
            script = None
        if script_pubkey is not None and not isinstance(script_pubkey, bytes):
            reasons.append("script_pubkey is not bytes")
            script_pubkey = None
        payload = self._decode_address(address, reasons)

        script_reasons: list[str] = []
        if script is not None:
            script_reasons = self._diagnose_script(script, expected, where)
            reasons.extend(script_reasons)
        if payload is not None:
            script_payload = self.payload_of(script) if script is not None else None
            if script_reasons:
                # The script is wrong; say more only if the address matches nothing at all.
                if payload != script_payload and (expected is None or payload != expected.payload):
                    wanted = f" (expected {expected.address})" if expected is not None else ""
                    reasons.append(f"address matches neither its script nor the founders' keys at {where}" + wanted)
            elif expected is not None and payload != expected.payload:
                reasons.append(self._wrong_address(payload, expected, where))
            elif expected is None and script_payload is not None and payload != script_payload:
                reasons.append(f"address is not the {self.script_type} address of its script")
        if script_pubkey is not None:
            # One problem, one reason: a script_pubkey that agrees with the address or with
            # the founders' keys adds nothing to what is said above.
            agrees = (payload is not None and script_pubkey == self.script_pubkey_of(payload)) or (
                expected is not None and script_pubkey == expected.script_pubkey
            )
            if not agrees:
                reasons.append(
                    "script_pubkey does not match the address"
                    if payload is not None
                    else f"script_pubkey is not the one derived at {where}"
                )
        if not reasons:
            # Nothing named, so everything must equal what the keys say, independently.
            good = (
                expected is not None
                and payload == expected.payload
                and (script is None or script == expected.script)
                and (script_pubkey is None or script_pubkey == expected.script_pubkey)
            )
            if not good:
                wanted = expected.address if expected is not None else "none"
                reasons.append(f"record does not match the founders' keys at {where} (expected {wanted})")
        return reasons

    def _decode_address(self, address: Any, reasons: list[str]) -> bytes | None:
        """The address's payload if it is of the manifest's network and type, else None."""
        if not isinstance(address, str):
            reasons.append(f"address is not a string: {address!r}")
            return None
        try:
            networks, kind, payload = classify_address(address)
        except DecodeError as exc:
            reasons.append(f"address does not decode: {exc}")
            return None
        ok = True
        if self.network.name not in networks:
            found = "/".join(networks) if networks else "an unknown network"
            reasons.append(f"wrong network: address is for {found}, manifest says {self.network.name}")
            ok = False
        wanted = "p2wsh" if self.script_type == "p2wsh" else "p2sh"
        if kind != wanted:
            reasons.append(f"address type {kind}, manifest says {self.script_type}")
            ok = False
        return payload if ok else None

    def _wrong_address(self, payload: bytes, expected: Expected, where: str) -> str:
        other = {"p2sh": "p2sh-p2wsh", "p2sh-p2wsh": "p2sh"}.get(self.script_type)
        if other is not None and payload == self.payload_of(expected.script, other):
            return (
                f"address is the {other} address of the founders' script at {where}, manifest says {self.script_type}"
            )
        return f"address is not the one derived from the founders' keys at {where} (expected {expected.address})"

    def _diagnose_script(self, script: bytes, expected: Expected | None, where: str) -> list[str]:  # noqa: C901 - names every reason a script is wrong; the verifier stays apart
        try:
            ms = parse_multisig(script)
        except ScriptError as exc:
            return [f"script is not a multisig script: {exc}"]
        reasons: list[str] = []
        if ms.bytes_before:
            reasons.append(f"script has {_plural(ms.bytes_before, 'byte')} before OP_{ms.m}")
        if ms.bytes_after:
            reasons.append(f"script has {_plural(ms.bytes_after, 'byte')} after OP_CHECKMULTISIG")
        if (ms.m, ms.n) != (self.m, self.n):
            reasons.append(f"script is {ms.m}-of-{ms.n}, manifest says {self.m}-of-{self.n}")
        if len(ms.keys) != ms.n:
            reasons.append(f"script says OP_{ms.n} but pushes {_plural(len(ms.keys), 'key')}")
        for i, (key, opcode) in enumerate(zip(ms.keys, ms.key_opcodes, strict=True), start=1):
            if len(key) != 33 or key[0] not in (2, 3):
                prefix = f", prefix {key[0]:02x}" if key else ""
                reasons.append(f"key {i} is not a compressed public key ({_plural(len(key), 'byte')}{prefix})")
            elif opcode != KEY_PUSH:
                reasons.append(f"key {i} is pushed with opcode 0x{opcode:02x}, not 0x21")
        # An uncompressed key is compared in its compressed form, so that a founder's key
        # written uncompressed is named as such and not also as an outsider.
        keys = [_compressed(key) for key in ms.keys]
        positions: dict[bytes, list[int]] = {}
        for i, key in enumerate(keys, start=1):
            positions.setdefault(key, []).append(i)
        for same in positions.values():
            if len(same) > 1:
                reasons.append(f"keys {_join([str(i) for i in same])} are the same key")
        if keys == list(ms.keys) and keys != sorted(keys):  # BIP-67 orders compressed keys
            reasons.append("keys are not in BIP-67 order (sorted by their bytes)")
        if expected is not None:
            founder_keys = {key for _, key in expected.keys}
            for i, key in enumerate(keys, start=1):
                if key not in founder_keys:
                    reasons.append(f"key {i} is not a founder's child at {where} (outsider key)")
            present = set(keys)
            missing = [name for name, key in expected.keys if key not in present]
            if missing:
                reasons.append(
                    f"the script lacks the key of founder {_join(missing)} at {where}"
                    if len(missing) == 1
                    else f"the script lacks the keys of founders {_join(missing)} at {where}"
                )
        if not reasons and script != (expected.script if expected else script):
            reasons.append("script is not in the exact template encoding")
        return reasons


def _compressed(key: bytes) -> bytes:
    """The compressed form of a 65-byte uncompressed key (04 x y); other input unchanged."""
    if len(key) == 65 and key[0] == 4:
        return bytes([2 + (key[64] & 1)]) + key[1:33]
    return key


def classify_address(address: str) -> tuple[list[str], str, bytes]:
    """(networks it may belong to, kind, payload) of a segwit or base58 address.

    Kinds: p2wsh, p2wpkh, p2tr, "witness vN", p2sh, p2pkh. Raises DecodeError if it is
    neither (the message is the bech32 one when the string starts like a segwit address).
    """
    try:
        hrp, version, program = decode_segwit_address(address)
    except DecodeError as bech32_error:
        lower = address.lower()
        looks_segwit = any(lower.startswith(n.hrp + "1") for n in NETWORKS.values())
        try:
            payload = b58check_decode(address)
        except DecodeError as base58_error:
            raise (bech32_error if looks_segwit else base58_error) from None
        if len(payload) != 21:
            raise DecodeError(f"base58 payload is {len(payload)} bytes, expected 21") from None
        version_byte = payload[0]
        networks = networks_of_base58_version(version_byte)
        is_p2sh = any(n.p2sh_version == version_byte for n in NETWORKS.values())
        if not networks:
            raise DecodeError(f"unknown base58 address version {version_byte}") from None
        return networks, "p2sh" if is_p2sh else "p2pkh", payload[1:]
    if version == 0:
        kind = "p2wsh" if len(program) == 32 else "p2wpkh"
    elif version == 1 and len(program) == 32:
        kind = "p2tr"
    else:
        kind = f"witness v{version}"
    return networks_of_hrp(hrp), kind, program


# -- batches: the unit of work of the per-record checks ---------------------------------------

RecordTuple = tuple[Any, Any, Any, Any, Any]  # chain, index, address, script, script_pubkey


class BatchResult(NamedTuple):
    """What checking one batch yields; plain values, cheap to pickle back."""

    records: int
    # (position in batch, address, chain, index, reason)
    failures: list[tuple[int, str, int, int, str]]
    fingerprints: bytes  # 8 bytes per record: BLAKE2b-64 of the address
    positions: bytes  # array('Q'): chain << 32 | index, or NO_POSITION
    addresses: bytes  # the addresses, UTF-8, concatenated
    lengths: bytes  # array('I'): the length of each address in ``addresses``
    trailer: tuple[int, int] | None  # (line number, count) if the batch held the trailer
    error: tuple[int, str] | None  # (line number, message) of the first malformed line
    after_trailer: int | None  # first line number after the trailer in this batch, if any


def _as_failure_fields(address: Any, chain: Any, index: Any) -> tuple[str, int, int]:
    return (
        address if isinstance(address, str) else repr(address),
        chain if type(chain) is int else -1,
        index if type(index) is int else -1,
    )


def check_batch(
    checker: Checker,
    records: Iterable[RecordTuple] | None = None,
    lines: tuple[int, bytes] | None = None,
) -> BatchResult:
    """Check ``records`` (tuples), or raw export ``lines`` (first line number, a block of
    whole lines as ``ExportRecords.raw_batches`` yields them).

    With lines, parsing stops at the first malformed line and reports it in ``error``.
    Raises nothing for bad records.
    """
    trailer: tuple[int, int] | None = None
    error: tuple[int, str] | None = None
    after_trailer: int | None = None
    rows: list[RecordTuple] = []
    if records is not None:
        rows = list(records)
    elif lines is not None:
        lineno = lines[0] - 1
        block = lines[1]
        raw_lines: list[str] | list[bytes]
        try:
            raw_lines = block.decode("utf-8").split("\n")
        except UnicodeDecodeError:  # json.loads names the line
            raw_lines = block.split(b"\n")
        if block.endswith(b"\n"):
            raw_lines.pop()  # the empty string after the last newline
        for raw in raw_lines:
            lineno += 1
            if trailer is not None:
                if raw.strip():
                    after_trailer = lineno
                    break
                continue
            try:
                item = parse_fields(raw, lineno)
            except ExportError as exc:
                error = (lineno, str(exc))
                break
            if type(item) is Trailer:
                trailer = (lineno, item.count)
                continue
            rows.append(item[:5])  # type: ignore[index]

    failures: list[tuple[int, str, int, int, str]] = []
    check = checker.check
    for position, row in enumerate(rows):
        reasons = check(*row)
        if reasons:
            fields = _as_failure_fields(row[2], row[0], row[1])
            failures.extend((position, *fields, reason) for reason in reasons)

    encoded = [(a if type(a) is str else repr(a)).encode("utf-8", "surrogatepass") for _, _, a, _, _ in rows]
    blake2b = hashlib.blake2b
    positions = array(
        "Q",
        [
            c << 32 | i if type(c) is int and type(i) is int and c in (0, 1) and 0 <= i <= MAX_INDEX else NO_POSITION
            for c, i, _, _, _ in rows
        ],
    )
    return BatchResult(
        len(rows),
        failures,
        b"".join([blake2b(e, digest_size=8).digest() for e in encoded]),
        positions.tobytes(),
        b"".join(encoded),
        array("I", map(len, encoded)).tobytes(),
        trailer,
        error,
        after_trailer,
    )


SPILL_AT = 50_000
"""Up to this many records the cross-set checks keep their keys in memory (about 85 bytes a
record: an 8-byte fingerprint and the chain/index of each, the address itself, a bit); beyond
it every ``SPILL_AT`` records' keys are sorted and written to temporary files
(custody.verify.spill) and the duplicates found by merging them: memory stays bounded at any
number of records, the disk holds about 200 bytes a record (in ``$TMPDIR``)."""


class Collector:
    """Gathers batch results in order, then runs the cross-set checks.

    Failures are counted exactly and the first ``limit`` (in record order) kept: a record's
    own failures arrive together, in order, so a record is counted when its first arrives; a
    record that also fails a cross-set check is found in a bitmap of the failed records (one
    bit a record) while the keys are in memory, and by merging the failed records' ordinals
    once they are spilled (``spill_at``; see :data:`SPILL_AT`). ``close`` drops the
    temporary files. Raises SpillError (from ``add`` or ``report``) when they cannot be
    written or come back changed."""

    def __init__(self, limit: int | None = None, spill_at: int | None = None, spill_dir: str | None = None) -> None:
        self.limit = LISTED if limit is None else limit
        self.spill_at = max(1, SPILL_AT if spill_at is None else spill_at)
        self.spill_dir = spill_dir
        self.checked = 0
        self.failure_count = 0
        self.failed_records = 0
        self.listed: list[tuple[int, Failure]] = []  # the first ``limit`` per-record failures
        self.failed = bytearray()  # bit ordinal: the record has failed
        self.fingerprints = array("Q")
        # the keys of the records not yet spilled (all of them while nothing is)
        self.positions = array("Q")
        self.lengths = array("I")
        self.addresses = bytearray()
        self.spilled = 0  # records whose keys are in the runs
        self.runs: tuple[Runs, Runs, Runs] | None = None  # by address, by chain/index, failed ordinals

    def _mark(self, ordinal: int) -> None:
        """Count the record at ``ordinal`` as failed, once."""
        if self.runs is not None:  # per-record failures only: one call a record
            self.runs[2].add(ordinal.to_bytes(8, "big"))
            self.failed_records += 1
            return
        byte, bit = ordinal >> 3, 1 << (ordinal & 7)
        if not self.failed[byte] & bit:
            self.failed[byte] |= bit
            self.failed_records += 1

    def add(self, result: BatchResult) -> None:
        """Take one batch's result (batches must be added in order)."""
        base = self.checked
        if self.runs is None:
            self.failed.extend(bytes((base + result.records + 7) // 8 - len(self.failed)))
        previous = -1
        for pos, address, chain, index, reason in result.failures:
            self.failure_count += 1
            if pos != previous:  # a record's failures are adjacent
                self._mark(base + pos)
                previous = pos
            if len(self.listed) < self.limit:
                self.listed.append((base + pos, Failure(address, chain, index, reason)))
        if self.runs is None:
            self.fingerprints.frombytes(result.fingerprints)
        self.positions.frombytes(result.positions)
        self.lengths.frombytes(result.lengths)
        self.addresses += result.addresses
        self.checked += result.records
        if self.checked - self.spilled >= self.spill_at:
            self._spill()

    def _spill(self) -> None:
        """Write the keys held as two sorted runs: (address, ordinal, chain/index) and
        (chain/index, ordinal, address). The first spill also moves the failed records'
        bitmap into ordinals to merge, and drops the fingerprints (the runs compare the
        addresses themselves)."""
        if self.runs is None:
            directory = self.spill_dir or spill_directory()
            self.runs = (Runs(self.spill_at, directory), Runs(self.spill_at, directory), Runs(self.spill_at, directory))
            failed = self.runs[2]
            for ordinal in range(self.checked):
                if self.failed[ordinal >> 3] & 1 << (ordinal & 7):
                    failed.add(ordinal.to_bytes(8, "big"))
            self.failed = bytearray()
            self.fingerprints = array("Q")
        by_address, by_position, _ = self.runs
        by_address.write(self._keys(by_address=True))
        by_position.write(self._keys(by_address=False))
        self.addresses = bytearray()
        self.positions = array("Q")
        self.lengths = array("I")
        self.spilled = self.checked

    def _keys(self, by_address: bool) -> list[bytes]:
        """The held records' run items: (length, address, ordinal, chain/index) by address, or
        (chain/index, ordinal, address) by chain/index for those that have one. Big-endian
        numbers: the bytes sort as the values do; equal keys end up side by side, in record
        order."""
        out: list[bytes] = []
        held = self.addresses
        at = 0
        for ordinal, (length, pos) in enumerate(zip(self.lengths, self.positions, strict=True), start=self.spilled):
            address = held[at : at + length]
            at += length
            if by_address:
                out.append(length.to_bytes(4, "big") + address + ordinal.to_bytes(8, "big") + pos.to_bytes(8, "big"))
            elif pos != NO_POSITION:
                out.append(pos.to_bytes(8, "big") + ordinal.to_bytes(8, "big") + address)
        return out

    def close(self) -> None:
        """Drop the temporary files, if any were written."""
        if self.runs is not None:
            for runs in self.runs:
                runs.close()

    def report(self) -> Report:
        """Run the cross-set checks and return the report, the listed failures in record
        order (a record's own failures before its cross-set ones)."""
        if self.runs is not None:
            if self.checked > self.spilled:
                self._spill()
            cross = self._spilled_cross_set()
        else:
            first: list[tuple[int, int, Failure]] = []  # max-heap of the first ``limit`` cross-set failures
            for seq, (ordinal, failure) in enumerate(self._cross_set()):
                self.failure_count += 1
                self._mark(ordinal)
                heapq.heappush(first, (-ordinal, -seq, failure))
                if len(first) > self.limit:
                    heapq.heappop(first)
            cross = [(-o, f) for o, _, f in sorted(first, key=lambda item: (-item[0], -item[1]))]
        merged = heapq.merge(self.listed, cross, key=lambda item: item[0])
        return Report(
            self.checked,
            [f for _, f in islice(merged, self.limit)],
            self.failure_count,
            self.failed_records,
            self.limit,
        )

    def _address(self, offsets: list[int], ordinal: int) -> str:
        start = offsets[ordinal]
        raw = bytes(self.addresses[start : start + self.lengths[ordinal]])
        return raw.decode("utf-8", "surrogatepass")

    def _where(self, ordinal: int) -> tuple[int, int]:
        pos = self.positions[ordinal]
        if pos == NO_POSITION:
            return -1, -1
        return pos >> 32, pos & 0xFFFFFFFF

    def _name(self, ordinal: int) -> str:
        return (
            "{}/{}".format(*self._where(ordinal)) if self.positions[ordinal] != NO_POSITION else f"record {ordinal + 1}"
        )

    def _cross_set(self) -> Iterator[tuple[int, Failure]]:
        """(ordinal, failure) of every address listed twice and chain/index used twice."""
        dup_fps = _duplicates(self.fingerprints)
        dup_positions = _duplicates(self.positions) - {NO_POSITION}
        if not dup_fps and not dup_positions:
            return
        offsets = [0, *accumulate(self.lengths)]
        by_fp: dict[int, list[int]] = {}
        by_position: dict[int, list[int]] = {}
        for ordinal, (fp, pos) in enumerate(zip(self.fingerprints, self.positions, strict=True)):
            if fp in dup_fps:
                by_fp.setdefault(fp, []).append(ordinal)
            if pos in dup_positions:
                by_position.setdefault(pos, []).append(ordinal)
        for ordinals in by_fp.values():
            by_address: dict[str, list[int]] = {}
            for ordinal in ordinals:  # equal fingerprints: confirm on the address itself
                by_address.setdefault(self._address(offsets, ordinal), []).append(ordinal)
            for address, same in by_address.items():
                if len(same) < 2:
                    continue
                for ordinal in same:
                    chain, index = self._where(ordinal)
                    others = _others(same, ordinal, self._name)
                    reason = f"address listed {_times(len(same))} (also at {others})"
                    yield ordinal, Failure(address, chain, index, reason)
        for pos, same in by_position.items():
            chain, index = pos >> 32, pos & 0xFFFFFFFF
            for ordinal in same:
                others = _others(same, ordinal, lambda o: self._address(offsets, o))
                reason = f"chain/index {chain}/{index} used {_times(len(same))} (also by {others})"
                address = self._address(offsets, ordinal)
                yield ordinal, Failure(address, chain, index, reason)

    # -- beyond SPILL_AT: the same checks over the sorted runs ------------------------------------

    def _spilled_cross_set(self) -> list[tuple[int, Failure]]:
        """The first ``limit`` cross-set failures (ordinal, failure) in record order, an address's
        before a chain/index's; every one counted, and the failed records counted once each
        (by merging their ordinals). The same failures as :meth:`_cross_set`, found group by
        group in the merged runs: a group's members come in record order, so only its first
        ``limit`` can be listed and only they (and :data:`NAMED` + 1, to name the others) are
        held, however large the group."""
        assert self.runs is not None
        by_address, by_position, failed = self.runs
        first: list[tuple[int, int, Failure]] = []  # max-heap of (-ordinal, -kind, failure)
        for kind, (runs, parse) in enumerate(((by_address, _address_item), (by_position, _position_item))):
            for size, kept in self._groups(runs, parse):
                self.failure_count += size
                ordinals = [o for o, _, _ in kept]
                name = {o: _name_of(o, p) if kind == 0 else _text(a) for o, a, p in kept}.__getitem__
                for ordinal, address, pos in kept[: self.limit]:
                    if len(first) >= self.limit and (-ordinal, -kind) < first[0][:2]:
                        break  # the group's later members come later still: none is listed
                    others = _others(ordinals, ordinal, name, size)
                    chain, index = (-1, -1) if pos == NO_POSITION else (pos >> 32, pos & 0xFFFFFFFF)
                    if kind == 0:
                        reason = f"address listed {_times(size)} (also at {others})"
                    else:
                        reason = f"chain/index {chain}/{index} used {_times(size)} (also by {others})"
                    heapq.heappush(first, (-ordinal, -kind, Failure(_text(address), chain, index, reason)))
                    if len(first) > self.limit:
                        heapq.heappop(first)
        distinct, last = 0, b""
        for ordinal_bytes in failed.sorted():
            if ordinal_bytes != last:
                distinct += 1
                last = ordinal_bytes
        self.failed_records = distinct
        return [(-o, f) for o, _, f in sorted(first, key=lambda item: (-item[0], -item[1]))]

    def _groups(
        self, runs: Runs, parse: Callable[[bytes], tuple[bytes, int, bytes, int]]
    ) -> Iterator[tuple[int, list[tuple[int, bytes, int]]]]:
        """(size, its first members as (ordinal, address, chain/index)) of every key the sorted
        ``runs`` hold more than once; every member's ordinal goes to the failed records."""
        assert self.runs is not None
        failed = self.runs[2]
        keep = max(self.limit, NAMED + 1)
        key: bytes | None = None
        size = 0
        first = b""
        kept: list[tuple[int, bytes, int]] = []
        for item in runs.sorted():
            # the key alone while it differs from the one before (the honest case: every item)
            k = item[:8] if parse is _position_item else item[: 4 + int.from_bytes(item[:4], "big")]
            if k != key:
                if size > 1:
                    yield size, kept
                key, size, first = k, 1, item
                continue
            size += 1
            if size == 2:
                _, ordinal, address, pos = parse(first)
                kept = [(ordinal, address, pos)]
                failed.add(ordinal.to_bytes(8, "big"))
            _, ordinal, address, pos = parse(item)
            if size <= keep:
                kept.append((ordinal, address, pos))
            failed.add(ordinal.to_bytes(8, "big"))
        if size > 1:
            yield size, kept


def _address_item(item: bytes) -> tuple[bytes, int, bytes, int]:
    """(key, ordinal, address, chain/index) of a run item: length, address, ordinal, chain/index."""
    n = int.from_bytes(item[:4], "big")
    return (
        item[: 4 + n],
        int.from_bytes(item[4 + n : 12 + n], "big"),
        item[4 : 4 + n],
        int.from_bytes(item[12 + n :], "big"),
    )


def _position_item(item: bytes) -> tuple[bytes, int, bytes, int]:
    """(key, ordinal, address, chain/index) of a run item: chain/index, ordinal, address."""
    return item[:8], int.from_bytes(item[8:16], "big"), item[16:], int.from_bytes(item[:8], "big")


def _text(address: bytes) -> str:
    return address.decode("utf-8", "surrogatepass")


def _name_of(ordinal: int, pos: int) -> str:
    return f"{pos >> 32}/{pos & 0xFFFFFFFF}" if pos != NO_POSITION else f"record {ordinal + 1}"


NAMED = 5
"""A duplicate's failure names at most this many of the others (a million records of one
address would otherwise name a million others each: a million squared)."""


def _others(same: list[int], ordinal: int, name: Callable[[int], str], size: int | None = None) -> str:
    """The first :data:`NAMED` of ``same`` other than ``ordinal``, by ``name``, and how many more
    (of ``size`` in all, when ``same`` holds only the first of them)."""
    named = [name(o) for o in islice((o for o in same if o != ordinal), NAMED)]
    more = (len(same) if size is None else size) - 1 - len(named)
    return _join(named) if not more else ", ".join(named) + f" and {more} more"


DUPLICATE_PARTS = 16
"""The values are looked at in this many parts (by remainder): a set of a sixteenth of a
million values at a time, not of the million (tens of megabytes of integers)."""


def _duplicates(values: array[int]) -> set[int]:
    """The values that occur more than once."""
    parts = DUPLICATE_PARTS if len(values) > 65536 else 1
    found: set[int] = set()
    for part in range(parts):
        some = values if parts == 1 else [v for v in values if v % parts == part]
        if len(set(some)) == len(some):
            continue
        ordered = sorted(some)
        found.update(a for a, b in zip(ordered, islice(ordered, 1, None), strict=False) if a == b)
    return found


# -- the issuance path --------------------------------------------------------------------

_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def checker_for(manifest: Manifest) -> Checker:
    """A Checker for ``manifest``, built once (chain-level keys derived once)."""
    return Checker(spec_of(manifest))


def verify_address(manifest: Manifest, chain: int, index: int, address: str) -> list[str]:
    """Reasons why ``address`` is not the one at chain/index; empty when it is. Raises nothing
    for a bad address or position (they are reasons); thread-safe."""
    checker = checker_for(manifest)
    with _LOCK:
        return checker.check(chain, index, address)


def check_header(manifest: Manifest, header: ExportHeader) -> None:
    """Raises ExportError listing every way the export header disagrees with the manifest."""
    problems = []
    if header.network != manifest.network:
        problems.append(f"network is {header.network}, manifest says {manifest.network}")
    if header.threshold != manifest.threshold:
        problems.append(f"threshold is {header.threshold}, manifest says {manifest.threshold}")
    if header.script_type != manifest.script_type:
        problems.append(f"script_type is {header.script_type}, manifest says {manifest.script_type}")
    if problems:
        raise ExportError("line 1: the export header does not match the manifest: " + "; ".join(problems))
