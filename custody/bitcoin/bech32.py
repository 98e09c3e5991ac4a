"""Segwit address encoding and decoding (BIP-173 bech32, BIP-350 bech32m).

python-bitcoinlib's encoder knows no bech32m and costs about 100 µs per address; this one
is table-driven and is on the issuance hot path.
"""

from __future__ import annotations

from functools import lru_cache

from custody.errors import InputError

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHARSET_REV = {c: i for i, c in enumerate(CHARSET)}
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _table_entry(top: int) -> int:
    word = 0
    for i, gen in enumerate(_GEN):
        if (top >> i) & 1:
            word ^= gen
    return word


# _TABLE[top] is the xor of the generator words selected by the five bits of ``top``.
_TABLE = tuple(_table_entry(top) for top in range(32))
BECH32_CONST = 1
BECH32M_CONST = 0x2BC830A3


def _polymod(values: list[int] | bytes, chk: int = 1) -> int:
    table = _TABLE
    for v in values:
        chk = ((chk & 0x1FFFFFF) << 5) ^ v ^ table[chk >> 25]
    return chk


@lru_cache(maxsize=16)
def _hrp_state(hrp: str) -> int:
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    return _polymod(expanded)


def _to_5bit(data: bytes) -> list[int]:
    """Regroup bytes into 5-bit values, zero-padded at the end (BIP-173 convertbits)."""
    bits = len(data) * 8
    groups = -(-bits // 5)
    value = int.from_bytes(data, "big") << (groups * 5 - bits)
    return [(value >> shift) & 31 for shift in range(groups * 5 - 5, -1, -5)]


def _from_5bit(data: list[int]) -> bytes | None:
    acc = 0
    bits = 0
    out = bytearray()
    for value in data:
        acc = (acc << 5) | value
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    if bits >= 5 or (acc << (8 - bits)) & 0xFF:
        return None
    return bytes(out)


def encode_segwit(hrp: str, version: int, program: bytes) -> str:
    """The segwit address of ``program`` (bech32 for v0, bech32m for v1+)."""
    data = [version, *_to_5bit(program)]
    const = BECH32_CONST if version == 0 else BECH32M_CONST
    chk = _polymod(data + [0] * 6, _hrp_state(hrp)) ^ const
    checksum = [(chk >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[d] for d in data + checksum)


def decode_segwit(hrp: str, address: str) -> tuple[int, bytes]:
    """Decode a segwit address of ``hrp`` into (witness version, program).

    Raises InputError naming what is wrong: mixed case, bad characters or checksum,
    another network's prefix, a bad program length or the wrong checksum variant.
    """
    if address.lower() != address and address.upper() != address:
        raise InputError("segwit address mixes upper and lower case")
    addr = address.lower()
    if len(addr) > 90:
        raise InputError("segwit address longer than 90 characters")
    pos = addr.rfind("1")
    if pos < 1 or pos + 7 > len(addr):
        raise InputError("not a segwit address (no separator or checksum)")
    got_hrp = addr[:pos]
    if got_hrp != hrp:
        raise InputError(f"address is for another network (prefix {got_hrp!r}, expected {hrp!r})")
    try:
        data = [_CHARSET_REV[c] for c in addr[pos + 1 :]]
    except KeyError:
        raise InputError("segwit address has a character outside the bech32 alphabet") from None
    const = _polymod(data, _hrp_state(hrp))
    if const not in (BECH32_CONST, BECH32M_CONST):
        raise InputError("bad segwit address checksum (mistyped address?)")
    values = data[:-6]
    if not values:
        raise InputError("segwit address has no witness version")
    version = values[0]
    if version > 16:
        raise InputError(f"invalid witness version {version}")
    program = _from_5bit(values[1:])
    if program is None or not 2 <= len(program) <= 40:
        raise InputError("invalid witness program")
    if version == 0 and len(program) not in (20, 32):
        raise InputError("a version 0 witness program is 20 or 32 bytes")
    if (version == 0) != (const == BECH32_CONST):
        raise InputError("wrong checksum variant (bech32 for v0, bech32m for v1 and later)")
    return version, program
