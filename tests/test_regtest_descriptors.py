"""The real node agrees with our descriptors, scripts and checksums (all three script types).

The node speaks in its own address prefixes (litecoind: rltc1…, Q…), so we compare
scriptPubKeys: the node turns its own address strings into scripts with validateaddress.
"""

from __future__ import annotations

import pytest

from custody.bitcoin.descriptors import check_checksum
from custody.bitcoin.network import REGTEST
from custody.bitcoin.script import ScriptType
from custody.chain.rpc import RpcClient
from custody.policy.generator import AddressDeriver
from custody.policy.model import make_policy
from tests.support import founders

pytestmark = pytest.mark.regtest

NODE_ADDRESS_TYPE = {
    ScriptType.P2WSH: "bech32",
    ScriptType.P2SH_P2WSH: "p2sh-segwit",
    ScriptType.P2SH: "legacy",
}


def _script_pubkey(rpc: RpcClient, node_address: str) -> str:
    return str(rpc.call("validateaddress", node_address)["scriptPubKey"])


@pytest.mark.parametrize("script_type", list(ScriptType))
@pytest.mark.parametrize("threshold,n", [(2, 3), (1, 1), (3, 5)])
def test_node_derives_our_script_pubkeys(rpc: RpcClient, script_type: ScriptType, threshold: int, n: int) -> None:
    index = {ScriptType.P2WSH: 2, ScriptType.P2SH_P2WSH: 1, ScriptType.P2SH: 2}[script_type]
    fs = founders(n=n, script_index=index, tag=f"{script_type.value}{threshold}{n}")
    policy = make_policy(REGTEST, threshold, script_type, [(f.name, str(f.account)) for f in fs])
    deriver = AddressDeriver(policy)
    for chain in (0, 1):
        descriptor = policy.descriptor(chain)
        body = check_checksum(descriptor)
        # The node computes the same BIP-380 checksum and accepts the descriptor as it is.
        info = rpc.call("getdescriptorinfo", body)
        assert info["checksum"] == descriptor.rsplit("#", 1)[1]
        assert info["isrange"] is True
        node_addresses = rpc.call("deriveaddresses", descriptor, [0, 9])
        assert len(node_addresses) == 10
        for i, node_address in enumerate(node_addresses):
            ours = deriver.derive(chain, i)
            assert _script_pubkey(rpc, node_address) == ours.script_pubkey.hex(), (chain, i)


@pytest.mark.parametrize("script_type", list(ScriptType))
def test_createmultisig_agrees_on_the_script(rpc: RpcClient, script_type: ScriptType) -> None:
    fs = founders(tag="createmultisig")
    policy = make_policy(REGTEST, 2, script_type, [(f.name, str(f.account)) for f in fs])
    deriver = AddressDeriver(policy)
    for i in (0, 1, 7, 100):
        ours = deriver.derive(0, i)
        # createmultisig keeps the order it is given: hand it the keys in BIP-67 order.
        result = rpc.call("createmultisig", 2, [k.hex() for k in ours.keys], NODE_ADDRESS_TYPE[script_type])
        assert result["redeemScript"] == ours.script.hex()
        assert _script_pubkey(rpc, result["address"]) == ours.script_pubkey.hex()
        # and the keys really are the founders' children at 0/i, in sorted order
        children = sorted(f.account.xpub.derive((0, i)).public_key for f in fs)
        assert list(ours.keys) == children
