"""``custody qr encode|decode``: PSBTs as animated QR codes (BBQr), to and from an offline signer."""

from __future__ import annotations

import base64
import hashlib
import sys
import time
from pathlib import Path

import click

from custody.bitcoin import psbt as psbt_lib
from custody.errors import InputError
from custody_cli import output
from custody_cli.commands_withdraw import STDIO, base64_option, read_psbt_file
from custody_cli.context import example, json_option
from custody_cli.helptext import SummaryGroup


@click.group(cls=SummaryGroup)
def qr() -> None:
    """Carry PSBTs as animated QR codes (BBQr): screen to camera, no cable, no USB stick.

    BBQr is Coinkite's format, read and shown by Coldcard Q, Sparrow and Nunchuk: each frame
    says which part of how many it is, so frames are read in any order. The offline signer
    and the online machine both run these two commands (see docs/FORMATS.md).
    """


@qr.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the frames to as PNG images (frame-0001-of-0005.png, ...); made if missing, "
    "must hold no images yet.",
)
@click.option("--terminal", is_flag=True, help="Show the frames in this terminal, one after another, looping.")
@click.option(
    "--interval",
    type=click.FloatRange(0.05, 10),
    default=0.5,
    show_default=True,
    help="Seconds per frame with --terminal.",
)
@click.option(
    "--loops", type=click.IntRange(1, 1000), default=5, show_default=True, help="Times --terminal shows the set."
)
@json_option
@example("custody qr encode w1.psbt --out w1-frames/")
def encode(file: Path, out_dir: Path | None, terminal: bool, interval: float, loops: int, as_json: bool) -> None:
    """Turn a PSBT into BBQr frames: PNG images in a directory, or animated in the terminal.

    FILE is a PSBT, binary or base64 (`-`: standard input). --json: the frame count, the
    set's header and the image files written.
    """
    from custody import qrcodes

    if out_dir is None and not terminal:
        raise InputError("say where the frames go: --out DIRECTORY, --terminal, or both")
    data = read_psbt_file(file)
    frames = qrcodes.psbt_frames(data)
    written = qrcodes.write_frames(frames, out_dir) if out_dir is not None else []
    if terminal:
        _animate(qrcodes.terminal_frames(frames), interval, loops)
    digest = hashlib.sha256(data).hexdigest()
    result = {
        "frames": len(frames),
        "header": frames[0][:6],
        "bytes": len(data),
        "sha256": digest,
        "files": [str(p) for p in written],
    }
    if as_json:
        output.emit_json(result)
    elif out_dir is not None:
        output.success(f"{output.plural(len(frames), 'QR frame')} ({len(data)} bytes of PSBT) written to {out_dir}")
        output.info(f"PSBT SHA-256: {digest} (check it on the other side: custody qr decode --expect-sha256)")


def _animate(drawn: list[str], interval: float, loops: int) -> None:
    """Frames on standard output: in place on a terminal, else each once, one after another."""
    tty = sys.stdout.isatty()
    for _ in range(loops if tty else 1):
        for n, frame in enumerate(drawn):
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            sys.stdout.write(f"frame {n + 1}/{len(drawn)}\n{frame}\n")
            sys.stdout.flush()
            if tty:
                time.sleep(interval)


@qr.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Where to write the PSBT: binary for a .psbt name (unless --base64), base64 otherwise; `-`: standard "
    "output, base64 (not with --json).",
)
@click.option(
    "--expect-sha256",
    metavar="HEX",
    help="Write the PSBT only if its SHA-256 is this one (as `custody qr encode` printed it on the other side).",
)
@base64_option
@json_option
@example("custody qr decode camera-frames/ --out w1.psbt --expect-sha256 HEX")
def decode(images: tuple[Path, ...], out_file: Path, expect_sha256: str | None, as_base64: bool, as_json: bool) -> None:
    """Read a PSBT back from BBQr frames: image files, or directories of them (a camera's frames).

    Frames may come in any order and repeat; images with no readable QR are skipped. A set
    mixed from two PSBTs, incomplete (the missing frames are named) or corrupted is refused
    with exit code 2 and nothing is written. The PSBT is written byte for byte as the
    frames carry it, after it parses as a PSBT. BBQr carries no checksum: --expect-sha256
    checks the whole PSBT against the digest `qr encode` printed (the signer's review
    checks its content against the requester's signed statement in any case).
    """
    from custody import qrcodes

    if as_json and str(out_file) == STDIO:  # the PSBT and the JSON would share standard output
        raise click.UsageError("--json prints to standard output: give --out a file")
    data = qrcodes.read_psbt(list(images))
    psbt_lib.Psbt.parse(data)  # refuses what is no PSBT before anything is written
    digest = hashlib.sha256(data).hexdigest()
    if expect_sha256 is not None and expect_sha256.strip().lower() != digest:
        raise InputError(f"the PSBT read from the QR frames has SHA-256 {digest}, not {expect_sha256}: not written")
    where = _write_raw(out_file, data, as_base64)
    if as_json:
        output.emit_json({"bytes": len(data), "sha256": digest, "out": where})
    elif where != "standard output":
        output.success(f"PSBT of {len(data)} bytes read from the QR frames, written to {where}")
        output.info(f"PSBT SHA-256: {digest}")


def _write_raw(path: Path, data: bytes, as_base64: bool) -> str:
    text = base64.b64encode(data).decode("ascii") + "\n"
    if str(path) == STDIO:
        sys.stdout.write(text)
        sys.stdout.flush()
        return "standard output"
    binary = path.suffix.lower() == ".psbt" and not as_base64
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data if binary else text.encode("ascii"))
        tmp.replace(path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return str(path)


COMMANDS = [qr]
