"""A withdrawal carried across the air gap by animated QR both ways, on the embedded chain:
the online machine shows the PSBT's frames, the offline signer reads them (out of order),
signs, and shows its signed PSBT back the same way; the withdrawal then broadcasts."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from tests.test_withdraw_embedded import EmbeddedShop, destination


def _carry(shop: EmbeddedShop, psbt: Path, name: str) -> Path:
    """``qr encode`` on one side, the images shuffled like a camera's capture, ``qr decode`` on
    the other, checked against the digest the first side printed."""
    encoded = shop.c("qr", "encode", str(psbt), "--out", str(shop.tmp / f"{name}-shown"), "--json")
    assert encoded.exit_code == 0, encoded.output
    report = json.loads(encoded.stdout)
    camera = shop.tmp / f"{name}-camera"
    camera.mkdir()
    files = [Path(f) for f in report["files"]]
    random.Random(name).shuffle(files)
    for n, f in enumerate(files):
        shutil.copy(f, camera / f"capture-{n:03d}.png")
    out = shop.tmp / f"{name}-read.psbt"
    decoded = shop.c("qr", "decode", str(camera), "--out", str(out), "--expect-sha256", report["sha256"])
    assert decoded.exit_code == 0, decoded.output
    assert out.read_bytes() == psbt.read_bytes()
    return out


def test_a_withdrawal_goes_to_the_signer_and_back_as_qr_frames(tmp_path: Path) -> None:
    shop = EmbeddedShop(tmp_path, "p2wsh")
    try:
        shop.deposit("acct-1")
        to, _ = destination()
        w = shop.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", "0.015", *shop.as_("carol"))
        wid = str(w["id"])
        shop.ok("withdraw", "approve", wid, *shop.as_("alice"), "--yes")
        shop.ok("withdraw", "approve", wid, *shop.as_("bob"), "--yes")
        exported = tmp_path / "w.psbt"
        assert shop.c("withdraw", "export", wid, str(exported)).exit_code == 0
        for founder in ("founder-a", "founder-b"):
            offline = _carry(shop, exported, f"to-{founder}")
            signed = tmp_path / f"signed-{founder}.psbt"
            result = shop.c(
                "sign", str(offline), "--key", str(shop.founder_keys[founder]), "--out", str(signed), "--yes"
            )
            assert result.exit_code == 0, result.output
            shop.ok("withdraw", "import", wid, str(_carry(shop, signed, f"from-{founder}")))
        shop.ok("withdraw", "finalize", wid)
        assert shop.ok("withdraw", "broadcast", wid)["status"] == "broadcast"
    finally:
        shop.chain.close()
