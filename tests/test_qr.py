"""Animated QR (BBQr) for PSBTs: ``custody qr encode`` frames decoded by an outside decoder
(zxing-cpp) and joined by the spec's rules written out here, and ``custody qr decode`` taking
frames in any order and refusing mixed, incomplete and corrupted sets."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
import zlib
from pathlib import Path

import pytest
import segno
import zxingcpp
from PIL import Image

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.txbuild import Coin, build_transaction
from tests.support import Custody


def _psbt(outputs: int, seed: int) -> bytes:
    """An unsigned PSBT of one p2wsh input and ``outputs`` p2wpkh outputs, with its witness_utxo."""
    rng = random.Random(seed)
    spk = b"\x00\x20" + rng.randbytes(32)
    coin = Coin(rng.randbytes(32).hex(), 1, 50_000_000 * outputs, spk, 0, 7)
    pays = [(b"\x00\x14" + rng.randbytes(20), 40_000_000 + i) for i in range(outputs)]
    p = psbt_lib.Psbt.from_unsigned_tx(build_transaction([coin], pays))
    p.inputs[0].witness_utxo = psbt_lib.WitnessUtxo(coin.amount, spk)
    return p.serialize()


def _spec_join(texts: list[str]) -> bytes:
    """BBQr's join as its spec says it (coinkite/BBQr, BBQr.md), independent of custody's code."""
    header = texts[0][:6]
    assert all(t[:6] == header for t in texts)
    total = int(header[4:6], 36)
    parts = {int(t[6:8], 36): t[8:] for t in texts}
    assert sorted(parts) == list(range(total))
    body = "".join(parts[i] for i in range(total))
    if header[2] == "H":
        return bytes.fromhex(body)
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    return zlib.decompress(raw, wbits=-10) if header[2] == "Z" else raw


def _zxing(path: Path) -> str:
    (found,) = zxingcpp.read_barcodes(Image.open(path))
    assert found.format == zxingcpp.BarcodeFormat.QRCode
    return found.text


@pytest.fixture
def c(tmp_path: Path) -> Custody:
    return Custody(tmp_path / "home")


def _encode(c: Custody, tmp: Path, data: bytes, name: str) -> list[Path]:
    source = tmp / f"{name}.psbt"
    source.write_bytes(data)
    result = c("qr", "encode", str(source), "--out", str(tmp / name), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    files = [Path(f) for f in report["files"]]
    assert report["frames"] == len(files) and report["bytes"] == len(data)
    return files


@pytest.mark.parametrize("outputs", [2, 150])
def test_frames_decoded_by_zxing_join_to_the_identical_psbt(c: Custody, tmp_path: Path, outputs: int) -> None:
    data = _psbt(outputs, seed=outputs)
    files = _encode(c, tmp_path, data, "frames")
    texts = [_zxing(p) for p in files]
    assert all(t.startswith("B$") and t[3] == "P" for t in texts)
    assert all(set(t) <= set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:") for t in texts)  # alphanumeric
    if outputs > 100:
        assert len(files) > 3
        sizes = {Image.open(p).size for p in files}
        assert len(sizes) == 1  # one QR version for the whole set
    assert _spec_join(texts) == data


def test_decode_takes_frames_in_any_order_with_repeats_and_blurred_images(c: Custody, tmp_path: Path) -> None:
    data = _psbt(150, seed=3)
    files = _encode(c, tmp_path, data, "frames")
    camera = tmp_path / "camera"
    camera.mkdir()
    shuffled = files + files[:2]  # an animation loops: frames come back
    random.Random(5).shuffle(shuffled)
    for n, path in enumerate(shuffled):
        shutil.copy(path, camera / f"{hashlib.sha256(str(n).encode()).hexdigest()[:8]}.png")
    Image.new("L", (200, 200), 255).save(camera / "blank.png")  # a frame the camera missed
    out = tmp_path / "back.psbt"
    result = c("qr", "decode", str(camera), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == data
    b64 = c("qr", "decode", *map(str, reversed(files)), "--out", "-")
    assert b64.exit_code == 0 and base64.b64decode(b64.stdout.strip()) == data


def test_a_set_with_a_frame_missing_is_refused_naming_it(c: Custody, tmp_path: Path) -> None:
    data = _psbt(150, seed=4)
    files = _encode(c, tmp_path, data, "frames")
    files[2].unlink()
    out = tmp_path / "back.psbt"
    result = c("qr", "decode", str(tmp_path / "frames"), "--out", str(out), "--json")
    assert result.exit_code == 2
    error = json.loads(result.stderr)
    assert error["code"] == 2 and "incomplete" in error["error"] and "missing frame(s) 3" in error["error"]
    assert not out.exists()


def test_frames_of_two_psbts_are_refused(c: Custody, tmp_path: Path) -> None:
    one = _encode(c, tmp_path, _psbt(150, seed=6), "one")
    two = _encode(c, tmp_path, _psbt(150, seed=7), "two")
    assert len(one) == len(two)  # same header: only the frames themselves tell them apart
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in one[:-1]:
        shutil.copy(path, mixed / f"a-{path.name}")
    shutil.copy(two[0], mixed / "b-first.png")
    shutil.copy(two[-1], mixed / "b-last.png")
    out = tmp_path / "back.psbt"
    result = c("qr", "decode", str(mixed), "--out", str(out))
    assert result.exit_code == 2 and "different sets" in result.stderr
    small = _encode(c, tmp_path, _psbt(2, seed=8), "small")
    result = c("qr", "decode", str(tmp_path / "one"), str(small[0]), "--out", str(out))
    assert result.exit_code == 2 and "different sets" in result.stderr
    assert not out.exists()


def test_corrupted_frames_are_refused_and_nothing_is_written(c: Custody, tmp_path: Path) -> None:
    data = _psbt(150, seed=9)
    source = tmp_path / "w.psbt"
    source.write_bytes(data)
    encoded = c("qr", "encode", str(source), "--out", str(tmp_path / "frames"), "--json")
    assert encoded.exit_code == 0, encoded.output
    report = json.loads(encoded.stdout)
    assert report["sha256"] == hashlib.sha256(data).hexdigest()
    texts = [_zxing(Path(p)) for p in report["files"]]
    out = tmp_path / "back.psbt"

    def redrawn(name: str, frames: list[str]) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        for n, text in enumerate(frames):
            segno.make_qr(text, error="l").save(str(directory / f"{n}.png"), scale=4)
        return directory

    impossible = list(texts)
    impossible[0] = impossible[0][:6] + "ZZ" + impossible[0][8:]  # frame 1296 of a smaller set
    not_base32 = list(texts)
    not_base32[2] = not_base32[2][:20] + "1" + not_base32[2][21:]  # '1' is no Base32 digit
    cut = list(texts)
    cut[1] = cut[1][:-8]  # a middle frame shorter than the others
    for name, frames, said in [
        ("impossible", impossible, "impossible"),
        ("not-base32", not_base32, "corrupted"),
        ("cut", cut, "unequal size"),
    ]:
        result = c("qr", "decode", str(redrawn(name, frames)), "--out", str(out))
        assert result.exit_code == 2 and said in result.stderr, (name, result.output)
        assert not out.exists()

    # BBQr has no checksum: one digit changed inside the data may still join to a PSBT that
    # parses. The digest `qr encode` printed is what refuses it.
    edited = list(texts)
    middle = len(edited[1]) // 2
    edited[1] = edited[1][:middle] + ("A" if edited[1][middle] != "A" else "B") + edited[1][middle + 1 :]
    directory = redrawn("edited", edited)
    refused = c("qr", "decode", str(directory), "--out", str(out), "--expect-sha256", report["sha256"])
    assert refused.exit_code == 2 and "not written" in refused.stderr, refused.output
    assert not out.exists()
    good = c("qr", "decode", str(tmp_path / "frames"), "--out", str(out), "--expect-sha256", report["sha256"])
    assert good.exit_code == 0 and out.read_bytes() == data


def test_encode_shows_the_frames_in_the_terminal_and_refuses_what_is_no_psbt(c: Custody, tmp_path: Path) -> None:
    source = tmp_path / "w.psbt"
    source.write_bytes(_psbt(150, seed=10))
    shown = c("qr", "encode", str(source), "--terminal")
    assert shown.exit_code == 0, shown.output
    count = len(_encode(c, tmp_path, source.read_bytes(), "frames"))
    assert [line for line in shown.stdout.splitlines() if line.startswith("frame ")] == [
        f"frame {n}/{count}" for n in range(1, count + 1)
    ]
    assert c("qr", "encode", str(source)).exit_code == 2  # no destination
    junk = tmp_path / "junk.psbt"
    junk.write_bytes(b"not a psbt at all")
    assert c("qr", "encode", str(junk), "--out", str(tmp_path / "x")).exit_code == 2
    taken = c("qr", "encode", str(source), "--out", str(tmp_path / "frames"))
    assert taken.exit_code == 2 and "already holds images" in taken.stderr
