"""Animated QR for PSBTs (BBQr, :mod:`custody.bitcoin.bbqr`): frames as images, for the terminal,
and read back from a sequence of images (files saved from a screen or a camera).

Encoding uses ``segno`` (pure Python): every frame of a set is drawn at the same QR version
(the spec asks for it: no jarring last frame), error correction level L, alphanumeric mode.
Decoding uses ``zxing-cpp`` on images opened with Pillow. A camera's frame sequence repeats
frames and blurs some: repeats are one frame, an image with no readable QR is skipped and
named if the set is then incomplete.

Raises InputError for everything a person can get wrong (an unreadable directory, a set
mixed, incomplete or corrupted, a file that is no PSBT).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from custody.bitcoin import bbqr
from custody.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".webp")
FRAME_NAME = "frame-{index:04d}-of-{total:04d}.png"
MAX_IMAGES = 5000
MAX_IMAGE_BYTES = 32 * 1024 * 1024
PSBT_MAGIC = b"psbt\xff"


def psbt_frames(psbt: bytes) -> list[str]:
    """The BBQr frames (texts) of a PSBT. Raises InputError for bytes that are not a PSBT."""
    if not psbt.startswith(PSBT_MAGIC):
        raise InputError("not a PSBT (no psbt magic): nothing was encoded")
    return bbqr.split(psbt, "P")


def _symbols(frames: Sequence[str]) -> list[object]:
    import segno  # loaded only for QR work

    version = max(segno.make_qr(f, error="l", mode="alphanumeric", boost_error=False).version for f in frames)
    return [segno.make_qr(f, error="l", mode="alphanumeric", version=version, boost_error=False) for f in frames]


def write_frames(frames: Sequence[str], directory: Path, scale: int = 4) -> list[Path]:
    """Write each frame as a PNG image in ``directory`` (made if missing), named in order.

    Refuses a directory that already holds frame images (two sets must not mix). Raises InputError.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        old = [p.name for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    except OSError as e:
        raise InputError(f"cannot use directory {directory}: {e.strerror or e}") from None
    if old:
        raise InputError(f"{directory} already holds images ({old[0]}, ...): use an empty directory")
    written = []
    for n, symbol in enumerate(_symbols(frames)):
        path = directory / FRAME_NAME.format(index=n + 1, total=len(frames))
        try:
            symbol.save(str(path), kind="png", scale=scale, border=4)  # type: ignore[attr-defined]
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror or e}") from None
        written.append(path)
    return written


def terminal_frames(frames: Sequence[str]) -> list[str]:
    """Each frame drawn with text blocks for a terminal (two rows of modules per line)."""
    drawn = []
    for symbol in _symbols(frames):
        out = io.StringIO()
        symbol.terminal(out=out, compact=True, border=2)  # type: ignore[attr-defined]
        drawn.append(out.getvalue())
    return drawn


@dataclass(frozen=True)
class ReadFrames:
    """What a sequence of images held: the QR texts read, and the images with none."""

    texts: list[str]
    unreadable: list[str]


def read_images(paths: Sequence[Path]) -> ReadFrames:
    """The QR texts in ``paths`` (files, or directories of image files read in name order).

    Raises InputError for a path that cannot be read or that holds no image at all.
    """
    import zxingcpp
    from PIL import Image, UnidentifiedImageError

    files = _image_files(paths)
    texts: list[str] = []
    unreadable: list[str] = []
    for path in files:
        try:
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise InputError(f"{path} is larger than {MAX_IMAGE_BYTES} bytes: not a QR frame")
            with Image.open(path) as image:
                found = zxingcpp.read_barcodes(image.convert("L"))
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"cannot read image {path}: {getattr(e, 'strerror', None) or e}") from None
        if not found:
            unreadable.append(path.name)
        texts += [r.text for r in found if r.valid and r.format == zxingcpp.BarcodeFormat.QRCode]
    return ReadFrames(texts, unreadable)


def read_psbt(paths: Sequence[Path]) -> bytes:
    """The PSBT a complete BBQr set of images carries, frames in any order.

    Raises InputError naming what is wrong: no images, frames mixed from two sets, frames
    missing (and the images that held no readable QR), corrupted data, a set that is not a PSBT.
    """
    read = read_images(paths)
    if not read.texts:
        raise InputError(f"no QR code found in {len(read.unreadable)} image(s)")
    try:
        file_type, data = bbqr.join(read.texts)
    except InputError as e:
        if read.unreadable and "incomplete" in str(e):
            shown = ", ".join(read.unreadable[:5]) + (" ..." if len(read.unreadable) > 5 else "")
            raise InputError(f"{e} ({len(read.unreadable)} image(s) had no readable QR: {shown})") from None
        raise
    if file_type != "P" or not data.startswith(PSBT_MAGIC):
        raise InputError(f"the QR frames carry a BBQr file of type {file_type!r}, not a PSBT")
    return data


def _image_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        try:
            if path.is_dir():
                files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            elif path.is_file():
                files.append(path)
            else:
                raise InputError(f"no such file or directory: {path}")
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        if len(files) > MAX_IMAGES:
            raise InputError(f"more than {MAX_IMAGES} images: not one QR set")
    if not files:
        raise InputError(f"no image files in {', '.join(map(str, paths))}")
    return files
