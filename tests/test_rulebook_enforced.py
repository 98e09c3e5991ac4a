"""The rulebook enforced twice: by the online store (request, approve, export, batch) and again,
independently, by the offline signer, each rule at its boundary, attacked as an insider with the
online machine would: withholding or deleting rulebooks, wiping the withdrawal history by SQL,
lying about the height in the locktime, racing two signings, breaking the signer's journal.

On the embedded chain. The offline signer runs as a real subprocess in its own home (the
pinned manifest, signer-state.json and signer-journal.jsonl, nothing else). Each test works on
its own copy of one funded store (four employees, coins of 50 BTC to acct-1 and acct-2).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlmodel import col, select

from custody.bitcoin import psbt as psbt_lib
from custody.bitcoin.bech32 import encode_segwit
from custody.chain.embedded import open_chain
from custody.chain.kernel import COINBASE_MATURITY
from custody.identity.approvals import sign_approval, sign_request, summarize
from custody.identity.keyfile import open_employee_key
from custody.notify.catalog import notification_for
from custody.store.db import Database
from custody.store.models import AuditEntry
from custody.withdraw.signer import PROP_APPROVALS, PROP_META
from tests.chain_support import fresh_script
from tests.support import PASSPHRASE, Custody, read_psbt, run_cli
from tests.test_root_of_trust import Offline, _get, _put, _refused

__all__ = ["Offline", "Shop"]
from tests.test_withdraw_embedded import EmbeddedShop
from tests.withdraw_support import enrol

PROP_RULEBOOKS = 5
BTC = 100_000_000
OP_TRUE = b"\x51"


def _to() -> str:
    return encode_segwit("bcrt", 0, fresh_script()[2:])


class Shop(EmbeddedShop):
    """An EmbeddedShop with a fourth employee, funded, that can be copied for each test."""

    @classmethod
    def funded(cls, tmp: Path) -> Shop:
        s = cls(tmp, "p2wsh")
        s.employees.update(enrol(s.c, tmp, s.founder_keys, ["dave"]))
        for account, count in (("acct-1", 10), ("acct-2", 3)):
            for issued in s.ok("address", "new", "--account", account, "--count", str(count)):
                s.chain.mine(1, bytes.fromhex(issued["script_pubkey"]))
        s.chain.mine(COINBASE_MATURITY, OP_TRUE)
        s.ok("sync")
        return s

    def clone(self, dest: Path) -> Shop:
        """A copy of the whole world (store, chain, keys) at ``dest``."""
        self.chain.close()
        shutil.copytree(self.tmp, dest)
        self.chain = open_chain(self.tmp / "home" / "chain")
        other = Shop.__new__(Shop)
        other.tmp = dest
        other.c = Custody(dest / "home")
        other.c.env["CUSTODY_CHAIN"] = "embedded"
        other.chain = open_chain(dest / "home" / "chain")
        other.founder_keys = {k: dest / v.relative_to(self.tmp) for k, v in self.founder_keys.items()}
        other.employees = {k: dest / v.relative_to(self.tmp) for k, v in self.employees.items()}
        return other

    # ------------------------------------------------------------ the queue

    def request(
        self, amount: str, to: str | None = None, *, account: str = "acct-1", fee_rate: str | None = None
    ) -> Result:
        args = ["withdraw", "request", "--account", account, "--to", to or _to(), "--amount", amount]
        if fee_rate is not None:
            args += ["--fee-rate", fee_rate]
        return self.c(*args, *self.as_("carol"), "--json")

    def requested(self, amount: str, to: str | None = None, **kw: Any) -> int:
        result = self.request(amount, to, **kw)
        assert result.exit_code == 0, result.output
        return int(json.loads(result.stdout)["id"])

    def approve(self, wid: int, *who: str) -> Any:
        for w in who:
            result = self.c("withdraw", "approve", str(wid), *self.as_(w), "--yes", "--json")
            assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def approved(self, amount: str, to: str | None = None, **kw: Any) -> int:
        wid = self.requested(amount, to, **kw)
        self.approve(wid, "alice", "bob")
        return wid

    def export(self, wid: int) -> Path:
        path = self.tmp / f"w{wid}.psbt"
        path.unlink(missing_ok=True)
        result = self.c("withdraw", "export", str(wid), str(path))
        assert result.exit_code == 0, result.output
        return path

    def count(self, table: str) -> int:
        with sqlite3.connect(self.c.home / "custody.db") as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def sql(self, *statements: str) -> None:
        db = sqlite3.connect(self.c.home / "custody.db")
        with db:
            for statement in statements:
                db.execute(statement)
        db.close()

    def tip(self) -> int:
        return self.chain.tip_height()

    def mine_to(self, height: int) -> None:
        if height > self.tip():
            self.chain.mine(height - self.tip(), OP_TRUE)

    # ------------------------------------------------------------ rulebooks

    def propose(self, changes: dict[str, Any], *extra: str) -> Result:
        path = self.tmp / "rules-changes.json"
        path.write_text(json.dumps(changes))
        return self.c("rules", "propose", str(path), *extra, "--json")

    def signed_proposal(self, changes: dict[str, Any], *extra: str, edit: Any = None) -> Path:
        """Propose, export and have founders a and b sign it (offline, with their key files)."""
        proposed = self.propose(changes, *extra)
        assert proposed.exit_code == 0, proposed.output
        path = self.tmp / f"rulebook-{json.loads(proposed.stdout)['digest'][:12]}.json"
        path.unlink(missing_ok=True)
        assert self.c("rules", "export", "--out", str(path)).exit_code == 0
        if edit is not None:
            doc = json.loads(path.read_text())
            edit(doc["rulebook"])
            path.write_text(json.dumps(doc))
        for founder in ("founder-a", "founder-b"):
            signed = self.c("rules", "sign", str(path), "--key", str(self.founder_keys[founder]), "--yes")
            assert signed.exit_code == 0, signed.output
        return path

    def rules(self, changes: dict[str, Any], *extra: str) -> dict[str, Any]:
        """A rulebook proposed, signed by two founders and applied."""
        applied = self.c("rules", "apply", str(self.signed_proposal(changes, *extra)), "--json")
        assert applied.exit_code == 0, applied.output
        return dict(json.loads(applied.stdout))

    def withheld(self, changes: dict[str, Any]) -> dict[str, Any]:
        """A rulebook the founders signed that never reached the store: its document, the open
        proposal dropped again."""
        doc = json.loads(self.signed_proposal(changes).read_text())
        assert self.c("rules", "discard").exit_code == 0
        doc.pop("previous_rulebook")
        return dict(doc)

    def chain_docs(self, path: Path) -> list[Any]:
        p = psbt_lib.Psbt.parse(read_psbt(path))
        return list(_get(p, PROP_RULEBOOKS))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    s = Shop.funded(tmp_path_factory.mktemp("rules-template"))
    yield s
    s.chain.close()


@pytest.fixture
def shop(template: Shop, tmp_path: Path) -> Iterator[Shop]:
    s = template.clone(tmp_path / "world")
    yield s
    s.chain.close()


def _refused_online(result: Result, *needles: str) -> None:
    assert result.exit_code == 4, result.output
    for n in needles:
        assert n in result.stderr, (n, result.stderr)


_EDITS = iter(range(1, 10**6))


def _edit(path: Path, change: Any) -> Path:
    """A copy of the PSBT in ``path`` changed by ``change`` (each copy under its own name)."""
    p = psbt_lib.Psbt.parse(read_psbt(path))
    change(p)
    out = path.with_name(f"{path.stem}-edit{next(_EDITS)}.psbt")
    out.write_text(p.to_base64() + "\n")
    return out


def _with_chain(path: Path, docs: list[Any]) -> Path:
    return _edit(path, lambda p: _put(p, PROP_RULEBOOKS, docs))


def _resign(shop: Shop, p: psbt_lib.Psbt, approvers: tuple[str, ...] = ("alice", "bob")) -> None:
    """After an edit of the transaction: the requester's and approvers' signatures made again
    with their own keys (what employees fooled into signing, or colluding, would give)."""
    meta = _get(p, PROP_META)
    summary = summarize("regtest", meta["withdrawal_id"], p.tx, [i.witness_utxo.amount for i in p.inputs])
    key = open_employee_key(shop.employees[meta["requester"]], PASSPHRASE).private_key
    meta["request_signature"] = sign_request(key, summary, meta["account"])
    _put(p, PROP_META, meta)
    bundle = []
    for who in approvers:
        k = open_employee_key(shop.employees[who], PASSPHRASE).private_key
        bundle.append({"employee": who, "pubkey": k.public_key.format().hex(), "signature": sign_approval(k, summary)})
    _put(p, PROP_APPROVALS, bundle)


def _at_height(shop: Shop, path: Path, height: int, approvers: tuple[str, ...] = ("alice", "bob")) -> Path:
    """The same withdrawal with another locktime, signed again by its employees."""

    def relock(p: psbt_lib.Psbt) -> None:
        p.tx.nLockTime = height
        _resign(shop, p, approvers)

    return _edit(path, relock)


def _signed(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return dict(json.loads(result.stdout))


# ---------------------------------------------------------------- approval tiers


def test_a_tier_that_needs_a_third_approver(shop: Shop) -> None:
    shop.rules(
        {
            "tiers": [
                {"name": "standard", "up_to_sat": BTC, "approvals": 2},
                {"name": "large", "up_to_sat": None, "approvals": 3},
            ]
        }
    )
    edge = shop.approved("1")  # exactly 1 BTC: the standard tier
    assert shop.ok("rules", "check", str(edge))["withdrawals"][0]["tier"] == "standard"
    shop.export(edge)
    big = shop.requested("1.00000001")
    assert shop.approve(big, "alice", "bob")["status"] == "requested"
    check = shop.ok("rules", "check", str(big))
    assert check["withdrawals"][0] | {"why": None} == {
        "withdrawal_id": big,
        "tier": "large",
        "why": None,
        "approvals_needed": 3,
        "approved_by": ["alice", "bob"],
        "still_needed": 1,
    }
    refused = shop.c("withdraw", "export", str(big), str(shop.tmp / "big.psbt"))
    _refused_online(refused, "2 of 3 valid approvals (tier large)")
    assert shop.approve(big, "dave")["status"] == "approved"
    path = shop.export(big)
    # Offline: the three approvals sign; the PSBT with one of them removed does not.
    offline = Offline(shop, shop.tmp / "offline")
    two = _edit(
        path, lambda p: _put(p, PROP_APPROVALS, [a for a in _get(p, PROP_APPROVALS) if a["employee"] != "dave"])
    )
    _refused(offline.sign(two), 4, "2 of 3 valid approvals (tier large)")
    review = _signed(offline.sign(path))
    assert review["rulebook_serial"] == 1 and review["tiers"][str(big)]["approvals"] == 3
    # Without the rulebook (the insider strips it), a signer that has seen it refuses.
    bare = _with_chain(two, [])
    _refused(offline.sign(bare), 4, "no founders-signed rulebook", "never rolled back")


def test_rulebook_rows_deleted_by_sql_are_caught(shop: Shop) -> None:
    """Deleting the rulebook would bring back the built-in two approvals online: the audit log
    recorded it as applied, so the store does not stand (exit 3) until it is back."""
    shop.rules(
        {
            "tiers": [
                {"name": "standard", "up_to_sat": BTC, "approvals": 2},
                {"name": "large", "up_to_sat": None, "approvals": 3},
            ]
        }
    )
    big = shop.requested("2")
    shop.sql("DELETE FROM rulebook")
    approve = shop.c("withdraw", "approve", str(big), *shop.as_("alice"), "--yes")
    assert approve.exit_code == 3 and "rulebook #1 differs or is missing" in approve.stderr
    assert shop.c("rules", "check", str(big)).exit_code == 3


# ---------------------------------------------------------------- the per-withdrawal maximum


def test_a_per_withdrawal_maximum(shop: Shop) -> None:
    shop.rules({"max_withdrawal_sat": 2 * BTC})
    before = shop.count("withdrawal")
    _refused_online(shop.request("2.00000001"), "rule max_withdrawal", "above the maximum of 200000000 sat")
    assert shop.count("withdrawal") == before  # nothing stored, no change address used
    path = shop.export(shop.approved("2"))
    # The founders lower the maximum; the insider keeps the store from applying it. The signer
    # that is given the newer rulebook (here in this PSBT) refuses what the store let through.
    lower = shop.withheld({"max_withdrawal_sat": BTC})
    offline = Offline(shop, shop.tmp / "offline")
    newer = _with_chain(path, [*shop.chain_docs(path), lower])
    _refused(offline.sign(newer), 4, "refused by rulebook #2", "rule max_withdrawal")
    # ... and from then on refuses the PSBT without it: a rulebook is never rolled back.
    _refused(offline.sign(path), 4, "older than rulebook #2")
    assert _signed(Offline(shop, shop.tmp / "other").sign(path))["rulebook_serial"] == 1


# ---------------------------------------------------------------- velocity


VELOCITY = {"velocity": [{"name": "daily", "scope": "global", "window_blocks": 10, "max_sat": 25 * BTC // 10}]}


def test_velocity_exceeded_across_several_withdrawals(shop: Shop) -> None:
    shop.rules(VELOCITY)
    for amount in ("1", "1", "0.5"):  # 2.5 BTC: exactly the limit
        shop.requested(amount)
    height = shop.tip()
    _refused_online(shop.request("0.001"), "rule velocity:daily", "250100000 sat (250000000 sat before this)")
    other = shop.request("0.001", account="acct-2")
    _refused_online(other, "rule velocity:daily")  # global: every account together
    shop.mine_to(height + 9)
    _refused_online(shop.request("0.001"), "rule velocity:daily")  # still in the window (h-10, h]
    shop.mine_to(height + 10)
    shop.requested("0.001")
    # A cancelled withdrawal no longer counts (it never carried founders' signatures).
    wid = shop.requested("2.4")
    _refused_online(shop.request("0.2"), "rule velocity:daily")
    assert shop.c("withdraw", "cancel", str(wid), "--reason", "typo", *shop.as_("alice")).exit_code == 0
    shop.requested("0.2")


def test_velocity_again_at_the_signer_after_the_online_history_is_wiped(shop: Shop) -> None:
    shop.rules(VELOCITY)
    offline = Offline(shop, shop.tmp / "offline-a")
    for _ in range(2):
        _signed(offline.sign(shop.export(shop.approved("1"))))
    # The insider wipes the store's history of withdrawals by SQL: online, nothing counts any more.
    shop.sql(
        "DELETE FROM approval", "DELETE FROM withdrawal_input", "DELETE FROM reserved_input", "DELETE FROM withdrawal"
    )
    path = shop.export(shop.approved("1"))
    _refused(offline.sign(path), 4, "rule velocity:daily", "300000000 sat (200000000 sat before this)")
    journal = (offline.home / "signer-journal.jsonl").read_text().splitlines()
    assert len(journal) == 2  # the refusal added nothing
    # Another signer machine keeps its own journal: it has signed nothing, so it signs. The
    # guarantee is per machine (docs/THREAT_MODEL.md).
    _signed(Offline(shop, shop.tmp / "offline-b", founder="founder-b").sign(path))


# ---------------------------------------------------------------- trusted destinations


def test_a_new_destination_inside_its_cooling_off_is_refused_and_accepted_after(shop: Shop) -> None:
    trusted, stranger = _to(), _to()
    applied = shop.rules(
        {
            "destinations": {"allowlist": [{"address": trusted, "label": "acct-1's cold wallet"}], "outside": "refuse"},
            "cooling_off_blocks": 5,
        }
    )
    usable = applied["effective_height"] + 5
    assert "destination 0014" in applied["loosens"][0]  # an added destination is a loosening
    _refused_online(shop.request("0.1", stranger), "rule destinations.outside")
    _refused_online(shop.request("0.1", trusted), "rule destinations.cooling_off", f"usable only from height {usable}")
    shop.mine_to(usable - 1)
    _refused_online(shop.request("0.1", trusted), "rule destinations.cooling_off")
    shop.mine_to(usable)
    path = shop.export(shop.approved("0.1", trusted))
    # Offline: the same payment claiming one block less (its employees signed it again) is
    # inside the cooling-off; the real one signs.
    offline = Offline(shop, shop.tmp / "offline")
    _refused(offline.sign(_at_height(shop, path, usable - 1)), 4, "rule destinations.cooling_off")
    assert _signed(offline.sign(path))["height"] == usable


# ---------------------------------------------------------------- asymmetric changes


def test_a_loosening_rulebook_waits_for_its_delay_and_a_tightening_one_is_immediate(shop: Shop) -> None:
    first = shop.rules({"max_withdrawal_sat": BTC, "loosening_delay_blocks": 10})
    assert first["loosens"] == [] and first["effective_height"] == 0  # only tightens: at once
    tip = shop.tip()
    early = shop.propose({"max_withdrawal_sat": 3 * BTC}, "--effective-height", str(tip + 9))
    assert early.exit_code == 6 and f"before {tip + 10}" in early.stderr and "higher max_withdrawal_sat" in early.stderr
    # The founders are given a document whose effective height the insider moved earlier, or
    # whose content differs from what was proposed (and told): both refused at apply.
    moved = shop.signed_proposal({"max_withdrawal_sat": 3 * BTC}, edit=lambda b: b.update(effective_height=tip))
    applied = shop.c("rules", "apply", str(moved))
    assert applied.exit_code == 6 and f"before {tip + 10}" in applied.stderr
    swapped = shop.signed_proposal(
        {"max_withdrawal_sat": 3 * BTC}, edit=lambda b: b.update(max_withdrawal_sat=30 * BTC)
    )
    applied = shop.c("rules", "apply", str(swapped))
    assert applied.exit_code == 6 and "never proposed here" in applied.stderr
    second = shop.rules({"max_withdrawal_sat": 3 * BTC})
    effective = second["effective_height"]
    assert effective == tip + 10 and second["loosens"] == ["a higher max_withdrawal_sat"]
    assert [w["serial"] for w in shop.ok("rules", "show")["waiting"]] == [2]
    # A 0.5 BTC withdrawal the insider turns into 2 BTC at locktime `effective`, signed again by
    # its employees: the signers accept it under rulebook #2 (it is "at" that height) ...
    small = shop.export(shop.approved("0.5"))

    def enlarge(p: psbt_lib.Psbt) -> None:
        payment = next(o for o in p.tx.vout if o.nValue == BTC // 2)
        change = next(o for o in p.tx.vout if o.nValue != BTC // 2)
        payment.nValue, change.nValue = 2 * BTC, change.nValue - (2 * BTC - BTC // 2)
        p.tx.nLockTime = effective
        _resign(shop, p)

    enlarged = _edit(small, enlarge)
    signed = [
        psbt_lib.Psbt.parse(read_psbt(Path(_signed(Offline(shop, shop.tmp / f"off-{f}", f).sign(enlarged))["out"])))
        for f in ("founder-a", "founder-b")
    ]
    raw = psbt_lib.extract(psbt_lib.finalize(psbt_lib.combine(signed))).serialize()
    # ... but lying about the height only delays it: no block takes it before that height.
    refused = shop.chain.test_accept(raw)
    assert not refused.allowed and "non-final" in (refused.reason or "")
    # Online, rulebook #1 is still in force: above its maximum is refused until the height.
    _refused_online(shop.request("2"), "refused by rulebook #1", "rule max_withdrawal")
    shop.mine_to(effective - 1)
    _refused_online(shop.request("2"), "refused by rulebook #1")
    shop.mine_to(effective)
    assert shop.chain.test_accept(raw).allowed
    path = shop.export(shop.approved("2"))
    # Offline: the same 2 BTC claiming one block before the height falls under rulebook #1.
    offline = Offline(shop, shop.tmp / "offline")
    _refused(offline.sign(_at_height(shop, path, effective - 1)), 4, "refused by rulebook #1", "rule max_withdrawal")
    assert _signed(offline.sign(path))["rulebook_serial"] == 2
    # Tightening takes effect at once, for what is pending too.
    pending = shop.approved("1.5")
    third = shop.rules({"max_withdrawal_sat": BTC})
    assert third["loosens"] == [] and third["effective_height"] == effective
    _refused_online(shop.request("1.5"), "refused by rulebook #3", "rule max_withdrawal")
    _refused_online(shop.c("withdraw", "export", str(pending), str(shop.tmp / "p.psbt")), "rule max_withdrawal")


def test_a_loosening_proposal_is_told_to_everyone_as_critical(shop: Shop) -> None:
    shop.rules({"max_withdrawal_sat": BTC})
    assert shop.propose({"max_withdrawal_sat": 2 * BTC}).exit_code == 0
    assert shop.propose({"max_withdrawal_sat": BTC // 2}).exit_code == 0
    db = Database(shop.c.env["CUSTODY_DB_URL"])
    with db.transaction() as session:
        entries = session.exec(select(AuditEntry).where(col(AuditEntry.event).like("rulebook.%"))).all()
        told = [notification_for(e) for e in sorted(entries, key=lambda e: e.seq)]
    db.dispose()
    kinds = [(n.kind, n.severity) for n in told if n is not None]
    assert kinds == [
        ("rulebook.proposed", "info"),
        ("rulebook.applied", "info"),
        ("rulebook.proposed", "critical"),
        ("rulebook.proposed", "info"),
    ]
    loose = [n for n in told if n is not None and n.severity == "critical"][0]
    assert "LOOSENS (a higher max_withdrawal_sat)" in loose.title


# ---------------------------------------------------------------- fee caps


def test_a_fee_above_each_cap_is_refused_online(shop: Shop) -> None:
    shop.rules(
        {
            "fees": {
                "max_fee_sat": 1_000_000,
                "max_fee_rate": "10",
                "max_fee_share_bp": 100,
                "max_batch_fee_sat": 1_000_000,
            }
        }
    )
    shop.requested("0.1", fee_rate="10")
    _refused_online(shop.request("0.1", fee_rate="10.001"), "rule fees.max_fee_rate", "above the cap of 10 sat/vB")
    fee = int(json.loads(shop.request("0.1", fee_rate="5").stdout)["fee_sat"])
    shop.rules(
        {"fees": {"max_fee_sat": fee, "max_fee_rate": "10", "max_fee_share_bp": 100, "max_batch_fee_sat": 1_000_000}}
    )
    shop.requested("0.1", fee_rate="5")  # the same shape: the same fee, exactly the cap
    _refused_online(shop.request("0.1", fee_rate="5.01"), "rule fees.max_fee_sat", f"above the cap of {fee} sat")
    # 1% of the amount: the fee at 2 sat/vB is about 360 sat.
    small = json.loads(shop.request("0.001", fee_rate="2").stdout)
    amount = small["fee_sat"] * 100  # the smallest amount whose 1% covers that fee
    shop.requested(f"{amount / BTC:.8f}", fee_rate="2")
    _refused_online(shop.request(f"{(amount - 1) / BTC:.8f}", fee_rate="2"), "rule fees.max_fee_share_bp")


def test_a_fee_above_each_cap_is_refused_by_the_signer(shop: Shop) -> None:
    """The store let each through under its rulebook; the founders' newer one, withheld from the
    store but given to the signer, has lower caps. Each refused with its rule's name."""
    amount = BTC // 1000
    path = shop.export(shop.approved("0.001", fee_rate="4"))
    p = psbt_lib.Psbt.parse(read_psbt(path))
    fee = sum(i.witness_utxo.amount for i in p.inputs) - sum(o.nValue for o in p.tx.vout)
    rate = int(_signed(Offline(shop, shop.tmp / "probe").sign(path))["fee_rate"])
    share = -(-fee * 10_000 // amount)  # the lowest share in basis points that covers the fee
    base = {"max_fee_sat": 1_000_000, "max_fee_rate": "500", "max_fee_share_bp": 1000, "max_batch_fee_sat": 1_000_000}
    for cap, value, rule in (
        ("max_fee_sat", fee - 1, "fees.max_fee_sat"),
        ("max_fee_rate", str(rate - 1), "fees.max_fee_rate"),
        ("max_fee_share_bp", share - 1, "fees.max_fee_share_bp"),
    ):
        lower = shop.withheld({"fees": base | {cap: value}})
        offline = Offline(shop, shop.tmp / f"offline-{cap}")
        _refused(offline.sign(_with_chain(path, [lower])), 4, "refused by rulebook #1", f"rule {rule}")
    # At exactly the caps, it signs.
    exact = shop.withheld({"fees": base | {"max_fee_sat": fee, "max_fee_share_bp": share}})
    _signed(Offline(shop, shop.tmp / "offline-exact").sign(_with_chain(path, [exact])))


def test_the_built_in_rules_cap_the_fee_that_an_environment_variable_would_have_let_through(shop: Shop) -> None:
    """The issue's case: CUSTODY_MAX_FEE set high on the online machine let a fee of 0.19 BTC
    through. The built-in rules (no rulebook signed yet) cap it at 1,000,000 sat and 10% of the
    amount, online and at a signer that has never seen a rulebook."""
    shop.c.env["CUSTODY_MAX_FEE"] = str(50 * BTC)
    shop.c.env["CUSTODY_MAX_FEE_RATE"] = "100000"
    refused = shop.request("0.1", fee_rate="30000")
    _refused_online(refused, "refused by the built-in rules", "rule fees.max_fee_sat", "rule fees.max_fee_share_bp")
    path = shop.export(shop.approved("0.1"))
    offline = Offline(shop, shop.tmp / "offline")
    review = _signed(Offline(shop, shop.tmp / "probe").sign(path))
    assert review["built_in_rules"] is True and review["rulebook_serial"] == 0

    def pay_the_miner(p: psbt_lib.Psbt) -> None:
        change = next(o for o in p.tx.vout if o.nValue != BTC // 10)
        change.nValue -= 19_000_000  # a 0.19 BTC fee on 0.1 BTC
        _resign(shop, p)

    _refused(
        offline.sign(_edit(path, pay_the_miner)),
        4,
        "the built-in rules",
        "rule fees.max_fee_sat",
        "rule fees.max_fee_share_bp",
    )


# ---------------------------------------------------------------- batches


def test_a_batch_whose_members_are_within_limits_but_whose_total_is_not(shop: Shop) -> None:
    members = [shop.approved("1"), shop.approved("1", account="acct-2")]
    # Online: each member's fee is far below max_fee_sat; the batch's transaction is above the
    # batch cap. Nothing is batched.
    shop.rules(
        {"fees": {"max_fee_sat": 1_000_000, "max_fee_rate": "500", "max_fee_share_bp": 1000, "max_batch_fee_sat": 300}}
    )
    refused = shop.c("withdraw", "batch", *shop.as_("alice"), "--json")
    _refused_online(refused, "batch #", "rule fees.max_batch_fee_sat")
    assert all(shop.ok("withdraw", "show", str(m))["batch_id"] is None for m in members)
    shop.rules(
        {
            "fees": {
                "max_fee_sat": 1_000_000,
                "max_fee_rate": "500",
                "max_fee_share_bp": 1000,
                "max_batch_fee_sat": 100_000,
            }
        }
    )
    batch = shop.ok("withdraw", "batch", *shop.as_("alice"))
    path = shop.export(batch["id"])
    # Offline: 1.5 BTC in 10 blocks, withheld from the store: each member's 1 BTC fits, the
    # batch's 2 BTC does not. Without it, the batch signs.
    tighter = shop.withheld(
        {"velocity": [{"name": "daily", "scope": "global", "window_blocks": 10, "max_sat": 3 * BTC // 2}]}
    )
    offline = Offline(shop, shop.tmp / "offline")
    _refused(
        offline.sign(_with_chain(path, [*shop.chain_docs(path), tighter])),
        4,
        "rule velocity:daily",
        "200000000 sat (0 sat before this)",
    )
    batch_cap = shop.withheld(
        {"fees": {"max_fee_sat": 1_000_000, "max_fee_rate": "500", "max_fee_share_bp": 1000, "max_batch_fee_sat": 300}}
    )
    _refused(
        Offline(shop, shop.tmp / "offline-2").sign(_with_chain(path, [*shop.chain_docs(path), batch_cap])),
        4,
        "rule fees.max_batch_fee_sat",
    )
    review = _signed(Offline(shop, shop.tmp / "offline-3").sign(path))
    assert review["withdrawal_kind"] == "batch" and sorted(review["tiers"]) == sorted(str(m) for m in members)

    def twice(p: psbt_lib.Psbt) -> None:  # one member's id on both, so that one tier stands for two
        meta = _get(p, PROP_META)
        meta["members"][1]["withdrawal_id"] = meta["members"][0]["withdrawal_id"]
        _put(p, PROP_META, meta)

    _refused(Offline(shop, shop.tmp / "offline-4").sign(_edit(path, twice)), 2, "lists one withdrawal twice")


# ---------------------------------------------------------------- time


def test_the_signers_height_never_goes_backwards(shop: Shop) -> None:
    offline = Offline(shop, shop.tmp / "offline")
    first = shop.export(shop.approved("0.1"))
    shop.mine_to(shop.tip() + 3)
    second = shop.export(shop.approved("0.1"))
    height = _signed(offline.sign(second))["height"]
    # The older PSBT, at its true (lower) locktime: refused, the signer already signed at `height`.
    _refused(offline.sign(first), 4, "rule locktime", f"below height {height}")
    _refused(offline.sign(_at_height(shop, second, height - 1)), 4, "rule locktime")
    _refused(offline.sign(_at_height(shop, second, 500_000_000)), 4, "rule locktime", "is a time")
    assert _signed(offline.sign(_at_height(shop, second, height)))["height"] == height  # the same height is fine
    journal = [json.loads(x) for x in (offline.home / "signer-journal.jsonl").read_text().splitlines()]
    assert [e["height"] for e in journal] == [height, height]


# ---------------------------------------------------------------- the journal


def test_two_signings_racing_on_one_signer_machine_count_each_other(shop: Shop) -> None:
    """Two PSBTs of 1 BTC, each alone within 1.5 BTC in 10 blocks, signed at the same moment on
    one machine: the journal is re-read under its lock before the append, so one is refused."""
    paths = [shop.export(shop.approved("1")) for _ in range(2)]
    limit = shop.withheld(
        {"velocity": [{"name": "daily", "scope": "global", "window_blocks": 10, "max_sat": 3 * BTC // 2}]}
    )
    paths = [_with_chain(p, [limit]) for p in paths]
    offline = Offline(shop, shop.tmp / "offline")
    env = dict(os.environ, **offline.env)
    env.pop("CUSTODY_CRASH_AT", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "custody_cli",
                "sign",
                str(p),
                "--key",
                str(offline.key),
                "--yes",
                "--out",
                str(p) + ".signed",
                "--json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in paths
    ]
    results = [(proc.wait(timeout=120), proc.stderr.read() if proc.stderr else "") for proc in procs]
    assert sorted(code for code, _ in results) == [0, 4], results
    assert any("rule velocity:daily" in err for code, err in results if code == 4)
    assert len((offline.home / "signer-journal.jsonl").read_text().splitlines()) == 1


def test_a_damaged_or_unwritable_journal_refuses_to_sign(shop: Shop) -> None:
    offline = Offline(shop, shop.tmp / "offline")
    path = shop.export(shop.approved("0.1"))
    _signed(offline.sign(path))
    journal = offline.home / "signer-journal.jsonl"
    good = journal.read_bytes()
    # A last line torn by a crash is skipped, and cut off by the next append.
    journal.write_bytes(good + b'{"format": "custody-signer-jou')
    second = shop.export(shop.approved("0.1"))
    _signed(offline.sign(second))
    lines = journal.read_bytes().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["format"] == "custody-signer-journal" for x in lines)
    # A line edited in the middle (someone lowering an amount to make room): refused, exit 9.
    edited = lines[0].replace(b'"amount":10000000', b'"amount":1')
    assert edited != lines[0]
    journal.write_bytes(b"garbage\n" + b"\n".join(lines) + b"\n")
    third = shop.export(shop.approved("0.1"))
    _refused(offline.sign(third), 9, "journal", "damaged at line 1")
    # A full disk: the process may write no more than the journal holds now (RLIMIT_FSIZE; the
    # append fails with EFBIG). Refused, exit 9, no signed PSBT written.
    journal.write_bytes(b"\n".join(lines) + b"\n")
    size = journal.stat().st_size
    out = offline.home / "full-disk.psbt"
    full = subprocess.run(
        [
            sys.executable,
            "-m",
            "custody_cli",
            "sign",
            str(third),
            "--key",
            str(offline.key),
            "--yes",
            "--out",
            str(out),
        ],
        env=dict(os.environ, **offline.env),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size + 16, size + 16)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    _refused(full, 9, "cannot write the signer's journal")
    assert not out.exists() and journal.stat().st_size == size
    # Where the journal should be there is a directory: refused too.
    journal.unlink()
    journal.mkdir()
    _refused(offline.sign(third), 9, "signer's journal", "is a directory")


def test_a_founder_pins_a_rulebook_on_their_signer_before_any_psbt_carries_it(shop: Shop) -> None:
    """The insider withholds the founders' tighter rulebook from the store; the founders pin it on
    their signers at once, so the store's PSBTs under the older one are refused there."""
    shop.rules({"max_withdrawal_sat": 2 * BTC})
    path = shop.export(shop.approved("1.5"))
    lower = shop.withheld({"max_withdrawal_sat": BTC})
    offline = Offline(shop, shop.tmp / "offline")
    file = shop.tmp / "rulebook-2-signed.json"
    file.write_text(json.dumps(lower))
    one = shop.tmp / "rulebook-2-one-signature.json"
    one.write_text(json.dumps(lower | {"signatures": lower["signatures"][:1]}))
    _refused(run_cli(offline.env, "rules", "pin", str(one)), 4, "a rulebook needs 2")
    assert run_cli(offline.env, "rules", "pin", str(file), "--json").returncode == 0
    _refused(offline.sign(path), 4, "older than rulebook #2")
    _refused(offline.sign(_with_chain(path, [*shop.chain_docs(path), lower])), 4, "rule max_withdrawal")
    first = shop.tmp / "rulebook-1.json"
    first.write_text(json.dumps(shop.chain_docs(path)[0]))
    _refused(run_cli(offline.env, "rules", "pin", str(first)), 4, "older than rulebook #2")
