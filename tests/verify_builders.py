"""Independent builders for the verifier's tests: python-bitcoinlib encoders plus coincurve.

Nothing here imports custody. The BIP-32 step is a separate implementation over coincurve's
public API, itself checked against the BIP-32 test vectors (tests/test_verify_vectors.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bitcoin.base58
import bitcoin.segwit_addr
from bitcoin.core import Hash, Hash160
from bitcoin.core.script import OP_0, OP_CHECKMULTISIG, OP_EQUAL, OP_HASH160, CScript, CScriptOp
from coincurve import PrivateKey, PublicKey

# The test's own network table (BIP-173 hrps; Bitcoin Core chainparams versions).
NETS: dict[str, dict[str, Any]] = {
    "mainnet": {"hrp": "bc", "p2sh": 5, "p2pkh": 0, "xpub": "0488b21e", "xprv": "0488ade4"},
    "testnet": {"hrp": "tb", "p2sh": 196, "p2pkh": 111, "xpub": "043587cf", "xprv": "04358394"},
    "signet": {"hrp": "tb", "p2sh": 196, "p2pkh": 111, "xpub": "043587cf", "xprv": "04358394"},
    "regtest": {"hrp": "bcrt", "p2sh": 196, "p2pkh": 111, "xpub": "043587cf", "xprv": "04358394"},
}


def b58check(payload: bytes) -> str:
    return bitcoin.base58.encode(payload + Hash(payload)[:4])


def serialize_xpub(version: str, depth: int, parent_fp: bytes, child: int, cc: bytes, key: bytes) -> str:
    return b58check(bytes.fromhex(version) + bytes([depth]) + parent_fp + child.to_bytes(4, "big") + cc + key)


def ckd(key: bytes, chain_code: bytes, index: int) -> tuple[bytes, bytes]:
    """BIP-32 CKDpub over coincurve's public API."""
    mac = hmac.new(chain_code, key + index.to_bytes(4, "big"), hashlib.sha512).digest()
    child = PublicKey(key).add(mac[:32])
    return child.format(), mac[32:]


def multisig_script(m: int, keys: list[bytes]) -> bytes:
    return bytes(CScript([CScriptOp.encode_op_n(m), *keys, CScriptOp.encode_op_n(len(keys)), OP_CHECKMULTISIG]))


def address_for(script: bytes, script_type: str, network: str) -> str:
    net = NETS[network]
    if script_type == "p2wsh":
        return bitcoin.segwit_addr.encode(net["hrp"], 0, hashlib.sha256(script).digest())
    if script_type == "p2sh":
        h = Hash160(script)
    else:
        h = Hash160(bytes(CScript([OP_0, hashlib.sha256(script).digest()])))
    return str(bitcoin.base58.CBase58Data.from_bytes(h, net["p2sh"]))


def script_pubkey_for(script: bytes, script_type: str) -> bytes:
    if script_type == "p2wsh":
        return bytes(CScript([OP_0, hashlib.sha256(script).digest()]))
    if script_type == "p2sh":
        h = Hash160(script)
    else:
        h = Hash160(bytes(CScript([OP_0, hashlib.sha256(script).digest()])))
    return bytes(CScript([OP_HASH160, h, OP_EQUAL]))


@dataclass
class FounderKey:
    name: str
    key: bytes
    chain_code: bytes
    xpub: str


def random_founder(name: str, network: str) -> FounderKey:
    key = PrivateKey(os.urandom(32)).public_key.format()
    cc = os.urandom(32)
    fp = os.urandom(4)
    xpub = serialize_xpub(NETS[network]["xpub"], 4, os.urandom(4), 0x80000002, cc, key)
    coin = 0 if network == "mainnet" else 1
    return FounderKey(name, key, cc, f"[{fp.hex()}/48'/{coin}'/0'/2']{xpub}")


@dataclass
class Wallet:
    network: str = "regtest"
    threshold: int = 2
    script_type: str = "p2wsh"
    founders: list[FounderKey] = field(default_factory=list)

    @classmethod
    def random(cls, n: int = 3, **kw: Any) -> Wallet:
        w = cls(**kw)
        w.founders = [random_founder(f"founder-{chr(97 + i)}", w.network) for i in range(n)]
        return w

    def manifest(self) -> dict[str, Any]:
        return {
            "format": "custody-founders-manifest",
            "version": 1,
            "network": self.network,
            "threshold": self.threshold,
            "script_type": self.script_type,
            "founders": [{"name": f.name, "xpub": f.xpub} for f in self.founders],
        }

    def keys_at(self, chain: int, index: int) -> list[bytes]:
        """The founders' child keys at chain/index, in manifest order."""
        out = []
        for f in self.founders:
            k, c = ckd(f.key, f.chain_code, chain)
            out.append(ckd(k, c, index)[0])
        return out

    def record(
        self,
        chain: int,
        index: int,
        keys: list[bytes] | None = None,
        m: int | None = None,
        script: bytes | None = None,
        address: str | None = None,
    ) -> dict[str, Any]:
        """An export line; ``keys`` (already ordered) / ``m`` / ``script`` override the honest ones."""
        if script is None:
            honest = sorted(self.keys_at(chain, index))
            script = multisig_script(m or self.threshold, keys if keys is not None else honest)
        return {
            "chain": chain,
            "index": index,
            "account": "alice",
            "address": address or address_for(script, self.script_type, self.network),
            "script_pubkey": script_pubkey_for(script, self.script_type).hex(),
            "script": script.hex(),
            "created_at": "2026-11-22T10:00:00Z",
        }

    def header(self) -> dict[str, Any]:
        return {
            "format": "custody-address-export",
            "version": 1,
            "network": self.network,
            "threshold": self.threshold,
            "script_type": self.script_type,
            "descriptors": {"receive": "wsh(sortedmulti(...))", "change": "wsh(sortedmulti(...))"},
            "exported_at": "2026-11-22T10:00:00Z",
        }


def write_export(
    path: Path,
    wallet: Wallet,
    records: list[dict[str, Any]],
    *,
    trailer: bool = True,
    count: int | None = None,
    extra_lines: Sequence[str] = (),
) -> Path:
    lines = [json.dumps(wallet.header())] + [json.dumps(r) for r in records] + list(extra_lines)
    if trailer:
        lines.append(json.dumps({"end": True, "count": len(records) if count is None else count}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_manifest(path: Path, wallet: Wallet) -> Path:
    path.write_text(json.dumps(wallet.manifest(), indent=2))
    return path
