"""BBQr ("Better Bitcoin QR", Coinkite's public-domain spec): a file split across QR frames.

Each frame's text is an 8-character header, then part of the encoded file::

    B$          fixed
    Z           encoding: H hex (upper case), 2 Base32 (RFC 4648, no padding),
                Z zlib (wbits 10, no header) then Base32
    P           file type: P PSBT, T transaction, J JSON, U text, B binary, ...
    05          number of frames, two base-36 digits (upper case)
    00          this frame's index, two base-36 digits

Every frame but the last carries the same number of characters, each a whole number of
bytes (hex: even; Base32: a multiple of 8 characters). Only alphanumeric-mode characters
are used (``0-9A-Z$%*+-./:``), so the QR stays dense. There is no checksum: QR codes carry
their own error correction, and what a set joins to is parsed (a PSBT) and, on the signer,
checked in full before anything is signed.

:func:`split` makes frames (Z when it is shorter, else 2); :func:`join` takes frames in any
order, repeats included (an animation loops), and refuses a set that is mixed, incomplete or
corrupted, naming what is wrong. Pure: no images here (see :mod:`custody.qrcodes`).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from custody.errors import InputError

PREFIX = "B$"
HEADER_LEN = 8
MAX_FRAMES = 36 * 36 - 1  # "ZZ"
MAX_FRAME_CHARS = 4296 - HEADER_LEN  # a version-40 QR, level L, alphanumeric
FRAME_BYTES = 400
"""Bytes of the encoded file per frame when splitting (Base32: 640 characters, a version-17
QR at level L): small enough for a laptop camera to read off a screen."""
ENCODINGS = ("H", "2", "Z")
FILE_TYPES = frozenset("PTJCUBX")
ZLIB_WBITS = 10
_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Frame:
    """One frame's header fields and its data characters."""

    encoding: str
    file_type: str
    total: int
    index: int
    data: str

    @property
    def set_header(self) -> str:
        """The first 6 characters, the same in every frame of one set."""
        return PREFIX + self.encoding + self.file_type + _base36(self.total)


def split(data: bytes, file_type: str = "P", frame_bytes: int = FRAME_BYTES) -> list[str]:
    """The frames of ``data`` (zlib + Base32 when shorter, else Base32), sizes balanced.

    Raises InputError for empty data, an unknown file type, or data too large for 1,295 frames.
    """
    if not data:
        raise InputError("nothing to put in QR frames: the file is empty")
    if file_type not in FILE_TYPES:
        raise InputError(f"unknown BBQr file type {file_type!r}")
    packer = zlib.compressobj(9, zlib.DEFLATED, -ZLIB_WBITS)
    packed = packer.compress(data) + packer.flush()
    encoding, body = ("Z", packed) if len(packed) < len(data) else ("2", data)
    per = max(5, frame_bytes - frame_bytes % 5)  # Base32: 5 bytes are 8 characters
    count = -(-len(body) // per)
    if count > MAX_FRAMES:
        per = -(-len(body) // MAX_FRAMES)
        per += -per % 5
        count = -(-len(body) // per)
    if per // 5 * 8 > MAX_FRAME_CHARS:
        raise InputError(f"{len(data)} bytes do not fit in {MAX_FRAMES} QR frames")
    per = -(-len(body) // count)  # balanced: no small runt at the end
    per += -per % 5
    count = -(-len(body) // per)
    text = base64.b32encode(body).decode("ascii").rstrip("=")
    chars = per // 5 * 8
    header = PREFIX + encoding + file_type + _base36(count)
    return [header + _base36(i) + text[i * chars : (i + 1) * chars] for i in range(count)]


def parse_frame(text: str) -> Frame:
    """One frame's header and data. Raises InputError for text that is not a BBQr frame."""
    if not text.startswith(PREFIX) or len(text) < HEADER_LEN:
        raise InputError(f"not a BBQr frame (it does not start with {PREFIX}): {_shown(text)}")
    encoding, file_type = text[2], text[3]
    if encoding not in ENCODINGS:
        raise InputError(f"BBQr frame with an unknown encoding {encoding!r}: {_shown(text)}")
    if file_type not in FILE_TYPES:
        raise InputError(f"BBQr frame with an unknown file type {file_type!r}: {_shown(text)}")
    total, index = _from_base36(text[4:6], text), _from_base36(text[6:8], text)
    if total < 1 or index >= total:
        raise InputError(f"BBQr frame {index} of {total} is impossible: {_shown(text)}")
    return Frame(encoding, file_type, total, index, text[HEADER_LEN:])


def join(texts: Iterable[str]) -> tuple[str, bytes]:
    """The file type and the bytes of a complete set of frames, given in any order.

    A frame seen twice with the same text is one frame. Raises InputError for no frame,
    frames of different sets (header, or two texts for one index), a set with frames
    missing (named), frames of unequal size, or data that does not decode.
    """
    frames: dict[int, Frame] = {}
    header: str | None = None
    for text in texts:
        frame = parse_frame(text.strip())
        if header is None:
            header = frame.set_header
        elif frame.set_header != header:
            raise InputError(f"QR frames of different sets: {header}.. and {frame.set_header}.. (mixed images?)")
        seen = frames.get(frame.index)
        if seen is not None and seen.data != frame.data:
            raise InputError(f"two different QR frames claim to be frame {frame.index + 1}: frames of different sets")
        frames[frame.index] = frame
    if header is None:
        raise InputError("no QR frame found")
    first = next(iter(frames.values()))
    missing = [i + 1 for i in range(first.total) if i not in frames]
    if missing:
        raise InputError(
            f"incomplete QR set: {len(frames)} of {first.total} frames read; missing frame(s) "
            + ", ".join(map(str, missing[:20]))
            + (" ..." if len(missing) > 20 else "")
        )
    ordered = [frames[i].data for i in range(first.total)]
    if len({len(d) for d in ordered[:-1]}) > 1 or (len(ordered) > 1 and len(ordered[-1]) > len(ordered[0])):
        raise InputError("QR frames of unequal size: frames of different sets, or corrupted")
    return first.file_type, _decode(first.encoding, ordered)


def _decode(encoding: str, parts: list[str]) -> bytes:
    text = "".join(parts)
    try:
        if encoding == "H":
            return binascii.unhexlify(text)
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise InputError(f"QR frames do not decode ({'hex' if encoding == 'H' else 'Base32'}): corrupted") from None
    if encoding == "2":
        return raw
    try:
        unpacker = zlib.decompressobj(-ZLIB_WBITS)
        out = unpacker.decompress(raw) + unpacker.flush()
    except zlib.error as e:
        raise InputError(f"QR frames do not decompress ({e}): corrupted, or frames of different sets") from None
    if not unpacker.eof or unpacker.unused_data:
        raise InputError("QR frames do not decompress to one whole file: corrupted, or frames of different sets")
    return out


def _base36(n: int) -> str:
    return _DIGITS[n // 36] + _DIGITS[n % 36]


def _from_base36(digits: str, text: str) -> int:
    if len(digits) != 2 or any(c not in _DIGITS for c in digits):
        raise InputError(f"BBQr frame with a malformed header: {_shown(text)}")
    return _DIGITS.index(digits[0]) * 36 + _DIGITS.index(digits[1])


def _shown(text: str) -> str:
    return repr(text[:24] + ("..." if len(text) > 24 else ""))
