"""The embedded regtest chain: Bitcoin Core's consensus code (libbitcoinkernel), no node.

Multisig spends are built and signed with custody.bitcoin.psbt; whether blocks and transactions are
valid is the kernel's word, never ours: a block is refused when the kernel's tip does not move.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from custody.chain import accept as accept_lib
from custody.chain.backend import backend_for
from custody.chain.embedded import EmbeddedBackend, open_chain
from custody.chain.kernel import COINBASE_MATURITY, subsidy
from custody.chain.types import Utxo
from custody.config import Settings
from custody.errors import InputError, NodeError, NotFound
from tests.chain_support import Multisig, corrupt_signature, fresh_script, multisig, spend

COIN = 100_000_000
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[EmbeddedBackend]:
    backend = open_chain(tmp_path / "chain")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ms() -> Multisig:
    return multisig()


def funded(chain: EmbeddedBackend, ms: Multisig, index: int = 0, mature: bool = True) -> tuple:
    """One coinbase paying the multisig address ``index``; mature unless asked otherwise."""
    address = ms.address(index)
    chain.mine(1, address.script_pubkey)
    if mature:
        chain.mine(COINBASE_MATURITY, b"\x51")
    utxo = [u for u in chain.unspent([address.script_pubkey])][-1]
    return utxo, address


def state(chain: EmbeddedBackend, scripts: list[bytes]) -> tuple:
    return chain.tip_height(), chain.unspent(scripts), chain.mempool()


def test_mining_pays_the_script_with_the_regtest_subsidy(chain: EmbeddedBackend) -> None:
    a, b = fresh_script(), fresh_script()
    assert chain.tip_height() == 0 and chain.unspent([a]) == []
    hashes = chain.mine(3, a) + chain.mine(2, b)
    assert len(set(hashes)) == 5 and chain.tip_height() == 5
    found = chain.unspent([b, a, a])
    assert [u.height for u in found] == [1, 2, 3, 4, 5]
    assert [u.script_pubkey for u in found] == [a, a, a, b, b]
    assert all(u.amount == 50 * COIN for u in found)
    status = chain.tx_status(found[0].txid)
    assert (status.known, status.confirmations, status.block_height) == (True, 5, 1)
    assert len(chain.raw_transaction(found[0].txid)) > 60
    chain.mine(150 - 5, b)
    assert chain.unspent([b])[-1].amount == subsidy(150) == 25 * COIN  # regtest halves every 150 blocks
    chain.audit()


def test_bad_arguments(chain: EmbeddedBackend) -> None:
    with pytest.raises(InputError):
        chain.mine(0, b"\x51")
    with pytest.raises(InputError):
        chain.mine(1, b"")
    with pytest.raises(InputError):
        chain.unspent([b""])
    with pytest.raises(InputError):
        chain.tx_status("xyz")
    with pytest.raises(NotFound):
        chain.raw_transaction("00" * 32)
    assert chain.tx_status("00" * 32).known is False
    assert chain.test_accept(b"\x00\x01").allowed is False


def test_multisig_spend_through_the_mempool(chain: EmbeddedBackend, ms: Multisig) -> None:
    utxo, address = funded(chain, ms)
    dest = fresh_script()
    raw = spend(ms, [(utxo, address)], [(dest, utxo.amount - 10_000)])
    accept = chain.test_accept(raw)
    assert accept.allowed, accept.reason
    txid = chain.broadcast(raw)
    assert txid == accept.txid and chain.broadcast(raw) == txid  # idempotent
    assert chain.tx_status(txid).in_mempool and chain.mempool() == [txid]
    assert chain.test_accept(raw).reason == "txn-already-in-mempool"
    miner = fresh_script()
    chain.mine(1, miner)
    status = chain.tx_status(txid)
    assert (status.in_mempool, status.confirmations, status.block_height) == (False, 1, chain.tip_height())
    assert [u.amount for u in chain.unspent([dest])] == [utxo.amount - 10_000]
    assert chain.unspent([address.script_pubkey]) == []
    assert chain.unspent([miner])[0].amount == subsidy(chain.tip_height()) + 10_000  # the fee
    assert chain.mempool() == []
    chain.audit()


def test_a_chain_of_unconfirmed_spends_is_mined_in_order(chain: EmbeddedBackend, ms: Multisig) -> None:
    utxo, address = funded(chain, ms)
    middle = ms.address(1)
    parent = spend(ms, [(utxo, address)], [(middle.script_pubkey, utxo.amount - 10_000)])
    parent_txid = chain.broadcast(parent)
    unconfirmed = Utxo(parent_txid, 0, utxo.amount - 10_000, middle.script_pubkey, None)
    child_txid = chain.broadcast(spend(ms, [(unconfirmed, middle)]))
    assert chain.mempool() == [parent_txid, child_txid]
    chain.mine(1, b"\x51")
    assert chain.tx_status(parent_txid).confirmations == chain.tx_status(child_txid).confirmations == 1
    chain.audit()


def test_a_block_the_kernel_refuses_evicts_the_culprit(
    chain: EmbeddedBackend, ms: Multisig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should test-accept ever let through what the kernel refuses, mining still goes on."""
    good_coin, good_address = funded(chain, ms, index=1)
    bad_coin, bad_address = funded(chain, ms, index=2)
    good = chain.broadcast(spend(ms, [(good_coin, good_address)]))
    with monkeypatch.context() as m:
        m.setattr(accept_lib, "script_problem", lambda raw, spent: None)  # a blind test-accept
        bad = chain.broadcast(spend(ms, [(bad_coin, bad_address)], tamper=corrupt_signature))
    assert chain.mempool() == [good, bad]
    tip = chain.tip_height()
    chain.mine(1, b"\x51")  # refused with both; mined with the first half
    assert chain.tip_height() == tip + 1 and chain.tx_status(good).confirmations == 1
    assert chain.mempool() == [bad]
    chain.mine(1, b"\x51")  # refused with the bad one alone: evicted, the block mined without it
    assert chain.tip_height() == tip + 2
    assert [txid for txid, _ in chain.evicted] == [bad] and "rejected" in chain.evicted[0][1]
    assert chain.mempool() == [] and chain.tx_status(bad).known is False
    chain.audit()


def test_kernel_rejects_a_block_with_an_invalid_multisig_spend(chain: EmbeddedBackend, ms: Multisig) -> None:
    utxo, address = funded(chain, ms)
    bad = spend(ms, [(utxo, address)], tamper=corrupt_signature)
    refused = chain.test_accept(bad)
    assert not refused.allowed and "mandatory-script-verify-flag-failed" in (refused.reason or "")
    with pytest.raises(NodeError, match="mandatory-script-verify-flag-failed"):
        chain.broadcast(bad)
    before = state(chain, [address.script_pubkey])
    # Past our own checks, straight to the kernel: process_block returns true, the tip stays.
    block = chain.make_block([bad], fresh_script())
    with pytest.raises(NodeError, match="libbitcoinkernel rejected it: invalid, consensus"):
        chain.submit_block(block)
    assert state(chain, [address.script_pubkey]) == before
    chain.audit()
    # The same spend correctly signed goes in.
    good = spend(ms, [(utxo, address)])
    chain.submit_block(chain.make_block([good], fresh_script()))
    assert chain.tip_height() == before[0] + 1 and chain.unspent([address.script_pubkey]) == []
    chain.audit()


def test_double_spends_are_refused_in_the_mempool_and_in_blocks(chain: EmbeddedBackend, ms: Multisig) -> None:
    utxo, address = funded(chain, ms)
    first = spend(ms, [(utxo, address)])
    second = spend(ms, [(utxo, address)])  # same coin, another destination
    assert first != second
    # Both in one block: the kernel refuses it.
    with pytest.raises(NodeError, match="rejected"):
        chain.submit_block(chain.make_block([first, second], fresh_script()))
    txid = chain.broadcast(first)
    assert "txn-mempool-conflict" in (chain.test_accept(second).reason or "")
    with pytest.raises(NodeError, match="txn-mempool-conflict"):
        chain.broadcast(second)
    chain.mine(1, fresh_script())
    assert chain.tx_status(txid).confirmations == 1
    assert "missingorspent" in (chain.test_accept(second).reason or "")
    tip = chain.tip_height()
    with pytest.raises(NodeError, match="rejected"):
        chain.submit_block(chain.make_block([second], fresh_script()))
    assert chain.tip_height() == tip
    chain.audit()


def test_a_block_double_spending_the_mempool_evicts_the_loser(chain: EmbeddedBackend, ms: Multisig) -> None:
    utxo, address = funded(chain, ms)
    first, second = spend(ms, [(utxo, address)]), spend(ms, [(utxo, address)])
    chain.broadcast(first)
    chain.submit_block(chain.make_block([second], fresh_script()))
    assert chain.mempool() == []
    assert chain.tx_status(chain.test_accept(first).txid).known is False
    chain.audit()


def test_coinbase_maturity(chain: EmbeddedBackend, ms: Multisig) -> None:
    utxo, address = funded(chain, ms, mature=False)
    chain.mine(COINBASE_MATURITY - 2, b"\x51")  # the next block is at depth 99 of the coinbase
    raw = spend(ms, [(utxo, address)])
    assert "premature-spend-of-coinbase" in (chain.test_accept(raw).reason or "")
    with pytest.raises(NodeError, match="rejected"):
        chain.submit_block(chain.make_block([raw], fresh_script()))
    chain.mine(1, b"\x51")
    assert chain.test_accept(raw).allowed
    chain.submit_block(chain.make_block([raw], fresh_script()))  # the kernel agrees: depth 100
    chain.audit()


def test_the_chain_survives_a_restart(tmp_path: Path, ms: Multisig) -> None:
    chain = open_chain(tmp_path / "chain")
    assert open_chain(tmp_path / "chain") is chain  # one open chain per directory and process
    utxo, address = funded(chain, ms)
    txid = chain.broadcast(spend(ms, [(utxo, address)]))
    scripts = [address.script_pubkey, b"\x51"]
    before = state(chain, scripts)
    chain.close()
    with pytest.raises(NodeError, match="closed"):
        chain.tip_height()
    reopened = open_chain(tmp_path / "chain")
    try:
        assert reopened is not chain
        assert (reopened.reconciled.handed_back, reopened.reconciled.removed, reopened.reconciled.recorded) == (0, 0, 0)
        assert state(reopened, scripts) == before and reopened.mempool() == [txid]
        reopened.audit()
        reopened.mine(1, b"\x51")
        assert reopened.tx_status(txid).confirmations == 1
    finally:
        reopened.close()


def test_the_index_catches_up_with_a_kernel_ahead_of_it(tmp_path: Path) -> None:
    """Killed after the kernel took a block and before the index recorded it."""
    chain = open_chain(tmp_path / "chain")
    script = fresh_script()
    chain.mine(5, script)
    tip_hash = chain.mine(1, script)[0]
    chain.close()
    with sqlite3.connect(tmp_path / "chain" / "index.sqlite") as db:  # undo the last block's record
        db.execute("DELETE FROM outputs WHERE height = 6")
        db.execute("DELETE FROM txs WHERE height = 6")
        db.execute("DELETE FROM blocks WHERE height = 6")
    reopened = open_chain(tmp_path / "chain")
    try:
        assert reopened.reconciled.recorded == 1 and reopened.reconciled.handed_back == 0
        assert reopened.tip_height() == 6 and len(reopened.unspent([script])) == 6
        assert reopened.tx_status(reopened.unspent([script])[-1].txid).block_height == 6
        reopened.audit()
        assert reopened.mine(1, script)[0] != tip_hash
    finally:
        reopened.close()


MINER = """
import sys
from pathlib import Path
from custody.chain.embedded import open_chain
chain = open_chain(Path(sys.argv[1]))
script = bytes.fromhex(sys.argv[2])
while True:
    chain.mine(1, script)
    print(chain.tip_height(), flush=True)
"""


def test_the_chain_survives_sigkill_between_blocks(tmp_path: Path) -> None:
    script = fresh_script()
    reported = 0
    handed_back = []
    for round_ in range(2):
        child = subprocess.Popen(
            [sys.executable, "-c", MINER, str(tmp_path / "chain"), script.hex()],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            text=True,
        )
        assert child.stdout is not None
        deadline = time.monotonic() + 60
        while reported < 200 * (round_ + 1) and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, "the mining process ended"
            reported = int(line)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        chain = open_chain(tmp_path / "chain")
        try:
            handed_back.append(chain.reconciled.handed_back)
            tip = chain.tip_height()
            assert tip >= reported  # every block the child saw recorded survives
            assert len(chain.unspent([script])) == tip
            chain.audit()  # the index claims exactly the kernel's chain and its UTXO set
        finally:
            chain.close()
    # The kernel flushes rarely: killed, it forgets its recent blocks, and takes them back.
    assert any(handed_back), handed_back


def test_another_process_cannot_open_an_open_chain(chain: EmbeddedBackend) -> None:
    code = "import sys; from custody.chain.embedded import open_chain; open_chain(sys.argv[1])"
    result = subprocess.run(
        [sys.executable, "-c", code, str(chain.datadir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode != 0 and "another process is using it" in result.stderr


def test_backend_for_the_embedded_chain(tmp_path: Path) -> None:
    settings = Settings.load(home=str(tmp_path), env={"CUSTODY_CHAIN": "embedded"})
    assert settings.chain_datadir == tmp_path / "chain"
    backend = backend_for(settings, "regtest")
    try:
        assert isinstance(backend, EmbeddedBackend) and backend.tip_height() == 0
        assert backend_for(settings, "regtest") is backend
        with pytest.raises(NodeError, match="regtest only"):
            backend_for(settings, "mainnet")
    finally:
        backend.close()
    assert Settings.load(home=str(tmp_path), env={}).chain == "node"
    with pytest.raises(InputError, match="CUSTODY_CHAIN"):
        Settings.load(home=str(tmp_path), env={"CUSTODY_CHAIN": "electrum"})
