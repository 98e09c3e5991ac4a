"""Every refusal of the withdrawal flow, each with its exit code, on the real regtest node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bitcoin.core import CMutableTransaction, CMutableTxOut

from custody.bitcoin import psbt as psbt_lib
from custody.chain.regtest import NodeInfo
from custody.chain.rpc import RpcClient
from custody.identity.approvals import sign_approval, summarize
from custody.identity.keyfile import open_employee_key
from custody.withdraw.signer import PROP_APPROVALS, PROPRIETARY_ID
from tests.support import PASSPHRASE, founders, read_psbt
from tests.withdraw_support import Shop, sign_and_apply

pytestmark = pytest.mark.regtest


@pytest.fixture
def shop(tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient) -> Shop:
    s = Shop(tmp_path, regtest_node, funded_wallet)
    s.deposit("acct-1", "0.3", count=2)
    return s


def _rewrite(path: Path, edit: Any) -> None:
    p = psbt_lib.Psbt.parse(read_psbt(path))
    edit(p)
    path.write_text(p.to_base64() + "\n")


def _reapprove(shop: Shop, p: psbt_lib.Psbt, who: tuple[str, ...] = ("alice", "bob")) -> None:
    """Employees fooled into approving an edited transaction: valid signatures over it."""
    meta = json.loads(p.proprietary[psbt_lib.ProprietaryKey(PROPRIETARY_ID, 0, b"")])
    amounts = []
    for n, pin in enumerate(p.inputs):
        if pin.witness_utxo is not None:
            amounts.append(pin.witness_utxo.amount)
        else:
            amounts.append(int(pin.non_witness_utxo.vout[p.tx.vin[n].prevout.n].nValue))
    summary = summarize("regtest", meta["withdrawal_id"], p.tx, amounts)
    bundle = []
    for name in who:
        key = open_employee_key(shop.employees[name], PASSPHRASE)
        bundle.append(
            {"employee": name, "pubkey": key.public_key.hex(), "signature": sign_approval(key.private_key, summary)}
        )
    p.proprietary[psbt_lib.ProprietaryKey(PROPRIETARY_ID, PROP_APPROVALS, b"")] = json.dumps(bundle).encode()


def test_self_approval_is_refused(shop: Shop) -> None:
    wid = shop.requested()
    result = shop.approve(wid, "carol")  # carol requested it
    assert result.exit_code == 4 and "cannot approve" in result.stderr


def test_one_approver_is_not_enough_and_twice_counts_once(shop: Shop) -> None:
    wid = shop.requested()
    assert shop.approve(wid, "alice").exit_code == 0
    again = shop.approve(wid, "alice")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["approvals"]["valid"] == ["alice"]
    assert json.loads(again.stdout)["status"] == "requested"
    export = shop.cli("withdraw", "export", str(wid), str(shop.tmp / "x.psbt"))
    assert export.exit_code == 4 and "1 of 2" in export.stderr


def test_a_disabled_approver_counts_not_at_all(shop: Shop) -> None:
    wid = shop.approved()
    assert shop.cli("employee", "disable", "bob").exit_code == 0
    sign_and_apply(shop.c, shop.tmp, shop.founder_keys)  # the founders sign the roster that disables him
    export = shop.cli("withdraw", "export", str(wid), str(shop.tmp / "x.psbt"))
    assert export.exit_code == 4 and "bob: disabled" in export.stderr
    disabled = shop.approve(wid, "bob")
    assert disabled.exit_code == 4
    assert shop.approve(wid, "dave").exit_code == 0
    assert shop.cli("withdraw", "export", str(wid), str(shop.tmp / "x.psbt")).exit_code == 0


def test_signer_refuses_an_approval_over_a_different_transaction(shop: Shop) -> None:
    first = shop.approved()
    second = shop.requested("0.02")
    assert shop.approve(second, "alice").exit_code == 0
    assert shop.approve(second, "dave").exit_code == 0
    path = shop.export(first)
    other = psbt_lib.Psbt.parse(read_psbt(shop.export(second)))
    key = psbt_lib.ProprietaryKey(PROPRIETARY_ID, PROP_APPROVALS, b"")
    _rewrite(path, lambda p: p.proprietary.__setitem__(key, other.proprietary[key]))
    result = shop.sign(path, "founder-a")
    assert result.exit_code == 4 and "does not cover this exact transaction" in result.stderr


def test_signer_refuses_outputs_edited_after_approval(shop: Shop) -> None:
    wid = shop.approved()
    path = shop.export(wid)

    def steal(p: psbt_lib.Psbt) -> None:
        tx = CMutableTransaction.from_tx(p.tx)
        dest = next(o for o in tx.vout if o.nValue == 1_000_000)
        change = next(o for o in tx.vout if o.nValue != 1_000_000)
        dest.nValue += 500_000  # paid out of the change: the totals still add up
        change.nValue -= 500_000
        p.tx = tx

    _rewrite(path, steal)
    result = shop.sign(path, "founder-a")
    # The requester's signature is checked first: it covers the exact transaction too.
    assert result.exit_code == 4 and "request signature does not cover" in result.stderr, result.stderr


def test_signer_refuses_a_change_output_that_is_not_ours(shop: Shop) -> None:
    wid = shop.approved()
    path = shop.export(wid)
    meta = json.loads(psbt_lib.Psbt.parse(read_psbt(path)).proprietary[psbt_lib.ProprietaryKey(PROPRIETARY_ID, 0, b"")])
    change = meta["change_output"]
    outsider = founders(tag="thief")
    from custody.bitcoin.network import REGTEST
    from custody.bitcoin.script import ScriptType
    from custody.policy.generator import AddressDeriver
    from custody.policy.model import make_policy

    thief = AddressDeriver(make_policy(REGTEST, 2, ScriptType.P2WSH, [(f.name, str(f.account)) for f in outsider]))

    def redirect(p: psbt_lib.Psbt) -> None:
        tx = CMutableTransaction.from_tx(p.tx)
        tx.vout[change] = CMutableTxOut(tx.vout[change].nValue, thief.derive(1, 0).script_pubkey)
        p.tx = tx
        _reapprove(shop, p)  # even with two employees fooled into approving it

    _rewrite(path, redirect)
    result = shop.sign(path, "founder-a")
    assert result.exit_code == 2 and "change output is not ours" in result.stderr


def test_signer_refuses_an_input_that_is_not_ours(shop: Shop) -> None:
    wid = shop.approved()
    path = shop.export(wid)

    def foreign(p: psbt_lib.Psbt) -> None:
        pin = p.inputs[0]
        outsider = founders(tag="foreign")[0]
        script = b"\x51" + bytes([33]) + outsider.account.xpub.public_key + b"\x51\xae"
        import hashlib

        from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut

        spk = b"\x00\x20" + hashlib.sha256(script).digest()
        # The previous transaction every input must carry, forged to pay the outsider's script.
        prev = CTransaction([CTxIn(COutPoint(b"\x11" * 32, 0))], [CTxOut(pin.witness_utxo.amount, spk)])
        pin.witness_script = script
        pin.witness_utxo = psbt_lib.WitnessUtxo(pin.witness_utxo.amount, spk)
        pin.non_witness_utxo = prev
        p.tx.vin[0].prevout = COutPoint(prev.GetTxid(), 0)
        _reapprove(shop, p)

    _rewrite(path, foreign)
    result = shop.sign(path, "founder-a")
    assert result.exit_code == 2 and "input 0 is not one of our policy's scripts" in result.stderr


def test_one_founder_signing_twice_counts_once(shop: Shop) -> None:
    wid = shop.approved()
    path = shop.export(wid)
    first = shop.sign(path, "founder-a", shop.tmp / "a1.psbt")
    assert first.exit_code == 0, first.output
    twice = shop.sign(shop.tmp / "a1.psbt", "founder-a", shop.tmp / "a2.psbt")
    assert twice.exit_code == 6 and "already" in twice.stderr
    again = shop.sign(path, "founder-a", shop.tmp / "a3.psbt")  # from the clean PSBT: same signatures
    assert again.exit_code == 0
    assert shop.ok("withdraw", "import", str(wid), str(shop.tmp / "a1.psbt"))["founders_signed"] == ["founder-a"]
    imported = shop.ok("withdraw", "import", str(wid), str(shop.tmp / "a3.psbt"))
    assert imported["founders_signed"] == ["founder-a"] and imported["status"] == "approved"
    final = shop.cli("withdraw", "finalize", str(wid))
    assert final.exit_code == 4 and "2 founders' signatures" in final.stderr


def test_spending_a_reserved_input_is_refused(tmp_path: Path, regtest_node: NodeInfo, funded_wallet: RpcClient) -> None:
    shop = Shop(tmp_path, regtest_node, funded_wallet)
    shop.deposit("acct-1", "0.1", count=1)  # one coin only
    first = shop.requested("0.05")
    to, _ = shop.destination()
    second = shop.request(to, "0.01")
    assert second.exit_code == 2 and "unreserved" in second.stderr
    assert shop.cli("withdraw", "cancel", str(first), "--reason", "test", *shop.as_("alice")).exit_code == 0
    assert shop.request(to, "0.01").exit_code == 0  # released by the cancellation


def test_bad_destinations_and_amounts(shop: Shop) -> None:
    to, _ = shop.destination()
    cases = [
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "0.01", "another network"),
        ("tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx", "0.01", "another network"),
        (to[:-1] + ("q" if to[-1] != "q" else "p"), "0.01", "checksum"),
        ("not-an-address", "0.01", "address"),
        (to, "0.123456789", "8 decimals"),
        (to, "0", "zero"),
        (to, "-1", ""),
        (to, "0.00000100", "dust"),
        (to, "21000000.1", "21,000,000"),
        (to, "1000", "custody holds"),
    ]
    for destination, amount, needle in cases:
        result = shop.request(destination, amount)
        assert result.exit_code == 2, (destination, amount, result.output)
        assert needle.lower() in result.stderr.lower(), (destination, amount, result.stderr)
    assert shop.ok("withdraw", "list") == []


def test_every_entry_point_refuses_while_halted(shop: Shop) -> None:
    wid = shop.approved()
    path = shop.export(wid)
    assert shop.sign(path, "founder-a", shop.tmp / "a.psbt").exit_code == 0
    assert shop.sign(path, "founder-b", shop.tmp / "b.psbt").exit_code == 0
    other = shop.requested("0.02")
    halt = shop.cli("halt", "raise", "--reason", "drill", *shop.as_("dave"), "--json")
    assert halt.exit_code == 0
    to, _ = shop.destination()
    refusals = {
        "address new": shop.cli("address", "new", "--account", "x"),
        "request": shop.request(to, "0.01"),
        "approve": shop.approve(other, "alice"),
        "export": shop.cli("withdraw", "export", str(wid), str(shop.tmp / "y.psbt")),
        "sign": shop.sign(path, "founder-c", shop.tmp / "c.psbt"),
        "import": shop.cli("withdraw", "import", str(wid), str(shop.tmp / "a.psbt")),
        "finalize": shop.cli("withdraw", "finalize", str(wid)),
        "broadcast": shop.cli("withdraw", "broadcast", str(wid)),
    }
    for step, result in refusals.items():
        assert result.exit_code == 3, (step, result.output)
        assert "halted" in result.stderr, step
    halt_id = json.loads(halt.stdout)["halt_id"]
    for who in ("alice", "bob"):
        assert shop.cli("halt", "lift", str(halt_id), *shop.as_(who)).exit_code == 0
    for f in ("a", "b"):
        assert shop.cli("withdraw", "import", str(wid), str(shop.tmp / f"{f}.psbt")).exit_code == 0
    assert shop.ok("withdraw", "finalize", str(wid))["txid"]
    assert shop.ok("withdraw", "broadcast", str(wid))["status"] == "broadcast"


def test_store_tampering_after_approval_is_refused(shop: Shop) -> None:
    import sqlite3

    wid = shop.approved()
    db = sqlite3.connect(shop.c.home / "custody.db")
    db.execute("UPDATE withdrawal SET amount = amount + 1 WHERE id = ?", (wid,))
    db.commit()
    export = shop.cli("withdraw", "export", str(wid), str(shop.tmp / "t.psbt"))
    assert export.exit_code == 9 and "disagree" in export.stderr
    db.execute("UPDATE withdrawal SET amount = amount - 1 WHERE id = ?", (wid,))
    row = db.execute("SELECT unsigned_tx FROM withdrawal WHERE id = ?", (wid,)).fetchone()[0]
    tx = CMutableTransaction.deserialize(bytes.fromhex(row))
    tx.nLockTime = 1  # the approved transaction, quietly changed
    db.execute("UPDATE withdrawal SET unsigned_tx = ? WHERE id = ?", (tx.serialize().hex(), wid))
    db.commit()
    db.close()
    export = shop.cli("withdraw", "export", str(wid), str(shop.tmp / "t.psbt"))
    assert export.exit_code == 4 and "signature does not cover this exact transaction" in export.stderr


def test_an_employee_key_swapped_in_the_store_is_caught(shop: Shop) -> None:
    """The roster row edited by SQL (alice's key replaced by one the attacker holds): the founders'
    signatures no longer cover it, so the store's roster does not stand for anyone."""
    import sqlite3

    wid = shop.approved()
    import coincurve

    mallory = coincurve.PrivateKey()  # a key the attacker holds
    db = sqlite3.connect(shop.c.home / "custody.db")
    serial, document = db.execute("SELECT serial, document FROM roster ORDER BY serial DESC LIMIT 1").fetchone()
    doc = json.loads(document)
    for e in doc["roster"]["employees"]:
        if e["name"] == "alice":
            e["keys"] = [mallory.public_key.format().hex()]
    db.execute("UPDATE roster SET document = ? WHERE serial = ?", (json.dumps(doc), serial))
    db.commit()
    db.close()
    export = shop.cli("withdraw", "export", str(wid), str(shop.tmp / "x.psbt"))
    assert export.exit_code == 3 and "does not stand" in export.stderr
    approve = shop.approve(wid, "dave")  # the roster is not trusted for anyone now
    assert approve.exit_code == 3 and "does not stand" in approve.stderr
    verify = shop.cli("audit", "log", "--verify", "--json")
    assert verify.exit_code == 3 and "does not stand" in verify.stdout


def test_importing_a_corrupted_signature_is_refused(shop: Shop) -> None:
    wid = shop.approved()
    path = shop.export(wid)
    signed = shop.tmp / "a.psbt"
    assert shop.sign(path, "founder-a", signed).exit_code == 0

    def corrupt(p: psbt_lib.Psbt) -> None:
        pub, sig = next(iter(p.inputs[0].partial_sigs.items()))
        p.inputs[0].partial_sigs[pub] = sig[:10] + bytes([sig[10] ^ 1]) + sig[11:]

    _rewrite(signed, corrupt)
    result = shop.cli("withdraw", "import", str(wid), str(signed))
    assert result.exit_code == 2 and "not a valid founder signature" in result.stderr
    shown = shop.ok("withdraw", "show", str(wid))
    assert shown["status"] == "approved"
    assert shop.cli("withdraw", "finalize", str(wid)).exit_code == 4  # nothing was merged


def test_offline_signer_needs_no_store_and_honours_a_halt_file(shop: Shop, tmp_path: Path) -> None:
    """On the signing machine there is only the PSBT, the key file and the manifest."""
    from tests.support import run_cli

    wid = shop.approved()
    psbt = shop.export(wid)
    offline = tmp_path / "offline"
    manifest = offline / "founders.json"
    offline.mkdir()
    manifest.write_text((shop.c.home / "founders-manifest.json").read_text())
    env = {
        "CUSTODY_HOME": str(offline),
        "CUSTODY_DB_URL": f"sqlite:///{offline / 'custody.db'}",
        "CUSTODY_MANIFEST": str(manifest),
        "CUSTODY_PASSPHRASE": PASSPHRASE,
    }
    key = str(shop.founder_keys["founder-a"])
    signed = run_cli(env, "sign", str(psbt), "--key", key, "--yes", "--out", str(offline / "a.psbt"), "--json")
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["halt_checked"] == "none (offline machine)"
    assert not (offline / "custody.db").exists()  # nothing created on the offline machine
    (offline / "halt.json").write_text(json.dumps({"halted": True}))
    halted = run_cli(env, "sign", str(psbt), "--key", key, "--yes", "--out", str(offline / "b.psbt"))
    assert halted.returncode == 3 and "halted" in halted.stderr
    (offline / "halt.json").write_text("{not json")  # unreadable: treated as halted
    assert run_cli(env, "sign", str(psbt), "--key", key, "--yes", "--out", str(offline / "c.psbt")).returncode == 3
    assert not (offline / "b.psbt").exists() and not (offline / "c.psbt").exists()
