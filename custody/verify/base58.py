"""Base58 and Base58Check (the Bitcoin alphabet), standard library only."""

from __future__ import annotations

from hashlib import sha256

from .errors import DecodeError

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
# All two-digit strings: encoding divides by 58**2 per step, half the Python-level loop.
_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]


def b58encode(data: bytes) -> str:
    """Encode ``data`` in base58; each leading zero byte becomes a '1'. Raises nothing."""
    n = int.from_bytes(data, "big")
    parts: list[str] = []
    while n:
        n, r = divmod(n, 3364)
        parts.append(_PAIRS[r])
    digits = "".join(reversed(parts)).lstrip("1")
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + digits


def b58decode(text: str) -> bytes:
    """Decode base58 ``text``. Raises DecodeError on a character outside the alphabet."""
    n = 0
    for pos, c in enumerate(text):
        d = _INDEX.get(c)
        if d is None:
            raise DecodeError(f"invalid base58 character {c!r} at position {pos}")
        n = n * 58 + d
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + n.to_bytes((n.bit_length() + 7) // 8, "big")


def checksum(payload: bytes) -> bytes:
    """First four bytes of SHA256(SHA256(payload))."""
    return sha256(sha256(payload).digest()).digest()[:4]


def b58check_encode(payload: bytes) -> str:
    """Base58Check: base58 of ``payload`` followed by its four-byte checksum. Raises nothing."""
    return b58encode(payload + checksum(payload))


def b58check_decode(text: str) -> bytes:
    """Decode Base58Check ``text`` to its payload.

    Raises DecodeError on a bad character, a string too short or a bad checksum.
    """
    raw = b58decode(text)
    if len(raw) < 4:
        raise DecodeError("base58check string too short")
    payload, check = raw[:-4], raw[-4:]
    if checksum(payload) != check:
        raise DecodeError("invalid checksum")
    return payload
