"""Signed messages (BIP-137 format) against Bitcoin Core's own vector."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import coincurve
import pytest

from custody.bitcoin.encoding import hash160
from custody.bitcoin.keys import b58check_decode, b58check_encode
from custody.bitcoin.message import recover_pubkey, sign_message, verify_message

VECTORS = json.loads((Path(__file__).parents[1] / "fixtures" / "signed_message.json").read_text())["vectors"]


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["message"][:20])
def test_core_vector(v: dict[str, str]) -> None:
    raw = b58check_decode(v["wif"])
    assert raw[0] == 0xEF and len(raw) == 34 and raw[33] == 1  # testnet, compressed
    key = coincurve.PrivateKey(raw[1:33])
    assert sign_message(key, v["message"]) == v["signature"]
    pub = recover_pubkey(v["message"], v["signature"])
    assert pub is not None and b58check_encode(b"\x6f" + hash160(pub)) == v["address"]
    assert verify_message(pub, v["message"], v["signature"])


def test_a_changed_message_or_signature_fails() -> None:
    v = VECTORS[0]
    pub = recover_pubkey(v["message"], v["signature"])
    assert pub is not None
    assert not verify_message(pub, v["message"] + ".", v["signature"])
    raw = bytearray(base64.b64decode(v["signature"]))
    for i in (0, 1, 40, 64):
        bad = bytearray(raw)
        bad[i] ^= 1
        assert not verify_message(pub, v["message"], base64.b64encode(bytes(bad)).decode())


@pytest.mark.parametrize(
    "sig",
    [
        "",
        "not base64!",
        base64.b64encode(b"\x1f" + b"\x00" * 64).decode(),
        base64.b64encode(b"x" * 64).decode(),
        base64.b64encode(b"\x1b" + b"\x01" * 64).decode(),
        "A" * 5000,
        12345,
    ],
)
def test_malformed_signatures_are_refused_not_crashed(sig: object) -> None:
    assert recover_pubkey("m", sig) is None  # type: ignore[arg-type]
