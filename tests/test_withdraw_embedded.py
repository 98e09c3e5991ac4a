"""The withdrawal story on the embedded chain (CUSTODY_CHAIN=embedded): no node anywhere.

Also: the pre-broadcast consensus check in ``withdraw broadcast`` refuses a withdrawal whose
stored final transaction carries a non-standard (high-S) signature, before any chain sees it,
and keeps it signed and held: the founders' valid signatures exist elsewhere.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bitcoin.core import CScriptWitness, CTransaction, CTxInWitness, CTxWitness, b2x, x

from custody.bitcoin.bech32 import encode_segwit
from custody.chain.embedded import EmbeddedBackend, open_chain
from custody.chain.kernel import COINBASE_MATURITY
from tests.chain_support import fresh_script, high_s
from tests.support import Custody
from tests.withdraw_support import enrol, key_ceremony

OP_TRUE = b"\x51"


class EmbeddedShop:
    """Founders' key files, employees, a policy and deposits, on the embedded chain."""

    def __init__(self, tmp: Path, script: str, db_url: str | None = None) -> None:
        self.tmp = tmp
        self.c = Custody(tmp / "home", db_url=db_url)
        self.c.env["CUSTODY_CHAIN"] = "embedded"
        self.chain: EmbeddedBackend = open_chain(tmp / "home" / "chain")  # the one the CLI opens too
        self.founder_keys = key_ceremony(self.c, tmp, script)
        self.employees = enrol(self.c, tmp, self.founder_keys, ["alice", "bob", "carol"])

    def ok(self, *args: str) -> Any:
        result = self.c(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def deposit(self, account: str, coins: int = 1) -> None:
        """A coinbase to each of ``coins`` fresh deposit addresses, blocks until they are mature, and
        a sync that credits them to ``account`` (withdrawals need a balance; each reserves a coin)."""
        for issued in self.ok("address", "new", "--account", account, "--count", str(coins)):
            self.chain.mine(1, bytes.fromhex(issued["script_pubkey"]))
        self.chain.mine(COINBASE_MATURITY, OP_TRUE)
        self.ok("sync")

    def as_(self, who: str) -> list[str]:
        return ["--as", who, "--key", str(self.employees[who])]

    def signed(self, to: str, amount: str) -> int:
        """A withdrawal requested, approved, signed by two founders and finalized; its id."""
        w = self.ok("withdraw", "request", "--account", "acct-1", "--to", to, "--amount", amount, *self.as_("carol"))
        return self.approved_and_signed(int(w["id"]))

    def approved_and_signed(self, wid: int) -> int:
        """Withdrawal ``wid`` approved by alice and bob, signed by two founders and finalized; its id."""
        self.ok("withdraw", "approve", str(wid), *self.as_("alice"), "--yes")
        self.ok("withdraw", "approve", str(wid), *self.as_("bob"), "--yes")
        psbt = self.tmp / f"w{wid}.psbt"
        assert self.c("withdraw", "export", str(wid), str(psbt)).exit_code == 0
        for founder in ("founder-a", "founder-b"):
            out = self.tmp / f"w{wid}-{founder}.psbt"
            signed = self.c(
                "sign", str(psbt), "--key", str(self.founder_keys[founder]), "--out", str(out), "--yes", "--json"
            )
            assert signed.exit_code == 0, signed.output
            self.ok("withdraw", "import", str(wid), str(out))
        self.ok("withdraw", "finalize", str(wid))
        return wid


@pytest.fixture(params=["p2wsh", "p2sh-p2wsh", "p2sh"])
def shop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddedShop]:
    s = EmbeddedShop(tmp_path, request.param)
    yield s
    s.chain.close()


def destination() -> tuple[str, bytes]:
    spk = fresh_script()
    return encode_segwit("bcrt", 0, spk[2:]), spk


def test_the_whole_story_without_a_node(shop: EmbeddedShop) -> None:
    shop.deposit("acct-1")
    to, spk = destination()
    wid = shop.signed(to, "0.015")
    sent = shop.ok("withdraw", "broadcast", str(wid))
    assert sent["status"] == "broadcast" and shop.chain.mempool() == [sent["txid"]]
    assert shop.ok("withdraw", "broadcast", str(wid))["txid"] == sent["txid"]  # idempotent
    shop.chain.mine(1, OP_TRUE)
    synced = shop.ok("sync")
    assert [s["id"] for s in synced] == [wid] and synced[0]["status"] == "confirmed"
    assert [u.amount for u in shop.chain.unspent([spk])] == [1_500_000]
    shop.chain.audit()


@pytest.mark.parametrize("shop", ["p2wsh"], indirect=True)
def test_broadcast_refuses_a_non_standard_signature_before_the_chain(shop: EmbeddedShop) -> None:
    shop.deposit("acct-1")
    to, _ = destination()
    wid = shop.signed(to, "0.015")
    db = sqlite3.connect(shop.c.home / "custody.db")
    (final,) = db.execute("SELECT final_tx FROM withdrawal WHERE id = ?", (wid,)).fetchone()
    tx = CTransaction.deserialize(x(final))
    stack = tuple(bytes(i) for i in tx.wit.vtxinwit[0].scriptWitness.stack)
    witness = CTxWitness([CTxInWitness(CScriptWitness(list(high_s(stack))))])
    tampered = CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion, witness)  # same txid, other witness
    assert tampered.GetTxid() == tx.GetTxid()
    with db:
        db.execute("UPDATE withdrawal SET final_tx = ? WHERE id = ?", (b2x(tampered.serialize()), wid))
    result = shop.c("withdraw", "broadcast", str(wid), "--json")
    assert result.exit_code == 8, result.output
    assert "pre-broadcast consensus check" in result.output and "high-S" in result.output
    assert shop.chain.mempool() == []
    shown = shop.ok("withdraw", "show", str(wid))
    assert shown["status"] == "signed" and shown["reason"].startswith("refused by the node (non-standard)")
    reserved = db.execute("SELECT COUNT(*) FROM reserved_input WHERE withdrawal_id = ?", (wid,)).fetchone()[0]
    assert reserved == len(shown["inputs"])
    assert shop.ok("ledger", "balance", f"held:withdrawal-{wid}")["balance_sat"] == 1_500_000 + shown["fee_sat"]
    refused = [e for e in shop.ok("audit", "log") if e["event"] == "withdrawal.refused"]
    assert [e["payload"]["refusal"] for e in refused] == ["non-standard"]
