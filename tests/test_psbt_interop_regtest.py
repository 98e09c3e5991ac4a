"""Our PSBTs among other wallets' tools, on the real regtest node: every input carries its
previous transaction (checked by the offline signer), and PSBTs another signer finalized
(the node's ``walletprocesspsbt``) import with their signatures read out of the final scripts."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from bitcoin.core import CTransaction, b2lx, b2x, x

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.keys import b58check_encode
from custody.chain.regtest import NodeInfo, ensure_wallet
from custody.chain.rpc import RpcClient
from custody.errors import InputError
from custody.identity.keyfile import open_founder_key
from custody.withdraw.signer import SignerState, review, state_path
from custody_cli.documents import read_manifest_file
from tests.support import PASSPHRASE, psbt_b64, read_psbt
from tests.withdraw_support import Shop

pytestmark = pytest.mark.regtest

SCRIPTS = ["p2wsh", "p2sh-p2wsh", "p2sh"]


def two_input_withdrawal(shop: Shop) -> int:
    """An approved withdrawal that needs both of two deposits (two inputs)."""
    shop.deposit("acct-1", "0.3", count=2)
    return shop.approved("0.5")


def test_every_input_carries_its_previous_transaction_for_the_node_and_embit(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    from embit.psbt import PSBT

    for script in SCRIPTS:
        shop = Shop(tmp_path / script, regtest_node, funded_wallet, script)
        wid = two_input_withdrawal(shop)
        path = shop.export(wid)
        decoded = shop.rpc.call("decodepsbt", psbt_b64(path))
        assert len(decoded["inputs"]) == 2
        for vin, inp in zip(decoded["tx"]["vin"], decoded["inputs"], strict=True):
            prev = inp["non_witness_utxo"]  # the node parsed it: its txid is the outpoint's
            assert prev["txid"] == vin["txid"]
            spent = prev["vout"][vin["vout"]]
            if script == "p2sh":
                assert "witness_utxo" not in inp
            else:  # segwit: both, and they agree
                assert inp["witness_utxo"]["scriptPubKey"]["hex"] == spent["scriptPubKey"]["hex"]
                assert Decimal(str(inp["witness_utxo"]["amount"])) == Decimal(str(spent["value"]))
        analyzed = shop.rpc.call("analyzepsbt", psbt_b64(path))
        assert analyzed["next"] == "signer"
        assert Decimal(str(analyzed["fee"])) * 100_000_000 == shop.ok("withdraw", "show", str(wid))["fee_sat"]
        parsed = PSBT.parse(read_psbt(path))  # embit: the previous txid checked (verify raises otherwise)
        for inp in parsed.inputs:
            assert inp.non_witness_utxo is not None and inp.verify() is True


def _signer(shop: Shop) -> tuple[object, object, SignerState]:
    pinned = read_manifest_file(shop.tmp / "home" / "founders-manifest.json").check()
    founder = open_founder_key(shop.founder_keys["founder-a"], PASSPHRASE)
    return founder, pinned, SignerState.load(state_path(shop.tmp / "home" / "founders-manifest.json"), pinned)


def test_a_previous_transaction_edited_byte_by_byte_is_refused_or_harmless(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    """Every byte of input 0's previous transaction flipped in the PSBT file: the offline signer
    refuses, unless the byte is in the previous transaction's witness (not in its txid) and the
    output spent is unchanged."""
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    wid = two_input_withdrawal(shop)
    raw = read_psbt(shop.export(wid))
    p = psbt_lib.Psbt.parse(raw)
    founder, pinned, state = _signer(shop)
    review(p, founder, pinned, state)  # type: ignore[arg-type]  # the untouched PSBT passes
    prev = p.inputs[0].non_witness_utxo.serialize()
    at = raw.index(prev)
    assert raw.count(prev) == 1
    prevout = p.tx.vin[0].prevout
    original = p.inputs[0].non_witness_utxo.vout[prevout.n]
    refused = harmless = 0
    for k in range(len(prev)):
        edited = bytearray(raw)
        edited[at + k] ^= 0x01
        try:
            q = psbt_lib.Psbt.parse(bytes(edited))
            review(q, founder, pinned, state)  # type: ignore[arg-type]
        except InputError:
            refused += 1
            continue
        nwu = q.inputs[0].non_witness_utxo
        assert nwu.GetTxid() == bytes(prevout.hash), f"byte {k}: another previous transaction was accepted"
        assert nwu.vout[prevout.n] == original
        harmless += 1
    assert refused > len(prev) // 2 and refused + harmless == len(prev)
    # every byte that is part of the txid (the non-witness serialization) was refused
    t = p.inputs[0].non_witness_utxo
    assert harmless <= len(prev) - len(CTransaction(t.vin, t.vout, t.nLockTime, t.nVersion).serialize())


def test_a_witness_utxo_that_disagrees_with_the_previous_transaction_is_refused(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    wid = two_input_withdrawal(shop)
    path = shop.export(wid)
    for amount_delta, script in ((-100_000, None), (0, b"\x00\x20" + b"\x42" * 32)):
        p = psbt_lib.Psbt.parse(read_psbt(path))
        wu = p.inputs[1].witness_utxo
        p.inputs[1].witness_utxo = psbt_lib.WitnessUtxo(wu.amount + amount_delta, script or wu.script_pubkey)
        forged = tmp_path / f"forged-{amount_delta}.psbt"
        forged.write_bytes(p.serialize())
        result = shop.sign(forged, "founder-a", tmp_path / "out.psbt")
        assert result.exit_code == 2, result.output
        assert "input 1: its witness UTXO disagrees with the output of its previous transaction" in result.stderr
        assert not (tmp_path / "out.psbt").exists()
    p = psbt_lib.Psbt.parse(read_psbt(path))
    p.inputs[0].non_witness_utxo = None  # a PSBT without the previous transaction (as before)
    bare = tmp_path / "bare.psbt"
    bare.write_bytes(p.serialize())
    result = shop.sign(bare, "founder-a", tmp_path / "out.psbt")
    assert result.exit_code == 2 and "input 0: the PSBT carries no previous transaction" in result.stderr


def test_a_previous_transaction_edited_in_the_store_is_refused_at_export(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    wid = two_input_withdrawal(shop)
    db = sqlite3.connect(tmp_path / "home" / "custody.db")
    (rec_id, prev_hex, vout) = db.execute(
        "SELECT id, prev_tx, vout FROM withdrawal_input WHERE withdrawal_id = ? ORDER BY position", (wid,)
    ).fetchone()
    tx = CTransaction.deserialize(x(prev_hex))
    # the insider's previous transaction: the same output, 1 BTC more (another txid, of course)
    from bitcoin.core import CMutableTransaction

    forged = CMutableTransaction.from_tx(tx)
    forged.vout[vout].nValue += 100_000_000
    for value in (b2x(forged.serialize()), "zz" + prev_hex[2:], None):
        db.execute("UPDATE withdrawal_input SET prev_tx = ? WHERE id = ?", (value, rec_id))
        db.commit()
        result = shop.cli("withdraw", "export", str(wid), str(tmp_path / "x.psbt"))
        assert result.exit_code == 9, result.output
        assert "previous transaction" in result.stderr and not (tmp_path / "x.psbt").exists()
    db.execute("UPDATE withdrawal_input SET prev_tx = ? WHERE id = ?", (prev_hex, rec_id))
    db.commit()
    db.close()
    assert shop.cli("withdraw", "export", str(wid), str(tmp_path / "x.psbt")).exit_code == 0


def _node_signer(shop: Shop, path: Path, founder_name: str, wallet: str) -> RpcClient:
    """The node's own wallet holding ``founder_name``'s keys for this PSBT's inputs."""
    founder = open_founder_key(shop.founder_keys[founder_name], PASSPHRASE)
    signer = ensure_wallet(shop.rpc, wallet[:60])
    for inp in shop.rpc.call("decodepsbt", psbt_b64(path))["inputs"]:
        for d in inp["bip32_derivs"]:
            if d["master_fingerprint"] == founder.master.fingerprint.hex():
                steps = d["path"].split("/")[1:]
                derivation = tuple(int(s.rstrip("'h")) + (0x80000000 if s[-1] in "'h" else 0) for s in steps)
                secret = founder.master.derive(derivation).secret
                signer.call("importprivkey", b58check_encode(b"\xef" + secret + b"\x01"), "", False)
    return signer


@pytest.mark.parametrize("script", SCRIPTS)
def test_signed_by_embit_and_the_node_wallet_finalized_by_the_node_imports_and_broadcasts(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient, script: str
) -> None:
    from embit.bip32 import HDKey
    from embit.psbt import PSBT

    shop = Shop(tmp_path, regtest_node, funded_wallet, script)
    wid = two_input_withdrawal(shop)
    path = shop.export(wid)

    # founder-a signs with embit (what SeedSigner and Specter-DIY sign with)
    founder_a = open_founder_key(shop.founder_keys["founder-a"], PASSPHRASE)
    embit_psbt = PSBT.parse(read_psbt(path))
    assert embit_psbt.sign_with(HDKey.from_string(founder_a.master.serialize())) == 2
    # founder-c's keys are in the node's wallet: it signs the second and finalizes
    signer = _node_signer(shop, path, "founder-c", f"c-{script}-{tmp_path.name}")
    processed = signer.call("walletprocesspsbt", embit_psbt.to_base64(), True, "ALL", True)
    assert processed["complete"] is True
    finalized = psbt_lib.Psbt.from_base64(processed["psbt"])
    assert all(i.is_finalized and not i.partial_sigs for i in finalized.inputs)

    # tampered final scripts are refused, loudly, and nothing is stored
    for n, what in ((0, "signature"), (1, "script")):
        bad = finalized.copy()
        inp = bad.inputs[n]
        if inp.final_script_witness:
            stack = list(inp.final_script_witness)
            k = 1 if what == "signature" else len(stack) - 1
            stack[k] = stack[k][:10] + bytes([stack[k][10] ^ 1]) + stack[k][11:]
            inp.final_script_witness = tuple(stack)
        else:
            sig = bytearray(inp.final_script_sig or b"")
            sig[12 if what == "signature" else len(sig) - 3] ^= 1
            inp.final_script_sig = bytes(sig)
        tampered = tmp_path / f"tampered-{n}.psbt"
        tampered.write_bytes(bad.serialize())
        result = shop.cli("withdraw", "import", str(wid), str(tampered))
        assert result.exit_code == 2, result.output
        assert f"input {n}" in result.stderr
    assert shop.ok("withdraw", "show", str(wid))["status"] == "approved"

    node_finalized = tmp_path / "node-finalized.psbt"
    node_finalized.write_text(processed["psbt"] + "\n")
    imported = shop.ok("withdraw", "import", str(wid), str(node_finalized))
    assert imported["founders_signed"] == ["founder-a", "founder-c"] and imported["status"] == "signed"
    final = shop.ok("withdraw", "finalize", str(wid))
    sent = shop.ok("withdraw", "broadcast", str(wid))
    assert sent["status"] == "broadcast" and sent["txid"] == final["txid"]
    # the node's own extraction of its finalized PSBT is the very transaction we broadcast
    extracted = shop.rpc.call("finalizepsbt", processed["psbt"], True)
    assert b2lx(CTransaction.deserialize(x(extracted["hex"])).GetTxid()) == sent["txid"]
    shop.mine(1)
    assert shop.ok("sync")[0]["status"] == "confirmed"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_node_finalizes_what_our_signer_signed(
    tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient, script: str
) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet, script)
    wid = two_input_withdrawal(shop)
    path = shop.export(wid)
    assert shop.sign(path, "founder-a", tmp_path / "a.psbt").exit_code == 0
    assert shop.sign(path, "founder-b", tmp_path / "b.psbt").exit_code == 0
    combined = shop.rpc.call("combinepsbt", [psbt_b64(tmp_path / "a.psbt"), psbt_b64(tmp_path / "b.psbt")])
    done = shop.rpc.call("finalizepsbt", combined, True)
    assert done["complete"] is True
    accepted = shop.rpc.call("testmempoolaccept", [done["hex"]])[0]
    assert accepted["allowed"] is True, accepted
    # our own finalizer writes the same bytes as the node's
    for signed in ("a.psbt", "b.psbt"):
        assert shop.cli("withdraw", "import", str(wid), str(tmp_path / signed)).exit_code == 0
    shop.ok("withdraw", "finalize", str(wid))
    db = sqlite3.connect(tmp_path / "home" / "custody.db")
    (ours,) = db.execute("SELECT final_tx FROM withdrawal WHERE id = ?", (wid,)).fetchone()
    db.close()
    assert ours == done["hex"]
    assert accepted["txid"] == shop.ok("withdraw", "show", str(wid))["txid"]
