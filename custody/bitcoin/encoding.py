"""Bitcoin's serialization helpers and hashes, written once: compact sizes, SHA-256d, HASH160,
and the constants every layer shares (the money supply's cap, secp256k1's group order)."""

from __future__ import annotations

import hashlib
from typing import BinaryIO

# The most satoshis that can ever exist (Bitcoin Core's MAX_MONEY).
MAX_MONEY = 21_000_000 * 100_000_000
# The order of secp256k1's group (SEC 2, section 2.4.1).
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha256d(data: bytes) -> bytes:
    """SHA256(SHA256(data)): transaction and block hashes, checksums."""
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def hash160(data: bytes) -> bytes:
    """RIPEMD160(SHA256(data)) with hashlib (not python-bitcoinlib's pure-Python one)."""
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


def ser_compact_size(n: int) -> bytes:
    """Bitcoin's CompactSize: 1 byte below 0xFD, else a marker and 2, 4 or 8 bytes little-endian."""
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    if n <= 0xFFFFFFFF:
        return b"\xfe" + n.to_bytes(4, "little")
    return b"\xff" + n.to_bytes(8, "little")


def compact_size_len(n: int) -> int:
    """How many bytes :func:`ser_compact_size` writes for ``n``."""
    return 1 if n < 0xFD else 3 if n <= 0xFFFF else 5 if n <= 0xFFFFFFFF else 9


def read_compact_size(f: BinaryIO) -> int:
    """Read a CompactSize from a stream. Raises ValueError when it is truncated.

    Non-minimal encodings are accepted here (the PSBT parser checks minimality itself).
    """
    first = f.read(1)
    if not first:
        raise ValueError("truncated")
    width = {0xFD: 2, 0xFE: 4, 0xFF: 8}.get(first[0])
    if width is None:
        return first[0]
    data = f.read(width)
    if len(data) != width:
        raise ValueError("truncated")
    return int.from_bytes(data, "little")
