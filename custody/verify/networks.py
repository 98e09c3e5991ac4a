"""The four networks the verifier knows, with their address and extended-key parameters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    """Address and extended-key parameters of one network."""

    name: str
    hrp: str
    p2pkh_version: int
    p2sh_version: int
    xpub_version: bytes
    xprv_version: bytes


_XPUB = bytes.fromhex("0488b21e")
_XPRV = bytes.fromhex("0488ade4")
_TPUB = bytes.fromhex("043587cf")
_TPRV = bytes.fromhex("04358394")

NETWORKS: dict[str, Network] = {
    "mainnet": Network("mainnet", "bc", 0x00, 0x05, _XPUB, _XPRV),
    "testnet": Network("testnet", "tb", 0x6F, 0xC4, _TPUB, _TPRV),
    "signet": Network("signet", "tb", 0x6F, 0xC4, _TPUB, _TPRV),
    "regtest": Network("regtest", "bcrt", 0x6F, 0xC4, _TPUB, _TPRV),
}

#: Extended public key versions and what they are called in messages.
PUBLIC_VERSIONS: dict[bytes, str] = {_XPUB: "xpub (mainnet)", _TPUB: "tpub (test networks)"}
#: Extended private key versions: never accepted.
PRIVATE_VERSIONS: dict[bytes, str] = {_XPRV: "xprv", _TPRV: "tprv"}


def get_network(name: str) -> Network | None:
    """Return the network called ``name``, or None if there is none."""
    return NETWORKS.get(name)


def networks_of_hrp(hrp: str) -> list[str]:
    """Names of the networks whose bech32 prefix is ``hrp`` (lower case)."""
    return [n.name for n in NETWORKS.values() if n.hrp == hrp]


def networks_of_base58_version(version: int) -> list[str]:
    """Names of the networks that use ``version`` as a P2PKH or P2SH version byte."""
    return [n.name for n in NETWORKS.values() if version in (n.p2pkh_version, n.p2sh_version)]
