"""Bech32 (BIP-173) and bech32m (BIP-350) strings and segwit addresses, standard library only.

Besides the reference-style encoder and decoder there is ``P2WSHEncoder``, the fast path of
the verifier: the checksum is affine over GF(2) in the bits of the witness program, so it is
precomputed per program byte; an address costs 32 + 18 table look-ups and no checksum loop.
"""

from __future__ import annotations

import enum
import operator
from functools import reduce

from .errors import DecodeError

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHARSET_INDEX = {c: i for i, c in enumerate(CHARSET)}
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
# _TABLE[top5] = XOR of the generator terms selected by the five bits shifted out of the state.
_TABLE = tuple(reduce(operator.xor, (g for i, g in enumerate(_GENERATOR) if (top >> i) & 1), 0) for top in range(32))


class Encoding(enum.Enum):
    """The checksum variant: bech32 (BIP-173) or bech32m (BIP-350)."""

    BECH32 = 1
    BECH32M = 0x2BC830A3


def polymod(values: list[int] | bytes) -> int:
    """BCH checksum state over 5-bit ``values`` (BIP-173 ``bech32_polymod``)."""
    chk = 1
    for v in values:
        chk = ((chk & 0x1FFFFFF) << 5) ^ v ^ _TABLE[chk >> 25]
    return chk


def hrp_expand(hrp: str) -> list[int]:
    """The human-readable part as checksummed: high bits, a zero, low bits."""
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def create_checksum(hrp: str, data: list[int], spec: Encoding) -> list[int]:
    """The six checksum values for ``hrp`` and 5-bit ``data``."""
    pm = polymod(hrp_expand(hrp) + data + [0] * 6) ^ spec.value
    return [(pm >> 5 * (5 - i)) & 31 for i in range(6)]


def bech32_encode(hrp: str, data: list[int], spec: Encoding) -> str:
    """Encode ``hrp`` and 5-bit ``data`` as a bech32/bech32m string. Raises nothing."""
    combined = data + create_checksum(hrp, data, spec)
    return hrp + "1" + "".join(CHARSET[d] for d in combined)


def bech32_decode(text: str) -> tuple[str, list[int], Encoding]:
    """Decode a bech32/bech32m string to (hrp in lower case, 5-bit data, encoding).

    Raises DecodeError naming the rule broken (mixed case, length, characters, checksum).
    """
    if any(ord(c) < 33 or ord(c) > 126 for c in text):
        raise DecodeError("character outside the printable US-ASCII range")
    if text.lower() != text and text.upper() != text:
        raise DecodeError("mixed upper and lower case")
    if len(text) > 90:
        raise DecodeError(f"too long ({len(text)} characters, at most 90)")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1:
        raise DecodeError("empty human-readable part" if pos == 0 else "no separator '1'")
    if pos + 7 > len(text):
        raise DecodeError("checksum too short")
    hrp = text[:pos]
    data: list[int] = []
    for i, c in enumerate(text[pos + 1 :], start=pos + 1):
        d = _CHARSET_INDEX.get(c)
        if d is None:
            raise DecodeError(f"invalid data character {c!r} at position {i}")
        data.append(d)
    const = polymod(hrp_expand(hrp) + data)
    for spec in Encoding:
        if const == spec.value:
            return hrp, data[:-6], spec
    raise DecodeError("invalid checksum")


def convertbits(data: list[int] | bytes, frombits: int, tobits: int, pad: bool) -> list[int]:
    """Regroup bits. Raises DecodeError on a value out of range or invalid padding."""
    acc = 0
    bits = 0
    ret: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        if value < 0 or value >> frombits:
            raise DecodeError("value out of range")
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            ret.append((acc >> bits) & maxv)
    if pad:
        if bits:
            ret.append((acc << (tobits - bits)) & maxv)
    elif bits >= frombits or ((acc << (tobits - bits)) & maxv):
        raise DecodeError("invalid padding")
    return ret


def decode_segwit_address(address: str) -> tuple[str, int, bytes]:
    """Decode a segwit address to (hrp, witness version, witness program).

    Applies BIP-173/BIP-350: version 0 needs bech32 and a 20- or 32-byte program, versions
    1..16 need bech32m and a 2..40-byte program. Raises DecodeError naming the rule broken.
    """
    hrp, data, spec = bech32_decode(address)
    if not data:
        raise DecodeError("no witness version")
    version = data[0]
    if version > 16:
        raise DecodeError(f"invalid witness version {version}")
    program = bytes(convertbits(data[1:], 5, 8, False))
    if not 2 <= len(program) <= 40:
        raise DecodeError(f"invalid witness program length {len(program)}")
    if version == 0 and len(program) not in (20, 32):
        raise DecodeError(f"invalid version 0 witness program length {len(program)}")
    if version == 0 and spec is not Encoding.BECH32:
        raise DecodeError("witness version 0 must use bech32, not bech32m")
    if version != 0 and spec is not Encoding.BECH32M:
        raise DecodeError(f"witness version {version} must use bech32m, not bech32")
    return hrp, version, program


def encode_segwit_address(hrp: str, version: int, program: bytes) -> str:
    """Encode a segwit address (bech32 for version 0, bech32m otherwise).

    Raises DecodeError if the result would not decode (bad version or program length).
    """
    spec = Encoding.BECH32 if version == 0 else Encoding.BECH32M
    address = bech32_encode(hrp, [version] + convertbits(program, 8, 5, True), spec)
    decode_segwit_address(address)
    return address


# Three characters from 15 bits (data and checksum alike).
_TRIPLES = [CHARSET[i >> 10] + CHARSET[(i >> 5) & 31] + CHARSET[i & 31] for i in range(1 << 15)]
_SHIFTS = range(260, -1, -15)


class P2WSHEncoder:
    """Fast encoder of version 0, 32-byte witness programs (P2WSH) for one hrp."""

    def __init__(self, hrp: str) -> None:
        prefix = hrp_expand(hrp) + [0]

        def checksum(program: bytes) -> int:
            values = prefix + convertbits(program, 8, 5, True) + [0] * 6
            return polymod(values) ^ Encoding.BECH32.value

        zero = bytes(32)
        self._base = checksum(zero)
        tables: list[list[int]] = []
        for pos in range(32):
            bits = []
            for bit in range(8):
                program = bytearray(zero)
                program[pos] = 1 << bit
                bits.append(checksum(bytes(program)) ^ self._base)
            row = [0] * 256
            for value in range(1, 256):
                low = value & -value
                row[value] = row[value ^ low] ^ bits[low.bit_length() - 1]
            tables.append(row)
        self._tables = tables
        self._head = hrp + "1q"

    def encode(self, program: bytes) -> str:
        """The bech32 address of the 32-byte ``program``; garbage in, garbage out."""
        chk = reduce(operator.xor, map(list.__getitem__, self._tables, program), self._base)
        # 256 program bits + 4 zero bits of padding = 52 characters; read 15 bits at a time.
        bits = int.from_bytes(program, "big") << 19
        data = "".join([_TRIPLES[(bits >> s) & 0x7FFF] for s in _SHIFTS])[:52]
        return self._head + data + _TRIPLES[chk >> 15] + _TRIPLES[chk & 0x7FFF]
