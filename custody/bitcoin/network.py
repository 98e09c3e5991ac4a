"""The networks custody knows and the parameters that tell them apart.

Every function that makes, parses or checks an address or an extended key takes a
:class:`Network` explicitly; nothing here is global.
"""

from __future__ import annotations

from dataclasses import dataclass

from custody.errors import InputError


@dataclass(frozen=True)
class Network:
    """Address and extended-key parameters of one Bitcoin network."""

    name: str
    bech32_hrp: str
    p2pkh_version: int
    p2sh_version: int
    xpub_version: bytes
    xprv_version: bytes
    coin_type: int  # BIP-44/48 coin type: 0 on mainnet, 1 on every test network

    @property
    def is_test(self) -> bool:
        return self.coin_type == 1


_TPUB = bytes.fromhex("043587cf")
_TPRV = bytes.fromhex("04358394")

MAINNET = Network("mainnet", "bc", 0x00, 0x05, bytes.fromhex("0488b21e"), bytes.fromhex("0488ade4"), 0)
TESTNET = Network("testnet", "tb", 0x6F, 0xC4, _TPUB, _TPRV, 1)
SIGNET = Network("signet", "tb", 0x6F, 0xC4, _TPUB, _TPRV, 1)
REGTEST = Network("regtest", "bcrt", 0x6F, 0xC4, _TPUB, _TPRV, 1)

NETWORKS: dict[str, Network] = {n.name: n for n in (MAINNET, TESTNET, SIGNET, REGTEST)}


def get_network(name: str) -> Network:
    """Return the network called ``name``.

    Raises InputError for an unknown name.
    """
    try:
        return NETWORKS[name]
    except KeyError:
        raise InputError(f"unknown network {name!r}: expected one of {', '.join(NETWORKS)}") from None
