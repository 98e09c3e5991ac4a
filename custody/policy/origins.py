"""Key origins checked before a policy is drafted, signed or stored.

A shell eats the ``'`` of an unquoted ``[fp/48'/1'/0'/2']tpub...``: the tool then reads
``[fp/48/1/0/2]``, a key origin no wallet derives. The xpub itself is intact, so addresses
are issued and funded, and only the signer fails later. These checks catch it first:

* the **standard path** of the script type (the account key's origin):

  ========== ===================================== ===============================
  script     standard origin path                  source
  ========== ===================================== ===============================
  p2wsh      ``m/48'/coin'/account'/2'``           BIP-48
  p2sh-p2wsh ``m/48'/coin'/account'/1'``           BIP-48
  p2sh       ``m/45'``                             BIP-45, as Coldcard, Sparrow and
                                                   Electrum write P2SH multisig
  ========== ===================================== ===============================

  ``coin`` is the network's (0 mainnet, 1 every test network); any hardened account.
* a founder's **own key file**: the origin the manifest gives their key must be the
  fingerprint and path the key file derives it with.
"""

from __future__ import annotations

from custody.bitcoin.keys import HARDENED, KeyOrigin, OriginKey, bip48_path, format_path
from custody.bitcoin.network import Network
from custody.bitcoin.script import ScriptType

BIP45_PATH = (45 + HARDENED,)


def standard_path(network: Network, script_type: ScriptType, account: int = 0) -> tuple[int, ...]:
    """The account key's path a founder key gets for ``script_type`` (account 0 by default)."""
    index = script_type.bip48_script_index
    if index is None:
        return BIP45_PATH
    return bip48_path(network, index, account)


def is_standard(path: tuple[int, ...], network: Network, script_type: ScriptType) -> bool:
    """Whether ``path`` is a standard account path for ``script_type`` on ``network``."""
    if script_type.bip48_script_index is None:
        return path == BIP45_PATH
    if len(path) != 4 or path[2] < HARDENED:
        return False
    return path == standard_path(network, script_type, path[2] - HARDENED)


def origin_problem(name: str, key: OriginKey, network: Network, script_type: ScriptType) -> str | None:
    """Why founder ``name``'s key origin is not standard for ``script_type`` (None when it is)."""
    want = format_path(standard_path(network, script_type))
    if key.origin is None:
        return f"founder {name}: the key has no origin [fingerprint/path]; expected path {want}"
    if is_standard(key.origin.path, network, script_type):
        return None
    got = format_path(key.origin.path)
    hint = ""
    if key.origin.path and all(step < HARDENED for step in key.origin.path):
        hint = " (no step is hardened: did the shell eat the ' marks? quote the key, or write h: 48h/1h/0h/2h)"
    return f"founder {name}: key origin path {got} is not the standard {want} for {script_type.value}{hint}"


def own_origin_problem(name: str, in_manifest: OriginKey, own: KeyOrigin) -> str | None:
    """Why the origin the manifest gives founder ``name``'s key differs from the one their key
    file derives it with (None when they agree)."""
    if in_manifest.origin == own:
        return None
    shown = "none" if in_manifest.origin is None else str(in_manifest.origin)
    return (
        f"founder {name}: the manifest says your key's origin is {shown}, your key file derives it at {own}; "
        "a wallet or signer following the manifest would look for another key: do not sign it"
    )
