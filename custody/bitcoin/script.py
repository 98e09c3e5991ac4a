"""Scripts: the multisig script types custody spends, ``OP_CHECKMULTISIG`` parsing, minimal
pushes, and the signature encoding rules (BIP-66 strict DER, low S) every layer checks the same way."""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass

from custody.bitcoin.encoding import SECP256K1_ORDER
from custody.errors import InputError

_OP_0 = 0x00
_OP_1 = 0x51
_OP_16 = 0x60
_OP_CHECKMULTISIG = 0xAE
_MAX_MULTISIG_KEYS = 20


class ScriptType(enum.StrEnum):
    """How the m-of-n multisig script is wrapped into an output."""

    P2WSH = "p2wsh"
    P2SH_P2WSH = "p2sh-p2wsh"
    P2SH = "p2sh"

    @property
    def max_keys(self) -> int:
        """Most keys a script of this type may hold.

        P2SH: the redeem script is limited to 520 bytes, so 15 compressed keys
        (15 * 34 + 3 = 513). Segwit: OP_CHECKMULTISIG's limit of 20 keys.
        """
        return 15 if self is ScriptType.P2SH else 20

    @property
    def bip48_script_index(self) -> int | None:
        """BIP-48's script type step: 1' for p2sh-p2wsh, 2' for p2wsh; none for p2sh."""
        return {ScriptType.P2WSH: 2, ScriptType.P2SH_P2WSH: 1}.get(self)

    def wrap(self, inner: str) -> str:
        return {
            ScriptType.P2WSH: f"wsh({inner})",
            ScriptType.P2SH_P2WSH: f"sh(wsh({inner}))",
            ScriptType.P2SH: f"sh({inner})",
        }[self]


def parse_script_type(text: str) -> ScriptType:
    """Raises InputError for an unknown script type."""
    try:
        return ScriptType(text.strip().lower())
    except ValueError:
        choices = ", ".join(t.value for t in ScriptType)
        raise InputError(f"unknown script type {text!r}: expected one of {choices}") from None


def is_p2wsh(spk: bytes) -> bool:
    # OP_0 <32-byte sha256(witness script)>
    return len(spk) == 34 and spk[0] == _OP_0 and spk[1] == 0x20


def is_p2sh(spk: bytes) -> bool:
    # OP_HASH160 <20-byte hash160(redeem script)> OP_EQUAL
    return len(spk) == 23 and spk[0] == 0xA9 and spk[1] == 0x14 and spk[22] == 0x87


@dataclass(frozen=True)
class Multisig:
    """An m-of-n ``OP_CHECKMULTISIG`` script: threshold and public keys in script order."""

    threshold: int
    pubkeys: tuple[bytes, ...]


def _read_small_int(script: bytes, pos: int) -> tuple[int, int] | None:
    """A number pushed minimally: OP_1..OP_16, or 17..20 as a one-byte push."""
    if pos >= len(script):
        return None
    op = script[pos]
    if _OP_1 <= op <= _OP_16:
        return op - _OP_1 + 1, pos + 1
    if op == 0x01 and pos + 1 < len(script) and 17 <= script[pos + 1] <= _MAX_MULTISIG_KEYS:
        return script[pos + 1], pos + 2
    return None


def parse_multisig(script: bytes) -> Multisig:
    """Parse ``OP_m <pubkey_1> ... <pubkey_n> OP_n OP_CHECKMULTISIG`` (compressed keys).

    m and n are OP_1..OP_16, or a one-byte push for 17..20; 1 <= m <= n <= 20 and the keys
    are pairwise distinct. Raises InputError for any other script.

    The answer depends on the script's bytes alone and :class:`Multisig` is immutable, so the
    last scripts parsed are remembered (a 500-input spend has one script on every input); a
    refusal is never remembered: it is raised again on every call.
    """
    return _parse_multisig(bytes(script))


@functools.lru_cache(maxsize=256)
def _parse_multisig(script: bytes) -> Multisig:
    bad = f"not an m-of-n OP_CHECKMULTISIG script of compressed keys: {script.hex()}"
    first = _read_small_int(script, 0)
    if first is None:
        raise InputError(bad)
    m, pos = first
    keys: list[bytes] = []
    while pos < len(script) and script[pos] == 0x21:
        key = script[pos + 1 : pos + 34]
        if len(key) != 33 or key[0] not in (2, 3):
            raise InputError(bad)
        keys.append(key)
        pos += 34
    last = _read_small_int(script, pos)
    if last is None:
        raise InputError(bad)
    n, pos = last
    if pos != len(script) - 1 or script[pos] != _OP_CHECKMULTISIG:
        raise InputError(bad)
    if n != len(keys) or not 1 <= m <= n:
        raise InputError(f"multisig script has threshold {m}, {n} declared keys, {len(keys)} keys")
    if len(set(keys)) != len(keys):
        raise InputError("multisig script repeats a public key")
    return Multisig(m, tuple(keys))


def is_strict_der(sig: bytes) -> bool:
    """BIP-66 strict DER (Bitcoin Core's IsValidSignatureEncoding), sighash byte included.

    0x30 [total-length] 0x02 [R-length] [R] 0x02 [S-length] [S] [sighash]
    """
    n = len(sig)
    if n < 9 or n > 73 or sig[0] != 0x30 or sig[1] != n - 3:
        return False
    len_r = sig[3]
    if 5 + len_r >= n:
        return False
    len_s = sig[5 + len_r]
    if len_r + len_s + 7 != n or sig[2] != 0x02 or len_r == 0 or sig[4] & 0x80:
        return False
    if len_r > 1 and sig[4] == 0x00 and not sig[5] & 0x80:
        return False
    if sig[len_r + 4] != 0x02 or len_s == 0 or sig[len_r + 6] & 0x80:
        return False
    return not (len_s > 1 and sig[len_r + 6] == 0x00 and not sig[len_r + 7] & 0x80)


def is_low_s(der: bytes) -> bool:
    """True when a strict-DER signature (without a sighash byte) has S at most half the group order."""
    len_r = der[3]
    s = int.from_bytes(der[6 + len_r : 6 + len_r + der[5 + len_r]], "big")
    return s <= SECP256K1_ORDER // 2


def push(data: bytes) -> bytes:
    """A minimal push of ``data`` (as in a scriptSig)."""
    n = len(data)
    if n == 0:
        return b"\x00"  # OP_0
    if n < 0x4C:
        return bytes([n]) + data
    if n <= 0xFF:
        return b"\x4c" + bytes([n]) + data  # OP_PUSHDATA1
    return b"\x4d" + struct.pack("<H", n) + data  # OP_PUSHDATA2
