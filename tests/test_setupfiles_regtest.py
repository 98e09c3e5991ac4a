"""The regtest node reads every wallet setup file custody writes and derives custody's addresses.

litecoind 0.21 predates BIP-389: it refuses a ``<0;1>`` multipath descriptor (checked below,
so a newer node that accepts it is noticed); the test then expands it into its ``/0/*`` and
``/1/*`` descriptors, as BIP-389 defines, and hands the node those. The node speaks in its own
address prefixes, so addresses are compared as scriptPubKeys (validateaddress).
"""

from __future__ import annotations

import json

import pytest

from custody.bitcoin.descriptors import add_checksum, check_checksum
from custody.bitcoin.network import REGTEST
from custody.bitcoin.script import ScriptType
from custody.chain.rpc import RpcClient
from custody.errors import NodeError
from custody.policy.generator import AddressDeriver
from custody.policy.model import Policy, make_policy
from custody.policy.setupfiles import FORMATS, export_policy
from tests.support import founders

pytestmark = pytest.mark.regtest
COUNT = 5


def _policy(script_type: ScriptType) -> Policy:
    index = {ScriptType.P2WSH: 2, ScriptType.P2SH_P2WSH: 1, ScriptType.P2SH: 2}[script_type]
    fs = founders(n=3, script_index=index, tag=f"node-setup{script_type.value}")
    return make_policy(REGTEST, 2, script_type, [(f.name, str(f.account)) for f in fs])


def _receive_and_change(fmt: str, text: str) -> list[str]:
    """The descriptors a file carries, as a reader of that format takes them, without checksum."""
    if fmt == "descriptor":
        return [check_checksum(text.strip())]
    if fmt == "sparrow":
        return [check_checksum(line) for line in text.split("\n") if line and not line.startswith("#")]
    if fmt == "bsms":
        _, template, paths, _ = text.split("\n")
        return [template.replace("/**", p) for p in paths.split(",")]
    if fmt == "specter":
        receive = check_checksum(json.loads(text)["descriptor"])
        return [receive, receive.replace("/0/*", "/1/*")]
    if fmt == "caravan":
        doc = json.loads(text)
        wrap = {"P2WSH": "wsh({})", "P2SH-P2WSH": "sh(wsh({}))", "P2SH": "sh({})"}[doc["addressType"]]
        keys = [f"[{k['xfp']}{k['bip32Path'][1:]}]{k['xpub']}" for k in doc["extendedPublicKeys"]]
        m = doc["quorum"]["requiredSigners"]
        return [wrap.format(f"sortedmulti({m},{','.join(k + f'/{c}/*' for k in keys)})") for c in (0, 1)]
    assert fmt == "coldcard"
    keys, derivation, fields = [], "", {}
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        label, value = (p.strip() for p in line.split(":", 1))
        if label == "Derivation":
            derivation = value
        elif len(label) == 8:
            keys.append(f"[{label.lower()}{derivation[1:]}]{value}")
        else:
            fields[label] = value
    wrap = {"P2WSH": "wsh({})", "P2SH-P2WSH": "sh(wsh({}))", "P2SH": "sh({})"}[fields["Format"]]
    m = fields["Policy"].split(" of ")[0]
    return [wrap.format(f"sortedmulti({m},{','.join(k + f'/{c}/*' for k in keys)})") for c in (0, 1)]


def _expand(descriptor: str) -> list[str]:
    """BIP-389: a <0;1> descriptor is the /0/* one and the /1/* one."""
    if "<0;1>" not in descriptor:
        return [descriptor]
    return [descriptor.replace("<0;1>", "0"), descriptor.replace("<0;1>", "1")]


def _node_script_pubkeys(rpc: RpcClient, descriptor: str) -> list[str]:
    info = rpc.call("getdescriptorinfo", descriptor)
    assert info["isrange"] is True and info["checksum"] == add_checksum(descriptor).rsplit("#", 1)[1]
    addresses = rpc.call("deriveaddresses", add_checksum(descriptor), [0, COUNT - 1])
    return [str(rpc.call("validateaddress", a)["scriptPubKey"]) for a in addresses]


def test_litecoind_021_does_not_know_multipath_descriptors(rpc: RpcClient) -> None:
    policy = _policy(ScriptType.P2WSH)
    try:
        rpc.call("getdescriptorinfo", check_checksum(policy.multipath_descriptor()))
    except NodeError:
        return  # expected of litecoind 0.21: the tests below expand <0;1>
    pytest.skip("this node knows BIP-389 multipath descriptors; expansion is not needed with it")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("script_type", list(ScriptType))
def test_the_node_derives_our_addresses_from_every_export(rpc: RpcClient, fmt: str, script_type: ScriptType) -> None:
    policy = _policy(script_type)
    deriver = AddressDeriver(policy)
    descriptors = [d for desc in _receive_and_change(fmt, export_policy(policy, fmt)) for d in _expand(desc)]
    seen = {}
    for descriptor in descriptors:
        chain = 0 if "/0/*" in descriptor else 1
        node = _node_script_pubkeys(rpc, descriptor)
        ours = [deriver.derive(chain, i).script_pubkey.hex() for i in range(COUNT)]
        assert node == ours, (fmt, chain)
        seen[chain] = True
    assert seen == {0: True, 1: True}
