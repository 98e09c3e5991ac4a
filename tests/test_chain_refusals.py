"""Refusals classified by their reject reason, driven for real on the node and the embedded chain.

Each case makes the chain refuse a transaction for one reason (missing inputs, a mempool
conflict, a transaction it already has, fees, locktimes, standardness, consensus) and checks
the Refusal both ``test_accept`` and ``broadcast`` give. The embedded chain must give the
same class as the node wherever both apply. Also: what ``spends`` says of an output that is
unspent, spent in the mempool, spent in a block, or unknown; and a node that is still
syncing (initial block download, headers ahead of blocks) is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from bitcoin.core import CMutableTransaction

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.txbuild import Coin, build_transaction
from custody.chain.embedded import EmbeddedBackend
from custody.chain.kernel import COINBASE_MATURITY
from custody.chain.node import check_synced, connect
from custody.chain.regtest import NodeInfo, start_node, stop_node
from custody.chain.types import (
    REJECT_REASONS,
    ChainBackend,
    Refusal,
    SpendState,
    TransactionRefused,
    Utxo,
    classify,
)
from custody.errors import InputError, NodeError
from custody.policy.generator import DerivedAddress
from tests.chain_support import FEE, Multisig, Tamper, corrupt_signature, fresh_script, high_s, multisig

Shape = Callable[[CMutableTransaction], None]


@pytest.fixture(scope="module")
def ms() -> Multisig:
    return multisig(tag="refusals")


def coin(backend: ChainBackend, ms: Multisig, mature: bool = True) -> tuple[Utxo, DerivedAddress]:
    """A coinbase paying a fresh 2-of-3 address, mature unless asked otherwise."""
    address = ms.fresh()
    backend.mine(1, address.script_pubkey)
    if mature:
        backend.mine(COINBASE_MATURITY, b"\x51")
    (utxo,) = backend.unspent([address.script_pubkey])
    return utxo, address


def signed(
    ms: Multisig,
    coins: Sequence[tuple[Utxo, DerivedAddress]],
    outputs: Sequence[tuple[bytes, int]] | None = None,
    shape: Shape | None = None,
    tamper: Tamper | None = None,
) -> bytes:
    """A raw transaction spending ``coins``, signed by two founders after ``shape`` edited it."""
    if outputs is None:
        outputs = [(fresh_script(), sum(u.amount for u, _ in coins) - FEE)]
    tx = build_transaction([Coin(u.txid, u.vout, u.amount, u.script_pubkey, 0, a.index) for u, a in coins], outputs)
    if shape is not None:
        shape(tx)
    p = psbt_lib.Psbt.from_unsigned_tx(tx)
    by_outpoint = {(u.txid, u.vout): (u, a) for u, a in coins}
    for n, txin in enumerate(p.tx.vin):
        u, a = by_outpoint[(txin.prevout.hash[::-1].hex(), txin.prevout.n)]
        p.inputs[n].witness_utxo = psbt_lib.WitnessUtxo(u.amount, u.script_pubkey)
        p.inputs[n].witness_script = a.script
        for f in ms.founders[:2]:
            assert psbt_lib.sign_input(p, n, f.master.derive(f.path + (a.chain, a.index)).private_key())
    p = psbt_lib.finalize(p)
    if tamper is not None:
        p.inputs[0].final_script_witness = tamper(p.inputs[0].final_script_witness or ())
    return bytes(psbt_lib.extract(p).serialize())


def refused(backend: ChainBackend, raw: bytes) -> tuple[Refusal, str]:
    """The refusal ``test_accept`` gives, checked against the one ``broadcast`` raises."""
    accept = backend.test_accept(raw)
    assert not accept.allowed and accept.refusal is not None and accept.reason
    with pytest.raises(TransactionRefused) as sent:
        backend.broadcast(raw)
    assert sent.value.refusal is accept.refusal, (accept.reason, sent.value.reason)
    assert sent.value.exit_code == 8
    return accept.refusal, accept.reason


def test_a_lookup_asks_each_script_once_and_refuses_an_empty_one(backend: ChainBackend, ms: Multisig) -> None:
    """Both lookups, on both backends: a script named twice finds its coin once; an empty
    scriptPubKey among good ones is refused (InputError) rather than asked of the chain."""
    utxo, address = coin(backend, ms)
    spk = address.script_pubkey
    assert backend.unspent([spk, spk]) == [utxo]
    assert backend.unspent_at([spk, spk]).utxos == [utxo]
    for lookup in (backend.unspent, backend.unspent_at):
        with pytest.raises(InputError, match="empty scriptPubKey"):
            lookup([spk, b""])


def test_missing_inputs(backend: ChainBackend, ms: Multisig) -> None:
    nowhere = ms.fresh()
    ghost = Utxo(os.urandom(32).hex(), 0, 1_000_000, nowhere.script_pubkey, 1)
    refusal, reason = refused(backend, signed(ms, [(ghost, nowhere)]))
    assert refusal is Refusal.MISSING_INPUTS, reason


def test_conflicts_duplicates_and_spends(backend: ChainBackend, ms: Multisig) -> None:
    """A mempool conflict is not a spend; a block spend is, with its depth and spender."""
    utxo, address = coin(backend, ms)
    unspent, unspent_address = coin(backend, ms)
    first = signed(ms, [(utxo, address)])
    second = signed(ms, [(utxo, address)])  # another destination: another transaction
    txid = backend.broadcast(first)
    ghost = (os.urandom(32).hex(), 3)
    mempool, untouched, unknown = backend.spends([(utxo.txid, utxo.vout), (unspent.txid, unspent.vout), ghost])
    assert mempool.state is SpendState.IN_MEMPOOL
    assert untouched.state is SpendState.UNSPENT and unknown.state is SpendState.UNKNOWN

    refusal, reason = refused(backend, second)
    assert refusal is Refusal.MEMPOOL_CONFLICT, reason
    accept = backend.test_accept(first)
    assert accept.refusal is Refusal.ALREADY_KNOWN, accept.reason  # txn-already-in-mempool
    assert backend.broadcast(first) == txid  # idempotent, not an error

    backend.mine(1, b"\x51")
    (spent,) = backend.spends([(utxo.txid, utxo.vout)])
    assert (spent.state, spent.spender, spent.confirmations) == (SpendState.SPENT, txid, 1)
    assert spent.block_height == backend.tip_height()
    backend.mine(2, b"\x51")
    (deeper,) = backend.spends([(utxo.txid, utxo.vout)])
    assert deeper.confirmations == 3 and deeper.block_height == spent.block_height
    refusal, reason = refused(backend, second)
    assert refusal is Refusal.MISSING_INPUTS, reason  # spent in a block: the same words as "never seen"
    assert backend.test_accept(first).refusal is Refusal.ALREADY_KNOWN  # txn-already-known
    assert backend.broadcast(first) == txid
    assert backend.test_accept(signed(ms, [(unspent, unspent_address)])).allowed


def test_fees(backend: ChainBackend, ms: Multisig) -> None:
    utxo, address = coin(backend, ms)
    free = signed(ms, [(utxo, address)], [(fresh_script(), utxo.amount)])
    refusal, reason = refused(backend, free)
    assert refusal is Refusal.FEE_TOO_LOW, reason


@pytest.mark.regtest
def test_a_fee_above_the_nodes_cap(regtest_node: NodeInfo, ms: Multisig) -> None:
    """Only a node has a fee cap (maxfeerate, 0.1 per kvB by default); the embedded chain has none."""
    backend = connect(regtest_node.client(), "regtest")
    utxo, address = coin(backend, ms)
    lavish = signed(ms, [(utxo, address)], [(fresh_script(), utxo.amount // 2)])
    refusal, reason = refused(backend, lavish)
    assert refusal is Refusal.FEE_TOO_HIGH, reason


def test_premature_spends(backend: ChainBackend, ms: Multisig) -> None:
    young, young_address = coin(backend, ms, mature=False)
    refusal, reason = refused(backend, signed(ms, [(young, young_address)]))
    assert refusal is Refusal.PREMATURE and reason.startswith("bad-txns-premature-spend-of-coinbase"), reason

    utxo, address = coin(backend, ms)

    def locked(tx: CMutableTransaction) -> None:
        tx.nLockTime = backend.tip_height() + 50

    refusal, reason = refused(backend, signed(ms, [(utxo, address)], shape=locked))
    assert (refusal, reason) == (Refusal.PREMATURE, "non-final")

    def relative(tx: CMutableTransaction) -> None:
        tx.vin[0].nSequence = 500  # BIP-68: 500 blocks after the coin's block

    refusal, reason = refused(backend, signed(ms, [(utxo, address)], shape=relative))
    assert (refusal, reason) == (Refusal.PREMATURE, "non-BIP68-final")


def test_non_standard_and_invalid(backend: ChainBackend, ms: Multisig) -> None:
    utxo, address = coin(backend, ms)
    dust = signed(ms, [(utxo, address)], [(fresh_script(), 100), (fresh_script(), utxo.amount - 100 - FEE)])
    refusal, reason = refused(backend, dust)
    assert refusal is Refusal.NON_STANDARD, reason
    refusal, reason = refused(backend, signed(ms, [(utxo, address)], tamper=high_s))
    assert refusal is Refusal.NON_STANDARD, reason

    refusal, reason = refused(backend, signed(ms, [(utxo, address)], tamper=corrupt_signature))
    if isinstance(backend, EmbeddedBackend):  # every input under all consensus flags
        assert refusal is Refusal.INVALID and reason.startswith("mandatory-script-verify-flag-failed ("), reason
    else:  # Core's mandatory flags are P2SH alone: a bad witness fails the "non-mandatory" ones first
        assert refusal is Refusal.NON_STANDARD and reason.startswith("non-mandatory-script-verify-flag ("), reason
    more = signed(ms, [(utxo, address)], [(fresh_script(), utxo.amount + 1)])
    refusal, reason = refused(backend, more)
    assert refusal is Refusal.INVALID and reason.startswith("bad-txns-in-belowout"), reason

    garbage = b"\x02\x00\x00\x00 not a transaction"
    accept = backend.test_accept(garbage)
    assert accept.refusal is Refusal.UNDECODABLE and not accept.allowed
    with pytest.raises(TransactionRefused) as sent:
        backend.broadcast(garbage)
    assert sent.value.refusal is Refusal.UNDECODABLE


@pytest.mark.regtest
def test_a_refused_replacement(tmp_path: Path, ms: Multisig) -> None:
    """A node that allows replace-by-fee (-mempoolreplacement=1; Litecoin's default is off)
    refuses a conflicting transaction that pays no more: "insufficient fee"."""
    datadir = tmp_path / "rbf-node"
    node = start_node(datadir, extra_args=["-mempoolreplacement=1"])
    try:
        backend = connect(node.client(), "regtest")
        utxo, address = coin(backend, ms)
        backend.broadcast(signed(ms, [(utxo, address)]))  # signals replacement (nSequence 0xfffffffd)
        refusal, reason = refused(backend, signed(ms, [(utxo, address)]))
        assert refusal is Refusal.REPLACEMENT_REFUSED and reason == "insufficient fee", reason
    finally:
        stop_node(datadir)


# --------------------------------------------------------------------------- a node still syncing


@pytest.mark.regtest
def test_a_node_still_syncing_is_refused(tmp_path: Path, regtest_node: NodeInfo) -> None:
    """A fresh regtest node is in initial block download until it has a recent block; one
    that has headers it lacks the blocks of is still syncing too. Both are refused."""
    datadir = tmp_path / "fresh-node"
    node = start_node(datadir, leave_ibd=False)
    try:
        client = node.client()
        info = client.call("getblockchaininfo")
        assert info["initialblockdownload"] is True and info["blocks"] == 0
        with pytest.raises(NodeError, match="initial block download") as ibd:
            connect(client, "regtest")
        assert ibd.value.exit_code == 8

        client.call("generatetodescriptor", 1, "raw(51)")  # its own block: out of initial download
        assert connect(client, "regtest").tip_height() == 1
        first = regtest_node.client()
        for height in range(1, first.call("getblockcount") + 1):  # the other chain's headers, not its blocks
            client.call("submitheader", first.call("getblockheader", first.call("getblockhash", height), False))
        info = client.call("getblockchaininfo")
        assert info["headers"] > info["blocks"] == 1 and info["initialblockdownload"] is False
        with pytest.raises(NodeError, match=f"{info['headers']} headers but only 1 blocks"):
            connect(client, "regtest")
    finally:
        stop_node(datadir)


def test_sync_state_is_read_from_the_answer_not_guessed() -> None:
    """What getblockchaininfo must say; a field missing or of another type counts as syncing."""
    check_synced("node", {"initialblockdownload": False, "blocks": 5, "headers": 5})
    for info in (
        {"blocks": 5, "headers": 5},
        {"initialblockdownload": "false", "blocks": 5, "headers": 5},
        {"initialblockdownload": 0, "blocks": 5, "headers": 5},
        {"initialblockdownload": False, "blocks": 5, "headers": 6},
        {"initialblockdownload": False, "blocks": 5},
        {"initialblockdownload": False, "blocks": "5", "headers": 5},
    ):
        with pytest.raises(NodeError):
            check_synced("node", info)


# --------------------------------------------------------------------------- the classification itself


def test_reasons_are_read_as_core_writes_them_never_by_substring() -> None:
    assert classify("txn-mempool-conflict") is Refusal.MEMPOOL_CONFLICT
    assert classify("18: txn-mempool-conflict") is Refusal.MEMPOOL_CONFLICT  # a BIP-61 code before 0.20
    assert classify("min relay fee not met, 0 < 141") is Refusal.FEE_TOO_LOW  # reason, debug message
    assert classify("non-mandatory-script-verify-flag (Non-canonical DER signature)") is Refusal.NON_STANDARD
    assert classify("Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)") is Refusal.FEE_TOO_HIGH
    assert classify("bad-txns-inputs-missingorspent") is Refusal.MISSING_INPUTS
    # What the old substring search took for "missing or spent", and what it is not:
    assert classify("txn-mempool-conflict (input 0 is spent by abc)") is Refusal.MEMPOOL_CONFLICT
    for unknown in (
        "spent",
        "missing",
        "inputs missing or spent",  # not Core's capitalisation
        "xbad-txns-inputs-missingorspent",
        "bad-txns-inputs-missingorspent-but-not-quite",
        "the node says: missing-inputs",
        "999: missing-inputs",
        "",
    ):
        assert classify(unknown) is Refusal.UNKNOWN, unknown
    assert set(REJECT_REASONS.values()) == set(Refusal) - {Refusal.UNDECODABLE, Refusal.UNKNOWN}
