"""The chain backend against a real regtest node (marked ``regtest`` by the fixture).

The node is litecoind or bitcoind: it is handed only scriptPubKeys as ``raw(HEX)``
descriptors, raw transactions, and its own wallet's address strings.
"""

from __future__ import annotations

import hashlib
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from custody.chain import node as backend_module
from custody.chain.backend import backend_for
from custody.chain.node import RpcBackend, connect
from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from custody.config import Settings
from custody.errors import InputError, NodeError, NotFound


def fresh_script() -> bytes:
    """A p2wsh scriptPubKey nobody else pays: OP_0 <sha256 of random bytes>."""
    return b"\x00\x20" + hashlib.sha256(os.urandom(32)).digest()


@pytest.fixture
def chain(regtest_node: NodeInfo, rpc: RpcClient) -> RpcBackend:
    return connect(rpc, "regtest")


def coinbase_value(rpc: RpcClient, block_hash: str, script: bytes) -> tuple[str, int, Decimal]:
    """(txid, vout, value in BTC) of the coinbase output paying ``script``, as the node reports it."""
    block = rpc.call("getblock", block_hash, 2)
    coinbase = block["tx"][0]
    for out in coinbase["vout"]:
        if out["scriptPubKey"]["hex"] == script.hex():
            return coinbase["txid"], out["n"], out["value"]
    raise AssertionError("no coinbase output pays the script")


def test_tip_height(chain: RpcBackend, rpc: RpcClient) -> None:
    assert chain.tip_height() == rpc.call("getblockcount")


def test_unspent_finds_mined_outputs_with_exact_amounts(chain: RpcBackend, rpc: RpcClient) -> None:
    script, unused = fresh_script(), fresh_script()
    assert chain.unspent([script, unused]) == []
    hashes = chain.mine(2, script)
    assert len(hashes) == 2
    utxos = chain.unspent([script, unused, script])
    assert len(utxos) == 2
    for utxo, block_hash in zip(utxos, hashes, strict=True):
        txid, vout, value = coinbase_value(rpc, block_hash, script)
        assert (utxo.txid, utxo.vout) == (txid, vout)
        assert isinstance(utxo.amount, int) and Decimal(utxo.amount).scaleb(-8) == value
        assert utxo.script_pubkey == script
        assert utxo.height == rpc.call("getblockheader", block_hash)["height"]


def test_unspent_asks_in_chunks(chain: RpcBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = [fresh_script() for _ in range(5)]
    chain.mine(1, scripts[0])
    chain.mine(1, scripts[4])
    calls: list[int] = []
    real_call = chain.client.call

    def counting_call(method: str, *params: Any) -> Any:
        if method == "scantxoutset":
            calls.append(len(params[1]))
        return real_call(method, *params)

    monkeypatch.setattr(chain.client, "call", counting_call)
    monkeypatch.setattr(backend_module, "SCAN_CHUNK", 2)
    found = chain.unspent(scripts)
    assert calls == [2, 2, 1]
    assert {u.script_pubkey for u in found} == {scripts[0], scripts[4]}
    assert chain.unspent([]) == []
    assert calls == [2, 2, 1]  # nothing asked for nothing


def test_unspent_refuses_an_empty_script(chain: RpcBackend) -> None:
    with pytest.raises(InputError):
        chain.unspent([b""])


def test_test_accept_refuses_garbage_with_a_reason(chain: RpcBackend) -> None:
    result = chain.test_accept(b"\x01\x02\x03 not a transaction")
    assert not result.allowed
    assert result.reason
    assert result.txid == ""


def signed_payment(wallet: RpcClient) -> bytes:
    """A transaction from the funded wallet to itself, signed by the wallet."""
    coin = max(wallet.call("listunspent", 1), key=lambda u: u["amount"])
    own = wallet.call("getnewaddress")  # the node's own address string, only handed back to it
    change = coin["amount"] - Decimal("0.0001")
    raw = wallet.call("createrawtransaction", [{"txid": coin["txid"], "vout": coin["vout"]}], [{own: change}])
    signed = wallet.call("signrawtransactionwithwallet", raw)
    assert signed["complete"], signed
    return bytes.fromhex(signed["hex"])


def test_broadcast_is_idempotent_and_status_follows_the_transaction(
    chain: RpcBackend, rpc: RpcClient, funded_wallet: RpcClient
) -> None:
    tx = signed_payment(funded_wallet)
    accepted = chain.test_accept(tx)
    assert accepted.allowed and accepted.reason is None
    txid = accepted.txid
    assert txid == rpc.call("decoderawtransaction", tx.hex())["txid"]
    assert chain.tx_status(txid).known is False

    assert chain.broadcast(tx) == txid
    assert chain.broadcast(tx) == txid  # already in the mempool: not an error
    status = chain.tx_status(txid)
    assert (status.known, status.in_mempool, status.confirmations, status.block_height) == (True, True, 0, None)
    assert chain.raw_transaction(txid) == tx

    [block_hash] = chain.mine(1, fresh_script())
    status = chain.tx_status(txid)
    assert (status.known, status.in_mempool, status.confirmations) == (True, False, 1)
    assert status.block_height == chain.tip_height() == rpc.call("getblockheader", block_hash)["height"]
    assert txid in rpc.call("getblock", block_hash)["tx"]

    assert chain.broadcast(tx) == txid  # already in a block: not an error either
    again = chain.test_accept(tx)
    assert not again.allowed and again.reason and again.txid == txid


def test_broadcast_of_a_refused_transaction_raises(chain: RpcBackend) -> None:
    with pytest.raises(NodeError):
        chain.broadcast(b"\x01\x02\x03 not a transaction")


def test_unknown_transactions(chain: RpcBackend) -> None:
    txid = "11" * 32
    status = chain.tx_status(txid)
    assert (status.txid, status.known, status.in_mempool, status.confirmations, status.block_height) == (
        txid,
        False,
        False,
        0,
        None,
    )
    with pytest.raises(NotFound):
        chain.raw_transaction(txid)
    with pytest.raises(InputError):
        chain.tx_status("not a txid")


def test_wrong_chain_is_refused(rpc: RpcClient) -> None:
    for network, core in (("mainnet", "main"), ("testnet", "test"), ("signet", "signet")):
        with pytest.raises(NodeError) as e:
            connect(rpc, network)
        assert "'regtest'" in str(e.value) and f"'{core}'" in str(e.value) and network in str(e.value)
    with pytest.raises(InputError):
        connect(rpc, "litecoin")


def test_mining_is_for_regtest_only(rpc: RpcClient) -> None:
    with pytest.raises(NodeError, match="regtest only"):
        RpcBackend(rpc, "testnet").mine(1, fresh_script())
    with pytest.raises(InputError):
        RpcBackend(rpc, "regtest").mine(0, fresh_script())


def test_backend_for_the_started_node_or_a_url(regtest_node: NodeInfo, tmp_path: Path) -> None:
    started = Settings.load(home=str(tmp_path), env={"CUSTODY_NODE_DATADIR": str(regtest_node.datadir)})
    assert backend_for(started, "regtest").tip_height() >= 0
    by_url = Settings.load(
        home=str(tmp_path),
        env={"CUSTODY_NODE_URL": regtest_node.rpc_url, "CUSTODY_NODE_COOKIE": str(regtest_node.cookie_file)},
    )
    assert backend_for(by_url, "regtest").network_name == "regtest"
    with pytest.raises(NodeError, match="'main'"):
        backend_for(by_url, "mainnet")
    cookie_user, cookie_password = regtest_node.cookie_file.read_text().strip().split(":", 1)
    by_auth = Settings.load(
        home=str(tmp_path),
        env={"CUSTODY_NODE_URL": regtest_node.rpc_url, "CUSTODY_NODE_AUTH": f"{cookie_user}:{cookie_password}"},
    )
    assert cookie_password not in repr(by_auth)
    assert backend_for(by_auth, "regtest").tip_height() >= 0


def test_backend_for_without_a_node(tmp_path: Path) -> None:
    nothing = Settings.load(home=str(tmp_path), env={})
    assert nothing.node_datadir == tmp_path / "node"
    with pytest.raises(NodeError, match="no node configured: run `custody node start` or set CUSTODY_NODE_URL"):
        backend_for(nothing, "regtest")
    no_credentials = Settings.load(home=str(tmp_path), env={"CUSTODY_NODE_URL": "http://127.0.0.1:1"})
    with pytest.raises(InputError, match="CUSTODY_NODE_COOKIE"):
        backend_for(no_credentials, "regtest")
    bad_auth = Settings.load(
        home=str(tmp_path), env={"CUSTODY_NODE_URL": "http://127.0.0.1:1", "CUSTODY_NODE_AUTH": "nopassword"}
    )
    with pytest.raises(InputError, match="user:password"):
        backend_for(bad_auth, "regtest")
