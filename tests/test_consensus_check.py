"""The pre-broadcast check: libbitcoinkernel's script verification plus relay standardness.

Each tampered spend is refused by the check *and* by the chain's own test-accept, on both
backends: the embedded chain, and the real regtest node (marked ``regtest`` by its fixture).
The node receives the coin's script only as a ``raw(HEX)`` descriptor.
"""

from __future__ import annotations

import pytest
from bitcoin.core import CMutableTransaction, CScript, CTransaction

from custody.chain.consensus import check_before_broadcast, signature_problem
from custody.chain.kernel import COINBASE_MATURITY
from custody.chain.types import ChainBackend, Utxo
from custody.errors import InputError, NodeError
from tests.chain_support import (
    Multisig,
    Tamper,
    corrupt_signature,
    fresh_script,
    high_s,
    multisig,
    non_empty_dummy,
    spend,
    spent_outputs,
)


@pytest.fixture(scope="module")
def ms() -> Multisig:
    return multisig(tag="consensus")


def fund(backend: ChainBackend, ms: Multisig) -> list[tuple[Utxo, object]]:
    """A mature coinbase paying a fresh 2-of-3 p2wsh address (generatetodescriptor raw(spk))."""
    address = ms.fresh()
    backend.mine(1, address.script_pubkey)
    backend.mine(COINBASE_MATURITY, b"\x51")
    (utxo,) = backend.unspent([address.script_pubkey])
    return [(utxo, address)]


def test_a_correct_spend_passes_and_is_accepted(backend: ChainBackend, ms: Multisig) -> None:
    coins = fund(backend, ms)
    raw = spend(ms, coins)  # type: ignore[arg-type]
    check_before_broadcast(raw, spent_outputs(coins, raw))  # type: ignore[arg-type]
    accept = backend.test_accept(raw)
    assert accept.allowed, accept.reason
    txid = backend.broadcast(raw)
    backend.mine(1, b"\x51")
    assert backend.tx_status(txid).confirmations == 1


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (corrupt_signature, "invalid by consensus: input 0: script verification failed"),
        (high_s, "high-S"),
        (non_empty_dummy, "dummy element is not empty"),
    ],
    ids=["corrupted-signature", "high-s", "non-empty-dummy"],
)
def test_tampered_spends_are_refused(backend: ChainBackend, ms: Multisig, tamper: Tamper, message: str) -> None:
    coins = fund(backend, ms)
    raw = spend(ms, coins, tamper=tamper)  # type: ignore[arg-type]
    with pytest.raises(NodeError, match=message):
        check_before_broadcast(raw, spent_outputs(coins, raw))  # type: ignore[arg-type]
    accept = backend.test_accept(raw)
    assert not accept.allowed, "the chain would have accepted what the check refuses"


def test_high_s_is_valid_by_consensus_alone() -> None:
    """High S is policy, not consensus: the kernel accepts it, the standardness check does not."""
    from custody.chain.consensus import script_problem

    ms = multisig(tag="consensus")
    address = ms.address(7)
    coin = Utxo("11" * 32, 0, 100_000, address.script_pubkey, 1)
    raw = spend(ms, [(coin, address)], tamper=high_s)
    assert script_problem(raw, [(coin.amount, coin.script_pubkey)]) is None
    with pytest.raises(NodeError, match="high-S"):
        check_before_broadcast(raw, [(coin.amount, coin.script_pubkey)])


# --------------------------------------------------------------------------- no chain needed


@pytest.fixture(scope="module")
def offline() -> tuple[Multisig, list[tuple[Utxo, object]]]:
    """A coin that exists nowhere: script verification needs only its amount and script."""
    ms = multisig(tag="consensus")
    address = ms.address(3)
    return ms, [(Utxo("22" * 32, 1, 1_000_000, address.script_pubkey, 1), address)]


def test_the_spent_outputs_must_fit_the_transaction(offline: tuple) -> None:
    ms, coins = offline
    raw = spend(ms, coins)
    check_before_broadcast(raw, spent_outputs(coins, raw))
    with pytest.raises(InputError, match="1 inputs"):
        check_before_broadcast(raw, [])
    with pytest.raises(InputError, match="not a transaction"):
        check_before_broadcast(b"\x01\x02", [])
    # Another amount changes the BIP-143 digest: the kernel refuses the signatures.
    with pytest.raises(NodeError, match="script verification failed"):
        check_before_broadcast(raw, [(999_999, coins[0][0].script_pubkey)])


def test_dust_and_nonstandard_outputs(offline: tuple) -> None:
    ms, coins = offline
    amount = coins[0][0].amount
    dust = spend(ms, coins, [(fresh_script(), 293), (fresh_script(), amount - 10_000)])
    with pytest.raises(NodeError, match="dust"):
        check_before_broadcast(dust, spent_outputs(coins, dust))
    odd_script = bytes([0x51, 0x51, 0x93])  # OP_1 OP_1 OP_ADD: anyone can spend, nobody relays
    odd = spend(ms, coins, [(odd_script, 1_000), (fresh_script(), amount - 11_000)])
    with pytest.raises(NodeError, match="non-standard scriptPubKey"):
        check_before_broadcast(odd, spent_outputs(coins, odd))
    data = spend(ms, coins, [(bytes([0x6A, 0x04]) + b"memo", 0), (fresh_script(), amount - 10_000)])
    check_before_broadcast(data, spent_outputs(coins, data))  # one small OP_RETURN is standard


def test_witness_limits(offline: tuple) -> None:
    ms, coins = offline
    big_item = spend(ms, coins, tamper=lambda st: (st[0], st[1] + b"\x00" * 80, *st[2:]))
    with pytest.raises(NodeError, match="stack item of"):
        check_before_broadcast(big_item, spent_outputs(coins, big_item))
    many = spend(ms, coins, tamper=lambda st: (*([b""] * 101), st[-1]))
    with pytest.raises(NodeError, match="101 p2wsh stack items"):
        check_before_broadcast(many, spent_outputs(coins, many))


def test_scriptsig_must_be_push_only_and_small(offline: tuple) -> None:
    ms, coins = offline
    raw = spend(ms, coins)
    tx = CMutableTransaction.from_tx(CTransaction.deserialize(raw))
    tx.vin[0].scriptSig = CScript(bytes([0x51, 0x75]))  # OP_1 OP_DROP
    not_push = CTransaction.from_tx(tx).serialize()
    with pytest.raises(NodeError, match="not push-only"):
        check_before_broadcast(not_push, spent_outputs(coins, not_push))
    tx.vin[0].scriptSig = CScript(bytes([0x4D, 0x74, 0x06]) + b"\x00" * 1652)  # one push of 1,652 bytes
    big = CTransaction.from_tx(tx).serialize()
    with pytest.raises(NodeError, match="scriptSig of 1655 bytes"):
        check_before_broadcast(big, spent_outputs(coins, big))


def test_signature_encoding_rules() -> None:
    r, s = 1, 2
    sig = bytes([0x30, 6, 0x02, 1, r, 0x02, 1, s])
    assert signature_problem(sig + b"\x01") is None
    assert signature_problem(b"") is None  # an empty slot of a CHECKMULTISIG
    assert "sighash type 0x04" in (signature_problem(sig + b"\x04") or "")
    assert "strict DER" in (signature_problem(bytes([0x30, 7, 0x02, 2, 0, r, 0x02, 1, s, 1])) or "")
