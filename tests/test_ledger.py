"""The ledger, deposits from the chain and the audits, on a scripted chain (no node).

The regtest node runs the same stories for real in tests/test_ledger_regtest.py; here a
small fake chain makes depth, reorganisations and spends exact and fast.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from custody.books import audit, deposits, ledger
from custody.chain.types import ChainBlock, ChainTx, Snapshot, TxStatus, Utxo
from custody.config import Settings
from custody.control.halt_log import active_halts
from custody.errors import HaltedError, IllegalTransition, InputError
from custody.store.db import Database
from custody.store.models import AuditEntry, LedgerHead, LedgerTxn, WithdrawalRow
from tests.support import Custody, founders


@dataclass
class FakeChain:
    """Confirmed outputs at heights, a mempool, spends and reorganisations, by hand.

    Its blocks are what it holds at each height; a block's hash covers its content and the
    previous hash, so moving a transaction (``unmine``) changes the chain from that height
    up, as a reorganisation does, and the block scanner sees it.
    """

    network_name: str = "regtest"
    tip: int = 200
    heights: dict[str, int | None] = field(default_factory=dict)  # txid -> height (None: mempool)
    outputs: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # outpoint -> (spk, amount)
    spent: dict[str, int] = field(default_factory=dict)  # outpoint -> height of the block spending it
    n: int = 0

    def pay(self, script_pubkey: str, amount: int) -> str:
        """A transaction paying ``amount`` to the script, mined in a new block; its outpoint."""
        self.n += 1
        txid = hashlib.sha256(f"tx{self.n}".encode()).hexdigest()
        self.tip += 1
        self.heights[txid] = self.tip
        self.outputs[f"{txid}:0"] = (bytes.fromhex(script_pubkey), amount)
        return f"{txid}:0"

    def spend(self, outpoint: str) -> None:
        """Spent in the next block (by a withdrawal of ours, or anyone)."""
        self.spent[outpoint] = self.tip + 1

    def mine(self, blocks: int = 1) -> None:
        self.tip += blocks

    def unmine(self, outpoint: str) -> None:
        """A reorganisation: the transaction goes back to the mempool."""
        self.heights[outpoint.split(":")[0]] = None

    def tip_height(self) -> int:
        return self.tip

    def unspent(self, script_pubkeys: Any) -> list[Utxo]:
        wanted = {bytes(s) for s in script_pubkeys}
        out = []
        for outpoint, (spk, amount) in self.outputs.items():
            txid, vout = outpoint.split(":")
            height = self.heights.get(txid)
            if spk in wanted and height is not None and outpoint not in self.spent:
                out.append(Utxo(txid, int(vout), amount, spk, height))
        return out

    def unspent_at(self, script_pubkeys: Any, height: int | None = None) -> Snapshot:
        # This chain keeps no history: it answers at its tip only (the sync asks chunk by chunk at
        # the one height it fixed, which is the tip when nothing was mined meanwhile).
        assert height in (None, self.tip), f"no history at height {height} (tip {self.tip})"
        return Snapshot(self.tip, self.block_hash(self.tip), self.unspent(script_pubkeys))

    def _txs(self, height: int | None) -> list[ChainTx]:
        txs = []
        for txid, at in sorted(self.heights.items()):
            if at == height:
                outs = [(int(o.split(":")[1]), a, spk) for o, (spk, a) in self.outputs.items() if o.startswith(txid)]
                txs.append(ChainTx(txid, (), tuple(outs)))
        spends = tuple((o.split(":")[0], int(o.split(":")[1])) for o, at in self.spent.items() if at == height)
        if spends and height is not None:
            txs.append(ChainTx(hashlib.sha256(f"spend{height}".encode()).hexdigest(), spends, ()))
        return txs

    def block_hash(self, height: int) -> str:
        if not 0 <= height <= self.tip:
            raise InputError(f"height {height} is not on the chain")
        digest = "00" * 32
        for at in range(height + 1):
            digest = hashlib.sha256(f"{at} {digest} {self._txs(at)}".encode()).hexdigest()
        return digest

    def block_at(self, height: int) -> ChainBlock:
        prev = self.block_hash(height - 1) if height else "00" * 32
        return ChainBlock(height, self.block_hash(height), prev, tuple(self._txs(height)))

    def mempool_txids(self) -> list[str]:
        return [t for t, at in self.heights.items() if at is None]

    def mempool_tx(self, txid: str) -> ChainTx | None:
        found = [tx for tx in self._txs(None) if tx.txid == txid]
        return found[0] if found else None

    def tx_status(self, txid: str) -> TxStatus:
        if txid not in self.heights:
            return TxStatus(txid, False, False, 0, None)
        height = self.heights[txid]
        if height is None:
            return TxStatus(txid, True, True, 0, None)
        return TxStatus(txid, True, False, self.tip - height + 1, height)


@dataclass
class Store:
    c: Custody
    db: Database
    settings: Settings
    chain: FakeChain
    addresses: dict[str, list[dict[str, Any]]]

    def pay(self, account: str, sats: int, n: int = 0) -> str:
        return self.chain.pay(self.addresses[account][n]["script_pubkey"], sats)

    def sync(self, confirmations: int = 1) -> list[dict[str, Any]]:
        return deposits.sync_deposits(self.db, self.settings, self.chain, confirmations)  # type: ignore[arg-type]

    def balance(self, account: str) -> int:
        with self.db.transaction() as s:
            return ledger.customer_balance(s, account)

    def sql(self, statement: str) -> None:
        con = sqlite3.connect(self.c.home / "custody.db")
        with con:
            con.execute(statement)
        con.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    c = Custody(tmp_path / "home")
    assert c.init(founders()).exit_code == 0
    addresses = {
        name: c.json("address", "new", "--account", name, "--count", "2") for name in ("alice", "bob", "carol")
    }
    settings = Settings.load(env=c.env)
    db = Database(settings.db_url)
    yield Store(c, db, settings, FakeChain(), addresses)
    db.dispose()


def _withdrawal(wid: int, account: str, amount: int, fee: int, **kw: Any) -> WithdrawalRow:
    """A withdrawal as the ledger sees it (the queue's rows are tested in the regtest suites)."""
    stamp = datetime(2026, 1, 1)
    return WithdrawalRow(
        id=wid,
        account=account,
        requester="carol",
        request_signature="",
        destination="bcrt1q...",
        destination_spk="",
        amount=amount,
        fee=fee,
        fee_rate="2",
        status="requested",
        unsigned_tx="",
        created_at=stamp,
        updated_at=stamp,
        **kw,
    )


def _post(store: Store, fn: Any, *args: Any) -> None:
    with ledger.halting(store.db, store.settings), store.db.transaction() as s:
        fn(s, *args)
        assert ledger.check(s).total == 0  # the per-event check, after the event


def _raw(store: Store) -> dict[str, int]:
    return {a["account"]: a["balance_sat"] for a in ledger.balances(store.db)["accounts"]}


# ---------------------------------------------------------------- postings


def test_every_flow_posts_balanced_entries(store: Store) -> None:
    store.pay("alice", 50_000_000)
    store.pay("bob", 30_000_000)
    store.sync()
    assert _raw(store) == {"asset:onchain": 80_000_000, "customer:alice": 50_000_000, "customer:bob": 30_000_000}

    w1, w2, w3 = (
        _withdrawal(1, "alice", 1_000_000, 500),
        _withdrawal(2, "bob", 2_000_000, 400),
        _withdrawal(3, "alice", 3_000_000, 300),
    )
    for w in (w1, w2, w3):
        _post(store, ledger.withdrawal_requested, w)
    assert store.balance("alice") == 50_000_000 - 1_000_500 - 3_000_300
    assert _raw(store)["held:withdrawal-1"] == 1_000_500

    _post(store, ledger.withdrawal_released, w3, [], "cancelled by alice: test")  # cancel: back to alice
    assert store.balance("alice") == 50_000_000 - 1_000_500 and _raw(store)["held:withdrawal-3"] == 0

    batch = _withdrawal(4, "(batch)", 3_000_000, 600, kind="batch", txid="ab" * 32)
    _post(store, ledger.batch_created, batch, [w1, w2])
    assert _raw(store)["held:withdrawal-4"] == 3_000_900 and _raw(store)["held:withdrawal-1"] == 0
    _post(store, ledger.batch_dissolved, batch, [w1, w2])  # a cancelled batch: the members are held again
    assert _raw(store)["held:withdrawal-4"] == 0 and _raw(store)["held:withdrawal-2"] == 2_000_400
    batch2 = _withdrawal(5, "(batch)", 3_000_000, 600, kind="batch", txid="cd" * 32)
    _post(store, ledger.batch_created, batch2, [w1, w2])
    _post(store, ledger.withdrawal_settled, batch2, [w1, w2])  # confirmed: 900 charged, 600 paid

    totals = ledger.balances(store.db)["totals"]
    assert totals["sum_sat"] == 0
    assert totals["asset_sat"] == 80_000_000 - 3_000_000 - 600
    assert totals["held_sat"] == 0
    assert totals["network_fees_sat"] == 600 and totals["fee_income_sat"] == 900 and totals["fee_savings_sat"] == 300
    assert totals["liabilities_sat"] == 80_000_000 - 3_000_900
    report = audit.audit_ledger(store.db, store.settings)
    assert report["ok"], report["problems"]
    assert report["transactions"] == 2 + 3 + 1 + 3 + 1  # credits, requests, cancel, batch x3, settlement

    # a failed batch (refused by the node) gives each member's amount and fee back to its customer
    w6, w7 = _withdrawal(6, "alice", 1_000, 10), _withdrawal(7, "bob", 2_000, 20)
    for w in (w6, w7):
        _post(store, ledger.withdrawal_requested, w)
    batch3 = _withdrawal(8, "(batch)", 3_000, 25, kind="batch")
    _post(store, ledger.batch_created, batch3, [w6, w7])
    before = store.balance("alice"), store.balance("bob")
    _post(store, ledger.withdrawal_released, batch3, [w6, w7], "refused by the node")
    assert (store.balance("alice"), store.balance("bob")) == (before[0] + 1_010, before[1] + 2_020)
    assert audit.audit_ledger(store.db, store.settings)["ok"]


def test_a_withdrawal_beyond_the_balance_is_refused_with_the_numbers(store: Store) -> None:
    store.pay("alice", 1_000_000)
    store.sync()
    with pytest.raises(InputError) as refused:
        _post(store, ledger.withdrawal_requested, _withdrawal(1, "alice", 999_900, 282))
    message = str(refused.value)
    assert "balance of 0.01000000 BTC (1000000 sat)" in message
    assert "0.00999900 BTC (999900 sat)" in message and "fee of 282 sat" in message
    assert refused.value.exit_code == 2
    assert store.balance("alice") == 1_000_000
    with pytest.raises(InputError, match="'dave' has a balance of 0"):
        _post(store, ledger.withdrawal_requested, _withdrawal(2, "dave", 1_000, 100))


def test_an_unbalanced_posting_is_refused_and_nothing_is_written(store: Store) -> None:
    with pytest.raises(ledger.LedgerImbalance, match="sum to 1 sat"):
        with store.db.transaction() as s:
            ledger.post(s, "test", [(ledger.ASSET, 1001), (ledger.customer("alice"), -1000)], ref="test:1")
    with store.db.transaction() as s:
        assert s.get(LedgerHead, 1).entries == 0  # type: ignore[union-attr]
        assert s.exec(select(LedgerTxn)).first() is None


def test_a_ledger_that_does_not_sum_to_zero_halts_the_next_event(store: Store) -> None:
    store.pay("alice", 5_000)
    store.sync()
    store.sql("UPDATE ledger_head SET total = total + 7")  # the running total, corrupted
    store.pay("bob", 6_000)
    with pytest.raises(HaltedError, match="summed to 7 sat before it") as halted:
        store.sync()
    assert "trading is halted" in str(halted.value)
    with store.db.transaction() as s:
        halts = active_halts(s)
        assert [h.source for h in halts] == ["ledger"] and "deposit.credited" in halts[0].reason
        assert ledger.customer_balance(s, "bob") == 0  # the event rolled back: bob is not credited
    assert store.c("halt", "status").exit_code == 3


def test_the_per_event_check_reads_one_row(store: Store) -> None:
    """The check costs the same at any size: it never touches ledger_entry (benchmarks time it)."""
    statements: list[str] = []
    from sqlalchemy import event

    with store.db.transaction(read_only=True):
        pass  # the store's schema check (its catalog query names every paged table) before we listen
    event.listen(store.db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with store.db.transaction() as s:
        ledger.check(s)
    assert statements and not any("ledger_entry" in q for q in statements)


# ---------------------------------------------------------------- deposits from the chain


def test_deposits_are_credited_only_at_the_confirmation_depth(store: Store) -> None:
    outpoint = store.pay("alice", 40_000)
    seen = store.sync(confirmations=3)
    assert [(d["outpoint"], d["status"], d["change"]) for d in seen] == [(outpoint, "pending", "seen")]
    assert store.balance("alice") == 0
    store.chain.mine(1)
    assert store.sync(confirmations=3) == [] and store.balance("alice") == 0
    store.chain.mine(1)
    credited = store.sync(confirmations=3)
    assert [(d["status"], d["confirmations"]) for d in credited] == [("credited", 3)]
    assert store.balance("alice") == 40_000
    store.chain.mine(5)
    assert store.sync(confirmations=3) == [] and store.balance("alice") == 40_000  # never twice


def test_deposit_confirmations_from_the_environment(tmp_path: Path) -> None:
    def confirmations(env: dict[str, str]) -> int:
        return deposits.deposit_confirmations(Settings.load(home=str(tmp_path), env=env))

    assert confirmations({}) == 1
    assert confirmations({"CUSTODY_DEPOSIT_CONFIRMATIONS": "6"}) == 6
    for bad in ("0", "-1", "x", "1000"):
        with pytest.raises(InputError, match="CUSTODY_DEPOSIT_CONFIRMATIONS"):
            confirmations({"CUSTODY_DEPOSIT_CONFIRMATIONS": bad})


def test_a_spent_deposit_is_neither_reversed_nor_credited_twice(store: Store) -> None:
    outpoint = store.pay("alice", 70_000)
    store.sync()
    store.chain.spend(outpoint)  # by a withdrawal of ours, or anyone: its tx stays confirmed
    store.chain.mine(2)
    assert store.sync() == [] and store.sync() == []
    assert store.balance("alice") == 70_000
    assert deposits.list_deposits(store.db)[0]["spent"] is True


def test_a_reorg_reverses_a_credit_visibly_and_credits_it_again_when_it_returns(store: Store) -> None:
    outpoint = store.pay("alice", 90_000)
    store.sync()
    store.chain.unmine(outpoint)
    reversed_ = store.sync()
    assert [(d["status"], d["change"]) for d in reversed_] == [("reversed", "reversed")]
    assert store.balance("alice") == 0
    with store.db.transaction() as s:
        events = [e.event for e in s.exec(select(AuditEntry)).all()]
        assert "deposit.reversed" in events
        assert not active_halts(s)  # the balance did not go negative
    entries = list(ledger.iter_entries(store.db, "alice"))
    assert [(e["event"], e["debit_sat"], e["credit_sat"]) for e in entries] == [
        ("deposit.credited", 0, 90_000),
        ("deposit.reversed", 90_000, 0),
    ]
    store.chain.heights[outpoint.split(":")[0]] = store.chain.tip + 1  # mined again
    store.chain.mine(1)
    again = store.sync()
    assert [(d["status"], d["change"]) for d in again] == [("credited", "credited")]
    assert store.balance("alice") == 90_000
    assert audit.audit_ledger(store.db, store.settings)["ok"]


def test_a_credit_after_a_reversal_says_again_in_the_audit_log(store: Store) -> None:
    outpoint = store.pay("alice", 90_000)
    store.sync()
    store.chain.unmine(outpoint)
    store.sync()
    store.chain.heights[outpoint.split(":")[0]] = store.chain.tip + 1  # mined again
    store.chain.mine(1)
    store.sync()
    with store.db.transaction() as s:
        credits = [e for e in s.exec(select(AuditEntry)).all() if e.event == "deposit.credited"]
        assert [json.loads(e.payload)["again"] for e in credits] == [False, True]


def test_a_deposit_whose_state_was_edited_by_sql_stops_the_sync(store: Store) -> None:
    """An insider writes a state the deposit machine does not know: sync refuses it, naming it,
    and credits nothing."""
    outpoint = store.pay("alice", 50_000)
    assert store.sync(confirmations=2)[0]["status"] == "pending"
    store.sql(f"UPDATE deposit SET status = 'creditable' WHERE outpoint = '{outpoint}'")
    store.chain.mine(1)
    with pytest.raises(IllegalTransition, match="a deposit cannot be 'creditable'"):
        store.sync(confirmations=2)
    assert store.balance("alice") == 0


def test_a_reversal_that_takes_a_customer_negative_is_posted_and_halts(store: Store) -> None:
    outpoint = store.pay("alice", 90_000)
    store.sync()
    _post(store, ledger.withdrawal_requested, _withdrawal(1, "alice", 80_000, 500))
    store.chain.unmine(outpoint)
    changed = store.sync()
    assert changed[0]["status"] == "reversed" and changed[0]["halt_id"]
    assert store.balance("alice") == 90_000 - 80_500 - 90_000  # negative, and shown
    with store.db.transaction() as s:
        (h,) = active_halts(s)
        assert h.source == "ledger" and "'alice'" in h.reason and "negative" in h.reason
    report = audit.audit_ledger(store.db, store.settings)
    assert report["ok"] and report["warnings"] == ["account 'alice' is negative: -80500 sat"]


# ---------------------------------------------------------------- the full audit


def test_a_hand_corrupted_entry_is_caught_by_the_audit_and_halts(store: Store) -> None:
    store.pay("alice", 10_000)
    store.pay("bob", 20_000)
    store.sync()
    ok = store.c("audit", "ledger", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["ok"] is True and store.c("halt", "status").exit_code == 0

    store.sql("UPDATE ledger_entry SET amount = amount + 1 WHERE id = (SELECT MIN(id) FROM ledger_entry)")
    bad = store.c("audit", "ledger", "--json")
    assert bad.exit_code == 3, bad.output
    report = json.loads(bad.stdout)
    problems = "\n".join(report["problems"])
    assert "entries sum to 1 sat, not zero" in problems
    assert "ledger transaction #1 (deposit.credited" in problems
    assert "account asset:onchain: its cached balance is 30000 sat, its entries sum to 30001 sat" in problems
    assert "running total is 0 sat; the entries sum to 1 sat" in problems
    assert report["halt_id"] and "trading is halted" in bad.stderr
    status = store.c("halt", "status", "--json")
    assert status.exit_code == 3 and json.loads(status.stdout)["halts"][0]["source"] == "ledger"


def test_an_edited_cached_balance_and_head_are_caught(store: Store) -> None:
    store.pay("alice", 10_000)
    store.sync()
    store.sql("UPDATE ledger_account SET balance = balance - 5 WHERE key = 'customer:alice'")
    store.sql("UPDATE ledger_head SET entries = entries + 1")
    report = audit.audit_ledger(store.db, store.settings, halt_on_failure=False)
    assert not report["ok"] and report["halt_id"] is None
    assert any("customer:alice: its cached balance is -10005 sat" in p for p in report["problems"])
    assert any("counts 3 entries; there are 2" in p for p in report["problems"])


# ---------------------------------------------------------------- CLI


def test_ledger_commands(store: Store) -> None:
    store.pay("alice", 12_345)
    store.sync()
    assert store.c.json("ledger", "balance", "alice")["balance_sat"] == 12_345
    assert store.c.json("ledger", "balance", "asset:onchain")["balance_sat"] == 12_345
    assert store.c.json("ledger", "balance", "bob")["balance_sat"] == 0  # issued addresses, nothing yet
    assert store.c("ledger", "balance", "nobody").exit_code == 5
    everything = store.c.json("ledger", "balance")
    assert everything["totals"]["sum_sat"] == 0 and everything["head"]["entries"] == 2
    rows = store.c("ledger", "entries", "--csv").stdout.splitlines()
    assert rows[0] == ",".join(ledger.ENTRY_COLUMNS) and len(rows) == 3
    assert [e["account"] for e in store.c.json("ledger", "entries", "--account", "alice")] == ["customer:alice"]
    assert store.c.json("ledger", "deposits")[0]["status"] == "credited"
    assert "custody ledger balance" in store.c("ledger", "balance", "--help").stdout
