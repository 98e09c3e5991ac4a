"""Output descriptor checksums (BIP-380)."""

from __future__ import annotations

from custody.errors import InputError

_INPUT_CHARSET = "0123456789()[],'/*abcdefgh@:$%{}IJKLMNOPQRSTUVWXYZ&+-.;<=>?!^_|~ijklmnopqrstuvwxyzABCDEFGH`#\"\\ "
_CHECKSUM_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0xF5DEE51989, 0xA9FDCA3312, 0x1BAB10E32D, 0x3706B1677A, 0x644D626FFD)


def _polymod(c: int, val: int) -> int:
    c0 = c >> 35
    c = ((c & 0x7FFFFFFFF) << 5) ^ val
    for i, g in enumerate(_GENERATOR):
        if (c0 >> i) & 1:
            c ^= g
    return c


def descriptor_checksum(descriptor: str) -> str:
    """The 8-character BIP-380 checksum of ``descriptor`` (given without ``#...``).

    Raises InputError for a character outside the descriptor character set.
    """
    c = 1
    cls = 0
    clscount = 0
    for ch in descriptor:
        pos = _INPUT_CHARSET.find(ch)
        if pos == -1:
            raise InputError(f"character {ch!r} is not allowed in a descriptor")
        c = _polymod(c, pos & 31)
        cls = cls * 3 + (pos >> 5)
        clscount += 1
        if clscount == 3:
            c = _polymod(c, cls)
            cls = 0
            clscount = 0
    if clscount > 0:
        c = _polymod(c, cls)
    for _ in range(8):
        c = _polymod(c, 0)
    c ^= 1
    return "".join(_CHECKSUM_CHARSET[(c >> (5 * (7 - i))) & 31] for i in range(8))


def add_checksum(descriptor: str) -> str:
    """``descriptor#checksum``."""
    return f"{descriptor}#{descriptor_checksum(descriptor)}"


def check_checksum(text: str) -> str:
    """Validate ``descriptor#checksum`` and return the descriptor without it.

    Raises InputError when the checksum is missing, malformed or wrong, or when the text
    has more than one ``#``.
    """
    descriptor, sep, checksum = text.rpartition("#")
    if not sep:
        raise InputError("descriptor has no checksum")
    if "#" in descriptor:
        raise InputError("descriptor has more than one '#'")
    if len(checksum) != 8 or any(ch not in _CHECKSUM_CHARSET for ch in checksum):
        raise InputError(f"descriptor checksum {checksum!r} is not 8 checksum characters")
    expected = descriptor_checksum(descriptor)
    if checksum != expected:
        raise InputError(f"descriptor checksum mismatch: has {checksum}, expected {expected}")
    return descriptor
