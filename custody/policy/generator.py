"""GENERATOR: deposit and change addresses from the policy.

Keys are derived non-hardened at ``xpub/chain/index`` from every founder's key, sorted
(BIP-67), put into an m-of-n CHECKMULTISIG script (python-bitcoinlib) and encoded for the
policy's network. The independent verifier (``custody.verify``) re-derives all of this
with code of its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bitcoin.core.script import OP_0, OP_CHECKMULTISIG, OP_EQUAL, OP_HASH160, CScript

from custody.bitcoin.bech32 import encode_segwit
from custody.bitcoin.encoding import hash160
from custody.bitcoin.keys import HARDENED, ParentKey, b58check_encode
from custody.bitcoin.script import ScriptType
from custody.errors import InputError
from custody.policy.model import BRANCHES, Policy


@dataclass(frozen=True)
class DerivedAddress:
    """One address of the policy: where it sits, its scripts and its string."""

    chain: int
    index: int
    address: str
    script_pubkey: bytes
    script: bytes  # the multisig script: witness script (segwit) or redeem script (p2sh)
    keys: tuple[bytes, ...]  # the founders' child keys, BIP-67 sorted


def multisig_script(threshold: int, sorted_keys: list[bytes]) -> bytes:
    """The bare m-of-n script.

    Layout: ``OP_m <key_1> ... <key_n> OP_n OP_CHECKMULTISIG`` (m, n as small-int opcodes
    up to 16, as minimal number pushes above).
    """
    return bytes(CScript([threshold, *sorted_keys, len(sorted_keys), OP_CHECKMULTISIG]))


def script_pubkey_for(script_type: ScriptType, script: bytes) -> bytes:
    """The output script paying to ``script``.

    p2wsh: ``OP_0 <sha256(script)>``; p2sh: ``OP_HASH160 <hash160(script)> OP_EQUAL``;
    p2sh-p2wsh: the p2sh of the p2wsh output script.
    """
    if script_type is ScriptType.P2WSH:
        return bytes(CScript([OP_0, hashlib.sha256(script).digest()]))
    if script_type is ScriptType.P2SH_P2WSH:
        redeem = bytes(CScript([OP_0, hashlib.sha256(script).digest()]))
        return bytes(CScript([OP_HASH160, hash160(redeem), OP_EQUAL]))
    return bytes(CScript([OP_HASH160, hash160(script), OP_EQUAL]))


class AddressDeriver:
    """Derives the policy's addresses; the founders' chain-level keys are derived once."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        # chain -> every founder's key at xpub/chain
        self._chain_keys: dict[int, list[ParentKey]] = {}
        for chain in BRANCHES:
            children = (f.key.xpub.child(chain) for f in policy.founders)
            self._chain_keys[chain] = [ParentKey(k.public_key, k.chain_code) for k in children]

    def derive(self, chain: int, index: int) -> DerivedAddress:
        """The address at ``chain``/``index``.

        Raises InputError for a chain other than 0/1 or an index out of range.
        """
        if chain not in self._chain_keys:
            raise InputError(f"chain must be 0 (receive) or 1 (change), not {chain}")
        if not 0 <= index < HARDENED:
            raise InputError(f"address index {index} out of range")
        keys = sorted(parent.child(index) for parent in self._chain_keys[chain])
        script = multisig_script(self.policy.threshold, keys)
        network = self.policy.network
        script_type = self.policy.script_type
        spk = script_pubkey_for(script_type, script)
        if script_type is ScriptType.P2WSH:
            address = encode_segwit(network.bech32_hrp, 0, spk[2:])
        else:
            address = b58check_encode(bytes([network.p2sh_version]) + spk[2:22])
        return DerivedAddress(chain, index, address, spk, script, tuple(keys))
